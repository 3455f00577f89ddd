"""Where a per-disk daemon keeps its files on this node, and what an attachment is called.

RUN_DIR/NAME/ (RUN_DIR: /run/baton, env BATON_RUN_DIR) holds:

* ``daemon.json``: the attachment's state file (read and written only through :mod:`baton.host.attachments`,
  which also holds the one NAME rule, :func:`check_name`: the layers below the daemon read it too);
* ``control.sock``: the daemon's control socket (:mod:`baton.daemon.protocol`);
* ``daemon.log``: the daemon's stderr;
* ``lock``: an flock held by whatever process serves NAME, and whatever else the frontend keeps there (the
  FUSE frontend: ``state.json``, its record of the loop device and mount to clean up after a crash, and the
  mount point ``fuse/``).

BATON_DEV_DIR (/dev/baton) holds the device links of block-device frontends. An NBD frontend's socket is
RUN_DIR/NAME.sock.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TYPE_CHECKING

from baton.host.attachments import check_name as check_name
from baton.host.attachments import dev_dir as dev_dir
from baton.host.attachments import read_state, run_dir, run_dir_str, state_path
from baton.util import pid_alive

if TYPE_CHECKING:
    from pathlib import Path

# The daemon's own files in RUN_DIR/NAME (anything else there belongs to the frontend).
_CONTROL = "control.sock"
_OWN_FILES = ("daemon.json", "daemon.tmp", _CONTROL, "daemon.log")
_LOCK = "lock"


def attachment_dir(name: str) -> Path:
    return run_dir() / name


def control_path(name: str) -> Path:
    return run_dir() / name / _CONTROL


def control_path_str(name: str) -> str:
    """:func:`control_path` as a str, without pathlib: what a client of a running daemon connects to."""
    return os.path.join(run_dir_str(), name, _CONTROL)


def log_path(name: str) -> Path:
    return run_dir() / name / "daemon.log"


def default_name(disk: str) -> str:
    """The attachment NAME for ``disk`` when none is given: its base name without .img/.raw, made valid
    (characters outside letters, digits, '-', '_' and '.' become '_'; it starts with a letter or digit; at most
    64 characters)."""
    base = os.path.basename(os.path.realpath(disk))
    for suffix in (".img", ".raw"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    name = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in base)
    name = name.lstrip("-_.")[:64]
    return name or "disk"


def log_tail(name: str, lines: int = 10) -> list[str]:
    """The last ``lines`` lines of RUN_DIR/NAME/daemon.log ([] when there is none)."""
    try:
        with open(log_path(name), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.strip()][-lines:]


def _is_file(p: Path) -> bool:
    """Not a directory. A path that cannot even be stat-ed (a dead FUSE mount point: ENOTCONN) counts as a
    directory: removing it fails with EBUSY, and that is reported."""
    try:
        return not stat.S_ISDIR(p.lstat().st_mode)
    except OSError:
        return False


def remove_run_dir(name: str) -> list[str]:
    """Remove RUN_DIR/NAME once nothing serves NAME any more (after a detach, a clean-up, a failed attach).

    Conservative, never recursive: it unlinks only the daemon's own files (daemon.json, control.sock,
    daemon.log) and rmdirs the frontend's empty directories (the FUSE mount point), and leaves everything in
    place while the frontend still keeps a file there (the FUSE frontend's state.json names a loop device or a
    mount to clean up), while a live daemon's state file names another pid, or while another process holds
    the serving lock. The lock file is unlinked only while this process holds its flock, so no one can hold
    it at that moment. Returns what it removed.
    """
    d = run_dir() / name
    if not d.is_dir():
        return []
    try:
        entries = list(d.iterdir())
    except OSError:
        return []
    if any(p.name not in (*_OWN_FILES, _LOCK) and _is_file(p) for p in entries):
        return []  # the frontend still has something to clean up
    st = read_state(name)
    pid = int((st or {}).get("pid", 0))
    if pid and pid != os.getpid() and pid_alive(pid):
        return []
    import fcntl  # here, not at the top: `baton backup NAME` imports this module but never removes anything

    lock, fd = d / _LOCK, -1
    try:
        if lock.exists():
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []
        for n in _OWN_FILES:
            (d / n).unlink(missing_ok=True)
        for p in entries:
            if p.name not in (*_OWN_FILES, _LOCK):  # the frontend's (empty) directories
                with contextlib.suppress(FileNotFoundError):
                    p.rmdir()  # EBUSY while something is still mounted there: then d stays, and says why
        if fd >= 0:
            lock.unlink(missing_ok=True)
        d.rmdir()
    except OSError as e:
        import logging

        logging.getLogger("baton.daemon").warning("%s: cannot remove %s: %s", name, d, e.strerror or e)
        return []
    finally:
        if fd >= 0:
            os.close(fd)
    return [f"removed {d}"]


__all__ = ["attachment_dir", "check_name", "control_path", "control_path_str", "default_name", "dev_dir", "log_path", "log_tail",
           "remove_run_dir", "run_dir", "state_path"]
