"""The record and the tracker hold no copies of a region's bits beyond the ones they document (issue 12's memory
target: the daemon and the backup of a 1 TiB disk with 10 % changed under 150 MiB).

A record of a 1 TiB disk at 64 KiB chunks has 2 MiB of bits per region (529 bitmap pages). Before this test,
a freeze copied the frozen set and ORed the owner's set into it through four 2 MiB big-int temporaries, every
checkpoint copied the frozen set and the repository's owed set and built a 2 MiB set of the chunks leaving, and
every group commit of marks copied the owner's set: 10-12 MiB above the sets held, on every backup. Now whole
sets are changed page by page, in place once the writes are durable, so what a backup allocates is the copy the
freeze returns and the tracker's copy-before-write set.

Measured as the peak of Python's allocations (tracemalloc) above what was held before each phase, against a
bound in units of one region's bits. The device is a plain bytearray (no write cache that tracemalloc would
count)."""

from __future__ import annotations

import ctypes
import random
import tracemalloc
import uuid
from collections.abc import Callable, Iterator

from baton.format.bitmap import Bitmap
from baton.format.record import PAGE_BYTES, PLACEMENT_TAIL, HistoryEntry, RecordHeader, geometry_for
from baton.record import core, resident
from baton.record.core import Record, format_record
from baton.tracker.core import Tracker

CHUNK = 64 << 10
DATA = 1 << 40  # 1 TiB: 16.8 M chunks, 2 MiB of bits per region
REPO = "ab" * 16


class MemDev:
    """A record area in memory, written in place (sync does nothing)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.image = bytearray(size)

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.image[offset : offset + length])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.image[offset : offset + len(data)] = data

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _record(nrepos: int = 4, data: int = DATA) -> tuple[MemDev, int]:
    geo = geometry_for(data, CHUNK, 4, nrepos)
    dev = MemDev(geo.size)
    format_record(dev, RecordHeader(placement=PLACEMENT_TAIL, nslots=4, nrepos=nrepos, chunk_size=CHUNK,
                                    disk_uuid=str(uuid.uuid4()), lineage="", disk_size=data + geo.size,
                                    data_size=data, record_offset=data, record_size=geo.size,
                                    pages_per_slot=geo.pages_per_slot))
    return dev, geo.pages_per_slot * PAGE_BYTES


def _changed(n: int) -> Iterator[int]:
    """10 % of the chunks, in runs of 32 all over the disk (every bitmap page holds some)."""
    return (c for c in range(n) if c // 32 % 10 == 3)


def _entry(sid: str) -> HistoryEntry:
    return HistoryEntry(seq=0, snapshot_id=sid, lineage="", node="c", start_ns=1, end_ns=2, chunks_read=0,
                        bytes_read=0, chunks_stored=0, bytes_stored=0, bytes_deduped=0, mode="incremental",
                        result="ok", reason="", digest="00" * 32, epoch=0, era=0)


def _peak_above(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak of traced allocations during ``fn`` above what was traced when it started, its result)."""
    tracemalloc.reset_peak()
    start, _ = tracemalloc.get_traced_memory()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    return peak - start, out


def _failed_over(dev: MemDev) -> Record:
    """Node b marked 10 % of the chunks and died; node c took the disk over (b's slot merged into c's)."""
    b = Record.load(dev)
    b.attach("b")
    chunks = list(_changed(b.header.nchunks))
    for i in range(0, len(chunks), 65536):
        b.mark(chunks[i : i + 65536])
    c = Record.load(dev)
    c.attach("c")
    return c


def test_incremental_backup_of_a_1tib_record_allocates_no_region_copies() -> None:
    dev, region = _record()
    rec = _failed_over(dev)
    tracker = Tracker(rec, MemDev(0), size=DATA)  # the data device is not read here
    n = rec.header.nchunks
    rec.use_repo(REPO)
    tracemalloc.start()
    try:
        held, _ = tracemalloc.get_traced_memory()
        freeze_peak, frozen = _peak_above(lambda: tracker.begin_backup("11" * 16))
        assert isinstance(frozen, Bitmap)
        # What a freeze must allocate: the copy it returns, and the tracker's copy-before-write set.
        after_freeze, _ = tracemalloc.get_traced_memory()
        print(f"freeze: {freeze_peak / region:.2f} regions above the sets held")
        assert freeze_peak < 2.25 * region
        assert after_freeze - held < 2.25 * region

        batches = []
        batch: list[int] = []
        for c in frozen.iter_set(n):
            batch.append(c)
            if len(batch) == 4096:
                batches.append(batch)
                batch = []
                if len(batches) == 40:
                    break

        def checkpoints() -> None:
            for b in batches:
                rec.checkpoint("22" * 16, b)

        cp_peak, _ = _peak_above(checkpoints)
        print(f"40 checkpoints: {cp_peak / region:.3f} regions above")
        assert cp_peak < 0.25 * region  # a batch's pages, not a region

        batches.clear()  # the test's own lists of chunk numbers
        batch = []
        tracker.end_backup()
        commit_peak, _ = _peak_above(lambda: rec.commit_backup(_entry("33" * 16)))
        print(f"commit: {commit_peak / region:.3f} regions above")
        assert commit_peak < 0.25 * region
        end, _ = tracemalloc.get_traced_memory()
        # The owner's slot and the frozen set stay in memory (and the caller's copy); nothing more is kept.
        print(f"held after the backup: {(end - held) / region:.2f} regions more than before it")
        assert end - held < 1.25 * region
    finally:
        tracemalloc.stop()
    assert not rec.regions[rec.geo.frozen_region].bits.any()  # type: ignore[union-attr]
    assert set(frozen.iter_set(n)) == set(_changed(n))


