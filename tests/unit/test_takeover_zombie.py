"""A takeover does not wait for its dead predecessor to be reaped. A daemon killed with SIGKILL becomes a
zombie: the kernel has closed its files, its FUSE connection and its locks, and only its pid stays until its
parent (init, or whatever started `baton attach`) reaps it. Where init reaps late, the clean-up's wait for that
cost every takeover up to 1.2 s here. The zombie's parent below is this test, which reaps it only at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from baton.daemon import client
from baton.host.attachments import state_path, write_state
from baton.util import proc_stat


def test_the_clean_up_of_a_killed_daemon_does_not_wait_for_its_reap(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BATON_RUN_DIR", str(tmp_path / "run"))
    child = subprocess.Popen(["sleep", "600"])
    try:
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (proc_stat(child.pid) or ["?"])[0] != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (proc_stat(child.pid) or ["?"])[0] == "Z", "the killed child did not become a zombie"
        st = {"name": "zomb", "pid": child.pid, "node": "A", "disk": "/nonexistent", "frontend": ""}
        write_state("zomb", st)

        def no_waiting(_s: float) -> None:
            raise AssertionError("the clean-up waited for the zombie to be reaped")

        monkeypatch.setattr(client.time, "sleep", no_waiting)
        done = client._cleanup_stale("zomb", st)
        assert not state_path("zomb").exists()
        assert any("removed" in d for d in done), done
        assert (proc_stat(child.pid) or ["?"])[0] == "Z"   # still unreaped: nothing needed it gone
    finally:
        monkeypatch.undo()
        child.kill()
        child.wait(10)
