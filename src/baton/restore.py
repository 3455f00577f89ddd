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
import mmap
import os
import stat
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import blake3

from baton.device import (
    AlignedWriter,
    aligned_buffer,
    device_size,
    punch_hole,
    release_free_memory,
    reuse_big_buffers,
    zero_range,
)
from baton.errors import BatonError, DeviceBusy, DeviceError, RepoCorrupt, RepoError
from baton.format.repo_index import IndexEntry
from baton.host import check_not_in_use
from baton.host.attachments import dev_dir, read_state
from baton.host.mounts import fstype_of_dev
from baton.record.placement import has_tail_record
from baton.repo import ZERO_ID, Manifest, Repository
from baton.repo.repository import coalesce
from baton.util import pid_alive

BATCH_BYTES = 8 << 20       # disk bytes per batch (one aligned buffer; 128 chunks at 64 KiB)
PREFETCH_BATCHES = 4        # batches being fetched and decoded ahead of the one handed to the writes
WRITE_BATCHES = 3           # batches whose writes may still be in flight
WRITE_DEPTH = 4             # positional writes to the target in flight
LEAVES_AHEAD = 4            # leaves of the snapshot's tree loading on the worker pool ahead of the one read
DIRECT_WRITES = True        # O_DIRECT writes from the aligned buffers where the target takes them


@dataclass(frozen=True)
class RestoreResult:
    snapshot: str
    target: str
    target_kind: str          # "file" | "block"
    disk_size: int
    bytes_written: int        # data bytes written (zero chunks in a file are holes and not counted)
    chunks: int
    zero_chunks: int
    image_digest: str | None  # BLAKE3-256 hex of the restored image; None unless asked for (digest=True)
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
            workers: int = 2, digest: bool = False) -> RestoreResult:
    """Write snapshot ``manifest`` to ``target_path``; see the module docstring for the contract.

    Every chunk is verified against its id whatever ``digest`` says. ``digest=True`` also hashes the whole
    restored image (BLAKE3-256, equal to ``b3sum`` of a file target) into ``RestoreResult.image_digest``: a
    second pass over every byte, about 0.4 s of CPU per GiB here, so it is asked for, not paid by default."""
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
        return _write(repo, manifest, t, progress, workers, digest)
    except BaseException as e:
        _after_failure(t, e)
        raise


class _Batch:
    """BATCH_BYTES of the disk: its chunk ids, the aligned buffer its plaintexts are decoded into, the
    ranged reads filling it and the writes draining it."""

    def __init__(self, first: int, ids: list[bytes], buf: mmap.mmap) -> None:
        self.first = first
        self.ids = ids
        self.buf = buf
        self.view = memoryview(buf)
        self.fetches: list[tuple[list[tuple[bytes, IndexEntry]], Future[None]]] = []
        self.writes: list[Future[None]] = []


