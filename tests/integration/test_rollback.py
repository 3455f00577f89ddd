"""`baton rollback` (and `baton diff`) on real ext4 and xfs images, as an operator runs them after a bad upgrade.

Per file system: files written through the tracked device, backed up twice (S1 full, S2 incremental); a "bad
upgrade" (files deleted, rewritten, added) through the device; rollback to S1 while attached (through
/dev/baton/NAME), then after another bad upgrade, rollback of the detached disk (offline). Each time the disk
must equal S1's restore byte for byte (outside the record file, which lives inside the file system and is
never rolled back), the file system must check clean, only a small part of the disk may be written, and the
next backup must restore to the disk. Errors: unknown snapshot, wrong disk, busy target, missing repository.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_root, need_tool
from faults.procs import Env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MiB = 1 << 20


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_tool("losetup", "unshare", "mkfs.ext4", "mkfs.xfs", "e2fsck", "xfs_repair")
    e = Env(tmp_path, prefix="rb", timeout=300)
    try:
        yield e
    finally:
        e.cleanup()


def in_ns(script: str, timeout: float = 120) -> None:
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script}\n{r.stdout}{r.stderr}"


def on_device(dev: str, script: str) -> None:
    """Run ``script`` with $m = the file system on ``dev`` mounted (private mount namespace)."""
    in_ns(f"m=$(mktemp -d); mount {dev} $m; trap 'umount $m; rmdir $m' EXIT; (cd $m; {script}); sync")


def fsck(fs: str, path: Path) -> None:
    cmd = ["e2fsck", "-fn", str(path)] if fs == "ext4" else ["xfs_repair", "-n", "-f", str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"


def record_ranges(disk: Path) -> list[tuple[int, int]]:
    from baton.record.placement import locate
    from baton.rollback import record_ranges as ranges

    loc = locate(str(disk), None, writable=False)
    try:
        return ranges(loc.record)
    finally:
        loc.close()


def same_outside(a: Path, b: Path, skip: list[tuple[int, int]], size: int) -> None:
    """``a`` and ``b`` are equal over [0, size) outside the ``skip`` ranges (byte for byte)."""
    step = 4 * MiB
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while pos < size:
            n = min(step, size - pos)
            x, y = bytearray(fa.read(n)), bytearray(fb.read(n))
            for off, length in skip:
                lo, hi = max(off, pos), min(off + length, pos + n)
                if lo < hi:
                    x[lo - pos:hi - pos] = bytes(hi - lo)
                    y[lo - pos:hi - pos] = bytes(hi - lo)
            if x != y:
                bad = next(i for i in range(n) if x[i] != y[i])
                raise AssertionError(f"{a} and {b} differ at byte {pos + bad}")
            pos += n


UPGRADE = ("rm -f app/lib1.so; head -c 3000000 /dev/urandom > app/lib2.so; echo v2-broken > app/VERSION; "
           "head -c 1500000 /dev/urandom > app/new-plugin.so; dd if=/dev/urandom of=data/db bs=4096 count=8 "
           "seek=100 conv=notrunc status=none")


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_rollback_after_a_bad_upgrade(env: Env, fs: str) -> None:
    size = 320 * MiB
    disk = env.root / f"{fs}.img"
    with open(disk, "wb") as f:
        f.truncate(size)
    subprocess.run([f"mkfs.{fs}", "-q", *(["-F", "-b", "4096"] if fs == "ext4" else ["-f"]), str(disk)], check=True,
                   capture_output=True, timeout=120)
    env.baton("init", str(disk))
    repo = str(env.root / "repo")
    env.baton("repo", "init", repo)
    name = env.name()
    dev = env.json("attach", str(disk), "--node", "n1", "--name", name)["device"]
    on_device(dev, "mkdir app data; head -c 2000000 /dev/urandom > app/lib1.so; "
                   "head -c 1000000 /dev/urandom > app/lib2.so; echo v1 > app/VERSION; "
                   "head -c 4000000 /dev/urandom > data/db")
    s1 = env.json("backup", name, "--repo", repo)
    on_device(dev, "echo more >> app/VERSION; head -c 500000 /dev/urandom > data/log")
    s2 = env.json("backup", name, "--repo", repo)
    assert s2["mode"] == "incremental"
    d = env.json("diff", s1["snapshot"], s2["snapshot"], "--repo", repo)
    assert 0 < d["changed_bytes"] < 20 * MiB and d["extents"]
    # the text form names the total
    assert "total:" in env.baton("diff", s1["snapshot"][:8], s2["snapshot"][:8], "--repo", repo).stdout
    ref = env.root / "s1.img"
    env.json("restore", s1["snapshot"], "--repo", repo, "--to", str(ref))

    # --- bad upgrade, then rollback while attached (through /dev/baton/NAME) ---
    on_device(dev, UPGRADE)
    busy = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                             f"m=$(mktemp -d); mount {dev} $m; echo up; read x; umount $m; rmdir $m"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout is not None and busy.stdout.readline().strip() == "up"
        err = env.json("rollback", name, s1["snapshot"], "--repo", repo, rc=3)
        assert err["error"] == "DeviceBusy" and "rollback refused" in err["message"]
    finally:
        busy.communicate("done\n", timeout=60)
    rb = env.json("rollback", name, s1["snapshot"], "--repo", repo)
    assert rb["mode"] == "attached" and rb["method"] == "record+diff", rb
    assert rb["last_backup"] == s2["snapshot"]
    assert 0 < rb["bytes_written"] < 0.1 * rb["disk_size"]
    skip = record_ranges(disk)
    assert sum(n for _o, n in skip) < 8 * MiB
    same_outside(Path(dev), ref, skip, size)  # read through the device, before anything mounts it again
    on_device(dev, "test ! -e app/new-plugin.so; test -e app/lib1.so; grep -qx v1 app/VERSION")
    s3 = env.json("backup", name, "--repo", repo)  # the next backup after a rollback
    assert s3["mode"] == "incremental"
    env.baton("detach", name)
    fsck(fs, disk)
    after = env.root / "s3.img"
    env.json("restore", s3["snapshot"], "--repo", repo, "--to", str(after))
    same_outside(disk, after, skip, size)

    # --- another bad upgrade through the device, then rollback of the detached disk (offline) ---
    name2 = env.name()
    dev2 = env.json("attach", str(disk), "--node", "n2", "--name", name2)["device"]
    on_device(dev2, UPGRADE)
    env.baton("detach", name2)
    rb2 = env.json("rollback", str(disk), s1["snapshot"], "--repo", repo, "--node", "n2")
    assert rb2["mode"] == "offline" and rb2["method"] == "record+diff", rb2
    assert 0 < rb2["bytes_written"] < 0.1 * size
    same_outside(disk, ref, skip, size)
    fsck(fs, disk)
    st = env.json("status", str(disk))
    assert st["clean"] is True and st["dirty_chunks"] > 0  # the rollback's writes are recorded
    s4 = env.json("backup", str(disk), "--repo", repo, "--node", "n2")
    assert s4["mode"] == "incremental"
    after4 = env.root / "s4.img"
    env.json("restore", s4["snapshot"], "--repo", repo, "--to", str(after4))
    same_outside(disk, after4, skip, size)

    # --- a disk written while not attached: rollback compares chunk by chunk and says why ---
    if fs == "ext4":
        loop = subprocess.run(["losetup", "--find", "--show", str(disk)], capture_output=True, text=True,
                              check=True).stdout.strip()
        try:
            on_device(loop, "echo bypass > app/VERSION")
        finally:
            subprocess.run(["losetup", "-d", loop], timeout=30)
        rb3 = env.json("rollback", str(disk), s1["snapshot"], "--repo", repo, "--node", "n2")
        assert rb3["method"] == "compare" and "written while not attached" in rb3["fallback_reason"], rb3
        assert rb3["bytes_read_disk"] == size and rb3["bytes_written"] < 0.1 * size
        same_outside(disk, ref, skip, size)
        fsck(fs, disk)


def test_rollback_bad_input(env: Env) -> None:
    disk = env.root / "raw.img"
    other = env.root / "other.img"
    for p in (disk, other):
        with open(p, "wb") as f:
            f.truncate(32 * MiB)
        env.baton("init", str(p))
    repo = str(env.root / "repo")
    env.baton("repo", "init", repo)
    s_other = env.json("backup", str(other), "--repo", repo, "--node", "n1")["snapshot"]
    env.json("backup", str(disk), "--repo", repo, "--node", "n1")
    # unknown snapshot: exit 7
    err = env.json("rollback", str(disk), "abcdef0123", "--repo", repo, rc=7)
    assert err["error"] == "RepoError" and "no snapshot" in err["message"]
    # a snapshot of another disk: exit 3, nothing written
    err = env.json("rollback", str(disk), s_other, "--repo", repo, rc=3)
    assert "wrong disk" in err["message"]
    # repository missing: exit 7
    err = env.json("rollback", str(disk), s_other, "--repo", str(env.root / "nope"), rc=7)
    assert err["error"] == "RepoNotFound"
    # neither a NAME nor a disk: exit 3
    err = env.json("rollback", "no-such-name", s_other, "--repo", repo, rc=3)
    assert "neither an attachment" in err["message"]
    # busy target: a loop device over the disk
    loop = subprocess.run(["losetup", "--find", "--show", str(disk)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        snap = env.json("snapshots", "--repo", repo)[-1]["snapshot_id"]
        err = env.json("rollback", str(disk), snap, "--repo", repo, rc=3)
        assert err["error"] == "DeviceBusy"
    finally:
        subprocess.run(["losetup", "-d", loop], timeout=30)
    # attached elsewhere (record not clean, owner another node): exit 6
    name = env.name()
    env.json("attach", str(disk), "--node", "n1", "--name", name)
    try:
        err = env.json("rollback", name, s_other, "--repo", repo, rc=3)  # wrong disk, through the attachment
        assert "wrong disk" in err["message"]
    finally:
        env.baton("detach", name)
