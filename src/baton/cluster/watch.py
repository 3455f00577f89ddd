"""Ownership signals for watch mode: the probe write, and which mount/udev events concern a shared disk.

The probe (:func:`probe`) reads block ``EXTMAP_START`` (block 2) of a disk's record area with ``O_DIRECT`` and
writes the identical bytes back, then ``fdatasync``. That block is written once by ``baton init`` (the extent
map of a file placement, zeros otherwise) and never again, so rewriting it cannot disturb an owner, whoever it
is. Before writing, the probe re-reads the record header copies next to it and checks that the area still
holds the same disk's record at the same place; otherwise it writes nothing (a re-initialised disk may have
moved its record, and the old block could now be live data).

What a successful probe proves: at that moment this node's path to the storage accepted a write to the
record area and made it durable: the device is present, writable, not read-only (a DRBD secondary, a
read-only LUN mapping) and no other initiator holds a SCSI-3 persistent reservation that excludes us.
What it cannot prove: that no other node can write too. A LUN without reservations, or an image file shared by
several "nodes" on one host, accepts writes from everyone, so there the probe cannot tell owners apart. A
failed probe proves only that this node cannot write *now* (it may be a transient path failure). Fencing and
the cluster manager stay authoritative; watch mode is an opt-in for storage that enforces exclusivity itself.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Any

from baton.device import DirectDev, SubDev
from baton.errors import BatonError, DeviceError, RecordError
from baton.format.record import BLOCK, EXTMAP_START, FormatError, RecordHeader
from baton.host.mounts import parse_mountinfo
from baton.record.area import ExtentDev
from baton.record.placement import locate

# Probe outcomes.
OWNER = "owner"  # the write and fdatasync succeeded
REFUSED = "refused"  # the device is there but refused the write (EACCES, EROFS, EIO, reservation conflict...)
ABSENT = "absent"  # the device (or the record disk) is not there
UNKNOWN = "unknown"  # no usable record: nothing was written (record missing, moved, unreadable header)

# errno values that mean "the device is not there" rather than "it is there and not ours".
_GONE = {errno.ENOENT, errno.ENXIO, errno.ENODEV, errno.ENOMEDIUM}


@dataclass(frozen=True)
class ProbeTarget:
    """Where a disk's probe block is, found once by :func:`find_target` (locating a file record runs the file
    system's offline tools, too slow for every probe)."""

    disk: str  # the data disk as given
    path: str  # the device holding the record area (the data disk, or the record disk for external)
    offset: int  # byte offset of record block EXTMAP_START on ``path`` (its 4 KiB are contiguous there)
    header_offsets: tuple[int, ...]  # byte offsets of the header copies whose 4 KiB are contiguous on ``path``
    disk_uuid: str  # the record's disk identity
    record_offset: int  # the header's own record_offset (checked before each write)
    placement: str  # tail | file | external


@dataclass(frozen=True)
class ProbeResult:
    """One probe. ``errno`` and ``detail`` say why a probe was not OWNER."""

    outcome: str  # OWNER | REFUSED | ABSENT | UNKNOWN
    errno: int = 0
    detail: str = ""


def _physical(area: Any, logical: int) -> tuple[str, int]:
    """The (device path, byte offset) behind ``logical`` in a record area made of SubDev/ExtentDev/DirectDev."""
    if isinstance(area, SubDev):
        return _physical(area.dev, area.base + logical)
    if isinstance(area, ExtentDev):
        for e in area.extents:
            if e.logical <= logical < e.logical + e.length:
                return _physical(area.dev, e.physical + logical - e.logical)
        raise RecordError(f"record block at logical byte {logical} is not mapped")
    if isinstance(area, DirectDev):
        return area.path, logical
    raise RecordError(f"cannot map a record area of type {type(area).__name__} to a device")


def _block_at(area: Any, block: int) -> tuple[str, int] | None:
    """(path, offset) of record block ``block`` when its 4 KiB are contiguous on one device, else None (a file
    record in a file system with 1 KiB blocks may split a record block)."""
    path, start = _physical(area, block * BLOCK)
    path2, last = _physical(area, block * BLOCK + BLOCK - 1)
    return (path, start) if path2 == path and last == start + BLOCK - 1 else None


