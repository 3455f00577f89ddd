"""Where a disk's record lives, and how to find it again without mounting anything.

* ``tail``: a region at the end of the data disk. The last two blocks are anchors (written once) naming the
  record's offset; the tracked device exposes the disk up to that offset, as DRBD does with internal metadata.
* ``file``: ``/.baton/record`` inside ext4 or xfs, preallocated, written through, FIEMAP-mapped and immutable.
  Attach asks the file system's own offline tool (``debugfs`` for ext4, ``xfs_db`` for xfs; neither mounts)
  where the file's first blocks are, reads the extent map stored there, and checks the header names this disk,
  this file-system UUID and its own physical location.
* ``external:RECORD_DISK[#SLOT]``: a slot on a record disk formatted by ``baton init RECORD_DISK --record-disk``.
  The slot table is keyed by the data disk's identity (size, file-system UUID, serial/WWN).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass, replace
from typing import Any

from baton import host
from baton.device import BlockDev, DirectDev, SubDev, device_size, is_block_device
from baton.errors import (
    DeviceError,
    RecordCorrupt,
    RecordError,
    RecordFull,
    RecordNotFound,
    UsageError,
    WrongDisk,
)
from baton.format.copies import Picked, pick_newest, split_blocks
from baton.format.errors import OtherDiskSize
from baton.format.record import (
    ANCHOR_BLOCKS,
    BLOCK,
    DEFAULT_CHUNK,
    ERA_ALIGN,
    EXTMAP_MAX,
    EXTMAP_START,
    FLAG_RESET,
    FORMAT_VERSION,
    FS_PROBE_BYTES,
    PLACEMENT_EXTERNAL,
    PLACEMENT_FILE,
    PLACEMENT_NAMES,
    PLACEMENT_TAIL,
    RDISK_DATA_START,
    RDISK_MAX_SLOTS,
    SUPPORTED_VERSIONS,
    Anchor,
    Extent,
    Geometry,
    RecordDiskSlot,
    RecordDiskSuper,
    RecordHeader,
    area_for_era,
    era_offset_at_end,
    era_region_size,
    extents_crc,
    geometry_for,
    is_chunk_size,
    max_pages_per_slot,
    pack_extmap,
    parse_fs_markers,
    unpack_extmap,
)
from baton.record.area import ExtentDev
from baton.record.core import Record, format_record, upgrade_for_era

DEFAULT_SLOTS = 4
DEFAULT_REPOS = 4  # v2 repository regions: repositories a disk stays incremental into, each on its own
SUPPORTED_FS = ("ext4", "xfs")
DEFAULT_RDISK_SLOT_SIZE = 256 << 20  # a format-v3 record with its era region: disks up to ~1.3 TiB at 64K chunks


@dataclass(frozen=True)
class RecordSpec:
    placement: str  # tail | file | external
    record_disk: str = ""
    slot: int | None = None

    @classmethod
    def parse(cls, spec: str | None) -> RecordSpec | None:
        if spec is None or spec == "":
            return None
        if spec in ("tail", "file"):
            return cls(spec)
        m = re.fullmatch(r"external:([^#]+)(?:#(\d+))?", spec)
        if m:
            return cls("external", m.group(1), int(m.group(2)) if m.group(2) is not None else None)
        raise UsageError(f"--record {spec!r}: expected tail, file or external:RECORD_DISK[#SLOT]")

    def __str__(self) -> str:
        if self.placement != "external":
            return self.placement
        return f"external:{self.record_disk}" + (f"#{self.slot}" if self.slot is not None else "")


@dataclass(frozen=True)
class FsInfo:
    type: str = ""
    uuid: str = ""


def probe_fs(path: str) -> FsInfo:
    """What blkid recognises on ``path`` (low-level probe, no cache)."""
    r = subprocess.run(["blkid", "-p", "-o", "export", path], capture_output=True, text=True, timeout=30)
    if r.returncode not in (0, 2):
        raise DeviceError(f"blkid failed on {path}: {r.stderr.strip()}")
    vals = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    fs_uuid = vals.get("UUID", "")
    try:
        fs_uuid = str(uuid.UUID(fs_uuid)) if fs_uuid else ""
    except ValueError:
        fs_uuid = ""  # not a 128-bit UUID (e.g. vfat serials): identity falls back to size and hw id
    return FsInfo(vals.get("TYPE", ""), fs_uuid)


def hw_id(path: str) -> str:
    """Serial or WWN of a block device, '' for image files or when unknown."""
    if not is_block_device(path):
        return ""
    r = subprocess.run(["lsblk", "-dno", "WWN,SERIAL", path], capture_output=True, text=True, timeout=30)
    return " ".join(r.stdout.split())[:48] if r.returncode == 0 else ""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise UsageError(f"cannot parse size {text!r} (examples: 64K, 1M, 4096)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(m.group(1)) * mult


def check_chunk_size(chunk: int) -> None:
    if not is_chunk_size(chunk):
        raise UsageError(f"chunk size {chunk} must be a power of two from 4K to 4M")


# ------------------------------------------------------------------------------------------------ opened records


@dataclass
class Located:
    """A record found on (or for) a data disk, with what the layers above need to serve and back it up."""

    disk: str  # data disk path
    record: Record
    spec: RecordSpec
    data_size: int  # bytes tracked and exposed
    devs: list[Any]  # devices to close

    @property
    def header(self) -> RecordHeader:
        return self.record.header

    def close(self) -> None:
        for d in self.devs:
            with contextlib.suppress(OSError):
                d.close()
        self.devs = []


def _open_dev(path: str, writable: bool) -> DirectDev:
    try:
        return DirectDev(path, writable=writable)
    except DeviceError:
        raise
    except OSError as e:
        raise DeviceError(f"cannot open {path}: {e.strerror}") from e


def _wired(loc: Located) -> Located:
    """Tell the record where it was found (the device holding its area: the data disk for tail and file, the
    record disk for external; the data disk; the placement), and let it read the data disk's file-system markers
    (v2): the superblocks at the start of the data area, read raw (O_DIRECT) through the already open data disk
    (tail, file) or a read-only open (external)."""
    dev = loc.devs[0] if loc.spec.placement in ("tail", "file") and loc.devs else None
    disk = loc.disk
    loc.record.device = loc.spec.record_disk if loc.spec.placement == "external" else disk
    loc.record.disk = disk
    loc.record.spec = str(loc.spec)

    def probe() -> tuple[int, bytes]:
        if dev is not None:
            return parse_fs_markers(dev.pread(0, FS_PROBE_BYTES))
        d = _open_dev(disk, False)
        try:
            return parse_fs_markers(d.pread(0, FS_PROBE_BYTES))
        finally:
            d.close()

    loc.record.fs_probe = probe
    return loc


def locate(disk: str, spec: RecordSpec | str | None = None, *, writable: bool = True) -> Located:
    """Find and load the record of ``disk``. Without a spec: the tail anchor, then a file record in ext4/xfs.
    A record on a record disk needs ``external:RECORD_DISK``. Raises RecordNotFound with what was tried."""
    return _wired(_locate(disk, spec, writable=writable))


def _locate(disk: str, spec: RecordSpec | str | None = None, *, writable: bool = True) -> Located:
    if isinstance(spec, str) or spec is None:
        spec = RecordSpec.parse(spec) if isinstance(spec, str) else None
    if not os.path.exists(disk):
        raise DeviceError(f"{disk}: no such file or device")
    if spec is not None and spec.placement == "external":
        return _locate_external(disk, spec, writable)
    tried = []
    if spec is None or spec.placement == "tail":
        dev = _open_dev(disk, writable)
        try:
            return _locate_tail(disk, dev)
        except RecordNotFound as e:
            dev.close()
            tried.append(f"tail: {e}")
            if spec is not None:
                raise
        except BaseException:
            dev.close()
            raise
    fs = probe_fs(disk)
    if fs.type in SUPPORTED_FS:
        return _locate_file(disk, fs, writable)
    if spec is not None and spec.placement == "file":
        raise RecordNotFound(f"{disk} has no {'/'.join(SUPPORTED_FS)} file system (blkid says "
                             f"{fs.type or 'nothing'}), so it cannot hold a file record")
    raise RecordNotFound(
        f"no Baton record found on {disk} ({'; '.join(tried) or 'no tail anchor'}; "
        f"file system: {fs.type or 'none'})",
        hint="run `baton init DISK`, or pass --record external:RECORD_DISK if its record is on a record disk",
    )


def _read_anchors(dev: BlockDev, size: int) -> Picked[Anchor]:
    """The tail anchors at the end of a ``size``-byte device (written once: the first valid copy)."""
    raw = dev.pread(size - ANCHOR_BLOCKS * BLOCK, ANCHOR_BLOCKS * BLOCK)
    return pick_newest(split_blocks(raw, ANCHOR_BLOCKS, BLOCK),
                       lambda copy, b: Anchor.unpack(b, copy=copy, disk_size=size))


def _read_extmap(bdev: BlockDev) -> Picked[tuple[str, tuple[Extent, ...]]]:
    """(disk UUID, extents) of the record file's extent map (written once: the first valid copy)."""
    raw = bdev.pread(EXTMAP_START * BLOCK, 2 * BLOCK)
    return pick_newest(split_blocks(raw, 2, BLOCK), lambda copy, b: unpack_extmap(b, copy=copy))


