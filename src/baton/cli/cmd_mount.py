"""`baton mount`: a snapshot as a read-only block device, fetched on demand."""

from __future__ import annotations

import click

from baton.cli import emit
from baton.cli.cmd_repo import json_option, key_option, repo_option


def parse_size(text: str) -> int:
    """"256M" -> bytes (K, M, G, T: binary units; a plain number is bytes)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult != 1 else t) * mult)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 256M or 1G") from None


@click.command("mount")
@click.argument("snapshot")
@repo_option
@key_option
@click.option("--name", metavar="NAME", help="Device name: /dev/baton/snap-NAME (default: the snapshot id's first "
              "8 digits).")
@click.option("--cache-size", default="256M", show_default=True, metavar="SIZE",
              help="Most chunk data kept in memory (least recently used dropped first), e.g. 64M, 1G.")
@json_option
def command(snapshot: str, repo_url: str, key_file: str | None, name: str | None, cache_size: str,
            as_json: bool) -> None:
    """Serve SNAPSHOT as the read-only block device /dev/baton/snap-NAME, its chunks fetched on demand.

    \b
    SNAPSHOT is an id, a unique prefix of 6+ hex digits, or "latest". Nothing is downloaded up front:
    each read fetches the chunks it needs from the repository (local or S3) into a bounded local cache
    (--cache-size), so the files of a large snapshot show at once. The device is read-only (a
    read-only loop device over a FUSE file, served by a small daemon; its files live in
    RUN_DIR/snap-NAME). Mount its file system read-only without replaying the journal:

    \b
      baton mount 3f2a9c1d --repo /backup/repo --name before-upgrade
      mount -o ro,noload /dev/baton/snap-before-upgrade /mnt/snap          # ext4
      mount -o ro,norecovery /dev/baton/snap-before-upgrade /mnt/snap      # xfs (add nouuid if the
                                                                           #  live disk is mounted too)
      cp -a /mnt/snap/etc/app.conf /etc/app.conf
      umount /mnt/snap && baton umount before-upgrade

    \b
    Errors: an unknown snapshot or a missing repository (exit 7), a checkpoint of an unfinished backup
    (exit 2), a NAME already mounted (exit 3). JSON keys: name, pid, snapshot, disk_uuid, disk_name,
    size, repo, device, loop, cache_bytes, started.
    """
    from baton.mount import mount

    res = mount(snapshot, repo_url, name=name, key_file=key_file, cache_bytes=parse_size(cache_size))
    emit(res, as_json, f"snapshot {res['snapshot'][:12]} ({res['size']:,} bytes) is {res['device']} (read-only)\n"
                       f"mount it with: mount -o ro,noload {res['device']} DIR   (xfs: -o ro,norecovery)\n"
                       f"then: baton umount {res['name']}")
