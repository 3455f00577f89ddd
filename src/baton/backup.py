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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from baton.errors import ObjectNotFound, RepoCorrupt
from baton.format.record import FLAG_RESET, FLAG_SUSPECT, FLAG_UNTRACKED, HistoryEntry
from baton.repo import DiskIdentity, Manifest, Repository
from baton.tracker.core import Tracker

DEFAULT_BATCH_CHUNKS = 4096  # the seed's "every N chunks": 256 MiB at 64 KiB chunks
MAX_RUN = 16  # chunks per disk read (1 MiB at 64 KiB)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


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


def _runs(chunks: list[int], max_run: int = MAX_RUN) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][0] + out[-1][1] == c and out[-1][1] < max_run:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


def run_backup(tracker: Tracker, repo: Repository, *, node: str, name: str = "", full: bool = False,
               batch_chunks: int = DEFAULT_BATCH_CHUNKS, progress: Progress | None = None,
               fault: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Back up the tracked disk into ``repo``. Returns the result dict printed by ``baton backup --json``.

    ``fault`` (tests only) is called at named points ("after-freeze", "after-batch", "before-commit",
    "after-commit") so fault-injection tests can kill the process exactly there.
    """
    rec = tracker.record
    h = rec.header
    disk = DiskIdentity(disk_uuid=h.disk_uuid, size=tracker.size, chunk_size=h.chunk_size, fs_uuid=h.fs_uuid,
                        name=name)
    plan = plan_backup(tracker, repo, disk, full=full)
    t0 = time.time()
    snapshot_id = os.urandom(16).hex()
    w = repo.begin_backup(disk, parent=plan.parent, node=node, mode=plan.mode, reason=plan.reason,
                          lineage=h.lineage, snapshot_id=snapshot_id)
    try:
        frozen = tracker.begin_backup(snapshot_id, full=plan.mode == "full")
    except BaseException:
        w.abort()
        raise
    t_freeze = time.time()
    n = h.nchunks
    changed = frozen.count()
    chunks = list(range(n)) if plan.mode == "full" else list(frozen.iter_set(n))
    total = sum(min(h.chunk_size, tracker.size - c * h.chunk_size) for c in chunks)
    done = 0
    try:
        if fault:
            fault("after-freeze")
        batch: list[int] = []
        for first, count in _runs(chunks):
            buf = tracker.read_frozen_run(first, count)
            for i in range(count):
                c = first + i
                lo = i * h.chunk_size
                w.put(c, buf[lo : lo + min(h.chunk_size, tracker.size - c * h.chunk_size)])
                batch.append(c)
            done += len(buf)
            if progress:
                progress(done, total)
            if len(batch) >= batch_chunks:
                m = w.checkpoint()
                if plan.mode == "incremental":
                    # The checkpoint is the parent plus every chunk stored so far: a complete index of the
                    # disk, so the record may continue from it and forget this batch.
                    rec.checkpoint(m.snapshot_id, [c for c in batch if frozen.test(c)])
                # A full backup's checkpoint only covers the chunks read so far (its base is empty), and the
                # chunks it has not reached are not marked in the record: continuing from it would restore
                # them as zeros. Its data is durable (a retry deduplicates it), but the record keeps pointing
                # at the previous snapshot and keeps every frozen bit until the commit.
                batch = []
                if fault:
                    fault("after-batch")
        if fault:
            fault("before-commit")
        t_end = time.time()
        info = {"changed_chunks": changed, "freeze_s": round(t_freeze - t0, 6), "name": name,
                "epoch": h.epoch, "record": {"placement": h.placement, "lineage": h.lineage}}
        m = w.commit(info)
        stats = w.statistics()
        cbw = tracker.end_backup()
        entry = HistoryEntry(
            seq=0, snapshot_id=m.snapshot_id, lineage=h.lineage, node=node, start_ns=int(t0 * 1e9),
            end_ns=int(t_end * 1e9), chunks_read=len(chunks), bytes_read=total,
            chunks_stored=int(stats["chunks_stored"]), bytes_stored=int(stats["bytes_stored"]),
            bytes_deduped=int(stats["chunks_deduplicated"]) * h.chunk_size, mode=plan.mode, result="ok",
            reason=plan.reason, digest=m.root, epoch=h.epoch)
        rec.commit_backup(entry)
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
        "chunks_read": len(chunks),
        "bytes_read": total,
        "bytes_stored": int(stats["bytes_stored"]),
        "chunks_stored": int(stats["chunks_stored"]),
        "chunks_deduplicated": int(stats["chunks_deduplicated"]),
        "zero_chunks": int(stats["zero_chunks"]),
        "cbw_copies": cbw["cbw_saved"],
        "duration_s": round(t_end - t0, 3),
        "root": m.root,
    }
