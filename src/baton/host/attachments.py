"""Baton's attachments on this node: their names, and their state files RUN_DIR/NAME/daemon.json.

RUN_DIR is /run/baton (env BATON_RUN_DIR); the device link directory is /dev/baton (env BATON_DEV_DIR). This
module is the one reader *and* writer of the state file, and holds the one rule for attachment names. It sits
in ``host`` (below the tracker) rather than in ``baton.daemon`` because the layers below the daemon must read
it too: the in-use check (``host.inuse``: a disk attached here is busy) and restore (a target under
BATON_DEV_DIR whose daemon died); the FUSE frontend, which must not import the daemon, names its device and
mount point after the same NAME. The per-disk daemon (``baton.daemon.server``) writes the file through
:func:`write_state`; everyone else reads it through :func:`read_state` and :func:`attachments`.

Keys: name, pid, node, disk, record, frontend, device, socket, tcp, epoch, tracking, started; a fenced daemon
adds state ("fenced"), fenced_by, epoch_mine, epoch_on_disk, fenced_at and fence_message before it exits.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from baton.errors import UsageError
from baton.util import pid_alive

# An attachment NAME becomes a file name in RUN_DIR and BATON_DEV_DIR, an NBD export name and a FUSE fsname:
# letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def run_dir() -> Path:
    return Path(os.environ.get("BATON_RUN_DIR", "/run/baton"))


def dev_dir() -> Path:
    return Path(os.environ.get("BATON_DEV_DIR", "/dev/baton"))


def state_path(name: str) -> Path:
    return run_dir() / name / "daemon.json"


def check_name(name: str) -> None:
    """Raise UsageError unless ``name`` is a valid attachment NAME (the one rule, for every frontend)."""
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid NAME {name!r}: use letters, digits, '-', '_' and '.', starting with a letter "
                         "or digit (at most 64)")


def read_state(name: str) -> dict[str, Any] | None:
    """NAME's daemon.json, None when there is none (or it is unreadable: a daemon writes it atomically)."""
    try:
        data: dict[str, Any] = json.loads(state_path(name).read_text())
        return data
    except (OSError, ValueError):
        return None


def write_state(name: str, st: dict[str, Any]) -> None:
    """Replace NAME's daemon.json atomically (temp file, then rename): a reader sees the old or the new."""
    path = state_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(st))
    os.replace(tmp, path)


def attachments() -> list[dict[str, Any]]:
    """Every state file under RUN_DIR, with ``alive``: whether its daemon process still runs."""
    out = []
    d = run_dir()
    if d.is_dir():
        for p in sorted(d.iterdir()):
            st = read_state(p.name)
            if st is not None:
                st["alive"] = pid_alive(int(st.get("pid", 0)))
                out.append(st)
    return out
