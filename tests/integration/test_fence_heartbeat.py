"""A superseded owner stops even when it only writes chunks it had already marked (no commit, so no fence check
on the write path): the daemon's heartbeat re-reads the record header, fails further I/O with EIO and exits 5.
Without the heartbeat the old owner's write below succeeds and lands on the shared disk (split brain)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import need_root, need_tool

pytestmark = pytest.mark.integration


def _baton(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_superseded_owner_stops_writing_already_marked_chunks(tmp_path: Path) -> None:
    need_root()
    need_tool("losetup")
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    base = dict(os.environ)
    env_a = base | {"BATON_RUN_DIR": str(tmp_path / "run-a"), "BATON_DEV_DIR": str(tmp_path / "dev-a")}
    env_b = base | {"BATON_RUN_DIR": str(tmp_path / "run-b"), "BATON_DEV_DIR": str(tmp_path / "dev-b")}
    na, nb = f"hb-a-{uuid.uuid4().hex[:6]}", f"hb-b-{uuid.uuid4().hex[:6]}"
    assert _baton(base, "init", str(img)).returncode == 0
    try:
        r = _baton(env_a, "attach", str(img), "--node", "node-a", "--name", na)
        assert r.returncode == 0, r.stderr
        dev_a = tmp_path / "dev-a" / na
        pid_a = json.loads((tmp_path / "run-a" / na / "daemon.json").read_text())["pid"]
        block = b"A" * 4096
        fd = os.open(dev_a, os.O_RDWR | os.O_DIRECT)
        try:
            import mmap

            buf = mmap.mmap(-1, 4096)
            buf[:] = block
            os.pwrite(fd, buf, 0)  # first touch: chunk 0 is now marked in A's slot
            r = _baton(env_b, "attach", str(img), "--node", "node-b", "--name", nb)
            assert r.returncode == 0, r.stderr
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid_a}"):
                time.sleep(0.1)
            buf[:] = b"Z" * 4096
            with pytest.raises(OSError):
                os.pwrite(fd, buf, 0)  # chunk 0 is already marked: only the heartbeat can stop this write
        finally:
            os.close(fd)
        assert not os.path.exists(f"/proc/{pid_a}"), "the superseded daemon is still running"
        log = (tmp_path / "run-a" / na / "daemon.log").read_text()
        assert "fenced" in log and "status 5" in log, log
        with open(img, "rb") as f:
            assert f.read(4096) == block  # the old owner's second write never reached the disk
    finally:
        _baton(env_b, "detach", nb)
        _baton(env_a, "detach", na)
