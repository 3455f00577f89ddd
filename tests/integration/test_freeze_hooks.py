"""`baton backup --freeze MOUNTPOINT --pre CMD --post CMD` on a real ext4 through /dev/baton/NAME, attached
(the backup runs in the daemon) and offline. A "database" (a process appending checksummed records) is paused
by the hooks; its restored file holds only whole records. Hook failures, a bad mount point, and the freeze
window (bounded) are checked; the report is in --json and in the snapshot's info.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_root, need_tool
from faults.procs import Env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MiB = 1 << 20
DB = r"""
import os, sys, zlib
f = open(sys.argv[1], "ab", buffering=0)
i = 0
while True:
    body = (b"%08d " % i) + os.urandom(40).hex().encode()
    f.write(body + b" %08x\n" % zlib.crc32(body))
    i += 1
"""


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_tool("losetup", "mkfs.ext4", "fsfreeze", "e2fsck")
    e = Env(tmp_path, prefix="fz", timeout=200)
    try:
        yield e
    finally:
        e.cleanup()


def check_records(path: Path) -> int:
    import zlib

    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the last record is torn"
    for ln in lines[:-1]:
        body, crc = ln.rsplit(b" ", 1)
        assert int(crc, 16) == zlib.crc32(body), f"bad record {ln!r}"
    return len(lines) - 1


def test_freeze_and_hooks_attached(env: Env) -> None:
    disk = env.root / "d.img"
    with open(disk, "wb") as f:
        f.truncate(256 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(disk)], check=True, capture_output=True)
    env.baton("init", str(disk))
    repo = str(env.root / "repo")
    env.baton("repo", "init", repo)
    name = f"fz-{uuid.uuid4().hex[:8]}"
    env.names.add(name)
    dev = env.json("attach", str(disk), "--node", "n1", "--name", name)["device"]
    mnt = Path(tempfile.mkdtemp(prefix="baton-fz-"))
    subprocess.run(["mount", dev, str(mnt)], check=True, timeout=60)
    db = None
    try:
        db = subprocess.Popen([sys.executable, "-c", DB, str(mnt / "db.log")])
        time.sleep(0.5)
        pre = f"kill -STOP {db.pid}; sync; echo paused-db"
        post = f"kill -CONT {db.pid}; echo resumed-db"
        r = env.json("backup", name, "--repo", repo, "--freeze", str(mnt), "--pre", pre, "--post", post)
        c = r["consistency"]
        assert c["pre"]["exit_status"] == 0 and "paused-db" in c["pre"]["output_tail"]
        assert c["post"]["exit_status"] == 0 and "resumed-db" in c["post"]["output_tail"]
        fr = c["freeze"]
        assert fr["mountpoint"] == str(mnt) and 0 < fr["window_s"] < 0.5 and not fr["timed_out"], fr
        snaps = env.json("snapshots", "--repo", repo)
        assert snaps[-1]["snapshot_id"] == r["snapshot"]
        assert snaps[-1]["info"]["consistency"]["freeze"]["window_s"] == fr["window_s"]
        # the file system is writable again at once, and the "database" runs on
        size0 = (mnt / "db.log").stat().st_size
        (mnt / "after").write_text("thawed")
        time.sleep(0.3)
        assert (mnt / "db.log").stat().st_size > size0

        # a failing --pre: exit 1, no snapshot, nothing frozen, the hook's output in the message
        err = env.json("backup", name, "--repo", repo, "--freeze", str(mnt), "--pre", "echo not-now; exit 3",
                       rc=1)
        assert "--pre hook failed (exit status 3)" in err["message"] and "not-now" in err["message"]
        assert len(env.json("snapshots", "--repo", repo)) == 1
        (mnt / "after").write_text("still writable")
        # a failing --post: exit 1 naming the committed snapshot; the snapshot exists
        err = env.json("backup", name, "--repo", repo, "--pre", "true", "--post", "exit 4", rc=1)
        assert "--post hook failed (exit status 4)" in err["message"] and "is committed" in err["message"]
        assert len(env.json("snapshots", "--repo", repo)) == 2
        # a hook that hangs is killed at --hook-timeout
        t0 = time.monotonic()
        err = env.json("backup", name, "--repo", repo, "--pre", "sleep 30", "--hook-timeout", "1", rc=1)
        assert "timed out" in err["message"] and time.monotonic() - t0 < 20
        # not a mount point: exit 2
        err = env.json("backup", name, "--repo", repo, "--freeze", str(env.root), rc=2)
        assert "not a mount point" in err["message"]
    finally:
        if db is not None:
            db.kill()
            db.wait(timeout=30)
        subprocess.run(["umount", str(mnt)], timeout=60)
        mnt.rmdir()
    env.baton("detach", name)
    # restore the hooked snapshot: the "database" holds only whole records
    img = env.root / "restored.img"
    env.json("restore", r["snapshot"], "--repo", repo, "--to", str(img))
    subprocess.run(["e2fsck", "-fn", str(img)], check=True, capture_output=True, timeout=120)
    out = env.root / "db.copy"
    subprocess.run(["debugfs", "-R", f"dump /db.log {out}", str(img)], check=True, capture_output=True, timeout=60)
    assert check_records(out) > 0
    # offline: --pre/--post run in this process around the offline backup's freeze point
    r2 = env.json("backup", str(disk), "--repo", repo, "--node", "n1", "--pre", "echo offline-pre",
                  "--post", "echo offline-post")
    assert r2["consistency"]["pre"]["output_tail"].strip() == "offline-pre"
    assert r2["consistency"]["post"]["exit_status"] == 0
    # --post alone runs after the freeze point too (it was dropped silently when no --pre ran)
    r3 = env.json("backup", str(disk), "--repo", repo, "--node", "n1", "--post", "echo post-alone")
    assert r3["consistency"]["post"]["output_tail"].strip() == "post-alone"
