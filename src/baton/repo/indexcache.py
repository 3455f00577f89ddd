"""The chunk-index cache: a node-local copy of a repository's loaded chunk index (docs/format.md, part 3).

Loading a repository's chunk index decodes every index file (``Repository.reload_index``): 0.2-0.3 s for a
4 GiB disk's repository, about 5 s at 1 TiB, paid again by every new process (each takeover's daemon, every CLI
restore or verify). A process that has loaded the index saves it here; the next process on this node restores
it (:meth:`ChunkIndex.restore`) and then decodes only the index files added since.

What is saved, per repository (named by its ``repo_id``), in one directory:

* the index's two **runs** (``baton.repo.chunkindex``: sorted 53-byte rows), as ``<repo id>-<BLAKE3>.run``.
  A run is immutable once written and its file was opened with ``O_TMPFILE``, so a save gives it a name with
  ``linkat`` (no copy; a copy where that fails: another file system, a run loaded from this cache whose name
  was removed since). A run is saved once; later saves name the same file;
* each run's fences and Bloom filter, as ``<repo id>-<BLAKE3>.aux`` (about 1.3 bytes a chunk, also once);
* the **manifest** ``<repo id>.manifest``, rewritten by every save (temp file, fsync, rename, fsync of the
  directory): the index files it covers (their keys), the pack table, the runs (counts, digests), the
  overlay's entries (at most ``2 * MERGE_MIN`` rows), and a keyed BLAKE3 of all of it.

Trust (a wrong cache would let dedup skip a chunk that is not stored): the manifest is authenticated with a key
derived from the repository's id key and data key (``CTX_CACHE``), so a cache is unusable with another
repository or another key, and every file it names is checked against its BLAKE3 before use. The index files
it covers are content-addressed and immutable: if each is still listed, the cache holds exactly their entries;
if one is gone (a prune rewrote the index, files were lost) the cache is stale and not used. Any failed check
(short file, other version, other key, a digest mismatch, a file missing) discards the cache: the index is
loaded from the repository as without a cache (STYLE 9); :func:`load` says why. A save that fails (read-only
directory, ENOSPC) raises OSError to its caller, which counts it and carries on: a cache never fails a backup.
A save killed half-way leaves temp files and unreferenced runs (removed by the next save), never a manifest
that names what is not there. ``Repository`` saves after a load that read index files (in a background thread,
which the interpreter's exit waits for, up to ``SAVE_EXIT_WAIT`` seconds) and after each complete manifest.

Cost: a load reads every byte it uses once to check it (53 bytes a chunk for the runs, BLAKE3 at memory
speed: about 0.03 s of CPU at 1 M chunks, against 2.7-3.1 s to decode the index files) with a 4 MiB buffer;
a save after a backup's commit writes only the manifest (index-file names, the pack table and the overlay's
rows: at most ``2 * MERGE_MIN`` rows, 3.4 MiB, copied from the overlays under the index's lock), about 1-3 ms;
the first save of a run fsyncs it (``python -m bench.indexcache``).

Space: one manifest per repository, the runs it names, nothing else of that repository (each save removes the
rest); at most ``MAX_REPOS`` repositories (the least recently saved are removed).

Where (:func:`cache_dir`): ``$BATON_CACHE_DIR/chunk-index``; else ``/var/cache/baton/chunk-index`` for root,
``$XDG_CACHE_HOME/baton/chunk-index`` (``~/.cache``) for other users; else, when that can't be created,
``<temp dir>/baton-<uid>/chunk-index`` (the system's temporary directory may be a tmpfs: the cache then lasts
until a reboot and takes memory). The directory must belong to this user and not be writable by others (mode
0700 when created here). ``BATON_INDEX_CACHE=off`` turns the cache off.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
import tempfile
import threading
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

import blake3

from baton.repo.chunkindex import BLOCK_ROWS, CACHE_DIR_ENV, ROW, Snapshot, _Run, overlay_of
from baton.repo.keys import RepoKeys

DISABLE_ENV = "BATON_INDEX_CACHE"   # one of OFF: no cache
OFF = ("0", "off", "no", "false")
ROOT_DIR = "/var/cache/baton"
SUBDIR = "chunk-index"
MAX_REPOS = 8
CTX_CACHE = "baton 2026-11-28 chunk-index cache authentication key"
KEY_CHECK = b"baton chunk-index cache key check"

MAGIC = b"BTNIXCAC"
CACHE_VERSION = 1
# The manifest's head. The body follows: key_count index-file names (32 bytes: the key's 64 hex digits as
# bytes), pack_count pack ids (32 bytes, by pack number), run_count RUN_DESC, row_count rows (ROW, 53 bytes);
# then the 32-byte MAC over everything before it.
CACHE_HEAD = struct.Struct(
    "<8s"    # magic: MAGIC
    "H"      # version: CACHE_VERSION
    "H"      # flags: FLAG_HEALED (bit 0); other bits 0 (a reader ignores them)
    "16s"    # repo_id: the repository's (also in the file name)
    "32s"    # key_check: keyed BLAKE3(cache key, KEY_CHECK), tells another key from damage
    "Q"      # length: bytes of the whole manifest, MAC included
    "I"      # key_count: index files covered
    "I"      # pack_count: entries of the pack table
    "I"      # run_count: 0..2
    "I"      # row_count: overlay rows
)
RUN_DESC = struct.Struct(
    "<B"     # role: 0 the base, 1 the small run
    "7x"     # reserved: 0
    "Q"      # count: rows in the run file (its size is count * 53)
    "Q"      # nbits: Bloom filter bits (a multiple of 8)
    "32s"    # digest: BLAKE3 of the run file
    "32s"    # aux_digest: BLAKE3 of the aux file (fences, then filter)
)
MAC_SIZE = 32
FLAG_HEALED = 1   # the saving process had healed its index (Repository.heal_index) before the index was taken
FENCE = struct.Struct("<Q")
READ = 4 << 20   # bytes per read while a run's digest is checked


def cache_dir() -> str | None:
    """The directory of this user's chunk-index cache, created if missing (mode 0700); None when the cache is
    off or no candidate is usable (the caller then works without a cache)."""
    if os.environ.get(DISABLE_ENV, "").strip().lower() in OFF:
        return None
    base = os.environ.get(CACHE_DIR_ENV)
    uid = os.geteuid()
    candidates: list[str | None]
    if base:
        candidates = [base]
    else:
        home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        # The fallback is named only when needed: gettempdir() probes its candidates by creating a file in one
        # (a create, a write and an unlink in /tmp on a process's first call: ms on a cold page cache).
        candidates = [ROOT_DIR if uid == 0 else os.path.join(home, "baton"), None]
    for c in candidates:
        path = os.path.join(c if c is not None else os.path.join(tempfile.gettempdir(), f"baton-{uid}"), SUBDIR)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022:
            return path
    return None


def cache_key(keys: RepoKeys) -> bytes:
    return blake3.blake3(keys.id_key + (keys.data_key or b""), derive_key_context=CTX_CACHE).digest()


def _mac(key: bytes, data: bytes | memoryview) -> bytes:
    return blake3.blake3(data, key=key).digest()


@dataclass(frozen=True)
class Loaded:
    """A checked cache: the index as saved, and the index files (keys, ``index/<hex>``) it covers."""

    snapshot: Snapshot
    keys: frozenset[str]
    healed: bool = False   # FLAG_HEALED: the next process counts the saver's heal as its own
    overlay: dict[bytes, bytes] | None = None   # chunkindex.overlay_of(snapshot.rows): for ChunkIndex.restore


class Discard(Exception):
    """The cache can't be used; the message says why (``Repository.statistics()["index_cache_problem"]``)."""


