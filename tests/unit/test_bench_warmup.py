"""The benchmark's warm-up for Baton (bench.batonctl.Baton.warm_commands) must run: ColdCache counts a warm-up
whatever its exit status, so a module renamed under WARM_IMPORTS would leave Baton's engines cold in every timed
run without anyone noticing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.batonctl import Baton, interpreter_of  # noqa: E402


def test_every_warm_command_exits_0(tmp_path: Path) -> None:
    b = Baton(tmp_path, exe=str(Path(sys.executable).with_name("baton")))
    cmds = b.warm_commands("restore")
    assert cmds[0][1:] == ["restore", "--help"]
    assert len(cmds) == 2 and cmds[1][0] == b.python, cmds  # the venv's console script has a #! interpreter
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=b.env | {"PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, (cmd, r.stderr[-2000:])


def test_interpreter_of(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_text("#!/opt/x/bin/python3.11 -E\nprint(1)\n")
    assert interpreter_of(str(script)) == "/opt/x/bin/python3.11"
    script.write_text("#!/bin/sh\necho 1\n")
    assert interpreter_of(str(script)) is None
    script.write_bytes(b"\x7fELF\x02\x01")
    assert interpreter_of(str(script)) is None
    assert interpreter_of(str(tmp_path / "missing")) is None
