"""The client side of the per-disk daemon: spawn it (attach), ask it (request, status, backup), end it
(detach), and explain a dead one (:func:`daemon_gone`). Used by the CLI, the agent and the resource agent's
commands; none of them touches a daemon's files or socket in any other way.

`baton backup NAME` and `baton status NAME` are a request to a running daemon: this module imports at the top
only what they need (the protocol's client half, the state files as str paths, the errors). The frontends
(and through them the tracker) are imported by :func:`attach` and the clean-up of a dead daemon, which use
them, and ``subprocess`` by the spawn (:func:`baton.daemon.protocol.spawn_until_ready`); the record code only
where a disk's record is read.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from baton.daemon import protocol
from baton.daemon.runtime import (
    check_name,
    control_path,
    control_path_str,
    default_name,
    dev_dir,
    log_path,
    log_tail,
    remove_run_dir,
    run_dir,
    state_path,
)
from baton.errors import BatonError, DaemonError, DeviceBusy, DeviceError, NotAttached, UsageError
from baton.host.attachments import attachments, read_state
from baton.util import pid_alive


def request(name: str, op: dict[str, Any], *, timeout: float | None = 30.0,
            on_progress: Callable[[int, int], None] | None = None) -> Any:
    """Send one request to NAME's daemon and return its result; errors re-raised as their Baton class."""
    return protocol.request(control_path_str(name), op, peer=f"the daemon of {name}", timeout=timeout,
                            on_progress=on_progress,
                            hint=f"is {name} attached on this node? see `baton status {name}`")


# ------------------------------------------------------------------------------------------------ attach


def _cleanup_stale(name: str, st: dict[str, Any], *, keep_frontend: bool = False) -> list[str]:
    """Remove what NAME's dead daemon left behind (its frontend's leftovers, its files, RUN_DIR/NAME).

    The last lines of the dead daemon's log are kept in the returned list ("log: ..."), since its directory
    goes; raises DeviceBusy (keeping everything) while its frontend's leftovers are still in use (a file
    system on its device is still mounted). ``keep_frontend``: leave the frontend's leftovers for the next
    daemon to adopt (a dm stack keeps serving and tracking without its daemon).
    """
    done: list[str] = []
    # A killed daemon that is a zombie is not waited for: by then the kernel has closed its files, its FUSE
    # connection and its locks, and it holds only its pid until its parent (init, or the cluster's process
    # that started `baton attach`) reaps it. Waiting for the reap cost a takeover up to 1.2 s where init
    # reaps late. A daemon still inside its exit is the frontend's case (FUSE: _unwedge_dying_daemon).
    from baton import frontends

    kind = str(st.get("frontend") or "")
    if kind in frontends.kinds() and not keep_frontend:
        config = frontends.FrontendConfig(name=name, run_dir=run_dir(), dev_dir=dev_dir())
        done += frontends.get(kind).cleanup_stale(config)
    tail = log_tail(name)
    for p in (control_path(name), state_path(name)):
        if p.exists() and not p.is_dir():
            with contextlib.suppress(OSError):
                p.unlink()
                done.append(f"removed {p}")
    removed = remove_run_dir(name)
    done += removed
    if removed:
        done += [f"log: {ln}" for ln in tail]
    return done


