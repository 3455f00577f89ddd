"""docs/cli.md is generated from the commands' --help; this fails when someone changed a command and not the
docs (fix: python scripts/gen_cli_doc.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cli_reference_matches_the_code() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_doc.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_every_command_has_help_and_json() -> None:
    from baton.cli import COMMANDS, HIDDEN

    text = (ROOT / "docs" / "cli.md").read_text()
    for name in COMMANDS:
        if name in HIDDEN or name == "repo":
            continue
        assert f"## baton {name}" in text
        section = text.split(f"## baton {name}\n", 1)[1].split("\n## ", 1)[0]
        assert "--json" in section, f"baton {name} has no --json"
