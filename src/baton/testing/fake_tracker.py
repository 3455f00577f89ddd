"""A file-backed stand-in for the real tracker, for frontend tests and benchmarks: the one FakeTracker.

It implements the ``TrackerLike`` contract (see docs/design.md): reads pass through, writes/discards/zeroes mark
their chunks in an in-memory dirty bitmap *before* they touch the file, flush and FUA call ``fdatasync``. It is
not durable across a crash (the bitmap lives in memory); that is the real tracker's job.

Test hooks:

* ``fence_after_writes=N``: the (N+1)-th content-changing call (write, discard, write_zeroes) and every later
  call, flush included, raise :class:`baton.errors.Fenced`, like a tracker that found a newer owner epoch. The
  fenced call changes nothing.
* :meth:`fence` fences at once; :meth:`fail` makes the next ``times`` calls of one operation raise a given
  exception (without side effects), to exercise a frontend's EIO path.
* ``io_delay`` (seconds) makes every read and write sleep first, like a device with that latency; it shows
  whether a frontend keeps several requests in flight.
* :meth:`hold` makes writes wait at a gate (before they are counted or marked) until :meth:`release`: it shows
  that a frontend does not acknowledge a write the tracker has not finished.
* :meth:`clear_dirty` forgets the dirty bitmap (as a committed backup would); :meth:`dirty_chunks` lists it.

All methods are thread-safe: the bitmap and counters sit behind one lock, file I/O uses pread/pwrite.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
import time
from pathlib import Path

from baton.errors import Fenced

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_BLOCK = bytes(1 << 20)
_CHANGES = frozenset(("write", "discard", "write_zeroes"))
_FENCEABLE = _CHANGES | {"flush"}  # a fenced tracker still serves reads and dirty queries
_COUNTER = {
    "read": "reads",
    "write": "writes",
    "flush": "flushes",
    "discard": "discards",
    "write_zeroes": "write_zeroes",
    "dirty_extents": "dirty_queries",
}

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _libc.fallocate.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc-like: fall back to writing zeroes
    _libc = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with ``mode``; False if the file system or platform does not support it."""
    if _libc is None:
        return False
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class FakeTracker:
    """A TrackerLike over a regular file with an in-memory dirty bitmap and counters.

    ``path`` is created if missing. ``size`` (bytes) truncates/extends the file to that size; None keeps the
    file's size. ``chunk_size`` must be a power of two from 4 KiB to 4 MiB.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        size: int | None = None,
        chunk_size: int = 64 * 1024,
        *,
        fence_after_writes: int | None = None,
        io_delay: float = 0.0,
    ) -> None:
        if chunk_size & (chunk_size - 1) or not 4096 <= chunk_size <= 4 << 20:
            raise ValueError(f"chunk_size must be a power of two in 4 KiB..4 MiB, got {chunk_size}")
        self.io_delay = io_delay  # seconds slept in each read/write: a slow device (releases the GIL)
        self.path = Path(path)
        self.chunk_size = chunk_size
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if size is not None:
            os.ftruncate(self._fd, size)
        self.size: int = os.fstat(self._fd).st_size
        nchunks = -(-self.size // chunk_size)
        self._dirty = bytearray(nchunks)  # one byte per chunk: simple, and tests use small disks
        self._lock = threading.Lock()
        self._fence_after = fence_after_writes
        self._fenced = False
        self._changes_started = 0  # content-changing calls let through, counted for fence_after_writes
        self._failures: dict[str, tuple[BaseException, int]] = {}
        self._gate = threading.Event()
        self._gate.set()
        self._stats: dict[str, int] = dict.fromkeys(
            (
                "reads", "writes", "fua_writes", "flushes", "discards", "write_zeroes", "dirty_queries",
                "bytes_read", "bytes_written", "first_touch_marks", "errors", "fenced",
            ),
            0,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ test hooks
    def fence(self) -> None:
        """Behave from now on as a superseded owner: every call but read/dirty_extents raises Fenced."""
        with self._lock:
            self._fenced = True
            self._stats["fenced"] = 1

    def fail(self, op: str, exc: BaseException, times: int = 1) -> None:
        """Make the next ``times`` calls of ``op`` (a method name) raise ``exc`` without side effects."""
        with self._lock:
            self._failures[op] = (exc, times)

    def hold(self) -> None:
        """Make every write from now on wait (before it is admitted) until :meth:`release`."""
        self._gate.clear()

    def release(self) -> None:
        """Let held and later writes through again."""
        self._gate.set()

    def clear_dirty(self) -> None:
        """Forget every dirty mark (what a committed backup does to the real record)."""
        with self._lock:
            self._dirty[:] = bytes(len(self._dirty))

    def dirty_chunks(self) -> list[int]:
        """Indices of the chunks marked dirty, ascending."""
        with self._lock:
            return [i for i, d in enumerate(self._dirty) if d]

    def close(self) -> None:
        """Close the backing file. Further calls fail with OSError."""
        os.close(self._fd)

    # ---------------------------------------------------------------------------------------- TrackerLike
    def read(self, offset: int, length: int) -> bytes:
        self._admit("read", offset, length)
        if self.io_delay:
            time.sleep(self.io_delay)
        data = os.pread(self._fd, length, offset)
        while len(data) < length:  # short reads only at EOF of a sparse/short file: it reads as zeroes
            more = os.pread(self._fd, length - len(data), offset + len(data))
            if not more:
                data += bytes(length - len(data))
                break
            data += more
        return data

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._gate.wait()
        self._admit("write", offset, len(data), fua=fua)  # marks the chunks before the data moves
        if self.io_delay:
            time.sleep(self.io_delay)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        self._admit("flush", 0, 0)
        os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        self._admit("discard", offset, length)
        self._zero(offset, length, punch=True)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False) -> None:
        self._admit("write_zeroes", offset, length)
        self._zero(offset, length, punch=may_trim)

    def dirty_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Runs (start, length, dirty) covering exactly [offset, offset+length), merged by state."""
        self._admit("dirty_extents", offset, length)
        out: list[tuple[int, int, bool]] = []
        end = offset + length
        cs = self.chunk_size
        with self._lock:
            pos = offset
            while pos < end:
                state = bool(self._dirty[pos // cs])
                nxt = min(end, (pos // cs + 1) * cs)
                if out and out[-1][2] == state:
                    start, _, _ = out[-1]
                    out[-1] = (start, nxt - start, state)
                else:
                    out.append((pos, nxt - pos, state))
                pos = nxt
        return out

    def statistics(self) -> dict[str, int]:
        """Counters: reads, writes, fua_writes, flushes, discards, write_zeroes, dirty_queries, bytes_read,
        bytes_written, first_touch_marks, errors (injected or fenced failures), fenced (0/1), dirty_chunks.
        A call is counted when it is let through, before its file I/O."""
        with self._lock:
            out = dict(self._stats)
            out["dirty_chunks"] = sum(1 for d in self._dirty if d)
        return out

    # ------------------------------------------------------------------------------------------- internals
    def _admit(self, op: str, offset: int, length: int, *, fua: bool = False) -> None:
        """Let one call through or raise (an injected failure, Fenced, ValueError for a range outside the
        disk) without side effects. A call let through is counted, and a content-changing one has its
        chunks marked, all in one lock section: the fake should cost little next to the frontend."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"{op}: range {offset}+{length} outside the {self.size}-byte disk")
        changes = op in _CHANGES
        stats = self._stats
        with self._lock:
            if self._failures:
                failure = self._failures.get(op)
                if failure is not None:
                    exc, times = failure
                    if times <= 1:
                        del self._failures[op]
                    else:
                        self._failures[op] = (exc, times - 1)
                    stats["errors"] += 1
                    raise exc
            limit = self._fence_after
            if changes and not self._fenced and limit is not None and self._changes_started >= limit:
                self._fenced = True
                stats["fenced"] = 1
            if self._fenced and op in _FENCEABLE:
                stats["errors"] += 1
                raise Fenced("a newer owner epoch is on disk (fake tracker)", mine=1, on_disk=2)
            stats[_COUNTER[op]] += 1
            if op == "read":
                stats["bytes_read"] += length
            elif changes:
                self._changes_started += 1
                if op == "write":
                    stats["bytes_written"] += length
                    stats["fua_writes"] += fua
                if length:
                    dirty = self._dirty
                    for i in range(offset // self.chunk_size, (offset + length - 1) // self.chunk_size + 1):
                        if not dirty[i]:
                            dirty[i] = 1
                            stats["first_touch_marks"] += 1

    def _zero(self, offset: int, length: int, *, punch: bool) -> None:
        mode = (
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if punch
            else _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
        )
        if length == 0 or _fallocate(self._fd, mode, offset, length):
            return
        pos = offset
        while pos < offset + length:
            n = min(len(_ZERO_BLOCK), offset + length - pos)
            pos += os.pwrite(self._fd, _ZERO_BLOCK[:n], pos)
