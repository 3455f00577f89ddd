"""What every part of the command line shares, without click: the table of subcommands, the one progress bar,
and the printing of results and of errors under --json."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

# name -> (module, one-line summary shown by `baton --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("baton.cli.cmd_init", "Create a change record for a shared disk (or format a record disk)."),
    "attach": ("baton.cli.cmd_attach", "Take a disk over on this node and serve it as /dev/baton/NAME or NBD."),
    "detach": ("baton.cli.cmd_detach", "Flush, mark the record clean and remove the tracked device."),
    "status": ("baton.cli.cmd_status", "Show a disk's record and, when attached, its live tracker."),
    "repo": ("baton.cli.cmd_repo", "Create or inspect a backup repository."),
    "backup": ("baton.cli.cmd_backup", "Back up a disk: incremental from the record, or full with a reason."),
    "restore": ("baton.cli.cmd_restore", "Restore a snapshot to a file or block device, verifying every chunk."),
    "verify": ("baton.cli.cmd_verify", "Check a repository's structure and re-hash every referenced chunk."),
    "diff": ("baton.cli.cmd_diff", "List the byte extents that differ between two snapshots of one disk."),
    "rollback": ("baton.cli.cmd_rollback", "Bring a disk back to a snapshot, writing only the chunks that differ."),
    "mount": ("baton.cli.cmd_mount", "Serve a snapshot as a read-only block device, fetched on demand."),
    "umount": ("baton.cli.cmd_umount", "Stop serving a snapshot device made by `baton mount`."),
    "snapshots": ("baton.cli.cmd_snapshots", "List the snapshots in a repository."),
    "forget": ("baton.cli.cmd_forget", "Remove snapshots by id or by retention policy."),
    "prune": ("baton.cli.cmd_prune", "Delete unreferenced data and repack, with a grace period."),
    "agent": ("baton.cli.cmd_agent", "Run the per-node agent: control socket, metrics, ownership watch."),
    "demo": ("baton.cli.cmd_demo", "Run Baton's main job end to end on a throw-away file-backed disk."),
    "serve": ("baton.cli.cmd_serve", "(internal) The per-disk daemon started by `baton attach`."),
}
HIDDEN = {"serve"}


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar, drawn on stderr (never into the data on stdout) when stderr is a terminal and the
    output is not JSON; otherwise None. The one progress bar of every command."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                  transient=True) as prog:
        task = prog.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update


def echo(text: str, *, err: bool = False) -> None:
    """One line on stdout (or stderr), flushed: click.echo's behaviour for text, without importing click."""
    stream = sys.stderr if err else sys.stdout
    stream.write(text + "\n")
    stream.flush()


def emit(data: Any, as_json: bool, human: str | None = None) -> None:
    """Print a result: JSON on stdout with --json, otherwise the human rendering."""
    if as_json:
        echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    elif human is not None:
        echo(human)


def json_error(error: str, message: str, hint: str, code: int) -> None:
    """The one shape of an error under --json: a single JSON object on stdout (the text still goes to stderr)."""
    echo(json.dumps({"error": error, "message": message, "hint": hint, "exit_code": code}))
