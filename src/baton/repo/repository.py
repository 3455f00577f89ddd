"""The repository: configuration, chunk index, snapshots and page access over a byte store.

Object layout (docs/format.md, part 2)::

    config                       RepoConfig (envelope BTNCONFG)
    packs/<2 hex>/<64 hex>       packs, named by the unkeyed BLAKE3 of their bytes
    index/<64 hex>               chunk-index files (envelope BTNINDEX), named by BLAKE3 of their bytes
    pages/<2 hex>/<64 hex>       index pages (envelope BTNIPAGE), named by their keyed page id
    snapshots/<32 hex>           manifests (envelope BTNSNAP), the commit points
    locks/exclusive, locks/shared-<id>
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import blake3

from baton.errors import ObjectNotFound, RepoCorrupt, RepoError, RepoNotFound, UsageError
from baton.format.repo_envelope import MAGIC_INDEX, MAGIC_PAGE, MAGIC_SNAPSHOT, seal, unseal
from baton.format.repo_index import ZERO_ID, IndexEntry, decode_page, encode_index, encode_page, iter_index
from baton.repo.chunkindex import ChunkIndex
from baton.repo.crypto import decode_blob
from baton.repo.keys import RepoConfig, RepoKeys, create_key_file, new_config, read_key_file, unlock
from baton.repo.locks import RepoLock
from baton.repo.model import DiskIdentity, Manifest
from baton.repo.tree import SubmitLoad, TreeReader
from baton.storage import ObjectInfo, RetryPolicy, Store, open_store

PACK_TARGET = 16 << 20  # new repositories (each keeps its own in its config): see docs/format.md, pack_target
INDEX_FILE_ENTRIES = 200_000  # entries per index file written by prune, rebuild-index and heal_index (~17 MiB raw)
CONFIG_KEY = "config"
KEY_FILE_ENV = "BATON_KEY_FILE"


def pack_key(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


def page_key(page_id: bytes) -> str:
    h = page_id.hex()
    return f"pages/{h[:2]}/{h}"


def snapshot_key(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}"


def _resolve_key_file(key_file: str | None) -> str | None:
    return key_file or os.environ.get(KEY_FILE_ENV) or None


@dataclass(frozen=True)
class ChunkLocation:
    chunk_id: bytes
    entry: IndexEntry


class Repository:
    """An open repository. Thread-safe for reads; a backup is a ``baton.repo.writer.BackupWriter`` built on
    it (the writer depends on the repository, never the other way round).

    Use :meth:`init` or :meth:`open`; both raise the errors listed on them and never leave a half-open object.
    """

    def __init__(self, url: str, store: Store, config: RepoConfig, keys: RepoKeys) -> None:
        self.url = url
        self.store = store
        self.config = config
        self.keys = keys
        self._index: ChunkIndex | None = None
        self._index_files: set[str] = set()
        self._indexed_packs: set[bytes] = set()  # packs that the loaded index files cover
        self._healed = False  # heal_index ran since the index was last (re)loaded from scratch
        # The index may hold entries of index files it does not count as loaded (forget_index_files until the
        # next invalidate_index, a file that failed half-way): it must not be saved as a cache then.
        self._unsaveable = False
        self._saved_keys: frozenset[str] = frozenset()  # the index files the last cache saved or loaded covers
        self._save_lock = threading.Lock()               # one cache save at a time
        self._save_thread: threading.Thread | None = None
        self._cache_problem = ""                         # why the last cache was not used or not saved
        self._manifests: dict[str, Manifest] = {}
        self._lock = threading.RLock()
        self._stats = {"chunks_read": 0, "bytes_read": 0, "pages_read": 0, "pages_written": 0,
                       "index_files_loaded": 0, "index_files_from_cache": 0, "index_cache_hits": 0,
                       "index_cache_misses": 0, "index_cache_stale": 0, "index_cache_discarded": 0,
                       "index_cache_saves": 0, "index_cache_save_failed": 0}

    # ----- lifecycle -------------------------------------------------------------------------------------------

    @classmethod
    def init(cls, url: str, *, encryption: str = "none", key_file: str | None = None,
             store: Store | None = None, pack_target: int = PACK_TARGET) -> Repository:
        """Create a repository at ``url``. RepoError if one exists there.

        With ``encryption="aes-256-gcm"`` the key file is read if it exists (it must be mode 0600 or
        stricter) or created with a new random key if it does not.
        """
        st = store if store is not None else open_store(url)
        key_file = _resolve_key_file(key_file)
        secret: bytes | None = None
        if encryption != "none":
            if not key_file:
                raise UsageError("--encryption aes-256-gcm needs --key-file FILE (created if missing)")
            secret = read_key_file(key_file) if os.path.exists(key_file) else create_key_file(key_file)
        elif key_file:
            raise UsageError("--key-file is only used with --encryption aes-256-gcm")
        cfg, keys = new_config(encryption, secret, pack_target)
        if any(True for _ in st.list("snapshots/")) or any(True for _ in st.list("packs/")):
            raise RepoError(f"{url} already holds repository data")
        if not st.put_if_absent(CONFIG_KEY, cfg.encode()):
            raise RepoError(f"a repository already exists at {url}")
        return cls(url, st, cfg, keys)

    @classmethod
    def open(cls, url: str, *, key_file: str | None = None, store: Store | None = None,
             read_only: bool = False, retry: RetryPolicy | None = None) -> Repository:
        """Open an existing repository. RepoNotFound if there is none; KeyError_ for a missing/wrong key."""
        if store is None:
            if "://" not in url and not os.path.isdir(url):
                raise RepoNotFound(f"no repository at {url} (no such directory)")
            st = open_store(url, read_only=read_only) if retry is None else \
                open_store(url, read_only=read_only, retry=retry)
        else:
            st = store
        try:
            raw = st.get(CONFIG_KEY)
        except ObjectNotFound as e:
            raise RepoNotFound(f"no repository at {url} (no config object)") from e
        cfg = RepoConfig.decode(raw)
        key_file = _resolve_key_file(key_file)
        secret = read_key_file(key_file) if (key_file and cfg.encryption != "none") else None
        return cls(url, st, cfg, unlock(cfg, secret))

    def close(self) -> None:
        self.wait_index_cache_saved()
        self.store.close()

    # ----- chunk index -----------------------------------------------------------------------------------------

    def chunk_index(self) -> ChunkIndex:
        """The merged chunk index (loaded once, then kept up to date by this process's writers and
        :meth:`refresh`): a few bytes of RAM per chunk, the entries in files under ``BATON_CACHE_DIR``, see
        :mod:`baton.repo.chunkindex`. OSError if that directory can't hold them (nothing stays half-loaded)."""
        with self._lock:
            if self._index is None:
                self.reload_index()
            assert self._index is not None
            return self._index

    def reload_index(self, keys: set[str] | None = None) -> None:
        """Load index files not seen yet (other clients' backups since open). ``keys``: the listing of
        ``index/`` if the caller has one.

        A first load starts from this node's chunk-index cache when it has a valid one for the repository
        (:mod:`baton.repo.indexcache`: the same key, every index file it covers still listed), so only the
        files added since are read; else from nothing. A load that read index files saves the cache in a
        background thread (:meth:`save_index_cache`).

        The files' entries are staged (written to a file, never all held as Python objects) in key order, so a
        later file's entry for a chunk wins, and become visible together at the end, also when a file fails to
        load (a store error, a corrupt file: the error propagates, the files loaded so far count as loaded). If
        the staged entries can't be made visible (the cache directory is full), the whole in-memory index is
        dropped and the next use loads it again, rather than working from an index that silently lacks files it
        counts as loaded (STYLE 9)."""
        loaded = 0
        with self._lock:
            fresh = self._index is None
            if fresh:
                # From nothing: what write_index_file noted while no index was loaded is read again too.
                self.invalidate_index()
                self._index = ChunkIndex()
            index = self._index
            assert index is not None
            half = False
            try:
                if keys is None:
                    keys = {o.key for o in self.store.list("index/")}
                if fresh:
                    self._load_cached_index(index, keys)
                for key in sorted(keys - self._index_files):
                    entries = self.iter_index_file(key)   # fetched and checked whole: errors come from here
                    half = True
                    index.update(self._noting_packs(entries), merge=False)
                    half = False
                    self._index_files.add(key)
                    self._stats["index_files_loaded"] += 1
                    loaded += 1
            finally:
                if half:
                    self._unsaveable = True
                try:
                    index.maybe_merge()
                except BaseException:
                    self.invalidate_index()
                    raise
        if loaded:
            self.save_index_cache(background=True)

    # ----- the node-local chunk-index cache (baton.repo.indexcache) -------------------------------------------

    def _load_cached_index(self, index: ChunkIndex, keys: set[str]) -> None:
        """Start the empty ``index`` from the cache when it is valid for the listing ``keys`` (caller holds the
        lock). A cache that is missing, stale or fails a check is counted and left alone (the next save
        replaces it); the index then stays empty and every file is loaded from the repository."""
        from baton.repo import indexcache

        where = indexcache.cache_dir()
        if where is None:
            return
        try:
            got = indexcache.load(where, self.keys, keys)
            if got is not None:
                index.restore(got.snapshot, got.overlay)
        except indexcache.Stale as e:
            self._stats["index_cache_stale"] += 1
            self._cache_problem = f"load: {e}"
            return
        except (indexcache.Discard, ValueError, OSError) as e:
            self._stats["index_cache_discarded"] += 1
            self._cache_problem = f"load: {e}"
            with contextlib.suppress(OSError):   # not read again; the next save writes every file anew
                indexcache.remove(where, self.keys)
            return
        if got is None:
            self._stats["index_cache_misses"] += 1
            return
        self._index_files = set(got.keys)
        self._indexed_packs = set(got.snapshot.packs)   # the packs the covered index files name: heal skips them
        # The saver healed its index: every pack then was covered by an index file this cache covers, and a
        # covered file gone since makes the cache stale (not used). A pack stored since is either named by an
        # index file listed now (loaded next) or was never named by any (a backup that died before its index
        # file: referenced by nothing), so this process's heal would find nothing to do (prepare_backup).
        self._healed = got.healed
        self._saved_keys = got.keys
        self._stats["index_cache_hits"] += 1
        self._stats["index_files_from_cache"] += len(got.keys)

    def save_index_cache(self, *, background: bool | None = False) -> None:
        """Save the loaded chunk index as this node's cache of the repository (:mod:`baton.repo.indexcache`),
        unless it covers no index file beyond the last cache saved or loaded. ``background``: False, in this
        thread; True, in a background thread (:meth:`wait_index_cache_saved`); None, in this thread when only
        the manifest is to be written (the runs are saved already: a few ms), else in the background (a new
        run must be made durable and named: a first load's, or a merge's since the last save, which is
        I/O in proportion to the index). Never raises: a cache that can't be written (no usable directory,
        read-only, ENOSPC) is counted (``index_cache_save_failed``) and the caller carries on without it.

        The index and the set of index files it covers are taken together under the repository's lock, so
        the cache holds exactly the entries of the files it names (write_index_file adds both under it)."""
        from baton.repo import indexcache

        if os.environ.get(indexcache.DISABLE_ENV, "").strip().lower() in indexcache.OFF:
            return
        with self._lock:
            index = self._index
            if index is None or self._unsaveable or self._index_files <= self._saved_keys:
                return
            snap = index.snapshot()
            if snap is None:
                return
            covered = frozenset(self._index_files)
            healed = self._healed   # taken with the snapshot: a heal's index files are in it when this is True
        if background is None:
            background = any(r is not None and r.saved is None for r in (snap.base, snap.small))
        if not background:
            self._save_cached(indexcache, index, snap, covered, healed)
            return
        t = threading.Thread(target=self._save_cached, args=(indexcache, index, snap, covered, healed),
                             name="baton-index-cache-save", daemon=True)
        with self._lock:
            self._save_thread = t
        _pending_saves.add(t)
        t.start()

    def _save_cached(self, indexcache: Any, index: ChunkIndex, snap: Any, covered: frozenset[str],
                     healed: bool) -> None:
        with self._save_lock:
            with self._lock:
                if index is not self._index or covered <= self._saved_keys:   # dropped, or saved newer since
                    return
            try:
                where = indexcache.cache_dir()
                if where is None:
                    raise OSError("no usable cache directory")
                indexcache.save(where, self.keys, snap, covered, healed=healed)
            except Exception as e:  # derived state: a backup never fails for its cache
                with self._lock:
                    self._stats["index_cache_save_failed"] += 1
                    self._cache_problem = f"save: {e}"
                return
            with self._lock:
                if index is self._index:
                    self._saved_keys = covered
                self._stats["index_cache_saves"] += 1

    def wait_index_cache_saved(self) -> None:
        """Wait for a background cache save (tests, and :meth:`close`)."""
        with self._lock:
            t = self._save_thread
        if t is not None:
            t.join()

    def _noting_packs(self, entries: Iterator[tuple[bytes, IndexEntry]]) -> Iterator[tuple[bytes, IndexEntry]]:
        """``entries`` passed through, each pack they name added to the packs the loaded index files cover."""
        packs = self._indexed_packs
        last = b""
        for cid, e in entries:
            if e.pack_id is not last:  # entries of one pack share one bytes object (iter_index)
                last = e.pack_id
                packs.add(last)
            yield cid, e

    def refresh(self, *, load: bool = False) -> dict[str, int]:
        """Catch up with what other clients did since this object last looked, without reloading the index.

        A long-lived Repository (the per-disk daemon keeps one between backups, see :class:`RepoCache`) must
        notice other nodes' backups, forgets and prunes. Two listings tell it (``index/`` and ``snapshots/``):

        * index files not seen yet are loaded (other clients' backups: the index only grows between prunes);
        * an index file that vanished means a prune rewrote the index (or index files were lost): the
          in-memory index is dropped and reloaded, and the next :meth:`prepare_backup` heals it;
        * cached manifests whose objects vanished (forgotten) are dropped, so a forgotten snapshot is never
          picked as a parent.

        Call it under the repository's shared lock when the answer must hold for an operation (a backup does,
        in :meth:`prepare_backup`). Returns counts: ``index_files_new``, ``index_files_gone``,
        ``manifests_dropped``. Storage errors propagate."""
        keys = {o.key for o in self.store.list("index/")}
        snaps = {o.key.split("/", 1)[1] for o in self.store.list("snapshots/")}
        with self._lock:
            gone = self._index_files - keys
            new = keys - self._index_files
            dropped = [sid for sid in self._manifests if sid not in snaps]
            for sid in dropped:
                del self._manifests[sid]
            if gone:
                self.invalidate_index()
            if self._index is not None or load:   # load: a first load takes this listing (not a second one)
                self.reload_index(keys)
            self._stats["refreshes"] = self._stats.get("refreshes", 0) + 1
        return {"index_files_new": len(new), "index_files_gone": len(gone), "manifests_dropped": len(dropped)}

    def prepare_backup(self, *, refreshed: bool = False) -> None:
        """Make the chunk index current for a backup that holds the shared lock: :meth:`refresh` (unless the
        caller just did: the backup writer refreshes before the freeze and calls this on its page pool, where
        the index loads if none is loaded yet), then :meth:`heal_index` the first time (per loaded index) only.

        Why only then: a pack no index file covers comes from lost index files, or from a backup that died
        between a pack upload and its index file (its packs are referenced by nothing). The first case shows
        up here as vanished index files (which drops the index, so the heal runs again) or predates the
        index load (the first heal covers it: this process's, or the one of the process that saved the node's
        chunk-index cache this index started from, when it had healed: FLAG_HEALED); the second needs no heal (dedup only misses; restore, verify
        and prune heal on their own). Listing every pack on every backup cost a fixed ~10-80 ms locally and
        grows with the repository (one LIST per 1000 packs on S3)."""
        if not refreshed:
            self.refresh(load=True)
        self._heal_once()

    def _heal_once(self) -> int:
        """:meth:`heal_index`, unless it already ran since the index was loaded: packs it could not index are
        damaged (verify names them), and listing every pack again per missing chunk would cost a LIST each."""
        self.chunk_index()  # loaded first: a cache saved after a heal counts as this process's heal
        with self._lock:
            if self._healed:
                return 0
        healed = self.heal_index()
        with self._lock:
            self._healed = True
        return healed

    def has_chunk(self, chunk_id: bytes) -> bool:
        """Whether the loaded chunk index holds ``chunk_id`` (no heal on a miss: for dedup, where a miss
        only stores the chunk again). Thread-safe."""
        with self._lock:
            index = self._index
        if index is None:
            index = self.chunk_index()
        return chunk_id in index

    def read_index_file(self, key: str) -> list[tuple[bytes, IndexEntry]]:
        return list(self.iter_index_file(key))

    def iter_index_file(self, key: str) -> Iterator[tuple[bytes, IndexEntry]]:
        """The entries of index file ``key``, decoded as they are taken. The whole file is fetched and checked
        (its name, its seal, its length) before the first entry: RepoCorrupt and the format errors come from
        this call, never half-way through the entries."""
        data = self.store.get(key)
        if blake3.blake3(data).hexdigest() != key.rsplit("/", 1)[-1]:
            raise RepoCorrupt(f"{key}: content does not match its name")
        return iter_index(unseal(data, MAGIC_INDEX, key=self.keys.data_key, name=key), key)

    def write_index_file(self, entries: list[tuple[bytes, IndexEntry]]) -> str:
        """Store a chunk-index file; returns its key. The packs it names must already be stored."""
        data = seal(MAGIC_INDEX, encode_index(entries), compress=True, key=self.keys.data_key)
        key = f"index/{blake3.blake3(data).hexdigest()}"
        self.store.put_if_absent(key, data)
        with self._lock:
            if self._index is not None:
                self._index.update(entries)
            self._indexed_packs.update(e.pack_id for _c, e in entries)
            self._index_files.add(key)
        return key

    def read_pack_table(self, obj: ObjectInfo) -> list[tuple[bytes, IndexEntry]]:
        """The index entries of one pack, from the pack's own trailer and table (two ranged reads).
        RepoCorrupt or ValueError when the pack fails its checks."""
        from baton.format.repo_pack import PACK_TAIL, parse_pack_table, parse_pack_tail

        pid = bytes.fromhex(obj.key.rsplit("/", 1)[-1])
        tail = self.store.get_range(obj.key, obj.size - PACK_TAIL.size, PACK_TAIL.size)
        _f, _n, off, length = parse_pack_tail(tail, obj.size, obj.key)
        table = self.store.get_range(obj.key, off, length)
        return [(pe.chunk_id, IndexEntry(pid, pe.offset, pe.stored_length, pe.raw_length, pe.flags))
                for pe in parse_pack_table(table, tail, obj.key, self.keys.data_key)]

    def heal_index(self) -> int:
        """Index every pack that no index file covers, and return how many there were.

        The chunk index is derived state (STYLE 9): its files can be lost, and a backup that died between a
        pack upload and its next index file leaves a pack nobody indexed. A snapshot may reference chunks in
        such packs (an incremental's unchanged chunks come from its parent's tree, not from the index), so
        backups call this before they start and restore/verify on a chunk the index lacks: the pack tables
        are read (two ranged reads a pack) and written as new index files. Index files only add, so this is
        safe under the shared lock. Packs that fail their checks are skipped (verify names them)."""
        index = self.chunk_index()
        with self._lock:
            covered = set(self._indexed_packs)
        entries: list[tuple[bytes, IndexEntry]] = []
        healed = 0
        for obj in self.store.list("packs/"):
            try:
                pid = bytes.fromhex(obj.key.rsplit("/", 1)[-1])
            except ValueError:
                continue
            if pid in covered:
                continue
            try:
                found = self.read_pack_table(obj)
            except (RepoCorrupt, ValueError, ObjectNotFound):
                continue
            entries += [(cid, e) for cid, e in found if cid not in index]
            healed += 1
            with self._lock:
                self._indexed_packs.add(pid)
        for i in range(0, len(entries), INDEX_FILE_ENTRIES):
            self.write_index_file(entries[i : i + INDEX_FILE_ENTRIES])
        with self._lock:
            self._stats["packs_healed"] = self._stats.get("packs_healed", 0) + healed
        return healed

    def find(self, chunk_id: bytes) -> IndexEntry | None:
        """The index entry of a chunk; on a miss, heal the index once (see :meth:`heal_index`) and look again."""
        entry = self.chunk_index().get(chunk_id)
        if entry is None and self._heal_once():
            entry = self.chunk_index().get(chunk_id)
        return entry

    def invalidate_index(self) -> None:
        """Drop the in-memory chunk index; the next use reloads it from the store (after prune)."""
        with self._lock:
            self._index = None  # its file closes when the last reader lets go
            self._index_files = set()
            self._indexed_packs = set()
            self._healed = False
            self._unsaveable = False
            self._saved_keys = frozenset()

    def forget_index_files(self, keys: list[str]) -> None:
        """Stop counting ``keys`` as loaded (prune deleted them). Their entries stay in the index until
        :meth:`invalidate_index`, so until then it is never saved as a cache."""
        with self._lock:
            self._index_files.difference_update(keys)
            self._unsaveable = True

    def lookup(self, chunk_id: bytes) -> IndexEntry:
        entry = self.find(chunk_id)
        if entry is None:
            raise RepoCorrupt(f"chunk {chunk_id.hex()} is in no pack of the repository (missing data)",
                              hint="run `baton verify` to list every damaged snapshot")
        return entry

    def read_blob(self, entry: IndexEntry) -> bytes:
        return self.store.get_range(pack_key(entry.pack_id), entry.offset, entry.stored_length)

    def read_chunk(self, chunk_id: bytes, raw_length: int | None = None) -> bytes:
        """The plaintext of a chunk, verified against its id. RepoCorrupt names the chunk (and pack) on failure.

        ZERO_ID gives ``raw_length`` zero bytes (the caller must pass the length for that case).
        """
        if chunk_id == ZERO_ID:
            if raw_length is None:
                raise ValueError("the zero chunk needs an explicit length")
            return bytes(raw_length)
        entry = self.lookup(chunk_id)
        try:
            stored = self.read_blob(entry)
        except ObjectNotFound as e:
            raise RepoCorrupt(f"chunk {chunk_id.hex()}: its pack {entry.pack_id.hex()} is missing") from e
        if len(stored) != entry.stored_length:
            raise RepoCorrupt(f"chunk {chunk_id.hex()}: pack {entry.pack_id.hex()} is truncated")
        try:
            data = decode_blob(self.keys, chunk_id, stored, entry.flags, entry.raw_length)
        except RepoCorrupt as e:
            raise RepoCorrupt(f"{e} in pack {entry.pack_id.hex()}") from e
        with self._lock:
            self._stats["chunks_read"] += 1
            self._stats["bytes_read"] += len(stored)
        return data if isinstance(data, bytes) else bytes(data)

    def read_chunks(self, items: list[tuple[bytes, IndexEntry]]) -> dict[bytes, bytes]:
        """Plaintexts of chunks that lie in one pack, fetched with a single ranged read and each verified.

        ``items`` must share a pack; they are read from the lowest offset to the end of the highest blob, so
        callers keep runs dense (see :func:`coalesce`). RepoCorrupt names the first bad chunk and its pack.
        """
        out: dict[bytes, bytes] = {}

        def keep(cid: bytes, plain: bytes | memoryview) -> None:
            out[cid] = plain if isinstance(plain, bytes) else bytes(plain)

        self.read_run(items, keep)
        return out

    def read_run(self, items: list[tuple[bytes, IndexEntry]],
                 put: Callable[[bytes, bytes | memoryview], None]) -> None:
        """:meth:`read_chunks` for a caller that places each plaintext itself (restore copies it into its
        aligned write buffer): ``put(chunk_id, plaintext)`` per chunk, in ``items`` order, each verified
        before it is handed over. A plaintext may be a view into the fetched range (a stored-raw chunk is not
        copied): ``put`` must copy what it keeps. RepoCorrupt names the first bad chunk and its pack."""
        pack_id = items[0][1].pack_id
        start = min(e.offset for _c, e in items)
        end = max(e.offset + e.stored_length for _c, e in items)
        try:
            data = self.store.get_range(pack_key(pack_id), start, end - start)
        except ObjectNotFound as missing:
            raise RepoCorrupt(f"chunk {items[0][0].hex()}: its pack {pack_id.hex()} is missing") from missing
        view = memoryview(data)
        for cid, e in items:
            blob = view[e.offset - start:e.offset - start + e.stored_length]
            if len(blob) != e.stored_length:
                raise RepoCorrupt(f"chunk {cid.hex()}: pack {pack_id.hex()} is truncated")
            try:
                plain = decode_blob(self.keys, cid, blob, e.flags, e.raw_length)
            except RepoCorrupt as err:
                raise RepoCorrupt(f"{err} in pack {pack_id.hex()}") from err
            put(cid, plain)
        with self._lock:
            self._stats["chunks_read"] += len(items)
            self._stats["bytes_read"] += len(data)

    # ----- pages -----------------------------------------------------------------------------------------------

    def page_id(self, body: bytes) -> bytes:
        return blake3.blake3(body, key=self.keys.id_key).digest()

    def page_id_of(self, level: int, ids: list[bytes]) -> bytes:
        """The id :meth:`store_page` gives these ids (ZERO_ID for an all-zero page), without storing it."""
        if all(i == ZERO_ID for i in ids):
            return ZERO_ID
        return self.page_id(encode_page(level, ids))

    def store_page(self, level: int, ids: list[bytes]) -> bytes:
        """Store a page (if new) and return its id; an all-zero page is ZERO_ID and not stored."""
        if all(i == ZERO_ID for i in ids):
            return ZERO_ID
        body = encode_page(level, ids)
        pid = self.page_id(body)
        if self.store.put_if_absent(page_key(pid), seal(MAGIC_PAGE, body, compress=True, key=self.keys.data_key)):
            with self._lock:
                self._stats["pages_written"] += 1
        return pid

    def load_page(self, page_id: bytes) -> tuple[int, list[bytes]]:
        key = page_key(page_id)
        try:
            data = self.store.get(key)
        except ObjectNotFound as e:
            raise RepoCorrupt(f"index page {page_id.hex()} is missing") from e
        body = unseal(data, MAGIC_PAGE, key=self.keys.data_key, name=key)
        if self.page_id(body) != page_id:
            raise RepoCorrupt(f"index page {page_id.hex()}: content does not match its id")
        with self._lock:
            self._stats["pages_read"] += 1
        return decode_page(body, key)

    def tree(self, manifest: Manifest) -> TreeReader:
        t = TreeReader(bytes.fromhex(manifest.root), manifest.disk.chunk_count, self.load_page)
        if t.depth != manifest.tree_depth:
            raise RepoCorrupt(f"snapshot {manifest.snapshot_id}: tree depth {manifest.tree_depth} does not fit "
                              f"{manifest.disk.chunk_count} chunks")
        return t

    def snapshot_reader(self, manifest: Manifest) -> SnapshotReader:
        return SnapshotReader(self, manifest)

    # ----- snapshots -------------------------------------------------------------------------------------------

    def write_manifest(self, m: Manifest) -> None:
        """Store a manifest. After a complete one (a backup's commit) the chunk index is saved as this node's
        cache (:meth:`save_index_cache`: in this thread, so a process killed after the commit has passed it,
        unless a run made since the last save must be saved too, which goes to the background)."""
        self.store.put(snapshot_key(m.snapshot_id),
                       seal(MAGIC_SNAPSHOT, m.encode_body(), compress=True, key=self.keys.data_key))
        if m.complete:
            self.save_index_cache(background=None)

    def read_manifest(self, snapshot_id: str) -> Manifest:
        """One manifest. Complete manifests never change, so they are cached; partial ones are re-read
        (a running backup overwrites its checkpoint)."""
        with self._lock:
            cached = self._manifests.get(snapshot_id)
        if cached is not None:
            return cached
        key = snapshot_key(snapshot_id)
        body = unseal(self.store.get(key), MAGIC_SNAPSHOT, key=self.keys.data_key, name=key)
        m = Manifest.decode_body(body, key)
        if m.snapshot_id != snapshot_id:
            raise RepoCorrupt(f"{key}: holds snapshot {m.snapshot_id}")
        if m.complete:
            with self._lock:
                self._manifests[snapshot_id] = m
        return m

    def snapshot_ids(self) -> list[str]:
        return [o.key.split("/", 1)[1] for o in self.store.list("snapshots/")]

    def snapshots(self, disk_uuid: str | None = None, include_partial: bool = False) -> list[Manifest]:
        """Manifests, oldest first (by start time), filtered by disk and completeness."""
        out = []
        for sid in self.snapshot_ids():
            try:
                m = self.read_manifest(sid)
            except ObjectNotFound:
                continue  # forgotten between list and get
            if disk_uuid is not None and m.disk.disk_uuid != disk_uuid:
                continue
            if not m.complete and not include_partial:
                continue
            out.append(m)
        out.sort(key=lambda m: (m.start_time, m.snapshot_id))
        return out

    def latest(self, disk_uuid: str, include_partial: bool = True) -> Manifest | None:
        """The newest snapshot of ``disk_uuid`` (parent lookup is by disk uuid, never by name)."""
        snaps = self.snapshots(disk_uuid, include_partial=include_partial)
        return snaps[-1] if snaps else None

    def get_snapshot(self, ref: str) -> Manifest:
        """A snapshot by id or unique prefix (>= 6 hex chars; "latest" picks the newest complete one)."""
        ref = ref.strip().lower()
        ids = self.snapshot_ids()
        if ref == "latest":
            snaps = self.snapshots()
            if not snaps:
                raise RepoError("the repository holds no complete snapshot")
            return snaps[-1]
        if len(ref) < 6 or any(c not in "0123456789abcdef" for c in ref):
            raise UsageError(f"snapshot reference {ref!r}: give at least 6 hex digits of its id")
        matches = [i for i in ids if i.startswith(ref)]
        if not matches:
            raise RepoError(f"no snapshot {ref} in the repository")
        if len(matches) > 1:
            raise RepoError(f"snapshot prefix {ref} is ambiguous ({len(matches)} matches); give more digits")
        return self.read_manifest(matches[0])

    def delete_snapshot(self, snapshot_id: str) -> None:
        self.store.delete(snapshot_key(snapshot_id))
        with self._lock:
            self._manifests.pop(snapshot_id, None)

    # ----- backup ----------------------------------------------------------------------------------------------

    @staticmethod
    def parent_problem(disk: DiskIdentity, parent: Manifest | None) -> str:
        """Why ``parent`` cannot be the parent of an incremental of ``disk`` ("" if it can).

        The backup engine turns a non-empty answer into a full backup with this text as its stated reason.
        """
        if parent is None:
            return "no earlier snapshot of this disk in the repository"
        if parent.disk.disk_uuid != disk.disk_uuid:
            return f"the latest snapshot {parent.snapshot_id[:12]} is of another disk ({parent.disk.disk_uuid})"
        if parent.disk.chunk_size != disk.chunk_size:
            return (f"chunk size changed from {parent.disk.chunk_size} to {disk.chunk_size} since snapshot "
                    f"{parent.snapshot_id[:12]}")
        if parent.disk.size != disk.size:
            return f"disk size changed from {parent.disk.size} to {disk.size} since snapshot {parent.snapshot_id[:12]}"
        return ""

    def shared_lock(self, op: str, node: str = "") -> RepoLock:
        return RepoLock.acquire_shared(self.store, op, node)

    def exclusive_lock(self, op: str, node: str = "") -> RepoLock:
        return RepoLock.acquire_exclusive(self.store, op, node)

    def counter(self, name: str) -> int:
        """One of the counters of :meth:`statistics` (e.g. ``pages_written``), without the rest: statistics
        counts the chunk index's entries, which walks its recent ones (about 20 ms at 23,000)."""
        with self._lock:
            return int(self._stats.get(name, 0))

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            mine: dict[str, Any] = dict(self._stats)
            mine["index_cache_problem"] = self._cache_problem
            mine["index_entries"] = len(self._index) if self._index is not None else 0
            if self._index is not None:
                mine["chunk_index"] = self._index.statistics()
        mine["store"] = self.store.statistics()
        return mine


