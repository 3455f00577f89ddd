"""The chunk index stays under issue 12's 32 bytes of RAM per stored chunk at every point: the first load of a
repository's index files (through Repository.chunk_index, the real path), and the merges that follow a
backup's additions (overlay merges into the small run, then a merge into a new base).

Measured as the peak of Python's allocations (tracemalloc: deterministic for a fixed seed, unlike the RSS) over
each phase, per entry. The index before this change peaked at about 147 bytes per entry here.

The overlay (``MERGE_MIN`` recent entries, ~180 bytes each) is a fixed cost, stated in the module's docstring:
about 6-12 MiB, 0.4-0.7 bytes a chunk at 1 TiB. It is scaled down here with the index (8192 for 500 000 entries,
as 32768 is for 2 million) so that the test checks what grows with the index in a time a unit test can take
(tracemalloc slows the load about ninefold); ``python -m bench.indexmem --tracemalloc`` measures the real
sizes."""

from __future__ import annotations

import random
import tracemalloc

import pytest

import baton.repo.chunkindex as ci
from baton.format.repo_index import IndexEntry
from baton.repo import Repository

N = 500_000            # entries loaded (a 31 GiB repository at 64 KiB chunks)
ADDS = 80_000          # added after the load: small-run merges, then one into the base (> N/8)
MERGE_MIN = 8192
FILE = 8192            # entries per index file (a backup writes one every 16 packs of 512 chunks)
TARGET = 32            # bytes per stored chunk


def _entries(rng: random.Random, n: int, first: int) -> list[tuple[bytes, IndexEntry]]:
    return [(rng.randbytes(32), IndexEntry(bytes([(first + i) // 512 % 251]) * 32, i * 40000, 30000, 65536, 1))
            for i in range(n)]


def test_load_and_merges_stay_under_32_bytes_per_chunk(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ci, "MERGE_MIN", MERGE_MIN)
    rng = random.Random(12)
    url = str(tmp_path / "repo")
    writer = Repository.init(url)
    for first in range(0, N, FILE):
        writer.write_index_file(_entries(rng, min(FILE, N - first), first))
    probe = _entries(random.Random(12), 3, 0)   # the first file's first ids

    repo = Repository.open(url)
    tracemalloc.start()
    try:
        index = repo.chunk_index()
        _cur, load_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for first in range(N, N + ADDS, FILE):
            repo.write_index_file(_entries(rng, min(FILE, N + ADDS - first), first))
        index.wait_merged()
        _cur, merge_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    st = index.statistics()
    print(f"load peak {load_peak / N:.2f} B/entry, merge peak {merge_peak / (N + ADDS):.2f} B/entry, {st}")
    assert index.merge_error is None
    assert st["base_entries"] > N                    # a merge into the base happened in the measured phase
    assert all(index.get(c) == e for c, e in probe)
    assert load_peak / N < TARGET
    assert merge_peak / (N + ADDS) < TARGET


BIG_FILE = 200_000     # INDEX_FILE_ENTRIES: the size of the index files prune, rebuild-index and heal write
BIG_FILE_PEAK = 48 << 20   # measured 30 MiB streamed (the sealed object, its body, the unsealed body); 94 as a list


def test_loading_one_big_index_file_streams_its_entries(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A 200 000-entry index file is read as one object (about 15 MiB once unsealed, which is bounded by the file
    size), but its entries go to the index one at a time: decoding the whole file into a list of Python objects
    first cost about 110 MiB here, more than the rest of a 1 TiB disk's backup."""
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path))
    rng = random.Random(13)
    url = str(tmp_path / "repo")
    Repository.init(url)
    writer = Repository.open(url)
    writer.write_index_file(_entries(rng, BIG_FILE, 0))
    repo = Repository.open(url)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        index = repo.chunk_index()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(index) == BIG_FILE
    assert peak < BIG_FILE_PEAK, f"loading one {BIG_FILE}-entry index file peaked at {peak / 2**20:.0f} MiB"
