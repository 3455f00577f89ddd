"""Loop devices for the FUSE frontend, and its view of "who is using this loop device".

Loop devices are a machine-wide resource shared with other software, so this module only ever touches a device
it was told about (by name), never "all loop devices". Everything here is Linux-only and needs root.

Who uses a device is answered by ``baton.host`` (the one in-use check: mounts in every mount namespace,
holders, open file descriptors by identity, loop devices and Baton attachments); :func:`users` adds the kernel's
own answer, an ``O_EXCL`` open, which fails while the device is mounted or claimed, and catches what the scans
may miss. Mount tables come from ``baton.host.mounts`` (re-exported here for the frontend).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from baton import host
from baton.errors import DeviceBusy, DeviceError
from baton.host.fds import comm

# The one mountinfo parser and mount lookup, re-exported for the frontend.
from baton.host.mounts import MountEntry as MountEntry
from baton.host.mounts import mounted_at as mounted_at
from baton.host.mounts import parse_mountinfo as parse_mountinfo

_BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): device size in bytes
_MNT_DETACH = 2  # umount2 flag: lazy unmount
_LOSETUP_TIMEOUT = 30.0  # seconds; losetup only does ioctls, so this only trips on a wedged kernel


@dataclass(frozen=True)
class LoopInfo:
    """What sysfs says about an attached loop device.

    Read from /sys only: ``losetup --list`` asks the kernel for the backing file's inode, which is a FUSE
    getattr and fails (or hangs) when the FUSE daemon behind it is dead (or hung).
    """

    device: str  # "/dev/loopN"
    back_file: str  # path of the backing file as the kernel prints it (relative to a vanished namespace: "/disk")
    diskseq: int  # the kernel's disk sequence number: changes whenever the device is attached again
    dio: bool  # direct I/O to the backing file is on


@dataclass(frozen=True)
class MountUse:
    """A file system mounted from the device, seen in the mount namespace of ``ns_pid``."""

    mountpoint: str
    ns_pid: int  # a process living in that mount namespace (our own pid for ours)


@dataclass(frozen=True)
class Users:
    """Everything found holding a block device. ``busy`` is the summary callers act on."""

    device: str
    mounts: list[MountUse] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)  # kernel holders: dm-0, md127, ...
    openers: list[int] = field(default_factory=list)  # pids with an open fd on the device
    others: list[str] = field(default_factory=list)  # anything else baton.host found: "attached as /dev/loop9 ..."
    exclusive_busy: bool = False  # O_EXCL open failed with EBUSY (mounted or claimed)

    @property
    def busy(self) -> bool:
        return bool(self.mounts or self.holders or self.openers or self.others or self.exclusive_busy)

    def describe(self) -> str:
        """A one-line human description naming who holds the device."""
        parts: list[str] = []
        for m in self.mounts:
            where = "" if m.ns_pid == os.getpid() else f" (mount namespace of pid {m.ns_pid})"
            parts.append(f"mounted at {m.mountpoint}{where}")
        parts += [f"held by {h}" for h in self.holders]
        parts += [f"opened by pid {p} ({comm(p)})" for p in self.openers]
        parts += self.others
        if not parts and self.exclusive_busy:
            parts.append("claimed exclusively by the kernel (a mount in a namespace we cannot see, or a holder)")
        return f"{self.device}: " + ", ".join(parts) if parts else f"{self.device}: not in use"


def _run(args: list[str]) -> str:
    """Run a command, returning stdout; a failure becomes DeviceError carrying stderr."""
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=_LOSETUP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeviceError(f"{' '.join(args)} failed: {exc}") from exc
    if res.returncode != 0:
        raise DeviceError(f"{' '.join(args)} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def attach(path: Path, *, direct_io: bool = True) -> str:
    """Attach ``path`` to a free loop device and return its name ("/dev/loopN").

    ``losetup --find`` takes the free device atomically (LOOP_CTL_GET_FREE plus retries), so concurrent callers
    get different devices. Raises DeviceError if losetup fails, or if direct I/O was asked for and the kernel
    silently fell back to buffered I/O (the device is detached again in that case).
    """
    args = ["losetup", "--find", "--show"]
    if direct_io:
        args.append("--direct-io=on")
    dev = _run([*args, str(path)]).strip()
    if not dev.startswith("/dev/loop"):
        raise DeviceError(f"losetup returned an unexpected device name {dev!r}")
    if direct_io and not dio_enabled(dev):
        detach(dev)
        raise DeviceError(f"{dev}: the kernel refused direct I/O on {path}; refusing a double-cached device")
    return dev


def detach(dev: str) -> None:
    """``losetup -d``. If the device is still open the kernel detaches it lazily, at the last close."""
    _run(["losetup", "-d", dev])


def dio_enabled(dev: str) -> bool:
    try:
        return Path(f"/sys/block/{Path(dev).name}/loop/dio").read_text().strip() == "1"
    except OSError:
        return False


def info(dev: str) -> LoopInfo | None:
    """The loop device's backing file and attachment identity, None when ``dev`` is not attached."""
    sysdir = Path(f"/sys/block/{Path(dev).name}")
    try:
        back = (sysdir / "loop" / "backing_file").read_text().rstrip("\n")
        seq = int((sysdir / "diskseq").read_text())
    except (OSError, ValueError):
        return None  # no such device, or not attached (sysfs has no loop/ attributes then)
    return LoopInfo(device=str(Path(dev)), back_file=back, diskseq=seq, dio=dio_enabled(dev))


def size_of(dev: str) -> int:
    """Size in bytes of a block device (BLKGETSIZE64)."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("<Q", buf)[0])
    finally:
        os.close(fd)


# ---- who uses a loop device ------------------------------------------------------------------------------


def _claimed(dev: str) -> bool:
    """Whether an ``O_EXCL`` open of ``dev`` fails with EBUSY: the kernel has it mounted or claimed."""
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise DeviceError(f"cannot open {dev}: {exc.strerror}") from exc
        return True
    return False


def users(dev: str) -> Users:
    """Who uses ``dev`` right now (``baton.host.users``; our own process is not counted), plus whether the
    kernel has it claimed."""
    found = host.users(dev)
    return Users(device=dev, mounts=[MountUse(u.what, u.pid) for u in found if u.kind == host.MOUNT and not u.via],
                 holders=[u.what for u in found if u.kind == host.HOLDER and not u.via],
                 openers=sorted({u.pid for u in found if u.kind == host.OPEN and not u.via}),
                 others=[str(u) for u in found if u.via or u.kind in (host.LOOP, host.ATTACHED)],
                 exclusive_busy=_claimed(dev))


def refuse_if_busy(dev: str, what: str) -> None:
    """Raise DeviceBusy naming who holds ``dev``, if anyone does (``baton.host.check_not_in_use``, then the
    kernel's ``O_EXCL`` answer). ``what`` says what was refused."""
    host.check_not_in_use(dev, what)
    if _claimed(dev):
        raise DeviceBusy(f"{dev} is in use ({what} refused): claimed exclusively by the kernel (a mount in a "
                         "namespace we cannot see, or a holder)", hint="unmount it / remove what is stacked on it, "
                         "then retry")


# ---- unmounting ---------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def umount(path: Path, *, lazy: bool = False) -> None:
    """umount2(path); ``lazy`` detaches it from the namespace now and frees it when no longer used.

    Raises OSError (with errno) on failure; EINVAL means "not a mount point".
    """
    if _libc.umount2(os.fsencode(str(path)), _MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")