# Background cache saves still running when the interpreter exits are waited for, up to SAVE_EXIT_WAIT seconds
# in all (a CLI restore that exits right after its load still leaves a cache; a stuck file system can't hold
# the exit up for long, and a save cut short leaves no cache that loads).
SAVE_EXIT_WAIT = 30.0
_pending_saves: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


@atexit.register
def _wait_for_saves() -> None:
    deadline = time.monotonic() + SAVE_EXIT_WAIT
    for t in list(_pending_saves):
        t.join(max(0.0, deadline - time.monotonic()))


def coalesce(items: list[tuple[bytes, IndexEntry]], *, max_gap: int = 64 << 10, max_span: int = 16 << 20
             ) -> list[list[tuple[bytes, IndexEntry]]]:
    """Group chunk locations into runs that one ranged read can serve: same pack, sorted by offset, holes
    between blobs of at most ``max_gap`` bytes, at most ``max_span`` bytes per run. Duplicate ids are dropped."""
    seen: set[bytes] = set()
    uniq = []
    for cid, e in items:
        if cid not in seen:
            seen.add(cid)
            uniq.append((cid, e))
    uniq.sort(key=lambda ce: (ce[1].pack_id, ce[1].offset))
    runs: list[list[tuple[bytes, IndexEntry]]] = []
    for cid, e in uniq:
        if runs:
            run = runs[-1]
            first, last = run[0][1], run[-1][1]
            if (last.pack_id == e.pack_id and e.offset - (last.offset + last.stored_length) <= max_gap
                    and e.offset + e.stored_length - first.offset <= max_span):
                run.append((cid, e))
                continue
        runs.append([(cid, e)])
    return runs


