"""A test daemon that serves the fake tracker (:class:`baton.testing.fake_tracker.FakeTracker`) through the FUSE
frontend, so tests can drive the real kernel path and kill the serving process with SIGKILL.

``python -m baton.testing.fuse_daemon --backing FILE --name NAME --run-dir DIR --dev-dir DIR ...`` prints one
JSON object per line on stdout: ``{"event": "ready", "device": ..., "loop": ..., "pid": ...}`` first (or
``{"event": "error", ...}``), then one reply per command read from stdin (one per line): ``stats``, ``dirty``
(the sorted list of dirty chunks), ``reset`` (clear the bitmap), ``hold`` / ``release`` (hold writes at a
gate), ``stop`` / ``stop-force``. It exits when the frontend stops (after a stop command, when fenced, or on
EOF of stdin, which stops it), after ``{"event": "stopped", "failure": ..., "failure_kind": ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path

from baton.errors import BatonError, exit_code
from baton.testing.fake_tracker import FakeTracker


def _emit(obj: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    from baton.frontends.fuse import FuseFrontend

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backing", type=Path, required=True)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=64 * 1024)
    p.add_argument("--name", required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--dev-dir", type=Path, required=True)
    p.add_argument("--fence-after", type=int, default=None)
    p.add_argument("--request-timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    tracker = FakeTracker(a.backing, a.size, a.chunk_size, fence_after_writes=a.fence_after)
    fe = FuseFrontend(tracker, a.name, a.run_dir, a.dev_dir, request_timeout=a.request_timeout)
    try:
        endpoint = fe.start()
    except BatonError as exc:
        _emit({"event": "error", "error": type(exc).__name__, "message": str(exc)})
        return exit_code(exc)
    _emit({"event": "ready", "device": endpoint.device, "loop": fe.loop_device, "pid": os.getpid(),
           "diskseq": fe.state.loop_diskseq if fe.state else None,
           "state": str(fe.state_path)})

    stopping = threading.Event()

    def commands() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            try:
                if cmd == "stats":
                    _emit({"frontend": fe.statistics(), "tracker": tracker.statistics()})
                elif cmd == "dirty":
                    _emit({"dirty": tracker.dirty_chunks()})
                elif cmd == "reset":
                    tracker.clear_dirty()
                    _emit({"ok": True})
                elif cmd == "hold":
                    tracker.hold()
                    _emit({"ok": True})
                elif cmd == "release":
                    tracker.release()
                    _emit({"ok": True})
                elif cmd in ("stop", "stop-force"):
                    stopping.set()
                    fe.stop(force=cmd == "stop-force")
                    _emit({"ok": True})
                    return
                else:
                    _emit({"ok": False, "error": "UsageError", "message": f"unknown command {cmd!r}"})
            except BatonError as exc:
                _emit({"ok": False, "error": type(exc).__name__, "message": str(exc)})
        tracker.release()
        fe.stop(force=True)  # stdin closed: the test went away

    reader = threading.Thread(target=commands, daemon=True)
    reader.start()
    fe.wait()
    if stopping.is_set():
        reader.join(5.0)  # let the "stop" reply out first; a reader blocked on stdin is simply abandoned
    failure = fe.failure
    _emit({"event": "stopped", "failure": str(failure) if failure is not None else None,
           "failure_kind": failure.kind.value if failure is not None else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
