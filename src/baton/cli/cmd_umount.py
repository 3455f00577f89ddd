"""`baton umount`: stop serving a mounted snapshot."""

from __future__ import annotations

import click

from baton.cli import emit
from baton.cli.cmd_repo import json_option


@click.command("umount")
@click.argument("name")
@click.option("--force", is_flag=True, help="Stop even while the device is mounted or open (its users get EIO).")
@json_option
def command(name: str, force: bool, as_json: bool) -> None:
    """Stop serving the snapshot device /dev/baton/snap-NAME made by `baton mount`.

    \b
    NAME is what `baton mount` printed (with or without the "snap-" prefix). Refused (exit 3) while
    the device is mounted or open anywhere on this node: unmount the file system first, or use
    --force. If the mount daemon died (killed), what it left behind (its loop device, FUSE mount,
    device link and files) is cleaned up instead. An unknown NAME fails with exit 6.

    The result reports what was read: statistics (chunks_fetched, bytes_fetched, cache_hits,
    cache_misses, reads, bytes_read) and repository (chunks_read, bytes_read from the store,
    pages_read).
    """
    from baton.mount import umount

    res = umount(name, force=force)
    if res.get("was_running"):
        s, r = res.get("statistics", {}), res.get("repository", {})
        human = (f"unmounted {res['name']}: read {s.get('bytes_read', 0):,} bytes, fetched "
                 f"{s.get('bytes_fetched', 0):,} bytes of chunks ({r.get('bytes_read', 0):,} bytes from the "
                 f"repository)")
    else:
        human = f"{res['name']}: its daemon was not running; cleaned up:\n" + "\n".join(res.get("cleaned_up", []))
    emit(res, as_json, human)
