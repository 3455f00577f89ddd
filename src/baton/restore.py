"""Restore a snapshot to a file or block device, verifying every chunk against its id.

Contract:

* the target is a regular file (created if missing, truncated to the disk size; zero chunks stay holes) or a
  block device at least as large as the disk (zero chunks are written as zeros);
* a target in use on this node, by whatever path it is named (mounted, a loop device over it or under it, held
  by device-mapper, open by a process, attached by Baton: ``baton.host.check_not_in_use``), is refused with
  DeviceBusy before anything is written; a too small device, a directory or a missing parent directory with
  DeviceError;
* a missing target is never created where devices live (a devtmpfs such as /dev, or Baton's device link
  directory BATON_DEV_DIR): DeviceError "... does not exist (is NAME attached?)";
* a partial (checkpoint) snapshot is refused unless ``allow_partial``;
* every chunk is decrypted, decompressed and re-hashed; the first bad chunk stops the restore with
  RepoCorrupt naming the chunk, its index and pack;
* on any failure, a file the restore created is removed; a target that existed is left, its content undefined
  (the error says so);
* the result carries the bytes written and the BLAKE3-256 of the whole image (zero chunks included), which
  equals ``b3sum`` of the restored disk.

After a successful restore, ``baton.record.after_restore(target, manifest)`` is called if it exists, so the
change record on the target follows the restored snapshot's lineage.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import blake3

from baton.device import device_size, punch_hole, zero_range
from baton.errors import BatonError, DeviceBusy, DeviceError, RepoCorrupt, RepoError
from baton.host import check_not_in_use
from baton.host.attachments import dev_dir, read_state
from baton.host.mounts import fstype_of_dev
from baton.record.placement import has_tail_record
from baton.repo import ZERO_ID, Manifest, Repository
from baton.repo.repository import coalesce
from baton.util import pid_alive

BATCH = 256                 # chunks per batch (16 MiB of disk at 64 KiB chunks)
PREFETCH_BATCHES = 4        # batches being fetched and decoded while one is written
WRITE_DEPTH = 4             # positional writes to the target in flight
MAX_IOV = 256               # buffers per pwritev


@dataclass(frozen=True)
class RestoreResult:
    snapshot: str
    target: str
    target_kind: str          # "file" | "block"
    disk_size: int
    bytes_written: int        # data bytes written (zero chunks in a file are holes and not counted)
    chunks: int
    zero_chunks: int
    image_digest: str         # BLAKE3-256 hex of the restored image
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _refuse_new_device_path(path: str) -> None:
    """A missing target where only the kernel creates entries (a devtmpfs such as /dev, or Baton's device link
    directory) is a device that is not there: creating a regular file there would "restore" into RAM."""
    real = os.path.realpath(path)
    ddir = os.path.realpath(dev_dir())
    for p in {os.path.abspath(path), real}:
        parent = os.path.dirname(p)
        if parent == ddir or p.startswith(ddir + "/"):
            name = os.path.basename(p)
            raise DeviceError(f"restore target {path} does not exist (is {name} attached?)",
                              hint=f"attach the disk first (baton attach DISK --name {name}) and restore to "
                                   f"{dev_dir() / name}, or give the disk or image itself")
        try:
            on_devtmpfs = fstype_of_dev(os.stat(parent).st_dev) == "devtmpfs"
        except OSError:
            on_devtmpfs = False
        if p == "/dev" or p.startswith("/dev/") or on_devtmpfs:
            raise DeviceError(f"restore target {path} does not exist (is the device present?)",
                              hint="device nodes are made by the kernel, not by restore: give an existing block "
                                   "device, or a regular file outside /dev")


def _refuse_dead_device_link(path: str) -> None:
    """BATON_DEV_DIR/NAME of an attachment whose daemon is not running (killed, fenced) points at a loop device
    over a dead FUSE file: every write to it fails, or worse, succeeds into a page cache that is never
    written anywhere."""
    ddir = os.path.realpath(dev_dir())
    if os.path.realpath(os.path.dirname(os.path.abspath(path))) != ddir or not os.path.lexists(path):
        return
    name = os.path.basename(path)
    st = read_state(name)
    if st is None or not pid_alive(int(st.get("pid") or 0)):
        raise DeviceError(f"restore target {path} is the device of {name}, which is not attached: its daemon is "
                          "not running (killed or fenced)",
                          hint=f"run `baton detach {name}` to clean up, then attach the disk again and restore to "
                               f"{path}, or restore to the disk itself")


def check_target(path: str, disk_size: int) -> str:
    """What ``path`` is, if it may be overwritten with a disk of ``disk_size`` bytes: "new" (a file to create),
    "file" or "block"; else raise DeviceBusy (in use on this node, by any path: see ``baton.host``) or
    DeviceError."""
    _refuse_dead_device_link(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _refuse_new_device_path(path)
        parent = os.path.dirname(os.path.realpath(path)) or "."
        if not os.path.isdir(parent):
            raise DeviceError(f"restore target {path}: directory {parent} does not exist") from None
        return "new"
    if stat.S_ISDIR(st.st_mode):
        raise DeviceError(f"restore target {path} is a directory; give a file or block device")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise DeviceError(f"restore target {path} is neither a regular file nor a block device")
    check_not_in_use(path, "restore")
    if stat.S_ISREG(st.st_mode):
        return "file"
    size = device_size(path)
    if size < disk_size:
        raise DeviceError(f"restore target {path} holds {size} bytes; the snapshot needs {disk_size}")
    return "block"


@dataclass
class _Target:
    path: str
    kind: str  # "file" | "image" | "block"
    create: bool  # the file does not exist yet: restore makes it
    created: tuple[int, int] | None = None  # (st_dev, st_ino) of the file restore made
    opened: bool = False  # the target was opened for writing (it may have been written since)


def _open_target(t: _Target, disk_size: int) -> int:
    path, kind = t.path, t.kind
    try:
        if kind == "block":
            # O_EXCL on a block device fails with EBUSY if the kernel has it mounted or claimed.
            fd = os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
            t.opened = True
            return fd
        # A new file is created here and nowhere else (O_EXCL: never one that appeared since the check).
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if t.create else 0), 0o600)
        t.opened = True
        if t.create:
            st = os.fstat(fd)
            t.created = (st.st_dev, st.st_ino)
        if kind == "image":
            return fd                 # a larger disk image (e.g. with a tail record): keep what lies beyond
        os.ftruncate(fd, 0)           # drop old data so zero chunks become holes
        os.ftruncate(fd, disk_size)
        return fd
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusy(f"restore target {path} is in use (mounted or held open exclusively)") from e
        if e.errno in (errno.ENOSPC, errno.EFBIG):
            raise DeviceError(f"restore target {path}: {e.strerror}") from e
        if e.errno in (errno.EEXIST, errno.ENOENT):
            raise DeviceError(f"restore target {path} appeared or vanished while the restore started",
                              hint="check what created or removed it, then run the restore again") from e
        raise DeviceError(f"cannot open restore target {path}: {e.strerror}") from e


def _after_failure(t: _Target, err: BaseException) -> None:
    """A failed restore removes the file it created; a target that existed is left, and the error says that
    its content is now undefined."""
    if t.created is not None:
        try:
            st = os.lstat(t.path)
            if (st.st_dev, st.st_ino) == t.created:  # still the file we made, not one put there since
                os.unlink(t.path)
        except OSError:
            pass
    elif t.opened and isinstance(err, BatonError) and err.args:
        err.args = (f"{err.args[0]}; restore target {t.path} was partly overwritten: its content is undefined "
                    "until a restore to it succeeds", *err.args[1:])


def restore(repo: Repository, manifest: Manifest, target_path: str, *,
            progress: Callable[[int, int], None] | None = None, allow_partial: bool = False,
            workers: int = 2) -> RestoreResult:
    """Write snapshot ``manifest`` to ``target_path``; see the module docstring for the contract."""
    if not manifest.complete and not allow_partial:
        raise RepoError(f"snapshot {manifest.snapshot_id} is a checkpoint of an unfinished backup, not a "
                        f"point-in-time image", hint="restore a complete snapshot (see `baton snapshots`)")
    disk = manifest.disk
    kind = check_target(target_path, disk.size)
    t = _Target(target_path, "file" if kind == "new" else kind, create=kind == "new")
    if kind == "file" and os.path.getsize(target_path) > disk.size and has_tail_record(target_path):
        # A disk image whose end holds a Baton tail record: never truncate it; zero chunks are punched (they
        # still read as zeros) instead of left over from before. Any other file is replaced whole.
        t.kind = "image"
    try:
        return _write(repo, manifest, t, progress, workers)
    except BaseException as e:
        _after_failure(t, e)
        raise


def _write(repo: Repository, manifest: Manifest, t: _Target, progress: Callable[[int, int], None] | None,
           workers: int) -> RestoreResult:
    disk = manifest.disk
    target_path, kind = t.path, t.kind
    started = time.monotonic()
    lock = repo.shared_lock("restore")
    try:
        reader = repo.snapshot_reader(manifest)
        fd = _open_target(t, disk.size)
        hasher = blake3.blake3()
        written = zero = done = 0
        zero_buf = bytes(disk.chunk_size)
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="baton-restore")
        wpool = ThreadPoolExecutor(max_workers=WRITE_DEPTH, thread_name_prefix="baton-restore-write")
        pending: deque[tuple[list[tuple[int, bytes]], list[tuple[Any, Future[dict[bytes, bytes]]]]]] = deque()
        writes: deque[Future[None]] = deque()
        try:
            batches = _batches(reader.iter_ids(), disk.chunk_count, BATCH)
            exhausted = False
            while True:
                # Keep PREFETCH_BATCHES batches of coalesced ranged reads in flight ahead of the writer.
                while not exhausted and len(pending) < PREFETCH_BATCHES:
                    batch = next(batches, None)
                    if batch is None:
                        exhausted = True
                        break
                    items = []
                    for i, cid in batch:
                        if cid == ZERO_ID:
                            continue
                        entry = repo.find(cid)
                        if entry is None:
                            raise RepoCorrupt(f"chunk {i} (disk offset {i * disk.chunk_size}) of snapshot "
                                              f"{manifest.snapshot_id}: chunk {cid.hex()} is not in the index",
                                              hint="run `baton verify` to list every damaged chunk")
                        items.append((cid, entry))
                    pending.append((batch, [(run, pool.submit(repo.read_chunks, run)) for run in coalesce(items)]))
                if not pending:
                    break
                batch, futs = pending.popleft()
                plain: dict[bytes, bytes] = {}
                for run, fut in futs:
                    try:
                        plain.update(fut.result())
                    except RepoCorrupt as e:
                        raise RepoCorrupt(f"snapshot {manifest.snapshot_id}: {e} (needed for "
                                          f"{_chunks_naming(batch, run, disk.chunk_size)})",
                                          hint="run `baton verify` to list every damaged chunk") from e
                # Contiguous data chunks become one pwritev, contiguous zero chunks one hole or zeroing.
                seg_off, zero_off, zero_len = -1, -1, 0
                seg_bufs: list[bytes] = []
                for i, cid in batch:
                    length = reader.chunk_length(i)
                    off = i * disk.chunk_size
                    if cid == ZERO_ID:
                        if seg_bufs:
                            writes.append(wpool.submit(_pwritev_all, fd, seg_bufs, seg_off, target_path))
                            seg_bufs = []
                        zero += 1
                        hasher.update(zero_buf[:length] if length != disk.chunk_size else zero_buf)
                        if zero_len and zero_off + zero_len == off:
                            zero_len += length
                        else:
                            written += _zero(fd, kind, zero_off, zero_len, zero_buf, target_path)
                            zero_off, zero_len = off, length
                    else:
                        data = plain[cid]
                        hasher.update(data)
                        if not seg_bufs or len(seg_bufs) >= MAX_IOV:
                            if seg_bufs:
                                writes.append(wpool.submit(_pwritev_all, fd, seg_bufs, seg_off, target_path))
                            seg_off, seg_bufs = off, []
                        seg_bufs.append(data)
                        written += length
                    done += length
                if seg_bufs:
                    writes.append(wpool.submit(_pwritev_all, fd, seg_bufs, seg_off, target_path))
                written += _zero(fd, kind, zero_off, zero_len, zero_buf, target_path)
                while len(writes) > WRITE_DEPTH * 2:
                    writes.popleft().result()
                if progress is not None:
                    progress(done, disk.size)
            while writes:
                writes.popleft().result()
            try:
                os.fsync(fd)
            except OSError as e:
                raise DeviceError(f"restore target {target_path}: flushing the written data failed: "
                                  f"{e.strerror}", hint="check the device (dmesg), then restore again") from e
        finally:
            for _b, futs in pending:
                for _run, f in futs:
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            wpool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)
    finally:
        lock.release()
    result = RestoreResult(manifest.snapshot_id, target_path, kind, disk.size, written, disk.chunk_count, zero,
                           hasher.hexdigest(), round(time.monotonic() - started, 3))
    import baton.record

    hook = getattr(baton.record, "after_restore", None)
    if hook is not None:
        hook(target_path, manifest)
    return result


def _batches(ids: Iterator[bytes], n: int, size: int) -> Iterator[list[tuple[int, bytes]]]:
    batch: list[tuple[int, bytes]] = []
    for i in range(n):
        batch.append((i, next(ids)))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _chunks_naming(batch: list[tuple[int, bytes]], run: list[tuple[bytes, object]], chunk_size: int) -> str:
    """"chunk I (disk offset O)" for the chunks in ``batch`` that the failed read ``run`` was to supply (by id,
    never by searching the error's text)."""
    ids = {cid for cid, _ in run}
    hits = [i for i, cid in batch if cid != ZERO_ID and cid in ids]
    return ", ".join(f"chunk {i} (disk offset {i * chunk_size})" for i in hits[:8]) or "a chunk of this batch"


def _zero(fd: int, kind: str, offset: int, length: int, zero_buf: bytes, path: str) -> int:
    """Make a run of zero chunks read as zeros; returns the bytes written. A restored file ("file": created
    or truncated) already reads zeros there and keeps the hole; a disk image kept whole ("image") gets a
    hole punched; a block device is zeroed by the kernel (BLKZEROOUT), or with written zeros if it can't."""
    if length <= 0 or kind == "file":
        return 0
    if kind == "image":
        try:
            punch_hole(fd, offset, length)
            return 0
        except OSError:
            pass
    elif zero_range(fd, offset, length):
        return length
    pos = offset
    while pos < offset + length:
        n = min(len(zero_buf), offset + length - pos)
        _pwrite_all(fd, zero_buf[:n] if n != len(zero_buf) else zero_buf, pos, path)
        pos += n
    return length


def _pwritev_all(fd: int, bufs: list[bytes], offset: int, path: str) -> None:
    """Write ``bufs`` back to back at ``offset`` (one pwritev when the kernel takes it all)."""
    views = [memoryview(b) for b in bufs]
    try:
        while views:
            n = os.pwritev(fd, views, offset)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]
    except OSError as e:
        raise DeviceError(f"writing {path} at offset {offset}: {e.strerror}") from e


def _pwrite_all(fd: int, data: bytes, offset: int, path: str) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as e:
        raise DeviceError(f"writing {path} at offset {offset}: {e.strerror}") from e
