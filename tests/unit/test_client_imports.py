"""`baton backup NAME` talks to a running daemon: its client path must not import the record, tracker or
repository code (they cost about 100 ms of start-up per command, most of a small incremental's client time)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("baton.record.core", "baton.format.record", "crc32c", "baton.tracker.core", "baton.repo", "baton.backup",
         "baton.daemon.offline", "baton.host.inuse", "blake3", "zstandard")


def test_backup_client_path_imports_no_engine_code() -> None:
    code = ("import json, sys\n"
            "import baton.cli, baton.cli.cmd_backup\n"
            "from baton.daemon import backup, request, daemon_gone\n"
            "from baton.storage import check_url\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    loaded = set(json.loads(p.stdout))
    assert not [m for m in HEAVY if m in loaded], sorted(m for m in loaded if m.startswith(HEAVY))


def test_lazy_daemon_names_still_resolve() -> None:
    from baton import daemon
    from baton.daemon.offline import offline_backup, open_tracker

    assert daemon.offline_backup is offline_backup and daemon.open_tracker is open_tracker
