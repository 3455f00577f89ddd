"""Restore a snapshot to a file or block device, verifying every chunk against its id.

Contract:

* the target is a regular file (created if missing, truncated to the disk size; zero chunks stay holes) or a
  block device at least as large as the disk (zero chunks are written as zeros);
* a mounted, loop-attached or otherwise held target is refused with DeviceBusy before anything is written;
  a too small device, a directory or a missing parent directory with DeviceError;
* a partial (checkpoint) snapshot is refused unless ``allow_partial``;
* every chunk is decrypted, decompressed and re-hashed; the first bad chunk stops the restore with
  RepoCorrupt naming the chunk, its index and pack. The target's content is then undefined;
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

from baton.device import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, _fallocate, device_size
from baton.errors import DeviceBusy, DeviceError, RepoCorrupt, RepoError
from baton.record.placement import has_tail_record
from baton.repo import ZERO_ID, Manifest, Repository
from baton.repo.repository import coalesce

BATCH = 256                 # chunks per batch (16 MiB of disk at 64 KiB chunks)
PREFETCH_BATCHES = 2        # batches being fetched while one is written


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


def _mounted_sources() -> set[str]:
    out: set[str] = set()
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                out.add(line.split(" ", 1)[0])
    except OSError:
        pass
    return out


def _loop_backing_files() -> dict[str, str]:
    """backing file -> loop device name, from sysfs."""
    out: dict[str, str] = {}
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return out
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                out[f.read().strip()] = name
        except OSError:
            continue
    return out


def check_target(path: str, disk_size: int) -> str:
    """"file" or "block" if ``path`` may be overwritten with a disk of ``disk_size`` bytes; else raise."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        parent = os.path.dirname(real) or "."
        if not os.path.isdir(parent):
            raise DeviceError(f"restore target {path}: directory {parent} does not exist") from None
        return "file"
    if stat.S_ISDIR(st.st_mode):
        raise DeviceError(f"restore target {path} is a directory; give a file or block device")
    if stat.S_ISREG(st.st_mode):
        loop = _loop_backing_files().get(real)
        if loop:
            raise DeviceBusy(f"restore target {path} is attached to /dev/{loop}",
                             hint=f"detach it first (losetup -d /dev/{loop})")
        return "file"
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"restore target {path} is neither a regular file nor a block device")
    mounted = _mounted_sources()
    dev_name = os.path.basename(real)
    if real in mounted or any(os.path.realpath(m) == real for m in mounted if m.startswith("/dev/")):
        raise DeviceBusy(f"restore target {path} is mounted", hint="unmount it first")
    holders = f"/sys/class/block/{dev_name}/holders"
    if os.path.isdir(holders) and os.listdir(holders):
        raise DeviceBusy(f"restore target {path} is held by {', '.join(os.listdir(holders))}")
    # A mounted partition of the target also makes it busy.
    try:
        parts = [p for p in os.listdir(f"/sys/class/block/{dev_name}") if p.startswith(dev_name)]
    except OSError:
        parts = []
    for p in parts:
        if f"/dev/{p}" in mounted:
            raise DeviceBusy(f"restore target {path}: partition /dev/{p} is mounted", hint="unmount it first")
    size = device_size(real)
    if size < disk_size:
        raise DeviceError(f"restore target {path} holds {size} bytes; the snapshot needs {disk_size}")
    return "block"


def _open_target(path: str, kind: str, disk_size: int) -> int:
    try:
        if kind == "block":
            # O_EXCL on a block device fails with EBUSY if the kernel has it mounted or claimed.
            return os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
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
        raise DeviceError(f"cannot open restore target {path}: {e.strerror}") from e


def restore(repo: Repository, manifest: Manifest, target_path: str, *,
            progress: Callable[[int, int], None] | None = None, allow_partial: bool = False,
            workers: int = 2) -> RestoreResult:
    """Write snapshot ``manifest`` to ``target_path``; see the module docstring for the contract."""
    if not manifest.complete and not allow_partial:
        raise RepoError(f"snapshot {manifest.snapshot_id} is a checkpoint of an unfinished backup, not a "
                        f"point-in-time image", hint="restore a complete snapshot (see `baton snapshots`)")
    disk = manifest.disk
    kind = check_target(target_path, disk.size)
    if (kind == "file" and os.path.exists(target_path) and os.path.getsize(target_path) > disk.size
            and has_tail_record(target_path)):
        # A disk image whose end holds a Baton tail record: never truncate it; zero chunks are punched (they
        # still read as zeros) instead of left over from before. Any other file is replaced whole.
        kind = "image"
    started = time.monotonic()
    lock = repo.shared_lock("restore")
    try:
        reader = repo.snapshot_reader(manifest)
        index = repo.chunk_index()
        fd = _open_target(target_path, kind, disk.size)
        hasher = blake3.blake3()
        written = zero = done = 0
        zero_buf = bytes(disk.chunk_size)
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="baton-restore")
        pending: deque[tuple[list[tuple[int, bytes]], list[Future[dict[bytes, bytes]]]]] = deque()
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
                        entry = index.get(cid)
                        if entry is None:
                            raise RepoCorrupt(f"chunk {i} (disk offset {i * disk.chunk_size}) of snapshot "
                                              f"{manifest.snapshot_id}: chunk {cid.hex()} is not in the index",
                                              hint="run `baton verify` to list every damaged chunk")
                        items.append((cid, entry))
                    pending.append((batch, [pool.submit(repo.read_chunks, run) for run in coalesce(items)]))
                if not pending:
                    break
                batch, futs = pending.popleft()
                plain: dict[bytes, bytes] = {}
                for fut in futs:
                    try:
                        plain.update(fut.result())
                    except RepoCorrupt as e:
                        raise RepoCorrupt(f"snapshot {manifest.snapshot_id}: {e} (needed for "
                                          f"{_chunks_naming(batch, str(e), disk.chunk_size)})",
                                          hint="run `baton verify` to list every damaged chunk") from e
                for i, cid in batch:
                    length = reader.chunk_length(i)
                    off = i * disk.chunk_size
                    if cid == ZERO_ID:
                        zero += 1
                        hasher.update(zero_buf[:length] if length != disk.chunk_size else zero_buf)
                        if kind == "block":
                            _pwrite_all(fd, zero_buf[:length], off, target_path)
                            written += length
                        elif kind == "image":
                            try:
                                _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
                            except OSError:
                                _pwrite_all(fd, zero_buf[:length], off, target_path)
                                written += length
                    else:
                        data = plain[cid]
                        hasher.update(data)
                        _pwrite_all(fd, data, off, target_path)
                        written += length
                    done += length
                if progress is not None:
                    progress(done, disk.size)
            os.fsync(fd)
        finally:
            for _b, futs in pending:
                for f in futs:
                    f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
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


def _chunks_naming(batch: list[tuple[int, bytes]], message: str, chunk_size: int) -> str:
    """"chunk I (disk offset O)" for the chunks in ``batch`` whose id appears in ``message``."""
    hits = [i for i, cid in batch if cid != ZERO_ID and cid.hex() in message]
    return ", ".join(f"chunk {i} (disk offset {i * chunk_size})" for i in hits[:8]) or "a chunk of this batch"


def _pwrite_all(fd: int, data: bytes, offset: int, path: str) -> None:
    view = memoryview(data)
    try:
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as e:
        raise DeviceError(f"writing {path} at offset {offset}: {e.strerror}") from e
