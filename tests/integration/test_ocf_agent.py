"""The ocf:baton:disk resource agent outside a cluster: its meta-data, ocf-tester, and the paths Pacemaker relies
on (start only when the device is ready, monitor sees a killed daemon, stop cleans up after it, errors map to
the OCF codes that keep the cluster's decisions right)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import need_root, need_tool

REPO = Path(__file__).resolve().parents[2]
AGENT_SRC = REPO / "packaging" / "ocf" / "disk"
INSTALLED = Path("/usr/lib/ocf/resource.d/baton/disk")
SHELLFUNCS = Path("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs")
DTD = Path("/usr/share/resource-agents/ra-api-1.dtd")
BATON = Path(sys.executable).parent / "baton"

# OCF exit codes
OCF_SUCCESS, OCF_ERR_GENERIC, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING = 0, 1, 5, 6, 7

pytestmark = [pytest.mark.integration]


def agent() -> Path:
    """The installed agent when it is this tree's version, else this tree's copy (what setup.sh installs)."""
    if INSTALLED.exists() and INSTALLED.read_bytes() == AGENT_SRC.read_bytes():
        return INSTALLED
    return AGENT_SRC


def need_agent_env() -> None:
    if not SHELLFUNCS.exists():
        pytest.skip("needs resource-agents (ocf-shellfuncs); installed by scripts/setup.sh test")


def need_baton_attach() -> None:
    cp = subprocess.run([str(BATON), "attach", "--help"], capture_output=True, text=True, timeout=60)
    if cp.returncode != 0:
        pytest.skip("`baton attach` is not available in this tree")


def test_meta_data_is_valid_xml_with_the_parameters() -> None:
    need_agent_env()
    cp = subprocess.run([str(agent()), "meta-data"], capture_output=True, text=True, timeout=30,
                        env={**os.environ, "OCF_ROOT": "/usr/lib/ocf"})
    assert cp.returncode == 0, cp.stderr
    root = ET.fromstring(cp.stdout)
    assert root.tag == "resource-agent" and root.get("name") == "disk"
    assert root.findtext("version") == "1.1"
    params = {p.get("name"): p for p in root.iter("parameter")}
    assert set(params) == {"disk", "name", "frontend", "record", "baton"}
    assert params["disk"].get("required") == "1" and params["disk"].get("unique") == "1"
    frontend = params["frontend"].find("content")
    assert frontend is not None and frontend.get("default") == "fuse"
    baton = params["baton"].find("content")
    assert baton is not None and baton.get("default") == "baton"
    actions = {a.get("name"): a for a in root.iter("action")}
    assert {"start", "stop", "monitor", "validate-all", "meta-data"} <= set(actions)
    assert actions["monitor"].get("interval")
    if shutil.which("xmllint") and DTD.exists():
        v = subprocess.run(["xmllint", "--noout", "--dtdvalid", str(DTD), "-"], input=cp.stdout,
                           capture_output=True, text=True, timeout=30)
        assert v.returncode == 0, v.stderr


def test_unknown_action_and_missing_disk_parameter() -> None:
    need_agent_env()
    env = {**os.environ, "OCF_ROOT": "/usr/lib/ocf"}
    env.pop("OCF_RESKEY_disk", None)
    assert subprocess.run([str(agent()), "frobnicate"], capture_output=True, env=env, timeout=30).returncode == 3
    cp = subprocess.run([str(agent()), "validate-all"], capture_output=True, env=env, timeout=30)
    assert cp.returncode == OCF_ERR_CONFIGURED


@dataclass
class Env:
    tmp: Path
    image: Path
    name: str
    env: dict[str, str]

    def ra(self, action: str, **params: str) -> int:
        """Run the agent as Pacemaker would: OCF_RESKEY_* parameters, one action, bounded."""
        env = {**self.env, "OCF_ROOT": "/usr/lib/ocf", "OCF_RESOURCE_INSTANCE": "t", "OCF_RESKEY_CRM_meta_timeout":
               "30000", "OCF_RESKEY_disk": str(self.image), "OCF_RESKEY_name": self.name,
               "OCF_RESKEY_baton": str(BATON), "OCF_RESKEY_CRM_meta_on_node": "testnode", "HA_RSCTMP": str(self.tmp)}
        env.update({f"OCF_RESKEY_{k}": v for k, v in params.items()})
        return subprocess.run([str(agent()), action], env=env, capture_output=True, timeout=90).returncode

    def status(self) -> dict[str, object]:
        cp = subprocess.run([str(BATON), "status", self.name, "--json"], env=self.env, capture_output=True,
                            text=True, timeout=60)
        data: dict[str, object] = json.loads(cp.stdout)
        if cp.returncode == 6:  # not attached on this node (NotAttached): what the agent reads as "stopped"
            assert data["error"] == "NotAttached", data
            return {"state": "stopped"}
        assert cp.returncode == 0, cp.stderr
        return data


@pytest.fixture
def ocf_env(tmp_path: Path) -> Iterator[Env]:
    need_root()
    need_agent_env()
    need_tool("losetup")
    need_baton_attach()
    name = f"ocft{secrets.token_hex(3)}"
    env = {**os.environ, "BATON_RUN_DIR": str(tmp_path / "run"), "BATON_DEV_DIR": str(tmp_path / "dev")}
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run([str(BATON), "init", str(image)], env=env, check=True, capture_output=True, timeout=60)
    e = Env(tmp_path, image, name, env)
    try:
        yield e
    finally:
        subprocess.run([str(BATON), "detach", name], env=env, capture_output=True, timeout=60)
        st = subprocess.run([str(BATON), "status", name, "--json"], env=env, capture_output=True, text=True,
                            timeout=60)
        try:
            pid = int(json.loads(st.stdout).get("pid") or 0)
        except (ValueError, AttributeError):
            pid = 0
        if pid > 0:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Loop devices left over a dead daemon's FUSE file (ours only: the path is under tmp_path).
        for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                if str(tmp_path) in bf.read_text() or name in bf.read_text():
                    subprocess.run(["losetup", "-d", "/dev/" + bf.parent.parent.name], timeout=30)
            except OSError:
                pass


def test_ocf_tester_passes(ocf_env: Env) -> None:
    need_tool("ocf-tester")
    cp = subprocess.run(["ocf-tester", "-n", "test", "-o", f"disk={ocf_env.image}", "-o", f"name={ocf_env.name}",
                         "-o", f"baton={BATON}", str(agent())], env=ocf_env.env, capture_output=True, text=True,
                        timeout=300)
    assert cp.returncode == 0 and "passed all tests" in cp.stdout, cp.stdout + cp.stderr
    assert ocf_env.status().get("state") == "stopped"


def test_start_monitor_stop_and_killed_daemon(ocf_env: Env) -> None:
    e = ocf_env
    assert e.ra("monitor", CRM_meta_interval="0") == OCF_NOT_RUNNING       # a probe before anything runs
    assert e.ra("start") == OCF_SUCCESS
    dev = Path(e.env["BATON_DEV_DIR"]) / e.name
    assert dev.is_block_device(), "start returned before /dev/baton/NAME was ready"
    st = e.status()
    assert st.get("state") == "running" and st.get("node") == "testnode", st
    assert e.ra("start") == OCF_SUCCESS                                     # idempotent
    assert e.ra("monitor") == OCF_SUCCESS
    # The daemon is killed: monitor must fail (not "stopped"), stop must clean up and succeed.
    os.kill(int(str(st["pid"])), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while e.ra("monitor") == OCF_SUCCESS:
        assert time.monotonic() < deadline, "monitor still reports a killed daemon as running"
        time.sleep(0.2)
    assert e.ra("monitor") == OCF_ERR_GENERIC
    assert e.ra("stop") == OCF_SUCCESS
    assert e.ra("monitor") == OCF_NOT_RUNNING
    assert e.ra("stop") == OCF_SUCCESS                                      # idempotent
    # The disk can be taken over again after the crash.
    assert e.ra("start") == OCF_SUCCESS
    assert e.ra("stop") == OCF_SUCCESS
    assert not dev.exists()


def test_errors_map_to_ocf_codes(ocf_env: Env, tmp_path: Path) -> None:
    e = ocf_env
    assert e.ra("validate-all") == OCF_SUCCESS
    assert e.ra("validate-all", frontend="iscsi") == OCF_ERR_CONFIGURED
    assert e.ra("validate-all", frontend="auto") == OCF_SUCCESS  # the CLI's default: dm where the kernel has it
    assert e.ra("validate-all", frontend="dm") == OCF_SUCCESS  # validated here; start says why dm can't run
    assert e.ra("validate-all", disk=str(tmp_path / "absent.img")) == OCF_ERR_INSTALLED
    assert e.ra("start", baton=str(tmp_path / "no-baton")) == OCF_ERR_INSTALLED
    # A disk that was never `baton init`ed is a configuration error (bans the resource cluster-wide).
    blank = tmp_path / "blank.img"
    with open(blank, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    assert e.ra("start", disk=str(blank)) == OCF_ERR_CONFIGURED
    assert e.ra("monitor", disk=str(blank)) == OCF_NOT_RUNNING


def test_nbd_frontend(ocf_env: Env) -> None:
    e = ocf_env
    assert e.ra("start", frontend="nbd") == OCF_SUCCESS
    sock = Path(e.env["BATON_RUN_DIR"]) / f"{e.name}.sock"
    assert sock.is_socket(), "start returned before the NBD socket was ready"
    assert not (Path(e.env["BATON_DEV_DIR"]) / e.name).exists()
    assert e.ra("monitor", frontend="nbd") == OCF_SUCCESS
    assert e.ra("stop", frontend="nbd") == OCF_SUCCESS
    assert e.ra("monitor", frontend="nbd") == OCF_NOT_RUNNING
    assert not sock.exists()
