"""Model-based test of the node-local chunk-index cache (baton.repo.indexcache) through real repositories and
real cache files: index files written (by this process's backups or by other clients), lost or pruned, cache
files damaged, the cache saved at random points, and new processes (new Repository objects) opened.

The oracle is the trust rule: whatever the cache's state, a newly opened repository's index holds an id exactly
when an index file still in the repository lists it, and its entry for the id is one that such a file lists.
The index's sizes are shrunk (blocks of 4 rows, a merge every few entries) so runs, merges and the overlay
all appear with a few dozen entries."""

from __future__ import annotations

import os
import random
import shutil
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import baton.repo.chunkindex as ci
import baton.repo.indexcache as ic
from baton.format.repo_index import IndexEntry
from baton.repo import Repository

SMALL = {"BLOCK_ROWS": 4, "READ_ROWS": 3, "MERGE_MIN": 6}
PACKS = [bytes([p]) * 32 for p in range(1, 6)]


class IndexCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.saved = {name: getattr(ci, name) for name in SMALL}
        for name, value in SMALL.items():
            setattr(ci, name, value)
        self.tmp = tempfile.mkdtemp(prefix="baton-cache-model-")
        self.env = os.environ.get("BATON_CACHE_DIR")
        os.environ["BATON_CACHE_DIR"] = os.path.join(self.tmp, "cache")
        os.mkdir(os.environ["BATON_CACHE_DIR"])
        self.url = os.path.join(self.tmp, "repo")
        Repository.init(self.url)
        self.files: dict[str, list[tuple[bytes, IndexEntry]]] = {}   # index files in the repository
        self.known: list[bytes] = []
        self.rng = random.Random(0)
        self.repo = self._open()

    def teardown(self) -> None:
        self.repo.wait_index_cache_saved()
        for name, value in self.saved.items():
            setattr(ci, name, value)
        if self.env is None:
            os.environ.pop("BATON_CACHE_DIR", None)
        else:
            os.environ["BATON_CACHE_DIR"] = self.env
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _open(self) -> Repository:
        repo = Repository.open(self.url)
        repo.chunk_index()
        repo.wait_index_cache_saved()
        return repo

    def _entries(self, data: st.DataObject, n: int) -> list[tuple[bytes, IndexEntry]]:
        out = []
        for _ in range(n):
            again: bool = data.draw(st.booleans())
            if again and self.known:
                cid = data.draw(st.sampled_from(self.known))     # an id again, maybe in another pack
            else:
                cid = self.rng.randbytes(32)
                self.known.append(cid)
            out.append((cid, IndexEntry(data.draw(st.sampled_from(PACKS)), data.draw(st.integers(0, 1 << 30)),
                                        100, 200, 1)))
        return out

    @rule(data=st.data(), n=st.integers(1, 12))
    def backup_here(self, data: st.DataObject, n: int) -> None:
        """This process writes an index file (a backup's): it enters the loaded index too."""
        entries = self._entries(data, n)
        self.files[self.repo.write_index_file(entries)] = entries

    @rule(data=st.data(), n=st.integers(1, 12))
    def backup_elsewhere(self, data: st.DataObject, n: int) -> None:
        """Another client writes an index file."""
        entries = self._entries(data, n)
        self.files[Repository.open(self.url).write_index_file(entries)] = entries

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def lose_index_file(self, data: st.DataObject) -> None:
        """A prune rewrote the index or a file was lost; this process notices at its next refresh."""
        key = data.draw(st.sampled_from(sorted(self.files)))
        os.unlink(os.path.join(self.url, key))
        del self.files[key]
        self.repo.refresh()

    @rule()
    def save(self) -> None:
        self.repo.chunk_index().wait_merged()
        self.repo.save_index_cache()

    @rule()
    def refresh(self) -> None:
        self.repo.refresh()

    @rule()
    def new_process(self) -> None:
        self.repo.wait_index_cache_saved()
        self.repo = self._open()

    @rule(data=st.data())
    def damage_cache(self, data: st.DataObject) -> None:
        self.repo.wait_index_cache_saved()
        where = os.path.join(os.environ["BATON_CACHE_DIR"], ic.SUBDIR)
        names = sorted(os.listdir(where)) if os.path.isdir(where) else []
        names = [n for n in names if not n.endswith(".lock")]
        if not names:
            return
        path = os.path.join(where, data.draw(st.sampled_from(names)))
        with open(path, "r+b") as f:
            raw = bytearray(f.read())
            if not raw:
                return
            if data.draw(st.booleans()):
                raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            else:
                del raw[data.draw(st.integers(0, len(raw) - 1)):]
            f.seek(0)
            f.truncate()
            f.write(raw)

    @invariant()
    def index_holds_what_the_files_list(self) -> None:
        self.repo.refresh()
        index = self.repo.chunk_index()
        allowed: dict[bytes, list[IndexEntry]] = {}
        for entries in self.files.values():
            for cid, e in entries:
                allowed.setdefault(cid, []).append(e)
        got = dict(index.items())
        assert set(got) == set(allowed)
        for cid, e in got.items():
            assert e in allowed[cid]
        assert len(index) == len(allowed)


IndexCacheMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
test_index_cache_model = IndexCacheMachine.TestCase
