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

The readers work on str paths (:func:`run_dir_str`), and ``pathlib`` is imported only by the functions that
return a Path: `baton backup NAME` and `baton status NAME` read a state file and list RUN_DIR before their one
request to the daemon, and pathlib (with the URL parser it brings) is a measurable part of that start-up.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any

from baton.errors import UsageError
from baton.util import pid_alive

if TYPE_CHECKING:
    from pathlib import Path

# An attachment NAME becomes a file name in RUN_DIR and BATON_DEV_DIR, an NBD export name and a FUSE fsname:
# letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64 characters.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STATE = "daemon.json"


def _path(p: str) -> Path:
    from pathlib import Path  # here, not at the top: see the module's docstring

    return Path(p)


def run_dir_str() -> str:
    """RUN_DIR (env BATON_RUN_DIR, default /run/baton), as a str."""
    return os.environ.get("BATON_RUN_DIR", "/run/baton")


def run_dir() -> Path:
    return _path(run_dir_str())


def dev_dir() -> Path:
    return _path(os.environ.get("BATON_DEV_DIR", "/dev/baton"))


def _state_path_str(name: str) -> str:
    return os.path.join(run_dir_str(), name, _STATE)


def state_path(name: str) -> Path:
    return _path(_state_path_str(name))


def check_name(name: str) -> None:
    """Raise UsageError unless ``name`` is a valid attachment NAME (the one rule, for every frontend)."""
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid NAME {name!r}: use letters, digits, '-', '_' and '.', starting with a letter "
                         "or digit (at most 64)")


def read_state(name: str) -> dict[str, Any] | None:
    """NAME's daemon.json, None when there is none (or it is unreadable: a daemon writes it atomically)."""
    try:
        with open(_state_path_str(name)) as f:
            data: dict[str, Any] = json.loads(f.read())
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
    d = run_dir_str()
    if os.path.isdir(d):
        for n in sorted(os.listdir(d)):
            st = read_state(n)
            if st is not None:
                st["alive"] = pid_alive(int(st.get("pid", 0)))
                out.append(st)
    return out
