"""The write path every frontend uses: write-ahead marking, copy-before-write during a backup, statistics.

Rules (docs/design.md "Write path"):

* A write first marks its chunks in the record (durable, group-committed) and only then reaches the disk, so an
  acknowledged write is always recorded. Writes to chunks already marked cost no metadata I/O.
* Reads pass through. Flush/FUA make the backing data durable before the reply (marks already are).
* Discard and write-zeroes change content: they mark, then punch/zero.
* During a backup, a write to a frozen chunk the backup has not read yet first copies the chunk's old content
  aside (memory, then a spill file), so the snapshot equals the disk at the freeze point.
* ``begin_backup`` freezes under a write barrier: in-flight writes drain, so every write acknowledged before the
  freeze point is both on disk and in the frozen set.
* A ``Fenced`` from the record is sticky: every later write fails with it, and the frontend shuts down.
* A frontend whose writes never reach this process (dm-era) gives the tracker a point-in-time provider
  (:class:`PointInTime`, ``Tracker.pit``): ``begin_backup`` asks it to freeze (fold the kernel's record of writes
  into the record, switch to a kernel snapshot) before the record's freeze, the backup reads the frozen image
  it returns, and ``end_backup`` thaws it.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from typing import Any, Protocol

from baton.device import BlockDev, device_has_data, read_view
from baton.errors import BatonError
from baton.format.bitmap import Bitmap
from baton.record.core import Record
from baton.record.resident import PAGE, buffer_address, release_zero_pages

CBW_MEMORY_LIMIT = 256 << 20


class PointInTime(Protocol):
    """A frozen image kept by the kernel for a backup (the dm frontend: dm-snapshot over dm-era)."""

    def freeze(self) -> tuple[BlockDev, int]:
        """Freeze now: fold every write acknowledged so far into the record (marked, durable), and return the
        device that shows the disk as of this moment, plus the era the fold closed (every write of an earlier era
        is frozen; 0: no era)."""
        ...

    def check(self) -> None:
        """Raise (a BatonError saying why) once the frozen image can no longer be trusted; called after every
        read of it, and when a read of it failed."""
        ...

    def thaw(self) -> None:
        """Drop the frozen image. Never raises."""
        ...


class _RWBarrier:
    """Many writers, or one freezer. Writers never starve the freezer: a waiting freezer blocks new writers."""

    def __init__(self) -> None:
        self._c = threading.Condition()
        self._writers = 0
        self._freezing = False

    def enter(self) -> None:
        with self._c:
            while self._freezing:
                self._c.wait()
            self._writers += 1

    def leave(self) -> None:
        with self._c:
            self._writers -= 1
            if self._writers == 0:
                self._c.notify_all()

    def freeze(self) -> None:
        with self._c:
            while self._freezing:
                self._c.wait()
            self._freezing = True
            while self._writers:
                self._c.wait()

    def thaw(self) -> None:
        with self._c:
            self._freezing = False
            self._c.notify_all()


class _CbwStore:
    """Old chunk contents saved by copy-before-write: in memory up to a limit, then in an unlinked spill file."""

    def __init__(self, spill_dir: str | None, limit: int = CBW_MEMORY_LIMIT) -> None:
        self.mem: dict[int, bytes] = {}
        self.mem_bytes = 0
        self.limit = limit
        self.spill_dir = spill_dir
        self._spill: Any = None
        self._spill_index: dict[int, tuple[int, int]] = {}
        self._spill_end = 0
        self.saved = 0
        self.spilled_bytes = 0

    def put(self, chunk: int, data: bytes) -> None:
        self.saved += 1
        if self.mem_bytes + len(data) <= self.limit:
            self.mem[chunk] = data
            self.mem_bytes += len(data)
            return
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(dir=self.spill_dir, prefix="baton-cbw-")  # noqa: SIM115 - lives as long as the backup
        self._spill.seek(self._spill_end)
        self._spill.write(data)
        self._spill_index[chunk] = (self._spill_end, len(data))
        self._spill_end += len(data)
        self.spilled_bytes += len(data)

    def take(self, chunk: int) -> bytes | None:
        data = self.mem.pop(chunk, None)
        if data is not None:
            self.mem_bytes -= len(data)
            return data
        loc = self._spill_index.pop(chunk, None)
        if loc is None:
            return None
        self._spill.seek(loc[0])
        out: bytes = self._spill.read(loc[1])
        return out

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
        self.mem.clear()
        self._spill_index.clear()


class Tracker:
    """A tracked view of a data device. Thread-safe; every method may block on a group commit.

    ``data`` is the data area (for tail placement, the disk minus the record area); ``size`` bytes of it are
    exposed. ``tracking=False`` (benchmarks only) skips marking, to measure what tracking costs.
    """

    def __init__(self, record: Record, data: BlockDev, *, size: int | None = None, tracking: bool = True,
                 spill_dir: str | None = None) -> None:
        self.record = record
        self.data = data
        self.size = size if size is not None else record.header.data_size
        self.chunk_size = record.header.chunk_size
        self.tracking = tracking
        self.spill_dir = spill_dir
        self._barrier = _RWBarrier()
        self._cbw_lock = threading.Lock()
        self._cbw_pending: Bitmap | None = None  # frozen chunks the backup has not read yet
        # The pending set's buffer address, and the stretch of it below which all-zero memory pages were last
        # handed back (read_frozen_run: the set empties as the backup reads it, mostly in ascending order).
        self._pending_address = 0
        self._pending_released = 0
        self._cbw: _CbwStore | None = None
        self.pit: PointInTime | None = None  # set by a frontend that keeps the point in time in the kernel
        self._frozen_src: BlockDev | None = None  # the pit's frozen image while a backup runs
        self.frozen_era = 0  # the era the last freeze's fold closed (0: none); kept after end_backup for the commit
        self._stats_lock = threading.Lock()
        self.stats = {"writes": 0, "reads": 0, "flushes": 0, "discards": 0, "write_zeroes": 0, "bytes_in": 0,
                      "bytes_out": 0, "cbw_copies": 0, "errors": 0}

    # ----------------------------------------------------------------------------------------------- helpers

    def _chunks(self, offset: int, length: int) -> range:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BatonError(f"I/O at {offset}+{length} is outside the {self.size}-byte device")
        if length == 0:
            return range(0)
        cs = self.chunk_size
        return range(offset // cs, (offset + length - 1) // cs + 1)

    def _count(self, key: str, n: int = 1, nbytes: int = 0, bkey: str = "") -> None:
        with self._stats_lock:
            self.stats[key] += n
            if bkey:
                self.stats[bkey] += nbytes

    def _before_change(self, chunks: range) -> None:
        """Mark (write-ahead, durable) and copy-before-write. Caller holds the barrier."""
        if self.tracking:
            self.record.mark(chunks)
        else:
            self._check_broken()
        pending = self._cbw_pending
        if pending is None:
            return
        with self._cbw_lock:
            pending = self._cbw_pending
            if pending is None:
                return
            for c in chunks:
                if pending.test(c):
                    assert self._cbw is not None
                    self._cbw.put(c, self._read_chunk_raw(c))
                    pending.clear(c)
                    self._count("cbw_copies")

    def _read_chunk_raw(self, c: int) -> bytes:
        off = c * self.chunk_size
        return self.data.pread(off, min(self.chunk_size, self.size - off))

    # ----------------------------------------------------------------------------------------------- I/O

    def _check_broken(self) -> None:
        err = self.record.broken()
        if err is not None:
            raise err

    def read(self, offset: int, length: int) -> bytes:
        self._check_broken()
        self._chunks(offset, length)
        data = self.data.pread(offset, length)
        self._count("reads", 1, length, "bytes_out")
        return data

    def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        chunks = self._chunks(offset, len(data))
        self._barrier.enter()
        try:
            self._before_change(chunks)
            self.data.pwrite(offset, data)
            if fua:
                self.data.sync()
        finally:
            self._barrier.leave()
        self._count("writes", 1, len(data), "bytes_in")

    def flush(self) -> None:
        self._check_broken()
        self.data.sync()
        self._count("flushes")

    def discard(self, offset: int, length: int) -> None:
        self._zero(offset, length, zero=False)
        self._count("discards")

    def write_zeroes(self, offset: int, length: int, may_trim: bool = False) -> None:
        self._zero(offset, length, zero=True)
        self._count("write_zeroes")

    def _zero(self, offset: int, length: int, *, zero: bool) -> None:
        chunks = self._chunks(offset, length)
        self._barrier.enter()
        try:
            self._before_change(chunks)
            disc = getattr(self.data, "discard", None)
            if disc is not None:
                disc(offset, length, zero=zero)
            elif zero:
                self.data.pwrite(offset, bytes(length))
        finally:
            self._barrier.leave()

    def is_dirty(self, chunk: int) -> bool:
        """Changed since the last backup: marked by this owner or frozen for a backup (the record decides,
        under its lock)."""
        return self.record.is_dirty(chunk)

    def dirty_extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(start, length, dirty) runs covering [offset, offset+length): changed since the last backup."""
        out: list[tuple[int, int, bool]] = []
        if length <= 0:
            return out
        end = min(offset + length, self.size)
        cs = self.chunk_size
        pos = offset
        while pos < end:
            c = pos // cs
            d = self.is_dirty(c)
            nxt = min((c + 1) * cs, end)
            if out and out[-1][2] == d:
                s, ln, _ = out[-1]
                out[-1] = (s, ln + nxt - pos, d)
            else:
                out.append((pos, nxt - pos, d))
            pos = nxt
        return out

    # ----------------------------------------------------------------------------------------------- backup

    def begin_backup(self, backup_id: str, *, full: bool = False) -> Bitmap:
        """Freeze point. Drains in-flight writes, freezes the record's set, and arms copy-before-write for the
        chunks this backup will read (the frozen set, or every chunk for a full backup). Returns the frozen
        bits. With a point-in-time provider (``pit``) it freezes first (its fold marks what the kernel tracked),
        and the backup then reads the image it returned."""
        self._barrier.freeze()
        try:
            src: BlockDev | None = None
            era = 0
            if self.pit is not None:
                src, era = self.pit.freeze()
            try:
                frozen = self.record.freeze(backup_id)
            except BaseException:
                if self.pit is not None and src is not None:
                    self.pit.thaw()
                raise
            self._frozen_src = src
            self.frozen_era = era
            n = self.record.header.nchunks
            # One copy of the frozen bits (through a view: slicing the bytearray first would make two).
            pending = Bitmap.first_n(n) if full else Bitmap.from_bytes(memoryview(frozen.data)[: (n + 7) // 8])
            with self._cbw_lock:
                self._cbw = _CbwStore(self.spill_dir)
                self._cbw_pending = pending
                self._pending_address = buffer_address(pending.data)
                self._pending_released = 0
        finally:
            self._barrier.thaw()
        return frozen

    def read_frozen_run(self, first: int, count: int, *, skip_holes: bool = False
                        ) -> list[memoryview | None] | None:
        """Chunks first..first+count-1 as of the freeze point: one read-only view per chunk (views of one disk
        read; no per-chunk copy), or None for the whole run when ``skip_holes`` and the run lies in a hole of
        the data file with nothing saved aside (it reads as zeros and was not read). Thread-safe: several runs
        may be read at once (the backup keeps a queue of them in flight).

        Why the disk is read without the copy-before-write lock: a write to a chunk whose pending bit is set
        saves the chunk's old content under the lock *before* it changes the disk, and this method takes the
        saved copies and clears the pending bits under the lock only *after* its read. A write that raced
        with the read therefore always left a saved copy, which replaces what was read; a write after the
        bits are cleared comes after the read. A hole test (SEEK_DATA) is a read in this sense.

        The two halves, for a caller that issues the read itself (the backup's asynchronous reads, which
        apply only to :meth:`frozen_reads_direct` trackers): :meth:`frozen_run_source`, then the read, then
        :meth:`take_frozen_run` once the read completed."""
        data: memoryview | None = None
        pit = self.pit if self._frozen_src is not None else None
        try:
            where = self.frozen_run_source(first, count, skip_holes=skip_holes)
            if where is not None:
                data = read_view(*where)  # the read lands in memory the chunks' views keep
            if pit is not None:
                pit.check()  # the image was still valid after this read: the read is the frozen content
        except OSError as e:
            if pit is not None and e.errno == errno.EIO:
                pit.check()  # raises why, when the image was dropped (an exception store that overflowed)
            raise
        return self.take_frozen_run(first, count, data)

    def frozen_reads_direct(self) -> bool:
        """Whether this backup's frozen content is read from the data device itself (no point-in-time image:
        nothing to check after each read), so that the reads may be issued by the caller."""
        return self._frozen_src is None

    def frozen_run_source(self, first: int, count: int, *, skip_holes: bool = False
                          ) -> tuple[BlockDev, int, int] | None:
        """The first half of :meth:`read_frozen_run`: (device, offset, length) to read for the run, or None
        when ``skip_holes`` and the run lies in a hole (not to be read). BatonError outside a backup."""
        cs = self.chunk_size
        off = first * cs
        length = min(count * cs, self.size - off)
        with self._cbw_lock:
            if self._cbw_pending is None or self._cbw is None:
                raise BatonError("no backup is in progress on this tracker")
        src = self._frozen_src or self.data
        if skip_holes and device_has_data(src, off, length) is False:
            return None
        return src, off, length

    def take_frozen_run(self, first: int, count: int, data: memoryview | None) -> list[memoryview | None] | None:
        """The second half of :meth:`read_frozen_run`, after the run's read completed (``data``: its bytes) or
        for a run in a hole (None): saved copies replace what was read, the pending bits are cleared, and the
        chunks come back as :meth:`read_frozen_run` returns them."""
        cs = self.chunk_size
        with self._cbw_lock:
            pending = self._cbw_pending
            store = self._cbw
            if pending is None or store is None:
                raise BatonError("no backup is in progress on this tracker")
            last = first + count
            saved: dict[int, bytes] = {}
            if store.mem or store._spill_index:
                for c in range(first, last):
                    got = store.take(c)
                    if got is not None:
                        saved[c] = got
            pending.clear_range(first, last)  # whole bytes at once, single bits at the edges
            here = first >> 3
            if here - self._pending_released >= 2 * PAGE:
                # Memory pages of the set wholly behind this read (one page of slack for reads still in flight)
                # that are all zero go back to the kernel: at 1 TiB the set is 2 MiB, and it empties by the end.
                release_zero_pages(pending.data, self._pending_released, here - PAGE,
                                   address=self._pending_address)
                self._pending_released = here - PAGE
        if data is None and not saved:
            return None
        out: list[memoryview | None] = []
        for c in range(first, last):
            got = saved.get(c)
            if got is not None:
                out.append(memoryview(got))
            elif data is None:
                out.append(None)
            else:
                lo = (c - first) * cs
                out.append(data[lo : lo + min(cs, self.size - c * cs)])
        return out

    def end_backup(self) -> dict[str, int]:
        """Disarm copy-before-write and drop saved copies. Returns what copy-before-write did."""
        with self._cbw_lock:
            store = self._cbw
            self._cbw = None
            self._cbw_pending = None
            src, self._frozen_src = self._frozen_src, None
        if src is not None and self.pit is not None:
            self.pit.thaw()
        if store is None:
            return {"cbw_saved": 0, "cbw_spilled_bytes": 0}
        st = {"cbw_saved": store.saved, "cbw_spilled_bytes": store.spilled_bytes}
        store.close()
        return st

    # ----------------------------------------------------------------------------------------------- misc

    def statistics(self) -> dict[str, int]:
        with self._stats_lock:
            s = dict(self.stats)
        r = self.record.statistics()
        s.update({"first_touch": r["first_touch_chunks"], "metadata_syncs": r["metadata_syncs"],
                  "metadata_commits": r["commits"], "marks_fast": r["marks_fast"]})
        try:
            s["dirty_chunks"] = self.record.owner_dirty_chunks()
        except AssertionError:
            s["dirty_chunks"] = 0
        return s

    def close(self) -> None:
        self.end_backup()


def spill_dir_default() -> str:
    d = os.environ.get("BATON_SPILL_DIR", "/var/tmp")
    return d if os.path.isdir(d) else tempfile.gettempdir()
