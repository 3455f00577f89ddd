"""The node-local chunk-index cache (baton.repo.indexcache): a new Repository object, as a new process after a
takeover would make, starts from the cache and reads only the index files added since; a cache that is stale,
damaged, of another repository or key, or can't be written is never used and never fails anything.

Real repositories and real cache files throughout; the only knob turned is ``MERGE_MIN`` (small, so that a few
thousand entries make runs as millions do)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import baton.repo.chunkindex as ci
import baton.repo.indexcache as ic
from baton.format.repo_index import IndexEntry
from baton.repo import BackupWriter, DiskIdentity, Manifest, Repository
from baton.repo.keys import derive_keys
from baton.restore import restore
from baton.storage import open_store

CS = 4096


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("BATON_INDEX_CACHE", raising=False)
    monkeypatch.setattr(ci, "MERGE_MIN", 1000)
    (tmp_path / "cache").mkdir()


def _files(repo: Repository, rng: random.Random, n_files: int, per_file: int
           ) -> dict[str, list[tuple[bytes, IndexEntry]]]:
    out = {}
    for _f in range(n_files):
        pack = rng.randbytes(32)
        entries = [(rng.randbytes(32), IndexEntry(pack, i * 100, 100, 200, 1)) for i in range(per_file)]
        out[repo.write_index_file(entries)] = entries
    return out


def _opened(url: str) -> Repository:
    """A Repository as a new process opens it, its index loaded and its background cache save finished."""
    repo = Repository.open(url)
    repo.chunk_index()
    repo.wait_index_cache_saved()
    return repo


def _check(repo: Repository, files: dict[str, list[tuple[bytes, IndexEntry]]]) -> None:
    index = repo.chunk_index()
    want = {c: e for entries in files.values() for c, e in entries}
    assert len(index) == len(want)
    assert all(index.get(c) == e for c, e in want.items())
    assert dict(index.items()) == want


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / ic.SUBDIR).iterdir())


def test_a_new_repository_object_loads_no_index_file_the_cache_covers(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    files = _files(Repository.init(url), random.Random(1), 3, 1500)   # 4500 entries: merged into a base run
    first = _opened(url)
    assert first.statistics()["index_files_loaded"] == 3
    assert first.statistics()["index_cache_saves"] == 1

    second = _opened(url)
    st = second.statistics()
    assert st["index_files_loaded"] == 0
    assert st["index_files_from_cache"] == 3 and st["index_cache_hits"] == 1
    assert st["chunk_index"]["base_entries"] == 4500
    _check(second, files)
    assert st["index_cache_saves"] == 0          # nothing new: nothing written


def test_index_files_added_after_the_save_are_loaded_and_saved_again(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    rng = random.Random(2)
    files = _files(Repository.init(url), rng, 3, 1500)
    _opened(url)
    files |= _files(Repository.open(url), rng, 2, 10)      # another client's backups since: 20 entries
    later = _opened(url)
    st = later.statistics()
    assert st["index_files_from_cache"] == 3 and st["index_files_loaded"] == 2
    assert st["index_cache_saves"] == 1                    # the catch-up was saved (in the overlay rows)
    _check(later, files)

    last = _opened(url)
    assert last.statistics()["index_files_loaded"] == 0
    assert last.statistics()["index_files_from_cache"] == 5
    _check(last, files)


def test_entries_this_process_added_are_in_the_cache(tmp_path: Path) -> None:
    """write_index_file (a backup's) adds to the loaded index; the save covers that file too, and a small run
    made by a merge after the load is saved next to the base."""
    url = str(tmp_path / "repo")
    rng = random.Random(3)
    files = _files(Repository.init(url), rng, 3, 4000)
    repo = _opened(url)
    files |= _files(repo, rng, 1, 1200)         # past MERGE_MIN, under 1/8 of the base: a small run
    files |= _files(repo, rng, 1, 7)            # in the overlay
    repo.chunk_index().wait_merged()
    repo.save_index_cache()
    assert repo.statistics()["index_cache_saves"] == 2
    nxt = _opened(url)
    st = nxt.statistics()
    assert st["index_files_loaded"] == 0 and st["index_files_from_cache"] == 5
    assert st["chunk_index"]["small_entries"] == 1200 and st["chunk_index"]["overlay_entries"] == 7
    _check(nxt, files)


def test_a_covered_index_file_gone_discards_the_cache(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    files = _files(Repository.init(url), random.Random(4), 3, 1500)
    _opened(url)
    gone = sorted(files)[1]
    os.unlink(tmp_path / "repo" / gone)          # a prune rewrote the index, or the file was lost
    del files[gone]
    repo = _opened(url)
    st = repo.statistics()
    assert st["index_cache_stale"] == 1 and st["index_cache_hits"] == 0
    assert st["index_files_loaded"] == 2 and st["index_files_from_cache"] == 0
    assert "gone" in st["index_cache_problem"]
    _check(repo, files)                          # none of the gone file's entries
    assert repo.statistics()["index_cache_saves"] == 1   # replaced by one that is valid again
    assert _opened(url).statistics()["index_cache_hits"] == 1


@pytest.mark.parametrize("which", ["manifest", "run", "aux"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cache_file_is_discarded(tmp_path: Path, which: str, damage: str) -> None:
    url = str(tmp_path / "repo")
    files = _files(Repository.init(url), random.Random(5), 3, 1500)
    _opened(url)
    (path,) = [p for p in _cache_files(tmp_path) if p.name.endswith("." + which)]
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        del data[-1:]
    path.write_bytes(bytes(data))
    repo = _opened(url)
    st = repo.statistics()
    assert st["index_cache_discarded"] == 1 and st["index_cache_hits"] == 0, st["index_cache_problem"]
    assert st["index_files_loaded"] == 3
    _check(repo, files)
    again = _opened(url)                          # the load saved a new cache: no damaged file kept by its name
    assert again.statistics()["index_cache_hits"] == 1, again.statistics()["index_cache_problem"]
    _check(again, files)


def test_an_unknown_cache_version_is_discarded(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    files = _files(Repository.init(url), random.Random(6), 2, 100)
    _opened(url)
    (path,) = [p for p in _cache_files(tmp_path) if p.name.endswith(".manifest")]
    data = bytearray(path.read_bytes())
    data[8] = ic.CACHE_VERSION + 1
    path.write_bytes(bytes(data))
    repo = _opened(url)
    assert repo.statistics()["index_cache_discarded"] == 1
    assert "version" in repo.statistics()["index_cache_problem"]
    _check(repo, files)


def test_another_repositorys_cache_is_not_used(tmp_path: Path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _files(Repository.init(a), random.Random(7), 2, 100)
    files_b = _files(Repository.init(b), random.Random(8), 2, 100)
    _opened(a)
    rid_a = Repository.open(a).config.repo_id.hex()
    rid_b = Repository.open(b).config.repo_id.hex()
    for p in _cache_files(tmp_path):              # a's cache under b's name
        if p.name.startswith(rid_a):
            p.rename(p.with_name(rid_b + p.name[len(rid_a):]))
    repo = _opened(b)
    st = repo.statistics()
    assert st["index_cache_discarded"] == 1 and "repository" in st["index_cache_problem"]
    _check(repo, files_b)


def test_a_cache_saved_under_another_key_is_not_used(tmp_path: Path) -> None:
    """Same repository id, other keys (a repository re-keyed, or copied and re-initialised with its id)."""
    url = str(tmp_path / "repo")
    files = _files(Repository.init(url), random.Random(9), 2, 100)
    _opened(url)
    honest = Repository.open(url)
    other = Repository(url, open_store(url), honest.config, derive_keys(os.urandom(32), honest.config.repo_id, False))
    assert other.chunk_index() is not None
    st = other.statistics()
    assert st["index_cache_discarded"] == 1 and "another key" in st["index_cache_problem"]
    assert st["index_files_loaded"] == 2
    other.wait_index_cache_saved()                # it saved its own cache: the honest key can't use that one
    honest.chunk_index()
    assert honest.statistics()["index_cache_discarded"] == 1 and honest.statistics()["index_cache_hits"] == 0
    _check(honest, files)


def test_an_encrypted_repository_uses_its_cache_with_its_key_only(tmp_path: Path) -> None:
    url, key = str(tmp_path / "repo"), str(tmp_path / "key")
    files = _files(Repository.init(url, encryption="aes-256-gcm", key_file=key), random.Random(10), 2, 1500)
    first = Repository.open(url, key_file=key)
    first.chunk_index()
    first.wait_index_cache_saved()
    again = Repository.open(url, key_file=key)
    again.chunk_index()
    assert again.statistics()["index_cache_hits"] == 1 and again.statistics()["index_files_loaded"] == 0
    _check(again, files)


def _backup(repo: Repository, disk: DiskIdentity, img: bytes, chunks: range, parent: Manifest | None) -> Manifest:
    w = BackupWriter(repo, disk, parent=parent, node="n1", mode="full" if parent is None else "incremental",
                     reason="t", lineage="L")
    for i in chunks:
        w.put(i, img[i * CS:(i + 1) * CS])
    return w.commit({})


def test_a_commit_saves_the_cache_and_the_next_process_heals_nothing(tmp_path: Path) -> None:
    """After a backup's commit (a daemon killed right after it), the next process loads no index file, and
    the packs the cached index files name count as covered: the first backup's heal lists the packs and
    indexes none of them again."""
    url = str(tmp_path / "repo")
    rng = random.Random(11)
    img = bytearray(rng.randbytes(64 * CS))
    disk = DiskIdentity("d", len(img), CS)
    repo = Repository.init(url, pack_target=32 * 1024)
    m1 = _backup(repo, disk, bytes(img), range(64), None)
    img[5 * CS:6 * CS] = rng.randbytes(CS)
    m2 = _backup(repo, disk, bytes(img), range(5, 6), m1)
    assert repo.statistics()["index_cache_saves"] >= 1

    nxt = Repository.open(url)                   # the new owner's daemon
    img[7 * CS:8 * CS] = rng.randbytes(CS)
    m3 = _backup(nxt, disk, bytes(img), range(7, 8), m2)
    st = nxt.statistics()
    assert st["index_files_loaded"] == 0 and st["index_cache_hits"] == 1
    assert st.get("packs_healed", 0) == 0
    assert nxt.statistics()["index_cache_saves"] == 1
    out = tmp_path / "out.img"
    restore(Repository.open(url), m3, str(out))
    assert out.read_bytes() == bytes(img)


def _immutable(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o500)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                        capture_output=True).returncode:
        pytest.skip("root ignores modes, and chattr +i is not available here")


def test_a_cache_directory_that_cant_be_written_never_fails_a_backup(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    rng = random.Random(12)
    img = rng.randbytes(32 * CS)
    disk = DiskIdentity("d", len(img), CS)
    repo = Repository.init(url, pack_target=32 * 1024)
    m1 = _backup(repo, disk, img, range(32), None)
    where = tmp_path / "cache" / ic.SUBDIR
    for p in where.iterdir():
        p.unlink()
    _immutable(where)
    try:
        nxt = Repository.open(url)
        m2 = _backup(nxt, disk, img, range(3), m1)
        nxt.wait_index_cache_saved()
        st = nxt.statistics()
        assert st["index_cache_save_failed"] >= 1 and st["index_cache_saves"] == 0
        assert st["index_cache_problem"].startswith("save:")
        assert list(where.iterdir()) == []
        out = tmp_path / "out.img"
        restore(Repository.open(url), m2, str(out))
        assert out.read_bytes() == img
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(where)], check=False)
        where.chmod(0o700)


def test_a_save_keeps_only_the_files_its_manifest_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ic, "MAX_REPOS", 2)
    url = str(tmp_path / "repo")
    rng = random.Random(13)
    files = _files(Repository.init(url), rng, 2, 1500)
    repo = _opened(url)
    for _ in range(3):                             # small runs replaced, then a new base
        files |= _files(repo, rng, 1, 1100)
        repo.chunk_index().wait_merged()
        repo.save_index_cache()
    rid = repo.config.repo_id.hex()
    names = {p.name for p in _cache_files(tmp_path)}
    runs = {n for n in names if n.endswith(".run")}
    assert names == {f"{rid}.manifest", f"{rid}.lock"} | runs | {n for n in names if n.endswith(".aux")}
    st = repo.chunk_index().statistics()
    assert len(runs) == (st["base_entries"] > 0) + (st["small_entries"] > 0)
    _check(_opened(url), files)
    for i in range(3):                             # more repositories than MAX_REPOS: the oldest go
        _files(Repository.init(str(tmp_path / f"r{i}")), rng, 1, 10)
        _opened(str(tmp_path / f"r{i}"))
    manifests = [p for p in _cache_files(tmp_path) if p.name.endswith(".manifest")]
    assert len(manifests) == 2 and not any(p.name.startswith(rid) for p in _cache_files(tmp_path))


def test_the_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_INDEX_CACHE", "off")
    url = str(tmp_path / "repo")
    _files(Repository.init(url), random.Random(14), 2, 100)
    _opened(url)
    assert _opened(url).statistics()["index_files_loaded"] == 2
    assert not (tmp_path / "cache" / ic.SUBDIR).exists()


def test_a_pruned_repository_is_loaded_from_its_new_index_files(tmp_path: Path) -> None:
    """Prune rewrites the index (new files, the old ones deleted): the cache covering the old files is stale."""
    from baton.repo.maintenance import forget, prune

    url = str(tmp_path / "repo")
    rng = random.Random(15)
    img = rng.randbytes(16 * CS)
    disk = DiskIdentity("d", len(img), CS)
    repo = Repository.init(url, pack_target=16 * 1024)
    m1 = _backup(repo, disk, img, range(16), None)
    img2 = rng.randbytes(16 * CS)
    m2 = _backup(repo, disk, img2, range(16), None)
    forget(repo, [m1.snapshot_id])
    prune(repo, grace=0)
    nxt = Repository.open(url)
    nxt.chunk_index()
    st = nxt.statistics()
    assert st["index_cache_stale"] == 1 and st["index_cache_hits"] == 0
    out = tmp_path / "out.img"
    restore(nxt, m2, str(out))
    assert out.read_bytes() == img2


def test_a_process_that_exits_right_after_its_load_leaves_a_cache(tmp_path: Path) -> None:
    """The save after a first load runs in a background thread; the interpreter waits for it at exit."""
    import sys

    url = str(tmp_path / "repo")
    files = _files(Repository.init(url), random.Random(16), 3, 1500)
    code = "import sys; from baton.repo import Repository; Repository.open(sys.argv[1]).chunk_index()"
    subprocess.run([sys.executable, "-c", code, url], check=True, env=dict(os.environ))
    repo = _opened(url)
    assert repo.statistics()["index_cache_hits"] == 1 and repo.statistics()["index_files_loaded"] == 0
    _check(repo, files)


def _listing_packs(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The prefixes ``repo`` lists from now on."""
    listed: list[str] = []
    real = repo.store.list

    def counting(prefix: str = "") -> object:
        listed.append(prefix)
        return real(prefix)

    monkeypatch.setattr(repo.store, "list", counting)
    return listed


def test_a_cache_saved_after_a_heal_spares_the_next_process_its_pack_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process heals its index once (it lists every pack: on S3 one LIST per 1000 packs, at every failover's
    first backup). A cache saved after that heal says so, and the next process counts it as its own heal; a
    cache saved before any heal (right after a load) does not, and the next process lists the packs."""
    url = str(tmp_path / "repo")
    rng = random.Random(12)
    img = bytearray(rng.randbytes(64 * CS))
    disk = DiskIdentity("d", len(img), CS)
    repo = Repository.init(url, pack_target=32 * 1024)
    m1 = _backup(repo, disk, bytes(img), range(64), None)   # healed before it, saved at its commit

    nxt = Repository.open(url)                               # the next owner's daemon
    listed = _listing_packs(nxt, monkeypatch)
    img[5 * CS:6 * CS] = rng.randbytes(CS)
    m2 = _backup(nxt, disk, bytes(img), range(5, 6), m1)
    assert nxt.statistics()["index_cache_hits"] == 1
    assert "packs/" not in listed

    for f in _cache_files(tmp_path):
        f.unlink()
    _opened(url)                                             # a CLI's load: saved, never healed
    again = Repository.open(url)
    listed = _listing_packs(again, monkeypatch)
    img[7 * CS:8 * CS] = rng.randbytes(CS)
    m3 = _backup(again, disk, bytes(img), range(7, 8), m2)
    assert again.statistics()["index_cache_hits"] == 1
    assert "packs/" in listed
    out = tmp_path / "out.img"
    restore(Repository.open(url), m3, str(out))
    assert out.read_bytes() == bytes(img)
