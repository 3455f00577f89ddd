"""The agent's control socket, RUN_DIR/agent.sock, in the one control protocol (:mod:`baton.daemon.protocol`).

    {"op": "status"}   -> {"ok": true, "result": {"agent": {...}, "attachments": [...]}}
    anything else      -> {"ok": false, "error": "UsageError", "message": "unknown op ..."}

Kept small on purpose: backups and detaches go to the per-disk daemons directly (``baton backup`` talks to
RUN_DIR/NAME/control.sock), so the agent is never on the data path and its restart changes nothing for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from baton.daemon import protocol
from baton.daemon.runtime import run_dir


def socket_path() -> Path:
    return run_dir() / "agent.sock"


def request(op: dict[str, Any], *, timeout: float = 30.0) -> Any:
    """Ask the running agent; raises DaemonError when none answers, or the agent's error as its class."""
    return protocol.request(socket_path(), op, peer="the baton agent", timeout=timeout,
                            hint="start it with `baton agent` (or systemctl start baton-agent)")