def _write(repo: Repository, manifest: Manifest, t: _Target, progress: Callable[[int, int], None] | None,
           workers: int, digest: bool) -> RestoreResult:
    """The restore pipeline. Per batch of the disk (BATCH_BYTES): the chunks are fetched in coalesced ranged
    reads, decrypted, decompressed and verified on the worker pool, each straight into the batch's
    page-aligned buffer at its disk position; this thread then hands the batch's runs of data chunks to the
    write pool (O_DIRECT from that buffer where the target takes it, so nothing is copied into the page cache
    and nothing is left to write back), makes its zero chunks holes or zeros, and (with ``digest``) hashes
    the whole buffer into the image digest (one call, outside the GIL) while the writes run. PREFETCH_BATCHES batches are
    fetched ahead; WRITE_BATCHES batches may be writing. Memory bound: (PREFETCH_BATCHES + WRITE_BATCHES +
    1) buffers of BATCH_BYTES (64 MiB at the defaults) plus the ranged reads in flight (one per worker, up to
    16 MiB each) and LEAVES_AHEAD leaves of the tree loaded ahead (about 300 KiB each as lists of ids)."""
    disk = manifest.disk
    target_path, kind = t.path, t.kind
    cs = disk.chunk_size
    per_batch = max(1, BATCH_BYTES // cs)
    started = time.monotonic()
    reuse_big_buffers()  # a new buffer per ranged read of a pack otherwise: see baton.device
    lock = repo.shared_lock("restore")
    try:
        reader = repo.snapshot_reader(manifest)
        fd = _open_target(t, disk.size)
        sink = AlignedWriter(fd)
        if DIRECT_WRITES:
            sink.enable_direct()
        hasher = blake3.blake3() if digest else None
        written = zero = done = 0
        zero_buf = memoryview(bytes(per_batch * cs))
        free: list[mmap.mmap] = []
        nbuf = PREFETCH_BATCHES + WRITE_BATCHES + 1
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="baton-restore")
        wpool = ThreadPoolExecutor(max_workers=WRITE_DEPTH, thread_name_prefix="baton-restore-write")
        pending: deque[_Batch] = deque()
        writing: deque[_Batch] = deque()
        try:
            # The chunk index loads on the pool while this thread loads the tree's first pages, and the next
            # leaves load there ahead of the batches: each is a cold fetch of its own at the start.
            pool.submit(repo.chunk_index)  # an error here is raised again by the first find, in this thread
            batches = _batches(reader.iter_ids(ahead=LEAVES_AHEAD, submit=pool.submit), disk.chunk_count,
                               per_batch)
            exhausted = False
            while True:
                while not exhausted and len(pending) < PREFETCH_BATCHES:
                    if not free and nbuf > 0:
                        free.append(aligned_buffer(per_batch * cs))
                        nbuf -= 1
                    while not free:
                        free.append(_retire(writing.popleft()))
                    batch_ids = next(batches, None)
                    if batch_ids is None:
                        exhausted = True
                        break
                    b = _Batch(batch_ids[0][0], [cid for _i, cid in batch_ids], free.pop())
                    pending.append(b)
                    _start_fetch(repo, manifest, b, pool)
                if not pending:
                    break
                b = pending.popleft()
                for run, fut in b.fetches:
                    try:
                        fut.result()
                    except RepoCorrupt as e:
                        raise RepoCorrupt(f"snapshot {manifest.snapshot_id}: {e} (needed for "
                                          f"{_chunks_naming(b, run, cs)})",
                                          hint="run `baton verify` to list every damaged chunk") from e
                b.fetches = []
                # Runs of data chunks become one write each, runs of zero chunks one hole or zeroing.
                off0 = b.first * cs
                length = min(len(b.ids) * cs, disk.size - off0)
                pos = 0
                for is_zero, n in _runs_of(b.ids):
                    seg = min(n * cs, length - pos)
                    if is_zero:
                        zero += n
                        if hasher is not None or kind != "file":  # hashed, or maybe written as zeros:
                            b.view[pos:pos + seg] = zero_buf[:seg]  # a reused buffer holds old data there
                        written += _zero(sink, kind, off0 + pos, b.view[pos:pos + seg], target_path)
                    else:
                        b.writes.append(wpool.submit(_write_seg, sink, b.view[pos:pos + seg], off0 + pos,
                                                     target_path))
                        written += seg
                    pos += seg
                if hasher is not None:
                    hasher.update(b.view[:length])
                done += length
                writing.append(b)
                while len(writing) > WRITE_BATCHES:
                    free.append(_retire(writing.popleft()))
                if progress is not None:
                    progress(done, disk.size)
            while writing:
                _retire(writing.popleft())
            try:
                sink.sync()
            except OSError as e:
                raise DeviceError(f"restore target {target_path}: flushing the written data failed: "
                                  f"{e.strerror}", hint="check the device (dmesg), then restore again") from e
        finally:
            for b in pending:
                for _run, f in b.fetches:
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            wpool.shutdown(wait=True, cancel_futures=True)
            sink.close()
            os.close(fd)
    finally:
        lock.release()
        release_free_memory()
    result = RestoreResult(manifest.snapshot_id, target_path, kind, disk.size, written, disk.chunk_count, zero,
                           hasher.hexdigest() if hasher is not None else None,
                           round(time.monotonic() - started, 3))
    import baton.record

    hook = getattr(baton.record, "after_restore", None)
    if hook is not None:
        hook(target_path, manifest)
    return result