def _locate_tail(disk: str, dev: DirectDev) -> Located:
    size = dev.size
    if size < (ANCHOR_BLOCKS + 1) * BLOCK:
        raise RecordNotFound("the disk is smaller than a tail anchor")
    got = _read_anchors(dev, size)
    anchor = got.best
    if anchor is None:
        errs = got.problems
        if got.all_foreign:
            raise RecordNotFound("no tail anchor at the end of the disk")
        if any(isinstance(e, OtherDiskSize) for e in errs):
            # Intact anchors of a disk of another size: a copied (or resized) disk, not damage.
            raise WrongDisk(f"the tail record at the end of {disk} belongs to another disk: "
                            + "; ".join(str(e) for e in errs),
                            hint="check the disk path; a copy of another Baton disk needs its own record "
                            "(`baton init --force DISK`; the next backup is full)")
        raise RecordCorrupt("both tail anchors are damaged: " + "; ".join(str(e) for e in errs),
                            hint="reset the record with `baton init --reset --record tail DISK`")
    area = SubDev(dev, anchor.record_offset, anchor.record_size)
    rec = Record.load(area, record_offset=anchor.record_offset)
    h = rec.header
    if h.placement != PLACEMENT_TAIL or h.disk_uuid != anchor.disk_uuid:
        raise WrongDisk(f"the tail record on {disk} belongs to disk {h.disk_uuid}, its anchor names "
                        f"{anchor.disk_uuid}")
    if h.disk_size != size:
        raise WrongDisk(f"the record on {disk} was made for a {h.disk_size}-byte disk; this one has {size} bytes",
                        hint="resizing a disk with a tail record is not supported; re-initialise it")
    return Located(disk, rec, RecordSpec("tail"), h.data_size, [dev])


