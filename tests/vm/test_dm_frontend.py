"""The dm-era frontend in QEMU guests (this host's kernel has no device-mapper): `baton attach --frontend dm`.

* attach, mkfs.ext4, write, a full then an incremental backup that reads only the changed chunks, every
  restore compared byte for byte with the device; the daemon killed with -9: I/O and tracking go on, the next
  attach adopts the stack and the next backup has every write made meanwhile; detach leaves nothing behind;
* point in time: a backup's snapshot holds the disk as it was at the freeze point while the application
  rewrites it during the backup; an exception store that overflows fails the backup with the reason while the
  application's writes succeed.

Two-guest scenarios (a stale dm owner fenced while it writes, owners alternating dm, fuse, nbd and dm across power
losses, damaged era metadata) are in tests/vm/test_dm_failover.py. Randomness comes from BATON_SEED (printed).
Figures (the freeze window) are printed, not asserted.
"""

from __future__ import annotations

import os
import random
import textwrap
from pathlib import Path

from vm.harness import Guest, VmCluster
from vm.image import Image

SEED = int(os.environ.get("BATON_SEED", "20261127"))
CHUNK = 64 << 10
DISK_MIB = 128  # 2048 chunks of 64 KiB; the tail record area takes the last few MiB
DATA_CHUNKS = 1900  # random writes stay below this chunk
REPO = "/var/tmp/repo"


def _sh(g: Guest, cmd: str, timeout: float = 300) -> str:
    return g.run(cmd, timeout=timeout).out


def _dm_devices(g: Guest) -> list[str]:
    out = _sh(g, "dmsetup ls")
    return sorted(ln.split()[0] for ln in out.splitlines() if ln.strip() and not ln.startswith("No devices"))


def _raw_write(g: Guest, dev: str, rng: random.Random, nchunks: int, lo: int, hi: int, tag: str) -> list[int]:
    """Write ``nchunks`` distinct chunks (chosen by ``rng`` in [lo, hi)) of ``dev`` with seeded random data, each
    with O_DIRECT and fsync'd; the chunk numbers written."""
    chunks = sorted(rng.sample(range(lo, hi), nchunks))
    seed = rng.randrange(1 << 30)
    code = textwrap.dedent(f"""
        import mmap, os, random
        rng = random.Random({seed})
        fd = os.open({dev!r}, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, {CHUNK})
        for c in {chunks!r}:
            buf[:] = rng.randbytes({CHUNK})
            assert os.pwrite(fd, buf, c * {CHUNK}) == {CHUNK}
        os.fsync(fd)
        print("{tag}: wrote", len({chunks!r}), "chunks")
    """)
    g.python(code)
    return chunks


def _restore_equals(g: Guest, snap: str, against: str, name: str, repo: str = REPO) -> None:
    out = f"/var/tmp/{name}.img"
    g.baton("restore", snap, "--repo", repo, "--to", out, json=True)
    _sh(g, f"cmp {out} {against} && rm -f {out}")


def test_attach_backup_restore_then_kill_the_daemon_and_adopt(tmp_path: Path, vm_image: Image) -> None:
    rng = random.Random(SEED)
    print(f"BATON_SEED={SEED}")
    with VmCluster(tmp_path, disk_mib=DISK_MIB, guests=("A",), image=vm_image) as c:
        (a,) = c.boot("A")
        # a format-v2 record has no era region: dm is refused, saying why and what works, and nothing is left
        a.baton("init", "/dev/vda", "--record-format", "2", json=True)
        err = a.baton("attach", "/dev/vda", "--name", "d", "--frontend", "dm", json=True, rc=4)
        print(f"v2 record: {err['message']}")
        assert err["error"] == "RecordError" and "record format v2 has no era metadata region" in err["message"]
        assert "--frontend fuse" in err["message"], err
        assert _dm_devices(a) == [] and _sh(a, "ls /run/baton 2>/dev/null").strip() == ""
        _sh(a, f"dd if=/dev/zero of=/dev/vda bs=1M seek={DISK_MIB - 16} count=16 oflag=direct status=none")  # the tail
        a.baton("init", "/dev/vda", json=True)
        a.baton("repo", "init", REPO, json=True)
        st = a.baton("attach", "/dev/vda", "--name", "d", json=True)  # the default: auto
        assert st["frontend"] == "dm" and st["device"] == "/dev/baton/d", st
        assert st["frontend_reason"].startswith("auto: dm, because"), st
        assert _sh(a, "readlink /dev/baton/d").strip() == "/dev/mapper/baton-d"
        assert _dm_devices(a) == ["baton-d", "baton-d:era", "baton-d:meta", "baton-d:origin"]

        # ext4 on the tracked device; no lazy init, so nothing writes behind the test's back once unmounted
        _sh(a, "mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/baton/d && mkdir -p /mnt/d && "
               "mount /dev/baton/d /mnt/d && head -c 6291456 /dev/urandom > /mnt/d/one && umount /mnt/d")
        full = a.baton("backup", "d", "--repo", REPO, json=True)
        assert full["mode"] == "full", full

        _sh(a, "mount /dev/baton/d /mnt/d && head -c 1048576 /dev/urandom > /mnt/d/two && umount /mnt/d")
        inc = a.baton("backup", "d", "--repo", REPO, json=True)
        print(f"incremental after a 1 MiB file (16 chunks) on ext4: {inc['chunks_read']} chunks read")
        assert inc["mode"] == "incremental" and 16 <= inc["chunks_read"] < 64, inc

        # The daemon killed: the device keeps serving and the kernel keeps tracking
        _sh(a, "kill -9 $(python3 -c 'import json; print(json.load(open(\"/run/baton/d/daemon.json\"))[\"pid\"])')")
        gone = a.baton("status", "d", json=True)
        assert gone["failure"] == "died", gone
        written = _raw_write(a, "/dev/baton/d", rng, 24, 0, DATA_CHUNKS, "after the kill")
        print(f"chunks written while no daemon ran: {written}")
        again = a.baton("attach", "/dev/vda", "--name", "d", json=True)
        assert again["frontend"] == "dm", again
        live = a.baton("status", "d", json=True)
        assert live["frontend_stats"]["adopted"] == 1, live["frontend_stats"]
        assert live["frontend_stats"]["chunks_folded"] == len(written), live["frontend_stats"]
        after = a.baton("backup", "d", "--repo", REPO, json=True)
        assert after["mode"] == "incremental" and after["chunks_read"] == len(written), after
        # a snapshot is a complete index: restoring the last one checks the whole chain byte for byte
        _restore_equals(a, after["snapshot"], "/dev/baton/d", "adopted")
        assert live["era"]["pending"] and live["era"]["folded"] >= 3, live["era"]

        a.baton("detach", "d", json=True)
        assert _dm_devices(a) == []
        assert _sh(a, "losetup -a").strip() == ""
        rec = a.baton("status", "/dev/vda", json=True)
        assert rec["clean"] and not rec["era"]["pending"], rec["era"]
        assert _sh(a, "test -e /dev/baton/d || echo gone").strip() == "gone"


