"""Repository faults: ENOSPC (injected and on a real tiny tmpfs), storage errors mid-backup, corrupt data."""

from __future__ import annotations

import os
import subprocess
import tempfile
import uuid

import pytest

from baton.errors import RepoFull, StorageError
from baton.repo import BackupWriter, DiskIdentity, Repository
from baton.storage import build_store, open_base_store
from baton.testing.faulty_storage import Fault, FaultyStore
from baton.verify import verify
from conftest import need_root, need_tool

CS = 65536


def _fill(w, n: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    import random

    rng = random.Random(seed)
    for i in range(n):
        w.put(i, rng.randbytes(CS))


def test_injected_enospc_fails_cleanly_and_repo_stays_valid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seed = 31337
    print("seed", seed)
    url = str(tmp_path / "repo")
    Repository.init(url, pack_target=256 * 1024)
    good = Repository.open(url)
    w = BackupWriter(good, DiskIdentity("d", 8 * CS, CS), parent=None, node="n", mode="full", reason="",
                          lineage="L")
    _fill(w, 8, seed)
    m = w.commit({})
    store = build_store(open_base_store(url), faults=FaultyStore.factory(
        [Fault("put", "packs/", "enospc", after=1, times=None)], seed), sleep=lambda _t: None)
    repo = Repository.open(url, store=store)
    w = BackupWriter(repo, DiskIdentity("e", 32 * CS, CS), parent=None, node="n", mode="full", reason="",
                          lineage="L")
    with pytest.raises(RepoFull):
        _fill(w, 32, seed + 1)
        w.commit({})
    with pytest.raises(Exception, match="failed earlier"):
        w.put(0, bytes(CS))                                 # sticky
    w.abort()
    fresh = Repository.open(url)
    assert [s.snapshot_id for s in fresh.snapshots(include_partial=True)] == [m.snapshot_id]
    assert verify(fresh).ok
    assert list(fresh.store.list("locks/")) == []


@pytest.mark.integration
def test_real_enospc_on_tiny_tmpfs() -> None:
    need_root()
    need_tool("mount", "umount")
    base = tempfile.mkdtemp(prefix="repo-eng-tmpfs-")
    mounted = False
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", base], check=True, timeout=30)
        mounted = True
        url = os.path.join(base, "repo")
        repo = Repository.init(url, pack_target=512 * 1024)
        w = BackupWriter(repo, DiskIdentity("d", 64 * CS, CS), parent=None, node="n", mode="full", reason="",
                              lineage="L")
        with pytest.raises(RepoFull) as ei:
            _fill(w, 64, 5)                                 # 4 MiB of random data into 2 MiB
            w.commit({})
        assert "no space left" in str(ei.value)
        w.abort()
        fresh = Repository.open(url)
        assert fresh.snapshots(include_partial=True) == []
        leftovers = [f for _r, _d, fs in os.walk(url) for f in fs if f.startswith(".tmp-")]
        assert leftovers == []                              # failed writes cleaned their temp files
    finally:
        if mounted:
            subprocess.run(["umount", base], check=False, timeout=30)
        os.rmdir(base)


def test_corrupt_reads_from_store_are_detected() -> None:
    """A store that flips bits on reads: restore-path reads fail with RepoCorrupt, never return bad data."""
    seed = 4711
    print("seed", seed)
    url = f"memory://corrupt-{uuid.uuid4().hex}"
    repo = Repository.init(url)
    w = BackupWriter(repo, DiskIdentity("d", 4 * CS, CS), parent=None, node="n", mode="full", reason="",
                          lineage="L")
    _fill(w, 4, seed)
    m = w.commit({})
    bad = build_store(open_base_store(url), faults=FaultyStore.factory(
        [Fault("get", "packs/", "corrupt", times=None)], seed))
    r = Repository.open(url, store=bad)
    from baton.errors import RepoCorrupt

    for i in range(4):
        with pytest.raises(RepoCorrupt):
            r.snapshot_reader(m).read(i)
    rep = verify(r)
    assert not rep.ok and {p.kind for p in rep.problems} >= {"corrupt-chunk"}


def test_truncated_pack_reads_name_the_chunk() -> None:
    url = f"memory://trunc-{uuid.uuid4().hex}"
    repo = Repository.init(url)
    w = BackupWriter(repo, DiskIdentity("d", CS, CS), parent=None, node="n", mode="full", reason="", lineage="L")
    _fill(w, 1, 1)
    m = w.commit({})
    bad = build_store(open_base_store(url), faults=FaultyStore.factory([Fault("get", "packs/", "truncate")], 1))
    r = Repository.open(url, store=bad)
    cid = r.snapshot_reader(m).chunk_id(0)
    from baton.errors import RepoCorrupt

    with pytest.raises(RepoCorrupt, match=cid.hex()):
        r.snapshot_reader(m).read(0)


def test_lost_index_put_reply_still_commits() -> None:
    url = f"memory://lost-{uuid.uuid4().hex}"
    Repository.init(url)
    store = build_store(open_base_store(url), faults=FaultyStore.factory(
        [Fault("put", "index/", "lost-reply"), Fault("put", "snapshots/", "transient", times=2)], 3),
        sleep=lambda _t: None)
    repo = Repository.open(url, store=store)
    w = BackupWriter(repo, DiskIdentity("d", 2 * CS, CS), parent=None, node="n", mode="full", reason="",
                          lineage="L")
    _fill(w, 2, 3)
    m = w.commit({})
    assert verify(Repository.open(url)).ok and Repository.open(url).get_snapshot(m.snapshot_id)


def test_permanent_list_failure_surfaces() -> None:
    url = f"memory://list-{uuid.uuid4().hex}"
    Repository.init(url)
    store = build_store(open_base_store(url), faults=FaultyStore.factory(
        [Fault("list", "", "permanent", times=None)], 1))
    with pytest.raises(StorageError):
        Repository.open(url, store=store).snapshots()


def test_failure_at_every_write_leaves_a_consistent_repository() -> None:
    """Fail the k-th store write of an incremental backup with checkpoints, for every k. Afterwards the
    repository verifies clean, the parent is intact, and the new snapshot exists only if its final
    manifest was written (checkpoints may exist as partial snapshots)."""
    import random

    from baton.repo import Manifest

    seed = 8080
    print("seed", seed)
    rng = random.Random(seed)
    cs = 4096
    disk = DiskIdentity("d", 64 * cs, cs)
    base_img = [rng.randbytes(cs) if i % 3 else bytes(cs) for i in range(64)]
    changes = {i: rng.randbytes(cs) for i in rng.sample(range(64), 20)}

    def prepare() -> tuple[str, Manifest]:
        url = f"memory://every-{uuid.uuid4().hex}"
        repo = Repository.init(url, pack_target=8 * cs)
        w = BackupWriter(repo, disk, parent=None, node="n", mode="full", reason="", lineage="L")
        for i, c in enumerate(base_img):
            w.put(i, c)
        return url, w.commit({})

    def incremental(repo: Repository, parent: Manifest) -> Manifest:
        w = BackupWriter(repo, disk, parent=parent, node="n", mode="incremental", reason="", lineage="L")
        try:
            for n, (i, c) in enumerate(sorted(changes.items())):
                w.put(i, c)
                if n == 9:
                    w.checkpoint()
            return w.commit({})
        finally:
            w.abort()

    # Count the writes of a clean run.
    url, parent = prepare()
    counting = build_store(open_base_store(url), faults=FaultyStore.factory([Fault("put", "", "transient",
                                                                                   after=10**9)], seed))
    incremental(Repository.open(url, store=counting), parent)
    total = counting.inner.rules[0].seen  # type: ignore[attr-defined]
    assert total > 10
    for k in range(total):
        url, parent = prepare()
        faulty = build_store(open_base_store(url), faults=FaultyStore.factory(
            [Fault("put", "", "permanent", after=k)], seed), retry=None)
        try:
            incremental(Repository.open(url, store=faulty), parent)
            raise AssertionError(f"write {k} did not fail")
        except StorageError:
            pass
        fresh = Repository.open(url)
        assert verify(fresh).ok, f"verify failed after a failure at write {k}"
        r = fresh.snapshot_reader(fresh.get_snapshot(parent.snapshot_id))
        assert [r.read(i) for i in range(64)] == base_img
        assert [m.snapshot_id for m in fresh.snapshots()] == [parent.snapshot_id]
        assert list(fresh.store.list("locks/")) == []
