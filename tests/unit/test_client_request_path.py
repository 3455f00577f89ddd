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


# ------------------------------------------------------------------ the backup client's path without click

CHILD_VIA_CLICK = """
import json, sys
import baton.cli.backup_client as bc
bc.fast_args = lambda args: None  # every command line through the click command
from baton.cli import main
try:
    main(sys.argv[1:])
finally:
    sys.stderr.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + "\\n")
"""

FAST_FORMS = [
    ["backup", "cl-t", "--repo", "{repo}", "--json"],
    ["backup", "--json", "--repo={repo}", "cl-t"],
    ["backup", "cl-t", "--repo", "{repo}", "--full", "--if-owner", "--key-file", "k.key", "--json"],
    ["backup", "cl-t", "--repo", "{repo}"],  # the human rendering
]


def _run_via_click(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    p = subprocess.run([sys.executable, "-c", CHILD_VIA_CLICK, *args], capture_output=True, text=True, timeout=60)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("MODULES ")][-1]
    return p, set(json.loads(line[len("MODULES "):]))


@pytest.mark.parametrize("form", FAST_FORMS, ids=lambda f: " ".join(f[1:]))
def test_plain_backup_forms_skip_click_and_do_what_the_click_command_does(
        daemon: list[dict[str, Any]], tmp_path: Path, form: list[str]) -> None:
    """The same command line through the fast path and through the click command: the same request reaches the
    daemon, the same output and exit status come back; only the fast one never imports click."""
    args = [a.format(repo=tmp_path / "repo") for a in form]
    fast, loaded_fast = _run(*args)
    slow, loaded_slow = _run_via_click(*args)
    assert fast.returncode == slow.returncode == 0, (fast.stderr, slow.stderr)
    assert fast.stdout == slow.stdout and fast.stdout.strip()
    assert len(daemon) == 2 and daemon[0] == daemon[1], daemon
    if "--key-file" in args:
        assert daemon[0]["key_file"] == os.path.abspath("k.key") and daemon[0]["full"] is True
    assert "click" not in loaded_fast
    assert "click" in loaded_slow  # the comparison really ran the click command


def test_the_environment_gives_repository_and_key_file_on_both_paths(
        daemon: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_REPO", str(tmp_path / "env-repo"))
    monkeypatch.setenv("BATON_KEY_FILE", str(tmp_path / "env.key"))
    fast, loaded = _run("backup", "cl-t", "--json")
    slow, _ = _run_via_click("backup", "cl-t", "--json")
    assert fast.returncode == slow.returncode == 0 and fast.stdout == slow.stdout
    assert daemon[0] == daemon[1] == {"op": "backup", "repo": str(tmp_path / "env-repo"),
                                      "key_file": str(tmp_path / "env.key"), "full": False, "consistency": None}
    assert "click" not in loaded


@pytest.mark.parametrize("form,code", [
    (["backup", "cl-t", "--json"], 2),                                     # no repository anywhere: usage
    (["backup", "cl-t", "--repo", "R", "--repo", "R2", "--json"], 0),      # repeated: click's last-wins
    (["backup", "cl-t", "--repo", "R", "--full=1", "--json"], 2),          # a flag with a value: usage
    (["backup", "cl-t", "--repo", "R", "--node", "N", "--json"], 0),       # an option the fast path leaves
    (["backup", "cl-t", "--repo", "--json"], 0),                           # click takes "--json" as the value
    (["backup", "--help"], 0),
], ids=lambda v: " ".join(v[1:]) if isinstance(v, list) else str(v))
def test_other_backup_forms_are_left_to_click(daemon: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
                                              form: list[str], code: int) -> None:
    monkeypatch.delenv("BATON_REPO", raising=False)
    p, loaded = _run(*form)
    assert "click" in loaded, "this form must be parsed by click"
    assert p.returncode == code, (p.stdout, p.stderr)
    if code == 2:
        assert json.loads(p.stdout)["error"] == "UsageError"
    if "--help" in form:
        assert "Usage: baton backup [OPTIONS] NAME|DISK" in p.stdout
    if code == 0 and "--help" not in form:
        repo = form[len(form) - 1 - form[::-1].index("--repo") + 1]  # the last --repo's value
        assert daemon and daemon[-1]["repo"] == os.path.abspath(repo)


def test_fast_args_accepts_only_what_it_knows(monkeypatch: pytest.MonkeyPatch) -> None:
    from baton.cli.backup_client import fast_args

    monkeypatch.delenv("BATON_REPO", raising=False)
    monkeypatch.delenv("BATON_KEY_FILE", raising=False)
    monkeypatch.setenv("BATON_NODE", "n9")
    assert fast_args(["d1", "--repo", "/r", "--if-owner"]) == {
        "target": "d1", "repo": "/r", "key_file": None, "full": False, "if_owner": True, "as_json": False,
        "node": "n9"}
    for bad in (["d1"], ["--repo", "/r"], ["d1", "d2", "--repo", "/r"], ["d1", "--repo", "/r", "--json", "--json"],
                ["d1", "--repo", "-r"], ["d1", "--repo="], ["d1", "--repo", "/r", "--"], ["d1", "--repo", "/r", "-h"],
                ["", "--repo", "/r"], ["d1", "--repo", "/r", "--if-owner=yes"], ["d1", "--repo", "/r", "--fu"]):
        assert fast_args(bad) is None, bad


def test_a_name_attached_here_wins_over_a_path_of_that_name_in_the_working_directory(
        daemon: list[dict[str, Any]], tmp_path: Path) -> None:
    """`baton status cl-t` and `baton backup cl-t` from a directory that happens to hold an entry named cl-t:
    the attachment is meant (as `backup` always took it), not a DISK path."""
    cwd = tmp_path / "work"
    (cwd / "cl-t").mkdir(parents=True)
    child = [sys.executable, "-c", "from baton.cli import main; main()"]
    st = subprocess.run([*child, "status", "cl-t", "--json"], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    assert json.loads(st.stdout)["writes"] == 3
    bk = subprocess.run([*child, "backup", "cl-t", "--repo", str(tmp_path / "repo"), "--json"], cwd=cwd,
                        capture_output=True, text=True, timeout=60)
    assert bk.returncode == 0, bk.stdout + bk.stderr
    assert [r["op"] for r in daemon] == ["status", "backup"]
