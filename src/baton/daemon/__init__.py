"""The per-disk daemon: one process per attached disk, the one writer of that disk's record on this node.

Modules, in the order a request meets them:

* ``client``: what every command calls: :func:`attach` (spawn the daemon, wait until it serves), :func:`detach`,
  :func:`request`, :func:`name_status`, :func:`disk_status`, :func:`backup`, and :func:`daemon_gone` (why an
  attachment's daemon no longer serves);
* ``protocol``: the one control protocol (newline-delimited JSON on a unix socket), shared with the agent;
* ``server``: the daemon itself (``baton serve``): takeover, tracker, a :class:`baton.frontends.Frontend`, the
  control socket, the fence heartbeat, the backup endpoint;
* ``offline``: the tracker over a located disk, and the backup of a disk nobody has attached;
* ``runtime``: RUN_DIR/NAME and what lives there, the default NAME of a disk.

The state file, RUN_DIR/NAME/daemon.json, and the NAME rule live in :mod:`baton.host.attachments`, one layer
down, because the in-use check and restore read them too.

Layer: above the engines (a backup runs inside the daemon) and the frontends; below the agent and the CLI.
"""

from typing import TYPE_CHECKING, Any

from baton.daemon.client import (
    attach,
    backup,
    daemon_gone,
    detach,
    disk_status,
    is_attachment_name,
    name_status,
    request,
)
from baton.daemon.protocol import READY_TIMEOUT
from baton.daemon.runtime import default_name

if TYPE_CHECKING:
    from baton.daemon.offline import offline_backup, open_tracker


def __getattr__(name: str) -> Any:
    """``offline_backup`` and ``open_tracker`` on first use: they bring the tracker and record code, which a
    client talking to a running daemon (``baton backup NAME``) never needs."""
    if name in ("offline_backup", "open_tracker"):
        from baton.daemon import offline

        return getattr(offline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["READY_TIMEOUT", "attach", "backup", "daemon_gone", "default_name", "detach", "disk_status",
           "is_attachment_name", "name_status", "offline_backup", "open_tracker", "request"]
