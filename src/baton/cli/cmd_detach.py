"""baton detach: flush, mark the record clean, remove the device."""

from __future__ import annotations

import click

from baton.cli import emit


@click.command("detach")
@click.argument("name", metavar="NAME")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(name: str, as_json: bool) -> None:
    """Stop serving NAME: flush, mark the record clean, remove /dev/baton/NAME or the NBD socket.

    Refused (exit 3) while the device is mounted or open, with who holds it. If the daemon was killed or
    fenced, this cleans up what it left behind and shows the last lines of its log (JSON: was_running false,
    failure, cleaned_up, log_tail). Either way RUN_DIR/NAME is removed. Exit 8 if NAME is not attached on
    this node.
    """
    from baton.daemon import detach

    res = detach(name)
    if res.get("was_running", True):
        emit(res, as_json, f"detached {name}")
        return
    how = {"fenced": " (fenced)", "died": " (its daemon died)"}.get(res.get("failure") or "", "")
    emit(res, as_json, f"{name} was not running{how}; cleaned up")
    if not as_json and res.get("log_tail"):
        click.echo("its log ended with:\n" + "\n".join(f"  {ln}" for ln in res["log_tail"]), err=True)