def attach(disk: str, *, node: str, name: str | None = None, frontend: str | None = None,
           record: str | None = None, tracking: bool = True, nbd_tcp: str | None = None, foreground: bool = False,
           cow_size: str | None = None) -> dict[str, Any]:
    """Take ``disk`` over on this node and serve it; returns once the device (or socket) is ready.

    Spawns ``baton serve`` (:func:`baton.daemon.server.serve`) as a new session with its stderr in
    RUN_DIR/NAME/daemon.log, and waits for the one line it writes on its ready pipe: the state it published, or
    the error that stopped it (raised here as its Baton class). ``foreground`` execs the daemon instead.
    ``frontend`` is a kind or ``auto``, the default (the daemon chooses: :func:`baton.frontends.choose`). A dm
    stack that NAME's dead daemon left serving is left for the new daemon to adopt when it may be dm again.
    """

    from baton import frontends

    if frontend is None:
        frontend = frontends.AUTO
    if not node:
        raise UsageError("--node is required (the cluster node name of this machine)")
    if frontend not in frontends.choices():
        frontends.get(frontend)  # UsageError for an unknown kind, before anything happens
    if not os.path.exists(disk):
        raise DeviceError(f"{disk}: no such file or device")
    name = name or default_name(disk)
    check_name(name)
    for st in attachments():
        if st["alive"] and st["name"] == name:
            raise DeviceBusy(f"{name} is already attached here: {st.get('disk')} (pid {st['pid']}, node "
                             f"{st.get('node')})", hint=f"detach it first: baton detach {name}, or pick another "
                             "--name")
    # The same disk by any path (a hard link, another device node, a loop device over it), mounted, held or
    # open: refused. A Baton daemon outside this node's RUN_DIR (another "node" simulated on this host) may
    # hold it: this attach is a takeover, and its epoch fences that daemon.
    stale = read_state(name)
    from baton.frontends.dm import has_leftovers, own_stack_use
    from baton.host import OPEN, check_not_in_use

    config = frontends.FrontendConfig(name=name, run_dir=run_dir(), dev_dir=dev_dir())
    # A dm stack NAME's dead daemon left keeps serving and tracking: the new daemon adopts it when it may serve
    # dm again (it checks that nobody took the disk over since); any other frontend needs it gone first.
    dm_left = has_leftovers(config) or (stale is not None and stale.get("frontend") == "dm")
    adopt = dm_left and frontend in (frontends.AUTO, "dm")
    cleaned: list[str] = []
    if dm_left and not adopt:
        cleaned += frontends.get("dm").cleanup_stale(config)
    own_stack = own_stack_use(name) if adopt else None
    check_not_in_use(disk, "attach", allow=lambda u: (u.kind == OPEN and u.baton_daemon)
                     or (own_stack is not None and own_stack(u)))
    cleaned += _cleanup_stale(name, stale, keep_frontend=adopt) if stale is not None else []
    args = [sys.executable, "-m", "baton", "serve", disk, "--node", node, "--name", name, "--frontend", frontend]
    if cow_size:
        args += ["--cow-size", cow_size]
    if record:
        args += ["--record", record]
    if not tracking:
        args += ["--no-tracking"]
    if nbd_tcp:
        args += ["--tcp", nbd_tcp]
    from baton.device import daemon_env

    env = daemon_env(os.environ)
    if foreground:
        os.execve(sys.executable, [*args, "--ready-fd", "-1"], env)
    log_path(name).parent.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = protocol.spawn_until_ready([*args, "--ready-fd"], log_path(name),
                                                     what=f"the daemon for {name}", env=env)
    res["cleaned_up"] = cleaned
    return res


# ------------------------------------------------------------------------------------------------ detach


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def detach(name: str) -> dict[str, Any]:
    """Detach NAME (see `baton detach`); a dead or fenced daemon's leftovers are cleaned up instead, and the
    result then has ``was_running: False``, ``cleaned_up`` and ``log_tail`` (how the daemon's log ended)."""
    st = read_state(name)
    if st is None:
        raise DaemonError(f"{name} is not attached on this node")
    pid = int(st["pid"])
    if st.get("state") == "fenced":
        _wait_exit(pid, 30)  # a fenced daemon is on its way out: let it finish rather than ask it to detach
    if not pid_alive(pid):
        tail = log_tail(name)
        done = [d for d in _cleanup_stale(name, st) if not d.startswith("log: ")]
        out = {"name": name, "detached": True, "was_running": False, "cleaned_up": done, "log_tail": tail}
        gone = daemon_gone(name, st)
        if gone is not None:
            out["failure"] = gone["failure"]
        return out
    res: dict[str, Any] = request(name, {"op": "detach"}, timeout=120)
    _wait_exit(pid, 30)
    if not pid_alive(pid):
        remove_run_dir(name)  # the daemon removes it itself; this covers a daemon that could not
    return res


