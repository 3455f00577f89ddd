"""The chunk index: a few bytes of RAM per stored chunk, the entries in sorted files read with ``pread``.

A repository's chunk index maps a chunk id to where the chunk is stored (:class:`IndexEntry`). Held as a Python
dict it cost about 221 bytes per chunk (3.5 GiB per TiB of unique data at 64 KiB chunks). Here it is a small
log-structured merge tree of sorted **runs** plus a dict:

* a **run** is a file of fixed-size rows (id, pack number, offset, stored length, raw length, flags; 53 bytes)
  sorted by id, unlinked at creation under ``BATON_CACHE_DIR`` (default: the system's temporary directory).
  In RAM a run keeps only its **fences** (the first 8 id bytes of every block of ``BLOCK_ROWS`` rows: 0.125
  bytes a chunk) and a **Bloom filter** built from id bits 64..159 (ids are BLAKE3 output, already uniform; 8-10
  bits a chunk, 3 probes: 1.7-3.1 % false positives). A lookup probes the filter (no I/O when it says no: the common
  case for a backup's new chunks), else bisects the fences and reads one block (3.4 KiB) with ``os.pread``.
  ``pread`` rather than ``mmap``: a touched mapped page counts in the process's RSS until the kernel reclaims
  it, a ``pread`` copy is freed at once, so RSS stays at the stated figure;
* there are at most two runs: the **base**, and a **small** run (newer, wins over the base) that takes the
  overlay's entries until it holds more than 1/8 of the base, when both are merged into a new base. A merge of
  the small run costs O(its size), a merge into the base O(n), so each stored chunk is rewritten about
  ``len(base) / (16 * MERGE_MIN) + 8`` times over a repository's growth, sequentially;
* the **overlay** is a dict of entries added since the last merge (this process's backups, small catch-ups
  of other clients' index files), each held as its packed row (about 180 bytes with the dict); past
  ``MERGE_MIN`` (32768) entries it is frozen (lookups still see it) and merged into the runs in the background
  while a new one fills. An adder waits for a running merge only when the new one passes ``MERGE_MIN`` too, so
  the overlays hold at most ``2 * MERGE_MIN`` entries plus one ``update``'s batch: 6 MiB, 12 MiB at worst
  (``statistics()["merge_waits"]`` counts the waits; ``Repository.write_index_file`` waits holding the
  repository's lock, so lookups through ``Repository.has_chunk`` wait too);
* **staged** entries (``update(..., merge=False)``: a first load, or many index files at once) never go
  through a dict: their rows are partitioned by the first id byte into 256 buckets of one unlinked file, and
  become visible at the next :meth:`ChunkIndex.maybe_merge`, which moves them into the overlay if few, or merges
  them into the runs there and then;
* pack ids are numbered in one table per index (one entry per pack, 16 MiB of data each by default).

Every merge streams: the new entries (overlay snapshot, staged buckets) come out sorted bucket by bucket (a
bucket of more than ``SUB_ROWS`` rows is split again by the second id byte in memory), and a two-way merge with
the older run's rows read in order writes the new run sequentially. A later entry for an id wins, as a dict
update would: staged over the overlay, the overlay over the small run, the small run over the base.

Memory, at every point (n chunks; 64 KiB chunks, so n = 16.8 M per TiB of unique data):

* always: fences 0.125 B and Bloom filters 1-1.25 B a chunk (18-23 MiB per TiB), the pack table (about 150 B a
  pack, 0.3 B a chunk at 32 MiB packs, 0.6 at 16 MiB), the overlays (6-12 MiB, above);
* during a first load or merge, in addition: 256 bucket buffers of ``SPILL_FLUSH`` bytes (2 MiB), the segment
  lists (16 B per 8 KiB staged), one bucket's rows twice over when it is split (2 * 53 * n / 256 bytes: 7 MiB
  per TiB), one sub-bucket expanded into Python objects (at most ``SUB_ROWS`` rows, ~220 B each: 3.6 MiB), a few
  blocks of ``READ_ROWS`` rows (~0.4 MiB each), the older run's filter while the new one is built (1.25 B a
  chunk), the frozen overlay's sorted keys; and the caller's current index file, decoded
  (``Repository.read_index_file``: its bytes, its plaintext and a list of Python objects: about 2 MiB for a
  backup's file of 8192 entries, but 110 MiB of RSS measured for the 200 000 entries of a file that prune,
  rebuild-index or heal wrote, whatever the repository's size: a streaming decoder would remove it);
* measured (``python -m bench.indexmem``, RSS above the process's before the load): 2.8 B a chunk at the
  peak of a first load of 16.8 M entries, 3.5 B with 300 000 additions and their merges after it (60 MiB);
  7 and 19 B at 1 M entries, where the fixed parts weigh more. tests/unit/test_repo_chunkindex_memory.py checks
  the peaks of the load and of merges against 32 B a chunk.

The run files hold 53 bytes a chunk (848 MiB per TiB), twice that while a merge writes the new base: where the
temporary directory is a tmpfs they take that much of the host's memory (not this process's RSS), so point
``BATON_CACHE_DIR`` at a disk there. They are
derived state (STYLE 9): rebuilt from the repository's index files by a process that loads the index, unless
this node's chunk-index cache (:mod:`baton.repo.indexcache`) holds a valid copy: a save gives the runs names
there (``linkat`` of the ``O_TMPFILE`` files :func:`_tempfile` opens, a copy where that fails) with their fences
and filters, :meth:`ChunkIndex.snapshot` and :meth:`ChunkIndex.restore`; each run carries the BLAKE3 of its
bytes, computed as they are written. A merge that fails (the cache directory is full) leaves the index as it was and
its staged entries staged; a background one records the error (``statistics()["merge_failed"]``).

Threads: lookups take no lock (they read one immutable state: runs and filters; a file closes when the last
reader lets it go); additions, staging and the swaps around a merge take the index's own lock; one merge runs
at a time (a second waits), in the background for the overlay, in the caller's thread for staged entries
(:meth:`ChunkIndex.maybe_merge`, :meth:`ChunkIndex.merge`: merges the overlay's growth starts leave them
staged).
"""

