"""The ``baton`` command line as the benchmarks drive it.

Every call goes through the installed CLI (never the library), with ``--json``, so the benchmark measures
what an operator runs. State and device links live in a private ``BATON_RUN_DIR`` / ``BATON_DEV_DIR``
under the benchmark's scratch directory, so a run never touches another user's attachments.

Failure behaviour: a command that is missing (not yet implemented), exits non-zero or prints no JSON raises
:class:`bench.common.StepFailed` with the command and its stderr; callers turn that into an unavailable row.
:meth:`Baton.cleanup` is safe to call in ``finally`` blocks whatever state the disk is in.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from bench.common import (
    JSON,
    Measured,
    StepFailed,
    check,
    kill_and_wait,
    last_json,
    loops_backed_under,
    mounts_under,
    pid_alive,
    proc_io,
    run,
)


def find_baton() -> str:
    """The baton executable: the project's virtualenv next to this package, else ``baton`` on PATH."""
    venv = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "baton"
    if venv.exists():
        return str(venv)
    return shutil.which("baton") or "baton"


# What a Baton step loads beyond ``baton STEP --help``: the engines, the repository stack (zstd, AES-GCM, BLAKE3)
# and the backup client's fast path. Borg's warm-up (``borg create --help``) imports nearly all of borg, and
# ``restic version`` maps restic's one binary; importing these is Baton's equivalent, so that a timed run reads
# only its data cold, not its own program files (:meth:`Baton.warm_commands`).
WARM_IMPORTS = ("baton.cli.app", "baton.cli.backup_client", "baton.daemon.client", "baton.daemon.offline",
                "baton.backup", "baton.restore", "baton.verify", "baton.repo.repository", "baton.repo.writer",
                "baton.storage")


