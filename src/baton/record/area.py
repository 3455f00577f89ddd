"""The record area as one logical byte range, whatever its placement: one extent at the tail of the data disk,
one extent (a slot) on a record disk, or the mapped extents of a pinned file inside a file system."""

from __future__ import annotations

from baton.device import BlockDev, SubDev
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


def physical_extents(dev: object, offset: int, length: int) -> list[tuple[int, int]]:
    """Where bytes [offset, offset + length) of ``dev`` live on the device at the bottom of its stack of
    windows (``SubDev``: a tail area or a record-disk slot) and extent maps (``ExtentDev``: a record file), as
    (physical byte offset, length) pieces in logical order, contiguous ones merged. A device that is neither
    is the bottom itself."""
    pieces: list[tuple[int, int]]
    if isinstance(dev, ExtentDev):
        pieces = []
        for _rel, phys, n in dev._pieces(offset, length):
            pieces += physical_extents(dev.dev, phys, n)
    elif isinstance(dev, SubDev):
        if offset < 0 or offset + length > dev.size:
            raise ValueError(f"bytes {offset}+{length} outside a {dev.size}-byte window")
        pieces = physical_extents(dev.dev, dev.base + offset, length)
    else:
        pieces = [(offset, length)]
    merged: list[tuple[int, int]] = []
    for phys, n in pieces:
        if merged and merged[-1][0] + merged[-1][1] == phys:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((phys, n))
    return merged


def bottom_path(dev: object) -> str:
    """The path of the device at the bottom of ``dev``'s stack (what ``DirectDev`` opened), '' if unknown."""
    while isinstance(dev, ExtentDev | SubDev):
        dev = dev.dev
    return str(getattr(dev, "path", ""))
