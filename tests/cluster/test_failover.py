"""The real-cluster scenario: Pacemaker fails a Baton-tracked disk over between three nodes, with fencing on, and
every backup after the first stays incremental.

The stack, on a shared loop device visible to every node::

    ocf:baton:disk (baton attach/detach; /dev/baton/NAME)  ->  ocf:heartbeat:Filesystem (ext4 on /dev/baton/NAME)
    order: disk then fs; colocation: fs with disk; location preference (50 < stickiness 100) picks the next owner

Scenario (seeded; the seed and a timeline are printed):

1. A workload on the owner writes checksummed files; each is fsynced (file, then directory) before it is
   reported durable.
2. While it runs, the file system is frozen and ``baton backup NAME --repo R --if-owner`` runs on EVERY node:
   exactly one (the owner) does the work.
3. The owner node is killed (SIGKILL to its namespace init) mid-workload; the cluster fences it and fails over.
   The new owner must still have every file the workload was told was durable.
4. Repeat until every node has owned the disk; a final backup follows the last failover.

Checked: backups after the first are incremental; every snapshot restores to an image that passes
``e2fsck -fn`` and holds every file that was durable before its freeze, with the right checksum; owner epochs
only grow; nothing (namespaces, loop devices, mounts, processes) is left behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import REPO, Cluster, ClusterError, missing_tools, run

HERE = Path(__file__).resolve().parent
WORKLOAD = HERE / "workload.py"
AGENT = REPO / "packaging" / "ocf" / "disk"
BATON = Path(sys.executable).parent / "baton"
DISK_SIZE = 256 * 1024 * 1024
FS_TOOLS = ("mkfs.ext4", "e2fsck", "debugfs", "fsfreeze")

pytestmark = [pytest.mark.cluster]


@dataclass
class Durable:
    """What the workloads were told is durable, in arrival order (thread-safe)."""

    files: dict[str, str] = field(default_factory=dict)       # name -> sha256
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)

    def snapshot(self) -> dict[str, str]:
        with self.lock:
            return dict(self.files)

    def count(self) -> int:
        with self.lock:
            return len(self.files)


@dataclass
class Workload:
    node: str
    prefix: str
    proc: subprocess.Popen[str]
    reader: threading.Thread


@dataclass
class BackupResult:
    index: int
    node: str
    owner_round: int
    info: dict[str, Any]
    expected: dict[str, str]   # files durable before the freeze: must be in this snapshot


def baton_cmd(c: Cluster, node: str, *args: str, check: bool = True, timeout: float = 60) -> Any:
    """Run baton in a node; parse --json output when asked for."""
    cp = c.exec(node, str(BATON), *args, check=False, timeout=timeout)
    if check and cp.returncode != 0:
        raise ClusterError(f"{node}: baton {' '.join(args)} -> {cp.returncode}\n{cp.stdout}{cp.stderr}")
    return cp


def host_baton(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run([str(BATON), *args], timeout=timeout, env={**os.environ, **env})


def start_workload(c: Cluster, node: str, mnt: str, prefix: str, seed: int, durable: Durable) -> Workload:
    proc = c.popen(node, "python3", str(WORKLOAD), "write", f"{mnt}/data", "--prefix", prefix, "--seed", str(seed),
                   "--pause", "0.01", stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            parts = line.split()
            if parts[:1] == ["DURABLE"]:
                with durable.lock:
                    durable.files[parts[1]] = parts[2]
            elif parts[:1] == ["ERROR"]:
                with durable.lock:
                    durable.errors.append(f"{node}: {line.strip()}")

    t = threading.Thread(target=read, name=f"workload-{prefix}", daemon=True)
    t.start()
    c.event(f"{node}: workload {prefix} started (seed {seed})")
    return Workload(node, prefix, proc, t)


def wait_files(c: Cluster, durable: Durable, n: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while durable.count() < n:
        if time.monotonic() > end:
            raise ClusterError(f"workload reached only {durable.count()} of {n} durable files in {timeout}s; "
                               f"errors: {durable.errors}")
        time.sleep(0.05)


def verify_live(c: Cluster, node: str, mnt: str, durable: Durable, workdir: Path, label: str) -> dict[str, Any]:
    mounted = c.exec(node, "mountpoint", "-q", mnt, check=False)
    assert mounted.returncode == 0, f"{mnt} is not mounted on {node}, although the cluster says fs runs there"
    manifest = workdir / f"manifest-{label}.json"
    manifest.write_text(json.dumps(durable.snapshot()))
    cp = c.exec(node, "python3", str(WORKLOAD), "verify", f"{mnt}/data", str(manifest), check=False, timeout=60)
    report: dict[str, Any] = json.loads(cp.stdout)
    c.event(f"{node}: verified live: {report['ok']}/{report['checked']} durable files ok, "
            f"{len(report['missing'])} missing, {len(report['mismatched'])} mismatched, {report['extra']} extra")
    assert cp.returncode == 0, f"durable data lost after failover to {node}: {report}"
    return report


def backup_everywhere(c: Cluster, owner: str, mnt: str, repo: Path, name: str, durable: Durable,
                      index: int, owner_round: int) -> BackupResult:
    """Freeze the owner's ext4 (so the image is clean), run `backup --if-owner` on every running node."""
    c.exec(owner, "fsfreeze", "-f", mnt)
    expected = durable.snapshot()   # everything reported durable before the freeze is in the image
    c.event(f"{owner}: {mnt} frozen ({len(expected)} durable files)")
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        threads = []
        for node in c.running():
            def one(node: str = node) -> None:
                results[node] = c.exec(node, str(BATON), "backup", name, "--repo", str(repo), "--if-owner",
                                       "--json", check=False, timeout=180)
            t = threading.Thread(target=one)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(200)
    finally:
        c.exec(owner, "fsfreeze", "-u", mnt, check=False)
        c.event(f"{owner}: {mnt} thawed")
    worked: list[tuple[str, dict[str, Any]]] = []
    for node, cp in sorted(results.items()):
        assert cp.returncode == 0, f"{node}: backup --if-owner exit {cp.returncode}: {cp.stdout}{cp.stderr}"
        out = cp.stdout.strip()
        info = json.loads(out) if out else {}
        if info.get("snapshot"):
            worked.append((node, info))
    assert len(worked) == 1, f"exactly one node must back up, got {[n for n, _ in worked]}: {results}"
    node, info = worked[0]
    assert node == owner, f"the backup ran on {node}, but {owner} owns the disk"
    c.event(f"{node}: backup #{index} {info.get('mode')} ({info.get('reason') or 'no reason'}): "
            f"read {info.get('bytes_read', 0) / 2**20:.1f} MiB of {DISK_SIZE / 2**20:.0f} MiB, "
            f"stored {info.get('bytes_stored', 0) / 2**20:.2f} MiB, {info.get('duration_s', 0):.2f}s, "
            f"snapshot {str(info.get('snapshot'))[:12]}")
    return BackupResult(index, node, owner_round, info, expected)


