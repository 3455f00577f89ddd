"""Forget (drop manifests by id or retention policy) and prune (delete and repack unreferenced data).

Prune's safety rests on two independent mechanisms:

* the exclusive lock (no backup, restore or verify holds a shared lock while prune runs), and
* a grace period: packs and pages younger than ``grace`` seconds are never deleted or repacked, and their
  index entries are kept, so a backup whose lock went stale while it still ran (or that deduplicated against a
  chunk just before prune started) still finds everything it wrote or referenced.

Prune order: new packs (repacked live blobs) -> new index file -> delete old index files -> delete packs ->
delete pages. A crash anywhere leaves a consistent repository (at worst duplicate index entries, which are
both valid, or garbage that the next prune removes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import blake3

from baton.errors import ObjectNotFound, RepoCorrupt, UsageError
from baton.format.repo_index import ZERO_ID, IndexEntry
from baton.format.repo_pack import PackEntry, pack_footer, pack_head
from baton.repo.crypto import decode_blob
from baton.repo.model import Manifest
from baton.repo.repository import INDEX_FILE_ENTRIES, Repository, pack_key

# ----- forget ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ForgetPolicy:
    """Keep the newest ``keep_last`` snapshots and the newest snapshot of each of the last N days/weeks/months
    (calendar periods in UTC that hold a snapshot). Applied per disk uuid, to complete snapshots."""

    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0

    def empty(self) -> bool:
        return not (self.keep_last or self.keep_daily or self.keep_weekly or self.keep_monthly)


@dataclass
class ForgetResult:
    removed: list[dict[str, Any]] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"removed": self.removed, "kept": self.kept, "dry_run": self.dry_run}


def _period(t: float, kind: str) -> str:
    tm = time.gmtime(t)
    if kind == "daily":
        return time.strftime("%Y-%m-%d", tm)
    if kind == "weekly":
        iso = time.strftime("%G-W%V", tm)
        return iso
    return time.strftime("%Y-%m", tm)


def apply_policy(snaps: list[Manifest], policy: ForgetPolicy) -> dict[str, str]:
    """snapshot id -> reason kept, for complete snapshots of one disk (any order in, newest wins)."""
    newest_first = sorted(snaps, key=lambda m: (m.start_time, m.snapshot_id), reverse=True)
    keep: dict[str, str] = {}
    for m in newest_first[:policy.keep_last]:
        keep[m.snapshot_id] = "last"
    for kind, n in (("daily", policy.keep_daily), ("weekly", policy.keep_weekly),
                    ("monthly", policy.keep_monthly)):
        seen: set[str] = set()
        for m in newest_first:
            if len(seen) >= n:
                break
            p = _period(m.start_time, kind)
            if p not in seen:
                seen.add(p)
                keep.setdefault(m.snapshot_id, kind)
    return keep


def _brief(m: Manifest, why: str) -> dict[str, Any]:
    return {"snapshot": m.snapshot_id, "disk_uuid": m.disk.disk_uuid, "name": m.disk.name,
            "start": m.to_json()["start"], "complete": m.complete, "why": why}


def forget(repo: Repository, snapshot_refs: Iterable[str] = (), policy: ForgetPolicy | None = None, *,
           dry_run: bool = False, node: str = "") -> ForgetResult:
    """Delete the named snapshots and/or those a policy does not keep. Data is freed later by prune.

    With a policy, partial (checkpoint) manifests older than their disk's newest complete snapshot are
    removed too: they are no longer needed as parents. UsageError if neither ids nor a policy is given.
    """
    refs = list(snapshot_refs)
    if not refs and (policy is None or policy.empty()):
        raise UsageError("name snapshots to forget or give a policy (--keep-last, --keep-daily, ...)")
    result = ForgetResult(dry_run=dry_run)
    lock = None if dry_run else repo.shared_lock("forget", node)
    try:
        remove: dict[str, tuple[Manifest, str]] = {}
        for ref in refs:
            m = repo.get_snapshot(ref)
            remove[m.snapshot_id] = (m, "named")
        if policy is not None and not policy.empty():
            every = repo.snapshots(include_partial=True)
            by_disk: dict[str, list[Manifest]] = {}
            for m in every:
                by_disk.setdefault(m.disk.disk_uuid, []).append(m)
            for snaps in by_disk.values():
                complete = [m for m in snaps if m.complete]
                keep = apply_policy(complete, policy)
                newest_complete = max((m.start_time for m in complete), default=None)
                for m in snaps:
                    if m.snapshot_id in remove:
                        continue
                    if m.complete and m.snapshot_id not in keep:
                        remove[m.snapshot_id] = (m, "policy")
                    elif not m.complete and newest_complete is not None and m.start_time < newest_complete:
                        remove[m.snapshot_id] = (m, "superseded checkpoint")
                    elif m.snapshot_id in keep:
                        result.kept.append(_brief(m, keep[m.snapshot_id]))
                    else:
                        result.kept.append(_brief(m, "checkpoint of a running or unfinished backup"))
        for sid, (m, why) in sorted(remove.items(), key=lambda kv: kv[1][0].start_time):
            if not dry_run:
                repo.delete_snapshot(sid)
            result.removed.append(_brief(m, why))
    finally:
        if lock is not None:
            lock.release()
    return result


# ----- prune -------------------------------------------------------------------------------------------------

@dataclass
class PruneResult:
    snapshots: int = 0
    chunks_used: int = 0
    chunks_unused: int = 0
    packs_total: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    packs_kept_young: int = 0
    bytes_deleted: int = 0
    bytes_written: int = 0
    pages_deleted: int = 0
    index_files_replaced: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mark(repo: Repository, manifests: list[Manifest]) -> tuple[set[bytes], set[bytes]]:
    """(chunk ids, page ids) referenced by ``manifests``; each shared page is read once."""
    chunks: set[bytes] = set()
    pages: set[bytes] = set()
    for m in manifests:
        stack = [(m.tree_depth - 1, bytes.fromhex(m.root))] if m.tree_depth else []
        while stack:
            level, pid = stack.pop()
            if pid == ZERO_ID or pid in pages:
                continue
            got_level, ids = repo.load_page(pid)
            if got_level != level:
                raise RepoCorrupt(f"page {pid.hex()}: level {got_level}, expected {level}")
            pages.add(pid)
            if level == 0:
                chunks.update(ids)
            else:
                stack.extend((level - 1, c) for c in ids)
    chunks.discard(ZERO_ID)
    return chunks, pages


def prune(repo: Repository, *, grace: float = 3600.0, max_unused: float = 0.2, dry_run: bool = False,
          now: Callable[[], float] = time.time, node: str = "",
          progress: Callable[[str], None] | None = None) -> PruneResult:
    """Delete data no snapshot references and repack packs whose unused share exceeds ``max_unused``.

    Takes the exclusive lock (RepoLocked if anything else runs). Refuses with RepoCorrupt, deleting nothing,
    if a referenced chunk is missing from the index (run verify first).
    """
    if not 0.0 <= max_unused <= 1.0:
        raise UsageError(f"--max-unused must be between 0% and 100%, not {max_unused:.0%}")
    say = progress or (lambda _msg: None)
    res = PruneResult(dry_run=dry_run)
    lock = repo.exclusive_lock("prune", node)
    try:
        cutoff = now() - grace
        if not dry_run:
            # Packs no index file covers (lost index files, a backup killed mid-upload) are indexed first, so
            # their chunks count as stored: a snapshot may reference them.
            repo.heal_index()
        say("loading index")
        index_files = [o.key for o in repo.store.list("index/")]
        index: dict[bytes, IndexEntry] = {}
        for key in index_files:
            for cid, e in repo.read_index_file(key):
                index[cid] = e
        say("marking referenced data")
        manifests = repo.snapshots(include_partial=True)
        res.snapshots = len(manifests)
        used, used_pages = mark(repo, manifests)
        missing = [c for c in used if c not in index]
        if missing:
            raise RepoCorrupt(f"{len(missing)} referenced chunks are not in the index (first: {missing[0].hex()}); "
                              f"prune deleted nothing", hint="run `baton verify` to see which snapshots need them")
        res.chunks_used = len(used)
        res.chunks_unused = len(index) - len(used & index.keys())
        packs = {o.key: o for o in repo.store.list("packs/")}
        res.packs_total = len(packs)
        by_pack: dict[str, list[tuple[bytes, IndexEntry]]] = {}
        for cid, e in index.items():
            by_pack.setdefault(pack_key(e.pack_id), []).append((cid, e))
        delete_packs: list[str] = []
        repack: list[str] = []
        for key, info in packs.items():
            if info.mtime > cutoff:
                res.packs_kept_young += 1
                continue
            entries = by_pack.get(key, [])
            live = sum(e.stored_length for cid, e in entries if cid in used)
            total = sum(e.stored_length for _cid, e in entries)
            if live == 0:
                delete_packs.append(key)
            elif total and (total - live) / total > max_unused:
                repack.append(key)
        # New index: every entry whose pack survives, plus relocated live entries.
        gone = set(delete_packs) | set(repack)
        new_entries = [(cid, e) for cid, e in index.items() if pack_key(e.pack_id) not in gone]
        if repack:
            say(f"{'would repack' if dry_run else 'repacking'} {len(repack)} packs")
            moved = _repack(repo, repack, by_pack, used, res, dry_run)
            new_entries.extend(moved)
        res.packs_deleted = len(delete_packs)
        res.packs_repacked = len(repack)
        res.bytes_deleted = sum(packs[k].size for k in gone)
        if (gone or len(index_files) > 16) and not dry_run:
            say("writing the new index")
            written = [repo.write_index_file(new_entries[i:i + INDEX_FILE_ENTRIES])
                       for i in range(0, len(new_entries), INDEX_FILE_ENTRIES)]
            old = [k for k in index_files if k not in written]
            for k in old:
                repo.store.delete(k)
            repo.forget_index_files(old)
            res.index_files_replaced = len(old)
            for k in sorted(gone):
                repo.store.delete(k)
        say("would delete unreferenced pages (dry run)" if dry_run else "deleting unreferenced pages")
        for o in list(repo.store.list("pages/")):
            if o.mtime > cutoff:
                continue
            if bytes.fromhex(o.key.rsplit("/", 1)[-1]) not in used_pages:
                res.pages_deleted += 1
                if not dry_run:
                    repo.store.delete(o.key)
        if not dry_run:
            repo.invalidate_index()
    finally:
        lock.release()
    return res


def _repack(repo: Repository, keys: list[str], by_pack: dict[str, list[tuple[bytes, IndexEntry]]],
            used: set[bytes], res: PruneResult, dry_run: bool) -> list[tuple[bytes, IndexEntry]]:
    """Copy the live blobs of ``keys`` into new packs (verbatim, after checking each). Returns new entries."""
    out: list[tuple[bytes, IndexEntry]] = []
    buf = bytearray()
    entries: list[PackEntry] = []

    def seal() -> None:
        nonlocal buf, entries
        if not entries:
            return
        buf += pack_footer(entries, len(buf), repo.keys.data_key)
        data = bytes(buf)
        pid = blake3.blake3(data).digest()
        if not dry_run:
            repo.store.put_if_absent(pack_key(pid), data)
        res.packs_written += 1
        res.bytes_written += len(data)
        out.extend((e.chunk_id, IndexEntry(pid, e.offset, e.stored_length, e.raw_length, e.flags))
                   for e in entries)
        buf, entries = bytearray(), []

    for key in keys:
        try:
            data = repo.store.get(key)
        except ObjectNotFound as err:
            raise RepoCorrupt(f"{key} vanished during prune") from err
        for cid, e in by_pack.get(key, []):
            if cid not in used:
                continue
            blob = data[e.offset:e.offset + e.stored_length]
            # Never copy damage forward silently: a corrupt live blob stops prune (verify names it).
            decode_blob(repo.keys, cid, blob, e.flags, e.raw_length)
            if not buf:
                buf += pack_head(repo.keys.encrypted)
            entries.append(PackEntry(cid, len(buf), len(blob), e.raw_length, e.flags))
            buf += blob
            if len(buf) >= repo.config.pack_target:
                seal()
    seal()
    return out


def parse_duration(text: str) -> float:
    """Seconds in "90s", "15m", "1h", "2d" or a plain number of seconds. UsageError otherwise."""
    t = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError as e:
        raise UsageError(f"cannot read duration {text!r} (use e.g. 90s, 15m, 1h, 2d)") from e


def parse_percent(text: str) -> float:
    t = text.strip().rstrip("%")
    try:
        v = float(t) / 100.0
    except ValueError as e:
        raise UsageError(f"cannot read percentage {text!r} (use e.g. 20%)") from e
    if not 0.0 <= v <= 1.0:
        raise UsageError(f"percentage {text!r} must be between 0% and 100%")
    return v


# ----- index rebuild -------------------------------------------------------------------------------------------

@dataclass
class RebuildResult:
    packs: int = 0
    entries: int = 0
    bad_packs: list[str] = field(default_factory=list)
    index_files_replaced: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rebuild_index(repo: Repository, *, node: str = "") -> RebuildResult:
    """Recreate the chunk index from the packs' own tables (derived state is a rebuildable cache).

    Reads each pack's trailer and table with two ranged reads, writes new index files, then deletes the old
    ones. Packs whose trailer or table fail their checks are listed in ``bad_packs`` and left alone. Takes the
    exclusive lock.
    """
    res = RebuildResult()
    lock = repo.exclusive_lock("rebuild-index", node)
    try:
        old = [o.key for o in repo.store.list("index/")]
        entries: list[tuple[bytes, IndexEntry]] = []
        for obj in repo.store.list("packs/"):
            try:
                entries += repo.read_pack_table(obj)
                res.packs += 1
            except (RepoCorrupt, ValueError) as e:
                res.bad_packs.append(f"{obj.key}: {e}")
        res.entries = len(entries)
        written = [repo.write_index_file(entries[i:i + INDEX_FILE_ENTRIES])
                   for i in range(0, len(entries), INDEX_FILE_ENTRIES)]
        stale = [k for k in old if k not in written]
        for k in stale:
            repo.store.delete(k)
        res.index_files_replaced = len(stale)
        repo.invalidate_index()
    finally:
        lock.release()
    return res
