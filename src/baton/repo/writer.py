"""The backup writer: chunks in, packs + chunk index + index pages + manifest out, in that order.

Write ordering (the invariant restore and prune rely on):

1. packs are stored (content-addressed, put-if-absent) before any index file names them;
2. an index file is stored before any page or manifest references its chunks;
3. pages are stored before the manifest that names their root;
4. the manifest is stored last: a snapshot exists exactly when its manifest does.

A crash at any point therefore leaves only unreferenced packs, index entries or pages, which prune removes
after its grace period. The writer fails sticky: after any error every call raises that error again, and the
caller must :meth:`~BackupWriter.abort`.

Pipeline: ``put`` hands the chunk to a small thread pool that hashes (keyed BLAKE3), compresses (zstd-1, one
compressor per thread) and encrypts (AES-256-GCM); results are taken back in submission order on the caller's
thread, appended to the current pack, and full packs are uploaded by one background uploader thread.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import blake3

from baton.errors import RepoError, UsageError
from baton.format.repo_index import PAGE_FANOUT, ZERO_ID, IndexEntry
from baton.format.repo_pack import (
    PACK_TAIL,
    PackEntry,
    pack_footer,
    pack_head,
    parse_pack_table,
    parse_pack_tail,
)
from baton.repo.crypto import chunk_id, encode_blob
from baton.repo.locks import DEFAULT_TTL, RepoLock
from baton.repo.model import MODES, DiskIdentity, Manifest
from baton.repo.repository import Repository, pack_key
from baton.repo.tree import TreeReader

MAX_INFLIGHT = 32            # chunks queued in the encode pool
MAX_UPLOADS = 2              # sealed packs waiting for the uploader (bounds memory to ~3 packs)
INDEX_EVERY_PACKS = 16       # write an index file at least every N packs
MAX_CHANGED_LEAVES = 64      # leaves held in memory before the tree is flushed to pages


class BackupWriter:
    """One backup of one disk into a repository. Not thread-safe: call it from one thread."""

    def __init__(self, repo: Repository, disk: DiskIdentity, *, parent: Manifest | None, node: str, mode: str,
                 reason: str, lineage: str, snapshot_id: str | None = None, workers: int = 2,
                 lock_ttl: float | None = None, lock_wait: float = 0.0) -> None:
        if mode not in MODES:
            raise UsageError(f"backup mode {mode!r}: expected one of {', '.join(MODES)}")
        if parent is not None:
            if parent.disk.disk_uuid != disk.disk_uuid:
                raise RepoError(f"parent snapshot {parent.snapshot_id} is of disk {parent.disk.disk_uuid}, "
                                f"not {disk.disk_uuid}")
            if mode == "incremental" and (parent.disk.chunk_size != disk.chunk_size or
                                          parent.disk.size != disk.size):
                raise RepoError(f"parent snapshot {parent.snapshot_id} has size {parent.disk.size} and chunk size "
                                f"{parent.disk.chunk_size}; this disk has {disk.size} and {disk.chunk_size}: "
                                f"an incremental needs both equal (take a full backup)")
        elif mode == "incremental":
            raise RepoError("an incremental backup needs a parent snapshot")
        if snapshot_id is None:
            snapshot_id = os.urandom(16).hex()
        elif len(snapshot_id) != 32 or any(c not in "0123456789abcdef" for c in snapshot_id):
            raise UsageError(f"snapshot id {snapshot_id!r}: expected 32 lowercase hex digits")
        self.repo = repo
        self.disk = disk
        self.parent = parent
        self.node, self.mode, self.reason, self.lineage = node, mode, reason, lineage
        self.snapshot_id = snapshot_id
        self._lock = RepoLock.acquire_shared(repo.store, "backup", node, ttl=lock_ttl or DEFAULT_TTL,
                                             wait=lock_wait)
        try:
            # Packs no index file covers (lost index files, a backup that died mid-upload) are indexed first:
            # an incremental references its parent's chunks by id, and they must stay findable.
            repo.heal_index()
            self._known = repo.chunk_index()
        except BaseException:
            self._lock.release()
            raise
        root = bytes.fromhex(parent.root) if (parent is not None and mode == "incremental") else ZERO_ID
        self._base = TreeReader(root, disk.chunk_count, repo.load_page)
        self._changed: dict[int, list[bytes]] = {}
        self._pending: set[bytes] = set()                # in a pack of this writer, not yet in an index file
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="baton-encode")
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-upload")
        self._inflight: deque[tuple[int, int, Future[tuple[bytes, bytes | None, int]] | None]] = deque()
        self._uploads: deque[tuple[Future[bool], list[tuple[bytes, IndexEntry]]]] = deque()
        self._unindexed: list[tuple[bytes, IndexEntry]] = []
        self._packs_since_index = 0
        self._pack = bytearray()
        self._pack_entries: list[PackEntry] = []
        self._zero = bytes(disk.chunk_size)
        self._start = time.time()
        self._checkpoints = 0
        self._state = "open"
        self._broken: BaseException | None = None
        self._stats = {"chunks_put": 0, "bytes_in": 0, "chunks_stored": 0, "bytes_stored": 0,
                       "chunks_deduplicated": 0, "zero_chunks": 0, "packs_written": 0, "pack_bytes": 0,
                       "index_files_written": 0, "tree_flushes": 0, "checkpoints": 0}
        self._pages_before = repo.statistics()["pages_written"]

    # ----- public API -----------------------------------------------------------------------------------------

    def put(self, chunk_index: int, data: bytes | bytearray | memoryview) -> None:
        """Store chunk ``chunk_index``. ``len(data)`` is the chunk size (less only for the disk's last chunk).

        All-zero data records the zero sentinel and stores nothing. Raises UsageError for a wrong index or
        length, the sticky error after a failure, and storage errors as they happen.
        """
        self._check_open()
        n = self.disk.chunk_count
        if not 0 <= chunk_index < n:
            raise UsageError(f"chunk index {chunk_index} outside the disk (0..{n - 1})")
        expected = min(self.disk.chunk_size, self.disk.size - chunk_index * self.disk.chunk_size)
        if len(data) != expected:
            raise UsageError(f"chunk {chunk_index}: {len(data)} bytes, expected {expected}")
        try:
            self._stats["chunks_put"] += 1
            self._stats["bytes_in"] += expected
            # Compare against the preallocated zero buffer without slicing it (a slice would copy).
            zero = self._zero if expected == self.disk.chunk_size else bytes(expected)
            if data == zero:
                self._inflight.append((chunk_index, expected, None))
            else:
                # The caller may reuse its buffer after put returns, so the pool gets an immutable copy.
                payload = data if isinstance(data, bytes) else bytes(data)
                self._inflight.append((chunk_index, expected, self._pool.submit(self._encode, payload)))
            self._drain(MAX_INFLIGHT)
            if self._stats["chunks_put"] % 1024 == 0:
                self._lock.refresh()          # cheap unless the lock is old: long incrementals stay locked
        except BaseException as e:
            self._broken = e
            raise

    def checkpoint(self) -> Manifest:
        """Make everything put so far durable and referenced by a committed partial manifest (complete=False).

        The returned manifest is a valid parent for a later incremental but is never restored as a
        point-in-time image. The caller may clear its change-record bits for the chunks put so far.
        A checkpoint seals the current pack early, so checkpointing every few hundred MiB of input keeps
        packs large; every few chunks would make many small packs.
        """
        self._check_open()
        try:
            self._flush_all()
            self._checkpoints += 1
            self._stats["checkpoints"] += 1
            m = self._manifest(complete=False, info={})
            self.repo.write_manifest(m)
            self._lock.refresh()
            return m
        except BaseException as e:
            self._broken = e
            raise

    def commit(self, info: dict[str, Any] | None = None) -> Manifest:
        """Publish the snapshot (complete=True) and release the lock. The manifest is written last."""
        self._check_open()
        try:
            self._flush_all()
            m = self._manifest(complete=True, info=dict(info or {}))
            self.repo.write_manifest(m)
        except BaseException as e:
            self._broken = e
            raise
        self._state = "committed"
        self._shutdown()
        self._lock.release()
        return m

    def abort(self) -> None:
        """Stop without publishing; idempotent. Uploaded packs become garbage for prune (after its grace)."""
        if self._state in ("aborted", "committed"):
            return
        self._state = "aborted"
        for _i, _n, fut in self._inflight:
            if fut is not None:
                fut.cancel()
        self._inflight.clear()
        self._shutdown()
        self._lock.release()

    def statistics(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self._stats)
        s["pages_written"] = self.repo.statistics()["pages_written"] - self._pages_before
        s["snapshot_id"] = self.snapshot_id
        s["state"] = self._state
        return s

    def __enter__(self) -> BackupWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state == "open":
            self.abort()

    # ----- internals ------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._broken is not None:
            raise RepoError(f"the backup writer failed earlier: {self._broken}") from self._broken
        if self._state != "open":
            raise RepoError(f"the backup writer is {self._state}")

    def _encode(self, data: bytes) -> tuple[bytes, bytes | None, int]:
        cid = chunk_id(self.repo.keys, data)
        if cid in self._known or cid in self._pending:
            return cid, None, 0                      # dedup: skip compressing and encrypting
        stored, flags = encode_blob(self.repo.keys, cid, data)
        return cid, stored, flags

    def _drain(self, keep: int) -> None:
        """Take results in submission order until at most ``keep`` remain (and the head is not done)."""
        while self._inflight and (len(self._inflight) > keep or
                                  self._inflight[0][2] is None or self._inflight[0][2].done()):
            idx, length, fut = self._inflight.popleft()
            if fut is None:
                self._stats["zero_chunks"] += 1
                self._set(idx, ZERO_ID)
                continue
            cid, stored, flags = fut.result()
            if cid in self._known or cid in self._pending:
                self._stats["chunks_deduplicated"] += 1
            elif stored is None:
                # Known when hashed but gone since: only a prune could do that, and our lock excludes it.
                raise RepoError(f"chunk {idx} ({cid.hex()}) vanished from the chunk index during the backup")
            else:
                self._append(cid, stored, flags, length)
            self._set(idx, cid)
            if len(self._changed) > MAX_CHANGED_LEAVES:
                self._flush_all()

    def _set(self, idx: int, cid: bytes) -> None:
        leaf_no, slot = divmod(idx, PAGE_FANOUT)
        leaf = self._changed.get(leaf_no)
        if leaf is None:
            leaf = self._changed[leaf_no] = list(self._base.leaf(leaf_no))
        leaf[slot] = cid

    def _append(self, cid: bytes, stored: bytes, flags: int, raw_length: int) -> None:
        if not self._pack:
            self._pack += pack_head(self.repo.keys.encrypted)
        self._pack_entries.append(PackEntry(cid, len(self._pack), len(stored), raw_length, flags))
        self._pack += stored
        self._pending.add(cid)
        self._stats["chunks_stored"] += 1
        self._stats["bytes_stored"] += len(stored)
        if len(self._pack) >= self.repo.config.pack_target:
            self._seal_pack()

    def _seal_pack(self) -> None:
        if not self._pack_entries:
            return
        self._pack += pack_footer(self._pack_entries, len(self._pack), self.repo.keys.data_key)
        data = bytes(self._pack)
        self._check_pack(data)
        pid = blake3.blake3(data).digest()
        entries = [(e.chunk_id, IndexEntry(pid, e.offset, e.stored_length, e.raw_length, e.flags))
                   for e in self._pack_entries]
        self._pack = bytearray()
        self._pack_entries = []
        self._stats["packs_written"] += 1
        self._stats["pack_bytes"] += len(data)
        self._uploads.append((self._uploader.submit(self.repo.store.put_if_absent, pack_key(pid), data), entries))
        while len(self._uploads) > MAX_UPLOADS:
            self._finish_upload()
        self._packs_since_index += 1
        if self._packs_since_index >= INDEX_EVERY_PACKS:
            self._write_index()
        self._lock.refresh()

    def _check_pack(self, data: bytes) -> None:
        """Re-read the pack we built (its trailer and table) before it leaves the process: a writer bug
        must fail this backup, not surface at restore time."""
        tail = data[-PACK_TAIL.size:]
        _f, _n, off, length = parse_pack_tail(tail, len(data), "new pack")
        table = parse_pack_table(data[off:off + length], tail, "new pack", self.repo.keys.data_key)
        if table != self._pack_entries:
            raise RepoError("internal error: a new pack's table does not match what was written")

    def _finish_upload(self) -> None:
        fut, entries = self._uploads.popleft()
        fut.result()
        self._unindexed.extend(entries)

    def _write_index(self) -> None:
        while self._uploads:
            self._finish_upload()
        if self._unindexed:
            self.repo.write_index_file(self._unindexed)     # also merges into self._known
            self._stats["index_files_written"] += 1
            for cid, _e in self._unindexed:
                self._pending.discard(cid)
            self._unindexed = []
        self._packs_since_index = 0

    def _flush_all(self) -> None:
        """Drain the pipeline, store packs and their index, then the changed pages; rebase on the new root."""
        self._drain(0)
        self._seal_pack()
        self._write_index()
        root = self._build_root()
        self._base = TreeReader(root, self.disk.chunk_count, self.repo.load_page)
        self._changed = {}
        self._stats["tree_flushes"] += 1

    def _build_root(self) -> bytes:
        from baton.repo.tree import build_tree

        return build_tree(self._base, self._changed, self.repo.store_page)

    def _manifest(self, *, complete: bool, info: dict[str, Any]) -> Manifest:
        s = self._stats
        return Manifest(
            snapshot_id=self.snapshot_id, disk=self.disk, lineage=self.lineage,
            parent=self.parent.snapshot_id if self.parent is not None else "", node=self.node,
            start_time=self._start, end_time=time.time(), mode=self.mode, reason=self.reason,
            chunks_read=s["chunks_put"], bytes_read=s["bytes_in"], chunks_stored=s["chunks_stored"],
            bytes_stored=s["bytes_stored"], chunks_deduplicated=s["chunks_deduplicated"],
            zero_chunks=s["zero_chunks"], root=self._base.root.hex(), tree_depth=self._base.depth,
            complete=complete, info=info, checkpoint=self._checkpoints)

    def _shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._uploader.shutdown(wait=True, cancel_futures=True)