def _fs_block_map(disk: str, fs: FsInfo, blocks: int) -> list[int]:
    """Physical byte offsets of the record file's first ``blocks`` 4 KiB blocks, from the file system's own
    offline tool (nothing is mounted)."""
    out: list[int] = []
    if fs.type == "ext4":
        r = subprocess.run(["debugfs", "-R", "stats", disk], capture_output=True, text=True, timeout=60)
        m = re.search(r"Block size:\s+(\d+)", r.stdout)
        if not m:
            raise RecordNotFound(f"debugfs could not read the ext4 on {disk}: {r.stderr.strip()[:200]}")
        bs = int(m.group(1))
        for i in range(blocks):
            byte = i * BLOCK
            r = subprocess.run(["debugfs", "-R", f"bmap /.baton/record {byte // bs}", disk],
                               capture_output=True, text=True, timeout=60)
            s = r.stdout.strip()
            if r.returncode != 0 or not s.isdigit() or int(s) == 0:
                raise RecordNotFound(f"no /.baton/record in the ext4 on {disk}")
            out.append(int(s) * bs + byte % bs)
        return out
    # xfs: bmap of the file (in file-system blocks), then convert each to a byte address
    r = subprocess.run(["xfs_db", "-r", "-c", "sb 0", "-c", "print blocksize", disk],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"blocksize = (\d+)", r.stdout)
    if not m:
        raise RecordNotFound(f"xfs_db could not read the xfs on {disk}: {r.stderr.strip()[:200]}")
    bs = int(m.group(1))
    r = subprocess.run(["xfs_db", "-r", "-c", "path /.baton/record", "-c", "bmap", disk],
                       capture_output=True, text=True, timeout=60)
    ext = [(int(a), int(b), int(c)) for a, b, c in
           re.findall(r"data offset (\d+) startblock (\d+) \(\d+/\d+\) count (\d+)", r.stdout)]
    if not ext:
        raise RecordNotFound(f"no /.baton/record in the xfs on {disk}")
    for i in range(blocks):
        fsb = i * BLOCK // bs
        hit = next(((off, sb) for off, sb, cnt in ext if off <= fsb < off + cnt), None)
        if hit is None:
            raise RecordCorrupt(f"/.baton/record on {disk} does not map block {i}")
        r = subprocess.run(["xfs_db", "-r", "-c", f"convert fsblock {hit[1] + fsb - hit[0]} byte", disk],
                           capture_output=True, text=True, timeout=60)
        mm = re.search(r"\((\d+)\)", r.stdout)
        if not mm:
            raise RecordCorrupt(f"xfs_db could not convert a block address on {disk}")
        out.append(int(mm.group(1)) + (i * BLOCK) % bs)
    return out


def _locate_file(disk: str, fs: FsInfo, writable: bool) -> Located:
    phys = _fs_block_map(disk, fs, EXTMAP_START + 2)
    dev = _open_dev(disk, writable)
    try:
        boot = tuple(Extent(i * BLOCK, p, BLOCK) for i, p in enumerate(phys))
        bdev = ExtentDev(dev, boot)
        got = _read_extmap(bdev)
        if got.best is None:
            raise RecordCorrupt(f"the record file's extent map on {disk} is unreadable: {got.describe()}",
                                hint="re-create it with `baton init --reset --record file DISK`")
        _, ext = got.best
        area = ExtentDev(dev, ext)
        rec = Record.load(area, record_offset=phys[0])
        h = rec.header
        if h.placement != PLACEMENT_FILE or h.extents_crc != extents_crc(ext) or h.nextents != len(ext):
            raise RecordCorrupt(f"the record file on {disk} does not match its own extent map")
        if h.fs_uuid != fs.uuid:
            raise WrongDisk(f"the record file on {disk} was made for file system {h.fs_uuid}, "
                            f"this disk's file system is {fs.uuid}")
        if h.disk_size != dev.size:
            raise WrongDisk(f"the record on {disk} was made for a {h.disk_size}-byte disk; this one has "
                            f"{dev.size} bytes")
        return Located(disk, rec, RecordSpec("file"), h.data_size, [dev])
    except BaseException:
        dev.close()
        raise