def find_target(disk: str, record: str | None = None) -> ProbeTarget:
    """Locate ``disk``'s record read-only and return where its probe block is.

    Raises DeviceError when the disk cannot be opened (absent, unreadable) and RecordError when it has no
    usable record or its probe block is split on disk; nothing is written either way.
    """
    loc = locate(disk, record, writable=False)
    try:
        area = loc.record.area
        blk = _block_at(area, EXTMAP_START)
        if blk is None:
            raise RecordError(f"block {EXTMAP_START} of the record of {disk} is split on disk; cannot probe it")
        path, off = blk
        headers = tuple(h[1] for h in (_block_at(area, 0), _block_at(area, 1)) if h is not None and h[0] == path)
        if not headers:
            raise RecordError(f"the record headers of {disk} are not on {path} in one piece; cannot probe")
        h = loc.header
        return ProbeTarget(disk=disk, path=path, offset=off, header_offsets=headers, disk_uuid=h.disk_uuid,
                           record_offset=h.record_offset, placement=str(loc.spec).split(":", 1)[0])
    finally:
        loc.close()


class _ProbeIO:
    """Exactly-ranged I/O on the probe device: ``O_DIRECT`` at the device's own alignment (512-byte sectors
    usually), into a page-aligned buffer, so only the record's own 4 KiB are ever read and written. No
    read-modify-write of neighbouring bytes, which an owner may be changing at that moment. Falls back to
    buffered I/O only for regular files on file systems without O_DIRECT (tmpfs): buffered writes to a file
    change only the bytes written."""

    def __init__(self, path: str) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags | os.O_DIRECT)
            self.direct = True
        except OSError as e:
            if e.errno != errno.EINVAL or not stat.S_ISREG(os.stat(path).st_mode):
                raise
            self.fd = os.open(path, flags)
            self.direct = False
        self.buf = mmap.mmap(-1, BLOCK)

    def size(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_END)

    def read(self, offset: int) -> bytes:
        n = os.preadv(self.fd, [self.buf], offset)
        if n != BLOCK:
            raise OSError(errno.EIO, f"short read ({n} of {BLOCK} bytes)")
        return bytes(self.buf)

    def write_back(self, offset: int, data: bytes) -> None:
        self.buf[:] = data
        n = os.pwritev(self.fd, [self.buf], offset)
        if n != BLOCK:
            raise OSError(errno.EIO, f"short write ({n} of {BLOCK} bytes)")
        os.fdatasync(self.fd)

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


def _header_matches(io: _ProbeIO, t: ProbeTarget) -> str:
    """'' when at least one header copy is valid and names the same disk at the same place; else why not."""
    why = []
    for off in t.header_offsets:
        try:
            h = RecordHeader.unpack(io.read(off))
        except FormatError as e:
            why.append(str(e))
            continue
        if h.disk_uuid == t.disk_uuid and h.record_offset == t.record_offset:
            return ""
        why.append(f"a header copy names disk {h.disk_uuid} at {h.record_offset}")
    return "; ".join(why) or "no header copy readable"


def _failed(what: str, e: OSError) -> ProbeResult:
    code = e.errno or 0
    if code == errno.EINVAL:
        # The device needs a larger alignment than the record block has (a 4Kn disk under a 1 KiB-block file
        # system): this node cannot probe it exactly, which says nothing about ownership.
        return ProbeResult(UNKNOWN, code, f"{what} failed: {e.strerror or e} (alignment)")
    return ProbeResult(ABSENT if code in _GONE else REFUSED, code, f"{what} failed: {e.strerror or e}")