def check_restore(c: Cluster, b: BackupResult, repo: Path, workdir: Path) -> None:
    """Restore the snapshot to an image, e2fsck -fn it, and compare its files with what was durable."""
    img = workdir / f"restore-{b.index}.img"
    snap = str(b.info["snapshot"])
    run([str(BATON), "restore", snap, "--repo", str(repo), "--to", str(img), "--json"], timeout=180)
    fsck = run(["e2fsck", "-fn", str(img)], check=False, timeout=120)
    assert fsck.returncode == 0, f"backup #{b.index}: e2fsck -fn failed ({fsck.returncode}):\n{fsck.stdout}"
    out = workdir / f"restore-{b.index}.files"
    out.mkdir()
    run(["debugfs", "-R", f"rdump /data {out}", str(img)], timeout=120)
    manifest = workdir / f"expected-{b.index}.json"
    manifest.write_text(json.dumps(b.expected))
    cp = run([sys.executable, str(WORKLOAD), "verify", str(out / "data"), str(manifest)], check=False)
    report = json.loads(cp.stdout)
    c.event(f"restore #{b.index} ({b.info.get('mode')}): e2fsck -fn clean, {report['ok']}/{report['checked']} "
            f"files match, {report['extra']} more files from after the durable point")
    assert cp.returncode == 0, f"backup #{b.index} lost durable files: {report}"
    shutil.rmtree(out)
    img.unlink()