def _read_rdisk(dev: BlockDev, path: str) -> RecordDiskSuper:
    got = pick_newest(split_blocks(dev.pread(0, 2 * BLOCK), 2, BLOCK),
                      lambda copy, b: RecordDiskSuper.unpack(b, copy=copy), seq=lambda s: s.seq)
    if got.best is None:
        if got.all_foreign:
            raise RecordNotFound(f"{path} is not a Baton record disk",
                                 hint=f"format it with `baton init {path} --record-disk --slots N`")
        raise RecordCorrupt(f"both superblocks of record disk {path} are damaged: {got.describe()}")
    return got.best


def _write_rdisk(dev: BlockDev, cur: RecordDiskSuper, slots: tuple[RecordDiskSlot, ...]) -> RecordDiskSuper:
    copy = 1 - cur.copy
    new = replace(cur, slots=slots, seq=cur.seq + 1, copy=copy)
    dev.pwrite(copy * BLOCK, new.pack())
    dev.sync()
    return new


def _identity_matches(slot: RecordDiskSlot, size: int, fs: FsInfo, hw: str) -> str:
    """'' if the data disk matches the slot's identity, else what differs."""
    if slot.disk_size != size:
        return f"size {size} (slot has {slot.disk_size})"
    if slot.fs_uuid and fs.uuid and slot.fs_uuid != fs.uuid:
        return f"file-system UUID {fs.uuid} (slot has {slot.fs_uuid})"
    if slot.hw_id and hw and slot.hw_id != hw:
        return f"serial/WWN {hw!r} (slot has {slot.hw_id!r})"
    return ""


def _locate_external(disk: str, spec: RecordSpec, writable: bool) -> Located:
    size = device_size(disk)
    fs = probe_fs(disk)
    hw = hw_id(disk)
    rdev = _open_dev(spec.record_disk, writable)
    try:
        sup = _read_rdisk(rdev, spec.record_disk)
        if spec.slot is not None:
            if not 0 <= spec.slot < len(sup.slots):
                raise UsageError(f"record disk {spec.record_disk} has slots 0..{len(sup.slots) - 1}")
            idx = spec.slot
            sl = sup.slots[idx]
            if not sl.in_use:
                raise RecordNotFound(f"slot {idx} of {spec.record_disk} is free (no record)")
            diff = _identity_matches(sl, size, fs, hw)
            if diff:
                raise WrongDisk(f"slot {idx} of {spec.record_disk} belongs to another disk: {disk} has {diff}",
                                hint="check the disk path and slot number")
        else:
            matches = [i for i, sl in enumerate(sup.slots) if sl.in_use and not _identity_matches(sl, size, fs, hw)]
            if not matches:
                raise RecordNotFound(f"no slot on record disk {spec.record_disk} holds a record for {disk}",
                                     hint=f"initialise it with `baton init {disk} --record external:"
                                     f"{spec.record_disk}`")
            if len(matches) > 1:
                raise UsageError(f"several slots of {spec.record_disk} match {disk} ({matches}); "
                                 f"name one with external:{spec.record_disk}#SLOT")
            idx = matches[0]
        base = RDISK_DATA_START + idx * sup.slot_size
        area = SubDev(rdev, base, sup.slot_size)
        rec = Record.load(area, record_offset=base)
        h = rec.header
        if h.disk_uuid != sup.slots[idx].disk_uuid or h.placement != PLACEMENT_EXTERNAL:
            raise WrongDisk(f"slot {idx} of {spec.record_disk} holds a record of disk {h.disk_uuid}, "
                            f"its table says {sup.slots[idx].disk_uuid}")
        return Located(disk, rec, RecordSpec("external", spec.record_disk, idx), h.data_size, [rdev])
    except BaseException:
        rdev.close()
        raise


def has_tail_record(path: str) -> bool:
    """True if ``path`` ends with a valid Baton tail anchor (so its end holds a record that must survive)."""
    try:
        size = device_size(path)
        if size < ANCHOR_BLOCKS * BLOCK:
            return False
        with open(path, "rb") as f:
            f.seek(size - ANCHOR_BLOCKS * BLOCK)
            raw = f.read(ANCHOR_BLOCKS * BLOCK)
    except (OSError, DeviceError):
        return False
    if len(raw) < ANCHOR_BLOCKS * BLOCK:
        return False
    got = pick_newest(split_blocks(raw, ANCHOR_BLOCKS, BLOCK),
                      lambda copy, b: Anchor.unpack(b, copy=copy, disk_size=size))
    return got.best is not None


# ------------------------------------------------------------------------------------------------ init


