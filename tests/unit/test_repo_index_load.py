"""Repository.reload_index when loading fails part way: staged entries never stay invisible while the files
they came from count as loaded (the heal would then skip their packs and a restore would call the data missing).
"""

from __future__ import annotations

import random

import pytest

import baton.repo.chunkindex as ci
from baton.errors import RepoCorrupt
from baton.format.repo_index import IndexEntry
from baton.repo import Repository


def _files(repo: Repository, rng: random.Random, n_files: int, per_file: int) -> dict[str, list[tuple[bytes, IndexEntry]]]:
    out = {}
    for f in range(n_files):
        entries = [(rng.randbytes(32), IndexEntry(bytes([f + 1]) * 32, i, 100, 200, 1)) for i in range(per_file)]
        out[repo.write_index_file(entries)] = entries
    return out


@pytest.mark.parametrize("per_file", [10, 3000])   # moved into the overlay / merged into a run
def test_a_corrupt_index_file_leaves_the_loaded_ones_visible(tmp_path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                                             per_file: int) -> None:
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ci, "MERGE_MIN", 1000)
    url = str(tmp_path / "repo")
    files = _files(Repository.init(url), random.Random(1), 4, per_file)
    keys = sorted(files)
    bad = keys[2]
    path = tmp_path / "repo" / bad
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))

    repo = Repository.open(url)
    with pytest.raises(RepoCorrupt):
        repo.chunk_index()
    index = repo.chunk_index()                        # the index as far as it got
    assert index.statistics()["staged_entries"] == 0
    for key in keys[:2]:
        assert all(index.get(c) == e for c, e in files[key])
    assert all(index.get(c) is None for k in keys[2:] for c, _e in files[k])

    path.write_bytes(good)
    repo.refresh()                                    # the files not loaded are loaded now
    assert all(index.get(c) == e for k in keys for c, e in files[k])
    assert len(index) == 4 * per_file


def test_a_full_cache_directory_drops_the_index_and_the_next_use_loads_it_again(tmp_path,  # type: ignore[no-untyped-def]
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ci, "MERGE_MIN", 1000)
    url = str(tmp_path / "repo")
    files = _files(Repository.init(url), random.Random(2), 3, 2000)
    repo = Repository.open(url)

    def full() -> object:
        raise OSError(28, "No space left on device (injected)")

    real = ci._tempfile
    monkeypatch.setattr(ci, "_tempfile", full)
    with pytest.raises(OSError):
        repo.chunk_index()
    monkeypatch.setattr(ci, "_tempfile", real)
    index = repo.chunk_index()                        # loaded again from scratch, complete
    assert all(index.get(c) == e for entries in files.values() for c, e in entries)
    assert len(index) == 6000
