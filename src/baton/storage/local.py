"""A store in a local directory, written with plain POSIX calls so durability is under our control.

Why not obstore's LocalStore: it renames a temporary file into place but does not fsync the file or the
directory, so a power loss can leave a published name pointing at an empty file. Here a put is
temp file -> write -> fsync -> rename (or link for put_if_absent) -> fsync of the directory: a name, once it
exists, always names the whole object, and a put is durable when it returns (the repository writes packs, then
the index files naming them, then pages and manifests, each after the put before it returned).
``put_if_absent`` uses ``link(2)``, which fails with EEXIST atomically, the local equivalent of S3's
``If-None-Match: *``.

Large objects (packs; at least DIRECT_MIN bytes) are written with ``O_DIRECT`` from a page-aligned bounce
buffer per thread (DIRECT_PIECE bytes each write), the unaligned last bytes through the page cache, then the
same fsync. Why: through the page cache, each 32 MiB pack was copied into it by this process and written back
by the kernel's flusher threads (CPU on the cores the backup's encoders need), and the fsync then waited for
that writeback, with the file system allocating the whole pack at once (on this project's shared ext4 VM that
allocation alone cost up to 0.2 s of system CPU per pack when free space was fragmented). O_DIRECT writes the
device straight from the bounce buffer; the fsync is left with the inode and the device's cache flush. A file
system that refuses O_DIRECT (EINVAL: tmpfs on older kernels, some FUSE) gets buffered writes, remembered per
store.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

from baton.errors import ObjectNotFound, RepoFull, StorageError
from baton.storage.base import Capabilities, ObjectInfo, check_key

_TMP_PREFIX = ".tmp-"
DIRECT_MIN = 1 << 20     # objects at least this large are written with O_DIRECT (packs; not pages, manifests, locks)
DIRECT_PIECE = 4 << 20   # bytes per O_DIRECT write: the size of each thread's bounce buffer
DIRECT_ALIGN = 4096      # offsets, lengths and buffer addresses of O_DIRECT writes (page size; every device's
                         # logical block divides it)


def _raise_os(err: OSError, what: str) -> None:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise RepoFull(f"{what}: no space left on the repository file system ({err.strerror})",
                       hint="free space or prune the repository") from err
    if err.errno == errno.ENOENT:
        raise ObjectNotFound(f"{what}: no such object") from err
    raise StorageError(f"{what}: {err.strerror or err}") from err


class LocalStore:
    """Objects are files under ``root``; the key's ``/`` separators become directories."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                _raise_os(e, f"create {self.root}")
        self.capabilities = Capabilities(scheme="file", atomic_create=True, durable=True)
        self._lock = threading.Lock()
        self._tls = threading.local()  # each thread's O_DIRECT bounce buffer
        self._direct = True            # False once the file system refused O_DIRECT
        self._stats = {"puts": 0, "gets": 0, "lists": 0, "deletes": 0, "bytes_written": 0, "bytes_read": 0,
                       "fsyncs": 0, "direct_bytes": 0}

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._stats[name] += n

    def _write_tmp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data).cast("B")
            done = self._write_direct(tmp, view) if len(view) >= DIRECT_MIN and self._direct else 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        self._count("fsyncs")
        return tmp

    def _write_direct(self, tmp: Path, view: memoryview) -> int:
        """Write the aligned prefix of ``view`` to the new file ``tmp`` with O_DIRECT; returns the bytes written
        (the caller writes the rest through the page cache, then fsyncs). 0 when the file system refuses
        O_DIRECT, which turns it off for this store. OSError (ENOSPC, EIO) propagates."""
        aligned = len(view) - len(view) % DIRECT_ALIGN
        try:
            dfd = os.open(tmp, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._direct = False
            return 0
        try:
            bounce = getattr(self._tls, "bounce", None)
            if bounce is None:  # anonymous mmap: page-aligned, freed with the thread
                bounce = self._tls.bounce = memoryview(mmap.mmap(-1, DIRECT_PIECE))
            off = 0
            while off < aligned:
                n = min(DIRECT_PIECE, aligned - off)
                bounce[:n] = view[off:off + n]
                try:
                    w = os.pwrite(dfd, bounce[:n], off)
                except OSError as e:
                    if e.errno != errno.EINVAL or off:
                        raise
                    self._direct = False  # refused at the first write: buffered from the start
                    return 0
                off += w
                if w != n:  # short: the caller writes the rest through the page cache
                    break
            self._count("direct_bytes", off)
            return off
        finally:
            os.close(dfd)

    def _fsync_dir(self, d: Path) -> None:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._count("fsyncs")

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            tmp = self._write_tmp(path, data)
            os.replace(tmp, path)
            self._fsync_dir(path.parent)
        except OSError as e:
            _raise_os(e, f"put {key}")
        self._count("puts")
        self._count("bytes_written", len(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        if path.exists():
            return False
        try:
            tmp = self._write_tmp(path, data)
            try:
                os.link(tmp, path)
                created = True
            except FileExistsError:
                created = False
            finally:
                tmp.unlink(missing_ok=True)
            if created:
                self._fsync_dir(path.parent)
        except OSError as e:
            _raise_os(e, f"put {key}")
        self._count("puts")
        if created:
            self._count("bytes_written", len(data))
        return created

    def get(self, key: str) -> bytes:
        try:
            data = self._path(key).read_bytes()
        except OSError as e:
            _raise_os(e, f"get {key}")
        self._count("gets")
        self._count("bytes_read", len(data))
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise StorageError(f"get_range {key}: negative start or length")
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, length, start)
            finally:
                os.close(fd)
        except OSError as e:
            _raise_os(e, f"get {key}")
        self._count("gets")
        self._count("bytes_read", len(data))
        return data

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except OSError as e:
            _raise_os(e, f"stat {key}")
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._count("lists")
        # Walk only the deepest directory the prefix names, then filter by the rest of the prefix.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        items: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(_TMP_PREFIX):
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                items.append(ObjectInfo(key, st.st_size, st.st_mtime))
        items.sort(key=lambda i: i.key)
        yield from items

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            _raise_os(e, f"delete {key}")
        self._count("deletes")

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        pass