def init_record_disk(path: str, *, slots: int, slot_size: int = DEFAULT_RDISK_SLOT_SIZE,
                     force: bool = False) -> dict[str, Any]:
    """Format a record disk with ``slots`` empty slots of ``slot_size`` bytes."""
    if not 1 <= slots <= RDISK_MAX_SLOTS:
        raise UsageError(f"--slots must be 1..{RDISK_MAX_SLOTS}")
    if slot_size % BLOCK or slot_size < 1 << 20:
        raise UsageError("--slot-size must be a multiple of 4K and at least 1M")
    host.check_not_in_use(path, "init")
    size = device_size(path)
    need = RDISK_DATA_START + slots * slot_size
    if size < need:
        raise DeviceError(f"{path} has {size} bytes; {slots} slots of {slot_size} need {need}",
                          hint="use fewer --slots or a smaller --slot-size")
    dev = _open_dev(path, True)
    try:
        if not force:
            with contextlib.suppress(RecordError):
                _read_rdisk(dev, path)
                raise DeviceError(f"{path} is already a Baton record disk", hint="pass --force to re-format it "
                                  "(every record on it is lost; the next backups of those disks are full)")
        sup = RecordDiskSuper(rdisk_uuid=str(uuid.uuid4()), slot_size=slot_size,
                              slots=tuple(RecordDiskSlot() for _ in range(slots)))
        for copy in (0, 1):
            dev.pwrite(copy * BLOCK, replace(sup, copy=copy, seq=copy).pack())
        dev.sync()
        return {"record_disk": path, "uuid": sup.rdisk_uuid, "slots": slots, "slot_size": slot_size}
    finally:
        dev.close()


def _geometry_or_fail(data_size: int, chunk: int, lay: _Layout) -> Any:
    geo = geometry_for(data_size, chunk, lay.nslots, lay.nrepos)
    if geo.pages_per_slot > max_pages_per_slot(lay.version):
        raise DeviceError(f"a {data_size}-byte disk at {chunk}-byte chunks needs more bitmap pages than a record "
                          "slot can map", hint="use a larger --chunk-size")
    return geo


def init_disk(disk: str, *, record: str | None = None, chunk_size: int = DEFAULT_CHUNK,
              nslots: int = DEFAULT_SLOTS, force: bool = False, reset: bool = False, nrepos: int = DEFAULT_REPOS,
              version: int | None = None) -> Located:
    """Create (or with ``reset``, re-create in place with a new lineage) the record of ``disk``.

    Default placement: ``file`` when blkid finds ext4/xfs, ``tail`` when it finds nothing. Any other file
    system is refused (the tail would overwrite its end). Refuses a disk in use, or one that already has a
    record unless ``force``/``reset``. The data area of a file or external placement is never written.

    ``version`` None writes format v3 (with its era region for the dm frontend), except where a tail record
    already ends the disk: a re-init never moves the data area's end, so it keeps the existing tail area and
    writes the newest format that fits there (a v2 tail record stays v2). An explicit version must fit.
    """
    check_chunk_size(chunk_size)
    if not 2 <= nslots <= 64:
        raise UsageError("--slots must be 2..64")
    if version is not None and version not in SUPPORTED_VERSIONS:
        raise UsageError(f"record format version {version}: this Baton writes versions "
                         f"{SUPPORTED_VERSIONS.start}..{SUPPORTED_VERSIONS.stop - 1}")
    if version == 1:
        nrepos = 0
    elif not 1 <= nrepos <= 64:
        raise UsageError("--repos must be 1..64")
    if not os.path.exists(disk):
        raise DeviceError(f"{disk}: no such file or device")
    host.check_not_in_use(disk, "init")
    spec = RecordSpec.parse(record)
    fs = probe_fs(disk)
    if spec is None:
        if fs.type in SUPPORTED_FS:
            spec = RecordSpec("file")
        elif fs.type:
            raise DeviceError(
                f"{disk} holds a {fs.type} file system; Baton keeps file records only in "
                f"{' or '.join(SUPPORTED_FS)}",
                hint="use --record external:RECORD_DISK (nothing on the disk is touched), or --record tail if "
                "the end of the disk is free",
            )
        else:
            spec = RecordSpec("tail")
    old: Located | None = None
    try:
        old = locate(disk, spec, writable=False)
    except RecordError as e:
        if isinstance(e, RecordNotFound):
            old = None
        elif not reset:
            raise
    if old is not None:
        old_uuid = old.header.disk_uuid
        old.close()
        if not (force or reset):
            raise DeviceError(f"{disk} already has a Baton record ({old.spec}, disk {old_uuid})",
                              hint="pass --reset to start a new lineage in place (the next backup is full), or "
                              "--force to re-create it")
    if force:
        disk_uuid = str(uuid.uuid4())
    elif old is not None:
        disk_uuid = old.header.disk_uuid
    else:
        # --reset of a record whose header is unreadable: keep the identity the other structures still hold
        # (tail anchors, the file's extent map, the record-disk slot table), so the disk's snapshots stay one
        # disk. A new id is minted only when none of them names one.
        disk_uuid = surviving_disk_uuid(disk, spec, fs) or str(uuid.uuid4())
    flags = FLAG_RESET if (reset or force) else 0
    lay = _Layout(nslots, nrepos, version or FORMAT_VERSION, explicit=version is not None)
    if spec.placement == "tail":
        loc = _init_tail(disk, fs, spec, chunk_size, lay, disk_uuid, flags, force)
    elif spec.placement == "file":
        loc = _init_file(disk, fs, chunk_size, lay, disk_uuid, flags)
    else:
        loc = _init_external(disk, fs, spec, chunk_size, lay, disk_uuid, flags, force or reset)
    # The file system's markers as init leaves them (file placement: after fileprep's mount), so the first
    # attach can tell whether the disk was written while nobody tracked it.
    _wired(loc).record.save_markers()
    return loc


