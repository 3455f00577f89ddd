"""A real Pacemaker 2.1 / Corosync 3 cluster on one machine, one node per set of Linux namespaces.

Each node runs in its own network, mount, UTS, IPC and PID namespaces, with PID 1 = ``node-init.sh``, which
starts ``corosync -f`` and ``pacemakerd`` (no systemd needed). The nodes talk over veth pairs on a bridge that
lives in a private hub network namespace (10.99.0.0/24, reachable from nothing else). Fencing stays on: the
stonith resource ``fence_baton_ns`` asks a broker thread in this module to SIGKILL the target node's namespace
init, which is what a power switch does to a real node.

Contract:

* :meth:`Cluster.setup` creates the namespaces, the per-node directories and configuration; :meth:`start`
  launches nodes; :meth:`wait_formed` waits until every running node sees the same membership and a DC.
* Every wait has a bounded timeout and raises :class:`ClusterError` (with the tail of the logs) when it runs
  out; nothing waits forever.
* :meth:`teardown` (also run by ``with Cluster(...)``) always removes EVERYTHING this cluster created: node
  processes (by PID), namespaces, veths, mounts, loop devices it took or that were left bound to files under
  its work directory, and the work directory itself (unless ``keep=True`` or ``BATON_KEEP_CLUSTER=1``). It
  never touches another process's loop devices, namespaces or processes.
* The timeline (:attr:`Cluster.timeline`) records every step with a time relative to the cluster's creation.
* A killed node is a crashed host: the harness pins each node's mount namespace, so file systems the node had
  mounted are not unmounted (and not flushed) as it dies; they are dropped when the node is restarted or at
  teardown, after its FUSE daemons are gone (see :meth:`Cluster._release_mounts`).

Measured on the 2-core machine: formation 3-5 s with the seeded ``dc-deadtime=2s``; failover after SIGKILL of
the owner ~4 s for a Dummy resource and 6-8 s for ocf:baton:disk + Filesystem (fence, attach, journal replay,
mount), with ``token: 1000``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NODE_INIT = HERE / "node-init.sh"
FENCE_AGENT = HERE / "fence_baton_ns"
SUBNET = "10.99.0"
NODE_DIRS = ("etc/corosync", "var/lib/corosync", "var/lib/pacemaker", "var/log/pacemaker", "var/log/corosync")
HACLUSTER_DIRS = ("var/lib/pacemaker/cib", "var/lib/pacemaker/pengine", "var/lib/pacemaker/blackbox",
                  "var/lib/pacemaker/cores", "var/log/pacemaker")
REQUIRED_TOOLS = ("corosync", "pacemakerd", "crm_mon", "cibadmin", "crm_resource", "ip", "unshare", "nsenter",
                  "losetup")

T = TypeVar("T")


class ClusterError(RuntimeError):
    """The test cluster did not reach an expected state in time, or a command inside a node failed."""


def missing_tools() -> list[str]:
    """Names of the programs this harness needs that are not installed (empty when it can run)."""
    return [t for t in REQUIRED_TOOLS if shutil.which(t) is None]


def run(args: Sequence[str], *, check: bool = True, timeout: float = 30, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a host command with a bounded timeout; raise :class:`ClusterError` with its output on failure."""
    try:
        cp = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input, env=env)
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"timed out after {timeout}s: {' '.join(args)}") from e
    if check and cp.returncode != 0:
        raise ClusterError(f"failed ({cp.returncode}): {' '.join(args)}\n{cp.stdout}{cp.stderr}")
    return cp


