"""The backup engine: incremental from the record, or full with a stated reason; point-in-time; crash-safe.

Order of events (docs/design.md "Backup"):

1. Decide the mode. Incremental only when the record's ``last_backup`` names a snapshot (or checkpoint) that the
   repository has, of this disk, with the record's lineage, size and chunk size, and the record is not reset or
   suspect. Otherwise full, and the reason says why.
2. Freeze (the tracker drains writes, the record moves the owner's set into the frozen set, copy-before-write
   is armed). Writes go on, and are recorded in the owner's slot.
3. Read the chunks (frozen set, or all for a full) in runs, put them into the repository writer. Every
   ``batch_chunks`` chunks: the writer checkpoints (packs, index, partial manifest durable); for an
   incremental, the record then points ``last_backup`` at it and clears that batch's frozen bits. A full
   backup never moves the record before its commit: its checkpoints do not cover the chunks it has not read
   yet, which the record does not mark (issue 9, defect 1).
4. Commit the manifest (published last), then the record's history + ``last_backup``, then the frozen set is
   cleared. On any error: the writer aborts and the frozen set merges back into the owner's slot.
"""

from __future__ import annotations

import os
import resource
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from baton.device import AioLease, DirectRead, data_extents, direct_read, open_aio, read_view, reads_direct
from baton.errors import ObjectNotFound, RepoCorrupt, UsageError
from baton.format.record import (
    FLAG_DISTRUSTED,
    FLAG_RESET,
    FLAG_SUSPECT,
    FLAG_UNTRACKED,
    FULL_FLAGS,
    HistoryEntry,
)
from baton.record.resident import release_zero_pages
from baton.repo import DiskIdentity, Manifest, Repository
from baton.repo.writer import BackupWriter
from baton.repo.writer import start_pools as writer_start_pools
from baton.tracker.core import Tracker
from baton.workers import finish, prestart, shared_pool

DEFAULT_BATCH_CHUNKS = 4096  # the seed's "every N chunks": 256 MiB at 64 KiB chunks
BATCH_CHUNKS_ENV = "BATON_BATCH_CHUNKS"  # overrides DEFAULT_BATCH_CHUNKS (tests: frequent checkpoints)
RUN_BYTES = 1 << 20  # bytes per disk read (16 chunks at 64 KiB; 4 MiB ran no faster and held 4x the memory)
MAX_RUN = 16  # kept for callers of _runs; the engine uses RUN_BYTES // chunk size
READ_DEPTH = 32  # read tasks (groups of runs) in flight at most
GROUP_BYTES = 256 << 10  # short runs (a scattered incremental's) gathered into one read task, up to this many bytes
READ_BYTES = 8 << 20  # bytes of disk reads in flight at most (long runs: 8 reads of RUN_BYTES)
AIO_DEPTH = 256  # reads in the kernel at most, where the backup issues them itself (baton.device.AioReads)
HOLE_RUN_BYTES = 64 << 20  # longest run of hole chunks handed over at once (full backups of image files)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def start_pools() -> None:
    """Start the threads of the engine's shared pools (reads, and the writer's) now: the per-disk daemon does
    at start, so that the first backup after a takeover starts none (see :mod:`baton.workers`)."""
    prestart(shared_pool("baton-read", READ_DEPTH), READ_DEPTH)
    writer_start_pools()


@dataclass(frozen=True)
class Plan:
    mode: str  # full | incremental
    reason: str  # why full ("" for incremental)
    parent: Manifest | None


