"""Folding dm-era's record of writes into Baton's record: :func:`fold`, over any :class:`EraSource`.

dm-era tracks writes in the kernel; Baton's record (node slots, the frozen set, the repositories' owed sets) stays
*the* changed set the backup engine reads. At well-defined points the owner folds the era metadata into the
record (docs/design.md "dm-era frontend"):

1. take a metadata snapshot through a *loaded* era target: the current era moves from E to E+1, and the snapshot
   covers every write of the eras up to E;
2. list the blocks written since ``header.era_folded`` (era blocks are chunks: the era block size is the
   record's chunk size);
3. ``record.mark(chunks)``: durable, in this owner's node slot, as a userspace write's mark is;
4. ``record.set_era_folded(E+1, pending=...)``: a durable header write;
5. drop the metadata snapshot.

A crash anywhere before step 4 leaves ``era_folded`` as it was: the next fold lists those chunks again (an
over-report, never an under-report). A source that cannot list raises; an empty listing from a source that
answered is trusted, because a source only ever reads metadata that a loaded era target vouches for (reading
it offline after a crash misses the current era's writes: never do that).

Fold points: every dm attach right after the era target is loaded, every backup freeze, a clean dm detach
(``pending=False``), and any attach or offline backup of a record whose FLAG_ERA_PENDING is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from baton.record.core import Record


class EraSource(Protocol):
    """A loaded era target, as :func:`fold` uses it (``baton.host.dm``'s ``EraTarget`` in production)."""

    def take_snapshot(self) -> int:
        """Take the metadata snapshot; return the era that is current *after* it (the snapshot covers every
        era before it)."""
        ...

    def written_since(self, era: int) -> Iterable[int]:
        """Era blocks written in eras >= ``era``, as the held metadata snapshot lists them."""
        ...

    def drop_snapshot(self) -> None:
        """Drop the metadata snapshot taken by :meth:`take_snapshot`."""
        ...


@dataclass(frozen=True)
class FoldResult:
    since: int  # header.era_folded before the fold
    era: int  # header.era_folded after it: the era that was current after the metadata snapshot
    chunks: int  # blocks the era metadata listed (marked in the record)
    beyond: int = 0  # blocks listed beyond the disk's last chunk (ignored; the record was distrusted)


def fold(record: Record, source: EraSource, *, pending: bool, keep_snapshot: bool = False) -> FoldResult:
    """Fold what ``source`` recorded since ``record.header.era_folded`` into ``record`` (attached, owned by
    this node); see the module docstring for the steps. ``pending`` is the FLAG_ERA_PENDING the header keeps:
    True while a dm owner keeps tracking (attach, backup freeze), False when no era target will track this disk
    any more (a clean dm detach, a fold on behalf of a userspace owner). Raises what the source or the record
    raise (``Fenced`` included); the metadata snapshot is dropped on every path, except after success with
    ``keep_snapshot`` (the caller drops it later: a backup's freeze drops it once writes flow again)."""
    since = record.header.era_folded
    era = source.take_snapshot()
    try:
        if era <= since:  # eras only grow: the current era before the snapshot (era - 1) is below era_folded
            record.distrust(f"era metadata was re-created: its current era {era - 1} is below the era {since} "
                            "already folded into the record, so writes it tracked before may be missing")
            since = 0
        n = record.header.nchunks
        # Era 0 in the era array means "never written": fresh metadata starts at era 1.
        chunks = sorted(set(source.written_since(max(since, 1))))
        beyond = [c for c in chunks if c >= n]
        if beyond:
            chunks = [c for c in chunks if c < n]
            record.distrust(f"the era metadata listed block {beyond[0]}, beyond the disk's {n} chunks: it does "
                            "not describe this disk as it is now")
        record.mark(chunks)
        record.set_era_folded(era, pending=pending)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            source.drop_snapshot()
        raise
    if not keep_snapshot:
        source.drop_snapshot()
    return FoldResult(since=since, era=era, chunks=len(chunks), beyond=len(beyond))
