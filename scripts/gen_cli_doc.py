"""Generate docs/cli.md from the commands' own --help texts, so the reference always matches the code.

    python scripts/gen_cli_doc.py            # rewrite docs/cli.md
    python scripts/gen_cli_doc.py --check    # exit 1 if docs/cli.md is out of date (used by the unit tests)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

from baton.cli import COMMANDS, HIDDEN, cli

ROOT = Path(__file__).resolve().parents[1]
INTRO = """# Baton command reference

Generated from the commands' `--help` by `scripts/gen_cli_doc.py` (a unit test checks it is current).
Details of the repository commands (JSON keys, policies) are in [cli-repo.md](cli-repo.md); the
formats in [format.md](format.md); cluster set-up in [operations.md](operations.md).

## Conventions

* Data goes to stdout; progress, messages and errors go to stderr. A progress bar appears only when stderr is
  a terminal. Every command has `--json`; with it, every error (a usage error too) is also printed to stdout
  as one object, `{"error": CLASS, "message": ..., "hint": ..., "exit_code": N}`.
* Exit codes: 0 ok, 1 error, 2 usage (also an unsupported repository URL scheme), 3 device (wrong, too
  small, in use), 4 record (missing, corrupt, unsupported version, another disk's, no free slot), 5 fenced,
  6 not the owner (also: NAME is not attached on this node), 7 repository (missing, corrupt, locked, full,
  key, storage, a `--repo` that is a file), 8 daemon (not reachable; for `backup`, this node's daemon of the
  disk died or was fenced), 9 verify found damage.
* Run directory: while NAME is attached, `RUN_DIR/NAME` holds its daemon's `daemon.json`, `control.sock` and
  `daemon.log`. `detach` removes it, also when it cleans up after a killed or fenced daemon, and then prints
  the last lines of that daemon's log (JSON: `log_tail`). A daemon that refuses an attach with a stated error
  removes it too (`attach` prints that error, which is all its log held); a daemon that dies before it
  answers leaves `daemon.log` there, and `attach`'s error names it.
* Environment: `BATON_RUN_DIR` (default `/run/baton`), `BATON_DEV_DIR` (default `/dev/baton`), `BATON_NODE`
  (default for `--node`), `BATON_REPO` (default for `--repo` of `backup`), `BATON_KEY_FILE`,
  `BATON_SPILL_DIR` (copy-before-write spill files, default `/var/tmp`), `BATON_CACHE_DIR` (the chunk index's
  run files, default the system's temporary directory; and in its `chunk-index/`, this node's chunk-index
  cache, default `/var/cache/baton/chunk-index` for root), `BATON_INDEX_CACHE=off` (no chunk-index cache), and
  for S3 repositories `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`.
"""


def walk(width: int = 110) -> Iterator[tuple[str, click.Command, click.Context]]:
    """Every documented command, in docs/cli.md's order: ("baton", the group, its context), then
    ("baton NAME", ...) for each command that is not hidden, and ("baton NAME SUB", ...) for a group's
    subcommands. The man pages (packaging/man/gen_man.py) walk the same list."""
    ctx = click.Context(cli, info_name="baton", terminal_width=width, max_content_width=width)
    yield "baton", cli, ctx
    for name in COMMANDS:
        if name in HIDDEN:
            continue
        cmd = cli.get_command(ctx, name)
        if cmd is None:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx, terminal_width=width, max_content_width=width)
        yield f"baton {name}", cmd, sub
        if isinstance(cmd, click.Group):
            for sname, scmd in cmd.commands.items():
                ssub = click.Context(scmd, info_name=sname, parent=sub, terminal_width=width,
                                     max_content_width=width)
                yield f"baton {name} {sname}", scmd, ssub


def render() -> str:
    out = [INTRO]
    for path, cmd, ctx in walk():
        heading = "###" if path.count(" ") == 2 else "##"
        out.append(f"{heading} {path}\n\n```\n" + cmd.get_help(ctx) + "\n```\n")
    return "\n".join(out)


def main() -> int:
    text = render()
    path = ROOT / "docs" / "cli.md"
    if "--check" in sys.argv:
        if not path.exists() or path.read_text() != text:
            print("docs/cli.md is out of date: run python scripts/gen_cli_doc.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
