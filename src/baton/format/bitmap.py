"""The one bitmap type: a set of chunk numbers, one bit per chunk, backed by a ``bytearray`` (STYLE §16).

Bit ``i`` is bit ``i & 7`` of byte ``i >> 3`` (little-endian bit order), the layout of a record bitmap page's
bits (docs/format.md "Bitmap page"), so ``Bitmap.data`` slices are what a page stores, byte for byte.

Whole-set operations (``|=``, ``and_not``, ``count``) go through one big-int operation each instead of a Python
loop over bytes: a 16 TiB disk at 64 KiB chunks is 32 MiB of bits, and those run in milliseconds. ``iter_set``
skips zero 4 KiB blocks, so a sparse set of a large disk iterates in time proportional to what is set.

Not thread-safe: the owner (``Record``, under its lock; the tracker, under its copy-before-write lock) guards it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_NONZERO = re.compile(rb"[^\x00]")  # finds the next byte holding a set bit
_BLOCK = 64 << 10  # bytes checked for "all zero" at once


class Bitmap:
    """A fixed-size set of bits. ``len(bitmap)`` is the number of bytes; ``nbytes`` says the same."""

    __slots__ = ("data",)

    def __init__(self, nbytes: int = 0, *, fill: bool = False) -> None:
        self.data = bytearray(b"\xff" * nbytes) if fill else bytearray(nbytes)

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> Bitmap:
        """A bitmap holding a copy of ``raw``."""
        out = cls()
        out.data = bytearray(raw)
        return out

    @classmethod
    def first_n(cls, nbits: int) -> Bitmap:
        """Bits 0..nbits-1 set, in the fewest bytes that hold them."""
        out = cls((nbits + 7) // 8, fill=True)
        out.trim(nbits)
        return out

    # ------------------------------------------------------------------------------------------ single bits

    def test(self, i: int) -> bool:
        return bool(self.data[i >> 3] >> (i & 7) & 1)

    def set(self, i: int) -> None:
        self.data[i >> 3] |= 1 << (i & 7)

    def clear(self, i: int) -> None:
        self.data[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def set_all(self, bits: Iterable[int]) -> None:
        d = self.data
        for i in bits:
            d[i >> 3] |= 1 << (i & 7)

    def clear_all(self, bits: Iterable[int]) -> None:
        d = self.data
        for i in bits:
            d[i >> 3] &= ~(1 << (i & 7)) & 0xFF

    def clear_range(self, lo: int, hi: int) -> None:
        """Clear bits lo..hi-1: whole bytes at once, single bits at the edges."""
        d = self.data
        i = lo
        while i < hi and i & 7:
            d[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            i += 1
        whole = (hi - i) >> 3
        if whole > 0:
            d[i >> 3 : (i >> 3) + whole] = bytes(whole)
            i += whole << 3
        while i < hi:
            d[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            i += 1

    def all_set(self, bits: Iterable[int]) -> bool:
        d = self.data
        return all(d[i >> 3] >> (i & 7) & 1 for i in bits)

    def missing(self, bits: Iterable[int]) -> list[int]:
        """The bits of ``bits`` that are not set, in the order given."""
        d = self.data
        return [i for i in bits if not d[i >> 3] >> (i & 7) & 1]

    # ------------------------------------------------------------------------------------------ whole sets

    def __ior__(self, other: Bitmap) -> Bitmap:
        """self |= other (same size), one big-int OR."""
        n = len(self.data)
        v = int.from_bytes(self.data, "little") | int.from_bytes(other.data, "little")
        self.data[:] = v.to_bytes(n, "little")
        return self

    def and_not(self, other: Bitmap) -> None:
        """self &= ~other (same size): clear every bit set in ``other``."""
        n = len(self.data)
        v = int.from_bytes(self.data, "little") & ~int.from_bytes(other.data, "little")
        self.data[:] = v.to_bytes(n, "little")

    def count(self) -> int:
        """Set bits (popcount)."""
        return int.from_bytes(self.data, "little").bit_count() if self.data else 0

    def any(self) -> bool:
        return any(self.data)

    def trim(self, nbits: int) -> None:
        """Clear every bit from ``nbits`` on (bits past the last chunk)."""
        d = self.data
        start = nbits >> 3
        if nbits & 7 and start < len(d):
            d[start] &= (1 << (nbits & 7)) - 1
            start += 1
        if start < len(d):
            d[start:] = bytes(len(d) - start)

    def copy(self) -> Bitmap:
        return Bitmap.from_bytes(self.data)

    def iter_set(self, limit: int | None = None) -> Iterator[int]:
        """Indices of set bits below ``limit`` (default: all), ascending. All-zero 64 KiB blocks are skipped by
        one C-level count each, and zero bytes inside a block by the regex engine, so a sparse set of a large
        disk costs about what is set (2^28 bits, 100,000 set: well under a second)."""
        d = self.data
        n = len(d) if limit is None else min(len(d), (limit + 7) // 8)
        for lo in range(0, n, _BLOCK):
            hi = min(n, lo + _BLOCK)
            if d.count(0, lo, hi) == hi - lo:
                continue
            for m in _NONZERO.finditer(d, lo, hi):
                base = m.start() * 8
                byte = d[m.start()]
                for k in range(8):
                    if byte >> k & 1:
                        i = base + k
                        if limit is not None and i >= limit:
                            return
                        yield i

    def runs(self, limit: int | None = None) -> Iterator[tuple[int, int]]:
        """(first, count) runs of consecutive set bits, ascending."""
        first = count = 0
        for i in self.iter_set(limit):
            if count and first + count == i:
                count += 1
                continue
            if count:
                yield first, count
            first, count = i, 1
        if count:
            yield first, count

    # ------------------------------------------------------------------------------------------ bytes

    def __len__(self) -> int:
        return len(self.data)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    def slice_bytes(self, lo: int, hi: int) -> bytes:
        """Bytes lo..hi-1 (a bitmap page's worth, for writing)."""
        return bytes(self.data[lo:hi])

    def put_bytes(self, lo: int, raw: bytes | bytearray) -> None:
        """Overwrite bytes from ``lo`` with ``raw`` (a page's bits, as read)."""
        self.data[lo : lo + len(raw)] = raw

    def any_in(self, lo: int, hi: int) -> bool:
        """Any bit set in bytes lo..hi-1."""
        return any(memoryview(self.data)[lo:hi])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and self.data == other.data

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Bitmap({len(self.data)} bytes, {self.count()} set)"