@dataclass(frozen=True)
class _Layout:
    nslots: int
    nrepos: int
    version: int
    explicit: bool = True  # the version was asked for (False: the default, v3)

    def at(self, version: int) -> _Layout:
        return replace(self, version=version, nrepos=self.nrepos if version >= 2 else 0)


def surviving_disk_uuid(disk: str, spec: RecordSpec, fs: FsInfo) -> str:
    """The disk UUID that the structures around an unreadable record header still hold: a valid tail anchor
    (tail), a valid extent-map copy of ``/.baton/record`` (file), or the matching slot-table entry (external).
    '' when none is readable. Read-only."""
    with contextlib.suppress(RecordError, DeviceError, OSError, subprocess.SubprocessError):
        if spec.placement == "tail":
            dev = _open_dev(disk, False)
            try:
                size = dev.size
                if size >= (ANCHOR_BLOCKS + 1) * BLOCK:
                    a = _read_anchors(dev, size).best
                    if a is not None and a.disk_uuid:
                        return a.disk_uuid
            finally:
                dev.close()
        elif spec.placement == "file" and fs.type in SUPPORTED_FS:
            phys = _fs_block_map(disk, fs, EXTMAP_START + 2)
            dev = _open_dev(disk, False)
            try:
                bdev = ExtentDev(dev, tuple(Extent(i * BLOCK, p, BLOCK) for i, p in enumerate(phys)))
                em = _read_extmap(bdev).best
                if em is not None and em[0]:
                    return em[0]
            finally:
                dev.close()
        elif spec.placement == "external":
            size = device_size(disk)
            hw = hw_id(disk)
            rdev = _open_dev(spec.record_disk, False)
            try:
                sup = _read_rdisk(rdev, spec.record_disk)
                idx = [i for i, sl in enumerate(sup.slots) if sl.in_use and not _identity_matches(sl, size, fs, hw)]
                if spec.slot is not None:
                    idx = [i for i in idx if i == spec.slot]
                if len(idx) == 1 and sup.slots[idx[0]].disk_uuid:
                    return sup.slots[idx[0]].disk_uuid
            finally:
                rdev.close()
    return ""


def _base_header(placement: int, *, chunk: int, lay: _Layout, disk_uuid: str, fs: FsInfo, disk_size: int,
                 data_size: int, rec_off: int, rec_size: int, pps: int, flags: int, hw: str = "",
                 era: tuple[int, int] = (0, 0)) -> RecordHeader:
    return RecordHeader(placement=placement, nslots=lay.nslots, chunk_size=chunk, disk_uuid=disk_uuid, lineage="",
                        disk_size=disk_size, data_size=data_size, record_offset=rec_off, record_size=rec_size,
                        pages_per_slot=pps, fs_uuid=fs.uuid, flags=flags, hw_id=hw, version=lay.version,
                        nrepos=lay.nrepos, era_offset=era[0], era_size=era[1])


def _era_in(area_size: int, geo: Geometry, data_size: int, chunk: int) -> tuple[int, int] | None:
    """(offset, size) of the era region at the end of an ``area_size``-byte record area (1 MiB aligned, at
    least era_region_size, up to the area's end), or None if it does not fit after the structures."""
    off = era_offset_at_end(area_size, geo.size, era_region_size(data_size, chunk))
    return None if off is None else (off, area_size - off)


def tail_layout(size: int, chunk: int, lay: _Layout) -> tuple[int, int, Geometry, tuple[int, int]]:
    """(data_size, record_size, geometry, (era_offset, era_size)) of a fresh tail record on a ``size``-byte
    disk. v3: the era region is sized for the whole disk (an upper bound of the data area) and the data area
    ends on a multiple of 1 MiB (and of the chunk size), so the record area and its era region start 1 MiB
    aligned on the disk. v1/v2: as before v3 (the data area ends on a chunk; no era region)."""
    geo = _geometry_or_fail(size, chunk, lay)
    avail = size - ANCHOR_BLOCKS * BLOCK
    if lay.version < 3:
        data_size = (avail - geo.size) // chunk * chunk
        return data_size, avail - data_size, geo, (0, 0)
    align = max(chunk, ERA_ALIGN)
    data_size = (avail - area_for_era(geo.size, era_region_size(size, chunk))) // align * align
    rec_size = avail - data_size
    era = _era_in(rec_size, geo, size, chunk) if data_size > 0 else None
    return data_size, rec_size, geo, era or (0, 0)


