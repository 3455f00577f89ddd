"""baton diff: the engine on memory:// repositories (cost proportional to the change) and the CLI."""

from __future__ import annotations

import json
import os
import random

import pytest

from baton.cli import main
from baton.diff import changed_chunks, diff, extents
from baton.errors import RepoCorrupt, UsageError
from baton.format.repo_index import PAGE_FANOUT
from baton.repo import BackupWriter, DiskIdentity, Manifest, Repository
from baton.repo.repository import page_key

CS = 4096


def _backup(repo: Repository, disk: DiskIdentity, img: bytes | bytearray, chunks: list[int] | None = None,
            parent: Manifest | None = None) -> Manifest:
    w = BackupWriter(repo, disk, parent=parent, node="n1", mode="incremental" if parent else "full",
                          reason="" if parent else "first", lineage="L")
    for i in chunks if chunks is not None else range(disk.chunk_count):
        w.put(i, bytes(img[i * CS:(i + 1) * CS]))
    return w.commit({})


def _repo(name: str) -> Repository:
    return Repository.init(f"memory://{name}-{os.urandom(4).hex()}")


def test_diff_finds_exactly_the_changed_chunks_and_reads_few_pages() -> None:
    rng = random.Random(13)
    repo = _repo("diff")
    n = PAGE_FANOUT * 3 + 17  # a tree of depth 2 at least, with a short last leaf
    disk = DiskIdentity("d1", n * CS - 100, CS, name="sdb")  # and a short last chunk
    img = bytearray(disk.size)
    for i in range(0, n, 5):
        img[i * CS:i * CS + 64] = rng.randbytes(64)
    a = _backup(repo, disk, img)
    changed = sorted({3, 4, 5, n - 1, PAGE_FANOUT + 1} | set(rng.sample(range(n), 3)))
    for c in changed:
        img[c * CS:c * CS + 8] = rng.randbytes(8)
    b = _backup(repo, disk, img, changed, parent=a)
    res = diff(repo, a, b)
    assert res.changed_chunks == len(changed)
    assert res.extents == extents(changed, CS, disk.size)
    assert res.changed_bytes == sum(min(CS, disk.size - c * CS) for c in changed)
    assert res.extents[-1][0] + res.extents[-1][1] == disk.size  # the short last chunk is clipped
    # Only pages on the paths to changed leaves are read (2 sides x (root + changed leaves)), never all.
    leaves = {c // PAGE_FANOUT for c in changed}
    assert res.pages_read <= 2 * (1 + len(leaves))
    assert diff(repo, b, a).extents == res.extents
    same = diff(repo, b, b)
    assert same.extents == [] and same.pages_read == 0


def test_diff_cost_does_not_grow_with_the_disk() -> None:
    repo = _repo("big")
    n = PAGE_FANOUT * 40 + 1  # 41 leaves; all zero but one chunk: the diff reads 2 pages, not 41
    disk = DiskIdentity("d2", n * CS, CS)
    a = _backup(repo, disk, b"", [])  # all zero: root is ZERO_ID
    img = bytearray(n * CS)
    img[(n - 2) * CS] = 1
    b = _backup(repo, disk, img, [n - 2], parent=a)
    res = diff(repo, a, b)
    assert [c for c in changed_chunks(repo, a, b)] == [n - 2]
    assert res.pages_read == 2  # the root and one leaf of b; a's side is all-zero (never stored)


def test_diff_refuses_other_disk_or_size() -> None:
    repo = _repo("other")
    a = _backup(repo, DiskIdentity("d1", 8 * CS, CS), bytes(8 * CS))
    b = _backup(repo, DiskIdentity("d2", 8 * CS, CS), bytes(8 * CS))
    c = _backup(repo, DiskIdentity("d1", 9 * CS, CS), bytes(9 * CS))
    with pytest.raises(UsageError, match="different disks"):
        diff(repo, a, b)
    with pytest.raises(UsageError, match="changed size"):
        diff(repo, a, c)


def test_diff_names_a_missing_page() -> None:
    repo = _repo("corrupt")
    disk = DiskIdentity("d1", 4 * CS, CS)
    img = bytearray(os.urandom(4 * CS))
    a = _backup(repo, disk, img)
    img[0] ^= 1
    b = _backup(repo, disk, img, [0], parent=a)
    repo.store.delete(page_key(bytes.fromhex(b.root)))
    with pytest.raises(RepoCorrupt, match=b.root[:16]):
        diff(repo, a, b)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ei:
        main(list(args))
    out, err = capsys.readouterr()
    return int(ei.value.code or 0), out, err


def test_cli_diff_text_json_and_errors(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    url = str(tmp_path / "repo")
    repo = Repository.init(url)
    disk = DiskIdentity("d1", 40 * CS, CS, name="sdb")
    img = bytearray(os.urandom(disk.size))
    a = _backup(repo, disk, img)
    for c in (2, 3, 30):
        img[c * CS] ^= 0xFF
    b = _backup(repo, disk, img, [2, 3, 30], parent=a)
    code, out, _ = _run(capsys, "diff", a.snapshot_id[:8], b.snapshot_id[:8], "--repo", url, "--json")
    res = json.loads(out)
    assert code == 0 and res["extents"] == [{"offset": 2 * CS, "length": 2 * CS},
                                            {"offset": 30 * CS, "length": CS}]
    assert res["changed_bytes"] == 3 * CS and res["changed_chunks"] == 3
    code, out, _ = _run(capsys, "diff", a.snapshot_id[:8], b.snapshot_id[:8], "--repo", url)
    assert code == 0 and "8,192" in out and "(8.0 KiB)" in out and "total: 12,288 bytes" in out
    # unknown snapshot: exit 7, one JSON error object
    code, out, err = _run(capsys, "diff", a.snapshot_id[:8], "abcdef00", "--repo", url, "--json")
    assert code == 7 and json.loads(out)["error"] == "RepoError" and "no snapshot abcdef00" in err
    # another disk: exit 2
    other = _backup(repo, DiskIdentity("d9", 40 * CS, CS), bytes(40 * CS))
    code, out, _ = _run(capsys, "diff", a.snapshot_id[:8], other.snapshot_id[:8], "--repo", url, "--json")
    assert code == 2 and "different disks" in json.loads(out)["message"]
    # repository missing: exit 7
    code, out, _ = _run(capsys, "diff", "abcdef", "abcdef", "--repo", str(tmp_path / "nope"), "--json")
    assert code == 7 and json.loads(out)["error"] == "RepoNotFound"
    # bad input: not a snapshot reference
    code, out, _ = _run(capsys, "diff", "xyz", "abcdef", "--repo", url, "--json")
    assert code == 2 and json.loads(out)["error"] == "UsageError"
