"""DirectDev.pread_view / baton.device.read_view: the bytes pread returns, read in place (no bounce buffer,
no copy) into page-aligned memory the returned view keeps alive; SubDev windows and devices without
pread_view get the same answer."""

from __future__ import annotations

import random

import pytest

from baton.device import ALIGN, DirectDev, SubDev, aligned_view, read_view

SEED = 20261128


class _PlainDev:
    """A BlockDev without pread_view (as the test devices are)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def pread(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]


def test_aligned_view_is_aligned_and_writable() -> None:
    import ctypes

    for n in (ALIGN, 3 * ALIGN, 1 << 20):
        v = aligned_view(n)
        assert len(v) == n and not v.readonly
        addr = ctypes.addressof(ctypes.c_char.from_buffer(v))
        assert addr % ALIGN == 0


def test_a_short_read_leaves_zeros_whatever_the_buffer_held() -> None:
    """aligned_view's memory is not zeroed: DirectRead.result must zero what a read did not fill (past the end
    of a regular file), so no stale byte of earlier reads reaches a backup."""
    from baton.device import DirectRead

    class _Counted:
        bytes_read = 0

    for got in (0, 100, ALIGN, 2 * ALIGN - 1):
        buf = aligned_view(2 * ALIGN)
        buf[:] = b"\xab" * len(buf)
        r = DirectRead(_Counted(), -1, 0, buf, 10, 2 * ALIGN - 10)  # type: ignore[arg-type]
        v = r.result(got)
        assert v.readonly and len(v) == 2 * ALIGN - 10
        assert bytes(buf[got:]) == bytes(2 * ALIGN - got)
        assert bytes(v[max(0, got - 10):]) == bytes(len(v) - max(0, got - 10))


def test_pread_view_matches_pread(tmp_path) -> None:  # type: ignore[no-untyped-def]
    print("seed", SEED)
    rng = random.Random(SEED)
    size = 3 * (1 << 20) + 1234                    # an unaligned end: reads past it come back as zeros
    data = rng.randbytes(size)
    p = tmp_path / "img"
    p.write_bytes(data)
    dev = DirectDev(str(p), writable=False)
    try:
        if not dev.direct:
            pytest.skip("the file system refuses O_DIRECT here")
        sub = SubDev(dev, 4096, size - 4096)
        for _ in range(200):
            off = rng.randrange(size)
            n = rng.randrange(1, min(2 << 20, size - off) + 1)
            v = dev.pread_view(off, n)
            assert v.readonly and bytes(v) == dev.pread(off, n) == data[off:off + n]
            if off >= 4096:
                assert bytes(read_view(sub, off - 4096, n)) == data[off:off + n]
        tail = dev.pread_view(size - 10, 10)
        assert bytes(tail) == data[-10:]
        big = dev.pread_view(0, size)                 # above max_io: falls back to pread, same bytes
        assert bytes(big) == data
    finally:
        dev.close()


def test_read_view_falls_back_to_pread() -> None:
    d = _PlainDev(b"0123456789")
    assert bytes(read_view(d, 2, 5)) == b"23456"
