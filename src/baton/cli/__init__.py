"""Baton's command line: parse, call, render. The only place errors become exit codes.

Each subcommand lives in its own module ``baton.cli.cmd_<name>`` exposing a click command named ``command``;
they are imported lazily (by the group in :mod:`baton.cli.app`) so ``baton --help`` and the hot commands start
fast. This module itself does not import click: ``baton backup NAME --repo URL``, the command a cluster's timer
runs on every node, skips the parser library when its arguments are of the plain forms
:func:`baton.cli.backup_client.fast_args` accepts (the same code then runs as under click).
"""

from __future__ import annotations

import atexit
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


_EXIT: dict[str, int] = {}  # the exit status main() ended with, for _end_without_teardown


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the group and maps errors to exit codes (the only place that does).

    With ``--json`` anywhere among the arguments, every failure (Baton's errors, click's usage errors, an
    interrupt, an unexpected exception) also prints one JSON object on stdout:
    ``{"error", "message", "hint", "exit_code"}``. No Python traceback reaches the user unless
    BATON_TRACEBACK=1 asks for it.

    Run as a process's own command (``argv`` None), the process ends without the interpreter's teardown once
    everything else of a normal exit has run: see :func:`_end_without_teardown`.
    """
    if argv is None:
        atexit.register(_end_without_teardown)  # registered first, so it runs after every other exit handler
    try:
        _run(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        _EXIT["code"] = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise


def _end_without_teardown() -> None:
    """(atexit, last.) End the process now, with main()'s exit status: threads were joined and every other exit
    handler ran (the index cache saves among them); what is left is the interpreter's teardown of every module
    and object, 20-30 ms for a command that loaded the repository and record code (a restore, a verify), and
    nothing in it that a command needs: Baton's files are closed where they are written, and stdout and
    stderr are flushed here. When main() did not end with an exit status, or a flush fails (a closed pipe),
    the normal teardown runs and reports as it always did."""
    code = _EXIT.get("code")
    if code is None:
        return
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code & 0xFF)


def _run(args: list[str]) -> None:
    """main()'s body: every way out is a SystemExit with the status (or os._exit(1) on a closed pipe)."""
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