class Stale(Discard):
    """The cache covers index files that are gone from the repository (a prune, lost files)."""


def _name_of(key: str) -> bytes:
    h = key.rsplit("/", 1)[-1]
    if len(h) != 64:
        raise ValueError(key)
    return h.encode("ascii")


def _lock(directory: str, rid: str, exclusive: bool) -> int | None:
    """An flock on the repository's lock file (None if it can't be had: a reader then goes without, since
    every file is checked anyway; the lock only keeps a save's clean-up from removing what a load opens)."""
    path = os.path.join(directory, f"{rid}.lock")
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT if exclusive else os.O_RDONLY) | os.O_CLOEXEC, 0o600)
    except OSError:
        if exclusive:
            raise
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        if exclusive:
            raise
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)   # closing drops the flock


# ----- load -------------------------------------------------------------------------------------------------------

def load(directory: str, keys: RepoKeys, listing: Iterable[str]) -> Loaded | None:
    """The cache of the repository ``keys`` opens, when it is valid for ``listing`` (the keys now under
    ``index/``); None when there is none. Discard (why) when there is one that must not be used. OSError
    only from the directory itself."""
    rid = keys.repo_id.hex()
    path = os.path.join(directory, f"{rid}.manifest")
    files: list[tuple[int, tuple[int, int, int, bytes, bytes], IO[bytes], tuple[bytes, _Digest]]] = []
    try:
        lock = _lock(directory, rid, exclusive=False)
        try:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            descs, rows, packs, covered, flags = _parse(data, keys, set(listing))
            for desc in descs:
                files.append(_open_run(directory, rid, desc))
        finally:
            _unlock(lock)
        # While a thread reads and hashes each run (_open_run), the overlay is built from the manifest's rows
        # (its MAC checked them); it is handed out only with runs that passed their digests below.
        try:
            overlay = overlay_of(rows, len(packs))
        except ValueError as e:
            raise Discard(f"manifest: {e}") from e
        runs = {role: _checked_run(directory, rid, desc, f, aux) for role, desc, f, aux in files}
    except BaseException:
        for _role, _desc, run_file, (_aux, digesting) in files:
            digesting.wait()   # it reads the file: closed after
            run_file.close()
        raise
    return Loaded(Snapshot(runs.get(0), runs.get(1), rows, packs), covered, bool(flags & FLAG_HEALED), overlay)