from __future__ import annotations

import bisect
import os
import struct
import tempfile
import threading
from array import array
from collections.abc import Iterable, Iterator
from typing import IO, NamedTuple

import blake3

from baton.format.repo_index import IndexEntry

ROW = struct.Struct("<32sIQIIB")  # chunk id, pack number, offset, stored length, raw length, flags
_TAIL = struct.Struct("<IQIIB")   # a row without its id: how the overlay holds an entry (~180 bytes with the dict)
_PROBES = struct.Struct("<8xIII")                          # Bloom probes: id bytes 8..19 as three 32-bit words
_ROW_PROBES = struct.Struct(f"<8xIII{ROW.size - 20}x")     # the same, read straight from a row
_HIGH = b"\xff" * (ROW.size - 32)                           # id + _HIGH sorts after every row with that id
BLOCK_ROWS = 64          # rows per fence (one pread on a lookup: 3392 bytes)
READ_ROWS = 4096         # rows per sequential read of a run while merging (212 KiB)
SPILL_FLUSH = 8192       # bytes buffered per staging bucket before it is written
SUB_ROWS = 16384         # a staged bucket with more rows is split by the next id byte before it is sorted
MERGE_MIN = 32768        # overlay entries before a merge (~6 MiB)
BLOOM_BITS = 8           # at least this many filter bits per entry (3 probes: 3.1 % false positives at 8)
BLOOM_SPARE = 1.25       # a new filter has room for this many times its run's entries (10 bits each)
CACHE_DIR_ENV = "BATON_CACHE_DIR"


