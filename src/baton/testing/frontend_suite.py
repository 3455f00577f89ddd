"""The frontend conformance suite: one set of checks every :class:`baton.frontends.Frontend` must pass.

Usage from a test module (tests/integration/test_frontend_conformance.py), which supplies the :class:`Harness`
(where the run and device directories are, how to run the `baton` CLI and a writer process)::

    @pytest.mark.parametrize("kind", frontends.kinds())
    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    def test_frontend(check, kind, tmp_path):
        check(MyHarness(kind, tmp_path))

Every check runs against the real thing: a file-backed disk with a real record, the real tracker, the frontend
started through the registry (``frontends.get(kind)``), and real clients on the endpoint it exposes. The
checks never ask which kind they test: they talk to the :class:`Endpoint` as its clients do, a block device
through O_DIRECT reads and writes, fsync, RWF_DSYNC (FUA), BLKDISCARD and BLKZEROOUT, an NBD export through
``qemu-io``. A new frontend that exposes one of these needs no new client code here.

The checks:

* :func:`check_read_write`: seeded random writes across chunk boundaries read back byte for byte through the
  frontend and from the disk underneath, and every written chunk is marked in the record on disk by the time
  the write is acknowledged (and no other chunk is);
* :func:`check_flush_and_fua`: a flush reaches ``tracker.flush``; a FUA write reaches ``write(fua=True)`` or a
  ``flush`` before it is acknowledged;
* :func:`check_trim_and_write_zeroes`: both mark their chunks first; written zeroes read back as zeroes; data
  outside the ranges is unchanged;
* :func:`check_fenced`: after another node takes the disk over (a newer epoch on disk), a write fails with
  EIO, the frontend stops, its typed failure says ``FENCED``, later requests fail, and the refused write never
  reached the disk;
* :func:`check_daemon_killed`: the real per-disk daemon (``baton attach --frontend KIND``) killed with SIGKILL
  under a writer: the writer's next write fails, ``baton status`` says the attachment failed because its
  daemon died, and ``baton detach`` removes what it left behind.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import mmap
import os
import random
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton import frontends
from baton.daemon import open_tracker
from baton.errors import BatonError, Fenced
from baton.frontends import Endpoint, FailureKind, Frontend, FrontendConfig
from baton.record.placement import locate
from baton.tracker import TrackerLike

DISK_SIZE = 64 << 20
BOUND = 30.0  # seconds: upper bound for anything that must not hang (not a performance assertion)
SEED = int(os.environ.get("BATON_SEED", "20261124"))
_BLKDISCARD = 0x1277  # _IO(0x12, 119)
_BLKZEROOUT = 0x127F  # _IO(0x12, 127)


# ------------------------------------------------------------------------------------------------ clients


class Client(abc.ABC):
    """A real client of one endpoint. Every method raises OSError (EIO when the frontend failed the request)."""

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def write(self, offset: int, data: bytes, fua: bool = False,
              on_ack: Callable[[], None] | None = None) -> None:
        """Write ``data``; ``on_ack`` is called the moment the write is acknowledged, before the client does
        anything else (a client that flushes when it closes, as qemu-io does, waits for ``on_ack`` first)."""

    @abc.abstractmethod
    def flush(self) -> None: ...

    @abc.abstractmethod
    def trim(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def zero(self, offset: int, length: int) -> None: ...


class BlockDeviceClient(Client):
    """A block device through the system calls a file system uses: O_DIRECT pread/pwrite on page-aligned
    buffers, fsync (a flush), RWF_DSYNC (FUA), the BLKDISCARD and BLKZEROOUT ioctls."""

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.contextmanager
    def _open(self, flags: int) -> Iterator[int]:
        fd = os.open(self.path, flags | os.O_DIRECT | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def read(self, offset: int, length: int) -> bytes:
        buf = mmap.mmap(-1, length)
        try:
            with self._open(os.O_RDONLY) as fd:
                n = os.preadv(fd, [buf], offset)
            return bytes(buf[:n])
        finally:
            buf.close()

    def write(self, offset: int, data: bytes, fua: bool = False,
              on_ack: Callable[[], None] | None = None) -> None:
        buf = mmap.mmap(-1, len(data))
        try:
            buf[:] = data
            with self._open(os.O_WRONLY) as fd:
                n = os.pwritev(fd, [buf], offset, os.RWF_DSYNC if fua else 0)
                if n != len(data):
                    raise OSError(errno.EIO, f"short write ({n} of {len(data)} bytes)")
                if on_ack is not None:
                    on_ack()
        finally:
            buf.close()

    def flush(self) -> None:
        with self._open(os.O_WRONLY) as fd:
            os.fsync(fd)

    def _range_ioctl(self, request: int, offset: int, length: int) -> None:
        with self._open(os.O_WRONLY) as fd:
            fcntl.ioctl(fd, request, struct.pack("QQ", offset, length))

    def trim(self, offset: int, length: int) -> None:
        self._range_ioctl(_BLKDISCARD, offset, length)

    def zero(self, offset: int, length: int) -> None:
        self._range_ioctl(_BLKZEROOUT, offset, length)


class NBDClient(Client):
    """An NBD export through ``qemu-io`` (QEMU's block layer, a real NBD client), one connection per call.
    Discards are passed on (``--discard=unmap``); FUA writes use ``write -f`` under the writeback cache mode."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def _run(self, *commands: str, on_line: Callable[[str], None] | None = None) -> str:
        argv = ["qemu-io", "-f", "raw", "-t", "writeback", "-d", "unmap"]
        for c in commands:
            argv += ["-c", c]
        # Line-buffered, so that each command's report reaches us when the command completes.
        p = subprocess.Popen(["stdbuf", "-oL", *argv, self.uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            assert p.stdout is not None and p.stderr is not None
            lines = []
            for line in p.stdout:
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            out = "".join(lines) + p.stderr.read()
            rc = p.wait(BOUND)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(BOUND)
        if rc != 0 or "failed:" in out:
            for e in (errno.EIO, errno.ENOSPC, errno.EINVAL, errno.ECONNREFUSED, errno.ENOENT, errno.ESHUTDOWN):
                if os.strerror(e) in out:
                    raise OSError(e, f"qemu-io {' '.join(commands)}: {out.strip()}")
            raise OSError(errno.EPROTO, f"qemu-io {' '.join(commands)} failed ({rc}): {out.strip()}")
        return out

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for line in self._run(f"read -v {offset} {length}").splitlines():
            head, sep, rest = line.partition(":  ")
            if sep and len(head) == 8 and all(ch in "0123456789abcdef" for ch in head):
                out += bytes.fromhex(rest.split("  ", 1)[0])
        return bytes(out)

    def write(self, offset: int, data: bytes, fua: bool = False,
              on_ack: Callable[[], None] | None = None) -> None:
        with tempfile.NamedTemporaryFile(prefix="baton-suite-") as src:
            src.write(data)
            src.flush()
            cmds = [f"write {'-f ' if fua else ''}-s {src.name} {offset} {len(data)}"]
            if on_ack is None:
                self._run(*cmds)
                return
            acked: list[str] = []

            def on_line(line: str) -> None:
                if line.startswith("wrote ") and not acked:
                    acked.append(line)
                    on_ack()

            # qemu-io flushes when it closes the export: it sleeps first, so on_ack sees the state at the ack.
            self._run(*cmds, "sleep 1000", on_line=on_line)
            if not acked:
                raise OSError(errno.EPROTO, "qemu-io did not report the write")

    def flush(self) -> None:
        self._run("flush")

    def trim(self, offset: int, length: int) -> None:
        self._run(f"discard {offset} {length}")

    def zero(self, offset: int, length: int) -> None:
        self._run(f"write -z {offset} {length}")


def client_for(endpoint: Endpoint, export: str) -> Client:
    """The real client for what an endpoint exposes (a block device, or an NBD export on a socket or TCP)."""
    if endpoint.device:
        return BlockDeviceClient(endpoint.device)
    if endpoint.socket:
        return NBDClient(f"nbd+unix:///{export}?socket={endpoint.socket}")
    if endpoint.tcp:
        return NBDClient(f"nbd://{endpoint.tcp}/{export}")
    raise AssertionError(f"the suite has no client for endpoint {endpoint!r}")


# ------------------------------------------------------------------------------------------------ harness


class Harness(abc.ABC):
    """What a check needs from its test module: a frontend kind, private run and device directories, and the
    `baton` CLI and a writer process run as real processes there."""

    def __init__(self, kind: str, root: Path, run_dir: Path, dev_dir: Path) -> None:
        self.kind, self.root, self.run_dir, self.dev_dir = kind, root, run_dir, dev_dir

    @abc.abstractmethod
    def new_disk(self, size: int) -> str:
        """A new file-backed disk of ``size`` bytes with a Baton record on it (``baton init``)."""

    @abc.abstractmethod
    def attach(self, disk: str, name: str) -> dict[str, Any]:
        """``baton attach DISK --name NAME --frontend KIND --json`` here (the real per-disk daemon)."""

    @abc.abstractmethod
    def status(self, name: str) -> dict[str, Any]:
        """``baton status NAME --json``."""

    @abc.abstractmethod
    def detach(self, name: str) -> dict[str, Any]:
        """``baton detach NAME --json``."""

    @abc.abstractmethod
    def start_writer(self, endpoint: Endpoint, export: str, log: Path) -> subprocess.Popen[str]:
        """A process that writes to the endpoint until a write fails (then it exits non-zero), logging each
        acknowledged write as one line in ``log``."""

    @abc.abstractmethod
    def kill(self, pid: int) -> None:
        """SIGKILL ``pid`` and wait until it is gone."""


class CountingTracker:
    """The real tracker, with the calls a frontend makes counted: what the checks assert about flush, FUA,
    discard and write-zeroes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.size: int = inner.size
        self.chunk_size: int = inner.chunk_size
        self._lock = threading.Lock()
        self.calls: dict[str, int] = dict.fromkeys(
            ("reads", "writes", "fua_writes", "flushes", "discards", "write_zeroes"), 0)

    def _count(self, key: str) -> None:
        with self._lock:
            self.calls[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.calls)

    def read(self, offset: int, length: int) -> bytes:
        data: bytes = self.inner.read(offset, length)
        self._count("reads")
        return data

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self.inner.write(offset, data, fua=fua)
        self._count("fua_writes" if fua else "writes")

    def flush(self) -> None:
        self.inner.flush()
        self._count("flushes")

    def discard(self, offset: int, length: int) -> None:
        self.inner.discard(offset, length)
        self._count("discards")

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False) -> None:
        self.inner.write_zeroes(offset, length, may_trim=may_trim)
        self._count("write_zeroes")

    def dirty_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        out: list[tuple[int, int, bool]] = self.inner.dirty_extents(offset, length)
        return out

    def statistics(self) -> dict[str, int]:
        out: dict[str, int] = self.inner.statistics()
        return out


@dataclass
class Served:
    """A disk served in this process by a frontend of the harness's kind, and a real client of it."""

    disk: str
    frontend: Frontend
    tracker: CountingTracker
    client: Client
    name: str
    chunk: int = field(init=False)

    def __post_init__(self) -> None:
        self.chunk = self.tracker.chunk_size

    def disk_bytes(self, offset: int, length: int) -> bytes:
        """What the disk underneath holds (the data area starts at byte 0 for every placement)."""
        with open(self.disk, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def marked_on_disk(self) -> set[int]:
        """The chunks the record on disk marks (every node slot and the frozen set), read as another process
        would after a crash: from the disk, not from the serving record's memory."""
        loc = locate(self.disk, writable=False)
        try:
            bits = loc.record.dirty_bits()
            n = -(-self.tracker.size // self.chunk)
            return set(bits.iter_set(n))
        finally:
            loc.close()


@contextlib.contextmanager
def serve(h: Harness, size: int = DISK_SIZE) -> Iterator[Served]:
    """A fresh disk taken over by node "suite" in this process, served by ``frontends.get(h.kind)``."""
    disk = h.new_disk(size)
    name = f"conf-{uuid.uuid4().hex[:8]}"
    loc = locate(disk, writable=True)
    try:
        loc.record.attach("suite")
        tracker = CountingTracker(open_tracker(loc))
        inner: TrackerLike = tracker
        fe = frontends.get(h.kind).create(inner, FrontendConfig(name=name, run_dir=h.run_dir, dev_dir=h.dev_dir))
        endpoint = fe.start()
        assert fe.ready and fe.endpoint == endpoint and fe.failure is None
        try:
            yield Served(disk, fe, tracker, client_for(endpoint, name), name)
        finally:
            with contextlib.suppress(BatonError):
                fe.stop(force=True)
            tracker.inner.close()
            if loc.record.broken() is None:
                loc.record.detach()
    finally:
        loc.close()


def _expect_error(fn: Callable[[], object], what: str) -> OSError:
    try:
        fn()
    except OSError as e:
        return e
    raise AssertionError(f"{what} succeeded; it must fail")


def _wait_for(pred: Callable[[], bool], what: str, timeout: float = BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ checks


def check_read_write(h: Harness) -> None:
    rng = random.Random(SEED)
    print(f"check_read_write: seed {SEED}")
    with serve(h) as s:
        c = s.chunk
        ranges = [(0, 4096), (c - 4096, 8192), (3 * c, c), (5 * c + 8192, 2 * c + 4096), (s.tracker.size - 4096, 4096)]
        ranges += [(rng.randrange(0, (s.tracker.size - 64 * 1024) // 4096) * 4096, rng.randrange(1, 17) * 4096)
                   for _ in range(6)]
        want: dict[int, int] = {}  # byte offset -> value, the last write wins
        touched: set[int] = set()
        for off, n in ranges:
            data = rng.randbytes(n)
            s.client.write(off, data)
            touched |= set(range(off // c, (off + n - 1) // c + 1))
            assert touched <= s.marked_on_disk(), "a write was acknowledged before its chunk was marked on disk"
            for i, b in enumerate(data):
                want[off + i] = b
        for off, n in ranges:
            expect = bytes(want.get(off + i, 0) for i in range(n))
            assert s.client.read(off, n) == expect, f"read back {n} bytes at {off} through the frontend"
            assert s.disk_bytes(off, n) == expect, f"the disk under the frontend at {off}+{n}"
        assert s.marked_on_disk() == touched, "reads must not mark chunks, writes mark exactly their own"
        st = s.frontend.statistics()
        assert st and all(isinstance(v, int) for v in st.values()), st


def check_flush_and_fua(h: Harness) -> None:
    with serve(h) as s:
        before = s.tracker.snapshot()
        s.client.flush()
        mid = s.tracker.snapshot()
        assert mid["flushes"] > before["flushes"], "a flush did not reach tracker.flush()"
        data = b"\x5a" * 4096
        at_ack: list[dict[str, int]] = []
        s.client.write(2 * s.chunk, data, fua=True, on_ack=lambda: at_ack.append(s.tracker.snapshot()))
        (after,) = at_ack
        assert after["fua_writes"] > mid["fua_writes"] or (
            after["writes"] > mid["writes"] and after["flushes"] > mid["flushes"]), (
            f"a FUA write was acknowledged without write(fua=True) or a flush after it: {mid} -> {after}")
        assert s.disk_bytes(2 * s.chunk, 4096) == data


def check_trim_and_write_zeroes(h: Harness) -> None:
    with serve(h) as s:
        c = s.chunk
        pattern = bytes(range(256)) * (2 * c // 256)
        s.client.write(8 * c, pattern)  # chunks 8 and 9
        s.client.write(12 * c, pattern)  # chunks 12 and 13
        before = s.tracker.snapshot()
        s.client.trim(8 * c + 4096, c)
        s.client.zero(12 * c + 4096, c)
        after = s.tracker.snapshot()
        assert after["discards"] + after["write_zeroes"] >= before["discards"] + before["write_zeroes"] + 2
        assert s.client.read(12 * c + 4096, c) == bytes(c), "written zeroes must read back as zeroes"
        for off in (8 * c, 12 * c):  # the data around each range is untouched
            assert s.client.read(off, 4096) == pattern[:4096]
            assert s.client.read(off + c + 4096, c - 4096) == pattern[c + 4096:]
        # A trim and a write-zeroes of chunks never written are changes too: marked before they are acknowledged.
        s.client.trim(20 * c, c)
        s.client.zero(22 * c, c)
        assert {20, 22} <= s.marked_on_disk()


def check_fenced(h: Harness) -> None:
    with serve(h) as s:
        c = s.chunk
        s.client.write(0, b"\x01" * 4096)  # acknowledged before the takeover
        other = locate(s.disk, writable=True)
        try:
            other.record.attach("intruder")  # another node takes the disk over: epoch + 1 on disk
            err = _expect_error(lambda: s.client.write(5 * c, b"\x02" * 4096), "a write after the takeover")
            assert err.errno == errno.EIO, f"expected EIO, got {err!r}"
            assert s.frontend.wait(BOUND), "a fenced frontend must stop by itself"
            failure = s.frontend.failure
            assert failure is not None and failure.kind is FailureKind.FENCED, failure
            assert isinstance(failure.error(), Fenced)
            assert not s.frontend.ready
            _expect_error(lambda: s.client.read(0, 4096), "a read from a fenced frontend")
            assert s.disk_bytes(5 * c, 4096) == bytes(4096), "the refused write reached the disk"
            assert other.record.is_marked(0), "the new owner's record must hold the acknowledged write"
        finally:
            other.close()


def check_daemon_killed(h: Harness) -> None:
    disk = h.new_disk(DISK_SIZE)
    name = f"conf-{uuid.uuid4().hex[:8]}"
    res = h.attach(disk, name)
    endpoint = Endpoint(device=res.get("device"), socket=res.get("socket"), tcp=res.get("tcp"))
    log = h.root / f"{name}.writes"
    writer = h.start_writer(endpoint, name, log)
    try:
        _wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 20, "20 acknowledged writes")
        h.kill(int(res["pid"]))
        assert writer.wait(BOUND) != 0, "the writer's writes must fail once the daemon is dead"
        st = h.status(name)
        assert st["state"] == "failed" and st["failure"] == "died", st
        out = h.detach(name)
        assert out["was_running"] is False and out["failure"] == "died", out
        for p in (endpoint.device, endpoint.socket):
            assert not p or not os.path.lexists(p), f"{p} is left behind after detach"
        assert not (h.run_dir / name).exists(), f"{h.run_dir / name} is left behind after detach"
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(BOUND)


CHECKS: list[Callable[[Harness], None]] = [
    check_read_write,
    check_flush_and_fua,
    check_trim_and_write_zeroes,
    check_fenced,
    check_daemon_killed,
]

__all__ = ["CHECKS", "BlockDeviceClient", "Client", "CountingTracker", "Harness", "NBDClient", "Served",
           "client_for", "serve"]
