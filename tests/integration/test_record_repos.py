"""One disk backed up into several repositories in turn (issue 9 defect 12): with a v2 record each repository
stays incremental. The record keeps one region per repository (its last backup and the chunks it is owed: those
another repository's backup cleared from the record). Every snapshot restores to the disk as it was at its
freeze point. A v1 record keeps today's behaviour (full, "lineage mismatch", stated). A repository dropped for a
newer one (least recently used) gets a full backup that says why.

Uses the real record, tracker and backup engine on a tail-placed image file (no root needed)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.backup import run_backup
from baton.daemon import open_tracker
from baton.record.placement import Located, init_disk, locate
from baton.repo import Repository
from baton.restore import restore
from baton.tracker.core import Tracker

MiB = 1 << 20
CHUNK = 64 * 1024
SEED = 912


class Disk:
    def __init__(self, path: Path, **init: int) -> None:
        with open(path, "wb") as f:
            f.truncate(32 * MiB)
        init_disk(str(path), record="tail", chunk_size=CHUNK, **init).close()
        self.path = path
        self.loc: Located = locate(str(path))
        self.loc.record.attach("n1")
        self.tracker: Tracker = open_tracker(self.loc)
        self.rng = random.Random(SEED)
        self.shadow = bytearray(self.tracker.size)

    def write(self, n: int) -> None:
        for _ in range(n):
            off = self.rng.randrange(0, self.tracker.size // 4096) * 4096
            data = self.rng.randbytes(4096)
            self.tracker.write(off, data)
            self.shadow[off : off + 4096] = data

    def backup(self, repo: Repository) -> dict[str, object]:
        return run_backup(self.tracker, repo, node="n1", name="d")

    def check_restore(self, repo: Repository, snap: str, tmp: Path) -> None:
        out = tmp / f"r-{snap[:8]}.img"
        restore(repo, repo.read_manifest(snap), str(out))
        assert out.read_bytes()[: len(self.shadow)] == bytes(self.shadow)

    def close(self) -> None:
        self.tracker.close()
        self.loc.record.detach()
        self.loc.close()


@pytest.fixture
def repos(tmp_path: Path) -> Iterator[list[Repository]]:
    yield [Repository.init(str(tmp_path / f"repo{i}")) for i in range(3)]


def test_two_repositories_in_turn_stay_incremental(tmp_path: Path, repos: list[Repository]) -> None:
    print("seed", SEED)
    d = Disk(tmp_path / "d.img")
    a, b = repos[0], repos[1]
    try:
        assert d.backup(a)["mode"] == "full"
        d.write(20)
        first_b = d.backup(b)
        assert first_b["mode"] == "full" and first_b["reason"] == "no previous snapshot"
        for i in range(4):
            d.write(10)
            repo = a if i % 2 == 0 else b
            res = d.backup(repo)
            assert res["mode"] == "incremental", res
            # A reads what changed since ITS last backup: the record's set plus what the other one cleared.
            d.check_restore(repo, str(res["snapshot"]), tmp_path)
            assert int(res["chunks_read"]) <= 40  # (10 + 10 writes) chunks at most, not the whole disk
        st = d.loc.record.status()
        assert [r["repo_id"] for r in st["repos"][:2]] == [a.config.repo_id.hex(), b.config.repo_id.hex()]
    finally:
        d.close()


def test_least_recently_used_repository_is_dropped_with_a_reason(tmp_path: Path,
                                                                repos: list[Repository]) -> None:
    d = Disk(tmp_path / "d.img", nrepos=2)
    a, b, c = repos
    try:
        for r in (a, b):
            d.backup(r)
            d.write(5)
        assert d.backup(a)["mode"] == "incremental"
        d.write(5)
        assert d.backup(c)["mode"] == "full"  # a third repository takes B's region (B is used least recently)
        d.write(5)
        res = d.backup(b)
        assert res["mode"] == "full" and "does not track repository" in str(res["reason"]), res
        d.check_restore(b, str(res["snapshot"]), tmp_path)
        d.write(5)
        res = d.backup(c)
        assert res["mode"] == "incremental", res  # C was used more recently than A, so A was dropped for B
        d.check_restore(c, str(res["snapshot"]), tmp_path)
        res = d.backup(a)
        assert res["mode"] == "full" and "does not track repository" in str(res["reason"]), res
    finally:
        d.close()


def test_v1_record_with_two_repositories_is_full_with_a_reason(tmp_path: Path, repos: list[Repository]) -> None:
    d = Disk(tmp_path / "d.img", version=1)
    a, b = repos[0], repos[1]
    try:
        assert d.loc.header.version == 1
        d.backup(a)
        d.backup(b)
        d.write(5)
        res = d.backup(a)
        assert res["mode"] == "full" and str(res["reason"]).startswith("lineage mismatch"), res
        d.check_restore(a, str(res["snapshot"]), tmp_path)
    finally:
        d.close()
