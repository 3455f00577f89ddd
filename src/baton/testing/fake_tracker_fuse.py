"""A small file-backed tracker for testing the FUSE frontend, and a test daemon that serves it.

:class:`FakeTracker` implements the tracker protocol of docs/design.md over a (sparse) file: the dirty bitmap
lives in memory only, there is no record and no durability beyond ``os.fsync`` of the file. Switches: raise
``errors.Fenced`` after N writes, raise a plain error on a given call, hold writes at a gate.

The daemon (``python -m baton.testing.fake_tracker_fuse --backing FILE --name NAME ...``) serves a FakeTracker
through :class:`baton.frontends.fuse.FuseFrontend`, so tests can kill it with SIGKILL. It prints one JSON
object per line on stdout: ``{"event": "ready", "device": ..., "loop": ..., "pid": ...}`` first, then one
reply per command read from stdin (one per line): ``stats``, ``dirty`` (the sorted list of dirty chunks),
``reset`` (clear the bitmap), ``hold`` / ``release`` (hold writes at a gate), ``stop`` / ``stop-force``.
It exits when the frontend stops (after a stop command, when fenced, or on EOF of stdin, which stops it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

from baton.errors import BatonError, Fenced


class FakeTracker:
    """File-backed TrackerLike with an in-memory dirty bitmap. Thread-safe.

    ``fence_after``: the write after this many successful writes raises Fenced, and so does every later call.
    ``fail_on``: the name of a method ("write", "read", "flush", ...) whose next call raises OSError(EIO) once.
    """

    def __init__(self, path: Path, size: int | None = None, chunk_size: int = 64 * 1024,
                 fence_after: int | None = None) -> None:
        if chunk_size & (chunk_size - 1) or not 4096 <= chunk_size <= 4 << 20:
            raise ValueError(f"chunk_size {chunk_size} must be a power of two in 4 KiB..4 MiB")
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if size is not None:
            os.ftruncate(self.fd, size)
        self.size = os.fstat(self.fd).st_size
        self.chunk_size = chunk_size
        self.fence_after = fence_after
        self.fail_on: str | None = None
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        self._dirty: set[int] = set()
        self._fenced = False
        self._stats = dict.fromkeys(("reads", "writes", "flushes", "discards", "write_zeroes", "bytes_in",
                                     "bytes_out", "marks", "fenced_calls"), 0)

    def _check(self, op: str) -> None:
        with self._lock:
            if self.fail_on == op:
                self.fail_on = None
                raise OSError(5, f"injected failure in {op}")
            if op == "write" and self.fence_after is not None and self._stats["writes"] >= self.fence_after:
                self._fenced = True
            if self._fenced:
                self._stats["fenced_calls"] += 1
                raise Fenced("a newer owner epoch is on disk (fake)", mine=1, on_disk=2)

    def _mark(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        with self._lock:
            for c in range(first, last + 1):
                if c not in self._dirty:
                    self._dirty.add(c)
                    self._stats["marks"] += 1

    def _range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside 0..{self.size}")

    def read(self, offset: int, length: int) -> bytes:
        self._check("read")
        self._range(offset, length)
        data = os.pread(self.fd, length, offset)
        with self._lock:
            self._stats["reads"] += 1
            self._stats["bytes_out"] += len(data)
        return data

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        self._check("write")
        self._range(offset, len(data))
        self.gate.wait()
        self._mark(offset, len(data))
        os.pwrite(self.fd, data, offset)
        if fua:
            os.fdatasync(self.fd)
        with self._lock:
            self._stats["writes"] += 1
            self._stats["bytes_in"] += len(data)

    def flush(self) -> None:
        self._check("flush")
        os.fdatasync(self.fd)
        with self._lock:
            self._stats["flushes"] += 1

    def discard(self, offset: int, length: int) -> None:
        self._check("discard")
        self._range(offset, length)
        self._mark(offset, length)
        _punch(self.fd, offset, length)
        with self._lock:
            self._stats["discards"] += 1

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False) -> None:
        self._check("write_zeroes")
        self._range(offset, length)
        self._mark(offset, length)
        _punch(self.fd, offset, length)  # a punched range of a regular file reads as zeroes
        with self._lock:
            self._stats["write_zeroes"] += 1

    def dirty_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        self._range(offset, length)
        out: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length
        with self._lock:
            while pos < end:
                c = pos // self.chunk_size
                run_end = min(end, (c + 1) * self.chunk_size)
                d = c in self._dirty
                if out and out[-1][2] == d:
                    s, n, _ = out[-1]
                    out[-1] = (s, n + run_end - pos, d)
                else:
                    out.append((pos, run_end - pos, d))
                pos = run_end
        return out

    def dirty_chunks(self) -> list[int]:
        with self._lock:
            return sorted(self._dirty)

    def reset(self) -> None:
        with self._lock:
            self._dirty.clear()

    def statistics(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._stats)
            out["dirty_chunks"] = len(self._dirty)
        return out

    def close(self) -> None:
        os.close(self.fd)


def _punch(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, 3, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# ---- the test daemon ------------------------------------------------------------------------------------


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    from baton.frontends.fuse import FuseFrontend

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backing", type=Path, required=True)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=64 * 1024)
    p.add_argument("--name", required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--dev-dir", type=Path, required=True)
    p.add_argument("--fence-after", type=int, default=None)
    p.add_argument("--request-timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    tracker = FakeTracker(a.backing, a.size, a.chunk_size, a.fence_after)
    fe = FuseFrontend(tracker, a.name, a.run_dir, a.dev_dir, request_timeout=a.request_timeout)
    try:
        dev = fe.start()
    except BatonError as exc:
        _emit({"event": "error", "error": type(exc).__name__, "message": str(exc)})
        return 3
    _emit({"event": "ready", "device": dev, "loop": fe.loop_device, "pid": os.getpid(),
           "diskseq": fe.state.loop_diskseq if fe.state else None,
           "state": str(fe.state_path)})

    stopping = threading.Event()

    def commands() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            try:
                if cmd == "stats":
                    _emit({"frontend": fe.statistics(), "tracker": tracker.statistics()})
                elif cmd == "dirty":
                    _emit({"dirty": tracker.dirty_chunks()})
                elif cmd == "reset":
                    tracker.reset()
                    _emit({"ok": True})
                elif cmd == "hold":
                    tracker.gate.clear()
                    _emit({"ok": True})
                elif cmd == "release":
                    tracker.gate.set()
                    _emit({"ok": True})
                elif cmd in ("stop", "stop-force"):
                    stopping.set()
                    fe.stop(force=cmd == "stop-force")
                    _emit({"ok": True})
                    return
                else:
                    _emit({"ok": False, "error": "UsageError", "message": f"unknown command {cmd!r}"})
            except BatonError as exc:
                _emit({"ok": False, "error": type(exc).__name__, "message": str(exc)})
        tracker.gate.set()
        fe.stop(force=True)  # stdin closed: the test went away

    reader = threading.Thread(target=commands, daemon=True)
    reader.start()
    fe.wait()
    if stopping.is_set():
        reader.join(5.0)  # let the "stop" reply out first; a reader blocked on stdin is simply abandoned
    _emit({"event": "stopped", "failure": fe.failure})
    return 0


if __name__ == "__main__":
    sys.exit(main())
