"""Mount tables: the one mountinfo parser, and the mounts of every mount namespace on this node.

A container or a systemd unit with private mounts can keep a file system mounted (and so its device busy) after
it was unmounted in ours, so the in-use check reads /proc/PID/mountinfo of one process per mount namespace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo (see proc(5)); strings are unescaped."""

    mount_id: int  # unique on the machine (also in /proc/PID/fdinfo/FD as mnt_id)
    dev: tuple[int, int]  # major:minor of the mounted file system (st_dev of its files)
    root: str  # the directory of that file system mounted here ("/" unless a bind mount of a subtree)
    mountpoint: str
    fstype: str
    source: str
    line: str  # the raw line (the ownership watcher compares sets of lines between reads)


def unescape(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
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
    """Parse mountinfo text; malformed lines are skipped."""
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
            mount_id, dev = int(f[0]), (int(maj), int(mnr))
        except ValueError:
            continue
        entries.append(MountEntry(mount_id=mount_id, dev=dev, root=unescape(f[3]), mountpoint=unescape(f[4]),
                                  fstype=r[0], source=unescape(r[1]), line=line))
    return entries


def read_mountinfo(pid: int | str = "self") -> list[MountEntry]:
    """The mounts process ``pid`` sees; [] when it is gone or unreadable."""
    try:
        return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())
    except OSError:
        return []


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


def all_mounts() -> list[tuple[int, MountEntry]]:
    """(pid of the namespace, entry) for every mount of every mount namespace, ours first."""
    out: list[tuple[int, MountEntry]] = []
    for pid in mount_namespaces().values():
        out += [(pid, e) for e in read_mountinfo(pid)]
    return out


def mounted_at(path: Path | str) -> MountEntry | None:
    """The mount whose mount point is exactly ``path`` in our namespace (the last one, if stacked)."""
    want = os.path.realpath(path)
    hit: MountEntry | None = None
    for e in read_mountinfo():
        if e.mountpoint == want:
            hit = e
    return hit


def mount_holding(path: str, entries: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount in our namespace whose mount point is the longest prefix of ``path``.

    Purely textual (``path`` is normalised, never resolved): resolving or stat-ing a path on a FUSE file system
    whose daemon hangs would hang the caller, and callers use this to avoid exactly that.
    """
    p = os.path.normpath(os.path.join("/", path))
    best: MountEntry | None = None
    for e in read_mountinfo() if entries is None else entries:
        mp = e.mountpoint
        if (p == mp or p.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) >= len(best.mountpoint)):
            best = e
    return best


def fstype_of_dev(st_dev: int) -> str:
    """The file system type mounted with device number ``st_dev`` in our namespace ("" if not found)."""
    want = (os.major(st_dev), os.minor(st_dev))
    for e in read_mountinfo():
        if e.dev == want:
            return e.fstype
    return ""
