"""The one valid-copy picker: every record structure that is kept twice is chosen by this (STYLE §16).

Record headers, slot headers and record-disk superblocks alternate between two copies and carry a ``seq``: the
valid copy with the highest seq is current. Tail anchors and extent maps are written once, identically, in two
copies: the first valid one is as good as the other. Bitmap pages are not picked here: their copies are judged
sector by sector (``baton.record.core.Record._resolve_page``), because a torn page write must be told apart from
a damaged one.

Pure: bytes in, the parsed copy and the problems of the others out. What the problems *mean* (nothing here, a
wrong disk, damage) is the caller's decision, made on their types (:mod:`baton.format.errors`), never on text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from baton.format.errors import BadMagic, BadVersion, Blank, FormatError

T = TypeVar("T")


@dataclass(frozen=True)
class Picked(Generic[T]):
    """The chosen copy (None when no copy is valid) and the errors of the copies that failed, in copy order."""

    best: T | None
    problems: list[FormatError] = field(default_factory=list)

    @property
    def all_blank(self) -> bool:
        """Every copy failed, each an all-zero block: the structure was never written."""
        return self.best is None and all(isinstance(e, Blank) for e in self.problems)

    @property
    def all_foreign(self) -> bool:
        """Every copy failed its magic check (blank or another structure's bytes): nothing of this kind is here."""
        return self.best is None and all(isinstance(e, BadMagic) for e in self.problems)

    @property
    def any_newer_version(self) -> bool:
        return any(isinstance(e, BadVersion) for e in self.problems)

    @property
    def damaged(self) -> list[FormatError]:
        """Problems of copies that were written (not blank): they may have held the newest version."""
        return [e for e in self.problems if not isinstance(e, Blank)]

    def describe(self) -> str:
        return "; ".join(str(e) for e in self.problems)


def pick_newest(copies: Sequence[bytes], parse: Callable[[int, bytes], T],
                seq: Callable[[T], int] | None = None) -> Picked[T]:
    """Parse copy ``i`` with ``parse(i, raw)``; the valid copy with the highest ``seq(copy)`` wins (the lower
    copy index on a tie), or the first valid copy when ``seq`` is None (structures written once). Only
    :class:`FormatError` counts as an invalid copy; anything else rises."""
    best: T | None = None
    best_seq = 0
    problems: list[FormatError] = []
    for i, raw in enumerate(copies):
        try:
            parsed = parse(i, raw)
        except FormatError as e:
            problems.append(e)
            continue
        if seq is None:
            if best is None:
                best = parsed
            continue
        s = seq(parsed)
        if best is None or s > best_seq:
            best, best_seq = parsed, s
    return Picked(best, problems)


def split_blocks(raw: bytes, n: int, size: int) -> list[bytes]:
    """``n`` consecutive ``size``-byte copies of ``raw`` (as read in one I/O)."""
    return [raw[i * size : (i + 1) * size] for i in range(n)]