class SnapshotReader:
    """Chunk ids per chunk index of one snapshot, and the chunks themselves (verified)."""

    def __init__(self, repo: Repository, manifest: Manifest) -> None:
        self.repo = repo
        self.manifest = manifest
        self.tree = repo.tree(manifest)

    @property
    def chunk_count(self) -> int:
        return self.manifest.disk.chunk_count

    def chunk_length(self, chunk_index: int) -> int:
        cs = self.manifest.disk.chunk_size
        return min(cs, self.manifest.disk.size - chunk_index * cs)

    def chunk_id(self, chunk_index: int) -> bytes:
        return self.tree.chunk_id(chunk_index)

    def iter_ids(self, *, ahead: int = 0, submit: SubmitLoad | None = None) -> Iterator[bytes]:
        """Every chunk id in disk order; see :meth:`TreeReader.iter_ids` (``ahead`` leaves loading on
        ``submit``'s pool)."""
        return self.tree.iter_ids(ahead=ahead, submit=submit)

    def read(self, chunk_index: int) -> bytes:
        return self.repo.read_chunk(self.chunk_id(chunk_index), self.chunk_length(chunk_index))

    def statistics(self) -> dict[str, int]:
        return {"pages_loaded": self.tree.pages_loaded, "chunk_count": self.chunk_count}
