"""Restore, verify, forget and prune against local repositories."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import blake3
import pytest

from baton.errors import DeviceError, RepoCorrupt, RepoError, RepoLocked, UsageError
from baton.repo import BackupWriter, DiskIdentity, Manifest, Repository
from baton.repo.maintenance import ForgetPolicy, apply_policy, forget, parse_duration, parse_percent, prune
from baton.repo.repository import pack_key
from baton.restore import restore
from baton.verify import verify

CS = 4096
SEED = 777


def backup(repo: Repository, disk: DiskIdentity, img: bytes | bytearray, chunks: list[int] | None = None, *,
           parent: Manifest | None = None, mode: str = "full") -> Manifest:
    w = BackupWriter(repo, disk, parent=parent, node="n1", mode=mode, reason="t", lineage="L")
    for i in chunks if chunks is not None else range(disk.chunk_count):
        w.put(i, bytes(img[i * CS:(i + 1) * CS]))
    return w.commit({})


def make_img(rng: random.Random, n: int) -> bytearray:
    img = bytearray(n * CS)
    for i in range(n):
        if i % 3:
            img[i * CS:(i + 1) * CS] = rng.randbytes(CS)
    return img


@pytest.fixture
def repo(tmp_path) -> Repository:  # type: ignore[no-untyped-def]
    return Repository.init(str(tmp_path / "repo"), pack_target=64 * 1024)   # small packs: several per test


# ----- restore -------------------------------------------------------------------------------------------------

def test_restore_file_is_sparse_and_digest_matches(repo: Repository, tmp_path) -> None:  # type: ignore[no-untyped-def]
    print("seed", SEED)
    rng = random.Random(SEED)
    img = make_img(rng, 60)
    img += b"tail"                                           # a short last chunk
    disk = DiskIdentity("d", len(img), CS)
    m = backup(repo, disk, img)
    target = tmp_path / "out.img"
    target.write_bytes(b"\xff" * (len(img) + 5 * CS))         # old, larger content must vanish
    res = restore(repo, m, str(target), digest=True)
    assert target.read_bytes() == bytes(img)
    assert res.image_digest == blake3.blake3(bytes(img)).hexdigest()
    assert res.zero_chunks == 20 and res.bytes_written == len(img) - 20 * CS
    assert os.stat(target).st_blocks * 512 < len(img) - 10 * CS     # holes where the zero chunks are


def test_restore_refuses_checkpoint_unless_asked(repo: Repository, tmp_path) -> None:  # type: ignore[no-untyped-def]
    disk = DiskIdentity("d", 2 * CS, CS)
    w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
    w.put(0, b"a" * CS)
    cp = w.checkpoint()
    w.abort()
    with pytest.raises(RepoError, match="checkpoint"):
        restore(repo, cp, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    restore(repo, cp, str(tmp_path / "x"), allow_partial=True)
    assert (tmp_path / "x").read_bytes() == b"a" * CS + bytes(CS)


def test_restore_target_checks(repo: Repository, tmp_path) -> None:  # type: ignore[no-untyped-def]
    m = backup(repo, DiskIdentity("d", CS, CS), os.urandom(CS))
    with pytest.raises(DeviceError, match="directory"):
        restore(repo, m, str(tmp_path))
    with pytest.raises(DeviceError, match="does not exist"):
        restore(repo, m, str(tmp_path / "no" / "such" / "file"))
    with pytest.raises(DeviceError):
        restore(repo, m, "/dev/null")                        # a character device


def test_restore_names_corrupt_chunk(repo: Repository, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(SEED)
    img = make_img(rng, 12)
    disk = DiskIdentity("d", len(img), CS)
    m = backup(repo, disk, img)
    victim = 4
    cid = repo.snapshot_reader(m).chunk_id(victim)
    entry = repo.chunk_index()[cid]
    path = os.path.join(repo.url, pack_key(entry.pack_id))
    with open(path, "r+b") as f:
        f.seek(entry.offset + entry.stored_length // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x55]))
    fresh = Repository.open(repo.url)
    with pytest.raises(RepoCorrupt) as ei:
        restore(fresh, fresh.get_snapshot(m.snapshot_id), str(tmp_path / "out"))
    assert f"chunk {victim} " in str(ei.value) and cid.hex() in str(ei.value)


# ----- verify --------------------------------------------------------------------------------------------------

def test_verify_clean_and_corrupt(repo: Repository) -> None:
    rng = random.Random(SEED)
    img = make_img(rng, 30)
    disk = DiskIdentity("d", len(img), CS)
    m1 = backup(repo, disk, img)
    img2 = bytearray(img)
    img2[7 * CS] ^= 1
    m2 = backup(repo, disk, img2, [7], parent=m1, mode="incremental")
    rep = verify(repo)
    assert rep.ok and rep.chunks == 21 and set(rep.snapshots) == {m1.snapshot_id, m2.snapshot_id}
    # Corrupt a chunk both snapshots share, and delete the pack of the one only m2 has.
    shared = repo.snapshot_reader(m1).chunk_id(1)
    e = repo.chunk_index()[shared]
    p = os.path.join(repo.url, pack_key(e.pack_id))
    data = bytearray(Path(p).read_bytes())
    data[e.offset] ^= 0xFF
    Path(p).write_bytes(bytes(data))
    only2 = repo.snapshot_reader(m2).chunk_id(7)
    os.unlink(os.path.join(repo.url, pack_key(repo.chunk_index()[only2].pack_id)))
    rep = verify(Repository.open(repo.url))
    assert not rep.ok
    kinds = {(p.kind, p.object): p for p in rep.problems}
    bad = kinds[("corrupt-chunk", shared.hex())]
    assert set(bad.snapshots) == {m1.snapshot_id, m2.snapshot_id}
    miss = kinds[("missing-chunk", only2.hex())]
    assert miss.snapshots == (m2.snapshot_id,)
    assert any(p.kind == "corrupt-pack" for p in rep.problems)          # the pack no longer hashes to its name


def test_verify_detects_damaged_page_and_manifest(repo: Repository) -> None:
    disk = DiskIdentity("d", 4 * CS, CS)
    m = backup(repo, disk, os.urandom(4 * CS))
    page = next(iter(repo.store.list("pages/")))
    raw = bytearray(repo.store.get(page.key))
    raw[20] ^= 1
    repo.store.put(page.key, bytes(raw))
    rep = verify(Repository.open(repo.url))
    assert [p.kind for p in rep.problems] == ["bad-page"] and rep.problems[0].snapshots == (m.snapshot_id,)
    repo.store.put(f"snapshots/{'0' * 32}", b"garbage")
    rep = verify(Repository.open(repo.url))
    assert "bad-manifest" in {p.kind for p in rep.problems}


# ----- forget and prune ----------------------------------------------------------------------------------------

def _manifest_at(m: Manifest, t: float) -> Manifest:
    return Manifest(**{**m.__dict__, "start_time": t, "snapshot_id": os.urandom(16).hex()})


def test_policy_selection() -> None:
    base = Manifest("0" * 32, DiskIdentity("d", CS, CS), "L", "", "n", 0, 0, "full", "", 0, 0, 0, 0, 0, 0,
                    "0" * 64, 1, True)
    day = 86400.0
    t0 = 1_700_000_000.0 - (1_700_000_000.0 % day)
    snaps = [_manifest_at(base, t0 + d * day + h * 3600) for d in range(10) for h in (1, 5)]
    keep = apply_policy(snaps, ForgetPolicy(keep_last=1))
    assert list(keep) == [snaps[-1].snapshot_id]
    keep = apply_policy(snaps, ForgetPolicy(keep_daily=3))
    assert set(keep) == {snaps[-1].snapshot_id, snaps[-3].snapshot_id, snaps[-5].snapshot_id}
    keep = apply_policy(snaps, ForgetPolicy(keep_last=2, keep_daily=2))
    assert set(keep) == {snaps[-1].snapshot_id, snaps[-2].snapshot_id, snaps[-3].snapshot_id}


def test_forget_and_prune_free_space(repo: Repository) -> None:
    rng = random.Random(SEED)
    disk = DiskIdentity("d", 40 * CS, CS)
    img = make_img(rng, 40)
    snaps = [backup(repo, disk, img)]
    for _ in range(3):
        for c in rng.sample(range(40), 10):
            img[c * CS:(c + 1) * CS] = rng.randbytes(CS)
        snaps.append(backup(repo, disk, img))
    with pytest.raises(UsageError):
        forget(repo)
    res = forget(repo, policy=ForgetPolicy(keep_last=1), dry_run=True)
    assert len(res.removed) == 3 and len(repo.snapshots()) == 4
    res = forget(repo, policy=ForgetPolicy(keep_last=1))
    assert [m.snapshot_id for m in repo.snapshots()] == [snaps[-1].snapshot_id]
    before = sum(o.size for o in repo.store.list("packs/"))
    dry = prune(repo, grace=0, dry_run=True)
    assert dry.packs_deleted + dry.packs_repacked > 0
    assert sum(o.size for o in repo.store.list("packs/")) == before
    res2 = prune(repo, grace=0, max_unused=0.0)
    after = sum(o.size for o in repo.store.list("packs/"))
    assert after < before and res2.pages_deleted > 0
    assert verify(Repository.open(repo.url)).ok
    fresh = Repository.open(repo.url)
    r = fresh.snapshot_reader(fresh.get_snapshot("latest"))
    assert b"".join(r.read(i) for i in range(40)) == bytes(img)
    # Every pack left holds only live data now.
    again = prune(Repository.open(repo.url), grace=0, max_unused=0.0)
    assert again.packs_deleted == 0 and again.packs_repacked == 0


def test_prune_grace_keeps_young_data(repo: Repository) -> None:
    disk = DiskIdentity("d", 4 * CS, CS)
    m = backup(repo, disk, os.urandom(4 * CS))
    forget(repo, [m.snapshot_id])
    res = prune(repo, grace=3600)
    assert res.packs_deleted == 0 and res.packs_kept_young >= 1 and res.pages_deleted == 0
    later = time.time() + 7200
    res = prune(repo, grace=3600, now=lambda: later)
    assert res.packs_deleted >= 1 and list(repo.store.list("packs/")) == []


def test_prune_removes_unindexed_packs_of_aborted_backup(repo: Repository) -> None:
    disk = DiskIdentity("d", 40 * CS, CS)
    keep = backup(repo, disk, os.urandom(40 * CS))
    w = BackupWriter(repo, DiskIdentity("e", 40 * CS, CS), parent=None, node="n", mode="full", reason="",
                          lineage="L")
    for i in range(40):
        w.put(i, os.urandom(CS))                                # may upload some packs before the abort
    w.abort()
    # A crashed backup's upload that no index names (deterministic stand-in for one finishing late).
    orphan = "packs/ee/" + "ee" * 32
    repo.store.put(orphan, b"BTNPACK\0 orphan pack of a crashed backup")
    res = prune(Repository.open(repo.url), grace=0)
    assert res.packs_deleted >= 1
    assert orphan not in {o.key for o in repo.store.list("packs/")}
    assert verify(Repository.open(repo.url)).ok
    assert Repository.open(repo.url).get_snapshot(keep.snapshot_id)


def test_prune_refuses_while_backup_runs(repo: Repository) -> None:
    w = BackupWriter(repo, DiskIdentity("d", CS, CS), parent=None, node="n", mode="full", reason="",
                          lineage="L")
    with pytest.raises(RepoLocked):
        prune(repo, grace=0)
    w.abort()


def test_prune_refuses_when_referenced_chunk_missing(repo: Repository) -> None:
    disk = DiskIdentity("d", 4 * CS, CS)
    backup(repo, disk, os.urandom(4 * CS))
    for o in list(repo.store.list("index/")):
        repo.store.delete(o.key)
    repo.store.delete(next(iter(repo.store.list("packs/"))).key)  # data really lost, not just its index
    packs = len(list(repo.store.list("packs/")))
    with pytest.raises(RepoCorrupt, match="deleted nothing"):
        prune(Repository.open(repo.url), grace=0)
    assert len(list(repo.store.list("packs/"))) == packs


def test_prune_indexes_packs_whose_index_files_were_lost(repo: Repository) -> None:
    """Issue 9 defect 7: lost index files are derived state; prune (like backup, restore and verify) indexes
    the uncovered packs again instead of refusing, and deletes nothing a snapshot needs."""
    disk = DiskIdentity("d", 4 * CS, CS)
    img = os.urandom(4 * CS)
    m = backup(repo, disk, img)
    for o in list(repo.store.list("index/")):
        repo.store.delete(o.key)
    packs = len(list(repo.store.list("packs/")))
    prune(Repository.open(repo.url), grace=0)
    assert len(list(repo.store.list("packs/"))) == packs
    fresh = Repository.open(repo.url)
    r = fresh.snapshot_reader(m)
    assert b"".join(r.read(i) for i in range(4)) == img


def test_duration_and_percent_parsing() -> None:
    assert parse_duration("90s") == 90 and parse_duration("1h") == 3600 and parse_duration("2d") == 172800
    assert parse_percent("20%") == pytest.approx(0.2)
    with pytest.raises(UsageError):
        parse_duration("soon")
    with pytest.raises(UsageError):
        parse_percent("150%")


def test_restore_many_batches_across_packs(repo: Repository, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An incremental whose chunks are scattered over many small packs, over several restore batches."""
    rng = random.Random(SEED + 1)
    n = 700
    img = make_img(rng, n)
    disk = DiskIdentity("d", len(img), CS)
    m = backup(repo, disk, img)
    changed = sorted(rng.sample(range(n), 90))
    for c in changed:
        img[c * CS:(c + 1) * CS] = rng.randbytes(CS)
    img[10 * CS:11 * CS] = img[20 * CS:21 * CS]              # a duplicate inside one batch
    m2 = backup(repo, disk, img, [*changed, 10], parent=m, mode="incremental")
    res = restore(Repository.open(repo.url), m2, str(tmp_path / "out"), digest=True)
    assert (tmp_path / "out").read_bytes() == bytes(img)
    assert res.image_digest == blake3.blake3(bytes(img)).hexdigest()


