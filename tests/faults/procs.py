"""Helpers for tests that drive Baton as real processes: the `baton` CLI under a private run and device dir,
a seeded writer process that logs each acknowledged write, and small waiting/killing helpers.

Used by tests/integration/test_takeover.py and tests/faults/test_lifecycle_procs.py (import it as
``faults.procs``: tests/ is on sys.path through its conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import need_root, need_tool

BOUND = 30.0  # seconds: upper bound for anything that must not hang (not a performance assertion)

# The writer. Write i (0-based) of a writer seeded S is drawn from random.Random(S) in order: offset, length,
# then the data; the test redraws the same stream (see writes_of). With env WRITES=N it stops after N
# acknowledged writes and exits 0; otherwise it writes until a write fails (exit 3) or it is killed.
WRITER = r'''
import mmap, os, random, socket, struct, sys
mode, target, export, log, seed, size = sys.argv[1:7]
seed, size = int(seed), int(size)
rng = random.Random(seed)
logf = open(log, "a")

def draw():
    n = rng.randrange(1, 65) * 4096
    off = rng.randrange(0, (size - n) // 4096 + 1) * 4096
    return off, n, rng.randbytes(n)

if mode == "fuse":
    fd = os.open(target, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 256 * 1024)
    def write(off, data):
        buf[: len(data)] = data
        if os.pwrite(fd, memoryview(buf)[: len(data)], off) != len(data):
            raise OSError("short write")
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(target)
    def recv(n):
        b = b""
        while len(b) < n:
            m = s.recv(n - len(b))
            if not m:
                raise EOFError("server closed the connection")
            b += m
        return b
    magic, opt, hflags = struct.unpack(">QQH", recv(18))
    assert magic == 0x4E42444D41474943 and opt == 0x49484156454F5054
    s.sendall(struct.pack(">I", 3 if hflags & 2 else 1))
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(data)) + data)
    while True:
        _, _, rtype, rlen = struct.unpack(">QIII", recv(20))
        recv(rlen)
        if rtype & (1 << 31):
            sys.exit("NBD_OPT_GO refused")
        if rtype == 1:
            break
    cookie = [0]
    def write(off, data):
        cookie[0] += 1
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, cookie[0], off, len(data)) + data)
        magic, err, ck = struct.unpack(">IIQ", recv(16))
        if magic != 0x67446698 or ck != cookie[0] or err:
            raise OSError(err, f"NBD write error {err}")

one = os.environ.get("ONE_WRITE")
if one is not None:  # a single 4 KiB write at that offset; exit status = its errno (0: acknowledged)
    try:
        write(int(one), b"\x5a" * 4096)
    except OSError as e:
        sys.exit(e.errno or 1)
    except EOFError:
        sys.exit(107)  # ENOTCONN
    sys.exit(0)
limit = int(os.environ.get("WRITES", "-1"))
i = 0
while i != limit:
    off, n, data = draw()
    try:
        write(off, data)
    except (OSError, EOFError) as e:
        print(f"write {i} failed: {e!r}", file=sys.stderr)
        sys.exit(3)
    logf.write(f"{i} {off} {n}\n")
    logf.flush()
    os.fsync(logf.fileno())
    i += 1
'''


def writer_argv(frontend: str, target: str, export: str, log: Path, seed: int, size: int) -> list[str]:
    """The command line of a WRITER process (``target``: the device for fuse, the socket for nbd)."""
    return [sys.executable, "-c", WRITER, frontend, target, export, str(log), str(seed), str(size)]


def writes_of(seed: int, size: int, count: int) -> list[tuple[int, int, bytes]]:
    """The first ``count`` writes the writer seeded ``seed`` issues (same draws, same order)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randrange(1, 65) * 4096
        off = rng.randrange(0, (size - n) // 4096 + 1) * 4096
        out.append((off, n, rng.randbytes(n)))
    return out


def log_lines(log: Path) -> list[tuple[int, int, int]]:
    """The writes a WRITER logged as acknowledged: (index, offset, length)."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        i, off, n = (int(x) for x in line.split())
        out.append((i, off, n))
    return out


# `python -m baton` with Python's own SIGINT handler installed first (see Env.popen).
_BATON_WITH_SIGINT = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                      "sys.argv[0] = 'baton'; runpy.run_module('baton', run_name='__main__', alter_sys=True)")


class Env:
    """One node's view: the `baton` CLI with its own BATON_RUN_DIR and BATON_DEV_DIR under ``root``."""

    def __init__(self, root: Path, tag: str = "", *, prefix: str = "t", timeout: float = 120,
                 extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.run_dir, self.dev_dir = root / f"run{tag}", root / f"dev{tag}"
        self.env = os.environ | {"BATON_RUN_DIR": str(self.run_dir), "BATON_DEV_DIR": str(self.dev_dir)} | (
            extra_env or {})
        self.names: set[str] = set()
        self.prefix, self.timeout = prefix, timeout

    def baton(self, *args: str, rc: int | None = 0, timeout: float | None = None
              ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "baton", *args], capture_output=True, text=True,
                           timeout=timeout or self.timeout, env=self.env)
        if rc is not None:
            assert r.returncode == rc, (f"baton {' '.join(args)}: rc {r.returncode}, expected {rc}\n"
                                        f"{r.stdout}{r.stderr}")
        return r

    def json(self, *args: str, rc: int = 0) -> Any:
        """`baton ARGS --json` expecting exit ``rc``; its stdout parsed (an error prints JSON too)."""
        return json.loads(self.baton(*args, "--json", rc=rc).stdout)

    def name(self) -> str:
        """A fresh attachment name (``PREFIX-…``), detached again by :meth:`cleanup`."""
        n = new_name(self.prefix)
        self.names.add(n)
        return n

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """`baton ARGS` in the background, stdout and stderr piped. SIGINT raises KeyboardInterrupt in it, as
        Ctrl-C does at an operator's terminal, also when the suite itself runs with SIGINT ignored (a background
        job of a shell without job control inherits SIG_IGN, and Python then keeps ignoring it)."""
        return subprocess.Popen([sys.executable, "-c", _BATON_WITH_SIGINT, *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def attach(self, disk: Path, node: str, name: str, frontend: str = "fuse") -> dict[str, Any]:
        self.names.add(name)
        return self.json("attach", str(disk), "--node", node, "--name", name, "--frontend", frontend)

    def daemon_pid(self, name: str) -> int:
        return int(json.loads((self.run_dir / name / "daemon.json").read_text())["pid"])

    def cleanup(self) -> None:
        """Detach every name this Env attached (for a dead daemon: clean up what it left)."""
        for n in self.names:
            if (self.run_dir / n / "daemon.json").exists():
                self.baton("detach", n, rc=None)


def need_fuse_loop() -> None:
    """Skip unless this is root with FUSE and loop devices (what /dev/baton/NAME needs)."""
    need_root()
    need_tool("losetup", "unshare", "fusermount3")
    if not Path("/dev/fuse").exists():
        pytest.skip("needs /dev/fuse")


def new_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def raw_disk(root: Path, size: int) -> Path:
    p = root / f"disk-{uuid.uuid4().hex[:6]}.img"
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def wait_for(pred: Any, what: str, timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