def test_point_in_time_under_writes_and_an_overflowing_exception_store(tmp_path: Path, vm_image: Image) -> None:
    rng = random.Random(SEED + 1)
    print(f"BATON_SEED={SEED}")
    with VmCluster(tmp_path, disk_mib=DISK_MIB, guests=("A",), image=vm_image) as c:
        (a,) = c.boot("A")
        a.baton("init", "/dev/vda", json=True)
        a.baton("repo", "init", REPO, json=True)
        a.baton("attach", "/dev/vda", "--name", "d", "--frontend", "dm", "--cow-size", "1M", json=True)
        before = _raw_write(a, "/dev/baton/d", rng, 128, 0, DATA_CHUNKS, "before")
        # 4 MiB (64 chunks) rewritten right after the freeze point: more than the 1 MiB (16 chunks) exception
        # store holds.
        _sh(a, "head -c 4194304 /dev/urandom > /var/tmp/pattern")
        post = "dd if=/var/tmp/pattern of=/dev/baton/d bs=64k seek=100 oflag=direct conv=fsync status=none"
        err = a.baton("backup", "d", "--repo", REPO, "--post", post, json=True, rc=3)
        print(f"overflow: {err['message']}")
        assert err["error"] == "DeviceError" and "exception store" in err["message"], err
        assert "--cow-size" in err["hint"], err
        # the application's writes went through, and the device still serves, back on its linear table
        _sh(a, "cmp -n 4194304 /var/tmp/pattern /dev/baton/d --ignore-initial=0:6553600")
        assert _dm_devices(a) == ["baton-d", "baton-d:era", "baton-d:meta", "baton-d:origin"]
        assert " linear " in _sh(a, "dmsetup table baton-d")

        # The same store holds 12 rewritten chunks: the snapshot shows the disk as it was at the freeze point
        # (copied by the --pre hook, when nothing else writes) while the --post hook rewrites 12 of the chunks
        # the backup is about to read.
        rewrite = sorted(rng.sample(before, 12))
        writer = textwrap.dedent(f"""
            import mmap, os, random
            rng = random.Random({rng.randrange(1 << 30)})
            fd = os.open("/dev/baton/d", os.O_WRONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, {CHUNK})
            for c in {rewrite!r}:
                buf[:] = rng.randbytes({CHUNK})
                os.pwrite(fd, buf, c * {CHUNK})
            os.fsync(fd)
        """)
        (c.share / "writer.py").write_text(writer)
        pre = "dd if=/dev/baton/d of=/var/tmp/atfreeze bs=1M iflag=direct status=none"
        res = a.baton("backup", "d", "--repo", REPO, "--pre", pre, "--post", "python3 /mnt/share/writer.py",
                      json=True)
        print(f"point-in-time backup: {res['mode']} ({res['reason']}), {res['chunks_read']} chunks read, "
              f"{res['duration_s']} s; chunks rewritten after the freeze point: {rewrite}")
        assert res["consistency"]["post"]["exit_status"] == 0, res["consistency"]
        _sh(a, "! cmp -s /var/tmp/atfreeze /dev/baton/d")  # the rewrites reached the device
        stats = a.baton("status", "d", json=True)["frontend_stats"]
        print(f"freeze window {stats['freeze_ms']} ms (max {stats['freeze_ms_max']} ms) in a TCG guest")
        _restore_equals(a, res["snapshot"], "/var/tmp/atfreeze", "pit")
        a.baton("detach", "d", json=True)
        assert _dm_devices(a) == []
