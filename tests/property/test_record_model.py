"""Model-based test of the change record (Hypothesis RuleBasedStateMachine).

The record is format v2 with two repository regions, and backups go to one of three repositories (so the least
recently used one is dropped now and then). Besides the global model, each repository has its own set of the
chunks acknowledged since its last committed backup; after every step, for each repository the record tracks
with a last backup, a fresh reader's node slots + frozen set + that repository's owed set must cover it (never
under-report, per repository). A backup to a repository the record does not track is full (it reads everything).

Steps: write(chunks) through mark(), crash (drop / keep / tear the volatile cache, optionally in the middle of a
record operation), takeover(node), backup start (freeze), batch stored (checkpoint), backup commit, backup abort,
and corrupting a bitmap page. The model is a plain set of the chunks whose writes were acknowledged since the
last backup that covered them. After every step a fresh reader must report a superset of that set (never
under-report), and everything it reports beyond it must be explained by the documented over-report sources:
marks or backup steps that were in flight at a crash, and the range of a corrupted page.
"""

from __future__ import annotations

import os
import uuid

from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from baton.errors import Fenced
from baton.format.record import BLOCK, PAGE_BITS, PLACEMENT_TAIL, HistoryEntry, RecordHeader, geometry_for
from baton.record.core import Record, format_record
from baton.testing.crashdev import CrashDevice, PowerLoss

CHUNK = 4096
NCHUNKS = 2 * PAGE_BITS + 500  # three bitmap pages per region
DATA = NCHUNKS * CHUNK
NODES = ["a", "b", "c"]
REPOS = ["aa" * 16, "bb" * 16, "cc" * 16]

chunk_lists = st.lists(st.integers(0, NCHUNKS - 1), min_size=1, max_size=6)


