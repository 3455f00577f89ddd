"""Snapshot index trees: the complete list of chunk ids of a disk, split into content-addressed pages.

Level 0 pages (leaves) hold up to PAGE_FANOUT chunk ids; level n pages hold the ids of level n-1 pages. The
root is one page. A page id is the keyed BLAKE3 of its body; a page whose ids are all ZERO_ID has the id
ZERO_ID and is never stored, so a sparse disk costs nothing. Because pages are content addressed, snapshots
share every page whose entries did not change: an incremental writes new leaves for the changed chunks and
new pages on their paths to the root, i.e. metadata proportional to the change, not to the disk.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from baton.errors import RepoCorrupt
from baton.format.repo_index import PAGE_FANOUT, ZERO_ID

LoadPage = Callable[[bytes], tuple[int, list[bytes]]]     # page id -> (level, ids), fetched and checked
SubmitLoad = Callable[[LoadPage, bytes], Future[tuple[int, list[bytes]]]]   # a pool's submit, for page loads


def tree_shape(chunk_count: int) -> list[int]:
    """Pages per level, leaves first. ``[1]`` for up to PAGE_FANOUT chunks; ``[]`` only for an empty disk."""
    if chunk_count == 0:
        return []
    shape = [(chunk_count + PAGE_FANOUT - 1) // PAGE_FANOUT]
    while shape[-1] > 1:
        shape.append((shape[-1] + PAGE_FANOUT - 1) // PAGE_FANOUT)
    return shape


def page_len(shape: list[int], chunk_count: int, level: int, index: int) -> int:
    """How many ids page ``index`` of ``level`` holds."""
    below = chunk_count if level == 0 else shape[level - 1]
    return min(PAGE_FANOUT, below - index * PAGE_FANOUT)


class TreeReader:
    """Random access to a tree's ids. ``load(page_id) -> (level, ids)`` fetches and checks one stored page."""

    def __init__(self, root: bytes, chunk_count: int, load: LoadPage, cache_pages: int = 64) -> None:
        self.root = root
        self.chunk_count = chunk_count
        self.shape = tree_shape(chunk_count)
        self._load = load
        self._cache: OrderedDict[bytes, list[bytes]] = OrderedDict()
        self._cache_pages = cache_pages
        self._prefetched: dict[bytes, Future[tuple[int, list[bytes]]]] = {}
        self.pages_loaded = 0

    @property
    def depth(self) -> int:
        return len(self.shape)

    def page_ids(self, level: int, index: int) -> list[bytes]:
        """The ids held by page ``index`` of ``level``."""
        n = page_len(self.shape, self.chunk_count, level, index)
        pid = self.page_id(level, index)
        if pid == ZERO_ID:
            return [ZERO_ID] * n
        ids = self._cache.get(pid)
        if ids is not None:
            self._cache.move_to_end(pid)
            return ids
        fut = self._prefetched.pop(pid, None)
        got_level, ids = fut.result() if fut is not None else self._load(pid)
        self.pages_loaded += 1
        if got_level != level or len(ids) != n:
            raise RepoCorrupt(f"page {pid.hex()}: level {got_level} with {len(ids)} ids, expected level {level} "
                              f"with {n}")
        self._cache[pid] = ids
        if len(self._cache) > self._cache_pages:
            self._cache.popitem(last=False)
        return ids

    def page_id(self, level: int, index: int) -> bytes:
        """The id of page ``index`` at ``level`` (walks down from the root)."""
        top = self.depth - 1
        if level == top:
            return self.root
        parent = self.page_ids(level + 1, index // PAGE_FANOUT)
        return parent[index % PAGE_FANOUT]

    def leaf(self, leaf_no: int) -> list[bytes]:
        return self.page_ids(0, leaf_no)

    def prefetch_leaf(self, leaf_no: int, submit: SubmitLoad) -> None:
        """Start loading leaf ``leaf_no`` through ``submit`` (a pool's), so that :meth:`leaf` later takes it
        loaded, checked as any page is. The pages above it load here, in the caller's thread (one per 4096
        leaves, cached). Call from the thread that reads the tree; :attr:`prefetching` says how many wait."""
        pid = self.page_id(0, leaf_no)
        if pid != ZERO_ID and pid not in self._cache and pid not in self._prefetched:
            self._prefetched[pid] = submit(self._load, pid)

    @property
    def prefetching(self) -> int:
        """Leaves started by :meth:`prefetch_leaf` and not taken yet."""
        return len(self._prefetched)

    def drop_prefetched(self) -> list[Future[tuple[int, list[bytes]]]]:
        """Forget the leaves started and not taken; their futures, for the caller to cancel or wait for."""
        futs = list(self._prefetched.values())
        self._prefetched.clear()
        return futs

    def chunk_id(self, chunk_index: int) -> bytes:
        if not 0 <= chunk_index < self.chunk_count:
            raise IndexError(chunk_index)
        return self.leaf(chunk_index // PAGE_FANOUT)[chunk_index % PAGE_FANOUT]

    def iter_ids(self, *, ahead: int = 0, submit: SubmitLoad | None = None) -> Iterator[bytes]:
        """Every chunk id in disk order. With ``submit`` (a pool's), the next ``ahead`` leaves load on the pool
        while the caller takes this one's ids (:meth:`prefetch_leaf`): a restore reads the tree in order, and
        each leaf is a cold fetch of its own."""
        if not self.shape:
            return
        n = self.shape[0]
        for leaf_no in range(n):
            ids = self.leaf(leaf_no)
            if submit is not None:
                for k in range(leaf_no + 1, min(n, leaf_no + 1 + ahead)):
                    self.prefetch_leaf(k, submit)
            yield from ids

    def iter_pages(self) -> Iterator[tuple[int, bytes]]:
        """(level, page id) of every stored (non-zero) page, top down; shared subtrees are visited once each."""
        if not self.shape or self.root == ZERO_ID:
            return
        level_ids = {0: [self.root]}
        for level in range(self.depth - 1, -1, -1):
            ids = level_ids.pop(0)
            nxt: list[bytes] = []
            for pid in ids:
                if pid == ZERO_ID:
                    continue
                yield level, pid
                if level > 0:
                    got_level, children = self._load(pid)
                    if got_level != level:
                        raise RepoCorrupt(f"page {pid.hex()}: level {got_level}, expected {level}")
                    nxt.extend(children)
            level_ids[0] = nxt


def build_tree(base: TreeReader, changed_leaves: dict[int, list[bytes]],
               store_page: Callable[[int, list[bytes]], bytes]) -> bytes:
    """Root id of ``base`` with ``changed_leaves`` (leaf number -> full id list) replaced.

    ``store_page(level, ids) -> page id`` stores one page (or returns ZERO_ID for an all-zero page). Only
    pages on the paths from changed leaves to the root are written.
    """
    shape = base.shape
    if not shape:
        return ZERO_ID
    changed: dict[int, bytes] = {no: store_page(0, ids) for no, ids in sorted(changed_leaves.items())}
    if not changed:
        return base.root
    for level in range(1, len(shape)):
        parents: dict[int, list[bytes]] = {}
        for child_no, cid in changed.items():
            pno = child_no // PAGE_FANOUT
            if pno not in parents:
                parents[pno] = list(base.page_ids(level, pno))
            parents[pno][child_no % PAGE_FANOUT] = cid
        changed = {pno: store_page(level, ids) for pno, ids in sorted(parents.items())}
    assert len(changed) == 1
    return next(iter(changed.values()))
