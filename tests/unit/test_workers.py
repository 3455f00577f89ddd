"""The engine's process-wide threads (baton.workers) and the parent tree's leaves loaded ahead
(TreeReader.prefetch_leaf): a daemon's backups reuse one set of threads, and a leaf a backup changes is loaded
on the page pool, checked as any page."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import uuid

import pytest

from baton.errors import RepoCorrupt
from baton.repo import BackupWriter, DiskIdentity, Manifest, Repository
from baton.repo import writer as writer_mod
from baton.repo.tree import TreeReader
from baton.workers import finish, prestart, shared_pool

CS = 4096
SEED = 20261128


def _backup(repo: Repository, disk: DiskIdentity, img: bytes | bytearray, chunks: range | list[int],
            parent: Manifest | None) -> Manifest:
    w = BackupWriter(repo, disk, parent=parent, node="n1", mode="full" if parent is None else "incremental",
                     reason="t", lineage="L")
    for i in chunks:
        w.put(i, bytes(img[i * CS:(i + 1) * CS]))
    return w.commit({})


def _image(repo: Repository, m: Manifest) -> bytes:
    r = repo.snapshot_reader(m)
    return b"".join(r.read(i) for i in range(r.chunk_count))


def _rewrite(img: bytearray, rng: random.Random, chunks: list[int] | range) -> list[int]:
    """New random content in ``chunks`` of ``img``; returns them sorted (the chunks a backup must put)."""
    for c in chunks:
        img[c * CS:(c + 1) * CS] = rng.randbytes(CS)
    return sorted(chunks)


def _encode_threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.name.startswith("baton-encode") and t.ident}


def test_backups_in_one_process_reuse_its_threads() -> None:
    """The second backup of a process (a daemon's next one) starts no encode thread: it runs on the ones the
    first started, which stay (a pool per writer shut them down at every commit)."""
    rng = random.Random(SEED)
    repo = Repository.init(f"memory://workers-{uuid.uuid4().hex}")
    disk = DiskIdentity("w", 256 * CS, CS)
    img = bytearray(rng.randbytes(disk.size))
    m1 = _backup(repo, disk, img, range(256), None)
    after_first = _encode_threads()
    assert after_first
    _rewrite(img, rng, range(0, 256, 3))
    m2 = _backup(repo, disk, img, range(0, 256, 3), m1)
    assert _encode_threads() == after_first
    assert _image(repo, m2) == bytes(img)


def test_prestart_starts_every_thread_now() -> None:
    pool = shared_pool(f"baton-test-{uuid.uuid4().hex[:8]}", 5)
    prestart(pool, 5)
    name = pool._thread_name_prefix  # type: ignore[attr-defined]
    assert sum(1 for t in threading.enumerate() if t.name.startswith(name)) == 5
    assert shared_pool(name, 5) is pool


def test_finish_cancels_what_has_not_started_and_waits_for_what_runs() -> None:
    pool = shared_pool(f"baton-test-{uuid.uuid4().hex[:8]}", 1)
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def first() -> None:
        started.set()
        release.wait(30)
        ran.append("first")

    running = pool.submit(first)
    queued = pool.submit(ran.append, "queued")
    assert started.wait(30)
    done = threading.Event()

    def finishing() -> None:
        finish([running, queued, None])
        done.set()

    t = threading.Thread(target=finishing)
    t.start()
    assert not done.wait(0.2)  # still waiting for the running task
    release.set()
    t.join(30)
    assert done.is_set() and ran == ["first"] and queued.cancelled() and running.done()


def test_a_prefetched_leaf_is_the_leaf_and_is_checked() -> None:
    rng = random.Random(SEED)
    repo = Repository.init(f"memory://workers-{uuid.uuid4().hex}")
    disk = DiskIdentity("t", 3 * 4096 * CS, CS)   # three leaves under a root
    img = bytearray(disk.size)
    _rewrite(img, rng, rng.sample(range(disk.chunk_count), 300))
    m = _backup(repo, disk, img, range(disk.chunk_count), None)
    pool = shared_pool("baton-pages", writer_mod.PAGE_UPLOADS)

    plain = repo.tree(m)
    ahead = repo.tree(m)
    for leaf_no in range(3):
        ahead.prefetch_leaf(leaf_no, pool.submit)
    assert ahead.prefetching == 3
    assert [ahead.leaf(n) for n in range(3)] == [plain.leaf(n) for n in range(3)]
    assert ahead.prefetching == 0

    def wrong_level(pid: bytes) -> tuple[int, list[bytes]]:
        level, ids = repo.load_page(pid)
        return level + 1, ids

    bad = TreeReader(bytes.fromhex(m.root), disk.chunk_count, repo.load_page)
    bad.page_ids(1, 0)                      # the root, loaded right
    bad._load = wrong_level                 # type: ignore[method-assign]
    bad.prefetch_leaf(1, pool.submit)
    with pytest.raises(RepoCorrupt):
        bad.leaf(1)


def test_reading_the_tree_in_order_loads_the_next_leaves_ahead() -> None:
    """``iter_ids(ahead=N, submit=...)`` (a restore's): the same ids in the same order, every leaf after the
    first loaded through ``submit`` (at most N started ahead of the one read), and each leaf loaded once."""
    rng = random.Random(SEED)
    repo = Repository.init(f"memory://workers-{uuid.uuid4().hex}")
    disk = DiskIdentity("t", 5 * 4096 * CS - 3 * CS, CS)   # five leaves (the last one short) under a root
    img = bytearray(disk.size)
    _rewrite(img, rng, rng.sample(range(disk.chunk_count), 500))
    m = _backup(repo, disk, img, range(disk.chunk_count), None)
    pool = shared_pool("baton-pages", writer_mod.PAGE_UPLOADS)
    plain = list(repo.tree(m).iter_ids())
    assert len(plain) == disk.chunk_count

    loads: list[bytes] = []
    submitted: list[bytes] = []
    most_waiting = 0

    def load(pid: bytes) -> tuple[int, list[bytes]]:
        loads.append(pid)
        return repo.load_page(pid)

    tree = TreeReader(bytes.fromhex(m.root), disk.chunk_count, load)

    def submit(fn, pid):  # type: ignore[no-untyped-def]
        nonlocal most_waiting
        submitted.append(pid)
        most_waiting = max(most_waiting, tree.prefetching + 1)
        return pool.submit(fn, pid)

    assert list(tree.iter_ids(ahead=2, submit=submit)) == plain
    leaves = [tree.page_id(0, n) for n in range(5)]
    assert submitted == leaves[1:]            # the first is read at once; the others came through the pool
    assert most_waiting == 2
    assert sorted(loads) == sorted([bytes.fromhex(m.root), *leaves]) and tree.prefetching == 0


def test_an_incremental_loads_its_leaves_on_the_page_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's leaves an incremental changes load on the page pool while its chunks are encoded (a cold
    leaf took its caller 2-3 ms), and the snapshot is the same as without."""
    rng = random.Random(SEED)
    repo = Repository.init(f"memory://workers-{uuid.uuid4().hex}")
    disk = DiskIdentity("i", 4 * 4096 * CS, CS)
    img = bytearray(disk.size)
    _rewrite(img, rng, rng.sample(range(disk.chunk_count), 400))
    m1 = _backup(repo, disk, img, range(disk.chunk_count), None)
    fresh = repo
    loaders: list[str] = []
    real = fresh.load_page

    def recording(pid: bytes) -> tuple[int, list[bytes]]:
        loaders.append(threading.current_thread().name)
        return real(pid)

    monkeypatch.setattr(fresh, "load_page", recording)
    changed = _rewrite(img, rng, rng.sample(range(disk.chunk_count), 40))
    m2 = _backup(fresh, disk, img, changed, m1)
    leaves = [name for name in loaders if name.startswith("baton-pages")]
    assert len(leaves) == 4 and len(loaders) == 5, loaders   # each changed leaf on the pool; the root here
    assert _image(repo, m2) == bytes(img)


def test_the_chunk_index_loads_on_the_page_pool_and_its_error_fails_the_backup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup's chunk-index load and heal (``Repository.prepare_backup``) run on the page pool while the caller
    freezes and reads; the snapshot is the same as without. If they fail, the backup fails with their error
    and publishes nothing (the error is never lost with the thread)."""
    rng = random.Random(SEED)
    repo = Repository.init(f"memory://workers-{uuid.uuid4().hex}")
    disk = DiskIdentity("x", 2 * 4096 * CS, CS)
    img = bytearray(disk.size)
    _rewrite(img, rng, rng.sample(range(disk.chunk_count), 200))
    m1 = _backup(repo, disk, img, range(disk.chunk_count), None)
    real = Repository.prepare_backup
    ran_on: list[str] = []

    def recording(self: Repository, **kw: bool) -> None:
        ran_on.append(threading.current_thread().name)
        real(self, **kw)

    monkeypatch.setattr(Repository, "prepare_backup", recording)
    changed = _rewrite(img, rng, rng.sample(range(disk.chunk_count), 30))
    m2 = _backup(repo, disk, img, changed, m1)
    assert len(ran_on) == 1 and ran_on[0].startswith("baton-pages"), ran_on
    assert _image(repo, m2) == bytes(img)

    def failing(self: Repository, **kw: bool) -> None:
        raise OSError(28, "No space left on device (chunk-index cache)")

    monkeypatch.setattr(Repository, "prepare_backup", failing)
    before = set(repo.snapshot_ids())
    with pytest.raises(OSError, match="No space left"):
        _backup(repo, disk, img, changed[:3], m2)
    assert set(repo.snapshot_ids()) == before


def test_a_process_that_exits_while_its_threads_start_exits() -> None:
    """The per-disk daemon starts its pools from a daemon thread; a daemon that stops right after it starts (a
    failed or quick attach) left that thread stopped mid-way and the pools' threads waiting for it, and the
    interpreter's join of those threads hung the process's exit for ever."""
    child = subprocess.run([sys.executable, "-c", (
        "import threading, time\n"
        "from baton import workers\n"
        "pool = workers.shared_pool('baton-exit-test', 6)\n"
        "real = pool.submit\n"
        "def slow(*a, **k):\n"
        "    f = real(*a, **k)\n"
        "    time.sleep(0.3)\n"
        "    return f\n"
        "pool.submit = slow\n"
        "threading.Thread(target=workers.prestart, args=(pool, 6), daemon=True).start()\n"
        "time.sleep(0.5)\n"
        "print('exiting', flush=True)\n")], capture_output=True, timeout=60)
    assert child.returncode in (0, 1) and b"exiting" in child.stdout
