"""Verify a repository: structure, then a full re-hash of every referenced chunk. No option skips the re-hash.

Checks, in order:

1. every chunk-index file, manifest and index page decodes and passes its checksum/authentication;
2. every chunk a snapshot references is in the chunk index (packs no index file covers are indexed first);
3. every pack holding a referenced chunk exists, its bytes hash to its name, and its own table (trailer)
   agrees with the index entries;
4. every referenced chunk is read, decrypted, decompressed and re-hashed against its id.

The report lists each problem with the object it concerns and the snapshots that need it. The engine never
raises for damage it finds (only for a repository it cannot open or a lock it cannot take); the caller turns a
non-empty problem list into :class:`baton.errors.VerifyFailed`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import blake3

from baton.errors import BatonError, ObjectNotFound, RepoCorrupt
from baton.format.repo_index import ZERO_ID, IndexEntry
from baton.format.repo_pack import PACK_TAIL, parse_pack_table, parse_pack_tail
from baton.repo import Manifest, Repository
from baton.repo.crypto import decode_blob
from baton.repo.repository import pack_key


@dataclass(frozen=True)
class Problem:
    kind: str                 # missing-chunk corrupt-chunk missing-pack corrupt-pack bad-page bad-manifest bad-index
    object: str               # the chunk id, pack key, page id, manifest or index key
    detail: str
    snapshots: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "object": self.object, "detail": self.detail, "snapshots": list(self.snapshots)}


@dataclass
class VerifyReport:
    snapshots: list[str] = field(default_factory=list)
    index_files: int = 0
    pages: int = 0
    chunks: int = 0
    packs: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "snapshots": self.snapshots, "index_files": self.index_files, "pages": self.pages,
                "chunks": self.chunks, "packs": self.packs, "bytes_read": self.bytes_read,
                "seconds": self.seconds, "problems": [p.to_json() for p in self.problems]}


def verify(repo: Repository, snapshot_refs: Iterable[str] = (), *,
           progress: Callable[[int, int], None] | None = None, workers: int = 2) -> VerifyReport:
    """Check the named snapshots (default: every snapshot, including checkpoints) and the data they need."""
    t0 = time.monotonic()
    rep = VerifyReport()
    lock = repo.shared_lock("verify")
    try:
        _verify(repo, list(snapshot_refs), rep, progress, workers)
    finally:
        lock.release()
    rep.seconds = round(time.monotonic() - t0, 3)
    return rep


def _verify(repo: Repository, refs: list[str], rep: VerifyReport,
            progress: Callable[[int, int], None] | None, workers: int) -> None:
    index: dict[bytes, IndexEntry] = {}
    for obj in repo.store.list("index/"):
        rep.index_files += 1
        try:
            for cid, e in repo.read_index_file(obj.key):
                index[cid] = e
        except BatonError as err:
            rep.problems.append(Problem("bad-index", obj.key, str(err)))
    manifests: list[Manifest] = []
    if refs:
        for ref in refs:
            manifests.append(repo.get_snapshot(ref))
    else:
        for sid in repo.snapshot_ids():
            try:
                manifests.append(repo.read_manifest(sid))
            except ObjectNotFound:
                continue
            except BatonError as err:
                rep.problems.append(Problem("bad-manifest", f"snapshots/{sid}", str(err), (sid,)))
    rep.snapshots = [m.snapshot_id for m in manifests]

    # Which snapshots need which chunk (walk each tree; shared pages are read once, their users remembered).
    needed_by: dict[bytes, set[str]] = {}
    page_users: dict[bytes, set[str]] = {}
    page_children: dict[bytes, tuple[int, list[bytes]]] = {}
    bad_pages: dict[bytes, str] = {}
    for m in manifests:
        try:
            tree = repo.tree(m)
        except RepoCorrupt as err:
            rep.problems.append(Problem("bad-manifest", f"snapshots/{m.snapshot_id}", str(err),
                                        (m.snapshot_id,)))
            continue
        stack = [(tree.depth - 1, tree.root)] if tree.depth else []
        while stack:
            level, pid = stack.pop()
            if pid == ZERO_ID:
                continue
            page_users.setdefault(pid, set()).add(m.snapshot_id)
            if pid in bad_pages:
                continue
            got = page_children.get(pid)
            if got is None:
                try:
                    got = repo.load_page(pid)
                except BatonError as err:
                    bad_pages[pid] = str(err)
                    continue
                if got[0] != level:
                    bad_pages[pid] = f"level {got[0]}, expected {level}"
                    continue
                page_children[pid] = got
                rep.pages += 1
            lvl, ids = got
            if lvl == 0:
                for cid in ids:
                    if cid != ZERO_ID:
                        needed_by.setdefault(cid, set()).add(m.snapshot_id)
            else:
                stack.extend((lvl - 1, c) for c in ids)
    for pid, detail in bad_pages.items():
        rep.problems.append(Problem("bad-page", pid.hex(), detail, tuple(sorted(page_users.get(pid, ())))))

    by_pack: dict[bytes, list[tuple[bytes, IndexEntry]]] = {}
    for cid, users in needed_by.items():
        found = index.get(cid) or repo.find(cid)  # find() indexes packs that lost their index files
        if found is None:
            rep.problems.append(Problem("missing-chunk", cid.hex(), "in no pack of the repository",
                                        tuple(sorted(users))))
            continue
        by_pack.setdefault(found.pack_id, []).append((cid, found))
    total = sum(len(v) for v in by_pack.values())
    done = 0
    # Packs are checked in a small pool (BLAKE3, AES-GCM and zstd release the GIL); results are merged in
    # pack order so the report is deterministic. At most ``workers`` packs are held in memory at a time.
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="baton-verify") as pool:
        for problems, nbytes, nchunks in pool.map(lambda item: _check_pack(repo, item[0], item[1], needed_by),
                                                  sorted(by_pack.items())):
            rep.packs += 1
            rep.problems.extend(problems)
            rep.bytes_read += nbytes
            rep.chunks += nchunks
            done += nchunks
            if progress is not None:
                progress(done, total)


def _check_pack(repo: Repository, pid: bytes, entries: list[tuple[bytes, IndexEntry]],
                needed_by: dict[bytes, set[str]]) -> tuple[list[Problem], int, int]:
    """(problems, bytes read, chunks checked) for one pack and the referenced chunks it holds."""
    key = pack_key(pid)
    problems: list[Problem] = []
    pack_users = tuple(sorted({s for cid, _e in entries for s in needed_by[cid]}))
    try:
        data = repo.store.get(key)
    except ObjectNotFound:
        problems.append(Problem("missing-pack", key, f"holds {len(entries)} referenced chunks", pack_users))
        for cid, _e in entries:
            problems.append(Problem("missing-chunk", cid.hex(), f"its pack {key} is missing",
                                    tuple(sorted(needed_by[cid]))))
        return problems, 0, len(entries)
    if blake3.blake3(data).digest() != pid:
        problems.append(Problem("corrupt-pack", key, "content does not hash to its name", pack_users))
    try:
        tail = data[-PACK_TAIL.size:]
        _f, _n, toff, tlen = parse_pack_tail(tail, len(data), key)
        table = {pe.chunk_id: pe for pe in parse_pack_table(data[toff:toff + tlen], tail, key,
                                                              repo.keys.data_key)}
        for cid, ie in entries:
            pe = table.get(cid)
            if pe is None or (pe.offset, pe.stored_length) != (ie.offset, ie.stored_length):
                problems.append(Problem("corrupt-pack", key,
                                        f"its table disagrees with the index for chunk {cid.hex()}", pack_users))
                break
    except BatonError as err:
        problems.append(Problem("corrupt-pack", key, f"unreadable table: {err}", pack_users))
    for cid, ent in entries:
        blob = data[ent.offset:ent.offset + ent.stored_length]
        try:
            if len(blob) != ent.stored_length:
                raise RepoCorrupt(f"chunk {cid.hex()}: pack is truncated")
            decode_blob(repo.keys, cid, blob, ent.flags, ent.raw_length)
        except BatonError as err:
            problems.append(Problem("corrupt-chunk", cid.hex(), f"{err} (pack {key})",
                                    tuple(sorted(needed_by[cid]))))
    return problems, len(data), len(entries)