def plan_backup(tracker: Tracker, repo: Repository, disk: DiskIdentity, *, full: bool = False) -> Plan:
    """Decide incremental vs full, with the reason (Invariant 4: trust is explicit)."""
    rec = tracker.record
    h = rec.header
    repo_id = repo.config.repo_id.hex()
    rec.use_repo(repo_id)  # v2: this backup's chunks are owed to the record's other repositories
    state = rec.repo_state(repo_id)
    # The header's flags hold for every repository until a commit hands them over to the others' regions.
    flags = h.flags | (state["flags"] if state is not None else 0)
    last_backup = state["last_backup"] if state is not None else h.last_backup
    if full:
        return Plan("full", "requested (--full)", None)
    if flags & FLAG_DISTRUSTED:  # v3, with FLAG_RESET: Record.distrust(reason) kept the reason in the header
        return Plan("full", (h.distrust_reason or "the record was distrusted")[:200], None)
    if flags & FLAG_RESET:
        return Plan("full", "record reset: its change history starts now", None)
    if flags & FLAG_UNTRACKED:
        why = rec.fs_check.get("why", "") if rec.fs_check.get("changed") else ""  # this attach's comparison
        return Plan("full", (why or "written while not attached: the file system on the disk changed while no "
                             "Baton owner tracked it")[:200], None)
    if flags & FLAG_SUSPECT or rec.suspect:
        problems = "; ".join(rec.notes[:2]) or "damage was found in the record"
        return Plan("full", f"record corrupt: {problems}"[:200], None)
    if rec.geo.nrepos and state is None:
        has_any = bool(repo.snapshots(disk.disk_uuid, include_partial=True))
        if not has_any:
            return Plan("full", "no previous snapshot", None)
        return Plan("full", f"the record does not track repository {repo_id[:12]} (it tracks the "
                    f"{rec.geo.nrepos} most recently used; a repository unused the longest is dropped when "
                    "another one arrives)", None)
    if not last_backup:
        has_any = bool(repo.snapshots(disk.disk_uuid, include_partial=True))
        return Plan("full", "record has no previous backup" if has_any else "no previous snapshot", None)
    try:
        parent = repo.read_manifest(last_backup)
    except ObjectNotFound:
        latest = repo.latest(disk.disk_uuid)
        if latest is None:
            return Plan("full", "no previous snapshot", None)
        return Plan("full", f"lineage mismatch: the record continues snapshot {last_backup[:12]}, which this "
                    "repository does not have", None)
    except RepoCorrupt as e:
        # The snapshot the record continues is there but fails its checks: an incremental on top of it would
        # not restore, and its chunks may be damaged too. A full backup never under-reports, so the backup
        # still protects the disk today, and the reason says what to look at (docs/design.md "Trust
        # decisions"). Anything else (a wrong key, a store that fails) is not about this snapshot: it rises.
        return Plan("full", f"the repository's snapshot {last_backup[:12]} is corrupt ({e}); run `baton verify` "
                    "and `baton forget` the damaged snapshot"[:200], None)
    if parent.lineage != h.lineage:
        return Plan("full", f"lineage mismatch: snapshot {parent.snapshot_id[:12]} followed record lineage "
                    f"{parent.lineage[:8]}, the record is now {h.lineage[:8]}", None)
    problem = repo.parent_problem(disk, parent)
    if problem:
        return Plan("full", problem, None)
    return Plan("incremental", "", parent)


def _runs(chunks: Iterable[int], max_run: int = MAX_RUN) -> Iterator[tuple[int, int]]:
    """(first, count) runs of consecutive chunks, at most ``max_run`` long."""
    first = count = 0
    for c in chunks:
        if count and first + count == c and count < max_run:
            count += 1
            continue
        if count:
            yield first, count
        first, count = c, 1
    if count:
        yield first, count


def _groups(runs: Iterator[tuple[int, int, bool]], cs: int) -> Iterator[list[tuple[int, int, bool]]]:
    """``runs`` gathered into groups read by one task: consecutive data runs until the group holds GROUP_BYTES
    (a scattered incremental's runs of 1-2 chunks; a task per run cost more in thread hand-offs than its read),
    a hole run alone."""
    group: list[tuple[int, int, bool]] = []
    nbytes = 0
    for run in runs:
        if run[2]:
            if group:
                yield group
                group, nbytes = [], 0
            yield [run]
            continue
        group.append(run)
        nbytes += run[1] * cs
        if nbytes >= GROUP_BYTES:
            yield group
            group, nbytes = [], 0
    if group:
        yield group


def _read_group(tracker: Tracker, group: list[tuple[int, int, bool]]) -> list[list[memoryview | None] | None]:
    """(Read pool.) ``Tracker.read_frozen_run`` of each run of ``group``, in order."""
    return [tracker.read_frozen_run(first, count, skip_holes=hole) for first, count, hole in group]


