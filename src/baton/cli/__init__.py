"""Baton's command line: parse, call, render. The only place errors become exit codes.

Each subcommand lives in its own module ``baton.cli.cmd_<name>`` exposing a click command named ``command``;
they are imported lazily so ``baton --help`` and the hot commands start fast.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from baton import __version__
from baton.errors import BatonError, UsageError, exit_code, public_name

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


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n in COMMANDS if n not in HIDDEN]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        try:
            mod = importlib.import_module(entry[0])
        except ModuleNotFoundError as e:
            if e.name == entry[0]:
                return None
            raise
        cmd: click.Command = mod.command
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][1]) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="baton")
def cli() -> None:
    """Baton keeps block-level backups of failover-cluster shared disks incremental.

    The change record lives on the shared disk itself, so whichever node takes the disk over continues it,
    and every backup after any number of failovers and crashes reads only what changed.

    \b
    Typical flow:
      baton init /dev/sdb                      # once, from any node
      baton attach /dev/sdb --node n1          # on the owner (or via the ocf:baton:disk agent)
      baton repo init /backup/repo             # once
      baton backup sdb --repo /backup/repo     # incremental after the first, on whichever node owns it
      baton restore SNAP --repo /backup/repo --to /dev/sdc

    Exit codes: 0 ok, 1 error, 2 usage, 3 device, 4 record, 5 fenced, 6 not owner (or not attached here),
    7 repository, 8 daemon (not reachable, died or fenced), 9 verify failed. Data goes to stdout, progress and
    messages to stderr; every command has --json, and under --json every error (usage errors too) also prints
    one JSON object on stdout: {"error", "message", "hint", "exit_code"}.
    """


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


def emit(data: Any, as_json: bool, human: str | None = None) -> None:
    """Print a result: JSON on stdout with --json, otherwise the human rendering."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))
    elif human is not None:
        click.echo(human)


def _json_error(error: str, message: str, hint: str, code: int) -> None:
    """The one shape of an error under --json: a single JSON object on stdout (the text still goes to stderr)."""
    click.echo(json.dumps({"error": error, "message": message, "hint": hint, "exit_code": code}))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the group and maps errors to exit codes (the only place that does).

    With ``--json`` anywhere among the arguments, every failure (Baton's errors, click's usage errors, an
    interrupt, an unexpected exception) also prints one JSON object on stdout:
    ``{"error", "message", "hint", "exit_code"}``. No Python traceback reaches the user unless
    BATON_TRACEBACK=1 asks for it.
    """
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        rv = cli.main(args=args, prog_name="baton", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except BatonError as err:
        code = exit_code(err)
        if as_json:
            _json_error(public_name(err), str(err), err.hint, code)
        click.echo(f"baton: error: {err.user_message()}", err=True)
        sys.exit(code)
    except click.exceptions.Abort:
        if as_json:
            _json_error("Aborted", "aborted", "", 130)
        click.echo("baton: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        code = exit_code(UsageError("")) if isinstance(err, click.UsageError) else 1
        if as_json:
            ctx = getattr(err, "ctx", None)
            hint = f"see `{ctx.command_path} --help`" if ctx is not None else "see `baton --help`"
            _json_error("UsageError" if code == 2 else "BatonError", err.format_message(), hint, code)
        err.show()
        sys.exit(code)
    except KeyboardInterrupt:
        if as_json:
            _json_error("Interrupted", "interrupted", "", 130)
        click.echo("baton: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        os._exit(1)
    except Exception as err:  # a bug: say so plainly, with a non-zero exit, never a bare traceback
        if os.environ.get("BATON_TRACEBACK") == "1":
            raise
        msg = f"internal error: {type(err).__name__}: {err}"
        hint = "this is a bug in Baton; BATON_TRACEBACK=1 shows the traceback for a report"
        if as_json:
            _json_error("InternalError", msg, hint, 1)
        click.echo(f"baton: error: {msg}\n  hint: {hint}", err=True)
        sys.exit(1)
    sys.exit(0)
