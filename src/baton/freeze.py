"""Consistent backups: ``--pre``/``--post`` hooks and ``fsfreeze`` around a backup's freeze point, and only there.

:class:`Consistency` is what ``run_backup(around_freeze=...)`` calls: a context manager wrapped around the
tracker's freeze (``Tracker.begin_backup``: the write barrier drains, the owner's set becomes the frozen set).
In order::

    --pre CMD (timeout)  ->  fsfreeze -f MOUNTPOINT  ->  [freeze point]  ->  fsfreeze -u  ->  --post CMD (timeout)

* The file system is frozen only for the freeze point itself (milliseconds: a record sync), never for the copy:
  copy-before-write keeps the snapshot point-in-time while writes go on.
* It is thawed on every path: the freeze point failed, an exception, SIGTERM/SIGINT/SIGHUP while frozen (the
  handlers thaw, then re-raise as an interrupt; installed only when on the main thread), and a watchdog thread
  thaws after ``freeze_timeout`` seconds whatever the caller is doing (the report then says ``timed_out``).
* ``--post`` runs whenever ``--pre`` ran, also when the freeze or the freeze point failed (a database left in
  backup mode is worse than a failed backup).
* A failing ``--pre`` (non-zero exit, timeout) or ``fsfreeze -f`` stops the backup before its freeze point;
  nothing is frozen or changed. A failing ``--post`` or thaw does not undo the snapshot (it is committed and
  point-in-time); :meth:`Consistency.problem` says what failed, and the caller reports it with the snapshot id.

``report`` (kept in the manifest's ``info["consistency"]`` and in ``backup --json``): per hook the command, exit
status, seconds and the tail of its output; for the freeze the mount point, the window (seconds between
``fsfreeze -f`` returning and ``fsfreeze -u`` returning) and whether the watchdog thawed it. The record's history
entry has a fixed layout with no room for these (docs/format.md "History entry"), so they are not there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from baton.errors import BatonError, UsageError

OUTPUT_TAIL = 2000  # characters of a hook's output kept
DEFAULT_HOOK_TIMEOUT = 300.0
DEFAULT_FREEZE_TIMEOUT = 30.0
FSFREEZE_TIMEOUT = 60.0  # fsfreeze -f waits for dirty data to reach the disk


def _tail(text: str) -> str:
    return text[-OUTPUT_TAIL:]


def run_hook(cmd: str, what: str, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` with ``sh -c`` (stdin closed, stdout+stderr captured); its exit status, output tail, time."""
    t0 = time.monotonic()
    try:
        p = subprocess.run(["sh", "-c", cmd], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout, check=False)
        out = {"command": cmd, "exit_status": p.returncode, "timed_out": False,
               "output_tail": _tail(p.stdout.decode("utf-8", "replace"))}
    except subprocess.TimeoutExpired as e:
        raw = e.stdout or b""
        out = {"command": cmd, "exit_status": None, "timed_out": True,
               "output_tail": _tail(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))}
    out["seconds"] = round(time.monotonic() - t0, 4)
    out["hook"] = what
    return out


