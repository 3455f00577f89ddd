"""The agent's control socket, RUN_DIR/agent.sock: newline-delimited JSON, one request per connection.

    {"op": "status"}   -> {"ok": true, "result": {"agent": {...}, "attachments": [...]}}
    anything else      -> {"ok": false, "error": "UsageError", "message": "unknown op ..."}

Kept small on purpose: backups and detaches go to the per-disk daemons directly (``baton backup`` talks to
RUN_DIR/NAME/control.sock), so the agent is never on the data path and its restart changes nothing for them.
The socket is mode 0600: only root asks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from baton.cluster.attach import run_dir
from baton.errors import BatonError, DaemonError

log = logging.getLogger("baton.agent")


def socket_path() -> Path:
    return run_dir() / "agent.sock"


class ControlServer:
    """Answers requests with ``handler(request) -> result``; every failure is answered, never swallowed."""

    def __init__(self, path: Path, handler: Callable[[dict[str, Any]], Any]) -> None:
        self.path = path
        self.handler = handler
        self.sock: socket.socket | None = None
        self.requests = 0
        self.errors = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The caller holds the agent lock, so a socket file here is a dead agent's leftover.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.path))
        os.chmod(self.path, 0o600)
        s.listen(16)
        self.sock = s
        self._thread = threading.Thread(target=self._accept, name="agent-control", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            f = conn.makefile("rw")
            self.requests += 1
            try:
                req = json.loads(f.readline() or "{}")
                if not isinstance(req, dict):
                    raise ValueError("a request is a JSON object")
                msg: dict[str, Any] = {"ok": True, "result": self.handler(req)}
            except BaseException as e:  # answered, and logged when unexpected
                self.errors += 1
                if isinstance(e, BatonError):
                    msg = {"ok": False, "error": type(e).__name__, "message": str(e), "hint": e.hint}
                else:
                    log.exception("control.request_failed")
                    msg = {"ok": False, "error": "BatonError", "message": f"{type(e).__name__}: {e}"}
            with contextlib.suppress(OSError):
                f.write(json.dumps(msg, default=str) + "\n")
                f.flush()

    def stop(self) -> None:
        if self.sock is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone does not on Linux.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def statistics(self) -> dict[str, int]:
        return {"requests": self.requests, "errors": self.errors}


def request(op: dict[str, Any], *, timeout: float = 30.0) -> Any:
    """Ask the running agent; raises DaemonError when none answers, or the agent's error as its class."""
    from baton import errors

    path = socket_path()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise DaemonError(f"no baton agent answers at {path}: {e.strerror or e}",
                              hint="start it with `baton agent` (or systemctl start baton-agent)") from None
        s.sendall((json.dumps(op) + "\n").encode())
        line = s.makefile("r").readline()
        if not line:
            raise DaemonError("the baton agent closed the connection without an answer")
        msg = json.loads(line)
        if msg.get("ok"):
            return msg.get("result")
        cls = getattr(errors, str(msg.get("error", "")), None)
        if not (isinstance(cls, type) and issubclass(cls, BatonError)):
            cls = DaemonError
        raise cls(msg.get("message", "agent error"), hint=msg.get("hint", ""))
    except TimeoutError:
        raise DaemonError(f"the baton agent did not answer within {timeout} s") from None
    finally:
        s.close()
