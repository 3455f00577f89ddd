"""The one "is this disk in use on this node" check, used by init, attach, detach and restore.

:func:`users` lists everything on this node that uses a disk: mounts (in every mount namespace), loop devices
over it, kernel holders (device-mapper, md), processes with it open, and Baton attachments. A disk is named by
its identity (see :mod:`baton.host.identity`), so every path to it finds the same users. It follows the disk
through loop devices both ways: a file is used by whatever uses a loop device over it, and a loop device is used
by whatever uses its backing file, so "restore to /dev/loop3" is refused when the file behind loop3 is attached.
Partitions count for their whole disk.

Our own process is never a user (the CLI may hold the disk open itself, for example an offline backup).

Limits: a loop device's backing file is identified by stat-ing the path the kernel prints, which is relative to
the root of whoever attached it (another mount namespace may print a path we resolve differently), and loop
devices over files on FUSE file systems are not stat-ed (a hung FUSE daemon would hang the check); Baton's own
FUSE files are such files, and no disk is one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from baton.errors import DeviceBusy
from baton.host import attachments as att
from baton.host import fds, mounts, sysfs
from baton.host.identity import BLOCK, Identity, of_path

MOUNT = "mount"
LOOP = "loop"
HOLDER = "holder"
OPEN = "open"
ATTACHED = "attached"


@dataclass(frozen=True)
class Use:
    """One user of a disk. ``str()`` is the phrase a message shows: "mounted at /srv (via /dev/loop3)"."""

    kind: str  # MOUNT | LOOP | HOLDER | OPEN | ATTACHED
    detail: str  # what, without the via part: "mounted at /srv", "opened by pid 42 (qemu)"
    pid: int = 0  # OPEN, ATTACHED: the process; MOUNT: a process in that mount namespace
    what: str = ""  # MOUNT: the mount point; LOOP: the loop device; HOLDER: its name; ATTACHED: the NAME
    via: str = ""  # the device or file through which it reaches the disk, when not the disk itself
    baton_daemon: bool = False  # OPEN: the process is a Baton per-disk daemon (`baton serve`)

    def __str__(self) -> str:
        return f"{self.detail} (via {self.via})" if self.via else self.detail


class _Scan:
    """One look at the node; each table is read at most once, when first needed."""

    def __init__(self) -> None:
        self._mounts: list[tuple[int, mounts.MountEntry]] | None = None
        self._ours: list[mounts.MountEntry] | None = None
        self._loops: list[tuple[sysfs.Loop, Identity | None]] | None = None
        self._open: list[fds.OpenFile] | None = None
        self._attached: list[tuple[dict[str, Any], str, Identity]] | None = None
        self.me = os.getpid()

    def mounts(self) -> list[tuple[int, mounts.MountEntry]]:
        if self._mounts is None:
            self._mounts = mounts.all_mounts()
        return self._mounts

    def backing_identity(self, loop: sysfs.Loop) -> Identity | None:
        path = loop.backing_file
        if path.endswith(" (deleted)") or not path.startswith("/"):
            return None
        if self._ours is None:
            self._ours = mounts.read_mountinfo()
        m = mounts.mount_holding(path, self._ours)
        if m is not None and m.fstype.startswith("fuse"):
            return None  # see the module docstring
        try:
            return of_path(path)
        except OSError:
            return None

    def loops(self) -> list[tuple[sysfs.Loop, Identity | None]]:
        if self._loops is None:
            self._loops = [(lo, self.backing_identity(lo)) for lo in sysfs.loops()]
        return self._loops

    def open_files(self) -> list[fds.OpenFile]:
        if self._open is None:
            self._open = fds.open_files([e for _, e in self.mounts()], skip_pids=frozenset({self.me}))
        return self._open

    def attached(self) -> list[tuple[dict[str, Any], str, Identity]]:
        """(state, role, identity) of the disks and record disks of live Baton attachments."""
        if self._attached is None:
            self._attached = []
            for st in att.attachments():
                if not st.get("alive"):
                    continue
                paths = [("", str(st.get("disk") or ""))]
                rec = str(st.get("record") or "")
                if rec.startswith("external:"):
                    paths.append(("its record disk ", rec.split(":", 1)[1].split("#", 1)[0]))
                for role, p in paths:
                    try:
                        ident = of_path(p) if p else None
                    except OSError:
                        ident = None
                    if ident is not None:
                        self._attached.append((st, role, ident))
        return self._attached

    # ------------------------------------------------------------------------------------------------

    def users(self, ident: Identity, via: str, seen: set[Identity], came_from: int | None) -> list[Use]:
        if ident in seen:
            return []
        seen.add(ident)
        out: list[Use] = []
        if ident.kind == BLOCK:
            out += self._block_users(ident.dev, via)
            lo = sysfs.loop_of(ident.dev)
            if lo is not None:
                back = self.backing_identity(lo)
                if back is not None:
                    out += self.users(back, f"{via + ', ' if via else ''}its backing file {lo.backing_file}",
                                      seen, came_from=ident.dev)
        for lo, back in self.loops():
            if back == ident and lo.rdev != came_from:
                out.append(Use(LOOP, f"attached as {lo.device} (a loop device over it)", what=lo.device, via=via))
                out += self.users(Identity.block(lo.rdev), lo.device, seen, came_from=None)
        out += self._openers({ident}, via)
        for st, role, a in self.attached():
            if a == ident:
                name, pid = str(st.get("name")), int(st.get("pid") or 0)
                out.append(Use(ATTACHED, f"already attached by Baton as {name} ({role}pid {pid}, node "
                                         f"{st.get('node')})", pid=pid, what=name, via=via))
        return out

    def _block_users(self, rdev: int, via: str) -> list[Use]:
        out: list[Use] = []
        for r in [rdev, *sysfs.partitions(rdev)]:
            v = via if r == rdev else f"{via + ', ' if via else ''}partition {sysfs.device_name(r)}"
            want = (os.major(r), os.minor(r))
            for pid, e in self.mounts():
                if e.dev == want or (e.source.startswith("/dev/") and of_path_quiet(e.source) == Identity.block(r)):
                    where = "" if pid == self.me else f" in the mount namespace of pid {pid}"
                    out.append(Use(MOUNT, f"mounted at {e.mountpoint}{where}", pid=pid, what=e.mountpoint, via=v))
            out += [Use(HOLDER, f"held by {h}", what=h, via=v) for h in sysfs.holders(r)]
            if r != rdev:
                out += self._openers({Identity.block(r)}, v)
        return _unique(out)

    def _openers(self, idents: set[Identity], via: str) -> list[Use]:
        out: list[Use] = []
        pids = sorted({f.pid for f in self.open_files() if f.identity in idents})
        for pid in pids:
            out.append(Use(OPEN, f"opened by pid {pid} ({fds.comm(pid)})", pid=pid, via=via,
                           baton_daemon=fds.is_baton_daemon(pid)))
        return out


def of_path_quiet(path: str) -> Identity | None:
    try:
        return of_path(path)
    except OSError:
        return None


def _unique(uses: list[Use]) -> list[Use]:
    seen: set[Use] = set()
    out = []
    for u in uses:
        if u not in seen:
            seen.add(u)
            out.append(u)
    return out


def users(path: str) -> list[Use]:
    """Everything on this node that uses the file or block device ``path`` names (see the module docstring).

    [] when nothing does, when ``path`` does not exist, or when it is neither a regular file nor a block
    device. Raises OSError only if ``path`` itself cannot be stat-ed for another reason (EACCES, EIO).
    """
    ident = of_path(path)
    if ident is None:
        return []
    found = _unique(_Scan().users(ident, "", set(), came_from=None))
    daemons = {u.pid for u in found if u.kind == ATTACHED}
    return [u for u in found if not (u.kind == OPEN and u.pid in daemons)]  # a daemon holds its disk open


def _hint(found: list[Use]) -> str:
    hints: list[str] = []
    for u in found:
        if u.kind == ATTACHED:
            h = f"detach it (baton detach {u.what})"
        elif u.kind == MOUNT:
            h = f"unmount {u.what}"
        elif u.kind == LOOP:
            h = f"detach the loop device (losetup -d {u.what})"
        elif u.kind == HOLDER:
            h = f"remove the device stacked on it ({u.what}: dmsetup remove / mdadm --stop)"
        else:
            h = f"stop pid {u.pid} or make it close the disk"
        if h not in hints:
            hints.append(h)
    return "; ".join(hints) + ", then retry. Baton never overwrites or takes over a disk that is in use"


def check_not_in_use(path: str, action: str, *, allow: Callable[[Use], bool] | None = None) -> None:
    """Raise DeviceBusy naming every user of ``path`` (except those ``allow`` accepts), with what to do.

    ``action`` says what was refused ("restore", "init", ...). A disk found open only by processes (no mount,
    loop, holder or attachment) is looked at again for up to a second: udev's blkid probe opens a device for a
    moment after every change, and must not make a command fail.
    """
    found: list[Use] = []
    for attempt in range(6):
        found = [u for u in users(path) if allow is None or not allow(u)]
        if not found or any(u.kind != OPEN for u in found) or attempt == 5:
            break
        time.sleep(0.2)
    if found:
        raise DeviceBusy(f"{path} is in use ({action} refused): {'; '.join(map(str, found))}", hint=_hint(found))
