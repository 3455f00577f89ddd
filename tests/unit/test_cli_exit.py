"""A `baton` process ends without the interpreter's teardown (20-30 ms of a restore or a verify), once the rest
of a normal exit ran: threads joined, every exit handler run (the index cache saves among them), stdout and
stderr flushed, the exit status kept. Each check runs the command line in a child process of its own."""

from __future__ import annotations

import json
import subprocess
import sys

PRELUDE = (
    "import atexit, sys\n"
    "import baton.cli\n"
    "class Witness:\n"
    "    def __del__(self):\n"
    "        sys.stderr.write('teardown ran\\n')\n"
    "baton.cli.witness = Witness()\n"
    "from baton.cli.app import cli\n"
    "_main = cli.main\n"
    "def main(*args, **kw):  # as the command's own imports would, after main() started\n"
    "    atexit.register(lambda: sys.stderr.write('handler ran\\n'))\n"
    "    print('x' * 200000)  # more than a pipe's buffer: only a flush at the end writes it all\n"
    "    return _main(*args, **kw)\n"
    "cli.main = main\n"
)


def _child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_success_skips_the_teardown_after_handlers_and_flush() -> None:
    p = _child(PRELUDE + "sys.argv = ['baton', '--version']\nbaton.cli.main()\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("x" * 200000 + "\n") and "version" in p.stdout
    assert "handler ran" in p.stderr
    assert "teardown ran" not in p.stderr


def test_an_error_keeps_its_status_and_json() -> None:
    p = _child(PRELUDE + "sys.argv = ['baton', 'status', '/nonexistent/disk.img', '--json']\nbaton.cli.main()\n")
    assert p.returncode not in (0, 1), p.stderr
    err = json.loads(p.stdout.split("\n", 1)[1])
    assert err["exit_code"] == p.returncode and err["message"]
    assert "handler ran" in p.stderr and "teardown ran" not in p.stderr


def test_in_process_callers_keep_the_normal_exit() -> None:
    """main(argv) (tests, embedding) registers nothing: the caller's interpreter ends as it always does."""
    p = _child(PRELUDE + "try:\n    baton.cli.main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n")
    assert p.returncode == 0, p.stderr
    assert "teardown ran" in p.stderr
