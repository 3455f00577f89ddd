"""Start-up costs. `baton backup NAME` talks to a running daemon: its client path must not import the record,
tracker or repository code (they cost about 100 ms of start-up per command, most of a small incremental's client
time). Commands that do load them skip what costs start-up time for nothing: crc32c's package init, ldconfig."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

HEAVY = ("baton.record.core", "baton.format.record", "crc32c", "baton.tracker.core", "baton.repo", "baton.backup",
         "baton.daemon.offline", "baton.host.inuse", "blake3", "zstandard")


def _child_json(code: str) -> Any:
    """What ``code``, run by a fresh interpreter, prints as JSON (it must exit 0)."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_backup_client_path_imports_no_engine_code() -> None:
    code = ("import json, sys\n"
            "import baton.cli, baton.cli.cmd_backup\n"
            "from baton.daemon import backup, request, daemon_gone\n"
            "from baton.storage import check_url\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    loaded = set(_child_json(code))
    assert not [m for m in HEAVY if m in loaded], sorted(m for m in loaded if m.startswith(HEAVY))


def test_lazy_daemon_names_still_resolve() -> None:
    from baton import daemon
    from baton.daemon.offline import offline_backup, open_tracker

    assert daemon.offline_backup is offline_backup and daemon.open_tracker is open_tracker


def test_record_codec_loads_crc32c_without_the_package_init() -> None:
    """The record codec takes crc32c's C function from its extension module alone: the package's ``__init__``
    asks importlib.metadata for its version (a scan of every installed distribution, about 40 ms of every
    command that reads a record). Same function, same results as the package's."""
    code = ("import json, sys\n"
            "import baton.format.record as r\n"
            "print(json.dumps({'package_ran': 'crc32c' in sys.modules,\n"
            "                  'metadata': 'importlib.metadata' in sys.modules,\n"
            "                  'check': r.crc32c(b'123456789')}))\n")
    got = _child_json(code)
    assert got == {"package_ran": False, "metadata": False, "check": 0xE3069283}, got


def test_record_crc32c_matches_the_package() -> None:
    import os

    import crc32c as package

    from baton.format.record import crc32c

    for n in (0, 1, 7, 512, 4096, 65536 + 3):
        data = os.urandom(n)
        assert crc32c(data) == package.crc32c(data)
        assert crc32c(memoryview(bytearray(data))) == package.crc32c(data)


def test_libc_loads_without_running_ldconfig() -> None:
    """``baton.device.libc_handle`` loads glibc by name: ``ctypes.util.find_library`` runs ``ldconfig -p`` in a
    child process (about 7 ms of a restore's start)."""
    code = ("import json, sys\n"
            "import baton.device as d\n"
            "libc = d.libc_handle()\n"
            "print(json.dumps({'loaded': libc is not None and hasattr(libc, 'fallocate'),\n"
            "                  'find_library': 'ctypes.util' in sys.modules}))\n")
    assert _child_json(code) == {"loaded": True, "find_library": False}
