"""Small helpers shared by several layers (layer 0: imports nothing from Baton)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (a killed daemon may linger as one until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = proc_stat(pid)
        return fields is not None and fields[0] != "Z"
    except IndexError:
        return False


def proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the process's name (``state`` first, so field n of proc(5) is
    item n - 3), or None when there is no such process. The name is skipped as bytes: it may be any bytes,
    UTF-8 or not (a pid in a state file may have been reused by any process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(b")", 1)[-1].decode("ascii", "replace").split()
