"""baton detach: flush, mark the record clean, remove the device."""

from __future__ import annotations

import click

from baton.cli import emit


@click.command("detach")
@click.argument("name", metavar="NAME")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(name: str, as_json: bool) -> None:
    """Stop serving NAME: flush, mark the record clean, remove /dev/baton/NAME or the NBD socket.

    Refused (exit 3) while the device is mounted or open, with who holds it. If the daemon was killed, this
    cleans up what it left behind. Exit 8 if NAME is not attached on this node.
    """
    from baton.cluster.attach import detach

    res = detach(name)
    msg = f"detached {name}" if res.get("was_running", True) else f"{name} was not running; cleaned up"
    emit(res, as_json, msg)
