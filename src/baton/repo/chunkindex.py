"""The in-memory chunk index: 8 bytes of RAM per stored chunk, the entries themselves in a memory-mapped file.

A repository's chunk index maps a chunk id to where the chunk is stored (:class:`IndexEntry`). Held as a Python
dict it cost about 221 bytes per chunk (3.5 GiB per TiB of unique data at 64 KiB chunks). Here:

* the **base** is a sorted table of rows (id, pack number, offset, stored length, raw length, flags), written to
  an unlinked temporary file and memory-mapped (page cache, which the kernel may drop and re-read, not
  process memory), plus a sorted ``array('Q')`` of the ids' first 8 bytes in the same order: a lookup is one
  binary search in RAM and one row read, usually from a cached page;
* the **overlay** is a dict of entries added since the base was built (this process's backups, other
  clients' index files loaded by ``Repository.refresh``); it is merged into a new base when it holds more than
  ``max(MERGE_MIN, len(base) // 8)`` entries, so merging costs O(n log n) over a repository's growth;
* pack ids are numbered in a small table (one entry per pack, 32 MiB of data each by default).

RAM: 8 bytes per chunk in the base, about 220 per chunk in the overlay (at most 1/8 of the base between
merges), so 8-36 bytes per chunk in steady state: at 64 KiB chunks, 128 MiB per TiB of unique data right after
a merge, 576 MiB just before one. A merge (the first one follows the first load, which reads every index file
into the overlay) briefly holds the merged entries as a dict, about 220 bytes per chunk, as the index did
before; it runs after n/8 new entries, in the background.
The file holds 53 bytes per chunk (848 MiB per TiB) under ``BATON_CACHE_DIR`` (default: the system's temporary
directory). It is derived state (STYLE 9): rebuilt from the repository's index files by every process that
loads the index, never read back after a crash.

Threads: lookups need no lock (they take one reference to the base); additions and the swap after a merge
take the index's own lock; merges run on a background thread once the overlay passes its share (a merge
sorts the whole index in Python: about 7 s per million chunks here), so no backup waits for one.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import tempfile
import threading
from array import array
from collections.abc import Iterable, Iterator

from baton.format.repo_index import IndexEntry

ROW = struct.Struct("<32sIQIIB")  # chunk id, pack number, offset, stored length, raw length, flags
MERGE_MIN = 65536                 # overlay entries always allowed before a merge
CACHE_DIR_ENV = "BATON_CACHE_DIR"


class _Base:
    """One immutable base: sorted id prefixes, the mapped rows, the pack table. Replaced whole by a merge, so a
    reader that took a reference sees one consistent base (the file closes when the last reference goes)."""

    __slots__ = ("file", "map", "pack_no", "packs", "prefixes")

    def __init__(self, prefixes: array[int], map_: mmap.mmap | None, file: object | None, packs: list[bytes],
                 pack_no: dict[bytes, int]) -> None:
        self.prefixes = prefixes
        self.map = map_
        self.file = file
        self.packs = packs
        self.pack_no = pack_no

    def row(self, cid: bytes) -> int:
        if not self.prefixes or len(cid) != 32:
            return -1
        p = int.from_bytes(cid[:8], "big")
        row = bisect.bisect_left(self.prefixes, p)
        n = len(self.prefixes)
        while row < n and self.prefixes[row] == p:
            if self.cid(row) == cid:
                return row
            row += 1
        return -1

    def cid(self, row: int) -> bytes:
        assert self.map is not None
        off = row * ROW.size
        return self.map[off:off + 32]

    def entry(self, row: int) -> IndexEntry:
        assert self.map is not None
        _cid, no, offset, stored, raw, flags = ROW.unpack_from(self.map, row * ROW.size)
        return IndexEntry(self.packs[no], offset, stored, raw, flags)


_EMPTY = _Base(array("Q"), None, None, [], {})


class ChunkIndex:
    """A mapping chunk id -> IndexEntry (``get``, ``in``, ``[]``, ``[]=``, ``update``, ``len``, ``items``).

    Lookups may run on several threads while one thread adds (the writer's encode pool asks while the
    caller's thread adds entries): a merge builds a new base and then swaps it in with one assignment."""

    def __init__(self, *, background: bool = True) -> None:
        self._base = _EMPTY
        self._overlay: dict[bytes, IndexEntry] = {}
        self._wlock = threading.Lock()     # additions and the swap after a merge
        self._merging: threading.Thread | None = None
        self._background = background
        self.merges = 0
        self.merge_error: Exception | None = None

    # ----- mapping ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        b = self._base
        return len(b.prefixes) + sum(1 for c in list(self._overlay) if b.row(c) < 0)

    def __contains__(self, cid: object) -> bool:
        return isinstance(cid, bytes) and (cid in self._overlay or self._base.row(cid) >= 0)

    def __getitem__(self, cid: bytes) -> IndexEntry:
        e = self.get(cid)
        if e is None:
            raise KeyError(cid)
        return e

    def get(self, cid: bytes, default: IndexEntry | None = None) -> IndexEntry | None:
        e = self._overlay.get(cid)
        if e is not None:
            return e
        b = self._base
        row = b.row(cid)
        return b.entry(row) if row >= 0 else default

    def __setitem__(self, cid: bytes, entry: IndexEntry) -> None:
        with self._wlock:
            self._overlay[cid] = entry
        self._maybe_merge()

    def update(self, pairs: Iterable[tuple[bytes, IndexEntry]], *, merge: bool = True) -> None:
        """Add many entries, then merge at most once. ``merge=False`` while loading many index files (merging
        after each would sort the growing base again and again); call :meth:`maybe_merge` after the last."""
        with self._wlock:
            self._overlay.update(pairs)
        if merge:
            self.maybe_merge()

    def maybe_merge(self) -> None:
        self._maybe_merge()

    def _maybe_merge(self) -> None:
        """Start a merge in a background thread when the overlay has grown past its share: a merge sorts
        the whole index (seconds per million chunks in Python), and it must not sit in a backup's path."""
        if len(self._overlay) <= max(MERGE_MIN, len(self._base.prefixes) // 8):
            return
        if not self._background:
            self.merge()
            return
        with self._wlock:
            if self._merging is not None and self._merging.is_alive():
                return
            t = threading.Thread(target=self._merge_quietly, name="baton-index-merge", daemon=True)
            self._merging = t
        t.start()

    def _merge_quietly(self) -> None:
        try:
            self.merge()
        except Exception as e:  # the index stays correct (base + overlay); statistics() reports it
            self.merge_error = e

    def wait_merged(self) -> None:
        """Wait for a background merge to finish (tests, and before closing)."""
        t = self._merging
        if t is not None:
            t.join()

    def items(self) -> Iterator[tuple[bytes, IndexEntry]]:
        """Every (id, entry): the base in id order, then overlay entries the base lacks or that replace its."""
        b = self._base
        overlay = dict(self._overlay)
        for row in range(len(b.prefixes)):
            cid = b.cid(row)
            if cid not in overlay:
                yield cid, b.entry(row)
        yield from overlay.items()

    def __iter__(self) -> Iterator[bytes]:
        return (cid for cid, _e in self.items())

    # ----- base ------------------------------------------------------------------------------------------------

    def merge(self) -> None:
        """Fold the overlay into a new base (sorted rows in a new unlinked file). OSError if the cache
        directory can't hold it."""
        with self._wlock:
            folded = dict(self._overlay)
            base = self._base
        if not folded:
            return
        merged = {c: base.entry(row) for row in range(len(base.prefixes)) for c in (base.cid(row),)}
        merged.update(folded)
        new_base = self._build(merged)
        del merged
        with self._wlock:
            # Base first, then the overlay: a reader that misses in the new overlay finds the entry in the new
            # base. Entries added or replaced since the snapshot stay in the overlay. A new dict, since a dict
            # emptied by pop keeps its table (40 bytes a slot).
            self._base = new_base
            self._overlay = {c: e for c, e in self._overlay.items() if folded.get(c) is not e}
            self.merges += 1

    @staticmethod
    def _build(entries: dict[bytes, IndexEntry]) -> _Base:
        ids = sorted(entries)
        if not ids:
            return _EMPTY
        packs: list[bytes] = []
        pack_no: dict[bytes, int] = {}
        f = tempfile.TemporaryFile(dir=os.environ.get(CACHE_DIR_ENV) or None, prefix="baton-index-")  # noqa: SIM115
        try:
            buf = bytearray()
            for cid in ids:
                e = entries[cid]
                no = pack_no.get(e.pack_id)
                if no is None:
                    no = pack_no[e.pack_id] = len(packs)
                    packs.append(e.pack_id)
                buf += ROW.pack(cid, no, e.offset, e.stored_length, e.raw_length, e.flags)
                if len(buf) >= 8 << 20:
                    f.write(buf)
                    buf.clear()
            f.write(buf)
            f.flush()
            map_ = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        except BaseException:
            f.close()
            raise
        prefixes = array("Q", (int.from_bytes(cid[:8], "big") for cid in ids))
        return _Base(prefixes, map_, f, packs, pack_no)

    def statistics(self) -> dict[str, int]:
        b = self._base
        return {"base_entries": len(b.prefixes), "overlay_entries": len(self._overlay),
                "merge_failed": int(self.merge_error is not None),
                "ram_base_bytes": b.prefixes.itemsize * len(b.prefixes), "packs": len(b.packs),
                "file_bytes": ROW.size * len(b.prefixes), "merges": self.merges}