Group = list[tuple[int, int, bool]]
GroupRead = list[list[memoryview | None] | None]


def _group_bytes(group: Group, cs: int) -> int:
    """Bytes a group's reads bring in (its hole runs are not read)."""
    return sum(count * cs for _f, count, hole in group if not hole)


def _admit(groups: Iterator[Group], in_flight: int, in_flight_bytes: int) -> Group | None:
    """The next group to start reading, or None: READ_DEPTH groups or READ_BYTES already in flight, or no more
    (an exhausted iterator keeps answering None)."""
    if in_flight >= READ_DEPTH or in_flight_bytes >= READ_BYTES:
        return None
    return next(groups, None)


def _pool_reads(tracker: Tracker, groups: Iterator[Group], cs: int, pool: Any
                ) -> Generator[tuple[Group, GroupRead], None, None]:
    """Each group and its runs' chunks (``Tracker.read_frozen_run``), in order, read on the shared read pool:
    at most READ_DEPTH groups and READ_BYTES in flight. Closing the generator cancels or waits for its reads.
    The readers where the kernel's asynchronous reads can't be had (:func:`_aio_reads`)."""
    inflight: deque[tuple[Group, int, Future[GroupRead]]] = deque()
    inflight_bytes = 0
    try:
        while True:
            while (group := _admit(groups, len(inflight), inflight_bytes)) is not None:
                nbytes = _group_bytes(group, cs)
                inflight.append((group, nbytes, pool.submit(_read_group, tracker, group)))
                inflight_bytes += nbytes
            if not inflight:
                return
            group, nbytes, fut = inflight.popleft()
            inflight_bytes -= nbytes
            yield group, fut.result()
    finally:
        finish(fut for _g, _n, fut in inflight)


class _AioGroup:
    """A group whose runs' reads are in the kernel: their bytes (None: a hole, not read) as they complete."""

    __slots__ = ("data", "error", "group", "nbytes", "outstanding")

    def __init__(self, group: Group, cs: int) -> None:
        self.group = group
        self.nbytes = _group_bytes(group, cs)
        self.data: list[memoryview | None] = [None] * len(group)
        self.outstanding = 0
        self.error: OSError | None = None


def _aio_reads(tracker: Tracker, groups: Iterator[Group], aio: AioLease
               ) -> Generator[tuple[Group, GroupRead], None, None]:
    """What :func:`_pool_reads` yields, read by the kernel's asynchronous reads (:class:`baton.device.AioReads`)
    straight into each run's buffer, with the same bounds (READ_DEPTH groups, READ_BYTES). A run's read is
    issued after ``Tracker.frozen_run_source`` and taken (``Tracker.take_frozen_run``: copy-before-write's
    saved copies, the pending bits) only after it completed, in order. Closing the generator waits for every
    read in flight (their buffers are referenced here until then) and closes ``aio``."""
    cs = tracker.chunk_size
    queue: deque[_AioGroup] = deque()
    inflight_bytes = 0

    def complete(min_nr: int) -> None:
        for (entry, k), r, res in aio.reap(min_nr):
            entry.outstanding -= 1
            if res < 0:
                entry.error = entry.error or OSError(-res, f"read of {r.length} bytes at {r.pos}: "
                                                           f"{os.strerror(-res)}")
            else:
                entry.data[k] = r.result(res)

    try:
        while True:
            while (group := _admit(groups, len(queue), inflight_bytes)) is not None:
                entry = _AioGroup(group, cs)
                submit: list[tuple[Any, DirectRead]] = []
                for k, (first, count, hole) in enumerate(group):
                    where = tracker.frozen_run_source(first, count, skip_holes=hole)
                    if where is None:
                        continue  # a hole: nothing to read
                    r = direct_read(*where)
                    if r is None:  # longer than one direct read (a hole run that holds data now): read here
                        entry.data[k] = read_view(*where)
                        continue
                    submit.append(((entry, k), r))
                while submit and aio.in_flight + len(submit) > aio.depth:
                    complete(1)
                aio.submit(submit)
                entry.outstanding = len(submit)
                queue.append(entry)
                inflight_bytes += entry.nbytes
            if not queue:
                return
            head = queue[0]
            while head.outstanding:
                complete(1)
            queue.popleft()
            inflight_bytes -= head.nbytes
            if head.error is not None:
                raise head.error
            yield head.group, [tracker.take_frozen_run(first, count, data)
                               for (first, count, _hole), data in zip(head.group, head.data, strict=True)]
    finally:
        aio.close()


