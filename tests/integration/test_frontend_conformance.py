"""The frontend conformance suite (:mod:`baton.testing.frontend_suite`) against every registered frontend, with
the real kernel and real clients: FUSE + loop devices (O_DIRECT I/O, fsync, RWF_DSYNC, BLKDISCARD,
BLKZEROOUT) and NBD (qemu-io), and the real per-disk daemon killed with SIGKILL under a writer.

The harness runs the `baton` CLI and the writer through the helpers of tests/faults/procs.py, each test with
its own BATON_RUN_DIR and BATON_DEV_DIR.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from baton import frontends
from baton.errors import UsageError
from baton.frontends import Endpoint
from baton.testing.frontend_suite import CHECKS, DISK_SIZE, Harness
from baton.util import pid_alive
from conftest import need_root, need_tool
from faults.procs import Env, kill_pid, need_fuse_loop, raw_disk, wait_for, writer_argv

pytestmark = pytest.mark.integration


class ProcHarness(Harness):
    """The suite's harness over ``faults.procs.Env``: the CLI under this test's private run and device dirs."""

    def __init__(self, kind: str, root: Path) -> None:
        self.env = Env(root)
        super().__init__(kind, root, self.env.run_dir, self.env.dev_dir)

    def new_disk(self, size: int) -> str:
        disk = raw_disk(self.root, size)
        self.env.baton("init", str(disk))
        return str(disk)

    def attach(self, disk: str, name: str) -> dict[str, Any]:
        return self.env.attach(Path(disk), "n1", name, self.kind)

    def status(self, name: str) -> dict[str, Any]:
        return self.env.json("status", name)

    def detach(self, name: str) -> dict[str, Any]:
        return self.env.json("detach", name)

    def start_writer(self, endpoint: Endpoint, export: str, log: Path) -> subprocess.Popen[str]:
        # The writer speaks to a block device ("fuse" mode: O_DIRECT pwrite) or to an NBD socket ("nbd" mode).
        mode, target = ("fuse", endpoint.device) if endpoint.device else ("nbd", endpoint.socket)
        assert target, f"no writer for endpoint {endpoint}"
        return subprocess.Popen(writer_argv(mode, target, export, log, seed=7, size=DISK_SIZE // 2),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def kill(self, pid: int) -> None:
        kill_pid(pid)
        wait_for(lambda: not pid_alive(pid), f"pid {pid} to die after SIGKILL")

    def cleanup(self) -> None:
        self.env.cleanup()


def _prereqs(kind: str) -> None:
    need_root()  # the daemon writes its record with O_DIRECT and runs as root
    if kind == "fuse":
        need_fuse_loop()
    elif kind == "nbd":
        need_tool("qemu-io")
    elif kind == "dm":
        # Its writes never reach the daemon (the kernel tracks them; a killed daemon leaves the device
        # serving), so the suite's tracker-call and killed-daemon checks do not describe it; this host has no
        # device-mapper either. Its own tests run in QEMU guests: tests/vm/test_dm_frontend.py.
        pytest.skip("dm frontend: covered by tests/vm/test_dm_frontend.py in QEMU guests (writes bypass the "
                    "daemon, so this suite's tracker-call checks do not apply)")


@pytest.fixture(params=frontends.kinds())
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcHarness]:
    _prereqs(request.param)
    h = ProcHarness(request.param, tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_frontend_conformance(check: Callable[[Harness], None], harness: ProcHarness) -> None:
    check(harness)


def test_every_registered_frontend_is_covered() -> None:
    """The suite runs against every kind the registry knows, and every kind resolves to its class."""
    assert set(frontends.kinds()) >= {"fuse", "nbd"}
    for kind in frontends.kinds():
        assert frontends.get(kind).kind == kind
    with pytest.raises(UsageError, match="expected one of"):
        frontends.get("no-such-frontend")
