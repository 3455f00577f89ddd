"""What this node sees: mounts, loop devices and their backing files, holders, open file descriptors and Baton
attachments, one of each, and the one "is this disk in use" check built on them (:func:`check_not_in_use`).

Modules: ``identity`` (which disk a path names), ``mounts`` (the one mountinfo parser, every mount namespace),
``sysfs`` (block device names, partitions, holders, loop backing files), ``fds`` (open descriptors by
identity), ``attachments`` (Baton's per-disk daemon state files), ``inuse`` (users and the check).

Layer: beside ``device`` (it imports only errors and util), so every layer above may ask it.
"""

from baton.host.identity import Identity, of_path
from baton.host.inuse import ATTACHED, HOLDER, LOOP, MOUNT, OPEN, Use, check_not_in_use, users

__all__ = ["ATTACHED", "HOLDER", "LOOP", "MOUNT", "OPEN", "Identity", "Use", "check_not_in_use", "of_path",
           "users"]
