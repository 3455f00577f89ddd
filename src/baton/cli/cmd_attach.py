"""baton attach: take a disk over on this node and serve it."""

from __future__ import annotations

import click

from baton import frontends
from baton.cli import emit


@click.command("attach")
@click.argument("disk", metavar="DISK")
@click.option("--node", required=True, envvar="BATON_NODE",
              help="This node's cluster name (Pacemaker passes its own). Env: BATON_NODE.")
@click.option("--name", help="Attachment name: gives /dev/baton/NAME. Default: DISK's base name.")
@click.option("--frontend", type=click.Choice(frontends.kinds()), default="fuse", show_default=True,
              help="fuse: /dev/baton/NAME, a loop device over a FUSE file (mkfs/mount it). nbd: an NBD export "
                   "on RUN_DIR/NAME.sock for QEMU and NBD clients.")
@click.option("--record", metavar="SPEC", help="external:RECORD_DISK[#SLOT] if the record is on a record disk.")
@click.option("--tcp", metavar="HOST:PORT", help="With --frontend nbd: listen on TCP at this address instead "
              "of the unix socket (only when asked; bind to a private address).")
@click.option("--foreground", is_flag=True, help="Serve in this process instead of a background daemon.")
@click.option("--no-tracking", is_flag=True,
              help="Benchmarks only: serve without recording writes, to measure what tracking costs. Backups "
                   "of the disk then miss those writes: never use it for data you back up.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(disk: str, node: str, name: str | None, frontend: str, record: str | None, tcp: str | None,
            foreground: bool, no_tracking: bool, as_json: bool) -> None:
    """Take DISK over on this node (the record's takeover) and serve it as a tracked device.

    Takeover makes a new owner epoch durable on the disk before any write, merges every node's slot and the
    frozen set of an interrupted backup into this node's slot, and from then on records every write before it
    is acknowledged. A previous owner that is still running is fenced: its I/O fails with EIO.

    Returns when /dev/baton/NAME (fuse) or RUN_DIR/NAME.sock (nbd) is ready. Leftovers of a killed daemon
    for NAME (dead FUSE mount, loop device) are cleaned up first. A second attach of the same disk on this
    machine is refused. RUN_DIR is /run/baton (env BATON_RUN_DIR); the device link dir is /dev/baton
    (env BATON_DEV_DIR).

    \b
    Example:
      baton attach /dev/mapper/mpatha --node "$(crm_node -n)" --name data
      mkfs.ext4 /dev/baton/data && mount /dev/baton/data /srv/data
    """
    from baton.daemon import attach

    res = attach(disk, node=node, name=name, frontend=frontend, record=record, tracking=not no_tracking,
                 nbd_tcp=tcp, foreground=foreground)
    where = res.get("device") or res.get("socket") or res.get("tcp")
    emit(res, as_json, f"attached {disk} as {res['name']} on node {node} (epoch {res['epoch']}): {where}")
