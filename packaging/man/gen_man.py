"""Write Baton's man pages, baton(8) and one baton-COMMAND(8) per command, from the commands' own --help.

    python packaging/man/gen_man.py OUTDIR [--version V]

It walks the commands with scripts/gen_cli_doc.py's ``walk`` (the same list docs/cli.md shows), so a man page
never documents an option the code does not have. Run it with the interpreter of the tree being packaged
(scripts/build-deb.sh does), so the pages describe exactly the code that ships. The date is
SOURCE_DATE_EPOCH's (the commit time in a package build), so two builds of one commit give the same pages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from gen_cli_doc import walk  # noqa: E402

WIDTH = 78  # the help text is shown as written (no-fill), so wrap it to fit an 80-column terminal


def page_name(path: str) -> str:
    """"baton repo init" -> "baton-repo-init"."""
    return path.replace(" ", "-")


def roff_text(line: str) -> str:
    """One line of help text, safe in a no-fill block: backslashes escaped, no line read as a request."""
    line = line.replace("\\", "\\e").replace("-", "\\-")
    if line.startswith((".", "'")):
        line = "\\&" + line
    return line


def render(path: str, summary: str, help_text: str, see_also: list[str], version: str, date: str) -> str:
    name = roff_text(page_name(path))
    refs = ", ".join(f"\\fB{roff_text(s)}\\fR(8)" for s in see_also)
    out = [
        f'.TH {name.upper()} 8 "{date}" "baton {version}" "Baton"',
        ".nh",  # no hyphenation, left-aligned: command names must stay whole
        ".ad l",
        ".SH NAME",
        f"{name} \\- {roff_text(summary)}",
        ".SH DESCRIPTION",
        "The text below is the command's own",
        ".B \\-\\-help",
        "(all of them: /usr/share/doc/baton/cli.md).",
        ".PP",
        ".nf",
        *(roff_text(x) for x in help_text.rstrip("\n").split("\n")),
        ".fi",
        ".SH EXIT STATUS",
        "0 ok, 1 error, 2 usage, 3 device, 4 record, 5 fenced, 6 not the owner, 7 repository, 8 daemon,",
        "9 verify found damage. With",
        ".B \\-\\-json",
        "every error is also printed on stdout as one JSON object.",
        ".SH SEE ALSO",
        refs,
        "",
    ]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--version", default=None, help="version shown in the footer (default: baton.__version__)")
    args = ap.parse_args()
    import baton

    version = args.version or baton.__version__
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    pages = [(path, cmd, ctx) for path, cmd, ctx in walk(WIDTH)]
    names = [page_name(p) for p, _, _ in pages]
    args.outdir.mkdir(parents=True, exist_ok=True)
    for path, cmd, ctx in pages:
        summary = cmd.get_short_help_str(limit=70) if path != "baton" else \
            "incremental block-level backups of failover-cluster shared disks"
        top = "baton" if path != "baton" else None
        parent = page_name(path.rsplit(" ", 1)[0]) if path.count(" ") == 2 else None
        if top is None:
            see = names[1:]
        else:
            see = [top] + ([parent] if parent else []) + [n for n in names if n.startswith(page_name(path) + "-")]
        text = render(path, summary, cmd.get_help(ctx), see, version, date)
        (args.outdir / f"{page_name(path)}.8").write_text(text)
    print(f"gen_man: {len(pages)} pages in {args.outdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
