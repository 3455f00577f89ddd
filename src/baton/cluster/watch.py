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
import os
import stat
from dataclasses import dataclass
from typing import Any

from baton.device import DirectDev, SubDev
from baton.errors import BatonError, DeviceError, RecordError
from baton.format.record import BLOCK, EXTMAP_START, FormatError, RecordHeader
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
    offset: int  # byte offset of record block EXTMAP_START on ``path``
    header_offset: int  # byte offset of record block 0 (header copy 0) on ``path``
    contiguous_header: bool  # header blocks 0 and 1 are adjacent on ``path`` (checked before each write)
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


def find_target(disk: str, record: str | None = None) -> ProbeTarget:
    """Locate ``disk``'s record read-only and return where its probe block is.

    Raises DeviceError when the disk cannot be opened (absent, unreadable) and RecordError when it has no
    usable record; nothing is written either way.
    """
    loc = locate(disk, record, writable=False)
    try:
        area = loc.record.area
        path, off = _physical(area, EXTMAP_START * BLOCK)
        hpath, h0 = _physical(area, 0)
        _, h1 = _physical(area, BLOCK)
        if hpath != path:
            raise RecordError(f"the record area of {disk} spans devices ({hpath}, {path}); cannot probe it")
        if off % BLOCK or h0 % BLOCK:
            # An unaligned block would be written by read-modify-write of its 4 KiB neighbourhood, which is
            # not write-once: refuse rather than risk rewriting bytes an owner may be changing.
            raise RecordError(f"the record's probe block on {path} is not 4 KiB-aligned (byte {off}); "
                              "cannot probe it safely")
        h = loc.header
        return ProbeTarget(disk=disk, path=path, offset=off, header_offset=h0, contiguous_header=h1 == h0 + BLOCK,
                           disk_uuid=h.disk_uuid, record_offset=h.record_offset,
                           placement=str(loc.spec).split(":", 1)[0])
    finally:
        loc.close()


def _header_matches(dev: DirectDev, t: ProbeTarget) -> str:
    """'' when at least one header copy is valid and names the same disk at the same place; else why not."""
    raw = dev.pread(t.header_offset, BLOCK)
    raw1 = dev.pread(t.header_offset + BLOCK, BLOCK) if t.contiguous_header else b""
    why = []
    for copy, block in ((0, raw), (1, raw1)):
        if not block:
            continue
        try:
            h = RecordHeader.unpack(block, copy=copy)
        except FormatError as e:
            why.append(str(e))
            continue
        if h.disk_uuid == t.disk_uuid and h.record_offset == t.record_offset:
            return ""
        why.append(f"header copy {copy} names disk {h.disk_uuid} at {h.record_offset}")
    return "; ".join(why) or "no header copy readable"


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
        dev = DirectDev(t.path, writable=True)
    except DeviceError as e:
        cause = e.__cause__
        code = cause.errno if isinstance(cause, OSError) and cause.errno else 0
        return ProbeResult(ABSENT if code in _GONE else REFUSED, code, str(e))
    try:
        if dev.size < max(t.offset, t.header_offset + 2 * BLOCK):
            # A detached loop device, a removed medium: the node is there, the disk is not.
            return ProbeResult(ABSENT, 0, f"{t.path} has {dev.size} bytes now, too small to hold the record")
        try:
            why = _header_matches(dev, t)
            if why:
                return ProbeResult(UNKNOWN, 0, f"the record of {t.disk} is not where it was: {why}")
            data = dev.pread(t.offset, BLOCK)
        except OSError as e:
            code = e.errno or 0
            return ProbeResult(ABSENT if code in _GONE else REFUSED, code, f"read failed: {e.strerror or e}")
        try:
            dev.pwrite(t.offset, data)
            dev.sync()
        except OSError as e:
            code = e.errno or 0
            return ProbeResult(ABSENT if code in _GONE else REFUSED, code, f"write failed: {e.strerror or e}")
        return ProbeResult(OWNER)
    finally:
        with contextlib.suppress(OSError):
            dev.close()


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


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def relevant_mounts(disk: str, mountinfo: str) -> frozenset[str]:
    """The lines of a /proc/self/mountinfo text that concern ``disk``: mounts of the device itself (by source
    path or major:minor), and for an image file the mounts of the file system that holds it (the longest
    mount point prefixing its path). A change of this set between two reads is a mount event for the disk."""
    real = os.path.realpath(disk)
    numbers = device_numbers(real)
    image = numbers is None and not real.startswith("/dev/")  # an image file (or a path not there yet)
    mine: set[str] = set()
    holders: list[tuple[int, str]] = []
    for line in mountinfo.splitlines():
        parts = line.split()
        if len(parts) < 10 or "-" not in parts:
            continue
        sep = parts.index("-")
        majmin, mnt, source = parts[2], _unescape(parts[4]), _unescape(parts[sep + 2])
        if source == real or (numbers is not None and majmin == f"{numbers[0]}:{numbers[1]}"):
            mine.add(line)
        elif image and (real == mnt or real.startswith(mnt.rstrip("/") + "/")):
            holders.append((len(mnt), line))
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
