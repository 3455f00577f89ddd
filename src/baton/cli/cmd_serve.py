"""baton serve: the per-disk daemon (started by `baton attach`; not for direct use)."""

from __future__ import annotations

import sys

import click


@click.command("serve", hidden=True)
@click.argument("disk")
@click.option("--node", required=True)
@click.option("--name", required=True)
@click.option("--frontend", type=click.Choice(["fuse", "nbd"]), default="fuse")
@click.option("--record")
@click.option("--tcp")
@click.option("--no-tracking", is_flag=True)
@click.option("--ready-fd", type=int, default=-1)
def command(disk: str, node: str, name: str, frontend: str, record: str | None, tcp: str | None,
            no_tracking: bool, ready_fd: int) -> None:
    """Run the per-disk daemon in the foreground."""
    from baton.cluster.attach import serve

    sys.exit(serve(disk, node=node, name=name, frontend=frontend, record=record, tracking=not no_tracking,
                   tcp=tcp, ready_fd=ready_fd))