@dataclass
class Node:
    """One cluster node: its namespaces, directories and (while running) the host PID of its init."""

    name: str
    index: int                                    # 1-based; nodeid and the last octet of its address
    netns: str
    dir: Path
    launcher: subprocess.Popen[bytes] | None = None  # the `unshare` process (parent of the node's init)
    init_pid: int | None = None                   # host PID of the node's PID 1
    mnt_pin: int | None = None                    # fd of the node's mount namespace, see Cluster._pin_mounts

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}"

    def alive(self) -> bool:
        """True while the node's init is running (not a zombie)."""
        if self.init_pid is None:
            return False
        try:
            with open(f"/proc/{self.init_pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return state not in ("Z", "X")


@dataclass
class ClusterState:
    """A parsed ``crm_mon --output-as=xml`` snapshot as seen from one node."""

    seen_from: str
    dc: str | None
    quorate: bool
    online: set[str]
    resources: dict[str, list[str]]               # resource id -> nodes where it is started (not pending)
    failed: dict[str, list[str]]                  # resource id -> nodes where it is failed
    raw: str = field(repr=False, default="")


class Cluster:
    """A 3-node (by default) Pacemaker/Corosync cluster in namespaces. Use as a context manager.

    ``statistics()`` reports counts of starts, kills, fencing requests and the timeline length.
    """

    def __init__(self, nodes: int = 3, *, token_ms: int = 1000, workdir: Path | None = None,
                 keep: bool | None = None, log: Callable[[str], None] | None = None) -> None:
        if nodes < 2 or nodes > 9:
            raise ValueError("between 2 and 9 nodes")
        self.tag = secrets.token_hex(3)
        self.t0 = time.monotonic()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"baton-cluster-{self.tag}-"))
        self.keep = keep if keep is not None else os.environ.get("BATON_KEEP_CLUSTER") == "1"
        self.token_ms = token_ms
        self.hub = f"btn-{self.tag}-hub"
        self.nodes: dict[str, Node] = {}
        for i in range(1, nodes + 1):
            name = f"n{i}"
            self.nodes[name] = Node(name, i, f"btn-{self.tag}-{name}", self.workdir / "nodes" / name)
        self.overlay = self.workdir / "overlay"
        self.fence_dir = self.workdir / "fence"
        self.shared = self.workdir / "shared"
        self.timeline: list[tuple[float, str]] = []
        self.fence_log: list[tuple[float, str, str]] = []  # (t, action, target)
        self._log = log
        self._netns_made: list[str] = []
        self._loops: list[str] = []
        self._seen_loops: dict[str, str] = {}    # /dev/loopN -> diskseq, see _scan_loops
        self._dev_baton_made = False
        self._broker: threading.Thread | None = None
        self._broker_stop = threading.Event()
        self._lock = threading.Lock()
        self._stats = {"node_starts": 0, "node_kills": 0, "fence_requests": 0, "commands": 0}
        self._torn_down = False

    # ------------------------------------------------------------------ bookkeeping

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, msg: str) -> None:
        """Append a line to the timeline (and echo it through ``log`` if one was given)."""
        with self._lock:
            self.timeline.append((self.now(), msg))
        if self._log is not None:
            self._log(f"[{self.now():7.2f}s] {msg}")

    def format_timeline(self) -> str:
        return "\n".join(f"{t:8.2f}s  {m}" for t, m in self.timeline)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats, "timeline_events": len(self.timeline), "fence_done": len(self.fence_log)}

    def __enter__(self) -> Cluster:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Create the hub bridge, one network namespace per node, node directories, corosync.conf, a seeded CIB
        (``dc-deadtime=2s``), the overlay with the fence agent and the OCF agents, and start the fence broker."""
        if os.geteuid() != 0:
            raise ClusterError("the cluster harness needs root")
        for d in ("nodes", "fence", "shared", "overlay/sbin", "overlay/ocf"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(FENCE_AGENT, self.overlay / "sbin" / "fence_baton_ns")
        if not Path("/dev/baton").exists():
            # The mount point for each node's private tmpfs; the host itself never writes in it.
            Path("/dev/baton").mkdir(mode=0o755)
            self._dev_baton_made = True
        self._make_netns(self.hub)
        run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for n in self.nodes.values():
            self._make_netns(n.netns)
            run(["ip", "-n", self.hub, "link", "add", f"v{n.index}", "type", "veth", "peer", "name", "eth0",
                 "netns", n.netns])
            run(["ip", "-n", self.hub, "link", "set", f"v{n.index}", "master", "br0", "up"])
            run(["ip", "-n", n.netns, "addr", "add", f"{n.address}/24", "dev", "eth0"])
            run(["ip", "-n", n.netns, "link", "set", "eth0", "up"])
            run(["ip", "-n", n.netns, "link", "set", "lo", "up"])
            for d in NODE_DIRS:
                (n.dir / d).mkdir(parents=True, exist_ok=True)
            for d in HACLUSTER_DIRS:
                (n.dir / d).mkdir(parents=True, exist_ok=True)
                shutil.chown(n.dir / d, "hacluster", "haclient")
            (n.dir / "etc/corosync/corosync.conf").write_text(self._corosync_conf())
            cib = n.dir / "var/lib/pacemaker/cib/cib.xml"
            cib.write_text(SEED_CIB)
            cib.chmod(0o600)
            shutil.chown(cib, "hacluster", "haclient")
        self._broker = threading.Thread(target=self._fence_broker, name="fence-broker", daemon=True)
        self._broker.start()
        self.event(f"setup: {len(self.nodes)} nodes, tag {self.tag}, workdir {self.workdir}")

    def install_ocf_agent(self, provider: str, name: str, source: Path) -> None:
        """Make ``ocf:provider:name`` (from ``source``) visible in nodes started after this call."""
        dst = self.overlay / "ocf" / provider / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dst)
        dst.chmod(0o755)

    def _make_netns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._netns_made.append(name)

    def _corosync_conf(self) -> str:
        nodes = "\n".join(
            f"    node {{\n        ring0_addr: {n.address}\n        name: {n.name}\n        nodeid: {n.index}\n    }}"
            for n in self.nodes.values())
        two = "\n    two_node: 1" if len(self.nodes) == 2 else ""
        return (f"totem {{\n    version: 2\n    cluster_name: baton-{self.tag}\n    transport: knet\n"
                f"    crypto_cipher: none\n    crypto_hash: none\n    token: {self.token_ms}\n}}\n"
                f"nodelist {{\n{nodes}\n}}\n"
                f"quorum {{\n    provider: corosync_votequorum{two}\n}}\n"
                "logging {\n    to_logfile: yes\n    logfile: /var/log/corosync/corosync.log\n"
                "    to_stderr: no\n    to_syslog: no\n    timestamp: hires\n}\n")

    # ------------------------------------------------------------------ nodes

    def start(self, *names: str, timeout: float = 15) -> None:
        """Start the given nodes (all when none given). Returns once each node's init has launched pacemakerd;
        use :meth:`wait_formed` to wait for membership."""
        for name in names or tuple(self.nodes):
            self._start_one(name, timeout)

    def _start_one(self, name: str, timeout: float) -> None:
        n = self.nodes[name]
        if n.alive():
            raise ClusterError(f"{name} is already running")
        self._reap(n)
        self._release_mounts(n)
        (n.dir / "started").unlink(missing_ok=True)
        logf = open(n.dir / "launcher.log", "ab")  # noqa: SIM115 (handed to the child)
        try:
            n.launcher = subprocess.Popen(
                ["ip", "netns", "exec", n.netns, "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork",
                 "--kill-child", str(NODE_INIT), n.name, str(n.dir), str(self.overlay)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        finally:
            logf.close()
        launcher = n.launcher
        n.init_pid = self._wait(lambda: self._child_of(launcher), timeout, f"{name}: init to start")
        n.mnt_pin = os.open(f"/proc/{n.init_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        started = n.dir / "started"
        self._wait(lambda: started.exists() or launcher.poll() is not None, timeout,
                   f"{name}: corosync and pacemakerd to start")
        if not n.alive():
            raise ClusterError(f"{name}: init exited during start-up\n{self.log_tail(name)}")
        with self._lock:
            self._stats["node_starts"] += 1
        self.event(f"{name}: started (init pid {n.init_pid})")

    def _release_mounts(self, n: Node, timeout: float = 20) -> str | None:
        """Drop the pin on a dead node's mount namespace, which unmounts what was still mounted in it.

        Why the pin: a killed node's file system on /dev/baton/NAME must not be unmounted while the node dies.
        That unmount writes back through the very FUSE daemon that is being killed, and if the daemon happens
        to be the namespace's last process it cannot finish exiting (see docs/frontends-fuse.md), wedging the
        loop device. Holding the namespace from the host lets the daemon die first (the kernel then aborts its
        FUSE connection) and leaves the file system as a crashed host leaves it: dirty pages never reach the
        disk. Released here, after the node is dead, the unmount fails fast with EIO instead. Runs in a thread
        so that even a wedge cannot hang the harness; returns a problem description, or None."""
        fd, n.mnt_pin = n.mnt_pin, None
        if fd is None:
            return None
        t = threading.Thread(target=os.close, args=(fd,), name=f"release-{n.name}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            return f"{n.name}: releasing its mount namespace did not finish in {timeout}s"
        self.event(f"{n.name}: mount namespace released")
        return None

    @staticmethod
    def _child_of(p: subprocess.Popen[bytes] | None) -> int | None:
        if p is None:
            return None
        try:
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        except FileNotFoundError:
            return None
        return int(kids[0]) if kids else None

    def kill(self, name: str, why: str = "test") -> None:
        """SIGKILL the node's namespace init: the kernel kills every process of the node and drops its mounts."""
        n = self.nodes[name]
        if n.init_pid is not None and n.alive():
            self._scan_loops()
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.init_pid, signal.SIGKILL)
            with self._lock:
                self._stats["node_kills"] += 1
            self.event(f"{name}: SIGKILL to namespace init ({why})")
        self._reap(n)

    def _reap(self, n: Node) -> None:
        if n.launcher is not None:
            try:
                n.launcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                n.launcher.kill()
                n.launcher.wait(timeout=10)
            n.launcher = None
        if n.init_pid is not None:
            self._wait(lambda: not n.alive(), 10, f"{n.name}: init to die")
        n.init_pid = None

    def running(self) -> list[str]:
        return [n.name for n in self.nodes.values() if n.alive()]

    # ------------------------------------------------------------------ commands inside nodes

    def _nsenter(self, name: str) -> list[str]:
        n = self.nodes[name]
        if not n.alive() or n.init_pid is None:
            raise ClusterError(f"{name} is not running")
        return ["nsenter", "-t", str(n.init_pid), "-n", "-m", "-u", "-i", "-p", "--"]

    def exec(self, name: str, *args: str, check: bool = True, timeout: float = 30,
             input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside a node (all its namespaces) with a bounded timeout."""
        with self._lock:
            self._stats["commands"] += 1
        full_env = {**os.environ, **(env or {})}
        return run([*self._nsenter(name), *args], check=check, timeout=timeout, input=input, env=full_env)

    def popen(self, name: str, *args: str, env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen[str]:
        """Start a long-running command inside a node; it dies with the node. The caller reaps it."""
        return subprocess.Popen([*self._nsenter(name), *args], text=True, env={**os.environ, **(env or {})},
                                **kw)

    def any_running(self, exclude: Sequence[str] = ()) -> str:
        for n in self.running():
            if n not in exclude:
                return n
        raise ClusterError("no node is running")

    def cib_create(self, section: str, xml: str, via: str | None = None) -> None:
        """Add an XML element to a CIB section (resources, constraints, ...) through a running node."""
        self.exec(via or self.any_running(), "cibadmin", "--create", "-o", section, "--xml-text", xml)

    def cib_replace(self, section: str, xml: str, via: str | None = None) -> None:
        """Replace (or add) an element, matched by id, in a CIB section."""
        node = via or self.any_running()
        cp = self.exec(node, "cibadmin", "--replace", "-o", section, "--xml-text", xml, check=False)
        if cp.returncode != 0:
            self.cib_create(section, xml, via=node)

    def crm_config(self, name: str, value: str, via: str | None = None) -> None:
        self.exec(via or self.any_running(), "crm_attribute", "--type", "crm_config", "--name", name,
                  "--update", value)

    def enable_fencing(self, via: str | None = None) -> None:
        """Add the ``fence_baton_ns`` stonith device for every node and turn fencing on."""
        hosts = " ".join(self.nodes)
        self.cib_create("resources", (
            '<primitive id="fence" class="stonith" type="fence_baton_ns">'
            '<instance_attributes id="fence-ia">'
            f'<nvpair id="fence-hosts" name="pcmk_host_list" value="{hosts}"/>'
            '<nvpair id="fence-check" name="pcmk_host_check" value="static-list"/>'
            f'<nvpair id="fence-dir" name="fence_dir" value="{self.fence_dir}"/>'
            '</instance_attributes>'
            '<operations><op id="fence-mon" name="monitor" interval="60s"/></operations></primitive>'), via)
        self.crm_config("stonith-enabled", "true", via)
        self.event("fencing enabled (fence_baton_ns, host broker)")

    def state(self, via: str | None = None) -> ClusterState:
        """The cluster as one running node sees it (``crm_mon -1 --output-as=xml``)."""
        node = via or self.any_running()
        cp = self.exec(node, "crm_mon", "-1", "--output-as=xml", check=False, timeout=15)
        if not cp.stdout.strip():
            raise ClusterError(f"crm_mon on {node} gave no output: {cp.stderr.strip()}")
        root = ET.fromstring(cp.stdout)
        dc_el = root.find("./summary/current_dc")
        dc = dc_el.get("name") if dc_el is not None and dc_el.get("present") == "true" else None
        quorate = dc_el is not None and dc_el.get("with_quorum") == "true"
        online = {e.get("name", "") for e in root.iterfind("./nodes/node") if e.get("online") == "true"}
        res: dict[str, list[str]] = {}
        failed: dict[str, list[str]] = {}
        for r in root.iter("resource"):
            rid = r.get("id", "")
            where = [x.get("name", "") for x in r.iterfind("node")]
            # A start still in progress is reported active too, with pending="Starting" (record-pending):
            # only a completed start counts, or callers would race the resource agent.
            if r.get("active") == "true" and r.get("pending") is None and r.get("role") == "Started":
                res[rid] = where
            if r.get("failed") == "true":
                failed[rid] = where
        return ClusterState(node, dc, quorate, online, res, failed, cp.stdout)

    def _wait(self, pred: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
        end = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > end:
                raise ClusterError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(every)

    def wait_for(self, pred: Callable[[ClusterState], bool], timeout: float, what: str,
                 via: str | None = None) -> ClusterState:
        """Poll the cluster state until ``pred`` holds; raise :class:`ClusterError` with logs on timeout."""
        end = time.monotonic() + timeout
        last: ClusterState | None = None
        err = ""
        while time.monotonic() < end:
            try:
                last = self.state(via)
                if pred(last):
                    return last
            except (ClusterError, ET.ParseError) as e:
                err = str(e)
            time.sleep(0.25)
        raise ClusterError(f"timed out after {timeout}s waiting for {what}; last state: {last}; {err}\n"
                           f"{self.log_tail()}")

    def wait_formed(self, timeout: float = 60) -> ClusterState:
        """Wait until a DC is elected with quorum and every running node is online."""
        want = set(self.running())
        st = self.wait_for(lambda s: s.dc is not None and s.quorate and want <= s.online, timeout,
                           f"cluster of {sorted(want)} to form")
        self.event(f"cluster formed: online {sorted(st.online)}, DC {st.dc}")
        return st

    def wait_resource(self, rsc: str, timeout: float = 60, *, not_on: Sequence[str] = ()) -> str:
        """Wait until ``rsc`` is active on exactly one node (not in ``not_on``) and return that node."""
        st = self.wait_for(lambda s: len(s.resources.get(rsc, [])) == 1
                           and s.resources[rsc][0] not in not_on, timeout,
                           f"{rsc} to run on one node (not on {list(not_on)})")
        return st.resources[rsc][0]

    # ------------------------------------------------------------------ fencing

    def _fence_broker(self) -> None:
        """Host side of ``fence_baton_ns``: kill the target's namespace init and answer ``ok``."""
        ticks = 0
        while not self._broker_stop.is_set():
            try:
                reqs = sorted(self.fence_dir.glob("*.req"))
            except OSError:
                reqs = []
            for req in reqs:
                try:
                    action, target = req.read_text().split()
                except (OSError, ValueError):
                    continue
                answer = "fail"
                n = self.nodes.get(target)
                if n is not None:
                    with self._lock:
                        self._stats["fence_requests"] += 1
                    if n.init_pid is not None and n.alive():
                        self._scan_loops()
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(n.init_pid, signal.SIGKILL)
                        self.event(f"fence: {action} {target}: SIGKILL to its namespace init")
                    else:
                        self.event(f"fence: {action} {target}: already dead")
                    answer = "ok"
                    with self._lock:
                        self.fence_log.append((self.now(), action, target))
                tmp = req.with_suffix(".donetmp")
                tmp.write_text(answer)
                tmp.rename(req.with_suffix(".done"))
                req.unlink(missing_ok=True)
            ticks += 1
            if ticks % 20 == 0:
                self._scan_loops()   # nodes can also die on their own
            self._broker_stop.wait(0.05)

    # ------------------------------------------------------------------ loop devices

    def loop_attach(self, image: Path) -> str:
        """Bind a loop device (global, taken with --find) to ``image``; detached at teardown."""
        dev = run(["losetup", "--find", "--show", str(image)]).stdout.strip()
        self._loops.append(dev)
        self.event(f"loop: {dev} -> {image.name}")
        return dev

    @staticmethod
    def _diskseq(dev_name: str) -> str | None:
        try:
            return Path(f"/sys/block/{dev_name}/diskseq").read_text().strip()
        except OSError:
            return None

    def _scan_loops(self) -> None:
        """Remember (device, diskseq) of every loop device that belongs to this cluster, while its path still
        shows that: once a node's mount namespace is gone, sysfs shows a loop device over that node's FUSE file
        as a bare "/disk", so it can only be recognised from an earlier look. The diskseq makes sure we never
        detach a device number that has since been reused by someone else."""
        for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
            try:
                back = bf.read_text().strip()
            except OSError:
                continue
            # A device stacked on one of our loop devices shows that device as its backing file
            # (sysfs renders /dev/loopN as /loopN: the device node lives on the devtmpfs mounted at /dev).
            stacked = any(back in (d, d.removeprefix("/dev")) for d in self._loops)
            if back.startswith(str(self.workdir)) or f"baton-{self.tag}" in back or stacked:
                name = bf.parent.parent.name
                seq = self._diskseq(name)
                if seq is not None:
                    with self._lock:
                        self._seen_loops["/dev/" + name] = seq

    def _own_stray_loops(self) -> list[str]:
        """Loop devices of this cluster that still exist (other than the ones :meth:`loop_attach` took), e.g.
        left bound to a killed node's dead FUSE file; never anyone else's."""
        self._scan_loops()
        with self._lock:
            seen = dict(self._seen_loops)
        return [d for d, seq in seen.items() if d not in self._loops and self._diskseq(d[5:]) == seq]

    # ------------------------------------------------------------------ logs

    def log_tail(self, name: str | None = None, lines: int = 25) -> str:
        """The last lines of the pacemaker, corosync and launcher logs of one node (or all)."""
        parts: list[str] = []
        for n in [self.nodes[name]] if name else list(self.nodes.values()):
            for rel in ("launcher.log", "var/log/pacemaker/pacemaker.log", "var/log/corosync/corosync.log"):
                p = n.dir / rel
                if p.exists():
                    tail = p.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {n.name}:{rel}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Remove everything, in dependency order; each step is bounded and runs even if an earlier one failed.
        Errors are collected and printed, never raised (the test's own failure is the interesting one)."""
        if self._torn_down:
            return
        self._torn_down = True
        problems: list[str] = []
        for n in self.nodes.values():
            try:
                if n.alive():
                    self.kill(n.name, "teardown")
                else:
                    self._reap(n)
            except Exception as e:  # teardown must go on whatever failed
                problems.append(f"kill {n.name}: {e}")
        for n in self.nodes.values():
            problem = self._release_mounts(n)
            if problem:
                problems.append(problem)
        self._broker_stop.set()
        if self._broker is not None:
            self._broker.join(timeout=5)
        # Nodes' mounts died with their mount namespaces; a killed node's baton daemon may still hold a loop
        # device over its (now dead) FUSE file, because loop devices are global.
        deadline = time.monotonic() + 15
        while True:
            stray = self._own_stray_loops()
            for dev in stray:
                run(["losetup", "-d", dev], check=False, timeout=10)
            if not stray or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        for dev in reversed(self._loops):
            for _ in range(20):
                cp = run(["losetup", "-d", dev], check=False, timeout=10)
                if cp.returncode == 0 or "No such device" in cp.stderr:
                    break
                time.sleep(0.25)
            else:
                problems.append(f"losetup -d {dev}: {cp.stderr.strip()}")
        self._loops.clear()
        for ns in reversed(self._netns_made):
            cp = run(["ip", "netns", "delete", ns], check=False, timeout=10)
            if cp.returncode != 0:
                problems.append(f"netns {ns}: {cp.stderr.strip()}")
        self._netns_made.clear()
        if self._dev_baton_made:
            with contextlib.suppress(OSError):
                Path("/dev/baton").rmdir()
        left = self._own_stray_loops()
        if left:
            problems.append(f"loop devices left: {left}")
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.event("teardown done" + (f" with problems: {problems}" if problems else ""))
        if problems:
            print("cluster teardown problems:", *problems, sep="\n  ", file=sys.stderr)

    def leftovers(self) -> list[str]:
        """Anything of this cluster still present on the machine (empty after a clean teardown)."""
        out: list[str] = []
        ns = run(["ip", "netns", "list"], check=False).stdout
        out += [line.split()[0] for line in ns.splitlines() if f"btn-{self.tag}-" in line]
        out += self._own_stray_loops()
        out += [f"pid {n.init_pid}" for n in self.nodes.values() if n.alive()]
        with open("/proc/self/mountinfo") as f:
            out += [line.split()[4] for line in f if str(self.workdir) in line]
        if not self.keep and self.workdir.exists():
            out.append(str(self.workdir))
        return out


@contextlib.contextmanager
def cluster(nodes: int = 3, **kw: Any) -> Iterator[Cluster]:
    """``with cluster() as c:`` builds, yields and always tears down a :class:`Cluster`."""
    c = Cluster(nodes, **kw)
    with c:
        yield c


SEED_CIB = """<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="opt-dc-deadtime" name="dc-deadtime" value="2s"/>
        <nvpair id="opt-stonith-enabled" name="stonith-enabled" value="false"/>
        <nvpair id="opt-recheck" name="cluster-recheck-interval" value="30s"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
    <rsc_defaults>
      <meta_attributes id="rsc-options">
        <nvpair id="rsc-options-stickiness" name="resource-stickiness" value="100"/>
      </meta_attributes>
    </rsc_defaults>
  </configuration>
  <status/>
</cib>
"""
