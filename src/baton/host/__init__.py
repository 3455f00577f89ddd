"""What this node sees: mounts, loop devices and their backing files, holders, open file descriptors and Baton
attachments, one of each, and the one "is this disk in use" check built on them (:func:`check_not_in_use`).

Modules: ``identity`` (which disk a path names), ``mounts`` (the one mountinfo parser, every mount namespace),
``sysfs`` (block device names, partitions, holders, loop backing files), ``fds`` (open descriptors by
identity), ``attachments`` (Baton's per-disk daemon state files), ``inuse`` (users and the check).

Layer: beside ``device`` (it imports only errors and util), so every layer above may ask it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from baton.host.identity import Identity, of_path
    from baton.host.inuse import ATTACHED, HOLDER, LOOP, MOUNT, OPEN, Use, check_not_in_use, users

_FROM = {"Identity": "identity", "of_path": "identity", "ATTACHED": "inuse", "HOLDER": "inuse", "LOOP": "inuse",
         "MOUNT": "inuse", "OPEN": "inuse", "Use": "inuse", "check_not_in_use": "inuse", "users": "inuse"}


def __getattr__(name: str) -> Any:
    """The names below on first use: a command that only reads ``attachments`` (``baton backup NAME``, which
    talks to a running daemon) does not pay for the mount, sysfs and descriptor scanners at start-up."""
    import importlib

    if name in ("attachments", "fds", "identity", "inuse", "mounts", "sysfs"):
        return importlib.import_module(f"baton.host.{name}")
    mod = _FROM.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"baton.host.{mod}"), name)


__all__ = ["ATTACHED", "HOLDER", "LOOP", "MOUNT", "OPEN", "Identity", "Use", "check_not_in_use", "of_path",
           "users"]