def _tempfile() -> IO[bytes]:
    """An unlinked file under ``BATON_CACHE_DIR`` (else the system's temporary directory). Opened with
    ``O_TMPFILE`` and without ``O_EXCL`` where the file system allows it, so that :mod:`baton.repo.indexcache`
    can give a finished run a name with ``linkat`` instead of copying it; else a file created and unlinked."""
    where = os.environ.get(CACHE_DIR_ENV) or None
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            fd = os.open(where or tempfile.gettempdir(), flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:  # no O_TMPFILE on this file system: below, the same place, created and unlinked
            pass
        else:
            return os.fdopen(fd, "w+b")
    return tempfile.TemporaryFile(dir=where, prefix="baton-index-")


def _split(data: bytes | bytearray) -> list[bytes]:
    s = ROW.size
    return [bytes(data[i:i + s]) for i in range(0, len(data), s)] if isinstance(data, bytearray) else \
        [data[i:i + s] for i in range(0, len(data), s)]


def _sort_unique(data: bytes | bytearray) -> list[bytes]:
    """The rows of ``data`` sorted by id, the last of several rows with one id winning."""
    rows = _split(data)
    last = {r[:32]: r for r in rows}
    if len(last) == len(rows):
        del last
        rows.sort()       # ids unique: sorting whole rows sorts by id
        return rows
    return sorted(last.values())


def _bloom_add(bits: bytearray, data: bytes, nbits: int) -> None:
    """Set the filter bits of every row in ``data``: bit ``word * nbits >> 32`` for each of three 32-bit words
    of the id (a multiply and a shift map a uniform word onto any filter size)."""
    for x, y, z in _ROW_PROBES.iter_unpack(data):
        a = x * nbits >> 32
        bits[a >> 3] |= 1 << (a & 7)
        a = y * nbits >> 32
        bits[a >> 3] |= 1 << (a & 7)
        a = z * nbits >> 32
        bits[a >> 3] |= 1 << (a & 7)


class _Run:
    """One immutable sorted run: its file, fences and filter. Replaced whole by a merge."""

    __slots__ = ("aux_digest", "bits", "count", "digest", "fd", "fences", "file", "nbits", "saved")

    def __init__(self, file: IO[bytes], count: int, fences: array[int], bits: bytearray, digest: bytes) -> None:
        self.file = file
        self.fd = file.fileno()
        self.count = count
        self.fences = fences
        self.bits = bits
        self.nbits = len(bits) * 8
        self.digest = digest            # BLAKE3 of the file's bytes (its rows), computed as they were written
        self.aux_digest: bytes | None = None   # of its fences and filter as the index cache stores them
        self.saved: str | None = None   # a name the index cache gave this run's file (baton.repo.indexcache)

    def find(self, cid: bytes) -> bytes | None:
        """The row of ``cid``, or None."""
        if len(cid) != 32:
            return None
        x, y, z = _PROBES.unpack_from(cid)
        bits, nbits = self.bits, self.nbits
        a, b, c = x * nbits >> 32, y * nbits >> 32, z * nbits >> 32
        if not (bits[a >> 3] >> (a & 7)) & (bits[b >> 3] >> (b & 7)) & (bits[c >> 3] >> (c & 7)) & 1:
            return None
        p = int.from_bytes(cid[:8], "big")
        f = self.fences
        lo = max(bisect.bisect_left(f, p) - 1, 0)     # rows with prefix p may start in the block before
        hi = bisect.bisect_right(f, p)
        if hi <= lo:
            return None
        size = BLOCK_ROWS * ROW.size
        data = os.pread(self.fd, (hi - lo) * size, lo * size)
        i = data.find(cid)
        while i >= 0 and i % ROW.size:
            i = data.find(cid, i + 1)
        return data[i:i + ROW.size] if i >= 0 else None

    def chunks(self) -> Iterator[list[bytes]]:
        """Every row in id order, ``READ_ROWS`` at a time."""
        step = READ_ROWS * ROW.size
        for off in range(0, self.count * ROW.size, step):
            yield _split(os.pread(self.fd, step, off))


class _Spill:
    """Staged rows, partitioned by the first id byte into 256 buckets of one unlinked file, in arrival order."""

    def __init__(self) -> None:
        self.file: IO[bytes] | None = None
        self.end = 0
        self.rows = 0
        self.bufs = [bytearray() for _ in range(256)]
        self.segs = [array("Q") for _ in range(256)]   # (offset, length) pairs

    def add(self, row: bytes) -> None:
        buf = self.bufs[row[0]]
        buf += row
        self.rows += 1
        if len(buf) >= SPILL_FLUSH:
            self._flush(row[0])

    def absorb(self, later: _Spill) -> None:
        """Append ``later``'s rows after this spill's own (a failed merge puts its staged rows back)."""
        for b in range(256):
            data = later.bucket(b)
            for i in range(0, len(data), ROW.size):
                self.add(data[i:i + ROW.size])
        later.close()

    def _flush(self, b: int) -> None:
        if self.file is None:
            self.file = _tempfile()
        buf = self.bufs[b]
        os.pwrite(self.file.fileno(), buf, self.end)
        self.segs[b].extend((self.end, len(buf)))
        self.end += len(buf)
        buf.clear()

    def bucket(self, b: int) -> bytes:
        segs = self.segs[b]
        parts = [os.pread(self.file.fileno(), segs[i + 1], segs[i]) for i in range(0, len(segs), 2)] \
            if self.file is not None else []
        parts.append(bytes(self.bufs[b]))
        return b"".join(parts)

    def chunks(self) -> Iterator[list[bytes]]:
        """Every staged row sorted by id, the last one staged for an id only, bucket by bucket."""
        s = ROW.size
        for b in range(256):
            data = self.bucket(b)
            if len(data) <= SUB_ROWS * s:
                if data:
                    yield _sort_unique(data)
                continue
            subs = [bytearray() for _ in range(256)]
            for i in range(0, len(data), s):
                subs[data[i + 1]] += data[i:i + s]
            del data
            for i, sub in enumerate(subs):
                if sub:
                    yield _sort_unique(sub)
                    subs[i] = bytearray()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _nonempty(chunks: Iterable[list[bytes]]) -> Iterator[list[bytes]]:
    return (c for c in chunks if c)


def _merge2(older: Iterable[list[bytes]], newer: Iterable[list[bytes]]) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """Two streams of sorted unique rows merged into one: (rows, the rows of them from ``newer``) per step.

    A row of ``newer`` replaces the row of ``older`` with its id. Each step takes the whole chunk whose last id
    is the smaller and the rows of the other stream up to that id, so at most two chunks are held."""
    old_it, new_it = _nonempty(older), _nonempty(newer)
    o, n = next(old_it, None), next(new_it, None)
    while o is not None and n is not None:
        if o[-1][:32] <= n[-1][:32]:
            j = bisect.bisect_right(n, o[-1][:32] + _HIGH)
            take, n = n[:j], n[j:]
            part = o
            o = next(old_it, None)
            if not n:
                n = next(new_it, None)
        else:
            j = bisect.bisect_right(o, n[-1][:32] + _HIGH)
            part, o = o[:j], o[j:]
            take = n
            n = next(new_it, None)
            if not o:
                o = next(old_it, None)
        if take:
            ids = {r[:32] for r in take}
            out = [r for r in part if r[:32] not in ids]
            out += take
            out.sort()
        else:
            out = part
        yield out, take
    while o is not None:
        yield o, []
        o = next(old_it, None)
    while n is not None:
        yield n, n
        n = next(new_it, None)


def _rows_only(pairs: Iterable[tuple[list[bytes], list[bytes]]]) -> Iterator[list[bytes]]:
    return (rows for rows, _new in pairs)


def _write_run(stream: Iterable[tuple[list[bytes], list[bytes]]], bound: int, inherit: _Run | None) -> _Run | None:
    """Write the merged rows of ``stream`` (at most ``bound``) as a new run. The filter of ``inherit`` (the
    older input) is copied and only the newer rows are added while it has ``BLOOM_BITS`` bits for each of
    ``bound`` entries; else a new one gets ``BLOOM_SPARE`` times that, so the next merges can reuse it."""
    reuse = inherit is not None and inherit.nbits >= BLOOM_BITS * bound
    if reuse and inherit is not None:
        bits, nbits = bytearray(inherit.bits), inherit.nbits
    else:
        nbits = max(1024, int(BLOOM_BITS * BLOOM_SPARE * bound) + 7 & ~7)
        bits = bytearray(nbits // 8)
    f = _tempfile()
    digest = blake3.blake3()
    try:
        fd = f.fileno()
        count = off = 0
        fences = array("Q")
        pending = bytearray()
        for rows, new in stream:
            if not rows:
                continue
            for i in range((-count) % BLOCK_ROWS, len(rows), BLOCK_ROWS):
                fences.append(int.from_bytes(rows[i][:8], "big"))
            count += len(rows)
            data = b"".join(rows)
            _bloom_add(bits, b"".join(new) if reuse else data, nbits)
            pending += data
            if len(pending) >= 1 << 18:
                digest.update(pending)
                off += os.pwrite(fd, pending, off)
                pending.clear()
        digest.update(pending)
        while pending:
            w = os.pwrite(fd, pending, off)
            off += w
            del pending[:w]
    except BaseException:
        f.close()
        raise
    if not count:
        f.close()
        return None
    return _Run(f, count, fences, bits, digest.digest())


class _State:
    """What lookups read: the base and the small run (either may be None). Immutable; swapped whole."""

    __slots__ = ("base", "length", "small")

    def __init__(self, base: _Run | None, small: _Run | None, length: int | None) -> None:
        self.base = base
        self.small = small
        self.length = length      # entries in the base and the small run together, when known

    def find(self, cid: bytes) -> bytes | None:
        if self.small is not None:
            row = self.small.find(cid)
            if row is not None:
                return row
        return self.base.find(cid) if self.base is not None else None

    def chunks(self) -> Iterator[list[bytes]]:
        if self.base is None:
            return self.small.chunks() if self.small is not None else iter(())
        if self.small is None:
            return self.base.chunks()
        return _rows_only(_merge2(self.base.chunks(), self.small.chunks()))

    def __len__(self) -> int:
        if self.length is None:
            self.length = sum(len(c) for c in self.chunks())
        return self.length


_EMPTY = _State(None, None, 0)


_PACK_NO = struct.Struct("<32xI17x")   # a row's pack number only


def overlay_of(rows: bytes, n_packs: int) -> dict[bytes, bytes]:
    """The overlay (id -> tail) of a snapshot's ``rows``, the last row of an id winning. ValueError if a row
    names a pack outside a table of ``n_packs``. Slices in C loops (``zip``, ``iter_unpack``): about half the
    time of a comprehension over whole rows."""
    s, n = ROW.size, len(rows)
    if n % s:
        raise ValueError(f"overlay rows: {n} bytes, not a multiple of {s}")
    overlay = dict(zip([rows[i:i + 32] for i in range(0, n, s)], [rows[i:i + s - 32] for i in range(32, n, s)],
                       strict=True))
    if n and max(_PACK_NO.iter_unpack(rows))[0] >= n_packs:
        raise ValueError("an overlay row names a pack outside the table")
    return overlay


class Snapshot(NamedTuple):
    """An index's content at one point (:meth:`ChunkIndex.snapshot`, :meth:`ChunkIndex.restore`)."""

    base: _Run | None
    small: _Run | None
    rows: bytes                   # the overlays' entries, ``ROW`` each (pack numbers index ``packs``)
    packs: tuple[bytes, ...]      # the pack table: pack id by number


class ChunkIndex:
    """A mapping chunk id -> IndexEntry (``get``, ``in``, ``[]``, ``[]=``, ``update``, ``len``, ``items``).

    Lookups may run on several threads while one thread adds (the writer's encode pool asks while the
    caller's thread adds entries): a merge freezes the overlay (lookups still see it), builds new runs, and then
    swaps them in with one assignment. Ids are 32 bytes (ValueError otherwise)."""

    def __init__(self, *, background: bool = True) -> None:
        self._state = _EMPTY
        self._overlay: dict[bytes, bytes] = {}        # id -> _TAIL row
        self._frozen: dict[bytes, bytes] | None = None  # the overlay a running merge is folding in
        self._staged: _Spill | None = None
        self._packs: list[bytes] = []
        self._pack_no: dict[bytes, int] = {}
        self._wlock = threading.Lock()     # additions, staging, the pack table and the swaps around a merge
        self._mlock = threading.Lock()     # one merge at a time
        self._merging: threading.Thread | None = None
        self._background = background
        self.merges = 0
        self.merge_waits = 0
        self.merge_error: Exception | None = None

    # ----- mapping ---------------------------------------------------------------------------------------------

    def _recent(self) -> dict[bytes, bytes]:
        """A copy of the frozen and live overlays (the live one wins)."""
        frozen = self._frozen
        out = dict(frozen) if frozen is not None else {}
        out.update(self._overlay)
        return out

    def __len__(self) -> int:
        st = self._state
        return len(st) + sum(1 for c in self._recent() if st.find(c) is None)

    def __contains__(self, cid: object) -> bool:
        if not isinstance(cid, bytes):
            return False
        if cid in self._overlay:
            return True
        frozen = self._frozen
        return (frozen is not None and cid in frozen) or self._state.find(cid) is not None

    def __getitem__(self, cid: bytes) -> IndexEntry:
        e = self.get(cid)
        if e is None:
            raise KeyError(cid)
        return e

    def get(self, cid: bytes, default: IndexEntry | None = None) -> IndexEntry | None:
        tail = self._overlay.get(cid)
        if tail is None:
            frozen = self._frozen
            if frozen is not None:
                tail = frozen.get(cid)
        if tail is not None:
            return self._entry(tail)
        row = self._state.find(cid)
        return self._entry(row[32:]) if row is not None else default

    def _entry(self, tail: bytes) -> IndexEntry:
        no, offset, stored, raw, flags = _TAIL.unpack(tail)
        return IndexEntry(self._packs[no], offset, stored, raw, flags)

    def _tail(self, cid: bytes, e: IndexEntry) -> bytes:
        """``e`` as the overlay holds it (caller holds ``_wlock``)."""
        if len(cid) != 32:
            raise ValueError(f"a chunk id is 32 bytes, not {len(cid)}")
        return _TAIL.pack(self._number(e.pack_id), e.offset, e.stored_length, e.raw_length, e.flags)

    def __setitem__(self, cid: bytes, entry: IndexEntry) -> None:
        with self._wlock:
            self._overlay[cid] = self._tail(cid, entry)
        self._maybe_merge()

    def update(self, pairs: Iterable[tuple[bytes, IndexEntry]], *, merge: bool = True) -> None:
        """Add many entries. ``merge=False`` (loading many index files) stages them instead: they are written
        to a file, not held in a dict, and become visible at the next :meth:`maybe_merge`, which the caller
        must call after the last batch (a failing one included)."""
        if merge:
            with self._wlock:
                overlay, tail = self._overlay, self._tail
                for cid, e in pairs:
                    overlay[cid] = tail(cid, e)
            self._maybe_merge()
            return
        with self._wlock:
            if self._staged is None:
                self._staged = _Spill()
            add, pack, number = self._staged.add, ROW.pack, self._number
            for cid, e in pairs:
                if len(cid) != 32:
                    raise ValueError(f"a chunk id is 32 bytes, not {len(cid)}")
                add(pack(cid, number(e.pack_id), e.offset, e.stored_length, e.raw_length, e.flags))

    def _number(self, pack_id: bytes) -> int:
        """The pack's number in this index's table (caller holds ``_wlock``)."""
        no = self._pack_no.get(pack_id)
        if no is None:
            no = self._pack_no[pack_id] = len(self._packs)
            self._packs.append(pack_id)
        return no

    def maybe_merge(self) -> None:
        """Make staged entries visible (into the overlay if few, else merged now, in this thread: OSError if the
        cache directory can't hold the runs, the entries then stay staged), then merge the overlay if due."""
        with self._wlock:
            staged = self._staged
            few = staged is not None and staged.rows + len(self._overlay) <= MERGE_MIN
            if staged is not None and few:
                self._staged = None
                for rows in staged.chunks():
                    for row in rows:
                        self._overlay[row[:32]] = row[32:]
                staged.close()
        if staged is not None and not few:
            self.merge()
        self._maybe_merge()

    def _maybe_merge(self) -> None:
        """Start a merge in a background thread when the overlay has grown past ``MERGE_MIN``: a merge into the
        base rewrites every row (seconds per million chunks in Python), and it must not sit in a backup's path.
        When it has grown past that again while a merge still runs, the adder waits for that merge: so the
        overlay, frozen and live, holds at most ``2 * MERGE_MIN`` entries plus one ``update``'s batch."""
        if len(self._overlay) <= MERGE_MIN:
            return
        if not self._background:
            self._merge(staged=False)
            return
        t = self._merging
        if t is not None and t.is_alive():
            self.merge_waits += 1
            t.join()
        with self._wlock:
            if self._merging is not None and self._merging.is_alive():
                return
            t = threading.Thread(target=self._merge_quietly, name="baton-index-merge", daemon=True)
            self._merging = t
        t.start()

    def _merge_quietly(self) -> None:
        try:
            self._merge(staged=False)
        except Exception as e:  # the index stays correct (runs + overlay); statistics() reports it
            self.merge_error = e

    def wait_merged(self) -> None:
        """Wait for a background merge to finish (tests, and before closing)."""
        t = self._merging
        if t is not None:
            t.join()

    def items(self) -> Iterator[tuple[bytes, IndexEntry]]:
        """Every (id, entry): the runs in id order, then overlay entries the runs lack or that replace theirs."""
        st = self._state
        recent = self._recent()
        for rows in st.chunks():
            for row in rows:
                cid = row[:32]
                if cid not in recent:
                    yield cid, self._entry(row[32:])
        for cid, tail in recent.items():
            yield cid, self._entry(tail)

    def __iter__(self) -> Iterator[bytes]:
        return (cid for cid, _e in self.items())

    # ----- runs ------------------------------------------------------------------------------------------------

    def merge(self) -> None:
        """Fold the overlay and the staged entries into the runs: into the small run, or, once that would
        hold more than 1/8 of the base, into a new base. OSError if the cache directory can't hold them (the
        index is then unchanged: the overlay's entries back in the overlay, staged entries still staged)."""
        self._merge(staged=True)

    def _merge(self, *, staged: bool) -> None:
        """:meth:`merge`; the merges the overlay's growth starts leave staged entries staged (``staged=False``),
        so those become visible only where the caller said, at :meth:`maybe_merge` or :meth:`merge`."""
        with self._mlock:
            with self._wlock:
                frozen, spill = self._overlay, self._staged if staged else None
                if not frozen and (spill is None or not spill.rows):
                    return
                # Frozen first, then a new overlay: a reader that misses in the new overlay finds the frozen one.
                self._frozen = frozen
                self._overlay = {}
                if spill is not None:
                    self._staged = None
                st = self._state
            try:
                new_state = self._merged(st, frozen, spill)
            except BaseException:
                with self._wlock:
                    frozen.update(self._overlay)    # newer entries win
                    self._overlay = frozen
                    self._frozen = None
                    if spill is not None:
                        if self._staged is not None:
                            spill.absorb(self._staged)
                        self._staged = spill
                raise
            if spill is not None:
                spill.close()
            with self._wlock:
                # The new runs first, then no frozen overlay: a reader that misses there finds the new runs.
                self._state = new_state
                self._frozen = None
                self.merges += 1

    @staticmethod
    def _merged(st: _State, frozen: dict[bytes, bytes], staged: _Spill | None) -> _State:
        keys = sorted(frozen)
        overlay_chunks = ([k + frozen[k] for k in keys[i:i + READ_ROWS]] for i in range(0, len(keys), READ_ROWS))
        new: Iterator[list[bytes]] = iter(overlay_chunks) if staged is None else \
            _rows_only(_merge2(overlay_chunks, staged.chunks()))
        n_new = len(keys) + (staged.rows if staged is not None else 0)
        n_base = st.base.count if st.base is not None else 0
        n_small = st.small.count if st.small is not None else 0
        if st.base is None or n_small + n_new > n_base // 8:
            newer = new if st.small is None else _rows_only(_merge2(st.small.chunks(), new))
            if st.base is None:
                base = _write_run(((rows, rows) for rows in newer), n_small + n_new, None)
            else:
                base = _write_run(_merge2(st.base.chunks(), newer), n_base + n_small + n_new, st.base)
            return _State(base, None, base.count if base is not None else 0)
        older: Iterable[list[bytes]] = st.small.chunks() if st.small is not None else ()
        small = _write_run(_merge2(older, new), n_small + n_new, st.small)
        return _State(st.base, small, None)

    # ----- the persistent cache (baton.repo.indexcache) --------------------------------------------------------

    def snapshot(self) -> Snapshot | None:
        """What the index holds now, for :mod:`baton.repo.indexcache` to save: the runs (immutable, shared, not
        copied), the overlays' entries as rows (the live overlay winning over a frozen one) and the pack table.
        None while entries are staged (not visible yet). Takes the index's lock for the copy of the overlays
        (at most ``2 * MERGE_MIN`` entries); a running merge is not waited for: its input is the frozen overlay,
        which is part of the copy, so the runs and the rows together hold every entry exactly as lookups see it."""
        with self._wlock:
            if self._staged is not None and self._staged.rows:
                return None
            recent = self._recent()
            rows = b"".join(cid + tail for cid, tail in recent.items())
            st = self._state
            return Snapshot(st.base, st.small, rows, tuple(self._packs))

    def restore(self, snap: Snapshot, overlay: dict[bytes, bytes] | None = None) -> None:
        """Start from ``snap`` (a saved snapshot, loaded and checked by :mod:`baton.repo.indexcache`). Only on an
        empty index (ValueError otherwise). ValueError if a row names a pack outside the table. ``overlay``:
        :func:`overlay_of` of the snapshot, when the caller built it already (it is then kept, not copied)."""
        packs = list(snap.packs)
        if overlay is None:
            overlay = overlay_of(snap.rows, len(packs))
        with self._wlock:
            if self._packs or self._overlay or self._staged is not None or self._state is not _EMPTY:
                raise ValueError("restore() needs an empty index")
            self._packs = packs
            self._pack_no = {p: i for i, p in enumerate(packs)}
            self._overlay = overlay
            self._state = _State(snap.base, snap.small, snap.base.count if snap.base is not None and
                                 snap.small is None else None)

    def statistics(self) -> dict[str, int]:
        st = self._state
        runs = [r for r in (st.base, st.small) if r is not None]
        staged, frozen = self._staged, self._frozen
        return {"base_entries": st.base.count if st.base is not None else 0,
                "small_entries": st.small.count if st.small is not None else 0,
                "overlay_entries": len(self._overlay) + (len(frozen) if frozen is not None else 0),
                "staged_entries": staged.rows if staged is not None else 0,
                "merge_failed": int(self.merge_error is not None),
                "ram_filter_bytes": sum(len(r.bits) for r in runs),
                "ram_fence_bytes": sum(r.fences.itemsize * len(r.fences) for r in runs),
                "packs": len(self._packs), "file_bytes": ROW.size * sum(r.count for r in runs),
                "merges": self.merges, "merge_waits": self.merge_waits}
