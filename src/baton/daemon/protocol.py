"""The one control protocol of Baton's local daemons: the per-disk daemons (RUN_DIR/NAME/control.sock) and the
node agent (RUN_DIR/agent.sock) both speak it, through :class:`ControlServer` and :func:`request`.

Newline-delimited JSON over a unix socket (mode 0600: only root asks), one request per connection::

    -> {"op": "status", ...}                                  one JSON object
    <- {"progress": [done, total]}                            zero or more, while a long request runs
    <- {"ok": true, "result": ...}                            exactly one answer, last
    <- {"ok": false, "error": "RepoLocked", "message": ..., "hint": ...}

``error`` names a class of :mod:`baton.errors`; the client raises that class again (an unknown name, or a
failure that is not a Baton error, becomes the caller's ``default``, DaemonError), so the exit code of the
command that asked is the one the error would have had in-process. Every failure of a request is answered,
never swallowed; one that is not a Baton error is also logged with its traceback.

One module, two halves: the client half (:func:`request`, :func:`raise_reply`, :func:`read_ready`,
:func:`spawn_until_ready`, which imports ``subprocess`` when it runs) is what
every command that asks a daemon imports, so the module's own imports are only what that half needs (socket,
json, the errors); the server half (:class:`ControlServer`, :class:`AfterReply`, :func:`error_reply`) imports
``logging`` where it logs a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from baton import errors
from baton.errors import BatonError, DaemonError

if TYPE_CHECKING:
    import subprocess
    from pathlib import Path

Progress = Callable[[int, int], None]
Handler = Callable[[dict[str, Any], Progress], Any]

PROGRESS_INTERVAL = 0.5  # seconds between progress lines (the last one, done == total, is always sent)
REQUEST_READ_TIMEOUT = 60.0  # seconds a client may take to send its request line


class AfterReply:
    """A handler's result plus what to do once the answer has been sent (a detach ends the daemon only after
    its client has the answer)."""

    __slots__ = ("result", "then")

    def __init__(self, result: Any, then: Callable[[], None]) -> None:
        self.result = result
        self.then = then


def error_reply(e: BaseException) -> dict[str, Any]:
    """The answer for a failed request."""
    if isinstance(e, BatonError):
        return {"ok": False, "error": errors.public_name(e), "message": str(e), "hint": e.hint}
    return {"ok": False, "error": "BatonError", "message": f"{type(e).__name__}: {e}"}


def read_ready(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any] | None:
    """The first line a starting daemon writes to its ready pipe (read end ``fd``, closed here), as a reply
    (``{"ok": ...}``); None when the daemon exits, closes the pipe or stays silent for ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    with os.fdopen(fd, "rb") as rf:
        while time.monotonic() < deadline and b"\n" not in buf:
            ready, _, _ = select.select([rf], [], [], 0.5)
            if ready:
                chunk = rf.read1(65536)
                if not chunk:
                    break
                buf += chunk
            elif proc.poll() is not None:
                break
    line = buf.split(b"\n", 1)[0]
    if not line:
        return None
    msg: dict[str, Any] = json.loads(line)
    return msg


READY_TIMEOUT = 60.0  # seconds a starting daemon has to say it is ready (or why not) on its ready pipe


