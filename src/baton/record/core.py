"""The change record: per-node slots, the frozen set, group-committed write-ahead marking, fencing, history.

One ``Record`` object is the single writer of one disk's record on this node (STYLE §12). Everything else
(frontends, the backup engine) calls its methods. The write-ordering rules (docs/design.md "Write ordering"):

* ``mark``: the chunk's bit is durable in the owner's slot (page copy + slot header, one sync shared by every
  concurrent caller: group commit) before ``mark`` returns, and so before the write is acknowledged.
* Every structure has two copies and a write always goes to the copy that is *not* the current best one, so a
  torn write damages only the copy being written; the previous durable state survives in the other copy.
* Before every commit the writer re-reads the header; if a newer epoch is there it raises ``Fenced`` and never
  writes again (sticky). A takeover makes its new epoch durable before it reads the slots.
* Takeover: new epoch durable -> OR every slot and the frozen set into the owner's slot (durable) -> clear the
  other slots and the frozen set. A crash between steps leaves bits in two places, never in none.
* Backup: ``freeze`` copies the owner's set into the frozen set (durable) before clearing the owner's slot.
  ``checkpoint`` makes ``last_backup`` point at a stored checkpoint (durable) before clearing that batch's bits.
  ``commit_backup`` writes history + ``last_backup`` (durable) before clearing the frozen set.
* dm-era (v3): ``begin_era`` makes FLAG_ERA_PENDING durable before the era target is loaded; a fold marks the
  chunks the era metadata lists (``mark``, durable) before ``set_era_folded`` moves ``era_folded`` past them.

Memory. A region's bits are one bitmap page per 31744 chunks: 2 MiB for a 1 TiB disk at 64 KiB chunks, 32 MiB
at 16 TiB. While attached, the owner's slot and the frozen set stay in memory; any other region is loaded only
when some page of it is in use, and dropped when it is cleared. Nothing else holds a region-sized copy: a
change to a set (marks, a freeze, a checkpoint, a takeover's merge, owed chunks) builds each page it writes
from the set in memory, writes and syncs them, and only then changes the set in place; a freeze moves the
owner's set into an empty frozen set instead of copying it; counts and unions for status go page by page. What
a backup allocates here is the copy ``freeze`` returns. (Before: a freeze allocated about 7 regions, each
checkpoint 3 and each group commit of marks 2; tests/unit/test_record_memory.py measures it.) The memory pages
of a set that are all zero go back to the kernel (``baton.record.resident``): the owner's slot emptied by a
freeze, the frozen set as checkpoints clear it, any set cleared. The pages written are the same as before,
except that a checkpoint no longer rewrites, unchanged, the in-use pages of an owed set that holds no bits.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from baton.device import BlockDev
from baton.errors import Fenced, RecordCorrupt, RecordError, RecordNotFound, RecordVersionError
from baton.format.bitmap import Bitmap
from baton.format.copies import pick_newest, split_blocks
from baton.format.errors import BadMagic, Blank, FormatError
from baton.format.record import (
    BLOCK,
    DISTRUST_REASON_MAX,
    ERA_ALIGN,
    ERA_ZERO_BYTES,
    FLAG_CLEAN,
    FLAG_DISTRUSTED,
    FLAG_ERA_PENDING,
    FLAG_RESET,
    FLAG_SUSPECT,
    FLAG_UNTRACKED,
    FRONTEND_CODES,
    FS_EXT4,
    FS_KIND_NAMES,
    FS_NONE,
    FS_UNSAVED,
    FS_XFS,
    FULL_FLAGS,
    HISTORY_ENTRIES,
    HISTORY_ENTRY_SIZE,
    PAGE_BITS,
    PAGE_BYTES,
    PLACEMENT_EXTERNAL,
    PLACEMENT_NAMES,
    REGION_FROZEN,
    REGION_NODE,
    SECTOR,
    Geometry,
    HistoryEntry,
    RecordHeader,
    SlotHeader,
    area_for_era,
    describe_fs_markers,
    era_offset_at_end,
    era_region_size,
    pack_page,
    parse_page,
    sector_bit_range,
    slot_fixed_size,
)
from baton.record.area import bottom_path, physical_extents
from baton.record.resident import release_zero_pages

FsProbe = Callable[[], tuple[int, bytes]]  # reads the data disk's file-system markers: (FS_* kind, markers)

# Whole-set work on a region's bits goes page by page (one bitmap page, PAGE_BYTES, at a time): see "Memory" in
# the module docstring.
_COUNT_WINDOW = 64 << 10  # bytes counted at once by _popcount
_ZERO_PAGE = bytes(PAGE_BYTES)


def _span(p: int) -> tuple[int, int]:
    """Byte range of bitmap page ``p`` in a region's bits."""
    return p * PAGE_BYTES, (p + 1) * PAGE_BYTES


def _nonzero(data: bytes | bytearray) -> bool:
    """Any bit set (a C-level count, not a Python loop over the bytes)."""
    return data.count(0) != len(data)


def _holds(bits: Bitmap, p: int) -> bool:
    """Any bit set in page ``p`` of ``bits``."""
    lo, hi = _span(p)
    return bits.data.count(0, lo, hi) != hi - lo


def _page(bits: Bitmap, p: int) -> memoryview:
    lo, hi = _span(p)
    return memoryview(bits.data)[lo:hi]


def _or_bytes(*pages: bytes | bytearray | memoryview) -> bytes:
    """Bitwise OR of equal-length pages."""
    v = 0
    for page in pages:
        v |= int.from_bytes(page, "little")
    return v.to_bytes(PAGE_BYTES, "little")


