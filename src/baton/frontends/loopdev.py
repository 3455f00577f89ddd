"""Loop devices and "who is using this block device" checks, for the FUSE frontend.

Loop devices are a machine-wide resource shared with other software, so this module only ever touches a device
it was told about (by name), never "all loop devices". Everything here is Linux-only and needs root.

Who-is-using checks look in every mount namespace on the machine (a container or a systemd unit with private
mounts can keep a file system mounted, and so the device busy, after it was unmounted in ours), in
``/sys/block/loopN/holders`` (device-mapper, md) and in every process's open file descriptors. Opening the
device with ``O_EXCL`` is the kernel's own answer for mounts and holders, and catches what the scans may miss.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from baton.errors import DeviceBusy, DeviceError

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
    exclusive_busy: bool = False  # O_EXCL open failed with EBUSY (mounted or claimed)

    @property
    def busy(self) -> bool:
        return bool(self.mounts or self.holders or self.openers or self.exclusive_busy)

    def describe(self) -> str:
        """A one-line human description naming who holds the device."""
        parts: list[str] = []
        for m in self.mounts:
            where = "" if m.ns_pid == os.getpid() else f" (mount namespace of pid {m.ns_pid})"
            parts.append(f"mounted at {m.mountpoint}{where}")
        parts += [f"held by {h}" for h in self.holders]
        parts += [f"opened by pid {p} ({_comm(p)})" for p in self.openers]
        if not parts and self.exclusive_busy:
            parts.append("claimed exclusively by the kernel (a mount in a namespace we cannot see, or a holder)")
        return f"{self.device}: " + ", ".join(parts) if parts else f"{self.device}: not in use"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


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


def rdev_of(dev: str) -> tuple[int, int]:
    st = os.stat(dev)
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{dev} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


# ---- mount tables ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo (the fields we use)."""

    dev: tuple[int, int]  # major:minor of the mounted file system
    mountpoint: str  # unescaped
    fstype: str
    source: str


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(s):
        code = s[i + 1 : i + 4]
        if s[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse mountinfo text (see proc(5)); malformed lines are skipped."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 5 or len(r) < 2:
            continue
        maj, _, mnr = f[2].partition(":")
        try:
            dev = (int(maj), int(mnr))
        except ValueError:
            continue
        entries.append(MountEntry(dev=dev, mountpoint=_unescape(f[4]), fstype=r[0], source=_unescape(r[1])))
    return entries


def mount_namespaces() -> dict[str, int]:
    """One representative pid per mount namespace on the machine, ours first."""
    seen: dict[str, int] = {}
    try:
        seen[os.readlink("/proc/self/ns/mnt")] = os.getpid()
    except OSError:
        pass
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{entry.name}/ns/mnt")
        except OSError:
            continue  # exited, or a kernel thread
        seen.setdefault(ns, int(entry.name))
    return seen


def find_mounts(dev: tuple[int, int]) -> list[MountUse]:
    """Every mount of the file system with device number ``dev``, in every mount namespace."""
    found: list[MountUse] = []
    for pid in mount_namespaces().values():
        try:
            text = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            continue
        found += [MountUse(e.mountpoint, pid) for e in parse_mountinfo(text) if e.dev == dev]
    return found


def find_openers(dev: str) -> list[int]:
    """Pids holding ``dev`` open, found by reading fd links (readlink only: a stat could hang on a dead FUSE
    file). Our own process is included if it holds the device open."""
    want = str(Path(dev))
    pids: list[int] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") == want:
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def users(dev: str) -> Users:
    """Who uses ``dev`` right now: mounts in any namespace, kernel holders, processes with it open."""
    rdev = rdev_of(dev)
    name = Path(dev).name
    try:
        holders = sorted(os.listdir(f"/sys/block/{name}/holders"))
    except OSError:
        holders = []
    excl = False
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise DeviceError(f"cannot open {dev}: {exc.strerror}") from exc
        excl = True
    return Users(device=dev, mounts=find_mounts(rdev), holders=holders, openers=find_openers(dev),
                 exclusive_busy=excl)


def refuse_if_busy(dev: str, what: str) -> None:
    """Raise DeviceBusy naming who holds ``dev``, if anyone does. ``what`` says what was refused."""
    u = users(dev)
    for _ in range(5):
        # udev's blkid probe opens a device for a moment after changes; do not blame it for being there.
        if not u.busy or u.mounts or u.holders or u.exclusive_busy:
            break
        time.sleep(0.2)
        u = users(dev)
    if u.busy:
        raise DeviceBusy(f"{what} refused: {u.describe()}",
                         hint="unmount it / stop the processes using it, then retry")


# ---- unmounting ---------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def umount(path: Path, *, lazy: bool = False) -> None:
    """umount2(path); ``lazy`` detaches it from the namespace now and frees it when no longer used.

    Raises OSError (with errno) on failure; EINVAL means "not a mount point".
    """
    if _libc.umount2(os.fsencode(str(path)), _MNT_DETACH if lazy else 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def mounted_at(path: Path) -> MountEntry | None:
    """The mount whose mount point is exactly ``path`` in our namespace (the last one, if stacked)."""
    want = os.path.realpath(path)
    hit: MountEntry | None = None
    for e in parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
        if e.mountpoint == want:
            hit = e
    return hit