class RecordMachine(RuleBasedStateMachine):
    @initialize(seed=st.integers(0, 2**32 - 1))
    def setup(self, seed: int) -> None:
        note(f"crash-device seed {seed}")
        geo = geometry_for(DATA, CHUNK, 3, 2)
        self.dev = CrashDevice(geo.size, seed=seed)
        hdr = RecordHeader(placement=PLACEMENT_TAIL, nslots=3, chunk_size=CHUNK, disk_uuid=str(uuid.uuid4()),
                           lineage="", disk_size=DATA + geo.size, data_size=DATA, record_offset=DATA,
                           record_size=geo.size, pages_per_slot=geo.pages_per_slot, nrepos=2)
        format_record(self.dev, hdr)
        self.rec: Record | None = Record.load(self.dev)
        self.rec.attach("a")
        self.stale: Record | None = None
        self.must: set[int] = set()  # acknowledged, not yet covered by a committed backup/checkpoint
        self.extra: set[int] = set()  # allowed over-report (in flight at a crash, or a corrupted page)
        self.frozen: set[int] | None = None  # model of the frozen set while a backup runs
        self.after_freeze: set[int] = set()  # acknowledged during the running backup
        self.n = 0
        self.must_repo: dict[str, set[int]] = {r: set() for r in REPOS}  # per repository: since its last backup
        self.repo: str = ""  # repository of the running backup
        self.tracked = False  # the running backup is incremental (its repository had a region with a backup)

    # -------------------------------------------------------------------------------------------- steps

    @precondition(lambda self: self.rec is not None)
    @rule(chunks=chunk_lists)
    def write(self, chunks: list[int]) -> None:
        assert self.rec is not None
        self.rec.mark(chunks)
        self.must.update(chunks)
        for m in self.must_repo.values():
            m.update(chunks)
        if self.frozen is not None:
            self.after_freeze.update(chunks)

    @precondition(lambda self: self.rec is not None)
    @rule(chunks=chunk_lists, after=st.integers(0, 6), mode=st.sampled_from(["drop", "keep", "tear"]))
    def crash_during_write(self, chunks: list[int], after: int, mode: str) -> None:
        """Power fails after ``after`` record I/Os of a mark: the write was never acknowledged."""
        assert self.rec is not None
        self.dev.power_fail_after = after
        try:
            self.rec.mark(chunks)
            acked = True
        except PowerLoss:
            acked = False
        self.dev.crash(mode)
        if acked:
            self.must.update(chunks)
            for m in self.must_repo.values():
                m.update(chunks)
        else:
            self.extra.update(chunks)
        self._lost_owner()

    @rule(mode=st.sampled_from(["drop", "keep", "tear"]))
    def crash(self, mode: str) -> None:
        self.dev.crash(mode)
        self._lost_owner()

    def _lost_owner(self) -> None:
        self.stale = None
        self.rec = None
        if self.frozen is not None:
            # The backup dies with the node; its frozen set is merged back at the next takeover.
            self.frozen = None
            self.after_freeze = set()

    @rule(node=st.sampled_from(NODES), keep_stale=st.booleans())
    def takeover(self, node: str, keep_stale: bool) -> None:
        old = self.rec
        new = Record.load(self.dev)
        new.attach(node)
        self.rec = new
        self.stale = old if keep_stale else None
        self.frozen = None
        self.after_freeze = set()

    @precondition(lambda self: self.stale is not None)
    @rule(chunks=chunk_lists)
    def stale_owner_writes(self, chunks: list[int]) -> None:
        """A superseded owner must be fenced: its mark raises and writes nothing."""
        assert self.stale is not None
        before = self.dev.writes
        try:
            self.stale.mark(chunks)
        except Fenced:
            pass
        else:
            # Only acceptable when every chunk was already marked in its memory (no I/O attempted).
            assert self.dev.writes == before
        assert self.dev.writes == before

    @precondition(lambda self: self.rec is not None and self.frozen is None)
    @rule(repo=st.sampled_from(REPOS))
    def backup_start(self, repo: str) -> None:
        assert self.rec is not None
        self.n += 1
        reg = self.rec.find_repo(repo)
        self.tracked = reg is not None and bool(reg.hdr.last_backup)
        self.repo = repo
        self.rec.use_repo(repo)
        bits = self.rec.freeze(f"{self.n:032x}")
        got = set(bits.iter_set(NCHUNKS))
        assert self.must <= got, f"freeze lost {sorted(self.must - got)[:10]}"
        if self.tracked:  # an incremental reads only these: they must cover this repository's changes
            lost = self.must_repo[repo] - got
            assert not lost, f"freeze for repository {repo[:4]} lost {sorted(lost)[:10]}"
        self.frozen = got
        self.after_freeze = set()
        self.extra -= got - self.extra  # no-op; keeps the bound explicit
        self.extra_before_freeze = set(self.extra)

    def _durable(self, sid: str) -> bool:
        """The running backup's repository region names ``sid`` on the durable image."""
        reg = Record.load(self.dev).find_repo(self.repo)
        return reg is not None and reg.hdr.last_backup == sid

    @precondition(lambda self: self.rec is not None and self.frozen and self.tracked)
    @rule(data=st.data(), fail_after=st.one_of(st.none(), st.integers(0, 4)),
          mode=st.sampled_from(["drop", "keep", "tear"]))
    def batch_stored(self, data: st.DataObject, fail_after: int | None, mode: str) -> None:
        assert self.rec is not None and self.frozen
        batch = data.draw(st.lists(st.sampled_from(sorted(self.frozen)), min_size=1, max_size=5, unique=True))
        self.n += 1
        self.dev.power_fail_after = fail_after
        sid = f"{self.n:032x}"
        try:
            self.rec.checkpoint(sid, batch)
        except PowerLoss:
            self.dev.crash(mode)
            # The checkpoint counts once its last_backup pointer is durable; clearing bits is only cleanup.
            if self._durable(sid):
                self.must -= set(batch) - self.after_freeze
                self.must_repo[self.repo] -= set(batch) - self.after_freeze
            self.extra |= set(batch)  # interrupted mid-way: its bits may or may not have been cleared
            self._lost_owner()
            return
        self.dev.power_fail_after = None
        self.frozen -= set(batch)
        self.must -= set(batch) - self.after_freeze
        self.must_repo[self.repo] -= set(batch) - self.after_freeze

    @precondition(lambda self: self.rec is not None and self.frozen is not None)
    @rule(fail_after=st.one_of(st.none(), st.integers(0, 4)), mode=st.sampled_from(["drop", "keep", "tear"]))
    def backup_commit(self, fail_after: int | None, mode: str) -> None:
        assert self.rec is not None and self.frozen is not None
        self.n += 1
        entry = HistoryEntry(seq=0, snapshot_id=f"{self.n:032x}", lineage="", node="x", start_ns=1, end_ns=2,
                             chunks_read=len(self.frozen), bytes_read=0, chunks_stored=0, bytes_stored=0,
                             bytes_deduped=0, mode="incremental", result="ok", reason="", digest="", epoch=0)
        self.dev.power_fail_after = fail_after
        try:
            self.rec.commit_backup(entry)
        except PowerLoss:
            self.dev.crash(mode)
            # Committed once the header naming the snapshot is durable; clearing the frozen set is cleanup.
            if self._durable(entry.snapshot_id):
                self.must -= self.frozen - self.after_freeze
                self.must_repo[self.repo] &= self.after_freeze  # it read (full) or covered (incremental) the rest
            self.extra |= self.frozen  # interrupted mid-way: the frozen set may not have been cleared yet
            self._lost_owner()
            return
        self.dev.power_fail_after = None
        self.must -= self.frozen - self.after_freeze
        self.must_repo[self.repo] &= self.after_freeze
        self.frozen = None
        self.after_freeze = set()

    @precondition(lambda self: self.rec is not None and self.frozen is not None)
    @rule()
    def backup_abort(self) -> None:
        assert self.rec is not None
        self.rec.abort_backup()
        self.frozen = None
        self.after_freeze = set()

    @precondition(lambda self: self.rec is not None)
    @rule(page=st.integers(0, 2), which=st.sampled_from([(0,), (1,), (0, 1)]), byte=st.integers(0, BLOCK - 1))
    def corrupt_page(self, page: int, which: tuple[int, ...], byte: int) -> None:
        """Damage the owner's page (one or both copies) on the durable image, then take over."""
        assert self.rec is not None
        self.dev.sync()  # nothing in flight: the corruption is the only damage
        region = self.rec.owner_region
        assert region is not None
        blk = self.rec.geo.page_block(region, page, 0)
        for copy in which:
            self.dev.durable[(blk + copy) * BLOCK + byte] ^= 0x5A
        self.extra.update(range(page * PAGE_BITS, min((page + 1) * PAGE_BITS, NCHUNKS)))
        self._lost_owner()
        self.takeover("a", False)

    # -------------------------------------------------------------------------------------------- checks

    @invariant()
    def never_under_report(self) -> None:
        if not hasattr(self, "dev"):
            return
        reader = Record.load(self.dev)
        got = set(reader.dirty_bits().iter_set(NCHUNKS))
        missing = self.must - got
        assert not missing, f"under-reported chunks {sorted(missing)[:20]}"
        # Over-report bound: anything beyond the model must be in flight at a crash or in a damaged page
        # range, or still frozen/marked by a backup that has not committed.
        allowed = self.must | self.extra | (self.frozen or set()) | self.after_freeze
        beyond = got - allowed
        assert not beyond, f"over-reported chunks with no cause: {sorted(beyond)[:20]}"
        for repo in REPOS:
            reg = reader.find_repo(repo)
            if reg is None or not reg.hdr.last_backup:
                continue  # its next backup is full
            have = set(reader.repo_dirty_bits(repo).iter_set(NCHUNKS))
            lost = self.must_repo[repo] - have
            assert not lost, f"under-reported for repository {repo[:4]}: {sorted(lost)[:20]}"


RecordMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("BATON_MODEL_EXAMPLES", "100")), stateful_step_count=50, deadline=None,
)
TestRecordModel = RecordMachine.TestCase
