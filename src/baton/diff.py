"""The changed extents between two snapshots of one disk, by chunk id, at the cost of what changed.

Every snapshot is a complete index tree of content-addressed pages (``baton.repo.tree``, docs/format.md part 2).
Two snapshots of the same disk share every page whose entries are equal, so the walk below descends only where
the two trees' page ids differ: a subtree with the same id on both sides is skipped without being read, an
all-zero subtree (ZERO_ID) is never stored and costs nothing. Reading a diff therefore costs the pages on the
paths to the changed chunks, not the size of the disk (``pages_read`` in the result says how many).

Contract:

* both snapshots must be of the same disk (disk uuid), with the same size and chunk size: otherwise UsageError
  saying which differs (a diff across disks or sizes is not a list of extents of one disk);
* checkpoints (partial manifests) may be compared; the result says which side is partial;
* a page that is missing or fails its checks raises RepoCorrupt naming it (from the repository).

:func:`changed_chunks` yields chunk indexes (used by rollback); :func:`diff` groups them into byte extents.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from baton.errors import RepoCorrupt, UsageError
from baton.format.repo_index import PAGE_FANOUT, ZERO_ID
from baton.repo import Manifest, Repository
from baton.repo.tree import page_len, tree_shape


@dataclass
class DiffResult:
    snapshot_a: str
    snapshot_b: str
    disk_uuid: str
    disk_size: int
    chunk_size: int
    extents: list[tuple[int, int]] = field(default_factory=list)  # (byte offset, byte length), disk order
    changed_chunks: int = 0
    changed_bytes: int = 0
    pages_read: int = 0  # index pages fetched from the repository (identical subtrees are never read)
    partial: list[str] = field(default_factory=list)  # which of the two is a checkpoint, not a complete snapshot
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"snapshot_a": self.snapshot_a, "snapshot_b": self.snapshot_b, "disk_uuid": self.disk_uuid,
                "disk_size": self.disk_size, "chunk_size": self.chunk_size,
                "extents": [{"offset": o, "length": n} for o, n in self.extents],
                "changed_chunks": self.changed_chunks, "changed_bytes": self.changed_bytes,
                "changed_fraction": round(self.changed_bytes / self.disk_size, 6) if self.disk_size else 0.0,
                "pages_read": self.pages_read, "partial": self.partial, "seconds": self.seconds}


def check_same_disk(a: Manifest, b: Manifest) -> None:
    """UsageError unless ``a`` and ``b`` are snapshots of one disk with one geometry."""
    if a.disk.disk_uuid != b.disk.disk_uuid:
        raise UsageError(f"snapshots {a.short_id} and {b.short_id} are of different disks ({a.disk.disk_uuid} "
                         f"{a.disk.name or ''} vs {b.disk.disk_uuid} {b.disk.name or ''})".replace("  ", " "),
                         hint="`baton snapshots --repo URL` lists each snapshot's disk")
    if a.disk.chunk_size != b.disk.chunk_size:
        raise UsageError(f"snapshots {a.short_id} and {b.short_id} have different chunk sizes "
                         f"({a.disk.chunk_size} vs {b.disk.chunk_size}); they cannot be compared by chunk id")
    if a.disk.size != b.disk.size:
        raise UsageError(f"the disk changed size between snapshots {a.short_id} ({a.disk.size} bytes) and "
                         f"{b.short_id} ({b.disk.size} bytes); they cannot be compared chunk by chunk",
                         hint="restore both and compare the images (cmp -l) instead")


class _Walker:
    def __init__(self, repo: Repository, chunk_count: int) -> None:
        self.repo = repo
        self.n = chunk_count
        self.shape = tree_shape(chunk_count)
        self.pages_read = 0
        self._cache: dict[bytes, list[bytes]] = {}

    def ids(self, pid: bytes, level: int, index: int) -> list[bytes]:
        n = page_len(self.shape, self.n, level, index)
        if pid == ZERO_ID:
            return [ZERO_ID] * n
        got = self._cache.get(pid)
        if got is None:
            lvl, got = self.repo.load_page(pid)
            self.pages_read += 1
            if lvl != level or len(got) != n:
                raise RepoCorrupt(f"index page {pid.hex()}: level {lvl} with {len(got)} ids, expected level "
                                  f"{level} with {n}", hint="run `baton verify` to list every damaged snapshot")
            if len(self._cache) < 4096:
                self._cache[pid] = got
        return got

    def walk(self, pa: bytes, pb: bytes, level: int, index: int) -> Iterator[int]:
        """Chunk indexes under page ``index`` of ``level`` whose ids differ between the two trees."""
        if pa == pb:
            return
        ia, ib = self.ids(pa, level, index), self.ids(pb, level, index)
        base = index * PAGE_FANOUT
        if level == 0:
            for k, (x, y) in enumerate(zip(ia, ib, strict=True)):
                if x != y:
                    yield base + k
            return
        for k, (x, y) in enumerate(zip(ia, ib, strict=True)):
            if x != y:
                yield from self.walk(x, y, level - 1, base + k)


def changed_chunks(repo: Repository, a: Manifest, b: Manifest, *, stats: dict[str, int] | None = None
                   ) -> Iterator[int]:
    """Indexes of the chunks whose ids differ between snapshots ``a`` and ``b``, in disk order. Identical
    subtrees (same page id) are skipped unread. ``stats["pages_read"]`` is updated as pages are read."""
    check_same_disk(a, b)
    w = _Walker(repo, a.disk.chunk_count)
    if not w.shape:
        return
    top = len(w.shape) - 1
    for depth, m in ((a.tree_depth, a), (b.tree_depth, b)):
        if depth != len(w.shape):
            raise RepoCorrupt(f"snapshot {m.snapshot_id}: tree depth {depth} does not fit "
                              f"{m.disk.chunk_count} chunks")
    for c in w.walk(bytes.fromhex(a.root), bytes.fromhex(b.root), top, 0):
        if stats is not None:
            stats["pages_read"] = w.pages_read
        yield c
    if stats is not None:
        stats["pages_read"] = w.pages_read


def extents(chunks: Iterator[int] | list[int], chunk_size: int, disk_size: int) -> list[tuple[int, int]]:
    """(offset, length) byte extents of runs of consecutive chunks, the last clipped to the disk size."""
    out: list[tuple[int, int]] = []
    for c in chunks:
        off = c * chunk_size
        length = min(chunk_size, disk_size - off)
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((off, length))
    return out


def diff(repo: Repository, a: Manifest, b: Manifest) -> DiffResult:
    """The changed extents between snapshots ``a`` and ``b`` of one disk (see the module docstring)."""
    t0 = time.monotonic()
    check_same_disk(a, b)
    res = DiffResult(a.snapshot_id, b.snapshot_id, a.disk.disk_uuid, a.disk.size, a.disk.chunk_size,
                     partial=[m.snapshot_id for m in (a, b) if not m.complete])
    stats: dict[str, int] = {}
    chunks = list(changed_chunks(repo, a, b, stats=stats))
    res.extents = extents(chunks, a.disk.chunk_size, a.disk.size)
    res.changed_chunks = len(chunks)
    res.changed_bytes = sum(n for _o, n in res.extents)
    res.pages_read = stats.get("pages_read", 0)
    res.seconds = round(time.monotonic() - t0, 4)
    return res
