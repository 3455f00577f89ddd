"""Open file descriptors of every process on this node, by the identity of what they have open.

Each /proc/PID/fd/N is stat-ed (which follows the link to the inode, so a file opened through a hard link or a
device node under another name still matches), except a descriptor on a FUSE file system: stat-ing that asks
the FUSE daemon, which hangs the caller when the daemon hangs. Those are identified from /proc/PID/fdinfo/N
(mnt_id and ino) without asking anyone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from baton.host.identity import FILE, Identity, from_stat
from baton.host.mounts import MountEntry


@dataclass(frozen=True)
class OpenFile:
    pid: int
    fd: int
    identity: Identity


def comm(pid: int) -> str:
    """The process's command name ("?" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def is_baton_daemon(pid: int) -> bool:
    """Whether ``pid`` runs ``baton serve`` (a per-disk daemon), from its command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [os.fsdecode(a) for a in argv]
    # python -m baton serve ..., baton serve ..., python /usr/bin/baton serve ...
    return (args[1:4] == ["-m", "baton", "serve"]
            or (args[1:2] == ["serve"] and os.path.basename(args[0]) == "baton")
            or (args[2:3] == ["serve"] and os.path.basename(args[1]) == "baton"))


def _fdinfo(pid: str, fd: str) -> tuple[int, int] | None:
    """(mnt_id, ino) of an open file from /proc/PID/fdinfo/FD."""
    mnt = ino = None
    try:
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            key, _, val = line.partition(":")
            if key == "mnt_id":
                mnt = int(val)
            elif key == "ino":
                ino = int(val)
    except (OSError, ValueError):
        return None
    return (mnt, ino) if mnt is not None and ino is not None else None


def open_files(mounts: list[MountEntry], *, skip_pids: frozenset[int] = frozenset()) -> list[OpenFile]:
    """Every descriptor on a regular file or block device held by a process not in ``skip_pids``.

    ``mounts``: the mounts of every namespace (for the FUSE exception above).
    """
    fuse = {e.mount_id: os.makedev(*e.dev) for e in mounts if e.fstype.startswith("fuse")}
    out: list[OpenFile] = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in skip_pids:
            continue
        base = f"/proc/{entry.name}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue  # exited, or not ours to read
        for fd in fds:
            link = f"{base}/{fd}"
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if not target.startswith("/"):
                continue  # socket:[..], pipe:[..], anon_inode:..
            ident: Identity | None = None
            if fuse:
                info = _fdinfo(entry.name, fd)
                if info is not None and info[0] in fuse:
                    ident = Identity(FILE, fuse[info[0]], info[1])
            if ident is None:
                try:
                    ident = from_stat(os.stat(link))
                except OSError:
                    continue
            if ident is not None:
                out.append(OpenFile(int(entry.name), int(fd), ident))
    return out