def _init_tail(disk: str, fs: FsInfo, spec: RecordSpec, chunk: int, lay: _Layout, disk_uuid: str, flags: int,
               force: bool) -> Located:
    if fs.type and not force:
        raise DeviceError(f"{disk} holds a {fs.type} file system; a tail record would overwrite its end",
                          hint="use --record file (ext4/xfs) or --record external:RECORD_DISK; --force overrides")
    size = device_size(disk)
    dev = _open_dev(disk, True)
    try:
        anchor = _read_anchors(dev, size).best if size >= (ANCHOR_BLOCKS + 1) * BLOCK else None
        if anchor is not None and anchor.record_offset % chunk == 0 and anchor.record_offset > 0 and \
                anchor.record_offset + anchor.record_size + ANCHOR_BLOCKS * BLOCK == size:
            # A tail record ends this disk already (--reset, --force): the data area before it is in use, so
            # the new record goes into the same area, in the newest format that fits there.
            data_size, rec_size = anchor.record_offset, anchor.record_size
            lay, geo, era = _fit_tail_area(disk, data_size, rec_size, chunk, lay)
        else:
            data_size, rec_size, geo, era = tail_layout(size, chunk, lay)
            if data_size < max(chunk, 1 << 20) or (lay.version >= 3 and not era[1]):
                need = size - ANCHOR_BLOCKS * BLOCK - max(data_size, 0)
                raise DeviceError(
                    f"{disk} has {size} bytes: too small for a tail record of {need} bytes plus data",
                    hint="use a larger disk, a larger --chunk-size, or --record external:RECORD_DISK"
                    + ("; --record-format 2 needs no era region (no dm frontend)" if lay.version >= 3 else ""))
        area = SubDev(dev, data_size, rec_size)
        hdr = _base_header(PLACEMENT_TAIL, chunk=chunk, lay=lay, disk_uuid=disk_uuid, fs=fs, disk_size=size,
                           data_size=data_size, rec_off=data_size, rec_size=rec_size, pps=geo.pages_per_slot,
                           flags=flags, era=era)
        rec = format_record(area, hdr)
        for copy in range(ANCHOR_BLOCKS):
            a = Anchor(disk_uuid=disk_uuid, disk_size=size, record_offset=data_size, record_size=rec_size, copy=copy)
            dev.pwrite(size - (ANCHOR_BLOCKS - copy) * BLOCK, a.pack())
        dev.sync()
        return Located(disk, rec, spec, data_size, [dev])
    except BaseException:
        dev.close()
        raise


def _fit_tail_area(disk: str, data_size: int, rec_size: int, chunk: int,
                   lay: _Layout) -> tuple[_Layout, Geometry, tuple[int, int]]:
    """The layout of a record re-created in an existing tail area: the asked version, or (the default) the
    newest that fits. DeviceError when nothing fits (the data area is never shrunk)."""
    versions = [lay.version] if lay.explicit else list(range(lay.version, 0, -1))
    for v in versions:
        lv = lay.at(v)
        geo = geometry_for(data_size, chunk, lv.nslots, lv.nrepos)
        if geo.pages_per_slot > max_pages_per_slot(v) or geo.size > rec_size:
            continue
        if v < 3:
            return lv, geo, (0, 0)
        era = _era_in(rec_size, geo, data_size, chunk)
        if era is not None:
            return lv, geo, era
    raise DeviceError(
        f"the tail record area of {disk} ({rec_size} bytes after a {data_size}-byte data area) has no room for a "
        f"format-v{lay.version} record at {chunk}-byte chunks, and re-creating it never shrinks the data area",
        hint="keep the record's format and chunk size (`baton init --reset` without --record-format or "
        "--chunk-size), or use --record external:RECORD_DISK")


def _init_file(disk: str, fs: FsInfo, chunk: int, lay: _Layout, disk_uuid: str, flags: int) -> Located:
    if fs.type not in SUPPORTED_FS:
        raise DeviceError(
            f"{disk}: file placement needs ext4 or xfs, blkid found {fs.type or 'no file system'}",
            hint="use --record tail (raw disks) or --record external:RECORD_DISK",
        )
    size = device_size(disk)
    geo = _geometry_or_fail(size, chunk, lay)
    # The record file: its structures rounded up to 1 MiB, then (v3) the era region, which ends the file.
    era = (area_for_era(geo.size, 0), era_region_size(size, chunk)) if lay.version >= 3 else (0, 0)
    rec_size = area_for_era(geo.size, era[1])
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "baton.record.fileprep", disk,
         str(rec_size)], capture_output=True, text=True, timeout=600,
    )
    if r.returncode != 0:
        raise DeviceError(f"cannot create the record file in the {fs.type} on {disk}: {r.stderr.strip()}",
                          hint="check the file system mounts and has room (or fsck it); or use "
                          "--record external:RECORD_DISK")
    raw = json.loads(r.stdout)["extents"]
    ext = tuple(Extent(lo, ph, ln) for lo, ph, ln in raw)
    if any(e.physical % BLOCK or e.length % BLOCK or e.logical % BLOCK for e in ext):
        # Record blocks must be whole 4 KiB device blocks: a record write must never share a 4 KiB block
        # (read-modify-write) with file-system data the tracker writes at the same time.
        raise DeviceError(f"the {fs.type} on {disk} uses blocks smaller than 4 KiB, so its record file is not "
                          "4 KiB-aligned on the disk", hint="use --record tail or external:RECORD_DISK, or make "
                          "the file system with 4 KiB blocks (mkfs.ext4 -b 4096)")
    if len(ext) > EXTMAP_MAX:
        raise DeviceError(f"the record file is split into {len(ext)} extents (at most {EXTMAP_MAX} are supported)",
                          hint="defragment the file system or use --record external:RECORD_DISK")
    dev = _open_dev(disk, True)
    try:
        area = ExtentDev(dev, ext)
        hdr = _base_header(PLACEMENT_FILE, chunk=chunk, lay=lay, disk_uuid=disk_uuid, fs=fs, disk_size=size,
                           data_size=size, rec_off=ext[0].physical, rec_size=rec_size, pps=geo.pages_per_slot,
                           flags=flags, era=era)
        hdr = replace(hdr, nextents=len(ext), extents_crc=extents_crc(ext))
        for copy in (0, 1):
            area.pwrite((EXTMAP_START + copy) * BLOCK, pack_extmap(ext, copy=copy, disk_uuid=disk_uuid))
        rec = format_record(area, hdr)
        return Located(disk, rec, RecordSpec("file"), size, [dev])
    except BaseException:
        dev.close()
        raise