def probe(t: ProbeTarget) -> ProbeResult:
    """Read the write-once probe block and write the same bytes back, durably (see the module docstring).

    Never raises for device failures: they are the answer (REFUSED or ABSENT, with the errno). Writes nothing
    and returns UNKNOWN if the record header no longer names the same disk at the same place.
    """
    try:
        st = os.stat(t.path)
    except OSError as e:
        return ProbeResult(ABSENT, e.errno or 0, f"{t.path}: {e.strerror}")
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return ProbeResult(ABSENT, 0, f"{t.path} is not a block device or file")
    try:
        io = _ProbeIO(t.path)
    except OSError as e:
        return _failed(f"opening {t.path} for writing", e)
    try:
        size = io.size()
        if size < max(t.offset, *t.header_offsets) + BLOCK:
            # A detached loop device, a removed medium: the node is there, the disk is not.
            return ProbeResult(ABSENT, 0, f"{t.path} has {size} bytes now, too small to hold the record")
        try:
            why = _header_matches(io, t)
            if why:
                return ProbeResult(UNKNOWN, 0, f"the record of {t.disk} is not where it was: {why}")
            data = io.read(t.offset)
        except OSError as e:
            return _failed("read", e)
        try:
            io.write_back(t.offset, data)
        except OSError as e:
            return _failed("write", e)
        return ProbeResult(OWNER)
    finally:
        with contextlib.suppress(OSError):
            io.close()


def safe_find_target(disk: str, record: str | None = None) -> tuple[ProbeTarget | None, ProbeResult | None]:
    """:func:`find_target` with its failures turned into a probe answer (ABSENT or UNKNOWN)."""
    try:
        return find_target(disk, record), None
    except DeviceError as e:
        code = e.__cause__.errno if isinstance(e.__cause__, OSError) and e.__cause__.errno else 0
        gone = not os.path.exists(disk) or code in _GONE
        return None, ProbeResult(ABSENT if gone else REFUSED, code, str(e))
    except BatonError as e:
        return None, ProbeResult(UNKNOWN, 0, str(e))
    except OSError as e:
        code = e.errno or 0
        return None, ProbeResult(ABSENT if code in _GONE else UNKNOWN, code, f"{disk}: {e.strerror or e}")


# ------------------------------------------------------------------------------------------------ mount/udev events


def device_numbers(path: str) -> tuple[int, int] | None:
    """(major, minor) of a block device, else None (files, absent paths)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def relevant_mounts(disk: str, mountinfo: str) -> frozenset[str]:
    """The lines of a /proc/self/mountinfo text that concern ``disk``: mounts of the device itself (by source
    path or major:minor), and for an image file the mounts of the file system that holds it (the longest
    mount point prefixing its path). A change of this set between two reads is a mount event for the disk."""
    real = os.path.realpath(disk)
    numbers = device_numbers(real)
    image = numbers is None and not real.startswith("/dev/")  # an image file (or a path not there yet)
    mine: set[str] = set()
    holders: list[tuple[int, str]] = []
    for e in parse_mountinfo(mountinfo):
        if e.source == real or (numbers is not None and e.dev == numbers):
            mine.add(e.line)
        elif image and (real == e.mountpoint or real.startswith(e.mountpoint.rstrip("/") + "/")):
            holders.append((len(e.mountpoint), e.line))
    if holders:
        longest = max(n for n, _ in holders)
        mine.update(line for n, line in holders if n == longest)
    return frozenset(mine)


def parse_udev_event(block: str) -> dict[str, str]:
    """KEY=VALUE lines of one ``udevadm monitor --property`` event (the header line is skipped)."""
    out: dict[str, str] = {}
    for line in block.splitlines():
        if "=" in line and not line.startswith(("KERNEL[", "UDEV[")):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def udev_event_concerns(event: dict[str, str], disk: str, numbers: tuple[int, int] | None = None) -> bool:
    """Whether a udev/kernel block event names ``disk``: by major:minor (``numbers``, remembered by the caller
    so that a removed device still matches; looked up when None), by device node, or by one of its /dev links.
    Image files never match (they have no udev events of their own)."""
    real = os.path.realpath(disk)
    numbers = numbers or device_numbers(real)
    if numbers is not None and event.get("MAJOR") == str(numbers[0]) and event.get("MINOR") == str(numbers[1]):
        return True
    name = event.get("DEVNAME", "")
    if name and (name == real or os.path.basename(name) == os.path.basename(real)) and real.startswith("/dev/"):
        return True
    links = event.get("DEVLINKS", "").split()
    return disk in links or real in links