def run_scenario(c: Cluster, seed: int, *, backups: bool = True, failovers: int = 3) -> list[BackupResult]:
    """The whole scenario on a set-up (not yet started) cluster. Returns the backups taken."""
    rng = random.Random(seed)
    name = f"baton-{c.tag}"             # the tag in the name lets teardown find a killed node's loop device
    mnt = str(c.workdir / "mnt")
    repo = c.shared / "repo"
    image = c.shared / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK_SIZE)
    disk = c.loop_attach(image)

    # Initialise the record, make the file system through the tracked device, create the repository.
    host_env = {"BATON_RUN_DIR": str(c.workdir / "host-run"), "BATON_DEV_DIR": str(c.workdir / "host-dev")}
    host_baton("init", disk, env=host_env)
    host_baton("attach", disk, "--node", "setup", "--name", name, env=host_env)
    try:
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
             str(c.workdir / "host-dev" / name)], timeout=120)
    finally:
        host_baton("detach", name, env=host_env)
    if backups:
        host_baton("repo", "init", str(repo), env=host_env)
    c.event(f"shared disk {disk} ({DISK_SIZE >> 20} MiB): baton init, ext4 made through the tracker, repo ready")

    c.install_ocf_agent("baton", "disk", AGENT)
    c.start()
    c.wait_formed(60)
    c.enable_fencing()
    order = [f"n{i}" for i in range(1, len(c.nodes) + 1)]
    c.cib_create("resources", (
        f'<primitive id="bdisk" class="ocf" provider="baton" type="disk">'
        f'<instance_attributes id="bdisk-ia">'
        f'<nvpair id="bdisk-disk" name="disk" value="{disk}"/>'
        f'<nvpair id="bdisk-name" name="name" value="{name}"/>'
        f'<nvpair id="bdisk-baton" name="baton" value="{BATON}"/>'
        f'</instance_attributes><operations>'
        f'<op id="bdisk-start" name="start" interval="0" timeout="60s"/>'
        f'<op id="bdisk-stop" name="stop" interval="0" timeout="60s"/>'
        f'<op id="bdisk-mon" name="monitor" interval="5s" timeout="20s"/>'
        f'</operations></primitive>'))
    c.cib_create("resources", (
        f'<primitive id="fs" class="ocf" provider="heartbeat" type="Filesystem">'
        f'<instance_attributes id="fs-ia">'
        f'<nvpair id="fs-dev" name="device" value="/dev/baton/{name}"/>'
        f'<nvpair id="fs-dir" name="directory" value="{mnt}"/>'
        f'<nvpair id="fs-type" name="fstype" value="ext4"/>'
        f'</instance_attributes><operations>'
        f'<op id="fs-start" name="start" interval="0" timeout="60s"/>'
        f'<op id="fs-stop" name="stop" interval="0" timeout="60s"/>'
        f'<op id="fs-mon" name="monitor" interval="5s" timeout="20s"/>'
        f'</operations></primitive>'))
    c.cib_create("constraints", '<rsc_order id="disk-then-fs" first="bdisk" then="fs" kind="Mandatory"/>')
    c.cib_create("constraints", '<rsc_colocation id="fs-with-disk" rsc="fs" with-rsc="bdisk" score="INFINITY"/>')
    c.cib_replace("constraints", f'<rsc_location id="next-owner" rsc="bdisk" node="{order[0]}" score="50"/>')
    owner = c.wait_resource("fs", 90)
    c.event(f"stack running on {owner}")

    durable = Durable()
    results: list[BackupResult] = []
    owners = [owner]
    epochs: list[int] = []

    def note_epoch(node: str) -> None:
        st = json.loads(baton_cmd(c, node, "status", name, "--json").stdout)
        assert st.get("state") == "running", st
        epochs.append(int(st.get("epoch", 0)))
        c.event(f"{node}: baton status: epoch {st.get('epoch')}, node {st.get('node')}")

    note_epoch(owner)
    for rnd in range(failovers):
        wl = start_workload(c, owner, mnt, f"r{rnd}", seed * 100 + rnd, durable)
        base = durable.count()
        wait_files(c, durable, base + 10)
        if backups:
            results.append(backup_everywhere(c, owner, mnt, repo, name, durable, len(results), rnd))
        # Mid-workload: a seeded extra delay after the backup, with some more files durable.
        delay = rng.uniform(0.3, 1.5)
        wait_files(c, durable, durable.count() + 5)
        time.sleep(delay)
        nxt = order[(order.index(owner) + 1) % len(order)]
        c.cib_replace("constraints", f'<rsc_location id="next-owner" rsc="bdisk" node="{nxt}" score="50"/>')
        c.event(f"round {rnd}: {durable.count()} durable files; killing owner {owner} (+{delay:.2f}s)")
        t_kill = time.monotonic()
        c.kill(owner, "owner, mid-workload")
        wl.proc.wait(timeout=30)
        wl.reader.join(timeout=10)
        assert not durable.errors, durable.errors
        new = c.wait_resource("fs", 90, not_on=[owner])
        c.event(f"failover {owner} -> {new} in {time.monotonic() - t_kill:.2f}s")
        fenced = [t for t, _, target in c.fence_log if target == owner]
        assert fenced, f"{owner} was never fenced"
        verify_live(c, new, mnt, durable, c.workdir, f"after-r{rnd}")
        note_epoch(new)
        # The killed node rejoins, so the next kill keeps quorum (2 of 3).
        c.start(owner)
        c.wait_formed(60)
        owner = new
        owners.append(owner)
    if backups:
        results.append(backup_everywhere(c, owner, mnt, repo, name, durable, len(results), failovers))

    c.event(f"owners in turn: {' -> '.join(owners)}; epochs {epochs}")
    assert set(owners) == set(order), f"not every node owned the disk: {owners}"
    assert epochs == sorted(set(epochs)), f"owner epochs must strictly grow: {epochs}"
    st = c.state()
    assert len(st.resources.get("bdisk", [])) == 1, st.resources
    if backups:
        assert results[0].info.get("mode") == "full", results[0].info
        for b in results[1:]:
            assert b.info.get("mode") == "incremental", f"backup #{b.index} was not incremental: {b.info}"
            # ... and really read only what changed (the workload touches well under half of the disk).
            assert 0 < int(b.info["bytes_read"]) < DISK_SIZE // 2, f"backup #{b.index} read too much: {b.info}"
        for b in results:
            check_restore(c, b, repo, c.workdir)
    return results


