"""`baton agent` end to end on this machine: watch mode attaches a freshly initialised sparse image, /metrics
shows it, the control socket reports it, a detach is not undone by the watch, and SIGTERM stops the agent while
the disk it attached stays served (then the test detaches it)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import need_root, need_tool

BATON = Path(sys.executable).parent / "baton"
pytestmark = [pytest.mark.integration]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def metrics(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as r:
        text = r.read().decode()
    return {(s.name, s.labels.get("name", "")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
        except (OSError, ValueError, KeyError):
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def baton(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cp = subprocess.run([str(BATON), *args], env=env, capture_output=True, text=True, timeout=90)
    assert not check or cp.returncode == 0, cp.stderr
    return cp


def cleanup(agent: subprocess.Popen[bytes] | None, env: dict[str, str], name: str, tmp_path: Path,
            log_path: Path, *, sweep: bool = True) -> None:
    """Stop our agent (by PID), detach NAME, kill its daemon if detach could not, and with ``sweep`` free the
    loop devices left over tmp_path (after every attachment of the test is detached)."""
    if agent is not None and agent.poll() is None:
        agent.kill()
        agent.wait(timeout=10)
    baton(env, "detach", name, check=False)
    st = baton(env, "status", name, "--json", check=False)
    try:
        pid = int(json.loads(st.stdout).get("pid") or 0)
    except (ValueError, AttributeError):
        pid = 0
    if pid > 0:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        baton(env, "detach", name, check=False)
    for bf in Path("/sys/block").glob("loop*/loop/backing_file") if sweep else []:
        try:
            if str(tmp_path) in bf.read_text():
                subprocess.run(["losetup", "-d", "/dev/" + bf.parent.parent.name], timeout=30)
        except OSError:
            pass
    if log_path.exists():
        sys.stderr.write(log_path.read_text()[-4000:])


def events_of(log_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


def test_agent_watch_attaches_and_serves_metrics(tmp_path: Path) -> None:
    need_root()
    need_tool("losetup")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    name = f"agt{secrets.token_hex(3)}"
    env = {**os.environ, "BATON_RUN_DIR": str(tmp_path / "run"), "BATON_DEV_DIR": str(tmp_path / "dev")}
    env.pop("BATON_NODE", None)
    image = tmp_path / "shared.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    baton(env, "init", str(image))
    port = free_port()
    log_path = tmp_path / "agent.log"
    agent: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as logf:
            agent = subprocess.Popen(
                [str(BATON), "agent", "--metrics", f"127.0.0.1:{port}", "--watch", str(image), "--node", "n1",
                 "--name", name, "--probe-interval", "0.5", "--log-format", "json"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf)
        dev = tmp_path / "dev" / name
        wait_for("the watch to attach the disk", lambda: dev.is_block_device())
        got = wait_for("baton_attached 1", lambda: (m := metrics(port)).get(("baton_attached", name)) == 1 and m)
        assert got[("baton_dirty_bytes", name)] == 0
        assert got[("baton_owner_epoch", name)] == 1

        # A write through the tracked device shows up as dirty bytes and a counted write.
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xa5" * 65536, 1 << 20)
            os.fsync(fd)
        finally:
            os.close(fd)
        got = metrics(port)
        assert got[("baton_dirty_bytes", name)] >= 65536
        assert got[("baton_writes_total", name)] >= 1
        assert got[("baton_first_touch_total", name)] >= 1

        st = json.loads(baton(env, "agent", "--status", "--json").stdout)
        assert [a["name"] for a in st["attachments"]] == [name]
        assert st["attachments"][0]["state"] == "running"
        (watch,) = st["agent"]["watches"]
        assert watch["attached_here"] and watch["probe"]["outcome"] == "owner"

        events = [json.loads(line)["event"] for line in log_path.read_text().splitlines() if line.startswith("{")]
        assert "agent.start" in events and "watch.arrival" in events and "watch.attached" in events

        # Detached by the operator: the watch must not take it back while the probe keeps succeeding.
        baton(env, "detach", name)

        def probes_after_detach() -> int:
            w = json.loads(baton(env, "agent", "--status", "--json").stdout)["agent"]["watches"][0]
            return int(w["statistics"]["probes"]) if not w["attached_here"] else 0

        base = wait_for("the watch to notice the detach", probes_after_detach)
        wait_for("three more probes", lambda: probes_after_detach() >= base + 3)
        r = baton(env, "status", name, "--json", check=False)  # not attached here: exit 6, NotAttached
        assert r.returncode == 6 and json.loads(r.stdout)["error"] == "NotAttached", r.stdout + r.stderr
        assert not dev.exists()
        assert metrics(port)[("baton_attached", name)] == 0

        # Attach again by hand, then stop the agent: the disk stays attached.
        baton(env, "attach", str(image), "--node", "n1", "--name", name)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
        assert not (tmp_path / "run" / "agent.sock").exists()
        assert json.loads(baton(env, "status", name, "--json").stdout)["state"] == "running"
        events = [json.loads(line)["event"] for line in log_path.read_text().splitlines() if line.startswith("{")]
        assert "watch.attachment_ended" in events and events[-1] == "agent.stop"
    finally:
        cleanup(agent, env, name, tmp_path, log_path)


def test_mount_event_triggers_the_probe(tmp_path: Path) -> None:
    """The disk's file system is mounted while the agent watches with a long probe interval: the mount event
    makes it probe at once and attach; unmounting it later is logged as the device gone."""
    need_root()
    need_tool("losetup", "mount", "umount")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    name = f"agm{secrets.token_hex(3)}"
    env = {**os.environ, "BATON_RUN_DIR": str(tmp_path / "run"), "BATON_DEV_DIR": str(tmp_path / "dev")}
    env.pop("BATON_NODE", None)
    staging, mnt = tmp_path / "staging", tmp_path / "mnt"
    staging.mkdir()
    mnt.mkdir()
    with open(staging / "shared.img", "wb") as f:
        f.truncate(32 * 1024 * 1024)
    baton(env, "init", str(staging / "shared.img"))
    log_path = tmp_path / "agent.log"
    agent: subprocess.Popen[bytes] | None = None
    mounted = False
    try:
        with open(log_path, "wb") as logf:
            agent = subprocess.Popen(
                [str(BATON), "agent", "--watch", str(mnt / "shared.img"), "--node", "n1", "--name", name,
                 "--probe-interval", "300", "--log-format", "json"],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf)
        wait_for("the first probe (absent)", lambda: any(
            e["event"] == "watch.device_gone" for e in events_of(log_path)))
        subprocess.run(["mount", "--bind", str(staging), str(mnt)], check=True, timeout=30)
        mounted = True
        wait_for("the mount event", lambda: any(
            e["event"] == "watch.event" and "mount" in e["events"] for e in events_of(log_path)))
        # With a 300 s probe interval only the event can have caused this attach.
        wait_for("the attach", lambda: (tmp_path / "dev" / name).is_block_device())
        ev = [e for e in events_of(log_path) if e["event"] == "watch.arrival"]
        assert ev and ev[0]["via"] == "event"
        baton(env, "detach", name)
        n_gone = sum(e["event"] == "watch.device_gone" for e in events_of(log_path))
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
        mounted = False
        wait_for("the unmount to be logged", lambda: sum(
            e["event"] == "watch.device_gone" for e in events_of(log_path)) > n_gone)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
    finally:
        cleanup(agent, env, name, tmp_path, log_path)
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], timeout=30, check=False)


def test_fenced_attachment_is_not_taken_back(tmp_path: Path) -> None:
    """Another "node" (its own RUN_DIR on this host) takes the disk over: the daemon watch mode started is
    fenced and exits 5, the agent logs it, and although the probe still succeeds on this shared image, the watch
    does not take the disk back."""
    need_root()
    need_tool("losetup")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    name = f"agf{secrets.token_hex(3)}"
    env_a = {**os.environ, "BATON_RUN_DIR": str(tmp_path / "runA"), "BATON_DEV_DIR": str(tmp_path / "devA")}
    env_b = {**os.environ, "BATON_RUN_DIR": str(tmp_path / "runB"), "BATON_DEV_DIR": str(tmp_path / "devB")}
    for e in (env_a, env_b):
        e.pop("BATON_NODE", None)
    image = tmp_path / "shared.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    baton(env_a, "init", str(image))
    log_path = tmp_path / "agent.log"
    agent: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as logf:
            agent = subprocess.Popen(
                [str(BATON), "agent", "--watch", str(image), "--node", "n1", "--name", name, "--probe-interval",
                 "0.5", "--log-format", "json"],
                env=env_a, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf)
        wait_for("the watch to attach", lambda: (tmp_path / "devA" / name).is_block_device())
        res = json.loads(baton(env_b, "attach", str(image), "--node", "n2", "--name", name, "--json").stdout)
        assert res["epoch"] == 2
        ex = wait_for("the fenced daemon's exit to be logged", lambda: [
            e for e in events_of(log_path) if e["event"] == "attachment.daemon_exited"])
        assert ex[0]["exit_status"] == 5

        def probes() -> int:
            w = json.loads(baton(env_a, "agent", "--status", "--json").stdout)["agent"]["watches"][0]
            return int(w["statistics"]["probes"]) if not w["attached_here"] else 0

        base = wait_for("the watch to notice", probes)
        wait_for("three more probes", lambda: probes() >= base + 3)
        w = json.loads(baton(env_a, "agent", "--status", "--json").stdout)["agent"]["watches"][0]
        assert w["probe"]["outcome"] == "owner" and not w["attached_here"]
        assert w["statistics"]["attaches"] == 1
        st_b = json.loads(baton(env_b, "status", name, "--json").stdout)
        assert st_b["state"] == "running" and st_b["epoch"] == 2 and st_b["node"] == "n2"
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
    finally:
        cleanup(agent, env_a, name, tmp_path, log_path, sweep=False)
        cleanup(None, env_b, name, tmp_path, tmp_path / "none.log")