def test_marks_and_status_of_a_1tib_record_allocate_pages_not_regions() -> None:
    dev, region = _record()
    rec = _failed_over(dev)
    rng = random.Random(5)
    tracemalloc.start()
    try:
        # Group commits of first-touch marks: each wrote a copy of the owner's whole set before.
        peak, _ = _peak_above(lambda: [rec.mark([rng.randrange(rec.header.nchunks)]) for _ in range(50)])
        print(f"50 group commits: {peak / region:.3f} regions above")
        assert peak < 0.25 * region
        # status (the daemon's, every `baton status`): it built the union of the sets to count it.
        peak, st = _peak_above(rec.status)
        print(f"status: {peak / region:.3f} regions above")
        assert peak < 0.5 * region
    finally:
        tracemalloc.stop()
    assert isinstance(st, dict)
    assert st["dirty_chunks"] == rec.dirty_bits().count() > len(set(_changed(rec.header.nchunks)))


def test_page_helpers_agree_with_the_bitmap() -> None:
    rng = random.Random(7)
    size = 5 * PAGE_BYTES
    for _ in range(20):
        a, b = Bitmap(size), Bitmap(size)
        for bm in (a, b):
            for p in rng.sample(range(5), rng.randrange(6)):
                bm.set_all(rng.randrange(p * PAGE_BYTES * 8, (p + 1) * PAGE_BYTES * 8) for _ in range(50))
        want = a.copy()
        want |= b
        got = a.copy()
        core._or_into(got, b)
        assert got == want
        assert core._popcount(want) == want.count()
        chunks = sorted(rng.sample(range(size * 8), 300))
        for p, cs in core._by_page(chunks).items():
            page = Bitmap.from_bytes(core._page_with(a, p, cs, value=True))
            expect = Bitmap.from_bytes(a.data[p * PAGE_BYTES : (p + 1) * PAGE_BYTES])
            expect.set_all(c - p * PAGE_BYTES * 8 for c in cs)
            assert page == expect


def _resident(buf: bytearray) -> tuple[int, int]:
    """(resident, total) memory pages lying wholly inside ``buf``, as mincore(2) reports them."""
    base = resident.buffer_address(buf)
    start = -(-base // resident.PAGE) * resident.PAGE
    n = (base + len(buf) - start) // resident.PAGE
    vec = (ctypes.c_ubyte * n)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * resident.PAGE), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec), n


def test_sets_that_are_all_zero_give_their_memory_back() -> None:
    """The owner's slot after a freeze, the frozen set as checkpoints clear it, and the tracker's set as the
    backup reads it: their all-zero memory pages go back to the kernel (a bytearray keeps every page it
    touched). A 64 GiB record: 128 KiB of bits a region."""
    dev, _region = _record(data=64 << 30)
    rec = _failed_over(dev)
    tracker = Tracker(rec, MemDev(0), size=64 << 30)
    n = rec.header.nchunks
    frozen = tracker.begin_backup("11" * 16)
    mine = rec.regions[rec.owner_region].bits  # type: ignore[index]
    fset = rec.regions[rec.geo.frozen_region].bits
    pending = tracker._cbw_pending
    assert mine is not None and fset is not None and pending is not None
    assert _resident(mine.data)[0] == 0
    res, total = _resident(pending.data)
    assert res == total > 8  # the copy-before-write set holds bits everywhere: every page is resident

    batch: list[int] = []
    run: list[int] = []
    for c in [*frozen.iter_set(n), -1]:
        if run and (c != run[-1] + 1 or len(run) == 16):
            tracker.read_frozen_run(run[0], len(run))
            batch += run
            run = []
            if len(batch) >= 4096:
                rec.checkpoint("22" * 16, batch)
                batch = []
        run.append(c)
    res, total = _resident(pending.data)
    print(f"tracker's set: {res} of {total} pages resident after the last read")
    assert res <= 2  # the slack behind the last read
    res, total = _resident(fset.data)
    print(f"frozen set: {res} of {total} pages resident before the last batch's checkpoint")
    assert res <= 2
    tracker.end_backup()
    rec.commit_backup(_entry("33" * 16))
    assert _resident(fset.data)[0] == 0
    assert not fset.any() and not mine.any()