# ------------------------------------------------------------------------------------------------ status


def daemon_gone(name: str, st: dict[str, Any]) -> dict[str, Any] | None:
    """Why NAME's daemon no longer serves although its state file says this node attached the disk; None while
    it serves. The one place that explains a dead attachment: `status`, `backup` and `detach` all use it.

    Returns ``state`` ("failed"), ``failure`` ("fenced" | "died"), ``owner_now`` (whether the record on the
    disk still names this attachment's node and epoch, i.e. this node still owns the disk and nothing tracks
    it), ``problem`` (the sentence to show) and ``hint`` (what to do); a fenced daemon adds ``fenced_by``,
    ``epoch_mine``, ``epoch_on_disk`` and ``fenced_at``, which it recorded in its state file before it exited.
    A daemon that died without such a record was killed or crashed; if the disk moved on since (a takeover
    elsewhere, then maybe a clean detach), ``owner_now`` is False and the problem says where it went.
    """
    pid = int(st.get("pid", 0))
    disk = st.get("disk", "?")
    cleanup = f"`baton detach {name}` cleans up what it left behind"
    if st.get("state") == "fenced":
        by = st.get("fenced_by") or "?"
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(st.get("fenced_at", 0))))
        return {
            "state": "failed", "failure": "fenced", "owner_now": False, "fenced_by": by,
            "epoch_mine": st.get("epoch_mine"),
            "epoch_on_disk": st.get("epoch_on_disk"), "fenced_at": st.get("fenced_at"),
            "problem": f"the daemon of {name} was fenced at {at}: node {by} took {disk} over (epoch "
                       f"{st.get('epoch_on_disk')}; this node held epoch {st.get('epoch_mine')}), so this node no "
                       f"longer owns it and stopped serving it",
            "hint": f"back it up on {by}, its owner now; {cleanup}",
        }
    if pid and pid_alive(pid):
        return None
    from baton.record.placement import locate

    try:  # has the disk moved on since? (a takeover elsewhere advances the epoch)
        loc = locate(str(disk), st.get("record"), writable=False)
        try:
            h = loc.header
        finally:
            loc.close()
        moved = h.epoch != st.get("epoch") or h.owner != st.get("node")
    except (BatonError, OSError):
        moved = False  # cannot tell: assume the worst, this node still owns it
    if moved:
        where = (f"node {h.owner or '?'} took it over (epoch {h.epoch})" + (" and detached it" if h.clean else ""))
        return {
            "state": "failed", "failure": "died", "owner_now": False,
            "problem": f"the daemon of {name} (pid {pid}) died without detaching, and {disk} moved on since: "
                       f"{where}; this node no longer owns it",
            "hint": ("back it up by its disk path (nobody owns it now)" if h.clean else
                     f"back it up on {h.owner or 'its owner'}") + f"; {cleanup}",
        }
    return {
        "state": "failed", "failure": "died", "owner_now": True,
        "problem": f"the daemon of {name} (pid {pid}) died without detaching (killed, or crashed: see "
                   f"{log_path(name)}); this node still owns {disk} but nothing tracks its writes now",
        "hint": f"re-attach it (let Pacemaker restart the resource, or `baton attach {disk} --node "
                f"{st.get('node', 'NODE')} --name {name}`); {cleanup}",
    }


def name_status(name: str) -> dict[str, Any]:
    """The live status of NAME's daemon, or its state file plus :func:`daemon_gone` when it is dead or fenced.
    Raises NotAttached when this node has no attachment of that name."""
    st = read_state(name)
    if st is None:
        raise NotAttached(f"{name} is not attached on this node",
                          hint="`baton status DISK` reads a disk's record from any node")
    gone = daemon_gone(name, st)
    if gone is not None:
        return st | gone
    live: dict[str, Any] = request(name, {"op": "status"}, timeout=30)
    return live


