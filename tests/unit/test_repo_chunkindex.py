"""The chunk index (baton.repo.chunkindex) against a dict model, with merges forced often."""

from __future__ import annotations

import os
import random

import pytest

import baton.repo.chunkindex as ci
from baton.format.repo_index import IndexEntry
from baton.repo import DiskIdentity, Repository
from baton.repo.writer import BackupWriter
from baton.restore import restore

SEED = 4242


def _entry(rng: random.Random, packs: list[bytes]) -> IndexEntry:
    return IndexEntry(rng.choice(packs), rng.randrange(1 << 34), rng.randrange(1, 1 << 20), 65536, rng.randrange(4))


def test_matches_a_dict_through_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    print("seed", SEED)
    monkeypatch.setattr(ci, "MERGE_MIN", 50)
    rng = random.Random(SEED)
    packs = [rng.randbytes(32) for _ in range(7)]
    idx, model = ci.ChunkIndex(background=False), {}
    shared = rng.randbytes(8)
    for step in range(3000):
        if step % 3 == 0:
            cid = shared + rng.randbytes(24)  # ids sharing their first 8 bytes: the prefix search must scan
        elif model and step % 5 == 0:
            cid = rng.choice(list(model))      # an id again: the newer entry wins
        else:
            cid = rng.randbytes(32)
        e = _entry(rng, packs)
        if step % 100 == 0:
            batch = [(cid, e)] + [(rng.randbytes(32), _entry(rng, packs)) for _ in range(20)]
            idx.update(batch)
            model.update(batch)
        else:
            idx[cid] = e
            model[cid] = e
    assert idx.merges > 3
    _check(idx, model, rng, shared)


def test_background_merges_keep_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Additions while a merge runs on its thread: nothing is lost or stale."""
    monkeypatch.setattr(ci, "MERGE_MIN", 200)
    rng = random.Random(SEED + 1)
    packs = [rng.randbytes(32) for _ in range(3)]
    idx, model = ci.ChunkIndex(), {}
    shared = rng.randbytes(8)
    ids: list[bytes] = []
    for step in range(8000):
        cid = rng.choice(ids) if ids and step % 7 == 0 else rng.randbytes(32)
        ids.append(cid)
        e = _entry(rng, packs)
        idx[cid] = e
        model[cid] = e
        if step % 997 == 0:
            for c, v in list(model.items())[-50:]:
                assert idx.get(c) == v            # lookups during merges
    idx.wait_merged()
    assert idx.merges > 0 and idx.merge_error is None
    _check(idx, model, rng, shared)


def _check(idx: ci.ChunkIndex, model: dict[bytes, IndexEntry], rng: random.Random, shared: bytes) -> None:
    assert len(idx) == len(model)
    for cid, e in model.items():
        assert cid in idx and idx[cid] == e and idx.get(cid) == e
    for _ in range(200):
        miss = rng.choice([shared + rng.randbytes(24), rng.randbytes(32)])
        assert (miss in idx) == (miss in model)
        assert idx.get(miss) == model.get(miss)
    assert dict(idx.items()) == model
    st = idx.statistics()
    runs = st["base_entries"] + st["small_entries"]
    assert st["ram_filter_bytes"] + st["ram_fence_bytes"] <= 2 * 128 + 2.2 * runs   # filters 1-2 B, fences 1/8 B


def test_empty_and_bad_keys() -> None:
    idx = ci.ChunkIndex()
    assert len(idx) == 0 and b"x" not in idx and idx.get(bytes(32)) is None
    with pytest.raises(KeyError):
        idx[bytes(32)]
    idx.merge()
    assert list(idx.items()) == []


def test_backups_and_restore_with_merges_every_few_chunks(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The repository through merged bases: dedup, restore, a reloaded index, a healed one."""
    monkeypatch.setattr(ci, "MERGE_MIN", 3)
    cs = 4096
    rng = random.Random(SEED)
    img = bytearray(rng.randbytes(64 * cs))
    img[10 * cs:20 * cs] = bytes(10 * cs)
    disk = DiskIdentity("d", len(img), cs)
    repo = Repository.init(str(tmp_path / "repo"), pack_target=16 * cs)
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
    for i in range(64):
        w.put(i, bytes(img[i * cs:(i + 1) * cs]))
    m1 = w.commit({})
    repo.chunk_index().wait_merged()
    assert repo.chunk_index().merges > 0
    img[:cs] = rng.randbytes(cs)
    w = BackupWriter(repo, disk, parent=m1, node="n", mode="incremental", reason="", lineage="L")
    w.put(0, bytes(img[:cs]))
    w.put(1, bytes(img[cs:2 * cs]))                   # unchanged: deduplicated through the merged base
    m2 = w.commit({})
    assert w.statistics()["chunks_deduplicated"] == 1
    for repo_ in (repo, Repository.open(str(tmp_path / "repo"))):   # loaded index, then freshly loaded
        out = tmp_path / f"out-{id(repo_)}.img"
        restore(repo_, m2, str(out))
        assert out.read_bytes() == bytes(img)
    for obj in list(repo.store.list("index/")):       # lost index files: healed from the pack tables
        os.unlink(tmp_path / "repo" / obj.key)
    fresh = Repository.open(str(tmp_path / "repo"))
    out = tmp_path / "healed.img"
    restore(fresh, m2, str(out))
    assert out.read_bytes() == bytes(img)


def test_overlay_of_keeps_the_last_row_of_an_id_and_refuses_a_pack_outside_the_table() -> None:
    a, b = os.urandom(32), os.urandom(32)
    rows = ci.ROW.pack(a, 0, 10, 5, 7, 1) + ci.ROW.pack(b, 2, 20, 6, 8, 0) + ci.ROW.pack(a, 1, 30, 7, 9, 1)
    got = ci.overlay_of(rows, 3)
    assert got == {a: ci._TAIL.pack(1, 30, 7, 9, 1), b: ci._TAIL.pack(2, 20, 6, 8, 0)}
    assert ci.overlay_of(b"", 0) == {}
    with pytest.raises(ValueError, match="outside the table"):
        ci.overlay_of(rows, 2)          # b names pack 2 of a table of two
    with pytest.raises(ValueError, match="multiple"):
        ci.overlay_of(rows[:-1], 3)