def _full_runs(tracker: Tracker, n: int, max_run: int, hole_run: int) -> Iterator[tuple[int, int, bool]]:
    """(first, count, hole) runs over the whole disk for a full backup. Where the data device is a file that
    can say (SEEK_DATA/SEEK_HOLE), chunks lying wholly in holes form hole runs of up to ``hole_run`` chunks,
    which are not read (the read re-checks at read time, see ``Tracker.read_frozen_run``). A block device
    can't say (see ``device_has_data``): every chunk is read."""
    cs = tracker.chunk_size
    window = max(hole_run, max_run) * cs * 16
    pos = 0
    while pos < n:
        end = min(n, pos + window // cs)
        ext = data_extents(tracker.data, pos * cs, min(end * cs, tracker.size) - pos * cs)
        if ext is None:
            yield from ((f, c, False) for f, c in _runs(range(pos, end), max_run))
            pos = end
            continue
        c = pos
        for start, stop in ext:
            lo, hi = start // cs, min(end, (stop + cs - 1) // cs)
            while c < lo:  # hole before this extent
                k = min(hole_run, lo - c)
                yield c, k, True
                c += k
            while c < hi:
                k = min(max_run, hi - c)
                yield max(c, lo), k, False
                c += k
        while c < end:
            k = min(hole_run, end - c)
            yield c, k, True
            c += k
        pos = end


def batch_chunks_default() -> int:
    """Chunks per checkpoint: BATON_BATCH_CHUNKS when set (tests that want frequent checkpoints at small
    chunk sizes), else DEFAULT_BATCH_CHUNKS. UsageError for a value that is not a positive integer."""
    raw = os.environ.get(BATCH_CHUNKS_ENV, "").strip()
    if not raw:
        return DEFAULT_BATCH_CHUNKS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{BATCH_CHUNKS_ENV}={raw!r}: expected a positive number of chunks",
                         hint=f"unset it, or set it to e.g. {DEFAULT_BATCH_CHUNKS}")
    return value


