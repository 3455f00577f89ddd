"""``baton mount`` / ``baton umount``: a snapshot as a read-only block device, served by a daemon process.

    baton mount SNAP --repo URL [--name NAME]  ->  spawns ``python -m baton.mount serve ...`` (a new session,
        its log in RUN_DIR/snap-NAME/mount.log), waits for its one ready line, returns the device
    the daemon: opens the repository, serves /dev/baton/snap-NAME (:class:`baton.frontends.snapshot.
        SnapshotFrontend`), answers ``status`` and ``stop`` on RUN_DIR/snap-NAME/control.sock (the one control
        protocol, :mod:`baton.daemon.protocol`), writes RUN_DIR/snap-NAME/mount.json
    baton umount NAME  ->  refused (DeviceBusy) while the device is mounted or open; asks the daemon to stop
        and returns its final statistics; a daemon that died (killed) is cleaned up instead: its loop device,
        FUSE mount, device link and files

The repository is read only here: the frontend gets a ``fetch(chunk index)`` callable, never the repository.
Chunks are fetched on demand (index pages as the tree reader needs them, chunks in ranged reads of one blob),
so the first read of a big snapshot does not download it; ``repository`` in the statistics counts what was
read from the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from baton.daemon import protocol
from baton.errors import BatonError, DeviceBusy, NotAttached, UsageError, exit_code
from baton.frontends.base import FrontendConfig
from baton.host import check_not_in_use
from baton.host.attachments import check_name, dev_dir, run_dir
from baton.util import pid_alive

PREFIX = "snap-"
STOP_TIMEOUT = 60.0


def device_name(name: str) -> str:
    full = name if name.startswith(PREFIX) else PREFIX + name
    check_name(full)
    return full


def _dir(full: str) -> Path:
    return run_dir() / full


def _state_path(full: str) -> Path:
    return _dir(full) / "mount.json"


def _control(full: str) -> Path:
    return _dir(full) / "control.sock"


def _read(full: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(_state_path(full).read_text())
        return data
    except (OSError, ValueError):
        return None


def _config(full: str) -> FrontendConfig:
    return FrontendConfig(name=full, run_dir=run_dir(), dev_dir=dev_dir())


# ------------------------------------------------------------------------------------------------ client


def mount(snapshot: str, repo_url: str, *, name: str | None = None, key_file: str | None = None,
          cache_bytes: int = 256 << 20) -> dict[str, Any]:
    """Serve ``snapshot`` as BATON_DEV_DIR/snap-NAME; returns once the device reads (see the module docstring)."""
    from baton.repo import Repository
    from baton.storage import check_url

    check_url(repo_url)
    repo = Repository.open(repo_url, key_file=key_file)
    m = repo.get_snapshot(snapshot)  # unknown, ambiguous or malformed: the error comes from here, nothing spawned
    if not m.complete:
        raise UsageError(f"snapshot {m.short_id} is a checkpoint of an unfinished backup, not a point-in-time "
                         "image", hint="pick a complete snapshot (`baton snapshots`)")
    if m.disk.size % 512:
        raise UsageError(f"snapshot {m.short_id} is of a {m.disk.size}-byte disk, not a multiple of 512 bytes")
    full = device_name(name or m.snapshot_id[:8])
    st = _read(full)
    if st is not None:
        if pid_alive(int(st.get("pid") or 0)):
            raise DeviceBusy(f"{full} is already mounted here: snapshot {st.get('snapshot')} (pid {st['pid']})",
                             hint=f"`baton umount {full}` first, or pick another --name")
        _cleanup_dead(full)
    if "://" not in repo_url:
        repo_url = os.path.abspath(repo_url)
    if key_file:
        key_file = os.path.abspath(key_file)
    d = _dir(full)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    args = [sys.executable, "-m", "baton.mount", "serve", m.snapshot_id, repo_url, full, str(cache_bytes),
            key_file or ""]
    res: dict[str, Any] = protocol.spawn_until_ready(args, d / "mount.log", what=f"the mount daemon of {full}",
                                                     on_refused=lambda: _remove_files(full))
    return res


def status(name: str) -> dict[str, Any]:
    full = device_name(name)
    st = _read(full)
    if st is None:
        raise NotAttached(f"no snapshot is mounted as {full} on this node")
    if not pid_alive(int(st.get("pid") or 0)):
        return st | {"state": "died"}
    live: dict[str, Any] = protocol.request(_control(full), {"op": "status"}, peer=f"the mount daemon of {full}")
    return live


def mounts() -> list[dict[str, Any]]:
    d = run_dir()
    out = []
    if d.is_dir():
        for p in sorted(d.iterdir()):
            if p.name.startswith(PREFIX):
                st = _read(p.name)
                if st is not None:
                    out.append(st | {"alive": pid_alive(int(st.get("pid") or 0))})
    return out


def umount(name: str, *, force: bool = False) -> dict[str, Any]:
    """Stop serving snap-NAME (refused while its device is in use unless ``force``); clean up a dead daemon."""
    full = device_name(name)
    st = _read(full)
    if st is None:
        if (_dir(full) / "state.json").exists():  # killed before it wrote mount.json: only leftovers
            return {"name": full, "was_running": False, "cleaned_up": _cleanup_dead(full)}
        raise NotAttached(f"no snapshot is mounted as {full} on this node",
                          hint="`baton umount` takes the NAME `baton mount` printed (snap-...)")
    pid = int(st.get("pid") or 0)
    if not pid_alive(pid):
        return {"name": full, "snapshot": st.get("snapshot"), "was_running": False,
                "cleaned_up": _cleanup_dead(full)}
    device = str(st.get("device") or dev_dir() / full)
    if not force:
        check_not_in_use(device, "umount", allow=lambda u: u.pid == pid)
    res: dict[str, Any] = protocol.request(_control(full), {"op": "stop", "force": force},
                                           peer=f"the mount daemon of {full}", timeout=STOP_TIMEOUT)
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    _remove_files(full)
    return res | {"was_running": True}


def _remove_files(full: str) -> None:
    d = _dir(full)
    for f in ("mount.json", "control.sock", "mount.log", "lock"):
        with contextlib.suppress(FileNotFoundError):
            (d / f).unlink()
    with contextlib.suppress(OSError):
        d.rmdir()


def _cleanup_dead(full: str) -> list[str]:
    from baton.frontends.snapshot import SnapshotFrontend

    done = SnapshotFrontend.cleanup_stale(_config(full))
    _remove_files(full)
    return [*done, f"removed {_dir(full)}"]


# ------------------------------------------------------------------------------------------------ daemon


def serve(snapshot_id: str, repo_url: str, full: str, cache_bytes: int, key_file: str | None, ready_fd: int) -> int:
    """The mount daemon's body: serve until asked to stop (or SIGTERM), then tear down. Writes one ready line
    (the result or the error) on ``ready_fd``."""
    from baton.format.repo_index import ZERO_ID
    from baton.frontends.snapshot import SnapshotDisk, SnapshotFrontend
    from baton.repo import Repository

    def say(msg: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, (json.dumps(msg) + "\n").encode())
            os.close(ready_fd)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        repo = Repository.open(repo_url, key_file=key_file or None)
        m = repo.read_manifest(snapshot_id)
        reader = repo.snapshot_reader(m)
        tree_lock = threading.Lock()  # the tree reader's page cache is not thread-safe

        def fetch(c: int) -> bytes:
            with tree_lock:
                cid = reader.chunk_id(c)
            length = reader.chunk_length(c)
            return bytes(length) if cid == ZERO_ID else repo.read_chunk(cid, length)

        disk = SnapshotDisk(m.disk.size, m.disk.chunk_size, fetch, cache_bytes=cache_bytes)
        fe = SnapshotFrontend(disk, _config(full))
        ep = fe.start()
    except BaseException as e:
        say(protocol.error_reply(e))
        return 1
    state = {"name": full, "pid": os.getpid(), "snapshot": m.snapshot_id, "disk_uuid": m.disk.disk_uuid,
             "disk_name": m.disk.name, "size": m.disk.size, "repo": repo_url, "device": ep.device,
             "loop": fe.loop_device, "cache_bytes": cache_bytes, "started": time.time()}
    tmp = _state_path(full).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, _state_path(full))

    def stats() -> dict[str, Any]:
        rs = repo.statistics()
        return state | {"statistics": fe.statistics(),
                        "repository": {k: rs.get(k) for k in ("chunks_read", "bytes_read", "pages_read")}}

    stop_force = [False]

    def handler(req: dict[str, Any], progress: Any) -> Any:
        if req.get("op") == "status":
            return stats()
        if req.get("op") == "stop":
            stop_force[0] = bool(req.get("force"))
            out = stats()

            return protocol.AfterReply(out, stop.set)
        raise UsageError(f"unknown request {req.get('op')!r}")

    server = protocol.ControlServer(_control(full), handler, name=f"baton-mount-{full}")
    server.start()
    say({"ok": True, "result": state})
    try:
        while not stop.wait(0.5):
            if fe.wait(0):
                break  # the FUSE session ended by itself
    finally:
        server.stop()
        try:
            fe.stop(force=stop_force[0])
        except DeviceBusy:
            fe.stop(force=True)  # SIGTERM while mounted: the users get EIO, nothing is left behind
        with contextlib.suppress(FileNotFoundError):
            _state_path(full).unlink()
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) != 7 or argv[0] != "serve":
        print("usage: python -m baton.mount serve SNAPSHOT REPO NAME CACHE_BYTES KEY_FILE READY_FD", file=sys.stderr)
        return exit_code(UsageError("usage"))
    _, snap, repo_url, full, cache, key_file, fd = argv
    try:
        return serve(snap, repo_url, full, int(cache), key_file or None, int(fd))
    except BatonError as e:
        print(f"baton mount daemon: {e}", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
