"""The backup writer: chunks in, packs + chunk index + index pages + manifest out, in that order.

Write ordering (the invariant restore and prune rely on):

1. packs are stored (content-addressed, put-if-absent) before any index file names them;
2. an index file is stored before any manifest references its chunks (the pages that name them are stored at
   the same time as the index file: a page is only reached through a manifest, and the chunk index, not the
   page, says where a chunk is);
3. pages are stored before the manifest that names their root;
4. the manifest is stored last: a snapshot exists exactly when its manifest does.

A crash at any point therefore leaves only unreferenced packs, index entries or pages, which prune removes
after its grace period. The writer fails sticky: after any error every call raises that error again, and the
caller must :meth:`~BackupWriter.abort`.

Pipeline: ``put_run`` (``put`` is a run of one) gathers runs of chunks into tasks of about BATCH_BYTES (1 MiB) for
a thread pool (``workers``, default 2:
threads, since BLAKE3, zstd and AES-GCM release the GIL and a process pool would copy every chunk across a
pipe) that hashes (keyed BLAKE3), recognises zero chunks by their id, compresses (zstd-1, one compressor per
thread) and encrypts (AES-256-GCM); results are taken back in submission order on the caller's thread and
copied into the current pack's buffer (one bytearray per pack, the encoded blob freed at once); a full pack
goes to one uploader thread, which appends the table and trailer, checks, names and stores it while the
caller fills the next one. Index pages are stored by a small pool, concurrently. A chunk is compressed from
the caller's view as it is; only a chunk stored raw is copied.

Memory bound: MAX_INFLIGHT_BYTES (8 MiB) of chunks queued for encoding and the task being gathered (BATCH_BYTES,
1 MiB; both the caller's read buffers, held by reference), as much again in encoded results not yet taken, the
pack being filled and the pack being stored (one buffer each of the repository's pack_target plus a chunk,
16 MiB by default and never more than PACK_BYTES_MAX, just under 32 MiB; MAX_UPLOADS = 0: sealing a pack waits
for the one before it to be stored, and a stored pack's buffer is filled again): 8 + 1 + 8 + 16 + 16 = 49 MiB at
16 MiB packs (96 MiB at 32 MiB packs and a 16 MiB queue, the settings before), plus the local store's O_DIRECT
bounce buffer (4 MiB, on the uploader thread), plus an incremental's leaves of the parent's tree (about 300 KiB
each as lists of ids): up to MAX_CHANGED_LEAVES changed and PREFETCH_LEAVES loading ahead. While a writer is
open the C allocator keeps freed large buffers for reuse (``baton.device.reuse_big_buffers``: each read buffer reuses the memory of one freed before, instead of
being faulted in anew); each checkpoint and closing the writer give back what it holds free.
Measured, in-process full backup of the 1 GiB benchmark image, interleaved runs: peak RSS 113-116 MiB
(the interpreter and libraries 33 MiB of it) against 146-176 MiB at 32 MiB packs and a 16 MiB queue, with
CPU 2.47-2.55 s against 2.38-2.75 s. In the daemon, for an incremental of a 64 GiB disk with 10 % changed
(``BENCH_MEMORY_SIZE=64G python -m bench --only memory``): 102 MiB against 184 MiB, with the reads landing
in place and the daemon's arenas capped (``baton.device``).

Concurrency: the writer never touches the repository's chunk index itself; it asks ``Repository.has_chunk``
(under the repository's lock) and adds entries through ``Repository.write_index_file``. ``_pending`` (chunks
in this writer's packs not yet in an index file) is read by encode threads while the caller's thread changes
it: a stale answer only compresses a chunk that is then deduplicated in order on the caller's thread.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, cast

import blake3

from baton.device import (
    BIG_BUFFERS_MMAP,
    populate,
    release_free_memory,
    reuse_big_buffers,
    uninitialized_bytearray,
)
from baton.errors import RepoError, UsageError
from baton.format.repo_index import PAGE_FANOUT, ZERO_ID, IndexEntry
from baton.format.repo_pack import (
    PACK_ENTRY,
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
from baton.workers import finish, prestart, shared_pool

BATCH_BYTES = 1 << 20         # chunk bytes per encode task: short runs (a scattered incremental's 1-2 chunks) are
                             # gathered, since a task per run cost more in thread hand-offs than its hashing
MAX_INFLIGHT_BYTES = 8 << 20  # chunk bytes queued in the encode pool (views of the caller's read buffers; 16 was no faster)
MAX_UPLOADS = 0              # sealed packs waiting while the uploader stores one (0: sealing a pack waits for
                             # the one before it; 1 was no faster with O_DIRECT pack writes, and held 32 MiB more)
UPLOADERS = 1                # threads storing packs (2, with MAX_UPLOADS 2, measured no faster on 2 cores)
INDEX_EVERY_PACKS = 16       # write an index file at least every N packs
PREFETCH_LEAVES = 16         # leaves of the parent's tree loading ahead of the chunks that change them
                             # (~300 KiB each): a small incremental puts all its chunks before it takes the
                             # first result, so with 4 the other leaves (12 of a 4 GiB disk's 16) loaded one
                             # by one at its commit, 15 ms
MAX_CHANGED_LEAVES = 64      # leaves held in memory before the tree is flushed to pages (counted per encode task:
                             # plus the leaves one task's chunks touch, at most 16 at 64 KiB chunks)
PAGE_UPLOADS = 8             # index pages stored concurrently at a flush
# A pack is sealed before a blob would make it, with its table and trailer, larger than this, whatever the
# repository's pack_target: each pack is built in one buffer, and below the allocator's mmap threshold (raised
# to BIG_BUFFERS_MMAP while a writer is open) that buffer reuses the memory of a pack already stored instead of
# being mapped fresh and faulted in page by page (8,192 faults per 32 MiB pack: about 100,000 of the 137,000
# minor faults of a full backup of the 1 GiB benchmark image).
PACK_BYTES_MAX = BIG_BUFFERS_MMAP - (64 << 10)
FOOTER_SLACK = 28 + PACK_TAIL.size + 64   # an encrypted table's nonce and tag, the trailer, malloc's headers


def start_pools(workers: int = 2) -> None:
    """Start the threads of the writer's shared pools now (a per-disk daemon does, at start): see
    :mod:`baton.workers`."""
    for name, n in (("baton-encode", workers), ("baton-pages", PAGE_UPLOADS), ("baton-upload", UPLOADERS)):
        prestart(shared_pool(name, n), n)


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
        self._page_pool = shared_pool("baton-pages", PAGE_UPLOADS)
        try:
            # Under the shared lock (no prune can run now): catch up with other clients (new index files, a
            # prune's rewrite, forgotten snapshots) and index packs no index file covers (lost index files):
            # an incremental references its parent's chunks by id, and they must stay findable. The listings
            # run here; loading the chunk index (a new daemon's first: its node cache, about 10 ms at 4 GiB)
            # and the heal run on the page pool, while the caller freezes the disk and issues its first reads.
            # Every chunk-index lookup waits for that load (the repository's lock); the first results taken
            # (_drain) and the commit raise its error, if it failed.
            repo.refresh()
            if parent is not None and parent.snapshot_id not in repo.snapshot_ids():
                raise RepoError(f"parent snapshot {parent.snapshot_id} was forgotten while this backup started",
                                hint="run the backup again")
            self._index_ready: Future[None] | None = self._page_pool.submit(repo.prepare_backup, refreshed=True)
        except BaseException:
            self._lock.release()
            raise
        root = bytes.fromhex(parent.root) if (parent is not None and mode == "incremental") else ZERO_ID
        self._base = TreeReader(root, disk.chunk_count, repo.load_page)
        self._fresh = root == ZERO_ID  # chunks not put are zero in the tree (full backup)
        self._changed: dict[int, list[bytes]] = {}
        self._pending: set[bytes] = set()                # in a pack of this writer, not yet in an index file
        # The process's shared threads (baton.workers): a daemon's backups reuse them instead of starting ~10.
        self._pool = shared_pool("baton-encode", workers)
        self._uploader = shared_pool("baton-upload", UPLOADERS)
        # Encode tasks in submission order: (chunk index, length) per chunk, and the task (None: zero chunks).
        self._inflight: deque[tuple[list[tuple[int, int]], Future[list[tuple[bytes, bytes | None, int]]] | None]] \
            = deque()
        self._inflight_bytes = 0
        # Chunks put but not yet handed to the pool: put_run calls are gathered into tasks of BATCH_BYTES.
        self._batch_items: list[tuple[int, int]] = []
        self._batch_payloads: list[bytes | memoryview] = []
        self._batch_bytes = 0
        self._uploads: deque[Future[tuple[list[tuple[bytes, IndexEntry]], int, bytearray]]] = deque()
        self._spare: list[bytearray] = []  # pack buffers stored and referenced by no one: filled again
        self._unindexed: list[tuple[bytes, IndexEntry]] = []
        self._packs_since_index = 0
        self._pack: bytearray | None = None             # the pack being filled, blobs copied in as they come
        self._pack_len = 0
        self._pack_entries: list[PackEntry] = []
        self._zero_cid = chunk_id(repo.keys, bytes(disk.chunk_size))
        self._pack_size = min(PACK_BYTES_MAX, repo.config.pack_target + disk.chunk_size + FOOTER_SLACK
                              + PACK_ENTRY.size * 64)
        self._start = time.time()
        self._checkpoints = 0
        self._state = "open"
        self._broken: BaseException | None = None
        self._stats = {"chunks_put": 0, "bytes_in": 0, "chunks_stored": 0, "bytes_stored": 0,
                       "chunks_deduplicated": 0, "zero_chunks": 0, "packs_written": 0, "pack_bytes": 0,
                       "index_files_written": 0, "tree_flushes": 0, "checkpoints": 0,
                       "bytes_not_read": 0}
        self._pages_before = repo.counter("pages_written")
        reuse_big_buffers()  # the engine's read buffers and the encoded chunks: see baton.device

    # ----- public API -----------------------------------------------------------------------------------------

    def put(self, chunk_index: int, data: bytes | bytearray | memoryview) -> None:
        """Store chunk ``chunk_index``. ``len(data)`` is the chunk size (less only for the disk's last chunk).

        All-zero data records the zero sentinel and stores nothing. Raises UsageError for a wrong index or
        length, the sticky error after a failure, and storage errors as they happen.
        """
        self.put_run(chunk_index, [data])

    def put_run(self, first: int, chunks: list[bytes | bytearray | memoryview]) -> None:
        """Store chunks ``first``, ``first+1``, ... Runs are gathered into encode tasks of about BATCH_BYTES (a
        task per chunk, or per short run of a scattered incremental, costs more in thread hand-offs than hashing
        a 64 KiB chunk); a task goes to the pool at once when the pool has nothing queued. Same contract as
        :meth:`put`. ``bytes`` and
        read-only views are kept as they are until encoded (no copy); mutable buffers are copied, since the
        caller may reuse them after this returns."""
        self._check_open()
        n = self.disk.chunk_count
        if not chunks:
            return
        if first < 0 or first + len(chunks) > n:
            bad = first if not 0 <= first < n else n
            raise UsageError(f"chunk index {bad} outside the disk (0..{n - 1})")
        cs = self.disk.chunk_size
        items: list[tuple[int, int]] = []
        payloads: list[bytes | memoryview] = []
        for k, data in enumerate(chunks):
            idx = first + k
            expected = min(cs, self.disk.size - idx * cs)
            if len(data) != expected:
                raise UsageError(f"chunk {idx}: {len(data)} bytes, expected {expected}")
            items.append((idx, expected))
            payloads.append(data if isinstance(data, bytes) or (isinstance(data, memoryview) and data.readonly)
                            else bytes(data))
        if not self._fresh:
            # The leaves these chunks land in load now, on the page pool, while the chunks are encoded: the
            # results are taken (and the leaves needed) a few MiB of encoding later, in this thread.
            for leaf_no in range(first // PAGE_FANOUT, (first + len(chunks) - 1) // PAGE_FANOUT + 1):
                if leaf_no not in self._changed and self._base.prefetching < PREFETCH_LEAVES:
                    self._base.prefetch_leaf(leaf_no, self._page_pool.submit)
        try:
            before = self._stats["chunks_put"]
            self._stats["chunks_put"] += len(items)
            nbytes = sum(length for _i, length in items)
            self._stats["bytes_in"] += nbytes
            self._batch_items += items
            self._batch_payloads += payloads
            self._batch_bytes += nbytes
            if self._batch_bytes >= BATCH_BYTES or not self._inflight:
                self._submit_batch()
            self._drain(MAX_INFLIGHT_BYTES)
            if before // 1024 != self._stats["chunks_put"] // 1024:
                self._lock.refresh()          # cheap unless the lock is old: long incrementals stay locked
        except BaseException as e:
            self._broken = e
            raise

    def _submit_batch(self) -> None:
        """Hand the chunks put since the last task to the encode pool as one task (in submission order)."""
        if self._batch_items:
            items, payloads = self._batch_items, self._batch_payloads
            self._batch_items, self._batch_payloads = [], []
            self._inflight.append((items, self._pool.submit(self._encode_group, payloads)))
            self._inflight_bytes += self._batch_bytes
            self._batch_bytes = 0

    def put_zero(self, chunk_index: int) -> None:
        """Record chunk ``chunk_index`` as all zeros without its data (a hole the caller did not read)."""
        self._check_open()
        n = self.disk.chunk_count
        if not 0 <= chunk_index < n:
            raise UsageError(f"chunk index {chunk_index} outside the disk (0..{n - 1})")
        expected = min(self.disk.chunk_size, self.disk.size - chunk_index * self.disk.chunk_size)
        try:
            self._stats["chunks_put"] += 1
            self._stats["bytes_in"] += expected
            self._submit_batch()  # results are taken in order: the chunks put before this one go first
            self._inflight.append(([(chunk_index, expected)], None))
            self._drain(MAX_INFLIGHT_BYTES)
        except BaseException as e:
            self._broken = e
            raise

    def put_zeros(self, first: int, count: int) -> None:
        """Record chunks first..first+count-1, none of them put before in this backup, as all zeros without
        their data (a hole the caller did not read). On a tree that starts empty (a full backup) this only
        counts them: every chunk not put yet is already zero there, so a hole costs nothing per chunk."""
        self._check_open()
        n = self.disk.chunk_count
        if count < 0 or not 0 <= first <= first + count <= n:
            raise UsageError(f"chunks {first}..{first + count - 1} outside the disk (0..{n - 1})")
        try:
            nbytes = min(count * self.disk.chunk_size, self.disk.size - first * self.disk.chunk_size)
            self._stats["chunks_put"] += count
            self._stats["bytes_in"] += nbytes
            self._stats["bytes_not_read"] += nbytes
            self._stats["zero_chunks"] += count
            if not self._fresh:
                for c in range(first, first + count):
                    self._set(c, ZERO_ID)
                if len(self._changed) > MAX_CHANGED_LEAVES:
                    self._drain(0)
                    self._flush_all()
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
            release_free_memory()  # the batch's freed buffers, scattered through the heap, go back to the kernel
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
        self._batch_items, self._batch_payloads, self._batch_bytes = [], [], 0
        self._shutdown()
        self._lock.release()

    def statistics(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self._stats)
        s["pages_written"] = self.repo.counter("pages_written") - self._pages_before
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

    def _zero_id(self, length: int) -> bytes:
        if length == self.disk.chunk_size:
            return self._zero_cid
        return chunk_id(self.repo.keys, bytes(length))

    def _encode_group(self, payloads: list[bytes | memoryview]) -> list[tuple[bytes, bytes | None, int]]:
        """(chunk id, stored bytes or None, flags) per chunk; ZERO_ID for an all-zero chunk. Zero chunks are
        recognised by their id (the keyed hash is computed anyway; comparing a view with a zero buffer costs
        more than hashing it). Runs on the encode pool."""
        out: list[tuple[bytes, bytes | None, int]] = []
        for data in payloads:
            cid = chunk_id(self.repo.keys, data)
            if cid == self._zero_id(len(data)):
                out.append((ZERO_ID, None, 0))
            elif self.repo.has_chunk(cid) or cid in self._pending:
                out.append((cid, None, 0))  # dedup: skip compressing and encrypting
            else:
                stored, flags = encode_blob(self.repo.keys, cid, data)
                out.append((cid, stored, flags))
        return out

    def _drain(self, keep: int) -> None:
        """Take results in submission order until at most ``keep`` bytes remain queued (and the head is not
        done)."""
        if keep == 0:
            self._submit_batch()
        if self._index_ready is not None and (keep == 0 or self._index_ready.done()):
            ready, self._index_ready = self._index_ready, None
            ready.result()  # the chunk index this backup deduplicates against, and its heal: loaded, or the error
        while self._inflight and (self._inflight_bytes > keep or
                                  self._inflight[0][1] is None or self._inflight[0][1].done()):
            items, fut = self._inflight.popleft()
            if fut is None:
                for idx, _length in items:
                    self._stats["zero_chunks"] += 1
                    self._set(idx, ZERO_ID)
                continue
            self._inflight_bytes -= sum(length for _i, length in items)
            results = fut.result()
            for (idx, length), (cid, stored, flags) in zip(items, results, strict=True):
                if cid == ZERO_ID:
                    self._stats["zero_chunks"] += 1
                    self._set(idx, ZERO_ID)
                    continue
                if self.repo.has_chunk(cid) or cid in self._pending:
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
        if self._pack is not None and (self._pack_len + len(stored) + FOOTER_SLACK
                                       + PACK_ENTRY.size * (len(self._pack_entries) + 1) > PACK_BYTES_MAX):
            self._seal_pack()
        if self._pack is None:
            head = pack_head(self.repo.keys.encrypted)
            # One buffer per pack, sized for the whole pack (a table that does not fit grows it), filled again for
            # a later pack once stored (at most two per writer): below the allocator's mmap threshold, so it
            # reuses the memory of buffers freed before (see PACK_BYTES_MAX).
            # (Anonymous mappings faulted in on the page pool, off the GIL, cost this thread less but raised the
            # peak RSS of a full backup of a 4 GiB image by 20 MiB: they never reuse the heap's free memory.)
            spare = self._take_spare()
            if spare is None:
                # Not zeroed (every byte of a pack is written before it is read), and its pages faulted in off
                # this thread and the GIL: about 10 ms of this thread, with the GIL held, per new buffer before.
                spare = uninitialized_bytearray(self._pack_size)
                self._page_pool.submit(populate, spare)
            self._pack = spare
            self._pack[:len(head)] = head
            self._pack_len = len(head)
        self._pack_entries.append(PackEntry(cid, self._pack_len, len(stored), raw_length, flags))
        end = self._pack_len + len(stored)
        self._pack[self._pack_len:end] = stored  # copied in now: the encoded blob is freed at once
        self._pack_len = end
        self._pending.add(cid)
        self._stats["chunks_stored"] += 1
        self._stats["bytes_stored"] += len(stored)
        if self._pack_len >= self.repo.config.pack_target:
            self._seal_pack()

    def _seal_pack(self) -> None:
        """Hand the current pack to the uploader thread, which joins, names, checks and stores it (that
        work then overlaps with this thread's); at most MAX_UPLOADS packs wait for it besides the one it
        stores."""
        if self._pack is None or not self._pack_entries:
            return
        buf, pack_entries, length = self._pack, self._pack_entries, self._pack_len
        self._pack = None
        self._pack_entries = []
        self._pack_len = 0
        self._stats["packs_written"] += 1
        while len(self._uploads) > MAX_UPLOADS:
            self._finish_upload()
        self._uploads.append(self._uploader.submit(self._store_pack, buf, pack_entries, length))
        self._packs_since_index += 1
        if self._packs_since_index >= INDEX_EVERY_PACKS:
            self._write_index()
        self._lock.refresh()

    def _store_pack(self, buf: bytearray, pack_entries: list[PackEntry], length: int
                    ) -> tuple[list[tuple[bytes, IndexEntry]], int, bytearray]:
        """(Uploader thread.) Seal, check, name and store one pack; returns its index entries, its size and
        the buffer (which the caller fills again if nothing else holds it).

        ``buf`` holds the blobs in its first ``length`` bytes; the table and trailer go after them, and the
        store is handed a view of the pack's bytes, not a copy. The buffer keeps its length (its allocation),
        so filling it again never resizes it. Nothing writes to it while anything else holds it (a store may
        keep a reference, as obstore's memory store does: see :meth:`_finish_upload`)."""
        footer = pack_footer(pack_entries, length, self.repo.keys.data_key)
        size = length + len(footer)
        buf[length:size] = footer  # grows the buffer only if the table does not fit (small pack_target)
        view = memoryview(buf)[:size]
        self._check_pack(view, pack_entries)
        pid = blake3.blake3(view).digest()
        self.repo.store.put_if_absent(pack_key(pid), cast(bytes, view))  # any bytes-like object; see above
        try:
            view.release()
        except BufferError:
            pass  # the store holds the view: _finish_upload will not fill the buffer again
        return [(e.chunk_id, IndexEntry(pid, e.offset, e.stored_length, e.raw_length, e.flags))
                for e in pack_entries], size, buf

    def _check_pack(self, data: memoryview, pack_entries: list[PackEntry]) -> None:
        """Re-read the pack we built (its trailer and table) before it leaves the process: a writer bug
        must fail this backup, not surface at restore time."""
        tail = bytes(data[-PACK_TAIL.size:])
        _f, _n, off, length = parse_pack_tail(tail, len(data), "new pack")
        table = parse_pack_table(bytes(data[off:off + length]), tail, "new pack", self.repo.keys.data_key)
        if table != pack_entries:
            raise RepoError("internal error: a new pack's table does not match what was written")

    def _finish_upload(self) -> None:
        fut = self._uploads.popleft()
        entries, size, buf = fut.result()
        del fut  # its result holds the buffer too
        self._stats["pack_bytes"] += size
        self._unindexed.extend(entries)
        # At most MAX_UPLOADS + 2 buffers in all (the one filled, those stored): after an index file or a flush
        # waited for every upload, both are spare, and the next two packs make none. Whether the store let go
        # of it is asked only when it is needed (_take_spare): the uploader thread may still hold it for a
        # moment after the result is set.
        if len(self._spare) + (self._pack is not None) <= MAX_UPLOADS + 1:
            self._spare.append(buf)

    def _take_spare(self) -> bytearray | None:
        """The buffer of a stored pack that nothing else holds any more, to fill again; None if there is none.
        A store may keep what it was given (obstore's memory store keeps the object): such a buffer is the
        store's, and is dropped here. 2 = ``buf`` and getrefcount's argument."""
        while self._spare:
            buf = self._spare.pop()
            if sys.getrefcount(buf) == 2:
                return buf
        return None

    def _write_index(self) -> None:
        while self._uploads:
            self._finish_upload()
        if self._unindexed:
            self.repo.write_index_file(self._unindexed)     # also merges into the repository's index
            self._stats["index_files_written"] += 1
            for cid, _e in self._unindexed:
                self._pending.discard(cid)
            self._unindexed = []
        self._packs_since_index = 0

    def _flush_all(self) -> None:
        """Drain the pipeline; store the last pack and the index file, and the changed pages at the same time
        (nothing refers to either until a manifest does, which comes after both); rebase on the new root."""
        self._drain(0)
        self._seal_pack()
        root, pages = self._build_root()
        try:
            self._write_index()
            for f in pages:
                f.result()
        finally:
            finish(pages)  # after an error: none of this writer's page stores runs on (else all are done)
        finish(self._base.drop_prefetched())  # every chunk put was taken: none is still needed
        self._base = TreeReader(root, self.disk.chunk_count, self.repo.load_page)
        self._changed = {}
        self._stats["tree_flushes"] += 1

    def _build_root(self) -> tuple[bytes, list[Future[bytes]]]:
        """The new root, and the stores of the changed pages, running on the page pool (concurrently: on a
        local store each is two fsyncs, which the file system's journal then commits together). The caller
        waits for every one of them before any manifest names the root."""
        from baton.repo.tree import build_tree

        futs: list[Future[bytes]] = []

        def store_page(level: int, ids: list[bytes]) -> bytes:
            pid = self.repo.page_id_of(level, ids)
            if pid != ZERO_ID:
                futs.append(self._page_pool.submit(self.repo.store_page, level, ids))
            return pid

        try:
            root = build_tree(self._base, self._changed, store_page)
        except BaseException:
            finish(futs)
            raise
        return root, futs

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
        # The pools are shared: this writer's own tasks are cancelled or waited for, never the pools shut down.
        finish([*(fut for _items, fut in self._inflight), *self._uploads, *self._base.drop_prefetched(),
                *([self._index_ready] if self._index_ready is not None else [])])
        self._index_ready = None
        self._inflight.clear()
        self._uploads.clear()
        self._spare.clear()  # the pack buffers go before the allocator is asked to give memory back
        self._pack = None
        self._page_pool.submit(release_free_memory)  # 2-4 ms of malloc_trim, off the commit's path
