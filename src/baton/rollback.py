"""Roll a disk back to a snapshot by writing only the chunks that differ.

Which chunks can differ (no disk read): let R be the repository, L the snapshot the record's ``last_backup``
names for R, S the snapshot to roll back to. By the lifecycle's fact (A) (docs/design.md "Lifecycle") every
chunk written since L is marked in the record: a node slot, the frozen set, or R's owed set (record v2). Every
other chunk c still holds L[c]. So the disk differs from S at most on::

    marked(record, R)  union  { c : id_L(c) != id_S(c) }          (diff of two index trees, baton.diff)

and only those chunks are written, with S's content. Nothing else is read or written.

When that reasoning does not hold, rollback compares chunk by chunk instead (it reads the whole disk, hashes
each chunk with the repository's id key and writes the ones whose id differs from S's), and says why in
``fallback_reason``: the record has no backup into R (or does not track R), the repository lacks L, L
followed another record lineage or is of another disk/size, or the record is reset, suspect or was written
while not attached. This is the same trust rule as the backup's (docs/design.md "Trust decisions").

Where the writes go:

* **attached** (an attachment NAME on this node, served by the FUSE frontend): through BATON_DEV_DIR/NAME, so
  the daemon's tracker records every write; refused while that device is mounted or open
  (``baton.host.check_not_in_use``), or while a backup of it runs;
* **offline** (a disk attached nowhere, its record clean): the record is taken over in this process (epoch+1)
  like the offline backup, the writes go through a :class:`baton.tracker.core.Tracker` (recorded), and the
  record is detached again, whatever the outcome.

The record's ``last_backup`` is left alone: the chunks written are marked, so the next backup is incremental
from L and reads them; its snapshot equals S wherever the disk was not written since.

The record's own bytes are never written: with the file placement the record is a file inside the file
system, its blocks on the data disk (:func:`record_ranges`); the snapshot holds an older copy of them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from baton.device import DirectDev, SubDev
from baton.diff import changed_chunks
from baton.errors import (
    DaemonError,
    DeviceBusy,
    DeviceError,
    NotOwner,
    ObjectNotFound,
    RepoCorrupt,
    UsageError,
)
from baton.format.record import FLAG_RESET, FLAG_SUSPECT, FLAG_UNTRACKED, PLACEMENT_FILE, PLACEMENT_TAIL
from baton.host import check_not_in_use
from baton.host.attachments import attachments, dev_dir, read_state
from baton.host.inuse import ATTACHED, OPEN
from baton.record.area import ExtentDev
from baton.record.core import Record
from baton.record.placement import Located, locate
from baton.repo import ZERO_ID, Manifest, Repository
from baton.repo.crypto import chunk_id
from baton.repo.repository import coalesce
from baton.tracker.core import Tracker, spill_dir_default
from baton.util import pid_alive

BATCH = 256  # chunks fetched and written per batch
Progress = Callable[[int, int], None]


@dataclass
class RollbackResult:
    snapshot: str
    target: str
    mode: str  # "attached" | "offline"
    device: str  # what was written: BATON_DEV_DIR/NAME or the disk
    disk_size: int
    chunk_size: int
    method: str  # "record+diff" | "compare"
    fallback_reason: str  # why "compare" ("" for record+diff)
    last_backup: str | None  # the snapshot the record continues (record+diff)
    chunks_considered: int = 0  # chunks that may differ (record+diff) or all chunks (compare)
    chunks_written: int = 0
    bytes_written: int = 0
    bytes_read_disk: int = 0  # compare only
    zero_chunks_written: int = 0
    record_bytes_skipped: int = 0  # bytes of the record file inside the disk, never overwritten
    written_fraction: float = 0.0  # bytes_written / disk_size
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ planning


def check_snapshot_fits(snap: Manifest, rec: Record, data_size: int, disk: str, allow_partial: bool) -> None:
    """DeviceError unless ``snap`` is a snapshot of this disk (uuid, size, chunk size); UsageError for a
    checkpoint unless ``allow_partial``."""
    h = rec.header
    if snap.disk.disk_uuid != h.disk_uuid:
        raise DeviceError(f"snapshot {snap.short_id} is of disk {snap.disk.disk_uuid} "
                          f"({snap.disk.name or 'unnamed'}); {disk} is disk {h.disk_uuid}: wrong disk",
                          hint="`baton snapshots --repo URL --disk UUID` lists this disk's snapshots; to copy "
                               "another disk's snapshot onto this one use `baton restore`")
    if snap.disk.size != data_size or snap.disk.chunk_size != h.chunk_size:
        raise DeviceError(f"snapshot {snap.short_id} is of a {snap.disk.size}-byte disk with "
                          f"{snap.disk.chunk_size}-byte chunks; {disk} now has {data_size} bytes and "
                          f"{h.chunk_size}-byte chunks", hint="use `baton restore` to write the whole image")
    if not snap.complete and not allow_partial:
        raise UsageError(f"snapshot {snap.short_id} is a checkpoint of an unfinished backup, not a point-in-time "
                         "image", hint="pick a complete snapshot (`baton snapshots`)")


def plan_chunks(rec: Record, repo: Repository, snap: Manifest) -> tuple[list[int] | None, str, str | None]:
    """(chunks that may differ, or None to compare every chunk; the reason for that; the last backup used)."""
    h = rec.header
    repo_id = repo.config.repo_id.hex()
    state = rec.repo_state(repo_id)
    flags = h.flags | (state["flags"] if state is not None else 0)
    if flags & FLAG_RESET:
        return None, "the record was reset: its change history starts after the reset", None
    if flags & FLAG_UNTRACKED:
        return None, "the disk was written while not attached (the file system changed with nobody tracking)", None
    if flags & FLAG_SUSPECT or rec.suspect:
        return None, "the record is damaged (" + ("; ".join(rec.notes[:2]) or "suspect") + ")", None
    if rec.geo.nrepos and state is None:
        return None, f"the record does not track repository {repo_id[:12]}", None
    last = state["last_backup"] if state is not None else h.last_backup
    if not last:
        return None, "the record has no backup into this repository to compare with", None
    try:
        parent = repo.read_manifest(last)
    except ObjectNotFound:
        return None, f"the record continues snapshot {last[:12]}, which this repository does not have", last
    except RepoCorrupt as e:
        return None, f"the record continues snapshot {last[:12]}, which is damaged ({e})", last
    if parent.lineage != h.lineage:
        return None, (f"lineage mismatch: snapshot {last[:12]} followed record lineage {parent.lineage[:8]}, the "
                      f"record is now {h.lineage[:8]}"), last
    if (parent.disk.disk_uuid, parent.disk.size, parent.disk.chunk_size) != \
            (snap.disk.disk_uuid, snap.disk.size, snap.disk.chunk_size):
        return None, f"the record's last backup {last[:12]} is of another disk or size", last
    bits = rec.repo_dirty_bits(repo_id) if rec.geo.nrepos else rec.dirty_bits()
    n = h.nchunks
    marked = set(bits.iter_set(n))
    return sorted(marked.union(changed_chunks(repo, snap, parent))), "", last


def record_ranges(rec: Record) -> list[tuple[int, int]]:
    """(offset, length) on the data disk of the record's own bytes when the record is a file in the file
    system on the disk (file placement); [] for the tail (outside the data area) and external placements."""
    area = rec.area
    if rec.header.placement != PLACEMENT_FILE or not isinstance(area, ExtentDev):
        return []
    return sorted((e.physical, e.length) for e in area.extents)


# ------------------------------------------------------------------------------------------------ I/O


class _DiskIO:
    """Positional reads and writes on what the rollback writes to, skipping the record's own bytes."""

    def __init__(self, size: int, protect: list[tuple[int, int]], read: Callable[[int, int], bytes],
                 write: Callable[[int, bytes], None], flush: Callable[[], None]) -> None:
        self.size = size
        self.protect = protect
        self._read = read
        self._write = write
        self._flush = flush
        self.skipped = 0

    def read(self, offset: int, length: int) -> bytes:
        return self._read(offset, length)

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` except where the record lives; returns the bytes written."""
        pieces = [(offset, offset + len(data))]
        for p_off, p_len in self.protect:
            nxt = []
            for a, b in pieces:
                lo, hi = max(a, p_off), min(b, p_off + p_len)
                if lo >= hi:
                    nxt.append((a, b))
                    continue
                self.skipped += hi - lo
                if a < lo:
                    nxt.append((a, lo))
                if hi < b:
                    nxt.append((hi, b))
            pieces = nxt
        n = 0
        for a, b in pieces:
            self._write(a, data[a - offset:b - offset])
            n += b - a
        return n

    def flush(self) -> None:
        self._flush()


def _apply(io: _DiskIO, repo: Repository, snap: Manifest, chunks: Iterable[int] | None, res: RollbackResult,
           progress: Progress | None) -> None:
    """Write S's content into ``chunks`` (None: compare every chunk first and write those that differ)."""
    reader = repo.snapshot_reader(snap)
    cs = snap.disk.chunk_size
    n = snap.disk.chunk_count
    todo = list(range(n)) if chunks is None else list(chunks)
    res.chunks_considered = len(todo)
    done = 0
    for start in range(0, len(todo), BATCH):
        batch = todo[start:start + BATCH]
        want = [(c, reader.chunk_id(c)) for c in batch]
        if chunks is None:  # compare: read the disk's chunks and keep those whose id differs from S's
            keep = []
            for c, cid in want:
                length = reader.chunk_length(c)
                data = io.read(c * cs, length)
                res.bytes_read_disk += length
                have = ZERO_ID if not any(data) else chunk_id(repo.keys, data)
                if have != cid:
                    keep.append((c, cid))
            want = keep
        items = []
        for c, cid in want:
            if cid == ZERO_ID:
                continue
            entry = repo.find(cid)
            if entry is None:
                raise RepoCorrupt(f"chunk {c} (disk offset {c * cs}) of snapshot {snap.snapshot_id}: chunk "
                                  f"{cid.hex()} is not in the index", hint="run `baton verify`")
            items.append((cid, entry))
        plain: dict[bytes, bytes] = {}
        for run in coalesce(items):
            plain.update(repo.read_chunks(run))
        for c, cid in want:
            length = reader.chunk_length(c)
            data = bytes(length) if cid == ZERO_ID else plain[cid]
            res.bytes_written += io.write(c * cs, data)
            res.chunks_written += 1
            res.zero_chunks_written += cid == ZERO_ID
        done += len(batch)
        if progress is not None:
            progress(done, len(todo))
    io.flush()


# ------------------------------------------------------------------------------------------------ entry


def _attachment_of(target: str) -> dict[str, Any] | None:
    st = read_state(target) if os.path.sep not in target else None
    if st is not None:
        return st
    real = os.path.realpath(target)
    for a in attachments():
        if a.get("disk") == real:
            return a
    return None


def rollback(target: str, snapshot: str, repo: Repository, *, node: str, record: str | None = None,
             allow_partial: bool = False, progress: Progress | None = None) -> RollbackResult:
    """Bring TARGET (an attachment NAME here, or a DISK path) back to ``snapshot`` (see the module docstring)."""
    t0 = time.monotonic()
    snap = repo.get_snapshot(snapshot)
    st = _attachment_of(target)
    if st is not None:
        res = _rollback_attached(st, snap, repo, allow_partial, progress)
    else:
        if not os.path.exists(target):
            raise DeviceError(f"{target} is neither an attachment on this node nor a disk path",
                              hint="give the NAME shown by `baton status`, or the disk's path")
        res = _rollback_offline(target, snap, repo, node, record, allow_partial, progress)
    res.written_fraction = round(res.bytes_written / res.disk_size, 6) if res.disk_size else 0.0
    res.seconds = round(time.monotonic() - t0, 3)
    return res


def _rollback_attached(st: dict[str, Any], snap: Manifest, repo: Repository, allow_partial: bool,
                       progress: Progress | None) -> RollbackResult:
    name = str(st["name"])
    if not pid_alive(int(st.get("pid") or 0)) or st.get("state") == "fenced":
        raise DaemonError(f"{name} is attached on this node but its daemon is not running (killed or fenced); "
                          "nothing would record the rollback's writes",
                          hint=f"see `baton status {name}`; `baton detach {name}` cleans up, then roll back the "
                               "disk by its path (offline) or re-attach it first")
    if st.get("frontend", "fuse") != "fuse":
        raise UsageError(f"{name} is served over {st.get('frontend')}, not as a block device on this node",
                         hint=f"`baton detach {name}` and roll the disk back by its path (offline)")
    device = str(dev_dir() / name)
    if not os.path.exists(device):
        raise DeviceError(f"{device} does not exist although {name} is attached",
                          hint=f"see `baton status {name}`")
    check_not_in_use(device, "rollback",
                     allow=lambda u: (u.kind == ATTACHED and u.what == name) or (u.kind == OPEN and u.baton_daemon))
    loc = locate(str(st["disk"]), st.get("record"), writable=False)
    try:
        rec = loc.record
        if rec.regions[rec.geo.frozen_region].hdr.backup_id:
            raise DeviceBusy(f"a backup of {name} is running", hint="roll back after it ends")
        check_snapshot_fits(snap, rec, loc.data_size, device, allow_partial)
        chunks, why, last = plan_chunks(rec, repo, snap)
        protect = record_ranges(rec)
    finally:
        loc.close()
    res = RollbackResult(snap.snapshot_id, name, "attached", device, snap.disk.size, snap.disk.chunk_size,
                         "compare" if chunks is None else "record+diff", why, last)
    try:
        fd = os.open(device, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise DeviceBusy(f"{device} is in use (mounted or held open exclusively); rollback refused",
                             hint="unmount it first") from e
        raise DeviceError(f"cannot open {device}: {e.strerror}") from e

    def write(off: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            k = os.pwrite(fd, view, off)
            view, off = view[k:], off + k

    def read(off: int, length: int) -> bytes:
        return os.pread(fd, length, off)

    def flush() -> None:
        os.fsync(fd)

    try:
        io = _DiskIO(snap.disk.size, protect, read, write, flush)
        try:
            _apply(io, repo, snap, chunks, res, progress)
        except OSError as e:
            raise DeviceError(f"writing {device}: {e.strerror}; the disk is partly rolled back (every write was "
                              "recorded)", hint="check `baton status`, then run the rollback again") from e
        res.record_bytes_skipped = io.skipped
    finally:
        os.close(fd)
    return res


def _open_tracker(loc: Located) -> Tracker:
    """The write path over a located disk's data area (the same construction as the daemon's
    ``daemon.offline.open_tracker``, which this layer may not import)."""
    dev = DirectDev(loc.disk, writable=True)
    loc.devs.append(dev)
    data = SubDev(dev, 0, loc.data_size) if loc.header.placement == PLACEMENT_TAIL else dev
    if loc.header.placement != PLACEMENT_TAIL and loc.data_size != dev.size:
        raise DeviceError(f"{loc.disk} changed size since init ({loc.data_size} -> {dev.size} bytes)")
    return Tracker(loc.record, data, size=loc.data_size, spill_dir=spill_dir_default())


def _rollback_offline(disk: str, snap: Manifest, repo: Repository, node: str, record: str | None,
                      allow_partial: bool, progress: Progress | None) -> RollbackResult:
    loc = locate(disk, record, writable=True)
    try:
        h = loc.header
        if not h.clean:
            if h.owner == node:
                raise DaemonError(f"{disk} is attached on this node ({node}) according to its record, but no Baton "
                                  "daemon serves it here (it died, or this node restarted)",
                                  hint=f"re-attach it (`baton attach {disk} --node {node}`), then roll back by NAME")
            raise NotOwner(f"{disk} is attached on node {h.owner or '?'} (epoch {h.epoch}), or its owner died "
                           "without detaching", hint="roll it back on its owner, or take it over here first")
        check_not_in_use(disk, "rollback")
        check_snapshot_fits(snap, loc.record, loc.data_size, disk, allow_partial)
        loc.record.attach(node)
        try:
            chunks, why, last = plan_chunks(loc.record, repo, snap)
            res = RollbackResult(snap.snapshot_id, disk, "offline", disk, snap.disk.size, snap.disk.chunk_size,
                                 "compare" if chunks is None else "record+diff", why, last)
            tracker = _open_tracker(loc)
            try:
                io = _DiskIO(snap.disk.size, record_ranges(loc.record), tracker.read,
                             lambda off, data: tracker.write(off, data), tracker.flush)
                _apply(io, repo, snap, chunks, res, progress)
                res.record_bytes_skipped = io.skipped
            finally:
                tracker.close()
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped the rollback is the one to report
                loc.record.detach()
            raise
        loc.record.detach()
        return res
    finally:
        loc.close()
