"""Model-based test of the chunk index (baton.repo.chunkindex) against a dict: additions, replacements, staged
loads of several "index files" with duplicate ids, merges (into the small run and the base) at random points,
merges that fail for want of cache space, lookups of present and absent ids, items() and len().

The index's sizes are shrunk (blocks of 4 rows, a merge every few entries, buckets split from 5 rows) so every
path runs with a few dozen entries; ids share 8-byte prefixes and leading bytes often."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import baton.repo.chunkindex as ci
from baton.format.repo_index import IndexEntry

SMALL = {"BLOCK_ROWS": 4, "READ_ROWS": 3, "SPILL_FLUSH": 2 * ci.ROW.size, "SUB_ROWS": 5, "MERGE_MIN": 6}
PACKS = [bytes([p]) * 32 for p in range(1, 5)]
PREFIXES = [bytes([b]) * 8 for b in (0, 7, 255)] + [b"\x07" + bytes(7)]

ids = st.one_of(
    st.binary(min_size=32, max_size=32),
    st.builds(lambda p, rest: p + rest, st.sampled_from(PREFIXES), st.binary(min_size=24, max_size=24)),
    st.builds(lambda b, rest: bytes([b, 1]) + rest, st.integers(0, 3), st.binary(min_size=30, max_size=30)),
)
entries = st.builds(IndexEntry, st.sampled_from(PACKS), st.integers(0, 1 << 40), st.integers(1, 1 << 24),
                    st.integers(1, 1 << 20), st.integers(0, 3))


class _NoSpace:
    """``_tempfile`` while the cache directory is full."""

    def __call__(self) -> Any:
        raise OSError(28, "No space left on device (injected)")


class ChunkIndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.saved = {name: getattr(ci, name) for name in SMALL}
        for name, value in SMALL.items():
            setattr(ci, name, value)
        self.idx = ci.ChunkIndex(background=False)
        self.model: dict[bytes, IndexEntry] = {}
        self.pending: list[tuple[bytes, IndexEntry]] = []   # staged, not visible yet
        self.known: list[bytes] = []

    def teardown(self) -> None:
        for name, value in self.saved.items():
            setattr(ci, name, value)

    def _pick(self, data: st.DataObject) -> bytes:
        if self.known and data.draw(st.booleans()):
            return data.draw(st.sampled_from(self.known))      # an id again: a replacement
        cid = data.draw(ids)
        self.known.append(cid)
        return cid

    @initialize(files=st.lists(st.lists(st.tuples(ids, entries), max_size=12), max_size=4))
    def first_load(self, files: list[list[tuple[bytes, IndexEntry]]]) -> None:
        """Several index files staged, then made visible together (Repository.reload_index)."""
        for f in files:
            f = f + f[: len(f) // 3]                            # an id twice in a file: the later one wins
            self.idx.update(f, merge=False)
            self.model.update(f)
            self.known += [c for c, _e in f]
        self.idx.maybe_merge()

    @rule(data=st.data(), entry=entries)
    def add(self, data: st.DataObject, entry: IndexEntry) -> None:
        cid = self._pick(data)
        self.idx[cid] = entry
        self.model[cid] = entry

    @rule(data=st.data(), n=st.integers(1, 9))
    def add_batch(self, data: st.DataObject, n: int) -> None:
        batch = [(self._pick(data), data.draw(entries)) for _ in range(n)]
        self.idx.update(batch)
        self.model.update(batch)

    @rule(data=st.data(), n=st.integers(0, 20))
    def stage(self, data: st.DataObject, n: int) -> None:
        batch = [(self._pick(data), data.draw(entries)) for _ in range(n)]
        self.idx.update(batch, merge=False)
        self.pending += batch

    @rule()
    def maybe_merge(self) -> None:
        self.idx.maybe_merge()
        self.model.update(self.pending)
        self.pending = []

    @rule()
    def merge(self) -> None:
        self.idx.merge()
        self.model.update(self.pending)
        self.pending = []

    @rule(staged_too=st.booleans())
    def merge_without_space(self, staged_too: bool) -> None:
        """A merge that can't write its run changes nothing; staged entries stay staged (or went to the
        overlay, when few)."""
        ci._tempfile, saved = _NoSpace(), ci._tempfile   # type: ignore[assignment]
        try:
            try:
                if staged_too:
                    self.idx.maybe_merge()
                else:
                    self.idx.merge()
            except OSError:
                pass
        finally:
            ci._tempfile = saved                             # type: ignore[method-assign]
        if self.idx.statistics()["staged_entries"] == 0 and self.pending:
            self.model.update(self.pending)
            self.pending = []

    @rule(data=st.data())
    def lookup(self, data: st.DataObject) -> None:
        cid = data.draw(st.sampled_from(self.known)) if self.known and data.draw(st.booleans()) else data.draw(ids)
        assert self.idx.get(cid) == self.model.get(cid)
        assert (cid in self.idx) == (cid in self.model)

    @precondition(lambda self: not self.pending)
    @rule()
    def whole(self) -> None:
        assert len(self.idx) == len(self.model)
        got = list(self.idx.items())
        assert len(got) == len(self.model) and dict(got) == self.model

    @invariant()
    def every_visible_entry(self) -> None:
        for cid, e in self.model.items():
            if cid not in {c for c, _e in self.pending}:
                assert self.idx.get(cid) == e, cid.hex()
        assert self.idx.merge_error is None


TestChunkIndexModel = ChunkIndexMachine.TestCase
TestChunkIndexModel.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("n", [0, 1, 5, 300])
def test_first_load_of_many_duplicates(n: int) -> None:
    """One id staged many times across files: the last staging wins, however the buckets split."""
    saved = {name: getattr(ci, name) for name in SMALL}
    try:
        for name, value in SMALL.items():
            setattr(ci, name, value)
        idx = ci.ChunkIndex(background=False)
        cid = bytes(32)
        for i in range(n):
            idx.update([(cid, IndexEntry(PACKS[i % 4], i, 1, 1, 0))], merge=False)
        idx.maybe_merge()
        assert idx.get(cid) == (IndexEntry(PACKS[(n - 1) % 4], n - 1, 1, 1, 0) if n else None)
        assert len(idx) == (1 if n else 0)
    finally:
        for name, value in saved.items():
            setattr(ci, name, value)