def _parse(data: bytes, keys: RepoKeys, listing: set[str]
           ) -> tuple[list[tuple[int, int, int, bytes, bytes]], bytes, tuple[bytes, ...], frozenset[str], int]:
    """The manifest's runs (role, count, nbits, digest, aux digest), rows and pack table, the index files it
    covers, and its flags. Checks, in order: length, magic, version, repo id, key, length field, MAC, counts, coverage."""
    if len(data) < CACHE_HEAD.size + MAC_SIZE:
        raise Discard(f"manifest: {len(data)} bytes, shorter than its head")
    magic, version, flags, repo_id, key_check, length, n_keys, n_packs, n_runs, n_rows = \
        CACHE_HEAD.unpack_from(data)
    if magic != MAGIC:
        raise Discard(f"manifest: magic {magic!r}, expected {MAGIC!r}")
    if version != CACHE_VERSION:
        raise Discard(f"manifest: version {version}, this Baton reads {CACHE_VERSION}")
    if repo_id != keys.repo_id:
        raise Discard(f"manifest: of repository {repo_id.hex()}, not {keys.repo_id.hex()}")
    ck = cache_key(keys)
    if key_check != _mac(ck, KEY_CHECK):
        raise Discard("manifest: written with another key")
    want = CACHE_HEAD.size + 32 * (n_keys + n_packs) + RUN_DESC.size * n_runs + ROW.size * n_rows + MAC_SIZE
    if length != len(data) or want != len(data):
        raise Discard(f"manifest: {len(data)} bytes, its head says {length} and its counts {want}")
    view = memoryview(data)
    if _mac(ck, view[:-MAC_SIZE]) != data[-MAC_SIZE:]:
        raise Discard("manifest: checksum mismatch")
    if n_runs > 2:
        raise Discard(f"manifest: {n_runs} runs, at most 2")
    off = CACHE_HEAD.size
    names = [bytes(view[off + 32 * i: off + 32 * i + 32]) for i in range(n_keys)]
    off += 32 * n_keys
    packs = tuple(bytes(view[off + 32 * i: off + 32 * i + 32]) for i in range(n_packs))
    off += 32 * n_packs
    runs: list[tuple[int, int, int, bytes, bytes]] = []
    for _ in range(n_runs):
        role, count, nbits, digest, aux = RUN_DESC.unpack_from(data, off)
        off += RUN_DESC.size
        if role > 1 or role in (r[0] for r in runs) or not count or not nbits or nbits % 8:
            raise Discard(f"manifest: bad run (role {role}, {count} rows, {nbits} filter bits)")
        runs.append((role, count, nbits, digest, aux))
    rows = bytes(view[off:off + ROW.size * n_rows])
    covered = frozenset(f"index/{n.hex()}" for n in names)
    if len(covered) != n_keys:
        raise Discard("manifest: an index file is listed twice")
    missing = covered - listing
    if missing:
        raise Stale(f"{len(missing)} index files it covers are gone from the repository "
                      f"(first: {min(missing)})")
    return runs, rows, packs, covered, flags


