"""`baton backup NAME` and `baton status NAME` are one request to a running daemon: run them end to end against
a stand-in daemon (a :class:`baton.daemon.protocol.ControlServer` in this process, named by a state file whose
pid is this process) and check what they printed, and which modules the client process had loaded by the end.

The frontends (and the tracker behind them), ``logging``, ``subprocess`` and ``signal`` are for the daemon,
``attach`` and the clean-up of a dead daemon, ``pathlib`` for the code that works on Path objects, and the store
classes (``baton.storage.base``, ``wrappers``, ``urllib.parse``) for opening a repository; a client
that only asks a running daemon must not import them (each costs a few milliseconds, more with a cold page
cache, before the request is even sent). The engine code is pinned by test_client_imports.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.daemon.protocol import ControlServer
from baton.host.attachments import write_state

NOT_ON_THE_CLIENT_PATH = ("baton.frontends", "baton.frontends.base", "baton.tracker", "baton.record",
                          "baton.repo", "baton.backup", "baton.daemon.offline", "baton.daemon.server",
                          "baton.host.inuse", "logging", "subprocess", "signal", "pathlib",
                          "baton.storage.base", "baton.storage.wrappers", "urllib.parse")

BACKUP_RESULT = {"snapshot": "ab" * 16, "mode": "incremental", "reason": "", "parent": "cd" * 16, "node": "A",
                 "disk_uuid": "u", "disk_size": 1 << 30, "chunk_size": 65536, "chunks_changed": 0, "chunks_read": 0,
                 "bytes_read": 0, "bytes_stored": 0, "duration_s": 0.01}

CHILD = """
import json, sys
from baton.cli import main
try:
    main(sys.argv[1:])
finally:
    sys.stderr.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + "\\n")
"""


@pytest.fixture
def daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """A stand-in daemon for the attachment cl-t: answers backup and status, records each request."""
    run = tmp_path / "run"
    monkeypatch.setenv("BATON_RUN_DIR", str(run))
    monkeypatch.setenv("BATON_DEV_DIR", str(tmp_path / "dev"))
    seen: list[dict[str, Any]] = []

    def handler(req: dict[str, Any], progress: Any) -> Any:
        seen.append(req)
        if req["op"] == "backup":
            return BACKUP_RESULT
        return {"name": "cl-t", "state": "running", "pid": os.getpid(), "frontend": "fuse", "device": "/dev/x",
                "writes": 3, "metadata_syncs": 1}

    write_state("cl-t", {"name": "cl-t", "pid": os.getpid(), "node": "A", "disk": str(tmp_path / "disk.img"),
                         "record": "tail", "frontend": "fuse", "epoch": 1})
    server = ControlServer(run / "cl-t" / "control.sock", handler, name="test-control")
    server.start()
    try:
        yield seen
    finally:
        server.stop()


def _run(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    p = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=60)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("MODULES ")][-1]
    return p, set(json.loads(line[len("MODULES "):]))


def _heavy(loaded: set[str]) -> list[str]:
    return sorted(m for m in loaded if m.startswith(NOT_ON_THE_CLIENT_PATH))


def test_backup_name_is_one_request_without_daemon_side_modules(daemon: list[dict[str, Any]],
                                                                 tmp_path: Path) -> None:
    p, loaded = _run("backup", "cl-t", "--repo", str(tmp_path / "repo"), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == BACKUP_RESULT
    assert daemon == [{"op": "backup", "repo": str(tmp_path / "repo"), "key_file": None, "full": False,
                       "consistency": None}]
    assert not _heavy(loaded), _heavy(loaded)


def test_status_name_is_one_request_without_daemon_side_modules(daemon: list[dict[str, Any]]) -> None:
    p, loaded = _run("status", "cl-t", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["writes"] == 3 and daemon == [{"op": "status"}]
    assert not _heavy(loaded), _heavy(loaded)


def test_a_daemon_error_keeps_its_class_and_exit_code(daemon: list[dict[str, Any]], tmp_path: Path) -> None:
    """The error path of the client half: a Baton error the daemon answers comes back as its class (RepoLocked:
    exit 7), printed as one JSON object under --json."""
    from baton.errors import RepoLocked

    def locked(req: dict[str, Any], progress: Any) -> Any:
        raise RepoLocked("locked by another backup", hint="wait")

    server = ControlServer(tmp_path / "run" / "cl-u" / "control.sock", locked, name="test-locked")
    write_state("cl-u", {"name": "cl-u", "pid": os.getpid(), "node": "A", "disk": str(tmp_path / "d2.img")})
    server.start()
    try:
        p, loaded = _run("backup", "cl-u", "--repo", str(tmp_path / "repo"), "--json")
    finally:
        server.stop()
    assert p.returncode == 7, p.stderr
    assert json.loads(p.stdout) == {"error": "RepoLocked", "message": "locked by another backup", "hint": "wait",
                                    "exit_code": 7}
    assert not _heavy(loaded), _heavy(loaded)
