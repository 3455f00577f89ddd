"""baton init: create a disk's change record, or format a record disk."""

from __future__ import annotations

import click

from baton.cli import emit
from baton.record.placement import (
    DEFAULT_RDISK_SLOT_SIZE,
    DEFAULT_REPOS,
    DEFAULT_SLOTS,
    describe,
    init_disk,
    init_record_disk,
    parse_size,
)


@click.command("init")
@click.argument("disk", metavar="DISK")
@click.option("--record", "record", metavar="tail|file|external:RECORD_DISK[#SLOT]",
              help="Where the record lives. Default: 'file' when blkid finds ext4 or xfs, 'tail' when it finds "
                   "no file system. Any other file system needs 'external:...'.")
@click.option("--chunk-size", default="64K", show_default=True,
              help="Tracking granularity and repository chunk size: a power of two from 4K to 4M.")
@click.option("--node-slots", default=DEFAULT_SLOTS, show_default=True,
              help="Per-node slots in the record (nodes beyond this reuse free slots).")
@click.option("--repos", "nrepos", default=DEFAULT_REPOS, show_default=True,
              help="Repositories the record keeps incremental at once (each has a region; a further one takes "
                   "over the least recently used, whose next backup is then full).")
@click.option("--reset", is_flag=True,
              help="Re-create the record in place with a new lineage (after 'both header copies damaged'). "
                   "The data is untouched; the next backup is full with reason 'record reset'.")
@click.option("--force", is_flag=True, help="Replace an existing record (new disk identity; next backup full).")
@click.option("--record-disk", is_flag=True, help="Format DISK as a record disk holding records of other disks.")
@click.option("--slots", default=8, show_default=True, help="With --record-disk: number of slots.")
@click.option("--slot-size", default=str(DEFAULT_RDISK_SLOT_SIZE >> 20) + "M", show_default=True,
              help="With --record-disk: bytes per slot (bounds the size of the data disks it can serve).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(disk: str, record: str | None, chunk_size: str, node_slots: int, nrepos: int, reset: bool, force: bool,
            record_disk: bool, slots: int, slot_size: str, as_json: bool) -> None:
    """Create the change record for a shared DISK (a block device or an image file).

    \b
    Placements (one format):
      tail                     a region at the end of DISK; the tracked device is DISK minus that region.
                               Default for disks with no file system (raw, Oracle ASM, LVM PV, empty).
      file                     /.baton/record inside an ext4 or xfs on DISK: preallocated, written through,
                               FIEMAP-mapped and immutable, then only ever written raw (like a swap file).
                               Default when blkid finds ext4 or xfs. Nothing else on DISK changes.
      external:RDISK[#SLOT]    a slot on a record disk (see --record-disk); DISK itself is never written.

    DISK must not be mounted, attached or open. Run it once, from any node.

    \b
    Examples:
      baton init /dev/mapper/mpatha
      baton init /dev/sdc --record-disk --slots 16
      baton init /dev/sdb --record external:/dev/sdc
    """
    if record_disk:
        out = init_record_disk(disk, slots=slots, slot_size=parse_size(slot_size), force=force)
        emit(out, as_json, f"formatted record disk {disk}: {slots} slots of {parse_size(slot_size) >> 20} MiB")
        return
    loc = init_disk(disk, record=record, chunk_size=parse_size(chunk_size), nslots=node_slots, force=force,
                    reset=reset, nrepos=nrepos)
    try:
        st = describe(loc)
    finally:
        loc.close()
    human = (f"initialised {disk}: record {st['record']}, chunk size {st['chunk_size'] // 1024} KiB, "
             f"{st['data_size']} bytes tracked, record area {st['record_size']} bytes, lineage {st['lineage']}")
    emit(st, as_json, human)