def interpreter_of(exe: str) -> str | None:
    """The Python interpreter a console script runs under (its ``#!`` line), or None."""
    try:
        with open(shutil.which(exe) or exe, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode(errors="replace").split()
    return parts[0] if parts and "python" in os.path.basename(parts[0]) else None


class Baton:
    """Drives one private Baton "machine" (run and device directories under ``scratch``)."""

    def __init__(self, scratch: Path, exe: str | None = None) -> None:
        self.exe = exe or find_baton()
        self.scratch = scratch
        self.run_dir = scratch / "run"
        self.dev_dir = scratch / "dev"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dev_dir.mkdir(parents=True, exist_ok=True)
        self.env = {"BATON_RUN_DIR": str(self.run_dir), "BATON_DEV_DIR": str(self.dev_dir)}
        self._help: dict[str, str | None] = {}
        self.python = interpreter_of(self.exe)
        self.pids: set[int] = set()  # every daemon pid we have seen serving one of our disks
        self.serving: dict[str, int] = {}  # name -> pid of the daemon our last attach started
        self.calls = 0
        self.failures = 0

    # --- capability probes ----------------------------------------------------------------------------

    def warm_commands(self, step: str) -> list[list[str]]:
        """The untimed commands that warm Baton's program files before a cold-cache ``step``: its help, and
        an import of :data:`WARM_IMPORTS` under the executable's interpreter (when it has one)."""
        cmds = [[self.exe, step, "--help"]]
        if self.python:
            cmds.append([self.python, "-c", "import " + ", ".join(WARM_IMPORTS)])
        return cmds

    def help_text(self, sub: str) -> str | None:
        """``baton SUB --help`` output, or None when the subcommand does not exist (yet)."""
        if sub not in self._help:
            try:
                m = run([self.exe, *sub.split(), "--help"], env=self.env, timeout=60)
                self._help[sub] = m.stdout if m.ok else None
            except FileNotFoundError:
                self._help[sub] = None
        return self._help[sub]

    def has(self, sub: str, flag: str | None = None) -> bool:
        text = self.help_text(sub)
        return text is not None and (flag is None or flag in text)

    def require(self, sub: str, flag: str | None = None) -> None:
        """Raise StepFailed naming what is missing, so the row says why it is unavailable."""
        if not self.has(sub):
            raise StepFailed(f"`baton {sub}` is not available in this build")
        if flag is not None and not self.has(sub, flag):
            raise StepFailed(f"`baton {sub}` has no {flag} option in this build")

    # --- commands -------------------------------------------------------------------------------------

    def cmd(self, *args: str, timeout: float = 900.0) -> tuple[JSON, Measured]:
        """Run ``baton ARGS --json``; returns (parsed JSON, measurement). Raises StepFailed on failure."""
        self.calls += 1
        try:
            m = run([self.exe, *args, "--json"], env=self.env, timeout=timeout)
        except FileNotFoundError as e:
            self.failures += 1
            raise StepFailed(f"baton executable not found: {self.exe}") from e
        if not m.ok:
            self.failures += 1
            raise StepFailed(m.error())
        try:
            return last_json(m.stdout), m
        except StepFailed:
            self.failures += 1
            raise

    def init(self, disk: Path, chunk_size: str = "64K") -> Measured:
        self.require("init")
        return self.cmd("init", str(disk), "--chunk-size", chunk_size, timeout=600)[1]

    def repo_init(self, url: str) -> Measured:
        self.require("repo init")
        try:
            return self.cmd("repo", "init", url, timeout=120)[1]
        except StepFailed:
            # `repo init` may not take --json; retry plainly before giving up.
            return check([self.exe, "repo", "init", url], env=self.env, timeout=120)

    def attach(self, disk: Path, node: str, name: str, *, frontend: str = "fuse",
               extra: tuple[str, ...] = ()) -> tuple[JSON, Measured]:
        """Take ``disk`` over as ``node`` and wait until it is served; returns (status JSON, attach run)."""
        self.require("attach")
        out, m = self.cmd("attach", str(disk), "--node", node, "--name", name, "--frontend", frontend, *extra,
                          timeout=300)
        # attach --json answers with the live status when it can; ask `status` only when it did not.
        st = out if isinstance(out.get("pid"), int) and out.get("state", "running") == "running" else self.status(name)
        if st.get("state", "running") != "running":
            raise StepFailed(f"attach returned but status is {st.get('state')!r}: {st}")
        pid = st.get("pid")
        if isinstance(pid, int) and pid > 0:
            self.pids.add(pid)
            self.serving[name] = pid
        return st, m

    def status(self, name: str) -> JSON:
        self.require("status")
        st, _ = self.cmd("status", name, timeout=60)
        pid = st.get("pid")
        if isinstance(pid, int) and pid > 0:
            self.pids.add(pid)
        return st

    def device(self, st: JSON, name: str) -> str:
        """The block device path of an attached fuse disk."""
        dev = st.get("device") or str(self.dev_dir / name)
        if not Path(dev).exists():
            raise StepFailed(f"attached, but device {dev} does not exist")
        return str(dev)

    def socket(self, st: JSON, name: str) -> str:
        sock = st.get("socket") or str(self.run_dir / f"{name}.sock")
        if not Path(sock).exists():
            raise StepFailed(f"attached, but NBD socket {sock} does not exist")
        return str(sock)

    def kill9(self, name: str) -> int:
        """kill -9 the daemon serving ``name`` (a crash of its owner node); returns the pid."""
        pid = self.serving.pop(name, 0)
        if not pid:
            got = self.status(name).get("pid")
            pid = got if isinstance(got, int) else 0
        if pid <= 0:
            raise StepFailed(f"no daemon pid known for {name}")
        if not kill_and_wait(pid, signal.SIGKILL):
            raise StepFailed(f"daemon {pid} survived SIGKILL")
        return pid

    def detach(self, name: str) -> Measured:
        self.require("detach")
        m = self.cmd("detach", name, timeout=300)[1]
        self.serving.pop(name, None)
        return m

    def backup(self, target: str, repo: str, *, full: bool = False, timeout: float = 3600) -> tuple[JSON, Measured]:
        self.require("backup")
        args = ["backup", target, "--repo", repo] + (["--full"] if full else [])
        return self.cmd(*args, timeout=timeout)

    def restore(self, snapshot: str, repo: str, to: Path, size: int, *, timeout: float = 3600) -> Measured:
        """Restore; when the command refuses a missing target, retry once onto a fresh sparse file."""
        self.require("restore")
        try:
            return self.cmd("restore", snapshot, "--repo", repo, "--to", str(to), timeout=timeout)[1]
        except StepFailed:
            if to.exists():
                raise
        with open(to, "wb") as f:
            f.truncate(size)
        return self.cmd("restore", snapshot, "--repo", repo, "--to", str(to), timeout=timeout)[1]

    def verify(self, repo: str, snapshot: str | None = None, *, timeout: float = 3600) -> tuple[JSON, Measured]:
        self.require("verify")
        return self.cmd("verify", "--repo", repo, *([snapshot] if snapshot else []), timeout=timeout)

    # --- cleanup --------------------------------------------------------------------------------------

    def cleanup(self, name: str) -> list[str]:
        """Best-effort teardown of ``name``: detach; if that fails, SIGKILL the daemons we saw serving it,
        then release loop devices backed by files under our scratch directory and unmount FUSE mounts
        under it. Never raises; returns notes on what it had to force."""
        notes: list[str] = []
        detached = False
        if self.has("detach"):
            with contextlib.suppress(StepFailed):
                self.cmd("detach", name, timeout=120)
                detached = True
        self.serving.pop(name, None)
        if not detached:
            for pid in sorted(self.pids):
                if pid_alive(pid):
                    kill_and_wait(pid, signal.SIGKILL)
                    notes.append(f"killed daemon {pid}")
            time.sleep(0.2)
            self.force_release()
        return notes

    def force_release(self) -> list[str]:
        """Release loop devices and mounts that belong to our scratch directory only."""
        notes: list[str] = []
        for mnt in mounts_under(self.scratch):
            m = run(["umount", "-l", mnt], timeout=60)
            notes.append(f"umount {mnt}: rc={m.rc}")
        for dev in loops_backed_under(self.scratch):
            m = run(["losetup", "-d", dev], timeout=60)
            notes.append(f"losetup -d {dev}: rc={m.rc}")
        return notes

    def daemon_io(self, name: str) -> tuple[int, dict[str, Any]]:
        """(pid, /proc/pid/io) of the daemon our last attach of ``name`` started; (0, {}) when none."""
        pid = self.serving.get(name, 0)
        if pid > 0 and pid_alive(pid):
            return pid, proc_io(pid)
        return 0, {}

    def statistics(self) -> JSON:
        return {"calls": self.calls, "failures": self.failures, "daemons_seen": len(self.pids),
                "exe": os.path.basename(self.exe)}