def _open_run(directory: str, rid: str, desc: tuple[int, int, int, bytes, bytes]
              ) -> tuple[int, tuple[int, int, int, bytes, bytes], IO[bytes], tuple[bytes, _Digest]]:
    role, _count, _nbits, digest, aux_digest = desc
    try:
        f = open(os.path.join(directory, f"{rid}-{digest.hex()}.run"), "rb", buffering=0)  # noqa: SIM115 (the run keeps it)
        try:
            with open(os.path.join(directory, f"{rid}-{aux_digest.hex()}.aux"), "rb") as a:
                aux = a.read()
        except BaseException:
            f.close()
            raise
    except FileNotFoundError as e:
        raise Discard(f"{os.path.basename(str(e.filename))} is missing") from e
    # The run's digest is computed from now on, in a thread (preadv and BLAKE3 let go of the GIL): on a cold
    # page cache its reads then overlap the overlay's build instead of following it. _checked_run waits for
    # it and compares; nothing of the run is used before.
    digesting = _Digest(f.fileno())
    return role, desc, f, (aux, digesting)


class _Digest:
    """BLAKE3 of a file's bytes (up to its size at start), computed in a thread; :meth:`result` waits for it
    and returns (size, digest), or raises what the thread raised."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._out: tuple[int, bytes] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="baton-index-cache-check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            size = os.fstat(self._fd).st_size
            h = blake3.blake3()
            buf = bytearray(min(READ, max(size, 1)))
            view = memoryview(buf)
            off = 0
            while off < size:
                n = os.preadv(self._fd, [buf], off)
                if n <= 0:
                    break
                h.update(view[:n])
                off += n
            self._out = (off, h.digest())
        except BaseException as e:  # handed to result()
            self._out = e

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> tuple[int, bytes]:
        self._thread.join()
        out = self._out
        if isinstance(out, BaseException):
            raise out
        assert out is not None
        return out


def _checked_run(directory: str, rid: str, desc: tuple[int, int, int, bytes, bytes], f: IO[bytes],
                 aux_and_digest: tuple[bytes, _Digest]) -> _Run:
    """The run of ``desc`` from its open file and its aux file's bytes, after both passed their digests."""
    _role, count, nbits, digest, aux_digest = desc
    aux, digesting = aux_and_digest
    nfences = -(-count // BLOCK_ROWS)
    if len(aux) != 8 * nfences + nbits // 8:
        raise Discard(f"run {digest.hex()[:16]}: aux file of {len(aux)} bytes, "
                      f"expected {8 * nfences + nbits // 8}")
    if blake3.blake3(aux).digest() != aux_digest:
        raise Discard(f"run {digest.hex()[:16]}: aux file checksum mismatch")
    fd = f.fileno()
    size = os.fstat(fd).st_size
    if size != count * ROW.size:
        raise Discard(f"run {digest.hex()[:16]}: {size} bytes, expected {count * ROW.size}")
    hashed, got = digesting.result()
    if hashed != size:
        raise Discard(f"run {digest.hex()[:16]}: {hashed} bytes hashed, expected {size}")
    if got != digest:
        raise Discard(f"run {digest.hex()[:16]}: checksum mismatch")
    fences = array("Q")
    fences.frombytes(aux[:8 * nfences])
    if fences.itemsize != 8:
        raise Discard("this platform has no 8-byte array('Q')")
    if sys.byteorder != "little":
        fences.byteswap()
    run = _Run(f, count, fences, bytearray(aux[8 * nfences:]), digest)
    run.aux_digest = aux_digest
    run.saved = os.path.join(directory, f"{rid}-{digest.hex()}.run")
    return run


# ----- save -------------------------------------------------------------------------------------------------------

def _aux(run: _Run) -> bytes:
    fences = array("Q", run.fences)
    if sys.byteorder != "little":
        fences.byteswap()
    return fences.tobytes() + bytes(run.bits)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_with(directory: str, rid: str, final: str, fill: Callable[[int], None]) -> None:
    """File ``final`` as ``fill(fd)`` writes it: a temp file, fsync, rename (the directory is synced by the
    caller); the temp file goes if ``fill`` fails."""
    tmp = os.path.join(directory, f"{rid}.tmp-{os.urandom(8).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fill(fd)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, final)


def _write_new(directory: str, rid: str, final: str, parts: Iterable[bytes | memoryview]) -> None:
    """``parts`` as file ``final`` (:func:`_replace_with`)."""
    def fill(fd: int) -> None:
        for p in parts:
            view = memoryview(p)
            while view:
                view = view[os.write(fd, view):]

    _replace_with(directory, rid, final, fill)


def _copy_run(directory: str, rid: str, run: _Run, final: str) -> None:
    """The rows of ``run`` as file ``final`` (:func:`_replace_with`)."""
    def fill(fd: int) -> None:
        size = run.count * ROW.size
        off = 0
        while off < size:
            try:
                n = os.copy_file_range(run.fd, fd, size - off, off, off)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                data = os.pread(run.fd, min(READ, size - off), off)
                n = os.pwrite(fd, data, off) if data else 0
            if n <= 0:
                raise OSError(errno.EIO, f"run file shorter than {size} bytes")
            off += n

    _replace_with(directory, rid, final, fill)


def _save_run(directory: str, rid: str, run: _Run) -> tuple[str, str]:
    """Make sure ``<rid>-<digest>.run`` and its aux file exist; return their names.

    A run this process loaded from the cache or saved already keeps its files while they are there. Any other
    run is written anew, even if files of its name exist (a save reached after a load discarded the cache for a
    damaged file must not keep that file because its name is right): the rows by a link of the run's own file
    to a temp name renamed over the final one (no copy), else a copy; the aux file from memory."""
    name = f"{rid}-{run.digest.hex()}.run"
    final = os.path.join(directory, name)
    if run.saved == final and run.aux_digest is not None:
        aux_name = f"{rid}-{run.aux_digest.hex()}.aux"
        try:
            if (os.stat(final).st_size == run.count * ROW.size
                    and os.path.exists(os.path.join(directory, aux_name))):
                return name, aux_name
        except FileNotFoundError:
            pass
    os.fsync(run.fd)       # the rows are durable before they have a name
    tmp = os.path.join(directory, f"{rid}.tmp-{os.urandom(8).hex()}")
    try:
        os.link(f"/proc/self/fd/{run.fd}", tmp)
    except OSError:        # another file system, no O_TMPFILE, a loaded run's removed name: copy it
        _copy_run(directory, rid, run, final)
    else:
        os.replace(tmp, final)
    aux = _aux(run)
    run.aux_digest = blake3.blake3(aux).digest()
    aux_name = f"{rid}-{run.aux_digest.hex()}.aux"
    _write_new(directory, rid, os.path.join(directory, aux_name), [aux])
    run.saved = final
    return name, aux_name


def save(directory: str, keys: RepoKeys, snap: Snapshot, covered: Iterable[str], *, healed: bool = False) -> None:
    """Save ``snap``, the index holding exactly the entries of the index files ``covered``, as this
    repository's cache; ``healed``: the saving process healed its index before taking ``snap``. OSError when the directory can't take it (the previous cache then stays as it was,
    or is replaced whole)."""
    rid = keys.repo_id.hex()
    names = sorted(_name_of(k) for k in covered)
    ck = cache_key(keys)
    lock = _lock(directory, rid, exclusive=True)
    try:
        keep = {f"{rid}.manifest", f"{rid}.lock"}
        descs = []
        for role, run in ((0, snap.base), (1, snap.small)):
            if run is None:
                continue
            keep.update(_save_run(directory, rid, run))
            assert run.aux_digest is not None
            descs.append(RUN_DESC.pack(role, run.count, run.nbits, run.digest, run.aux_digest))
        n_rows = len(snap.rows) // ROW.size
        length = (CACHE_HEAD.size + 32 * (len(names) + len(snap.packs)) + RUN_DESC.size * len(descs)
                  + len(snap.rows) + MAC_SIZE)
        head = CACHE_HEAD.pack(MAGIC, CACHE_VERSION, FLAG_HEALED if healed else 0, keys.repo_id, _mac(ck, KEY_CHECK), length, len(names),
                               len(snap.packs), len(descs), n_rows)
        body = b"".join([head, *(bytes.fromhex(n.decode()) for n in names), *snap.packs, *descs, snap.rows])
        _fsync_dir(directory)      # the runs' and aux files' names before the manifest that names them
        _write_new(directory, rid, os.path.join(directory, f"{rid}.manifest"), [body, _mac(ck, body)])
        _fsync_dir(directory)
        for entry in os.listdir(directory):
            if (entry.startswith(f"{rid}-") or entry.startswith(f"{rid}.tmp-")) and entry not in keep:
                _remove(os.path.join(directory, entry))
    finally:
        _unlock(lock)
    _evict(directory, rid)


def remove(directory: str, keys: RepoKeys) -> None:
    """Remove the repository's cache (after a load discarded it for damage: its files are not trusted again)."""
    rid = keys.repo_id.hex()
    lock = _lock(directory, rid, exclusive=True)
    try:
        for entry in os.listdir(directory):
            if entry == f"{rid}.manifest" or entry.startswith(f"{rid}-") or entry.startswith(f"{rid}.tmp-"):
                _remove(os.path.join(directory, entry))
    finally:
        _unlock(lock)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _evict(directory: str, current: str) -> None:
    """Remove the caches of the repositories saved least recently, past ``MAX_REPOS``."""
    manifests = []
    for entry in os.listdir(directory):
        if entry.endswith(".manifest") and not entry.startswith(current):
            try:
                manifests.append((os.stat(os.path.join(directory, entry)).st_mtime, entry[:-len(".manifest")]))
            except FileNotFoundError:
                continue
    manifests.sort(reverse=True)
    for _mtime, rid in manifests[MAX_REPOS - 1:]:
        try:
            fd = os.open(os.path.join(directory, f"{rid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:          # in use: left for a later save
            os.close(fd)
            continue
        try:
            _remove(os.path.join(directory, f"{rid}.manifest"))
            for entry in os.listdir(directory):
                if entry.startswith(f"{rid}-") or entry.startswith(f"{rid}.tmp-") or entry == f"{rid}.lock":
                    _remove(os.path.join(directory, entry))
        finally:
            os.close(fd)
