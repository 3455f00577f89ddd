"""Operating a node with the real CLI (issue 9, defects 4, 9 and 11): what `backup`, `status` and `detach` say
after the owner's daemon was killed or fenced, and what attach and detach leave in the run directory.

Real processes: `python -m baton` with real FUSE attachments over file-backed disks, each test with a private
BATON_RUN_DIR/BATON_DEV_DIR and attachment names prefixed hB-; every attachment is detached (or its leftovers
cleaned) in a finally block.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton import errors
from baton.record.placement import locate
from conftest import need_root, need_tool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MiB = 1 << 20
BOUND = 30.0  # seconds: an upper bound for things that must not hang, not a performance figure


def code(cls: type[errors.BatonError]) -> int:
    return errors.exit_code(cls("probe"))


DAEMON, RECORD = code(errors.DaemonError), code(errors.RecordError)


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.run, self.dev = root / "run", root / "dev"
        self.env = os.environ | {"BATON_RUN_DIR": str(self.run), "BATON_DEV_DIR": str(self.dev),
                                 "BATON_REPO": "", "BATON_KEY_FILE": ""}
        self.names: list[str] = []
        self.repo = root / "repo"

    def baton(self, *args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True, timeout=120,
                           env=self.env, cwd=self.root)
        assert r.returncode == rc, f"baton {' '.join(args)}: rc {r.returncode}, expected {rc}\n{r.stdout}{r.stderr}"
        assert "Traceback" not in r.stderr, r.stderr
        if rc:
            assert r.stderr.startswith("baton: error: "), r.stderr
            if "--json" in args:
                out = json.loads(r.stdout)
                assert out["exit_code"] == rc, out
        return r

    def name(self) -> str:
        n = f"hB-{uuid.uuid4().hex[:8]}"
        self.names.append(n)
        return n

    def disk(self, size: int = 64 * MiB) -> Path:
        p = self.root / f"disk-{uuid.uuid4().hex[:6]}.img"
        with open(p, "wb") as f:
            f.truncate(size)
        self.baton("init", str(p), "--record", "tail")
        return p

    def attach(self, disk: Path, node: str = "hB-n1") -> tuple[str, int]:
        n = self.name()
        self.baton("attach", str(disk), "--node", node, "--name", n)
        return n, int(self.state(n)["pid"])

    def state(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads((self.run / name / "daemon.json").read_text())
        return out

    def cleanup(self) -> None:
        for n in self.names:
            if (self.run / n / "daemon.json").exists():
                subprocess.run([sys.executable, "-m", "baton", "detach", n], capture_output=True, timeout=60,
                               env=self.env)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_tool("losetup")
    e = Env(tmp_path)
    try:
        yield e
    finally:
        e.cleanup()


def wait_dead(pid: int) -> None:
    deadline = time.monotonic() + BOUND
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid)


# --------------------------------------------------------------------------------------------- defect 4


def test_backup_of_a_killed_owner_fails_loudly(env: Env) -> None:
    """The daemon of the node that owns the disk died: the timer's `backup --if-owner` must not exit 0 quietly,
    and every form of the command (NAME or DISK, with or without --if-owner, --json) says the same thing."""
    env.baton("repo", "init", str(env.repo))
    disk = env.disk()
    name, pid = env.attach(disk)
    env.baton("backup", name, "--repo", str(env.repo))  # a working owner: the first backup is full
    kill9(pid)
    for target in (name, str(disk)):
        for extra in ([], ["--if-owner"]):
            r = env.baton("backup", target, "--repo", str(env.repo), *extra, rc=DAEMON)
            assert r.stdout == "", r.stdout
            assert f"the daemon of {name} (pid {pid}) died" in r.stderr, r.stderr
            assert "not attached on this node" not in r.stderr, r.stderr
            assert f"baton detach {name}" in r.stderr and "baton attach" in r.stderr, r.stderr
            assert "Pacemaker" in r.stderr, r.stderr
            out = json.loads(env.baton("backup", target, "--repo", str(env.repo), *extra, "--json",
                                       rc=DAEMON).stdout)
            assert out["error"] == "DaemonError" and "died" in out["message"], out
    # status tells the same story, with exit 0 (the question was answered)
    st = json.loads(env.baton("status", name, "--json").stdout)
    assert st["state"] == "failed" and st["failure"] == "died", st
    assert "died" in st["problem"] and f"baton detach {name}" in st["hint"], st
    human = env.baton("status", name).stdout
    assert "died" in human and "killed" in human, human
    by_disk = json.loads(env.baton("status", str(disk), "--json").stdout)  # the disk path says the same
    assert by_disk["failure"] == "died" and by_disk["name"] == name and by_disk["problem"] == st["problem"], by_disk
    assert by_disk["owner"] == "hB-n1" and by_disk["clean"] is False, by_disk
    # once cleaned up, this node is not the owner: the timer is quiet again, a plain backup says why
    env.baton("detach", name)
    r = env.baton("backup", name, "--repo", str(env.repo), "--if-owner")
    assert r.stdout == "" and r.stderr == "", r
    # ... but the record on the disk still names this node as its owner, and nothing tracks the disk
    r = env.baton("backup", str(disk), "--repo", str(env.repo), "--if-owner", "--node", "hB-n1", rc=DAEMON)
    assert "no Baton daemon serves it" in r.stderr and "baton attach" in r.stderr, r.stderr
    # another node of the cluster is truly not the owner: its timer skips, and says so under --json
    r = env.baton("backup", str(disk), "--repo", str(env.repo), "--if-owner", "--node", "hB-n9")
    assert r.stdout == "" and r.stderr == "", r
    out = json.loads(env.baton("backup", str(disk), "--repo", str(env.repo), "--if-owner", "--node", "hB-n9",
                               "--json").stdout)
    assert out["skipped"] is True and out["node"] == "hB-n9" and "attached on node hB-n1" in out["reason"], out


# --------------------------------------------------------------------------------------------- defect 9


def test_status_of_a_fenced_daemon_names_the_new_owner(env: Env) -> None:
    disk = env.disk()
    name, pid = env.attach(disk)
    epoch = int(env.state(name)["epoch"])
    loc = locate(str(disk), None, writable=True)  # another node takes the disk over
    try:
        loc.record.attach("hB-n2")
    finally:
        loc.close()
    wait_dead(pid)  # the heartbeat notices within about a second and the daemon exits 5
    st = json.loads(env.baton("status", name, "--json").stdout)
    assert st["state"] == "failed" and st["failure"] == "fenced", st
    assert st["fenced_by"] == "hB-n2", st
    assert st["epoch_mine"] == epoch and st["epoch_on_disk"] == epoch + 1, st
    assert st["fenced_at"] > 0, st
    human = env.baton("status", name).stdout
    assert "fenced" in human and "hB-n2" in human and f"epoch {epoch + 1}" in human, human
    assert "killed" not in human, human
    env.baton("repo", "init", str(env.repo))
    for extra in ([], ["--if-owner"]):
        r = env.baton("backup", name, "--repo", str(env.repo), *extra, rc=DAEMON)
        assert "fenced" in r.stderr and "hB-n2" in r.stderr and f"baton detach {name}" in r.stderr, r.stderr
    env.baton("detach", name)
    assert not (env.run / name).exists()


# --------------------------------------------------------------------------------------------- defect 11


def test_detach_leaves_no_run_directory(env: Env) -> None:
    disk = env.disk()
    name, _pid = env.attach(disk)
    assert (env.run / name).is_dir()
    env.baton("detach", name)
    assert not (env.run / name).exists(), list((env.run / name).iterdir())
    # and after a killed daemon, the clean-up removes it too and shows how the daemon's log ended
    name, pid = env.attach(disk)
    kill9(pid)
    r = env.baton("detach", name)
    assert "was not running (its daemon died); cleaned up" in r.stdout, r.stdout
    assert "its log ended with:" in r.stderr and f"attached {disk}" in r.stderr, r.stderr
    assert not (env.run / name).exists(), list((env.run / name).iterdir())
    assert not (env.dev / name).exists()


def test_detach_of_a_killed_daemon_reports_its_log_tail(env: Env) -> None:
    disk = env.disk()
    name, pid = env.attach(disk)
    kill9(pid)
    out = json.loads(env.baton("detach", name, "--json").stdout)
    assert out["was_running"] is False, out
    assert any(f"attached {disk}" in line for line in out["log_tail"]), out


def test_failed_attach_leaves_no_run_directory(env: Env) -> None:
    raw = env.root / "raw.img"  # never initialised: the daemon refuses it
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
    name = env.name()
    r = env.baton("attach", str(raw), "--node", "hB-n1", "--name", name, rc=RECORD)
    assert "baton init" in r.stderr, r.stderr
    assert not (env.run / name).exists(), list((env.run / name).iterdir())
    assert not (env.dev / name).exists()


def test_dead_attachment_after_the_disk_moved_on(env: Env) -> None:
    """This node's daemon died, then another node took the disk over and detached it cleanly: the stale
    attachment here no longer makes this node the owner. `status` says where the disk went; a backup by the
    disk path runs offline (the record is clean); by NAME, or as a timer (--if-owner), it still fails loudly
    until `baton detach NAME` cleans the stale attachment up."""
    env.baton("repo", "init", str(env.repo))
    disk = env.disk()
    name, pid = env.attach(disk)
    kill9(pid)
    loc = locate(str(disk), None, writable=True)  # another node takes the disk over, then detaches it
    try:
        loc.record.attach("hB-n2")
        loc.record.detach()
    finally:
        loc.close()
    st = json.loads(env.baton("status", name, "--json").stdout)
    assert st["failure"] == "died" and st["owner_now"] is False, st
    assert "moved on" in st["problem"] and "hB-n2" in st["problem"], st
    r = env.baton("backup", name, "--repo", str(env.repo), rc=DAEMON)
    assert "moved on" in r.stderr and f"baton detach {name}" in r.stderr, r.stderr
    r = env.baton("backup", str(disk), "--repo", str(env.repo), "--if-owner", "--node", "hB-n1", rc=DAEMON)
    assert "moved on" in r.stderr, r.stderr
    out = json.loads(env.baton("backup", str(disk), "--repo", str(env.repo), "--node", "hB-n1", "--json").stdout)
    assert out["mode"] == "full" and out["snapshot"], out
    env.baton("detach", name)
    assert not (env.run / name).exists()


def test_daemon_starts_with_its_malloc_arenas_capped(env: Env) -> None:
    """The daemon's serving threads start long before its first backup: glibc's arena cap must be in its
    environment from the start (an incremental of a 64 GiB disk peaked 33 MiB higher with six arenas)."""
    from baton.device import BIG_BUFFERS_ARENAS

    name, pid = env.attach(env.disk())
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"MALLOC_ARENA_MAX={BIG_BUFFERS_ARENAS}".encode() in environ
    finally:
        env.baton("detach", name)
