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
@click.option("--frontend", type=click.Choice(frontends.choices()), default=frontends.AUTO, show_default=True,
              help="dm: /dev/baton/NAME, a device-mapper stack whose writes dm-era tracks in the kernel (near "
                   "native speed; needs device-mapper with dm-era and dm-snapshot, and a format-v3 record). "
                   "fuse: /dev/baton/NAME, a loop device over a FUSE file (any kernel with FUSE and loop). nbd: "
                   "an NBD export on RUN_DIR/NAME.sock for QEMU and NBD clients. auto: dm where it can run, "
                   "else fuse; `status --json` says which was chosen and why (frontend, frontend_reason).")
@click.option("--record", metavar="SPEC", help="external:RECORD_DISK[#SLOT] if the record is on a record disk.")
@click.option("--tcp", metavar="HOST:PORT", help="With --frontend nbd: listen on TCP at this address instead "
              "of the unix socket (only when asked; bind to a private address).")
@click.option("--cow-size", metavar="SIZE|PCT%",
              help="dm: the size of a backup's exception store, where the old content of chunks the application "
                   "rewrites during a backup is kept (a sparse file under BATON_SPILL_DIR, default /var/tmp; only "
                   "copied chunks use space). A size (2G) or a share of the disk (15%). Default: 10% of the disk, "
                   "at least 64 chunks. A store that overflows fails that backup, never the application's writes.")
@click.option("--foreground", is_flag=True, help="Serve in this process instead of a background daemon.")
@click.option("--no-tracking", is_flag=True,
              help="Benchmarks only: serve without recording writes, to measure what tracking costs. Backups "
                   "of the disk then miss those writes: never use it for data you back up.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(disk: str, node: str, name: str | None, frontend: str, record: str | None, tcp: str | None,
            cow_size: str | None, foreground: bool, no_tracking: bool, as_json: bool) -> None:
    """Take DISK over on this node (the record's takeover) and serve it as a tracked device.

    Takeover makes a new owner epoch durable on the disk before any write, merges every node's slot and the
    frozen set of an interrupted backup into this node's slot, and from then on records every write before it
    is acknowledged. A previous owner that is still running is fenced: its I/O fails with EIO.

    With dm, the kernel (dm-era) records every write before it is issued, in metadata kept inside the record
    area, and Baton folds it into the record at attach, at every backup and at detach. I/O does not go through
    the daemon: a killed daemon leaves the device serving and tracking, and attaching again on this node
    adopts it. The daemon still fences: when another node takes the disk over, /dev/baton/NAME fails every
    I/O within about a second (STONITH or SCSI reservations stay the primary fence). A record a dm owner left
    without detaching is folded through a temporarily loaded era target when another frontend attaches it, or,
    on a node without dm-era, the next backup is full with that reason.

    Returns when /dev/baton/NAME (fuse, dm) or RUN_DIR/NAME.sock (nbd) is ready. Leftovers of a killed daemon
    for NAME (dead FUSE mount, loop device, a dm stack no longer adoptable) are cleaned up first. A second
    attach of the same disk on this machine is refused. RUN_DIR is /run/baton (env BATON_RUN_DIR); the device
    link dir is /dev/baton (env BATON_DEV_DIR).

    \b
    Example:
      baton attach /dev/mapper/mpatha --node "$(crm_node -n)" --name data
      mkfs.ext4 /dev/baton/data && mount /dev/baton/data /srv/data
    """
    from baton.daemon import attach

    res = attach(disk, node=node, name=name, frontend=frontend, record=record, tracking=not no_tracking,
                 nbd_tcp=tcp, foreground=foreground, cow_size=cow_size)
    where = res.get("device") or res.get("socket") or res.get("tcp")
    emit(res, as_json, f"attached {disk} as {res['name']} on node {node} (epoch {res['epoch']}): {where}\n"
         f"frontend {res.get('frontend')}: {res.get('frontend_reason') or '-'}")
