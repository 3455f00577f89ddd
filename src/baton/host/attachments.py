"""Baton's attachments on this node: the per-disk daemons' state files, RUN_DIR/NAME/daemon.json.

RUN_DIR is /run/baton (env BATON_RUN_DIR); the device link directory is /dev/baton (env BATON_DEV_DIR). The
daemon (``baton.cluster.attach``) writes the state file; everyone else reads it through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from baton.util import pid_alive


def run_dir() -> Path:
    return Path(os.environ.get("BATON_RUN_DIR", "/run/baton"))


def dev_dir() -> Path:
    return Path(os.environ.get("BATON_DEV_DIR", "/dev/baton"))


def state_path(name: str) -> Path:
    return run_dir() / name / "daemon.json"


def read_state(name: str) -> dict[str, Any] | None:
    """NAME's daemon.json, None when there is none (or it is unreadable: a daemon writes it atomically)."""
    try:
        data: dict[str, Any] = json.loads(state_path(name).read_text())
        return data
    except (OSError, ValueError):
        return None


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