def spawn_until_ready(argv: list[str], log: Path, *, what: str, env: dict[str, str] | None = None,
                      on_refused: Callable[[], None] | None = None, timeout: float = READY_TIMEOUT) -> Any:
    """Start a daemon (a new session; stdin /dev/null; stdout and stderr appended to ``log``) with the write end
    of a ready pipe as its last argument, and return the result of the one line it writes there
    (:func:`read_ready`). The per-disk daemons and the mount daemons start this way.

    A daemon that answers with an error has given up: it gets 10 s to exit, ``on_refused`` cleans up after it
    (OSError ignored), and the error is raised as its Baton class. One that exits, closes the pipe or stays
    silent for ``timeout`` seconds without answering is stopped (SIGTERM) if still running, and DaemonError
    names ``what``, how it ended (exit status, signal, or silence) and ``log``."""
    import signal
    import subprocess

    logf = open(log, "ab")  # noqa: SIM115 - handed to the child
    r, w = os.pipe()
    try:
        proc = subprocess.Popen([*argv, str(w)], pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=logf, start_new_session=True, close_fds=True, env=env)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
        logf.close()
    msg = read_ready(r, proc, timeout)
    if msg is None:
        # It closed the pipe (exiting: reaped within moments) or stayed silent (still running: stopped).
        try:
            rc: int | None = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            rc = None
            os.kill(proc.pid, signal.SIGTERM)
        how = (f"gave no answer within {timeout:.0f} s and was stopped" if rc is None
               else f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}")
        raise DaemonError(f"{what} did not become ready: it {how}", hint=f"its log says why: see {log}")
    if not msg.get("ok"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if on_refused is not None:
            with contextlib.suppress(OSError):
                on_refused()
        raise_reply(msg)
    return msg.get("result")


def raise_reply(msg: dict[str, Any], default: type[BatonError] = DaemonError) -> None:
    """Raise the error an ``{"ok": false, ...}`` answer carries, as its Baton class."""
    cls = getattr(errors, str(msg.get("error", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, BatonError)):
        cls = default
    raise cls(msg.get("message", "request failed"), hint=msg.get("hint", ""))


class ControlServer:
    """Answers requests on a unix socket with ``handler(request, progress) -> result``, one thread per
    connection. ``progress(done, total)`` streams progress lines to the client (at most every
    :data:`PROGRESS_INTERVAL` seconds); a result may be an :class:`AfterReply`."""

    def __init__(self, path: Path, handler: Handler, *, name: str = "control") -> None:
        self.path = path
        self.handler = handler
        self.name = name
        self.sock: socket.socket | None = None
        self.requests = 0
        self.errors = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen on ``path`` (a socket file left there is replaced: the caller owns the name) and serve."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        os.fchmod(s.fileno(), 0o600)  # the socket file takes the inode's mode: no one else can connect at all
        s.bind(str(self.path))
        os.chmod(self.path, 0o600)
        s.listen(16)
        self.sock = s
        self._thread = threading.Thread(target=self._accept, name=self.name, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        sock = self.sock
        assert sock is not None
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._handle, args=(conn,), name=f"{self.name}-request", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        then: Callable[[], None] | None = None
        with conn:
            f = conn.makefile("rw")
            self.requests += 1

            def send(msg: dict[str, Any]) -> None:
                f.write(json.dumps(msg, default=str) + "\n")
                f.flush()

            last = [0.0]

            def progress(done: int, total: int) -> None:
                now = time.monotonic()
                if now - last[0] >= PROGRESS_INTERVAL or done == total:
                    last[0] = now
                    send({"progress": [done, total]})

            try:
                conn.settimeout(REQUEST_READ_TIMEOUT)
                req = json.loads(f.readline() or "{}")
                conn.settimeout(None)  # a backup answers after hours; it streams progress meanwhile
                if not isinstance(req, dict):
                    raise errors.UsageError("a request is a JSON object")
                result = self.handler(req, progress)
                if isinstance(result, AfterReply):
                    result, then = result.result, result.then
                msg: dict[str, Any] = {"ok": True, "result": result}
            except BaseException as e:  # every failure is answered, never swallowed
                self.errors += 1
                if not isinstance(e, BatonError):
                    import logging

                    logging.getLogger("baton.control").exception("control.request_failed")
                msg = error_reply(e)
            with contextlib.suppress(OSError):
                send(msg)
        if then is not None:
            then()

    def stop(self) -> None:
        """Stop listening, wait for the accept thread, remove the socket file."""
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


def request(path: str | Path, op: dict[str, Any], *, peer: str, hint: str = "", timeout: float | None = 30.0,
            on_progress: Progress | None = None) -> Any:
    """Send one request to the server at ``path`` and return its result; its error is raised as its Baton
    class. ``peer`` names the server in errors ("the daemon of NAME"); ``hint`` says what to do when it cannot
    be reached. DaemonError when nothing answers, the connection closes early, or ``timeout`` passes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise DaemonError(f"cannot reach {peer} at {path}: {e.strerror or e}", hint=hint) from None
        s.sendall((json.dumps(op) + "\n").encode())
        for line in s.makefile("r"):
            msg = json.loads(line)
            if "progress" in msg:
                if on_progress is not None:
                    on_progress(*msg["progress"])
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise_reply(msg)
        raise DaemonError(f"{peer} closed the connection without an answer (did it die?)")
    except TimeoutError:
        raise DaemonError(f"{peer} did not answer within {timeout} s") from None
    finally:
        s.close()
