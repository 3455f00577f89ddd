"""Which disk a path names: its identity, never its spelling.

A regular file is (st_dev, st_ino): a hard link, a symlink or a bind-mounted path to it has the same identity.
A block device is its device number (st_rdev): /dev/sdb, /dev/disk/by-id/... and any other node with the same
major:minor are the same disk.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

FILE = "file"
BLOCK = "block"


@dataclass(frozen=True)
class Identity:
    kind: str  # FILE | BLOCK
    dev: int  # FILE: st_dev of the file; BLOCK: st_rdev of the device
    ino: int = 0  # FILE: st_ino; BLOCK: 0

    @staticmethod
    def block(rdev: int) -> Identity:
        return Identity(BLOCK, rdev)

    def __str__(self) -> str:
        if self.kind == BLOCK:
            return f"block device {os.major(self.dev)}:{os.minor(self.dev)}"
        return f"file {os.major(self.dev)}:{os.minor(self.dev)} inode {self.ino}"


def from_stat(st: os.stat_result) -> Identity | None:
    """The identity of a regular file or block device; None for anything else (directories, sockets, ...)."""
    if stat.S_ISREG(st.st_mode):
        return Identity(FILE, st.st_dev, st.st_ino)
    if stat.S_ISBLK(st.st_mode):
        return Identity.block(st.st_rdev)
    return None


def of_path(path: str) -> Identity | None:
    """The identity of what ``path`` names after following symlinks; None if missing or not a file/device."""
    try:
        return from_stat(os.stat(path))
    except (FileNotFoundError, NotADirectoryError):
        return None