def _fsfreeze(flag: str, mountpoint: str, timeout: float) -> tuple[bool, str]:
    try:
        p = subprocess.run(["fsfreeze", flag, mountpoint], capture_output=True, text=True, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired:
        return False, f"fsfreeze {flag} {mountpoint} did not finish within {timeout:g} s"
    except FileNotFoundError:
        return False, "fsfreeze is not installed (util-linux)"
    return p.returncode == 0, (p.stderr or p.stdout).strip()


class Consistency:
    """``around_freeze`` for :func:`baton.backup.run_backup` (see the module docstring). Call it once."""

    def __init__(self, *, freeze: str | None = None, pre: str | None = None, post: str | None = None,
                 hook_timeout: float = DEFAULT_HOOK_TIMEOUT, freeze_timeout: float = DEFAULT_FREEZE_TIMEOUT
                 ) -> None:
        if freeze is not None:
            freeze = os.path.abspath(freeze)
            if not os.path.isdir(freeze) or not os.path.ismount(freeze):
                raise UsageError(f"--freeze {freeze}: not a mount point",
                                 hint="give the directory where the disk's file system is mounted")
        if hook_timeout <= 0 or freeze_timeout <= 0:
            raise UsageError("hook and freeze timeouts must be positive")
        self.freeze, self.pre, self.post = freeze, pre, post
        self.hook_timeout, self.freeze_timeout = hook_timeout, freeze_timeout
        self.report: dict[str, Any] = {}

    @classmethod
    def from_options(cls, opts: dict[str, Any] | None) -> Consistency | None:
        """From the JSON-able options a backup request carries (None: nothing asked)."""
        if not opts or not any(opts.get(k) for k in ("freeze", "pre", "post")):
            return None
        return cls(freeze=opts.get("freeze"), pre=opts.get("pre"), post=opts.get("post"),
                   hook_timeout=float(opts.get("hook_timeout") or DEFAULT_HOOK_TIMEOUT),
                   freeze_timeout=float(opts.get("freeze_timeout") or DEFAULT_FREEZE_TIMEOUT))

    def problem(self) -> str:
        """What went wrong after the freeze point ("" if nothing): a failed --post, a failed or late thaw."""
        out = []
        post = self.report.get("post")
        if post and (post["exit_status"] != 0):
            status = "timed out" if post["timed_out"] else f"exit status {post['exit_status']}"
            out.append(f"the --post hook failed ({status}): {post['output_tail'][-300:].strip()}")
        fr = self.report.get("freeze")
        if fr and fr.get("thaw_error"):
            out.append(f"thawing {fr['mountpoint']} failed: {fr['thaw_error']} (run `fsfreeze -u {fr['mountpoint']}`)")
        if fr and fr.get("timed_out"):
            out.append(f"the freeze of {fr['mountpoint']} lasted longer than {self.freeze_timeout:g} s; the watchdog "
                       "thawed it")
        return "; ".join(out)

    def __call__(self) -> Any:
        return self._around()

    @contextmanager
    def _around(self) -> Iterator[None]:
        ran_pre = reached = False  # --post runs after the freeze point was reached, or to undo a --pre that ran
        try:
            if self.pre:
                ran_pre = True
                r = self.report["pre"] = run_hook(self.pre, "pre", self.hook_timeout)
                if r["exit_status"] != 0:
                    status = "timed out" if r["timed_out"] else f"exit status {r['exit_status']}"
                    raise BatonError(f"the --pre hook failed ({status}); no backup taken: "
                                     f"{r['output_tail'][-500:].strip()}",
                                     hint="fix the hook (it runs with sh -c), or run the backup without it")
            if self.freeze:
                with self._frozen():
                    reached = True
                    yield
            else:
                reached = True
                yield
        finally:
            if (ran_pre or reached) and self.post:
                self.report["post"] = run_hook(self.post, "post", self.hook_timeout)

    @contextmanager
    def _frozen(self) -> Iterator[None]:
        mp = self.freeze
        assert mp is not None
        fr: dict[str, Any] = {"mountpoint": mp, "window_s": None, "timed_out": False, "thaw_error": ""}
        self.report["freeze"] = fr
        t0 = time.monotonic()
        ok, msg = _fsfreeze("-f", mp, FSFREEZE_TIMEOUT)
        fr["freeze_s"] = round(time.monotonic() - t0, 4)
        if not ok:
            # A timed-out fsfreeze -f may still complete: thaw to be sure (an unfrozen fs answers EINVAL).
            _fsfreeze("-u", mp, FSFREEZE_TIMEOUT)
            raise BatonError(f"cannot freeze {mp}: {msg}; no backup taken",
                             hint="--freeze needs a mounted file system that supports freezing (ext4, xfs)")
        frozen_at = time.monotonic()
        lock = threading.Lock()
        thawed = threading.Event()

        def thaw(why: str = "") -> None:
            with lock:
                if thawed.is_set():
                    return
                ok, msg = _fsfreeze("-u", mp, FSFREEZE_TIMEOUT)
                fr["window_s"] = round(time.monotonic() - frozen_at, 6)
                if not ok:
                    fr["thaw_error"] = msg
                if why:
                    fr[why] = True
                thawed.set()

        def watchdog() -> None:
            if not thawed.wait(self.freeze_timeout):
                thaw("timed_out")

        threading.Thread(target=watchdog, name="baton-thaw-watchdog", daemon=True).start()
        saved: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            def on_signal(signum: int, frame: FrameType | None) -> None:
                thaw("signalled")
                raise KeyboardInterrupt(f"signal {signum} while {mp} was frozen (thawed)")

            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                saved[sig] = signal.signal(sig, on_signal)
        try:
            yield
        finally:
            thaw()
            for signum, handler in saved.items():
                signal.signal(signum, handler)


def with_consistency(opts: dict[str, Any] | None, run: Any) -> dict[str, Any]:
    """``run(around_freeze)`` (a backup) with the consistency ``opts`` of a backup request (``freeze``, ``pre``,
    ``post``, ``hook_timeout``, ``freeze_timeout``; None: none); the result gains ``consistency`` (the report).
    A failed --post or thaw after a committed snapshot raises BatonError naming the snapshot; a freeze the
    watchdog had to end is a warning in the result (the snapshot is point-in-time all the same)."""
    c = Consistency.from_options(opts)
    res: dict[str, Any] = run(c)
    if c is None:
        return res
    res["consistency"] = c.report
    fr = c.report.get("freeze") or {}
    post = c.report.get("post")
    if (post and post["exit_status"] != 0) or fr.get("thaw_error"):
        raise BatonError(f"snapshot {res.get('snapshot')} is committed and point-in-time, but {c.problem()}",
                         hint="check the application the hook serves; the snapshot itself is usable")
    if c.problem():
        res.setdefault("warnings", []).append(c.problem())
    return res
