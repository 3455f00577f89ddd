"""Baton's command line: parse, call, render. The only place errors become exit codes.

Each subcommand lives in its own module ``baton.cli.cmd_<name>`` exposing a click command named ``command``;
they are imported lazily (by the group in :mod:`baton.cli.app`) so ``baton --help`` and the hot commands start
fast. This module itself does not import click: ``baton backup NAME --repo URL``, the command a cluster's timer
runs on every node, skips the parser library when its arguments are of the plain forms
:func:`baton.cli.backup_client.fast_args` accepts (the same code then runs as under click).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from baton.cli.common import COMMANDS, HIDDEN, echo, emit, json_error, progress_bar
from baton.errors import BatonError, UsageError, exit_code, public_name

__all__ = ["COMMANDS", "HIDDEN", "echo", "emit", "main", "progress_bar"]


def __getattr__(name: str) -> Any:
    """``baton.cli.cli`` (the click group) and ``LazyGroup``, from :mod:`baton.cli.app` when first asked for."""
    if name in ("cli", "LazyGroup"):
        from baton.cli import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        fast = None
        if args[:1] == ["backup"]:
            from baton.cli import backup_client

            fast = backup_client.fast_args(args[1:])
        if fast is not None:
            backup_client.run(**fast)
        else:
            from baton.cli.app import cli

            rv = cli.main(args=args, prog_name="baton", standalone_mode=False)
            if isinstance(rv, int) and rv:
                sys.exit(rv)
    except BatonError as err:
        code = exit_code(err)
        if as_json:
            json_error(public_name(err), str(err), err.hint, code)
        echo(f"baton: error: {err.user_message()}", err=True)
        sys.exit(code)
    except KeyboardInterrupt:
        if as_json:
            json_error("Interrupted", "interrupted", "", 130)
        echo("baton: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        os._exit(1)
    except Exception as err:
        click = sys.modules.get("click")  # click's own errors can only come from a run that imported it
        if click is not None and isinstance(err, click.exceptions.Abort):
            if as_json:
                json_error("Aborted", "aborted", "", 130)
            echo("baton: aborted", err=True)
            sys.exit(130)
        if click is not None and isinstance(err, click.ClickException):
            code = exit_code(UsageError("")) if isinstance(err, click.UsageError) else 1
            if as_json:
                ctx = getattr(err, "ctx", None)
                hint = f"see `{ctx.command_path} --help`" if ctx is not None else "see `baton --help`"
                json_error("UsageError" if code == 2 else "BatonError", err.format_message(), hint, code)
            err.show()
            sys.exit(code)
        # A bug: say so plainly, with a non-zero exit, never a bare traceback.
        if os.environ.get("BATON_TRACEBACK") == "1":
            raise
        msg = f"internal error: {type(err).__name__}: {err}"
        hint = "this is a bug in Baton; BATON_TRACEBACK=1 shows the traceback for a report"
        if as_json:
            json_error("InternalError", msg, hint, 1)
        echo(f"baton: error: {msg}\n  hint: {hint}", err=True)
        sys.exit(1)
    sys.exit(0)