def _start_fetch(repo: Repository, manifest: Manifest, b: _Batch, pool: ThreadPoolExecutor) -> None:
    """Submit the coalesced ranged reads of batch ``b``; each decodes its chunks into ``b``'s buffer."""
    cs = manifest.disk.chunk_size
    slots: dict[bytes, list[int]] = {}
    items: list[tuple[bytes, IndexEntry]] = []
    for k, cid in enumerate(b.ids):
        if cid == ZERO_ID:
            continue
        where = slots.get(cid)
        if where is not None:
            where.append(k)  # the same chunk twice in a batch: read once, placed twice
            continue
        slots[cid] = [k]
        entry = repo.find(cid)
        if entry is None:
            i = b.first + k
            raise RepoCorrupt(f"chunk {i} (disk offset {i * cs}) of snapshot {manifest.snapshot_id}: chunk "
                              f"{cid.hex()} is not in the index", hint="run `baton verify` to list every damaged chunk")
        items.append((cid, entry))
    view = b.view

    def place(cid: bytes, plain: bytes | memoryview) -> None:
        n = len(plain)
        for k in slots[cid]:
            view[k * cs:k * cs + n] = plain

    b.fetches = [(run, pool.submit(repo.read_run, run, place)) for run in coalesce(items)]


def _retire(b: _Batch) -> mmap.mmap:
    """Wait for batch ``b``'s writes; its buffer is free again."""
    for f in b.writes:
        f.result()
    return b.buf


def _runs_of(ids: list[bytes]) -> Iterator[tuple[bool, int]]:
    """(is zero, count) of the runs of zero and data chunks in ``ids``."""
    k, n = 0, len(ids)
    while k < n:
        z = ids[k] == ZERO_ID
        j = k + 1
        while j < n and (ids[j] == ZERO_ID) == z:
            j += 1
        yield z, j - k
        k = j


def _write_seg(sink: AlignedWriter, data: memoryview, offset: int, path: str) -> None:
    try:
        sink.pwrite(data, offset)
    except OSError as e:
        raise DeviceError(f"writing {path} at offset {offset}: {e.strerror}") from e


def _batches(ids: Iterator[bytes], n: int, size: int) -> Iterator[list[tuple[int, bytes]]]:
    batch: list[tuple[int, bytes]] = []
    for i in range(n):
        batch.append((i, next(ids)))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _chunks_naming(b: _Batch, run: list[tuple[bytes, IndexEntry]], chunk_size: int) -> str:
    """"chunk I (disk offset O)" for the chunks of batch ``b`` that the failed read ``run`` was to supply (by
    id, never by searching the error's text)."""
    ids = {cid for cid, _ in run}
    hits = [b.first + k for k, cid in enumerate(b.ids) if cid != ZERO_ID and cid in ids]
    return ", ".join(f"chunk {i} (disk offset {i * chunk_size})" for i in hits[:8]) or "a chunk of this batch"


def _zero(sink: AlignedWriter, kind: str, offset: int, zeros: memoryview, path: str) -> int:
    """Make ``len(zeros)`` bytes at ``offset`` read as zeros; returns the bytes written. A restored file
    ("file": created or truncated) already reads zeros there and keeps the hole; a disk image kept whole
    ("image") gets a hole punched; a block device is zeroed by the kernel (BLKZEROOUT: WRITE ZEROES, or an
    unmap that reads back zeros, where the device has one), or with written zeros (``zeros``, a zero-filled
    part of an aligned buffer) if it can't. Whether a device already reads zeros there can't be known
    without reading it, so a block device is never skipped."""
    length = len(zeros)
    if length <= 0 or kind == "file":
        return 0
    if kind == "image":
        try:
            punch_hole(sink.fd, offset, length)
            return 0
        except OSError:
            pass
    elif zero_range(sink.fd, offset, length):
        return length
    _write_seg(sink, zeros, offset, path)
    return length
