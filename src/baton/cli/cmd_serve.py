"""baton serve: the per-disk daemon (started by `baton attach`; not for direct use)."""

from __future__ import annotations

import logging

import click

from baton import frontends
from baton.errors import BatonError, exit_code


@click.command("serve", hidden=True)
@click.argument("disk")
@click.option("--node", required=True)
@click.option("--name", required=True)
@click.option("--frontend", type=click.Choice(frontends.choices()), default=frontends.AUTO)
@click.option("--record")
@click.option("--tcp")
@click.option("--no-tracking", is_flag=True)
@click.option("--cow-size")
@click.option("--ready-fd", type=int, default=-1)
def command(disk: str, node: str, name: str, frontend: str, record: str | None, tcp: str | None,
            no_tracking: bool, cow_size: str | None, ready_fd: int) -> None:
    """Run the per-disk daemon in the foreground. Exits 0 after a detach; otherwise with the exit code of the
    error it ended with (5 when fenced), mapped like every command's."""
    from baton.daemon.server import serve

    try:
        serve(disk, node=node, name=name, frontend=frontend, record=record, tracking=not no_tracking, tcp=tcp,
              ready_fd=ready_fd, cow_size=cow_size)
    except BatonError as e:
        # The daemon's log (its stderr) says how it ended, in the same words the agent and operators look for.
        logging.getLogger("baton.daemon").error("exiting with status %s (%s: %s)", exit_code(e), type(e).__name__, e)
        raise
