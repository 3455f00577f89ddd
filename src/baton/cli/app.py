"""The click group behind ``baton``: the subcommands load lazily from :data:`baton.cli.COMMANDS`.

Kept out of :mod:`baton.cli` so that a command that needs no parsing library (the backup client's fast path,
see :mod:`baton.cli.backup_client`) does not import click (about 35 ms of start-up).
"""

from __future__ import annotations

import importlib

import click

from baton import __version__
from baton.cli.common import COMMANDS, HIDDEN


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