def test_coalesce_runs() -> None:
    from baton.format.repo_index import IndexEntry
    from baton.repo.repository import coalesce

    p1, p2 = b"1" * 32, b"2" * 32
    items = [(b"a" * 32, IndexEntry(p1, 100, 10, 10, 0)), (b"b" * 32, IndexEntry(p1, 16, 84, 84, 0)),
             (b"c" * 32, IndexEntry(p2, 16, 5, 5, 0)), (b"d" * 32, IndexEntry(p1, 1 << 20, 5, 5, 0)),
             (b"a" * 32, IndexEntry(p1, 100, 10, 10, 0))]
    runs = coalesce(items, max_gap=1000)
    assert [[c[:1] for c, _e in r] for r in runs] == [[b"b", b"a"], [b"d"], [b"c"]]


def test_rebuild_index_from_packs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from baton.repo.maintenance import rebuild_index

    url = str(tmp_path / "enc")
    kf = str(tmp_path / "key")
    repo = Repository.init(url, encryption="aes-256-gcm", key_file=kf, pack_target=16 * 1024)
    rng = random.Random(SEED)
    img = make_img(rng, 30)
    m = backup(repo, DiskIdentity("d", len(img), CS), img)
    for o in list(repo.store.list("index/")):
        repo.store.delete(o.key)
    broken = Repository.open(url, key_file=kf)
    # Lost index files are derived state: verify (like restore and backup) indexes the uncovered packs again.
    assert verify(broken).ok and broken.statistics()["packs_healed"] >= 2
    assert len(list(repo.store.list("index/"))) >= 1
    for o in list(repo.store.list("index/")):
        repo.store.delete(o.key)
    broken = Repository.open(url, key_file=kf)
    res = rebuild_index(broken)
    assert res.entries == 20 and res.packs >= 2 and not res.bad_packs
    fresh = Repository.open(url, key_file=kf)
    assert verify(fresh).ok
    r = fresh.snapshot_reader(m)
    assert b"".join(r.read(i) for i in range(30)) == bytes(img)
