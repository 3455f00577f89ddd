"""The record area as one logical byte range, whatever its placement: one extent at the tail of the data disk,
one extent (a slot) on a record disk, or the mapped extents of a pinned file inside a file system."""

from __future__ import annotations

from baton.device import BlockDev
from baton.format.record import Extent


class ExtentDev:
    """A BlockDev whose logical bytes [0, size) live in ``extents`` of ``dev``. Requests that cross an extent
    boundary are split. A request outside the mapped range raises ValueError (a bug, never clamped)."""

    def __init__(self, dev: BlockDev, extents: tuple[Extent, ...]) -> None:
        if not extents:
            raise ValueError("a record area needs at least one extent")
        self.dev = dev
        self.extents = tuple(sorted(extents, key=lambda e: e.logical))
        pos = 0
        for e in self.extents:
            if e.logical != pos:
                raise ValueError(f"record extents leave a gap at logical byte {pos}")
            pos += e.length
        self.size = pos

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"record I/O at {offset}+{length} outside a {self.size}-byte area")
        out = []
        end = offset + length
        for e in self.extents:
            lo = max(offset, e.logical)
            hi = min(end, e.logical + e.length)
            if lo < hi:
                out.append((lo - offset, e.physical + (lo - e.logical), hi - lo))
        return out

    def pread(self, offset: int, length: int) -> bytes:
        pieces = self._pieces(offset, length)
        if len(pieces) == 1:
            return self.dev.pread(pieces[0][1], pieces[0][2])
        return b"".join(self.dev.pread(phys, n) for _, phys, n in pieces)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        for rel, phys, n in self._pieces(offset, len(mv)):
            self.dev.pwrite(phys, mv[rel : rel + n])

    def sync(self) -> None:
        self.dev.sync()

    def close(self) -> None:
        self.dev.close()