@pytest.mark.timeout(420)
def test_failover_keeps_backups_incremental() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    missing = missing_tools() + [t for t in FS_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (installed by scripts/setup.sh test)")
    if not Path("/usr/lib/ocf/resource.d/heartbeat/Filesystem").exists():
        pytest.skip("needs resource-agents (ocf:heartbeat:Filesystem)")
    for sub in ("attach", "detach", "status", "backup", "restore"):
        if subprocess.run([str(BATON), sub, "--help"], capture_output=True, timeout=60).returncode != 0:
            pytest.skip(f"`baton {sub}` is not available in this tree")
    seed = int(os.environ.get("BATON_TEST_SEED", "0")) or random.SystemRandom().randrange(1, 2**31)
    print(f"cluster failover scenario: seed {seed} (set BATON_TEST_SEED={seed} to repeat)")
    c = Cluster(3)
    try:
        c.setup()
        results = run_scenario(c, seed)
        for b in results:
            i = b.info
            print(f"backup #{b.index} on {b.node}: {i.get('mode'):<11} read {i.get('bytes_read', 0):>11} B "
                  f"stored {i.get('bytes_stored', 0):>10} B chunks {i.get('chunks_changed')} "
                  f"{i.get('duration_s', 0):.2f}s reason: {i.get('reason')}")
    finally:
        c.teardown()
        print(f"seed {seed}; timeline:\n{c.format_timeline()}")
    left = c.leftovers()
    assert not left, f"left behind: {left}"
