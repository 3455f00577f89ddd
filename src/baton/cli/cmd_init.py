"""baton init: create a disk's change record, or format a record disk."""

from __future__ import annotations

import click

from baton.cli import emit
from baton.format.record import DEFAULT_CHUNK, era_region_size
from baton.record.placement import (
    DEFAULT_RDISK_SLOT_SIZE,
    DEFAULT_REPOS,
    DEFAULT_SLOTS,
    describe,
    init_disk,
    init_record_disk,
    parse_size,
    upgrade_disk,
)


def _mib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n >> 20} MiB"


HELP = """Create the change record for a shared DISK (a block device or an image file).

    \b
    Placements (one format):
      tail                     a region at the end of DISK; the tracked device is DISK minus that region.
                               Default for disks with no file system (raw, Oracle ASM, LVM PV, empty).
      file                     /.baton/record inside an ext4 or xfs on DISK: preallocated, written through,
                               FIEMAP-mapped and immutable, then only ever written raw (like a swap file).
                               Default when blkid finds ext4 or xfs. Nothing else on DISK changes.
      external:RDISK[#SLOT]    a slot on a record disk (see --record-disk); DISK itself is never written.

    Record format v3 (the default) ends the record area with an era region, where the dm frontend's
    dm-era keeps its metadata: its era array (4 bytes per chunk) twice over, four writesets (1 bit per chunk
    each) and btree slack, at least {floor}. At the default {chunk} chunks a 1 TiB disk reserves {tib}, a
    16 TiB disk {tib16}, a 4 GiB disk {gib4}.
    --record-format 2 reserves none (fuse and nbd only; also for clusters whose nodes still run a Baton
    that reads only v2). --upgrade adds the region to a v2 record in place where its area has room.

    DISK must not be mounted, attached or open. Run it once, from any node.

    \b
    Examples:
      baton init /dev/mapper/mpatha
      baton init /dev/sdc --record-disk --slots 16
      baton init /dev/sdb --record external:/dev/sdc
      baton init --upgrade /dev/mapper/mpatha
    """.format(floor=_mib(era_region_size(1 << 20, DEFAULT_CHUNK)), chunk=f"{DEFAULT_CHUNK >> 10} KiB",
               tib=_mib(era_region_size(1 << 40, DEFAULT_CHUNK)), tib16=_mib(era_region_size(16 << 40, DEFAULT_CHUNK)),
               gib4=_mib(era_region_size(4 << 30, DEFAULT_CHUNK)))


@click.command("init", help=HELP)
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
@click.option("--record-format", "version", type=click.IntRange(1, 3), default=None,
              help="Record format to write: 3 (the default: with the era region for --frontend dm), 2 (no era "
                   "region), 1 (no repository regions either). Re-creating a tail record keeps its area: without "
                   "this option it gets the newest format that fits there.")
@click.option("--upgrade", is_flag=True,
              help="Add the era region to DISK's format-v2 record in place (it becomes v3), where the record "
                   "area has room; lineage, history and changed chunks are kept. Otherwise says what to run.")
@click.option("--record-disk", is_flag=True, help="Format DISK as a record disk holding records of other disks.")
@click.option("--slots", default=8, show_default=True, help="With --record-disk: number of slots.")
@click.option("--slot-size", default=str(DEFAULT_RDISK_SLOT_SIZE >> 20) + "M", show_default=True,
              help="With --record-disk: bytes per slot (bounds the size of the data disks it can serve).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(disk: str, record: str | None, chunk_size: str, node_slots: int, nrepos: int, reset: bool, force: bool,
            version: int | None, upgrade: bool, record_disk: bool, slots: int, slot_size: str, as_json: bool) -> None:
    if record_disk:
        out = init_record_disk(disk, slots=slots, slot_size=parse_size(slot_size), force=force)
        emit(out, as_json, f"formatted record disk {disk}: {slots} slots of {parse_size(slot_size) >> 20} MiB")
        return
    changed = True
    if upgrade:
        loc, changed = upgrade_disk(disk, record=record)
    else:
        loc = init_disk(disk, record=record, chunk_size=parse_size(chunk_size), nslots=node_slots, force=force,
                        reset=reset, nrepos=nrepos, version=version)
    try:
        st = describe(loc)
    finally:
        loc.close()
    if upgrade:
        st["upgraded"] = changed
    era = st.get("era")
    fmt = f"format v{st['format_version']}" + (f" with a {_mib(era['size'])} era region" if era else
                                                " (no era region: fuse and nbd only)")
    done = "initialised" if not upgrade else "upgraded" if changed else "nothing to upgrade:"
    human = (f"{done} {disk}: record {st['record']} ({fmt}), chunk size "
             f"{st['chunk_size'] // 1024} KiB, {st['data_size']} bytes tracked, record area {st['record_size']} "
             f"bytes, lineage {st['lineage']}")
    emit(st, as_json, human)
