"""The backup's two ways of reading (baton.backup): the kernel's asynchronous reads (``_aio_reads``, where the
data device is opened O_DIRECT) and the read pool (``_pool_reads``, BATON_AIO=off or any other device).

Each way, on a real file opened O_DIRECT: another thread writes to the disk through the tracker while the
backup's reads are in flight, and the snapshot must still be the disk as of the freeze point, byte for byte
(copy-before-write replaces what a racing read saw). Fixed, printed seeds.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import baton.backup as backup_mod
from baton.backup import run_backup
from baton.daemon.offline import open_tracker
from baton.device import AIO_ENV, DirectDev, open_aio
from baton.record.placement import init_disk
from baton.repo import Repository
from baton.tracker.core import Tracker

CS = 64 << 10
SIZE = 40 << 20  # the disk file; the tail record takes its end (the data area is what the tracker has)


@contextlib.contextmanager
def _attached(tmp_path: Path, seed: int, changes: int) -> Iterator[tuple[Tracker, Repository, list[int], int]]:
    """A random disk file with a tail record, attached on n1, its first backup taken, then ``changes`` chunks
    written through the tracker: (tracker, repository, the changed chunks, chunks of the disk)."""
    print("seed", seed)
    rng = random.Random(seed)
    disk = tmp_path / "disk.img"
    disk.write_bytes(rng.randbytes(SIZE))
    loc = init_disk(str(disk), chunk_size=CS)
    chunks = loc.data_size // CS
    loc.record.attach("n1")
    tracker = open_tracker(loc)
    try:
        repo = Repository.init(str(tmp_path / "repo"))
        run_backup(tracker, repo, node="n1")  # the parent
        changed = rng.sample(range(chunks), changes)
        for c in changed:
            tracker.write(c * CS, rng.randbytes(CS))
        yield tracker, repo, changed, chunks
    finally:
        tracker.close()
        loc.record.detach()
        loc.close()


def _aio_available() -> bool:
    aio = open_aio(8)
    if aio is None:
        return False
    aio.close()
    return True


def _used(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(backup_mod, name)

    def spy(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(backup_mod, name, spy)
    return calls


@pytest.mark.parametrize("way", ["aio", "pool"])
def test_writes_racing_the_reads_leave_the_snapshot_as_of_the_freeze(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      way: str) -> None:
    if way == "aio" and not _aio_available():
        pytest.skip("no native AIO on this machine")
    if way == "pool":
        monkeypatch.setenv(AIO_ENV, "off")
    used = _used(monkeypatch, "_aio_reads" if way == "aio" else "_pool_reads")
    seed = 20261128
    disk = tmp_path / "disk.img"
    with _attached(tmp_path, seed, 200) as (tracker, repo, changed, chunks):
        frozen: dict[str, bytes] = {}
        go, stop = threading.Event(), threading.Event()
        writes = [0]

        def writer() -> None:
            wr = random.Random(seed + 1)
            go.wait(30)
            while not stop.is_set():
                c = wr.choice(changed) if wr.random() < 0.8 else wr.randrange(chunks)
                tracker.write(c * CS, wr.randbytes(CS))
                writes[0] += 1

        def fault(point: str) -> None:
            if point == "after-freeze":  # the disk as of the freeze point, then writes race the reads
                check = DirectDev(str(disk), writable=False)
                try:
                    frozen["image"] = check.pread(0, chunks * CS)
                finally:
                    check.close()
                go.set()

        t = threading.Thread(target=writer)
        t.start()
        try:
            res = run_backup(tracker, repo, node="n1", batch_chunks=32, fault=fault)
        finally:
            stop.set()
            go.set()
            t.join(30)
        assert used, f"the backup did not read through {way}"
        assert res["mode"] == "incremental" and res["chunks_read"] == 200
        assert writes[0] > 0 and res["cbw_copies"] > 0, (writes, res["cbw_copies"])  # the race happened
        image = frozen["image"]
        snap = Repository.open(str(tmp_path / "repo"))
        reader = snap.snapshot_reader(snap.get_snapshot(res["snapshot"]))
        bad = [i for i in range(chunks) if reader.read(i) != image[i * CS:(i + 1) * CS]]
        assert not bad, f"chunks not as of the freeze point: {bad[:10]} (seed {seed})"


def test_a_failed_kernel_read_fails_the_backup_and_leaves_nothing_in_flight(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A read the kernel completes with an error (here EIO, injected into the results) fails the backup with
    that error; the record keeps every chunk marked, and the next backup reads them again."""
    if not _aio_available():
        pytest.skip("no native AIO on this machine")
    from baton.device import AioReads

    real_reap = AioReads.reap
    seen = [0]

    def failing_reap(self: AioReads, min_nr: int = 1) -> Any:
        out = real_reap(self, min_nr)
        seen[0] += len(out)
        return [(tok, r, -5 if seen[0] > 20 else res) for tok, r, res in out]  # EIO after 20 reads

    with _attached(tmp_path, 1128, 100) as (tracker, repo, _changed, _chunks):
        monkeypatch.setattr(AioReads, "reap", failing_reap)
        with pytest.raises(OSError, match="Input/output error"):
            run_backup(tracker, repo, node="n1")
        monkeypatch.undo()
        res = run_backup(tracker, repo, node="n1")
        assert res["mode"] == "incremental" and res["chunks_read"] == 100