def _peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_backup(tracker: Tracker, repo: Repository, *, node: str, name: str = "", full: bool = False,
               batch_chunks: int | None = None, progress: Progress | None = None,
               fault: Callable[[str], None] | None = None,
               around_freeze: Callable[[], AbstractContextManager[Any]] | None = None) -> dict[str, Any]:
    """Back up the tracked disk into ``repo``. Returns the result dict printed by ``baton backup --json``.

    ``fault`` (tests only) is called at named points ("after-freeze", "after-batch", "before-commit",
    "after-publish", "after-commit") so fault-injection tests can kill the process exactly there.
    ``batch_chunks`` (default: :func:`batch_chunks_default`) is the checkpoint interval.

    Pipeline: up to READ_DEPTH groups of runs of frozen chunks, READ_BYTES in all, are read by a thread pool
    (one O_DIRECT read per run of RUN_BYTES at most; a group is one run of a full backup, or consecutive short
    runs of a scattered incremental gathered up to GROUP_BYTES and read by one task) while this thread hands
    the chunks, as views of the run's buffer (no per-chunk copy), to the writer, whose own pool hashes,
    compresses and encrypts them (the libraries release the GIL) and whose uploader stores sealed packs. Full
    backups of image files skip holes (see :func:`_full_runs`).

    Memory bound (besides the interpreter and its libraries, 33 MiB): READ_BYTES of read buffers (the reads
    land in them directly: ``baton.device.read_view``, no per-thread bounce buffer), one hole run that turned
    out to hold data since planning (HOLE_RUN_BYTES, 64 MiB, rare), the writer's bound (``baton.repo.writer``:
    about 49 MiB at 16 MiB packs, plus the store's 4 MiB bounce buffer), and copy-before-write's saved chunks
    (in memory up to the tracker's limit, then spilled to a file).
    Measured: 113-116 MiB peak RSS for a full backup of the 1 GiB benchmark image in one process (223-233 MiB
    before the writer built each pack in one reused buffer, the allocator's arenas were capped and the reads
    landed in place).

    The result's ``timings``: plan_s (plan, open the writer under the shared lock and catch up the index,
    freeze), read_s (this thread waiting for reads), store_s (this thread in the writer: hashing and
    compression it waits for, pack sealing, uploads, checkpoints), commit_s (manifest, record history,
    frozen set cleared), pipeline_s (wall time of reading and storing, which overlap), and
    ``peak_rss_bytes`` of the process that ran the backup (the daemon for an attached disk: its lifetime peak).
    """
    rec = tracker.record
    h = rec.header
    t0 = time.time()
    if batch_chunks is None:
        batch_chunks = batch_chunks_default()
    disk = DiskIdentity(disk_uuid=h.disk_uuid, size=tracker.size, chunk_size=h.chunk_size, fs_uuid=h.fs_uuid,
                        name=name)
    plan = plan_backup(tracker, repo, disk, full=full)
    snapshot_id = os.urandom(16).hex()
    w = BackupWriter(repo, disk, parent=plan.parent, node=node, mode=plan.mode, reason=plan.reason,
                     lineage=h.lineage, snapshot_id=snapshot_id)
    try:
        if around_freeze is None:
            frozen = tracker.begin_backup(snapshot_id, full=plan.mode == "full")
        else:  # e.g. fsfreeze and --pre/--post hooks (baton.freeze): quiet at the freeze point, and only there
            with around_freeze():
                frozen = tracker.begin_backup(snapshot_id, full=plan.mode == "full")
    except BaseException:
        w.abort()
        raise
    if plan.mode == "incremental" and rec.header.flags & FULL_FLAGS:
        # The freeze itself found the record untrustworthy (the dm frontend's fold: era metadata re-created, or
        # listing blocks beyond the disk): the changed set this incremental would read may miss writes. Undo the
        # freeze (the frozen set goes back to the owner's slot) and back up in full, with the reason.
        tracker.end_backup()
        w.abort()
        rec.abort_backup()
        return run_backup(tracker, repo, node=node, name=name, full=full, batch_chunks=batch_chunks,
                          progress=progress, fault=fault, around_freeze=around_freeze)
    t_freeze = time.time()
    n = h.nchunks
    cs = h.chunk_size
    changed = frozen.count()
    max_run = max(1, RUN_BYTES // cs)
    hole_run = max(1, HOLE_RUN_BYTES // cs)
    if plan.mode == "full":
        nread = n
        total = tracker.size
        runs: Iterator[tuple[int, int, bool]] = _full_runs(tracker, n, max_run, hole_run)
    else:
        nread = changed
        total = changed * cs - (cs - (tracker.size - (n - 1) * cs) if frozen.test(n - 1)
                                else 0)
        runs = ((f, c, False) for f, c in _runs(frozen.iter_set(n), max_run))
    done = 0
    consumed = 0  # an incremental's chunks below this were stored and checkpointed
    read_wait = store_time = 0.0
    groups = _groups(runs, cs)
    aio = open_aio(AIO_DEPTH) if tracker.frozen_reads_direct() and reads_direct(tracker.data) else None
    reads = (_aio_reads(tracker, groups, aio) if aio is not None
             else _pool_reads(tracker, groups, cs, shared_pool("baton-read", READ_DEPTH)))
    try:
        try:
            if fault:
                fault("after-freeze")
            batch: list[int] = []
            while True:
                t_a = time.monotonic()
                got = next(reads, None)
                t_b = time.monotonic()
                if got is None:
                    break
                group, read = got
                for (first, count, _hole), views in zip(group, read, strict=True):
                    if views is None:
                        w.put_zeros(first, count)
                    elif None in views:  # a hole run with chunks saved aside by copy-before-write
                        for i, view in enumerate(views):
                            if view is None:
                                w.put_zero(first + i)
                            else:
                                w.put(first + i, view)
                    else:
                        w.put_run(first, views)  # type: ignore[arg-type]
                    batch.extend(range(first, first + count))
                    done += min(count * cs, tracker.size - first * cs)
                    if len(batch) >= batch_chunks:
                        m = w.checkpoint()
                        if plan.mode == "incremental":
                            # The checkpoint is the parent plus every chunk stored so far: a complete index of
                            # the disk, so the record may continue from it and forget this batch (every chunk
                            # of which came from the frozen set).
                            rec.checkpoint(m.snapshot_id, batch)
                            # The iteration over the frozen copy never looks back: its bits below the batch's
                            # end are cleared and their memory pages handed back (256 KiB a TiB per 4096 chunks
                            # of a sparse set; 2 MiB in all at 1 TiB).
                            end = batch[-1] + 1
                            frozen.clear_range(consumed, end)
                            release_zero_pages(frozen.data, consumed >> 3, end >> 3)
                            consumed = end
                        # A full backup's checkpoint only covers the chunks read so far (its base is empty), and
                        # the chunks it has not reached are not marked in the record: continuing from it would
                        # restore them as zeros. Its data is durable (a retry deduplicates it), but the record
                        # keeps pointing at the previous snapshot and keeps every frozen bit until the commit.
                        batch = []
                        if fault:
                            fault("after-batch")
                del got, read, views  # the group's read buffers go now, not when the next group replaces them
                if progress:
                    progress(done, total)
                read_wait += t_b - t_a
                store_time += time.monotonic() - t_b
        finally:
            reads.close()  # no read of this backup runs on after it (threads finished, kernel reads waited for)
            if aio is not None:
                aio.close()  # (when the generator never started)
        if fault:
            fault("before-commit")
        t_end = time.time()
        info = {"changed_chunks": changed, "freeze_s": round(t_freeze - t0, 6), "name": name,
                "epoch": h.epoch, "record": {"placement": h.placement, "lineage": h.lineage}}
        if around_freeze is not None:
            info["consistency"] = getattr(around_freeze, "report", None)
        m = w.commit(info)
        if fault:
            fault("after-publish")  # the snapshot is complete in the repository; the record doesn't know it
        stats = w.statistics()
        cbw = tracker.end_backup()
        entry = HistoryEntry(
            seq=0, snapshot_id=m.snapshot_id, lineage=h.lineage, node=node, start_ns=int(t0 * 1e9),
            end_ns=int(t_end * 1e9), chunks_read=nread, bytes_read=total,
            chunks_stored=int(stats["chunks_stored"]), bytes_stored=int(stats["bytes_stored"]),
            bytes_deduped=int(stats["chunks_deduplicated"]) * h.chunk_size, mode=plan.mode, result="ok",
            reason=plan.reason, digest=m.root, epoch=h.epoch, era=tracker.frozen_era)
        rec.commit_backup(entry)
        t_commit = time.time()
        if fault:
            fault("after-commit")
    except BaseException:
        w.abort()
        tracker.end_backup()
        try:
            rec.abort_backup()
        except Exception:
            pass  # fenced or I/O error: the frozen set stays on disk and is merged at the next takeover
        raise
    return {
        "snapshot": m.snapshot_id,
        "mode": plan.mode,
        "reason": plan.reason,
        "parent": plan.parent.snapshot_id if plan.parent else None,
        "node": node,
        "disk_uuid": h.disk_uuid,
        "disk_size": tracker.size,
        "chunk_size": h.chunk_size,
        "chunks_changed": changed,
        "chunks_read": nread,
        "bytes_read": total,
        "bytes_stored": int(stats["bytes_stored"]),
        "chunks_stored": int(stats["chunks_stored"]),
        "chunks_deduplicated": int(stats["chunks_deduplicated"]),
        "zero_chunks": int(stats["zero_chunks"]),
        "holes_skipped_bytes": int(stats.get("bytes_not_read", 0)),
        "cbw_copies": cbw["cbw_saved"],
        "duration_s": round(t_end - t0, 3),
        "plan_s": round(t_freeze - t0, 4),
        "read_s": round(read_wait, 4),
        "store_s": round(store_time, 4),
        "commit_s": round(t_commit - t_end, 4),
        "pipeline_s": round(t_end - t_freeze, 4),
        "peak_rss_bytes": _peak_rss(),
        "root": m.root,
    }
