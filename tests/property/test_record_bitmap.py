"""The one bitmap type (baton.format.bitmap.Bitmap) against a Python set of ints."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from baton.format.bitmap import Bitmap

NBITS = 300
bits = st.sets(st.integers(0, NBITS - 1), max_size=80)


def _bm(s: set[int]) -> Bitmap:
    b = Bitmap((NBITS + 7) // 8)
    b.set_all(s)
    return b


@settings(max_examples=200, deadline=None)
@given(bits, bits, st.integers(0, NBITS), st.integers(0, NBITS))
def test_bitmap_behaves_like_a_set(a: set[int], b: set[int], lo: int, hi: int) -> None:
    x, y = _bm(a), _bm(b)
    assert set(x.iter_set()) == a and x.count() == len(a)
    assert all(x.test(i) == (i in a) for i in range(NBITS))
    assert x.missing(sorted(b)) == sorted(b - a) and x.all_set(a) and x.any() == bool(a)
    u = x.copy()
    u |= y
    assert set(u.iter_set()) == a | b and set(x.iter_set()) == a  # copy() is independent
    d = x.copy()
    d.and_not(y)
    assert set(d.iter_set()) == a - b
    c = x.copy()
    c.clear_all(b)
    assert set(c.iter_set()) == a - b
    lo, hi = min(lo, hi), max(lo, hi)
    r = x.copy()
    r.clear_range(lo, hi)
    assert set(r.iter_set()) == {i for i in a if not lo <= i < hi}
    t = x.copy()
    t.trim(hi)
    assert set(t.iter_set()) == {i for i in a if i < hi}
    assert set(x.iter_set(hi)) == {i for i in a if i < hi}
    runs = list(x.runs())
    assert [i for f, n in runs for i in range(f, f + n)] == sorted(a)
    assert all(runs[k][0] + runs[k][1] < runs[k + 1][0] for k in range(len(runs) - 1))
    assert Bitmap.first_n(hi).count() == hi and Bitmap.first_n(hi).nbytes == (hi + 7) // 8


def test_bit_order_is_the_page_layout() -> None:
    b = Bitmap(2)
    b.set(0)
    b.set(9)
    assert bytes(b.data) == b"\x01\x02"
    assert Bitmap.from_bytes(b"\x80\x01").test(7) and Bitmap.from_bytes(b"\x80\x01").test(8)