def _or_into(dst: Bitmap, src: Bitmap) -> None:
    """dst |= src (same size), in place, one page at a time; only pages where ``src`` has bits are touched."""
    for p in range(len(src) // PAGE_BYTES):
        if _holds(src, p):
            dst.put_bytes(p * PAGE_BYTES, _or_bytes(_page(dst, p), _page(src, p)))


def _popcount(bits: Bitmap | None) -> int:
    """Set bits, counted in windows (``Bitmap.count`` builds one int as big as the set)."""
    if bits is None:
        return 0
    mv = memoryview(bits.data)
    return sum(int.from_bytes(mv[i : i + _COUNT_WINDOW], "little").bit_count()
               for i in range(0, len(mv), _COUNT_WINDOW))


def _by_page(chunks: Iterable[int]) -> dict[int, list[int]]:
    """Chunk numbers grouped by the bitmap page holding them, pages ascending."""
    out: dict[int, list[int]] = {}
    for c in chunks:
        out.setdefault(c // PAGE_BITS, []).append(c)
    return dict(sorted(out.items()))


def _page_with(bits: Bitmap | None, p: int, chunks: Iterable[int], *, value: bool) -> bytes:
    """What page ``p`` of ``bits`` (all zero for None) holds with ``chunks`` (all in that page) set (``value``) or
    cleared. ``bits`` itself is not changed: it changes once the page is durable."""
    page = Bitmap(PAGE_BYTES) if bits is None else Bitmap.from_bytes(_page(bits, p))
    base = p * PAGE_BITS
    if value:
        page.set_all(c - base for c in chunks)
    else:
        page.clear_all(c - base for c in chunks)
    return bytes(page.data)


@dataclass
class _Region:
    """In-memory state of one region (a node slot or the frozen set)."""

    index: int
    hdr: SlotHeader
    page_seq: list[int]
    page_copy: list[int]  # copy holding the current best version (-1: none yet)
    # Loaded lazily. The owner's slot and the frozen set stay in memory while attached; any other region's are
    # dropped when it is cleared (all zero then: loading it again reads nothing).
    bits: Bitmap | None = None
    corrupt_pages: list[int] = field(default_factory=list)
    corrupt_header: bool = False


@dataclass(frozen=True)
class EraRegion:
    """Where dm-era's metadata lives (v3): ``extents`` are (physical byte offset, length) on ``device``, in the
    region's logical order, contiguous pieces merged; they cover exactly ``size`` bytes. ``device`` holds the
    record area: the data disk (tail, file) or the record disk (external); '' when the record was opened on a
    bare device (tests)."""

    device: str
    extents: list[tuple[int, int]]
    size: int


@dataclass
class RecordStats:
    marks: int = 0  # mark() calls
    marks_fast: int = 0  # calls satisfied from memory, no I/O
    first_touch_chunks: int = 0  # chunks newly made durable
    commits: int = 0  # group commits (one sync each for marks)
    metadata_syncs: int = 0  # every sync of the record device
    metadata_writes: int = 0  # blocks written
    fence_checks: int = 0


class Record:
    """An opened record. Use :meth:`load` to read it; :meth:`attach` to become its owner (single writer)."""

    def __init__(self, area: BlockDev, header: RecordHeader, *, clock: Callable[[], int] = time.time_ns) -> None:
        self.area = area
        self.header = header
        self.geo = Geometry(header.nslots, header.pages_per_slot, header.nrepos)
        self.clock = clock
        # Reads the data disk's file-system markers (set by the placement that opened the disk; None: unknown,
        # e.g. a record opened on its own in tests). Used by v2 records only (docs/format.md "File-system
        # markers").
        self.fs_probe: FsProbe | None = None
        self.fs_check: dict[str, Any] = {}  # what the last attach's marker comparison found
        # Where the record was found (set by baton.record.placement; '' for a record opened on its own): the
        # device holding the record area, the data disk, and the placement as `--record` spells it.
        self.device = ""
        self.disk = ""
        self.spec = ""
        self.backup_repo: _Region | None = None  # v2: the repository region of the running backup
        self.evicted: str = ""  # v2: the repository whose region the last allocation took over
        self.stats = RecordStats()
        self.regions: list[_Region] = []
        self.notes: list[str] = []  # what was found damaged or repaired, for status and backup reasons
        self.owner_region: int | None = None
        self.attached = False
        self.suspect = False  # damage seen that may have hidden marks: the next backup must be full
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: set[int] = set()
        self._committing = False
        self._broken: BaseException | None = None

    # ---------------------------------------------------------------------------------------------- reading

    @classmethod
    def read_header(cls, area: BlockDev, *, record_offset: int | None = None) -> RecordHeader:
        """The valid header copy with the highest seq. Raises RecordNotFound (both blank/foreign),
        RecordVersionError, or RecordCorrupt (both copies damaged: a reset is needed)."""
        return cls.read_header_ex(area, record_offset=record_offset)[0]

    @classmethod
    def read_header_ex(cls, area: BlockDev, *, record_offset: int | None = None
                       ) -> tuple[RecordHeader, list[str]]:
        """Like read_header, also returning descriptions of a damaged (not blank) other copy. The header fits
        one sector, so a damaged copy is never a torn write: it may have been the newer one."""
        got = pick_newest(
            split_blocks(area.pread(0, 2 * BLOCK), 2, BLOCK),
            lambda copy, raw: RecordHeader.unpack(raw, copy=copy, record_offset=record_offset),
            seq=lambda h: h.seq)
        errors = got.problems
        if got.best is not None:
            return got.best, [str(e) for e in errors if not isinstance(e, BadMagic)]
        if got.any_newer_version:
            raise RecordVersionError("; ".join(str(e) for e in errors),
                                     hint="upgrade Baton, or re-initialise the disk with `baton init --force`")
        if got.all_foreign:
            raise RecordNotFound("no Baton record here: " + "; ".join(str(e) for e in errors))
        raise RecordCorrupt(
            "both copies of the record header are damaged (" + "; ".join(str(e) for e in errors) + ")",
            hint="the change history cannot be trusted; reset the record with `baton init --reset DISK`; "
            "the next backup will then be full (reason: record reset). The data on the disk is not affected.",
        )

    @classmethod
    def load(cls, area: BlockDev, *, record_offset: int | None = None,
             clock: Callable[[], int] = time.time_ns) -> Record:
        """Read the header and every region's slot header (not the bitmaps)."""
        hdr, damaged = cls.read_header_ex(area, record_offset=record_offset)
        rec = cls(area, hdr, clock=clock)
        for d in damaged:
            rec.notes.append(f"{d}: the other copy is used; the next backup will be full")
            rec.suspect = True
        for r in range(rec.geo.nregions):
            rec.regions.append(rec._load_region_header(r))
        return rec

    def _load_region_header(self, r: int) -> _Region:
        h = self.header
        got = pick_newest(
            split_blocks(self.area.pread(self.geo.slot_header_block(r, 0) * BLOCK, 2 * BLOCK), 2, BLOCK),
            lambda copy, raw: SlotHeader.unpack(raw, region=r, copy=copy, disk_uuid=h.disk_uuid),
            seq=lambda s: s.seq)
        best = got.best
        errs = [str(e) for e in got.problems]
        one_sector = slot_fixed_size(h.version) + (self.geo.pages_per_slot + 7) // 8 + 4 <= SECTOR
        if best is not None and got.problems and one_sector and not any(isinstance(e, Blank) for e in got.problems):
            # A one-sector structure cannot be torn: the damaged copy may have been the newer one.
            self.notes.append(f"region {r}: {'; '.join(errs)}; the next backup will be full")
            self.suspect = True
        kind = self.geo.region_kind(r)
        npages = self.geo.pages_per_slot
        if best is None:
            # Unknown contents: the whole region counts as dirty (never under-report), and says so.
            self.notes.append(f"region {r} slot header unreadable ({'; '.join(errs)}): whole disk marked dirty")
            full = bytes([0xFF]) * ((npages + 7) // 8)
            reg = _Region(r, SlotHeader(region=r, kind=kind, disk_uuid=h.disk_uuid, npages=npages, seq=0,
                                        copy=1, generation=int.from_bytes(os.urandom(4), "little") >> 1 or 1,
                                        page_map=full, version=h.version),
                          [0] * npages, [-1] * npages, corrupt_header=True)
            return reg
        return _Region(r, best, [0] * npages, [-1] * npages)

    def _load_bits(self, reg: _Region) -> Bitmap:
        """Read every in-use page of a region. A page with no valid copy marks its whole range dirty."""
        if reg.bits is not None:
            return reg.bits
        npages = self.geo.pages_per_slot
        bits = Bitmap(npages * PAGE_BYTES)
        pm = Bitmap.from_bytes(reg.hdr.page_map)
        for p in range(npages):
            if not pm.test(p):
                continue
            if reg.corrupt_header:
                bits.put_bytes(p * PAGE_BYTES, b"\xff" * PAGE_BYTES)
                continue
            raw = self.area.pread(self.geo.page_block(reg.index, p, 0) * BLOCK, 2 * BLOCK)
            copies = [parse_page(raw[c * BLOCK : (c + 1) * BLOCK], region=reg.index, page=p, copy=c,
                                 disk_uuid=self.header.disk_uuid, generation=reg.hdr.generation) for c in (0, 1)]
            page_bits, seq, copy, problem = self._resolve_page(copies)
            bits.put_bytes(p * PAGE_BYTES, page_bits)
            reg.page_seq[p] = seq
            reg.page_copy[p] = copy
            if problem:
                reg.corrupt_pages.append(p)
                self.notes.append(f"bitmap page {p} of region {reg.index}: {problem}")
        bits.trim(self.header.nchunks)
        reg.bits = bits
        return bits

    def _resolve_page(self, copies: list[Any]) -> tuple[bytes, int, int, str]:
        """Decide a page's bits from its two copies (docs/format.md "Bitmap pages"). Returns (bits, counter of
        the newest copy, copy to treat as current, problem or ""). Never under-reports: a damaged sector that may
        have been newest turns its whole range dirty; a mapped page with no usable copy turns all dirty."""
        ones = b"\xff" * PAGE_BYTES
        present = sorted((c for c in copies if c.seq is not None), key=lambda c: c.seq, reverse=True)
        if not present:
            if any(c.damaged for c in copies):
                return ones, 0, -1, "no usable copy: its whole range is marked dirty"
            return ones, 0, -1, "mapped but never written: its whole range is marked dirty"
        newest = present[0]
        older = present[1] if len(present) > 1 else None
        counter = (newest.seq or 0) & 0xFFFFFFFF
        if newest.complete:
            return newest.bits, counter, newest.copy, ""
        if not newest.damaged:
            # Torn write: the newest version never completed, so it was never acknowledged.
            if older is not None and older.complete:
                return older.bits, counter, newest.copy, ""
            return ones, counter, newest.copy, "torn with no complete older copy: whole range marked dirty"
        base = Bitmap.from_bytes(older.bits if older is not None and older.complete else bytes(PAGE_BYTES))
        valid = Bitmap(PAGE_BYTES)  # the bits held by the valid sectors of the newest copy
        for i, sseq in enumerate(newest.seqs):
            if sseq is not None:
                lo, hi = sector_bit_range(i)
                valid.put_bytes(lo, newest.bits[lo:hi])
        base |= valid
        for i in newest.damaged:
            lo, hi = sector_bit_range(i)
            base.put_bytes(lo, b"\xff" * (hi - lo))
        return bytes(base.data), counter, newest.copy, (
            f"copy {newest.copy} damaged in sector(s) {list(newest.damaged)}: their chunks are marked dirty")

    # Reads that may load regions lazily take the lock: a status request in a daemon must never load (and
    # assign) a region's bits while a commit writes that region, or it could put back an older set.

    def dirty_bits(self) -> Bitmap:
        """Union of every node slot and the frozen set: the chunks changed since the last backup (to any
        repository). A backup to repository R reads this plus R's owed set (:meth:`repo_dirty_bits`)."""
        with self._lock:
            return self._dirty_bits()

    def _dirty_bits(self) -> Bitmap:
        out = Bitmap(self.geo.pages_per_slot * PAGE_BYTES)
        for bits in self._dirty_sets():
            _or_into(out, bits)
        return out

    def _dirty_sets(self) -> list[Bitmap]:
        """The bits of every node slot and the frozen set that may hold any (loading them)."""
        return [self._load_bits(reg) for reg in self.regions[: self.geo.frozen_region + 1]
                if any(reg.hdr.page_map) or reg.corrupt_header]

    def _dirty_count(self) -> int:
        """``_dirty_bits().count()``, without building the union (page by page)."""
        sets = self._dirty_sets()
        if len(sets) == 1:
            return _popcount(sets[0])
        return sum(int.from_bytes(_or_bytes(*(_page(b, p) for b in sets)), "little").bit_count()
                   for p in range(self.geo.pages_per_slot) if any(_holds(b, p) for b in sets))

    def _holds_bits(self, reg: _Region) -> bool:
        """The region may hold set bits (loaded and not all zero; or not loaded and some page in use)."""
        if reg.bits is not None:
            return _nonzero(reg.bits.data)
        return reg.corrupt_header or any(reg.hdr.page_map)

    def _region_count(self, reg: _Region) -> int:
        """Set bits of a region, loading it only when a page of it is in use."""
        return _popcount(self._load_bits(reg)) if self._holds_bits(reg) else 0

    def history(self) -> list[HistoryEntry]:
        """Valid history entries, oldest first (damaged ring entries are skipped and noted)."""
        with self._lock:
            return self._history()

    def _history(self) -> list[HistoryEntry]:
        raw = self.area.pread(self.geo.history_offset(0), HISTORY_ENTRIES * HISTORY_ENTRY_SIZE)
        out = []
        for i in range(HISTORY_ENTRIES):
            chunk = raw[i * HISTORY_ENTRY_SIZE : (i + 1) * HISTORY_ENTRY_SIZE]
            if not any(chunk):
                continue
            try:
                out.append(HistoryEntry.unpack(chunk, slot=i))
            except FormatError as e:
                self.notes.append(f"history entry {i} unreadable: {e.reason}")
        return sorted(out, key=lambda e: e.seq)

    def status(self) -> dict[str, Any]:
        """Facts about the record (no writes; the daemon's status asks its live record). Keys documented in
        docs/cli.md."""
        with self._lock:
            return self._status()

    def _status(self) -> dict[str, Any]:
        h = self.header
        dirty = self._dirty_count()
        hist = self._history()
        last = hist[-1] if hist else None
        frozen = self.regions[self.geo.frozen_region]
        return {
            "placement": PLACEMENT_NAMES[h.placement],
            "chunk_size": h.chunk_size,
            "disk_uuid": h.disk_uuid,
            "fs_uuid": h.fs_uuid or None,
            "disk_size": h.disk_size,
            "data_size": h.data_size,
            "record_size": h.record_size,
            "chunks": h.nchunks,
            "owner": h.owner or None,
            "epoch": h.epoch,
            "clean": h.clean,
            "reset": bool(h.flags & FLAG_RESET),
            "suspect": bool(h.flags & FLAG_SUSPECT) or self.suspect,
            "dirty_chunks": dirty,
            "dirty_bytes": dirty * h.chunk_size,
            "backup_in_progress": frozen.hdr.backup_id or None,
            "lineage": h.lineage,
            "last_backup": (
                {"snapshot": h.last_backup or None, "seq": h.backup_seq}
                | ({"node": last.node, "mode": last.mode, "reason": last.reason, "result": last.result,
                    "end": last.end_ns / 1e9, "duration_s": round(last.duration_s, 3),
                    "bytes_read": last.bytes_read, "bytes_stored": last.bytes_stored} if last else {})
            ) if h.last_backup or last else None,
            "slots": [
                {"region": r.index, "kind": {REGION_NODE: "node", REGION_FROZEN: "frozen"}.get(
                    self.geo.region_kind(r.index), "repo"),
                 "node": r.hdr.node or None, "generation": r.hdr.generation, "epoch": r.hdr.epoch,
                 "pages_in_use": Bitmap.from_bytes(r.hdr.page_map).count()}
                for r in self.regions
            ],
            "problems": list(self.notes),
            "format_version": h.version,
            "written_while_not_attached": bool(h.flags & FLAG_UNTRACKED),
            "repos": [
                {"region": r.index, "repo_id": r.hdr.repo_id or None, "last_backup": r.hdr.last_backup or None,
                 "lineage": r.hdr.lineage or None, "used_seq": r.hdr.used_seq,
                 "owed_chunks": self._region_count(r) if r.hdr.repo_id else 0,
                 "full_pending": [n for f, n in ((FLAG_RESET, "reset"), (FLAG_SUSPECT, "suspect"),
                                                 (FLAG_UNTRACKED, "untracked")) if r.hdr.repo_flags & f],
                 "unreadable": r.corrupt_header}
                for r in self.repo_regions()
            ],
            "bypass_check": self.compare_markers(),
            # v3: the era region (dm-era's metadata), the last owner's frontend, why the next backup is full
            "era": {"offset": h.era_offset, "size": h.era_size, "folded": h.era_folded,
                    "pending": bool(h.flags & FLAG_ERA_PENDING)} if h.version >= 3 and h.era_size else None,
            "owner_frontend": h.frontend or None,
            "distrusted": (h.distrust_reason or "distrusted") if h.flags & FLAG_DISTRUSTED else None,
        }

    # ---------------------------------------------------------------------------------------------- writing

    def _write_header(self, new: RecordHeader) -> None:
        copy = 1 - self.header.copy
        new = replace(new, seq=self.header.seq + 1, copy=copy, updated_ns=self.clock())
        self.area.pwrite(copy * BLOCK, new.pack())
        self.stats.metadata_writes += 1
        self.header = new

    def _write_slot_header(self, reg: _Region, **changes: Any) -> None:
        copy = 1 - reg.hdr.copy
        # The record's version (after `init --upgrade` a v2 slot header is rewritten as v3: the same layout).
        hdr = replace(reg.hdr, seq=reg.hdr.seq + 1, copy=copy, epoch=self.header.epoch, version=self.header.version,
                      **changes)
        self.area.pwrite(self.geo.slot_header_block(reg.index, copy) * BLOCK, hdr.pack())
        self.stats.metadata_writes += 1
        reg.hdr = hdr
        reg.corrupt_header = False

    def _write_page(self, reg: _Region, p: int, page_bits: bytes) -> None:
        gen = (reg.hdr.generation & 0xFFFFFFFF) << 32
        if reg.page_copy[p] < 0:
            # First write of this page in this generation: write both copies (copy 1 with counter 0), so the
            # other copy is never blank. A torn later write then leaves intact sectors of two known versions
            # (recognisably torn), never blank sectors that would look like damage.
            spare = pack_page(region=reg.index, page=p, copy=1, seq=gen, epoch=self.header.epoch,
                              disk_uuid=self.header.disk_uuid, bits=page_bits, version=self.header.version)
            self.area.pwrite(self.geo.page_block(reg.index, p, 1) * BLOCK, spare)
            self.stats.metadata_writes += 1
            reg.page_copy[p] = 1
            reg.page_seq[p] = 0
        copy = 1 - reg.page_copy[p]
        counter = reg.page_seq[p] + 1
        block = pack_page(region=reg.index, page=p, copy=copy, seq=gen | counter, epoch=self.header.epoch,
                          disk_uuid=self.header.disk_uuid, bits=page_bits, version=self.header.version)
        self.area.pwrite(self.geo.page_block(reg.index, p, copy) * BLOCK, block)
        self.stats.metadata_writes += 1
        reg.page_seq[p] = counter
        reg.page_copy[p] = copy

    def _sync(self) -> None:
        self.area.sync()
        self.stats.metadata_syncs += 1

    def _persist_region(self, reg: _Region, bits: Bitmap, pages: Iterable[int] | None = None,
                        **hdr_changes: Any) -> None:
        """Write ``pages`` (default: all pages that have bits) of ``bits`` into ``reg`` (see
        :meth:`_persist_pages`)."""
        todo = range(self.geo.pages_per_slot) if pages is None else sorted(set(pages))
        self._persist_pages(reg, ((p, bytes(_page(bits, p))) for p in todo), **hdr_changes)

    def _persist_pages(self, reg: _Region, pages: Iterable[tuple[int, bytes]], **hdr_changes: Any) -> None:
        """Write each (page number, the page's new bits) of ``pages`` (ascending) that is in use or has bits into
        ``reg`` and, if the page map or anything else changed, its slot header. No final sync, and ``reg.bits``
        is left alone: callers change it only once the writes are durable. ``pages`` may be a generator: one
        page's bits are built at a time, never a copy of the region."""
        # Rules (docs/format.md "Bitmap pages"): a page-map bit is never cleared within a generation (so no
        # valid same-generation copy ever hides outside the map), and a page enters the map only after one valid
        # copy of it is durable (so a torn first write can never leave a mapped page with no valid copy).
        npages = self.geo.pages_per_slot
        pm = Bitmap.from_bytes(reg.hdr.page_map.ljust((npages + 7) // 8, b"\0"))
        entering = []
        for p, page_bits in pages:
            mapped = pm.test(p)
            if mapped or _nonzero(page_bits):
                self._write_page(reg, p, page_bits)
                if not mapped:
                    entering.append(p)
                    pm.set(p)
        if entering:
            self._sync()
        if entering or hdr_changes:
            self._write_slot_header(reg, page_map=bytes(pm.data), **hdr_changes)

    def _clear_region(self, reg: _Region, **hdr_changes: Any) -> None:
        """Empty a region: bump its generation (stale pages become invalid) and clear its page map. No sync.
        The owner's slot and the frozen set keep their set in memory, zeroed in place (no new one is
        allocated); any other region's bits are dropped (loaded again, with no I/O, if asked for)."""
        npages = self.geo.pages_per_slot
        self._write_slot_header(reg, generation=reg.hdr.generation + 1, page_map=bytes((npages + 7) // 8),
                                **hdr_changes)
        reg.page_seq = [0] * npages
        reg.page_copy = [-1] * npages
        reg.corrupt_pages = []
        if reg.index not in (self.owner_region, self.geo.frozen_region):
            reg.bits = None
        else:
            if reg.bits is None:
                reg.bits = Bitmap(npages * PAGE_BYTES)
            else:
                for p in range(npages):  # zeroed in place, page by page (only pages holding bits are written)
                    if _holds(reg.bits, p):
                        reg.bits.put_bytes(p * PAGE_BYTES, _ZERO_PAGE)
            release_zero_pages(reg.bits.data)  # all zero: not resident until bits are set again

    def check_fence(self) -> None:
        """Raise Fenced (sticky) if the on-disk header carries a newer epoch than ours."""
        self.stats.fence_checks += 1
        try:
            cur = self.read_header(self.area, record_offset=self.header.record_offset)
        except RecordError as e:
            raise RecordCorrupt(f"record header became unreadable while attached: {e}") from e
        if cur.epoch != self.header.epoch or cur.owner != self.header.owner:
            err = Fenced(
                f"disk {self.header.disk_uuid} was taken over by {cur.owner or '?'} (epoch {cur.epoch}); "
                f"this node ({self.header.owner}, epoch {self.header.epoch}) stops writing",
                mine=self.header.epoch, on_disk=cur.epoch,
                hint="this node is no longer the owner; its I/O fails until it re-attaches",
            )
            self._broken = err
            raise err

    def heartbeat(self) -> None:
        """Re-read the header between commits, so a superseded owner notices even when all its writes hit
        chunks that are already marked (no commit, so no fence check). Raises Fenced (sticky)."""
        with self._cond:
            if self._broken is not None:
                raise self._broken
            if not self.attached or self._committing:
                return
            self.check_fence()

    def broken(self) -> BaseException | None:
        """The sticky error (Fenced, or the I/O error of a failed commit) once the record stopped accepting
        marks; every later I/O of the tracker fails with it."""
        return self._broken

    def _guard(self) -> None:
        if self._broken is not None:
            raise self._broken
        if not self.attached:
            raise RecordError("the record is not attached on this node (attach first)")

    # ---------------------------------------------------------------------------------------------- ownership

    # ------------------------------------------------------------------------------ file-system markers (v2)

    def read_markers(self) -> tuple[int, bytes] | None:
        """The data disk's file-system markers now, or None when this record cannot keep them (v1, no probe)
        or they cannot be read (noted)."""
        if self.header.version < 2 or self.fs_probe is None:
            return None
        try:
            return self.fs_probe()
        except (OSError, ValueError, RecordError) as e:
            self.notes.append(f"could not read the file-system markers: {e}")
            return None

    def marker_fields(self) -> dict[str, Any]:
        """Header fields saving the current markers (empty when there are none to save)."""
        cur = self.read_markers()
        if cur is None:
            return {}
        return {"fs_kind": cur[0], "fs_markers": cur[1], "markers_ns": self.clock()}

    def compare_markers(self) -> dict[str, Any]:
        """Were the markers saved at the last clean detach (or commit) changed since? No writes. Keys:
        ``checkable`` (an ext4/xfs is there, so bypassing writes can be noticed), ``fs``, ``changed`` (True,
        False, or None when not compared) and ``why`` (a sentence for status and backup reasons)."""
        h = self.header
        if h.version < 2:
            return {"checkable": False, "fs": None, "changed": None,
                    "why": "record format v1 keeps no file-system markers; writes that bypass Baton cannot be "
                    "noticed (re-initialise the record to get format v2)"}
        cur = self.read_markers()
        fs = FS_KIND_NAMES.get(cur[0]) if cur is not None else None
        checkable = cur is not None and cur[0] in (FS_EXT4, FS_XFS)
        out: dict[str, Any] = {"checkable": checkable, "fs": fs if checkable else None, "changed": None,
                               "saved_ns": h.markers_ns or None}
        if cur is None:
            out["why"] = "the data disk's file-system markers could not be read"
        elif not checkable and h.fs_kind in (FS_NONE, FS_UNSAVED):
            out["why"] = ("no ext4 or xfs on the disk: writes that bypass Baton (to the raw disk instead of "
                          "/dev/baton/NAME) cannot be noticed")
        elif h.fs_kind == FS_UNSAVED:
            out["why"] = "no markers saved yet (they are saved at detach and at every backup commit)"
        elif not h.clean:
            out["why"] = ("not compared: the record is attached, or its last owner did not detach (its writes "
                          "went through Baton and changed the markers)")
        else:
            changed = (cur[0], cur[1]) != (h.fs_kind, h.fs_markers)
            out["changed"] = changed
            if changed:
                before = describe_fs_markers(h.fs_kind, h.fs_markers)
                now = describe_fs_markers(cur[0], cur[1])
                diff = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v)
                out["why"] = f"written while not attached: the file system changed since the last detach ({diff})"
            else:
                out["why"] = f"{fs} markers unchanged since the last detach"
        return out

    def save_markers(self) -> None:
        """Store the current markers in the header (init, restore; the record is not attached)."""
        with self._cond:
            f = self.marker_fields()
            if f:
                self._write_header(replace(self.header, **f))
                self._sync()

    # ---------------------------------------------------------------------------------------------- attach

    def attach(self, node: str, frontend: str = "") -> None:
        """Take the record over for ``node``: epoch+1 durable, then OR every slot and the frozen set of an
        interrupted backup into this node's slot, then clear the others. Returns with the record attached.
        A v2 record detached cleanly is first checked for writes that bypassed Baton (file-system markers
        changed since the detach): if so, FLAG_UNTRACKED is set in the same durable header write. A v3 record
        keeps ``frontend`` ("", "fuse", "nbd" or "dm") in that write; FLAG_ERA_PENDING and ``era_folded`` stay
        as they are (the caller folds or distrusts what a dm owner left: docs/format.md 1.8)."""
        if frontend not in FRONTEND_CODES:
            raise ValueError(f"unknown frontend {frontend!r} (one of {sorted(FRONTEND_CODES)})")
        with self._lock:
            h = self.header
            flags = (h.flags & ~FLAG_CLEAN) | (FLAG_SUSPECT if self.suspect or self.notes else 0)
            self.fs_check = self.compare_markers()
            if self.fs_check["changed"]:
                flags |= FLAG_UNTRACKED
                self.notes.append(self.fs_check["why"])
            self._write_header(replace(h, epoch=h.epoch + 1, owner=node, flags=flags,
                                       frontend=frontend if h.version >= 3 else h.frontend))
            self._sync()
            # Choose our slot: ours by name, else a free one, else region 0 (its bits are kept and merged).
            nodes = self.regions[: self.geo.nslots]
            mine = next((r for r in nodes if r.hdr.node == node), None)
            if mine is None:
                mine = next((r for r in nodes if not any(r.hdr.page_map) and not r.corrupt_header), nodes[0])
            bits = self._load_bits(mine)
            # Repository regions (v2) are per repository, not per node: a takeover leaves them as they are.
            others = [r for r in self.regions[: self.geo.frozen_region + 1]
                      if r is not mine and (any(r.hdr.page_map) or r.corrupt_header)]
            sets = [bits, *(self._load_bits(r) for r in others)]
            pages = range(self.geo.pages_per_slot)
            self._persist_pages(mine, ((p, _or_bytes(*(_page(b, p) for b in sets))) for p in pages), node=node)
            self._sync()
            for b in sets[1:]:
                _or_into(bits, b)  # the merge is durable: now in memory too
            for r in others:
                extra = {"backup_id": ""} if r.index == self.geo.frozen_region else {"node": ""}
                self._clear_region(r, **extra)
            if others:
                self._sync()
            frozen = self.regions[self.geo.frozen_region]
            if frozen.bits is None:
                frozen.bits = Bitmap(self.geo.pages_per_slot * PAGE_BYTES)
                release_zero_pages(frozen.bits.data)
            self.owner_region = mine.index
            self.attached = True

    def distrust(self, reason: str | None = None) -> None:
        """The record may miss writes: make the next backup (to every repository) full, durably. Without a
        reason (``attach --no-tracking``: writes are about to go unrecorded) FLAG_RESET is set and the backup says
        "record reset". With one (e.g. "era metadata failed its check: ..."), a v3 record sets FLAG_RESET |
        FLAG_DISTRUSTED and keeps ``reason`` in the header (128 bytes; a second reason is appended), so the next
        backup is full and states it, after a restart too; a v1/v2 record has no field for it and sets FLAG_RESET.
        A backup already running keeps its plan: a caller that distrusts during a backup's freeze must fail
        that backup (only a full backup's commit clears the flags: :meth:`commit_backup`)."""
        with self._cond:
            self._exclusive()
            self.check_fence()
            h = self.header
            if reason is None or h.version < 3:
                self._write_header(replace(h, flags=h.flags | FLAG_RESET))
            else:
                old = h.distrust_reason if h.flags & FLAG_DISTRUSTED else ""
                text = reason if not old or reason in old else f"{old}; {reason}"
                text = text.encode("utf-8")[:DISTRUST_REASON_MAX].decode("utf-8", "ignore")
                self._write_header(replace(h, flags=h.flags | FLAG_RESET | FLAG_DISTRUSTED, distrust_reason=text))
            self._sync()

    # ---------------------------------------------------------------------------------------------- dm-era (v3)

    @property
    def era_pending(self) -> bool:
        """FLAG_ERA_PENDING: a dm owner may have era-tracked writes not yet folded into the bitmaps. Whoever opens
        such a record (attach by any frontend, an offline backup) folds them through a loaded era target, or
        distrusts the record; it never trusts the bitmaps alone."""
        return bool(self.header.flags & FLAG_ERA_PENDING)

    def era_region(self) -> EraRegion | None:
        """Where dm-era's metadata lives on the record's device, or None when this record has no era region
        (v1, v2: see :func:`era_unsupported_reason`). File placement: mapped through the record file's
        extents. Raises RecordCorrupt when the header's region overlaps the record's other structures or
        leaves the area (a bug or damage; nothing is written)."""
        h = self.header
        if h.version < 3 or not h.era_size:
            return None
        if h.era_offset < self.geo.size or h.era_offset + h.era_size > h.record_size:
            end = h.era_offset + h.era_size
            raise RecordCorrupt(f"the record header places its era region at bytes {h.era_offset}..{end} of a "
                                f"{h.record_size}-byte area whose structures take {self.geo.size} bytes",
                                hint="re-create the record with `baton init --reset DISK` (the next backup is full)")
        return EraRegion(device=self.device or bottom_path(self.area),
                         extents=physical_extents(self.area, h.era_offset, h.era_size), size=h.era_size)

    def begin_era(self) -> None:
        """Before a dm owner loads the era target: FLAG_ERA_PENDING and frontend "dm", one durable, fence-checked
        header write. From here until a fold with ``pending=False`` every opener of the record folds or
        distrusts. Raises RecordError (with what to run) on a record without an era region."""
        with self._cond:
            self._exclusive()
            why = era_unsupported_reason(self)
            if why:
                raise RecordError(why)
            self.check_fence()
            self._write_header(replace(self.header, flags=self.header.flags | FLAG_ERA_PENDING, frontend="dm"))
            self._sync()

    def set_era_folded(self, era: int, *, pending: bool) -> None:
        """A fold is done: every write of an era < ``era`` is durably marked in this owner's slot (the caller
        ``mark``ed them first). One durable, fence-checked header write of ``era_folded`` and FLAG_ERA_PENDING
        (clear it only when no write can reach the era target any more: a clean dm detach). ``era`` may be lower
        than before only after the era metadata was re-created; then :meth:`distrust` first, so that a crash in
        between leaves the record distrusted, never trusting a fresh metadata's short history."""
        if era < 0:
            raise ValueError(f"era {era} < 0")
        with self._cond:
            self._exclusive()
            if self.header.version < 3:
                raise RecordError(f"record format v{self.header.version} keeps no era (format v3 does)")
            self.check_fence()
            h = self.header
            flags = h.flags | FLAG_ERA_PENDING if pending else h.flags & ~FLAG_ERA_PENDING
            self._write_header(replace(h, era_folded=era, flags=flags))
            self._sync()

    def detach(self) -> None:
        """Wait for in-flight commits, then mark the record clean. The object cannot write afterwards."""
        with self._cond:
            while self._committing:
                self._cond.wait()
            self._guard()
            self.check_fence()
            self._write_header(replace(self.header, flags=self.header.flags | FLAG_CLEAN, **self.marker_fields()))
            self._sync()
            self.attached = False

    # ---------------------------------------------------------------------------------------------- marking

    def _mine(self) -> _Region:
        assert self.owner_region is not None
        return self.regions[self.owner_region]

    def is_marked(self, chunk: int) -> bool:
        """Durably marked in the owner's slot (no I/O)."""
        with self._lock:
            bits = self._mine().bits
            return bits is not None and bits.test(chunk)

    def is_dirty(self, chunk: int) -> bool:
        """Changed since the last backup as this owner knows it: durably marked in the owner's slot or in the
        frozen set of a running (or interrupted) backup. In memory, no I/O; under the record's lock, so it
        never sees a set half replaced by a commit, freeze or checkpoint."""
        with self._lock:
            mine = self._mine().bits if self.owner_region is not None else None
            frozen = self.regions[self.geo.frozen_region].bits
            return (mine is not None and mine.test(chunk)) or (frozen is not None and frozen.test(chunk))

    def mark(self, chunks: Iterable[int]) -> None:
        """Make ``chunks`` durably marked before returning. Concurrent callers share one metadata write + sync
        (group commit). Already-marked chunks cost no I/O. Raises Fenced (sticky) if a newer owner appeared, or
        the I/O error of the commit (sticky: the tracker must stop acknowledging writes)."""
        with self._cond:
            self.stats.marks += 1
            bits = self._mine().bits
            assert bits is not None
            need = bits.missing(chunks)
            if not need:
                if self._broken is not None:
                    raise self._broken
                self.stats.marks_fast += 1
                return
            self._guard()
            self._pending.update(need)
            while True:
                bits = self._mine().bits
                assert bits is not None
                if bits.all_set(need):
                    return
                if self._broken is not None:
                    raise self._broken
                if self._committing:
                    self._cond.wait()
                    continue
                batch = self._pending
                self._pending = set()
                self._committing = True
                try:
                    self._cond.release()
                    try:
                        self._commit_marks(batch)
                    finally:
                        self._cond.acquire()
                except BaseException as e:
                    if self._broken is None:
                        self._broken = e
                    raise
                finally:
                    self._committing = False
                    self._cond.notify_all()

    def _commit_marks(self, batch: set[int]) -> None:
        """Write and sync the pages of ``batch`` (called without the lock, by the one committer), then set the
        bits in memory under the lock: the in-memory set changes only once the marks are durable."""
        self.check_fence()
        reg = self._mine()
        bits = reg.bits
        assert bits is not None
        by_page = _by_page(batch)
        self._persist_pages(reg, ((p, _page_with(bits, p, cs, value=True)) for p, cs in by_page.items()))
        self._sync()
        with self._lock:
            bits.set_all(batch)
        self.stats.commits += 1
        self.stats.first_touch_chunks += len(batch)

    def _exclusive(self) -> None:
        """Enter exclusive record I/O: wait out any group commit. Caller holds the lock."""
        while self._committing:
            self._cond.wait()
        self._guard()

    # ------------------------------------------------------------------------------ repository regions (v2)

    def repo_regions(self) -> list[_Region]:
        return [self.regions[i] for i in self.geo.repo_regions]

    def find_repo(self, repo_id: str) -> _Region | None:
        """The region tracking repository ``repo_id`` (32 hex), or None (v1, unknown, or evicted)."""
        return next((r for r in self.repo_regions() if not r.corrupt_header and r.hdr.repo_id == repo_id), None)

    def repo_state(self, repo_id: str) -> dict[str, Any] | None:
        """What the record knows about repository ``repo_id``: ``last_backup``, ``lineage``, ``flags`` (the
        header's full-backup flags plus those owed to this repository). None when the record has no region for it.
        A v2 record with no region in use yet (fresh, or rewritten by a restore) continues from the header's
        ``last_backup`` for every repository: no backup has cleared a bit since."""
        h = self.header
        if not self.geo.nrepos:
            return None
        reg = self.find_repo(repo_id)
        if reg is None:
            if h.last_backup and not any(r.hdr.repo_id or r.corrupt_header for r in self.repo_regions()):
                return {"last_backup": h.last_backup, "lineage": h.lineage, "flags": h.flags, "region": None}
            return None
        return {"last_backup": reg.hdr.last_backup, "lineage": reg.hdr.lineage,
                "flags": h.flags | reg.hdr.repo_flags, "region": reg.index}

    def repo_dirty_bits(self, repo_id: str) -> Bitmap:
        """The chunks a backup to ``repo_id`` must read: node slots, the frozen set and the repository's owed set.
        For a repository the record does not track this is every chunk (its next backup is full)."""
        with self._lock:
            return self._repo_dirty_bits(repo_id)

    def _repo_dirty_bits(self, repo_id: str) -> Bitmap:
        out = self._dirty_bits()
        if not self.geo.nrepos:
            return out
        reg = self.find_repo(repo_id)
        if reg is None:
            return Bitmap(len(out), fill=True) if self.repo_state(repo_id) is None else out
        out |= self._load_bits(reg)
        out.trim(self.header.nchunks)
        return out

    def use_repo(self, repo_id: str | None) -> None:
        """The next backup (freeze .. commit/abort) goes to repository ``repo_id`` (32 hex). No I/O here; the
        region is taken at the freeze. v1 records and ``None`` keep the single-repository behaviour."""
        self._next_repo = repo_id if self.geo.nrepos else None

    def _take_repo_region(self, repo_id: str) -> _Region:
        """The region of ``repo_id``, allocating one durably if needed: a free region, else one whose header is
        unreadable, else the least recently used (its repository's next backup is then full, and says so).
        Caller holds the lock, attached."""
        reg = self.find_repo(repo_id)
        if reg is not None:
            return reg
        regs = self.repo_regions()
        free = [r for r in regs if not r.hdr.repo_id and not r.corrupt_header]
        broken = [r for r in regs if r.corrupt_header]
        reg = free[0] if free else broken[0] if broken else min(regs, key=lambda r: r.hdr.used_seq)
        self.evicted = reg.hdr.repo_id if not free and not broken else ""
        if self.evicted:
            self.notes.append(f"repository {self.evicted[:12]} was dropped from the record (least recently used) "
                              f"to track repository {repo_id[:12]}; its next backup is full")
        # Empty owed set, no last backup: this repository's first backup from here is full.
        self._clear_region(reg, repo_id=repo_id, last_backup="", lineage="", used_seq=self.header.seq,
                           repo_flags=0)
        self._sync()
        return reg

    def _owe_targets(self, skip: _Region | None) -> list[_Region]:
        """The tracked repository regions but ``skip``: the ones that must owe chunks leaving the record."""
        return [r for r in self.repo_regions() if r is not skip and r.hdr.repo_id and not r.corrupt_header]

    def _owe(self, owed: Callable[[int], bytes | memoryview], pages: list[int], skip: _Region | None,
             flags: int = 0) -> None:
        """OR the chunks ``owed(p)`` (the bits of page p, for each p in ``pages``) into the owed set of every
        tracked repository region but ``skip``, and add ``flags`` to their owed full-backup flags. Durable on
        return (write, then the caller may clear)."""
        targets = self._owe_targets(skip)
        if not targets:
            return
        staged = []
        for q in targets:
            qb = self._load_bits(q)
            new_flags = q.hdr.repo_flags | flags
            if pages or new_flags != q.hdr.repo_flags:
                self._persist_pages(q, ((p, _or_bytes(_page(qb, p), owed(p))) for p in pages),
                                    **({"repo_flags": new_flags} if new_flags != q.hdr.repo_flags else {}))
                staged.append(qb)
        if staged:
            self._sync()
            for qb in staged:  # durable: now in memory too
                for p in pages:
                    qb.put_bytes(p * PAGE_BYTES, _or_bytes(_page(qb, p), owed(p)))

    # ---------------------------------------------------------------------------------------------- backups

    def freeze(self, backup_id: str) -> Bitmap:
        """Backup start: the owner's set (plus any frozen set left by an interrupted backup on this node) becomes
        the frozen set, durably, then the owner's slot is cleared. Returns the frozen bits (a copy).
        The caller must have drained in-flight writes (the tracker's write barrier)."""
        with self._cond:
            self._exclusive()
            self.check_fence()
            mine = self._mine()
            frozen = self.regions[self.geo.frozen_region]
            assert mine.bits is not None and frozen.bits is not None
            repo_id = getattr(self, "_next_repo", None)
            self.backup_repo = self._take_repo_region(repo_id) if repo_id else None
            fbits, mbits = frozen.bits, mine.bits
            # Usually the frozen set is empty here (no interrupted backup on this node): the owner's set then
            # moves into it as it is, and the frozen set's all-zero bits become the owner's, so the freeze
            # allocates only the copy it returns.
            move = not _nonzero(fbits.data)
            pages = range(self.geo.pages_per_slot)
            self._persist_pages(frozen, ((p, bytes(_page(mbits, p)) if move else _or_bytes(_page(fbits, p),
                                                                                         _page(mbits, p)))
                                         for p in pages), backup_id=backup_id)
            self._sync()
            if move:
                frozen.bits, mine.bits = mbits, fbits
            else:
                _or_into(fbits, mbits)
            self._clear_region(mine)
            self._sync()
            out = frozen.bits.copy()
            rr = self.backup_repo
            if rr is not None and self._holds_bits(rr):
                # The chunks owed to this repository (stored into others since its last backup) are read too.
                _or_into(out, self._load_bits(rr))
                out.trim(self.header.nchunks)
            return out

    def frozen_bits(self) -> Bitmap:
        """A copy of the frozen set (empty when not loaded)."""
        with self._lock:
            b = self.regions[self.geo.frozen_region].bits
            return b.copy() if b is not None else Bitmap()

    def checkpoint(self, snapshot_id: str, chunks: Iterable[int]) -> None:
        """A batch of frozen chunks is stored in the repository and referenced by committed checkpoint
        ``snapshot_id``. First ``last_backup`` points at the checkpoint (durable), then the batch's bits leave
        the frozen set (durable). A crash between the two only over-reports."""
        with self._cond:
            self._exclusive()
            self.check_fence()
            by_page = _by_page(chunks)  # a batch spans a few pages: only those are built and written
            frozen = self.regions[self.geo.frozen_region]
            fbits = frozen.bits
            assert fbits is not None
            rr = self.backup_repo
            if rr is not None:
                # v2: the frozen chunks of the batch leave the record, so every other repository must owe them
                # first (durable); then this repository's region points at the checkpoint (durable).
                if self._owe_targets(rr):
                    leaving = {p: _page_with(None, p, [c for c in cs if fbits.test(c)], value=True)
                               for p, cs in by_page.items()}
                    self._owe(leaving.__getitem__, [p for p, b in leaving.items() if _nonzero(b)], rr)
                self._write_slot_header(rr, last_backup=snapshot_id, lineage=self.header.lineage,
                                        used_seq=self.header.seq)
            else:
                self._write_header(replace(self.header, last_backup=snapshot_id))
            self._sync()
            self._persist_pages(frozen, ((p, _page_with(fbits, p, cs, value=False)) for p, cs in by_page.items()))
            # This repository's owed set: only when it holds bits (an empty one, the usual case, stays unloaded).
            rbits = self._load_bits(rr) if rr is not None and self._holds_bits(rr) else None
            if rr is not None and rbits is not None:
                self._persist_pages(rr, ((p, _page_with(rbits, p, cs, value=False)) for p, cs in by_page.items()))
            self._sync()
            for cs in by_page.values():  # durable: now in memory too
                fbits.clear_all(cs)
                if rbits is not None:
                    rbits.clear_all(cs)
            if by_page:
                # The frozen set empties batch by batch: its memory pages that are all zero now go back.
                lo, hi = min(by_page) * PAGE_BYTES, (max(by_page) + 1) * PAGE_BYTES
                release_zero_pages(fbits.data, lo, hi)
                if rbits is not None:
                    release_zero_pages(rbits.data, lo, hi)

    def abort_backup(self) -> None:
        """Merge the frozen set back into the owner's slot (durable), then clear it."""
        with self._cond:
            self._exclusive()
            self.check_fence()
            mine = self._mine()
            frozen = self.regions[self.geo.frozen_region]
            mbits, fbits = mine.bits, frozen.bits
            assert mbits is not None and fbits is not None
            if _nonzero(fbits.data):
                self._persist_pages(mine, ((p, _or_bytes(_page(mbits, p), _page(fbits, p)))
                                           for p in range(self.geo.pages_per_slot)))
                self._sync()
                _or_into(mbits, fbits)  # durable: now in memory too
            self._clear_region(frozen, backup_id="")
            self._sync()
            self.backup_repo = None  # its owed set is untouched: the next backup to it reads it again

    def commit_backup(self, entry: HistoryEntry) -> None:
        """The snapshot is committed in the repository: history entry + ``last_backup`` (durable), then the frozen
        set is cleared (durable)."""
        with self._cond:
            self._exclusive()
            self.check_fence()
            rr = self.backup_repo
            frozen = self.regions[self.geo.frozen_region]
            if rr is not None:
                # v2, write then clear: every other repository owes the frozen chunks, and the header's
                # full-backup flags (durable) -> this repository's region names the snapshot (durable) -> the
                # header clears the flags -> the frozen set and this repository's owed set are cleared.
                fbits = frozen.bits
                assert fbits is not None
                self._owe(lambda p: _page(fbits, p), [p for p in range(self.geo.pages_per_slot) if _holds(fbits, p)],
                          rr, self.header.flags & FULL_FLAGS)
                self._write_slot_header(rr, last_backup=entry.snapshot_id, lineage=self.header.lineage,
                                        used_seq=self.header.seq, repo_flags=0)
                self._sync()
            seq = self.header.backup_seq + 1
            slot = (seq - 1) % HISTORY_ENTRIES
            entry = replace(entry, seq=seq, slot=slot, epoch=self.header.epoch, lineage=self.header.lineage,
                            version=self.header.version)
            self.area.pwrite(self.geo.history_offset(slot), entry.pack())
            # Only a full backup clears the full-backup flags: it read every chunk. An incremental keeps them (a
            # flag set after its plan, e.g. a distrust during its freeze, still makes the next backup full).
            full = entry.mode == "full"
            flags = self.header.flags & ~FULL_FLAGS if full else self.header.flags
            owed = any(r.hdr.repo_flags & FLAG_DISTRUSTED for r in self.repo_regions() if r is not rr)
            reason = self.header.distrust_reason if flags & FLAG_DISTRUSTED or owed else ""
            self._write_header(replace(self.header, last_backup=entry.snapshot_id, backup_seq=seq, flags=flags,
                                       distrust_reason=reason, **self.marker_fields()))
            self._sync()
            if full:
                # The damage that made this record suspect is behind a committed full backup now (plan_backup
                # chose it because of the damage); the next backup may be incremental again.
                self.suspect = False
                self.notes.clear()
            self._clear_region(frozen, backup_id="")
            if rr is not None:
                self._clear_region(rr)  # generation + 1: its owed set is empty; repo_id and last_backup stay
            self._sync()
            self.backup_repo = None

    def statistics(self) -> dict[str, int]:
        s = self.stats
        return {"marks": s.marks, "marks_fast": s.marks_fast, "first_touch_chunks": s.first_touch_chunks,
                "commits": s.commits, "metadata_syncs": s.metadata_syncs, "metadata_writes": s.metadata_writes,
                "fence_checks": s.fence_checks}

    def owner_dirty_chunks(self) -> int:
        with self._lock:
            b = self._mine().bits if self.owner_region is not None else None
            return _popcount(b) + _popcount(self.regions[self.geo.frozen_region].bits)


# -------------------------------------------------------------------------------------------------- formatting


def format_record(area: BlockDev, header: RecordHeader, *, keep_history: bool = False) -> Record:
    """Write a fresh record (both header copies, every region's slot headers, an empty history ring) and sync.
    ``header`` must have its geometry fields set; seq/lineage are filled in here when empty."""
    geo = Geometry(header.nslots, header.pages_per_slot, header.nrepos)
    if header.nrepos and header.version < 2:
        raise ValueError("repository regions need record format v2")
    if geo.size > header.record_size:
        raise ValueError(f"record needs {geo.size} bytes, area has {header.record_size}")
    if header.version < 3 and (header.era_size or header.era_offset):
        raise ValueError("an era region needs record format v3")
    if header.era_size and (header.era_offset < geo.size or header.era_offset + header.era_size > header.record_size
                            or header.era_size < ERA_ZERO_BYTES):
        raise ValueError(f"era region {header.era_offset}+{header.era_size} does not fit after the record's "
                         f"{geo.size} bytes of structures in a {header.record_size}-byte area")
    now = time.time_ns()
    # A fresh record has fresh era metadata (its superblock is zeroed below): nothing to fold, no distrust.
    h = replace(header, lineage=header.lineage or str(uuid.uuid4()), created_ns=header.created_ns or now,
                updated_ns=now, flags=header.flags & ~(FLAG_ERA_PENDING | FLAG_DISTRUSTED) | FLAG_CLEAN,
                era_folded=0, distrust_reason="")
    # Page copies of an earlier record in the same area (a re-format, --reset, a restore over a file record)
    # must never count as current: generations start at a random 31-bit value, so an old copy's generation
    # matches only by a ~1 in 2^31 chance (and it must then also pass its checksums).
    start_gen = int.from_bytes(os.urandom(4), "little") >> 1 or 1
    if not keep_history:
        area.pwrite(geo.history_offset(0), bytes(HISTORY_ENTRIES * HISTORY_ENTRY_SIZE))
    for r in range(geo.nregions):
        kind = geo.region_kind(r)
        for copy in (0, 1):
            s = SlotHeader(region=r, kind=kind, disk_uuid=h.disk_uuid, npages=geo.pages_per_slot, seq=copy,
                           copy=copy, generation=start_gen, page_map=bytes((geo.pages_per_slot + 7) // 8),
                           version=h.version)
            area.pwrite(geo.slot_header_block(r, copy) * BLOCK, s.pack())
    if h.era_size:
        # dm-era formats fresh metadata over an all-zero superblock; the rest of the region is its own.
        area.pwrite(h.era_offset, bytes(ERA_ZERO_BYTES))
    # Header copies last: a crash while formatting leaves no valid header, so nothing half-made is trusted.
    area.sync()
    for copy in (0, 1):
        area.pwrite(copy * BLOCK, replace(h, copy=copy, seq=copy).pack())
    area.sync()
    return Record.load(area, record_offset=h.record_offset)


# -------------------------------------------------------------------------------------------- dm-era support


def era_room(record: Record) -> tuple[int, int] | None:
    """(era_offset, era_size) that an era region for this record's disk would take at the end of its record
    area as it is today (1 MiB aligned, at least :func:`era_region_size`, up to the area's end), or None when
    the area has no room for it."""
    h = record.header
    off = era_offset_at_end(h.record_size, record.geo.size, era_region_size(h.data_size, h.chunk_size))
    return None if off is None else (off, h.record_size - off)


def _mib(n: int) -> str:
    return f"{-(-n // ERA_ALIGN)} MiB"


def era_unsupported_reason(record: Record) -> str | None:
    """None when the dm frontend can use this record (it has an era region); else why not and what to run, as
    one message for the user. Per placement: a v2 record whose area has room is upgraded in place by
    ``baton init --upgrade`` (history and changes kept); a file record is re-created bigger by ``baton init
    --reset``; a record-disk slot too small needs a record disk with larger slots; a tail record cannot grow
    into the data area before it. fuse and nbd always work."""
    h = record.header
    if h.version >= 3 and h.era_size:
        return None
    disk = record.disk or "DISK"
    external = h.placement == PLACEMENT_EXTERNAL
    rec_opt = f" --record {record.spec}" if external and record.spec else " --record external:RECORD_DISK" if \
        external else ""
    other = "attach it with --frontend fuse or --frontend nbd, which need no era region"
    why = (f"record format v{h.version} has no era metadata region (the dm frontend keeps dm-era's metadata in "
           "the record area; format v3 has one)" if h.version < 3 else "this record has no era metadata region")
    need = era_region_size(h.data_size, h.chunk_size)
    if h.version >= 2 and era_room(record) is not None:
        return (f"{why}. Its record area has room for the {_mib(need)} region: run `baton init --upgrade{rec_opt} "
                f"{disk}` on a node where the disk is not attached, once every node runs a Baton that reads record "
                "format v3 (lineage, history and changed chunks are kept: the next backup stays incremental); or "
                f"{other}")
    placement = PLACEMENT_NAMES[h.placement]
    if placement == "file":
        return (f"{why}, and the record file has no room for the {_mib(need)} region. Re-create it bigger with "
                f"`baton init --reset {disk}` on a node where the disk is not attached (the file system needs "
                f"about {_mib(need + record.geo.size)} free; the next backup is full, reason \"record reset\"); or "
                f"{other}")
    if placement == "external":
        area = area_for_era(record.geo.size, need)
        if area <= h.record_size:
            return (f"{why}. Re-create it in its slot with `baton init --reset{rec_opt} {disk}` on a node where "
                    f"the disk is not attached (the next backup is full, reason \"record reset\"); or {other}")
        return (f"{why}, and its record-disk slot ({_mib(h.record_size)}) is too small for a format-v3 record of "
                f"this disk ({_mib(area)} with the era region). Format a record disk with larger slots (`baton init "
                f"RDISK --record-disk --slot-size {-(-area // ERA_ALIGN)}M`) and re-create the record there with "
                f"`baton init --force --record external:RDISK {disk}` (a new disk identity: the next backup is full); "
                f"or {other}")
    return (f"{why}, and a tail record cannot grow: the data area before it is in use. {other[0].upper()}"
            f"{other[1:]} (a disk initialised by this Baton gets a format-v3 tail record)")


def upgrade_for_era(record: Record) -> RecordHeader:
    """Give a v2 record (not attached) an era region in place and make it v3: the region's first
    ERA_ZERO_BYTES zeroed (durable), then one header write (durable) with version 3 and the region. Lineage,
    history, slots and flags stay, so the next backup stays incremental; structures written before keep version
    2 until rewritten (v2 and v3 slot headers and pages have the same layout). Returns the new header; a
    record that already has a region is left alone. Raises RecordError with :func:`era_unsupported_reason`
    when the area has no room (or the record is v1)."""
    with record._cond:
        if record.attached:
            raise RecordError("the record is attached on this node; detach it before upgrading it")
        h = record.header
        if h.version >= 3 and h.era_size:
            return h
        room = era_room(record)
        if h.version < 2 or room is None:
            raise RecordError(era_unsupported_reason(record) or "no era region can be added")
        off, size = room
        record.area.pwrite(off, bytes(ERA_ZERO_BYTES))
        record._sync()
        record._write_header(replace(h, version=3, era_offset=off, era_size=size, era_folded=0, frontend="",
                                     distrust_reason="", flags=h.flags & ~(FLAG_ERA_PENDING | FLAG_DISTRUSTED)))
        record._sync()
        return record.header