def _init_external(disk: str, fs: FsInfo, spec: RecordSpec, chunk: int, lay: _Layout, disk_uuid: str, flags: int,
                   replace_existing: bool) -> Located:
    size = device_size(disk)
    hw = hw_id(disk)
    rdev = _open_dev(spec.record_disk, True)
    try:
        sup = _read_rdisk(rdev, spec.record_disk)
        idx = spec.slot
        mine = [i for i, sl in enumerate(sup.slots) if sl.in_use and not _identity_matches(sl, size, fs, hw)]
        if idx is None:
            if mine and replace_existing:
                idx = mine[0]
            else:
                free = [i for i, sl in enumerate(sup.slots) if not sl.in_use]
                if not free:
                    raise RecordFull(f"record disk {spec.record_disk} has no free slot (all {len(sup.slots)} used)",
                                     hint="free one by re-initialising a retired disk's slot with #SLOT --force, "
                                     "or format another record disk")
                idx = free[0]
        elif not 0 <= idx < len(sup.slots):
            raise UsageError(f"record disk {spec.record_disk} has slots 0..{len(sup.slots) - 1}")
        elif sup.slots[idx].in_use and not replace_existing:
            raise DeviceError(f"slot {idx} of {spec.record_disk} is in use", hint="pass --force to overwrite it")
        geo = _geometry_or_fail(size, chunk, lay)
        era = _era_in(sup.slot_size, geo, size, chunk) if lay.version >= 3 else (0, 0)
        need = area_for_era(geo.size, era_region_size(size, chunk)) if lay.version >= 3 else geo.size
        if need > sup.slot_size or era is None:
            raise RecordFull(
                f"a format-v{lay.version} record for {disk} needs {need} bytes"
                + (" with its era region" if lay.version >= 3 else "")
                + f"; slots of {spec.record_disk} have {sup.slot_size}",
                hint=f"use a record disk with slots of at least {-(-need // ERA_ALIGN)}M (`baton init RDISK "
                f"--record-disk --slot-size {-(-need // ERA_ALIGN)}M`), or a larger --chunk-size"
                + ("; --record-format 2 needs no era region (no dm frontend)" if lay.version >= 3 else ""))
        slots = list(sup.slots)
        slots[idx] = RecordDiskSlot(True, disk_uuid, size, fs.uuid, hw)
        # The slot's record is formatted before the table names it: a crash in between leaves a free slot.
        base = RDISK_DATA_START + idx * sup.slot_size
        area = SubDev(rdev, base, sup.slot_size)
        hdr = _base_header(PLACEMENT_EXTERNAL, chunk=chunk, lay=lay, disk_uuid=disk_uuid, fs=fs,
                           disk_size=size, data_size=size, rec_off=base, rec_size=sup.slot_size,
                           pps=geo.pages_per_slot, flags=flags, hw=hw, era=era)
        rec = format_record(area, hdr)
        _write_rdisk(rdev, sup, tuple(slots))
        return Located(disk, rec, RecordSpec("external", spec.record_disk, idx), size, [rdev])
    except BaseException:
        rdev.close()
        raise


def upgrade_disk(disk: str, *, record: str | None = None) -> tuple[Located, bool]:
    """``baton init --upgrade``: give the v2 record of ``disk`` an era region in place (format v3), keeping its
    lineage, history and changed chunks. Returns the record and whether it changed (False: it had a region
    already). Refuses a disk in use on this node; run it where no node has the disk attached. RecordError (with
    what to run instead) when the record area has no room."""
    if not os.path.exists(disk):
        raise DeviceError(f"{disk}: no such file or device")
    host.check_not_in_use(disk, "init --upgrade")
    loc = locate(disk, record, writable=True)
    try:
        had = loc.record.era_region() is not None
        upgrade_for_era(loc.record)
    except BaseException:
        loc.close()
        raise
    return loc, not had


def describe(loc: Located) -> dict[str, Any]:
    """Offline status of a located record (``baton status DISK --json``)."""
    st = loc.record.status()
    st = {"disk": loc.disk, "record": str(loc.spec)} | st
    st["placement"] = PLACEMENT_NAMES[loc.header.placement]
    return st