def disk_status(disk: str, record: str | None = None) -> dict[str, Any]:
    """Offline record status of DISK, plus the live daemon's if it is attached here."""
    real = os.path.realpath(disk)
    extra: dict[str, Any] = {}
    for st in attachments():
        if st.get("disk") == real:
            gone = daemon_gone(st["name"], st)
            if gone is None:
                with contextlib.suppress(BatonError):
                    return name_status(st["name"])
            else:  # attached here, but its daemon died or was fenced: the record plus why nothing tracks it
                extra = {k: v for k, v in st.items() if k not in ("alive", "state", "epoch")} | gone
    from baton.record.placement import describe, locate

    loc = locate(disk, record, writable=False)
    try:
        return describe(loc) | extra
    finally:
        loc.close()


# ------------------------------------------------------------------------------------------------ backup


def is_attachment_name(target: str) -> bool:
    """Whether TARGET names an attachment on this node (a bare name with a state file here): then it means
    the attachment, even where a file or directory of that name sits in the working directory. The one rule
    of every command that takes NAME|DISK (`backup`, `status`)."""
    return os.path.sep not in target and read_state(target) is not None


def backup(target: str, repo: str, *, node: str, key_file: str | None = None, full: bool = False,
           if_owner: bool = False, record: str | None = None,
           progress: Callable[[int, int], None] | None = None,
           consistency: dict[str, Any] | None = None) -> dict[str, Any]:
    """Back up TARGET (an attachment NAME on this node, or a DISK path) into ``repo``; the backup's result.

    An attachment whose daemon serves runs the backup inside that daemon (writes go on and are recorded). An
    attachment whose daemon died or was fenced fails with DaemonError saying what happened and what to do,
    unless TARGET is a DISK path whose record moved on since (taken over elsewhere): that disk is then judged
    by its record, as a disk attached nowhere here is: :func:`baton.daemon.offline.offline_backup`.

    With ``if_owner`` a node that does not own the disk gets ``{"skipped": True, "reason", "name", "node"}``.
    """
    name = None
    if is_attachment_name(target):
        name = target
    else:
        real = os.path.realpath(target)
        for st in attachments():
            if st.get("disk") == real or st["name"] == target:
                name = st["name"]
    state = read_state(name) if name is not None else None
    if name is not None and state is not None:  # attached here (alive or not)
        gone = daemon_gone(name, state)
        # This node was the owner and its tracker is gone: never a quiet skip. Only a DISK path whose record
        # shows it moved on since (taken over elsewhere) falls through to the record's own verdict below.
        if gone is not None and (if_owner or gone["owner_now"] or not os.path.exists(target)):
            raise DaemonError(f"{gone['problem']}; no backup taken", hint=gone["hint"])
        if gone is None:
            # The daemon's working directory is not ours: local paths must reach it absolute.
            if "://" not in repo:
                repo = os.path.abspath(repo)
            if key_file:
                key_file = os.path.abspath(key_file)
            res: dict[str, Any] = request(name, {"op": "backup", "repo": repo, "key_file": key_file, "full": full,
                                                 "consistency": consistency},
                                          timeout=None, on_progress=progress)
            return res
    if not os.path.exists(target):
        if if_owner:  # not attached here: another node owns it (or nobody); the timer on the owner does the work
            return {"skipped": True, "reason": f"{target} is not attached on this node", "name": target,
                    "node": node}
        raise NotAttached(f"{target} is not attached on this node and is not a disk path",
                          hint="run the backup on the node that has it attached, or pass the disk path")
    from baton.daemon.offline import offline_backup

    return offline_backup(target, repo, node=node, name=default_name(target), key_file=key_file, full=full,
                          record=record, if_owner=if_owner, progress=progress, consistency=consistency)
