"""Failover with the dm-era frontend across QEMU guests that share one disk (issue 11, section 4).

One cluster (guests A and B, one 64 MiB disk, the repository in the share) serves every test of this module,
in order; each test starts from the state the previous one left (which node owns the disk with which
frontend), and rebuilds that state from scratch when an earlier test failed. Writes come from a seeded writer
in the guest (tests/vm/scenario.py); the host keeps a shadow of every acknowledged write, compares the shared
disk image with it before each backup (the copy at the freeze point: nothing writes between the check and the
backup's freeze), and restores every snapshot on the host to compare it with the shadow byte for byte.

1. power loss of a dm owner, takeover by another guest with dm, incremental backup of only the changed chunks;
2. the node running a backup loses power after its first checkpoint; the next backup, on the other guest;
3. owners alternating dm, fuse, nbd, dm across the guests (power loss, clean detach, power loss in the
   middle of the nbd owner's backup between), each backup holding every acknowledged write of the owners
   before it;
4. a stale dm owner that keeps running while the other guest takes over: its writes fail with EIO (the
   latency is printed, not asserted), and the new owner's backup holds every write it acknowledged;
5. an exception store that overflows during a backup: the backup fails with the reason, the application's
   writes all succeed, the next backup is exact;
6. the daemon of a dm owner killed right after a backup's freeze point: writes go on with no daemon, the next
   attach adopts the stack (the dead backup's snapshot dropped), and the next backup has every write;
7. the era metadata damaged while its owner is down: the next backup is full and says why; exact.

BATON_SEED (default 20261124) seeds every writer; it is printed.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator

import pytest

from vm.harness import VENV_BIN, Guest, VmCluster
from vm.image import Image
from vm.scenario import SEED, Scenario, Shadow, distinct

DISK_MIB = 64
NAME = Scenario.NAME


@pytest.fixture(scope="module")
def sc(vm_image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    print(f"BATON_SEED={SEED}")
    with VmCluster(tmp_path_factory.mktemp("failover"), disk_mib=DISK_MIB, guests=("A", "B"),
                   image=vm_image) as c:
        s = Scenario(c)
        # the repository and the disk's record are made on the host (this checkout's CLI, the disk image
        # file) before the guests boot (init refuses a disk that QEMU holds open): no guest time spent on them
        for argv in (["repo", "init", str(s.repo_host)], ["init", str(c.disk)]):
            cp = subprocess.run([str(VENV_BIN / "baton"), *argv, "--json"], capture_output=True, text=True,
                                timeout=120)
            assert cp.returncode == 0, cp.stdout + cp.stderr
        c.boot("A", "B")
        s.data_size = s.data_size_of_record()
        s.shadow = Shadow(s.data_size)
        s.ok = True
        yield s


def ready(g: Guest) -> Guest:
    """The guest up and ready (booting it if it is down; waiting for a boot started earlier)."""
    if not g.running:
        g.boot(wait=False)
    if not (g.agent_dir / "ready").exists():
        g.wait_ready()
    return g


def require(sc: Scenario, owner: str, frontend: str = "dm", *extra: str, env: dict[str, str] | None = None) -> Guest:
    """The state a test starts from: ``owner`` serves the disk with ``frontend``. When the test before failed,
    start over: every guest powered off, the record re-created, a full backup as the base."""
    g = sc.c[owner]
    if sc.ok and sc.owner == owner and sc.frontend == frontend:
        return g
    print(f"the previous test did not leave {owner} attached with {frontend}: starting over")
    for other in sc.c.guests.values():
        other.kill()
    ready(g)
    g.baton("init", "/dev/vda", "--force", json=True)
    sc.shadow = Shadow(sc.data_size)
    sc.shadow.buf[:] = sc.disk()
    sc.attach(g, frontend, *extra, env=env)
    sc.backup(g, "--full")
    return g


def test_power_loss_of_a_dm_owner_and_an_incremental_on_the_new_owner(sc: Scenario) -> None:
    print(f"BATON_SEED={SEED}")
    sc.ok = False
    a, b = ready(sc.c["A"]), ready(sc.c["B"])
    sc.attach(a, "dm")
    sc.write(a, "first", 160)
    sc.check_disk()
    full = sc.backup(a)
    assert full["mode"] == "full", full
    sc.restore_matches(full["snapshot"])

    w2 = sc.write(a, "before the power loss", 48)
    a.kill()
    sc.check_disk()  # every acknowledged write reached the shared disk
    a.boot(wait=False)  # for the next test; B takes over meanwhile
    # BATON_BATCH_CHUNKS: B's daemon checkpoints every 32 chunks (the next test kills it in the middle)
    sc.attach(b, "dm", env={"BATON_BATCH_CHUNKS": "32"})
    inc = sc.backup(b)
    changed = len(w2.chunks)
    print(f"chunks written since the full backup: {changed}; the incremental read {inc['chunks_read']}")
    assert inc["mode"] == "incremental", inc
    assert changed <= inc["chunks_read"] <= changed + 2, inc
    sc.restore_matches(inc["snapshot"])
    sc.ok = True


def test_power_loss_in_the_middle_of_a_backup_then_the_next_backup_on_the_other_guest(sc: Scenario) -> None:
    print(f"BATON_SEED={SEED}")
    b = require(sc, "B", env={"BATON_BATCH_CHUNKS": "32"})
    sc.ok = False
    a = sc.c["A"]
    w = sc.write(b, "many", 320, sync_every=32)
    sc.check_disk()
    before = sc.snapshots()
    sc.power_loss_during_backup(b, checkpoints=2)  # the first checkpoint's record update is durable then
    print(f"B lost power during its backup of {len(w.chunks)} chunks, after its second checkpoint")
    sc.check_disk()
    ready(a)
    sc.attach(a, "dm")
    b.boot(wait=False)
    res = sc.backup(a)
    print(f"after the interrupted backup: {res['mode']} ({res.get('reason')}), {res['chunks_read']} chunks read "
          f"of the {len(w.chunks)} written")
    # incremental from the last checkpoint: the chunks it stored are no longer owed
    assert res["mode"] == "incremental" and res["parent"] not in before, res
    assert 0 < res["chunks_read"] < len(w.chunks), res
    sc.restore_matches(res["snapshot"])
    sc.ok = True


def test_owners_alternate_dm_fuse_nbd_dm(sc: Scenario) -> None:
    print(f"BATON_SEED={SEED}")
    a = require(sc, "A")
    sc.ok = False
    b = sc.c["B"]

    by_dm = sc.write(a, "A dm", 40)
    # as if a backup had died inside its freeze point: a metadata snapshot stays held in the era metadata
    # (one can be held at a time; the next owner's fold must drop it to take its own)
    a.run(f"dmsetup message baton-{NAME}:era 0 take_metadata_snap")
    held = a.run(f"dmsetup status baton-{NAME}:era").out.split()
    assert held[2] == "era" and held[6] != "-", held
    a.kill()  # a dm owner's power loss: its writes are only in the era metadata
    a.boot(wait=False)
    ready(b)
    st = sc.attach(b, "fuse")
    assert f"folded {len(by_dm.chunks)} chunks" in st.get("era_settled", ""), st
    res = sc.backup(b)
    assert res["mode"] == "incremental" and res["chunks_read"] == len(by_dm.chunks), res
    sc.restore_matches(res["snapshot"])

    by_fuse = sc.write(b, "B fuse", 40)
    b.baton("detach", NAME, json=True)  # clean
    sc.check_disk()

    ready(a)
    st = sc.attach(a, "nbd", env={"BATON_BATCH_CHUNKS": "8"})
    assert st["socket"], st
    res = sc.backup(a)
    assert res["mode"] == "incremental" and res["chunks_read"] == len(by_fuse.chunks), res
    sc.restore_matches(res["snapshot"])

    by_nbd = sc.write(a, "A nbd", 40, mode="nbd", target=st["socket"])
    # an nbd owner's power loss in the middle of its backup: its marks are in its node slot and the frozen set
    sc.power_loss_during_backup(a, checkpoints=1)
    print(f"A lost power during its backup of {len(by_nbd.chunks)} chunks, after a checkpoint")
    sc.check_disk()
    a.boot(wait=False)
    sc.attach(b, "dm")
    res = sc.backup(b)
    assert res["mode"] == "incremental" and 0 < res["chunks_read"] <= len(by_nbd.chunks), res
    sc.restore_matches(res["snapshot"])
    sc.ok = True


def test_a_stale_dm_owner_is_fenced_while_it_writes(sc: Scenario) -> None:
    print(f"BATON_SEED={SEED}")
    b = require(sc, "B")
    sc.ok = False
    a = sc.c["A"]
    settled = sc.write(b, "B before the partition", 24)
    tag, job = sc.start_writer(b, "B during the partition", count=-1, hi=512, sync_every=1, pause=0.02)
    sc.wait_log(tag, lambda x: len(x.acked) >= 10 or x.failed)
    ready(a)
    watch = sc.watch_epoch()
    try:
        t0 = time.monotonic()
        # A takes over while B keeps running (a partition: nobody powered B off). --cow-size: for the next test.
        took = sc.attach_bg(a, "dm", "--cow-size", "1M")
        stale = sc.wait_log(tag, lambda x: x.failed is not None, timeout=300)
        t2 = time.monotonic()
        st = sc.attached(took)
        t1 = time.monotonic()
    finally:
        watch.close()
    assert st["epoch"] > watch.first, st
    at = watch.changed_at
    print(f"B's writer: {len(stale.acked)} writes acknowledged, then {stale.failed!r}, seen {t2 - t0:.1f} s after "
          f"A's attach started" + (f", {t2 - at:.1f} s after the new epoch was on disk" if at else "")
          + f"; A's attach took {t1 - t0:.1f} s (host clock, 50 ms polls, TCG guests)")
    print("A's daemon log:\n  " + "\n  ".join(a.run(f"cat /run/baton/{NAME}/daemon.log").out.splitlines()[-8:]))
    r = job.wait(60)
    assert r.rc == 3 and "Input/output error" in stale.failed, (r, stale.failed)
    gone = b.baton("detach", NAME, json=True)  # cleans up what the fenced daemon left
    print("B's daemon log:\n  " + "\n  ".join(gone.get("log_tail", [])))
    assert gone.get("failure") == "fenced" and not gone["was_running"], gone
    assert b.run("dmsetup ls").out.strip() in ("", "No devices found"), b.run("dmsetup ls").out
    sc.shadow.apply(stale)
    sc.check_disk(stale)  # the failed write (and nothing acknowledged) may be missing

    res = sc.backup(a)
    want = distinct([settled, stale])
    print(f"B wrote {len(want)} chunks since the last backup; A's backup read {res['chunks_read']}")
    assert res["mode"] == "incremental" and res["chunks_read"] >= len(want), res
    sc.restore_matches(res["snapshot"])
    sc.ok = True


def test_an_overflowing_exception_store_fails_the_backup_not_the_writes(sc: Scenario) -> None:
    print(f"BATON_SEED={SEED}")
    a = require(sc, "A", "dm", "--cow-size", "1M")
    sc.ok = False
    first = sc.write(a, "before the backup", 40)
    sc.check_disk()
    # Right after the freeze point (--post runs before the backup reads), 64 chunk writes: the 1 MiB
    # exception store holds 16 chunks' old content.
    tag = sc.tag("during the backup")
    post = sc.writer_cmd(tag, count=64, sync_every=8)
    err = sc.backup(a, "--post", post, rc=3)
    print(f"the backup failed: {err.get('message')}")
    assert err["error"] == "DeviceError" and "exception store" in err["message"], err
    during = sc.batch(tag)
    assert len(during.acked) == 64 and not during.failed, during
    sc.shadow.apply(during)
    sc.check_disk()
    assert a.run(f"dmsetup table baton-{NAME}").out.split()[2] == "linear"
    assert f"baton-{NAME}:snap" not in a.run("dmsetup ls").out

    res = sc.backup(a)
    want = distinct([first, during])
    assert res["mode"] == "incremental" and res["chunks_read"] >= len(want), res
    sc.restore_matches(res["snapshot"])
    sc.ok = True


def test_the_daemon_killed_inside_a_backup_then_adopted(sc: Scenario) -> None:
    print(f"BATON_SEED={SEED}")
    a = require(sc, "A", "dm", "--cow-size", "1M")
    sc.ok = False
    before = sc.write(a, "before the backup", 30)
    sc.check_disk()
    top = f"dmsetup info -c --noheadings -o name,major,minor baton-{NAME}"
    top_before = a.run(top).out.strip()
    # the --post hook runs right after the freeze point: the daemon dies with the backup's snapshot in place
    kill = (f"{VENV_BIN}/python -c \"import json, os; "
            f"os.kill(json.load(open('/run/baton/{NAME}/daemon.json'))['pid'], 9)\"")
    r = a.baton("backup", NAME, "--repo", sc.repo, "--post", kill, json=False, rc=None)
    print(f"the backup whose daemon was killed: exit {r.rc}: {r.out.strip()[-300:]} {r.err.strip()[-300:]}")
    assert r.rc != 0, r
    # nobody serves the disk now, but the kernel does: writes go on (through the snapshot-origin the dead
    # backup left, whose 1 MiB exception store overflows) and dm-era tracks them
    after = sc.write(a, "no daemon", 40)
    sc.check_disk()
    st = sc.attach(a, "dm")  # adopts the stack, drops the dead backup's snapshot, folds
    assert st["device"] == f"/dev/baton/{NAME}", st
    assert a.run(top).out.strip() == top_before, "the top device was rebuilt, not adopted"
    tables = a.run("dmsetup table").out
    assert f"baton-{NAME}:snap" not in tables and "snapshot-origin" not in tables, tables
    res = sc.backup(a)
    want = distinct([before, after])
    print(f"written since the last backup: {len(want)} chunks; read {res['chunks_read']}")
    assert res["mode"] == "incremental" and res["chunks_read"] >= len(want), res
    sc.restore_matches(res["snapshot"])
    sc.ok = True


def test_damaged_era_metadata_makes_the_next_backup_full(sc: Scenario) -> None:
    print(f"BATON_SEED={SEED}")
    a = require(sc, "A")
    sc.ok = False
    b = sc.c["B"]
    sc.write(a, "A before the power loss", 32)
    a.kill()  # the writes are in the era metadata only (the record says FLAG_ERA_PENDING)
    sc.check_disk()
    offset, length = sc.era_extents()[0]
    garbage = random.Random(f"{SEED}/era-damage").randbytes(4096)
    with open(sc.c.disk, "r+b") as f:  # the era superblock overwritten
        f.seek(offset)
        f.write(garbage)
        f.flush()
        os.fsync(f.fileno())
    print(f"era metadata superblock at byte {offset} of the disk (region piece of {length} bytes) overwritten")
    ready(b)
    sc.attach(b, "dm")
    res = sc.backup(b)
    assert res["mode"] == "full" and "era metadata" in (res.get("reason") or ""), res
    sc.restore_matches(res["snapshot"])
    sc.ok = True

