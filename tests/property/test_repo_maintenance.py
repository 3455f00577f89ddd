"""Model-based test: random backups (full/incremental/checkpoint/abort), forgets and prunes never lose a
snapshot that was not forgotten, and verify stays clean."""

from __future__ import annotations

import uuid

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from baton.repo import BackupWriter, DiskIdentity, Manifest, Repository
from baton.repo.maintenance import forget, prune
from baton.verify import verify

CS = 4096
N = 24
VALUES = st.integers(0, 6)            # 0 = zero chunk; 1..6 = distinct contents (dedup happens often)


def content(v: int) -> bytes:
    return bytes(CS) if v == 0 else bytes([v]) * (CS // 2) + bytes([v + 10]) * (CS // 2)


class RepoMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.url = f"memory://machine-{uuid.uuid4().hex}"
        self.repo = Repository.init(self.url, pack_target=3 * CS)     # tiny packs: repack and delete happen
        self.disk = DiskIdentity("disk", N * CS, CS)
        self.current = [0] * N
        self.snaps: dict[str, list[int]] = {}                          # complete snapshot -> image model
        self.last: Manifest | None = None

    def _write(self, writes: list[tuple[int, int]], *, full: bool) -> tuple[BackupWriter, list[int]]:
        parent = self.last
        mode = "full" if full or parent is None else "incremental"
        w = BackupWriter(self.repo, self.disk, parent=parent, node="n", mode=mode, reason="", lineage="L")
        image = list(self.current)
        if mode == "full":
            image = [0] * N
            for i in range(N):
                w.put(i, content(self.current[i]))
                image[i] = self.current[i]
        for i, v in writes:
            w.put(i % N, content(v))
            image[i % N] = v
        return w, image

    @rule(writes=st.lists(st.tuples(st.integers(0, N - 1), VALUES), max_size=8), full=st.booleans())
    def backup(self, writes: list[tuple[int, int]], full: bool) -> None:
        w, image = self._write(writes, full=full)
        m = w.commit({})
        self.current = image
        self.snaps[m.snapshot_id] = image
        self.last = m

    @rule(writes=st.lists(st.tuples(st.integers(0, N - 1), VALUES), min_size=1, max_size=8))
    def aborted_backup(self, writes: list[tuple[int, int]]) -> None:
        w, _image = self._write(writes, full=False)
        w.checkpoint()            # leaves a partial manifest that is a parent candidate, then dies
        w.abort()

    @precondition(lambda self: len(self.snaps) > 0)
    @rule(data=st.data())
    def forget_one(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.snaps)))
        forget(self.repo, [sid])
        del self.snaps[sid]
        if self.last is not None and self.last.snapshot_id == sid:
            self.last = None

    @rule(max_unused=st.sampled_from([0.0, 0.2, 1.0]))
    def prune_all(self, max_unused: float) -> None:
        # Partial manifests of aborted backups stay referenced; they are a parent candidate until forgotten.
        prune(self.repo, grace=0, max_unused=max_unused)

    @invariant()
    def snapshots_read_back(self) -> None:
        fresh = Repository.open(self.url)
        complete = {m.snapshot_id for m in fresh.snapshots()}
        assert complete == set(self.snaps)
        for sid, image in list(self.snaps.items())[-2:]:
            r = fresh.snapshot_reader(fresh.get_snapshot(sid))
            assert [r.read(i) for i in range(N)] == [content(v) for v in image]

    def teardown(self) -> None:
        assert verify(Repository.open(self.url)).ok


RepoMachine.TestCase.settings = settings(max_examples=20, stateful_step_count=12, deadline=None)
TestRepoMachine = RepoMachine.TestCase
