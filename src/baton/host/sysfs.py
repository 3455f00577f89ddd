"""What /sys says about block devices: names, partitions, kernel holders, and loop devices' backing files.

Read from /sys only, never through loop ioctls: LOOP_GET_STATUS (what ``losetup --list`` uses) asks the backing
file's file system for its inode, which is a FUSE request that fails or hangs when the FUSE daemon behind a
loop device died or hangs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_SYS_DEV = Path("/sys/dev/block")
_SYS_BLOCK = Path("/sys/block")


def _sysdir(rdev: int) -> Path:
    return _SYS_DEV / f"{os.major(rdev)}:{os.minor(rdev)}"


def device_name(rdev: int) -> str:
    """ "/dev/NAME" of device number ``rdev`` as the kernel names it (major:minor if it has no /sys entry)."""
    try:
        return "/dev/" + os.path.basename(os.readlink(_sysdir(rdev)))
    except OSError:
        return f"block device {os.major(rdev)}:{os.minor(rdev)}"


def holders(rdev: int) -> list[str]:
    """Kernel holders of the device (dm-0, md127, ...), sorted."""
    try:
        return sorted(os.listdir(_sysdir(rdev) / "holders"))
    except OSError:
        return []


def partitions(rdev: int) -> list[int]:
    """Device numbers of the partitions of a whole disk ([] for a partition, or a disk without any)."""
    out: list[int] = []
    try:
        children = list(_sysdir(rdev).iterdir())
    except OSError:
        return out
    for child in children:
        if not (child / "partition").exists():
            continue
        try:
            maj, _, mnr = (child / "dev").read_text().strip().partition(":")
            out.append(os.makedev(int(maj), int(mnr)))
        except (OSError, ValueError):
            continue
    return sorted(out)


@dataclass(frozen=True)
class Loop:
    """An attached loop device and its backing file as the kernel prints it (relative to the root of the
    process that attached it, with " (deleted)" appended when the file was unlinked)."""

    device: str  # "/dev/loopN"
    rdev: int
    backing_file: str


def loop_of(rdev: int) -> Loop | None:
    """The loop device with number ``rdev``, if it is one and is attached."""
    d = _sysdir(rdev)
    try:
        back = (d / "loop" / "backing_file").read_text().rstrip("\n")
    except OSError:
        return None
    return Loop(device_name(rdev), rdev, back)


def loops() -> list[Loop]:
    """Every attached loop device."""
    out: list[Loop] = []
    try:
        names = sorted(n for n in os.listdir(_SYS_BLOCK) if n.startswith("loop"))
    except OSError:
        return out
    for name in names:
        try:
            back = (_SYS_BLOCK / name / "loop" / "backing_file").read_text().rstrip("\n")
            maj, _, mnr = (_SYS_BLOCK / name / "dev").read_text().strip().partition(":")
            out.append(Loop(f"/dev/{name}", os.makedev(int(maj), int(mnr)), back))
        except (OSError, ValueError):
            continue  # not attached (no loop/ attributes then), or detached meanwhile
    return out
