"""The backup engine's read groups (``baton.backup._groups``): every run read once, in order, holes alone."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from baton.backup import GROUP_BYTES, _groups

CS = 64 << 10

runs_strategy = st.lists(st.tuples(st.integers(1, 40), st.booleans()), max_size=200)


def _as_runs(spec: list[tuple[int, bool]]) -> list[tuple[int, int, bool]]:
    out, c = [], 0
    for count, hole in spec:
        out.append((c, count, hole))
        c += count + 1  # a gap: runs are not adjacent
    return out


@settings(max_examples=300, deadline=None)
@given(runs_strategy)
def test_groups_keep_every_run_in_order_and_holes_alone(spec: list[tuple[int, bool]]) -> None:
    runs = _as_runs(spec)
    groups = list(_groups(iter(runs), CS))
    assert [r for g in groups for r in g] == runs          # nothing lost, duplicated or reordered
    for g in groups:
        assert g, "no empty group"
        if any(hole for _f, _c, hole in g):
            assert len(g) == 1                              # a hole run (not read) is never gathered
        else:
            data = sum(c * CS for _f, c, _h in g)
            # A group closes as soon as it holds GROUP_BYTES: without its last run it held less.
            assert data - g[-1][1] * CS < GROUP_BYTES


def test_short_runs_are_gathered() -> None:
    runs = [(2 * i, 1, False) for i in range(100)]  # a scattered incremental: single chunks with gaps
    groups = list(_groups(iter(runs), CS))
    assert len(groups) == -(-100 * CS // GROUP_BYTES)
    assert all(len(g) == GROUP_BYTES // CS for g in groups[:-1])
