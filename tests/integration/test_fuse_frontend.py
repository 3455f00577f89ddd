"""The FUSE + loop frontend against the real kernel: a FakeTracker served by a daemon subprocess.

Every daemon runs in its own private mount namespace (``unshare --mount --propagation private``), so its FUSE
mount cannot leak into other namespaces on this shared machine; file systems made on the device are mounted
in short-lived private namespaces too. Loop devices are global: each test detaches only the device its daemon
got, in finally blocks (via ``stop-force`` or ``cleanup_stale``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import random
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from baton.errors import DeviceBusy
from baton.frontends import loopdev
from baton.frontends.fuse import cleanup_stale, load_state
from conftest import need_root, need_tool

pytestmark = pytest.mark.integration

MiB = 1 << 20
CHUNK = 64 * 1024
BOUND = 30.0  # seconds: upper bound for anything that must not hang (not a performance assertion)


def _prereqs() -> None:
    need_root()
    need_tool("losetup", "unshare", "fusermount3")
    if not Path("/dev/fuse").exists():
        pytest.skip("needs /dev/fuse")


class Daemon:
    """The fake-tracker FUSE daemon as a subprocess in its own mount namespace, driven line by line."""

    def __init__(self, root: Path, name: str, size: int, *extra: str, expect_ready: bool = True,
                 unshare: tuple[str, ...] = ()) -> None:
        self.root, self.name = root, name
        self.run_dir, self.dev_dir = root / "run", root / "dev"
        self.backing = root / f"{name}.img"
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", *unshare, sys.executable, "-m",
             "baton.testing.fuse_daemon", "--backing", str(self.backing), "--size", str(size),
             "--name", name, "--run-dir", str(self.run_dir), "--dev-dir", str(self.dev_dir), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.ready = self.read()
        if expect_ready:
            assert self.ready.get("event") == "ready", self.ready
            self.device: str = self.ready["device"]
            self.loop: str = self.ready["loop"]
            self.diskseq: int = self.ready["diskseq"]

    def loop_gone(self) -> bool:
        """Our attachment of the loop device no longer exists (the device may have been reused since)."""
        li = loopdev.info(self.loop)
        return li is None or li.diskseq != self.diskseq

    def read(self, timeout: float = BOUND) -> dict[str, Any]:
        assert self.proc.stdout is not None
        if not self._sel.select(timeout):
            raise AssertionError(f"daemon {self.name}: no output within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"daemon {self.name} exited (rc={self.proc.poll()}) without output")
        obj: dict[str, Any] = json.loads(line)
        return obj

    def cmd(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(BOUND)

    def close(self) -> None:
        """Stop the daemon whatever state it is in, then remove any leftovers it names."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.write("stop-force\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(BOUND)
            except subprocess.TimeoutExpired:
                self.kill()
        with contextlib.suppress(Exception):
            cleanup_stale(self.name, self.run_dir, self.dev_dir)
        for p in (self.proc.stdin, self.proc.stdout):
            if p is not None:
                p.close()


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _prereqs()
    return Path(tmp_path_factory.mktemp("fuse", numbered=True))


@pytest.fixture
def daemon(root: Path) -> Iterator[Daemon]:
    d = Daemon(root, "t", 64 * MiB)
    try:
        yield d
    finally:
        d.close()


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))
    buf.write(data)
    return buf


def _pwrite_direct(dev: str, offset: int, data: bytes, flags: int = 0) -> None:
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = _aligned(data)
        n = os.pwritev(fd, [buf], offset, flags)
        assert n == len(data)
    finally:
        os.close(fd)


def _pread_direct(dev: str, offset: int, length: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def _ns_shell(script: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run a shell script in a fresh private mount namespace (mounts vanish with it)."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", script],
                          capture_output=True, text=True, timeout=timeout, check=False)


# ---- data path -------------------------------------------------------------------------------------------


def test_device_is_ready_and_state_recorded(daemon: Daemon) -> None:
    dev = daemon.device
    assert os.path.realpath(dev) == daemon.loop
    assert loopdev.size_of(dev) == 64 * MiB
    assert loopdev.dio_enabled(daemon.loop), "loop device must run with --direct-io=on"
    st = load_state(daemon.run_dir / "t" / "state.json")
    assert st is not None and st.pid == daemon.proc.pid and st.loop == daemon.loop and st.frontend == "fuse"
    li = loopdev.info(daemon.loop)
    assert li is not None and li.diskseq == st.loop_diskseq == daemon.diskseq and li.back_file.endswith("/disk")


def test_roundtrip_cmp_and_bitmap_exact(daemon: Daemon) -> None:
    seed = 20261124
    print(f"seed={seed}")
    rng = random.Random(seed)
    src = daemon.root / "src.bin"
    src.write_bytes(rng.randbytes(8 * MiB))
    r = subprocess.run(["dd", f"if={src}", f"of={daemon.device}", "bs=1M", "seek=3", "oflag=direct",
                        "status=none"], capture_output=True, text=True, timeout=BOUND, check=False)
    assert r.returncode == 0, r.stderr
    out = daemon.root / "out.bin"
    r = subprocess.run(["dd", f"if={daemon.device}", f"of={out}", "bs=1M", "skip=3", "count=8", "iflag=direct",
                        "status=none"], capture_output=True, text=True, timeout=BOUND, check=False)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["cmp", str(src), str(out)], timeout=BOUND, check=False).returncode == 0
    assert daemon.cmd("reset") == {"ok": True}

    # Scattered writes of random sizes: the bitmap must be exactly the chunks they touched.
    expected: set[int] = set()
    for _ in range(40):
        off = rng.randrange(0, 64 * MiB // 4096 - 64) * 4096
        length = rng.choice([4096, 8192, 65536, 131072, 3 * 4096])
        _pwrite_direct(daemon.device, off, rng.randbytes(length))
        expected |= set(range(off // CHUNK, (off + length - 1) // CHUNK + 1))
    dirty = daemon.cmd("dirty")["dirty"]
    assert set(dirty) == expected


def test_write_is_acknowledged_only_after_the_tracker(daemon: Daemon) -> None:
    assert daemon.cmd("hold") == {"ok": True}
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            _pwrite_direct(daemon.device, 1 * MiB, b"\xab" * 4096)
        except BaseException as exc:
            errors.append(exc)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        # While the tracker holds the write, the block-level write must not complete.
        assert not done.wait(1.0), "the write was acknowledged before the tracker handled it"
        assert daemon.cmd("stats")["tracker"]["writes"] == 0
    finally:
        daemon.cmd("release")
    assert done.wait(BOUND) and not errors, errors
    t.join(BOUND)
    assert daemon.cmd("dirty")["dirty"] == [1 * MiB // CHUNK]


def test_fsync_and_fua_reach_tracker_flush(daemon: Daemon) -> None:
    before = daemon.cmd("stats")["tracker"]["flushes"]
    fd = os.open(daemon.device, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = _aligned(b"x" * 4096)
        os.pwritev(fd, [buf], 0)
        os.fsync(fd)
        mid = daemon.cmd("stats")["tracker"]["flushes"]
        assert mid > before
        os.pwritev(fd, [buf], 8192, os.RWF_DSYNC)  # FUA: the block layer emulates it as write + flush
        assert daemon.cmd("stats")["tracker"]["flushes"] > mid
    finally:
        os.close(fd)


def test_discard_and_zeroout_are_tracked(daemon: Daemon) -> None:
    need_tool("blkdiscard")
    _pwrite_direct(daemon.device, 0, b"\xff" * (4 * MiB))
    daemon.cmd("reset")
    r = subprocess.run(["blkdiscard", "-o", str(1 * MiB), "-l", str(1 * MiB), daemon.device],
                       capture_output=True, text=True, timeout=BOUND, check=False)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["blkdiscard", "-z", "-o", str(2 * MiB), "-l", str(512 * 1024), daemon.device],
                       capture_output=True, text=True, timeout=BOUND, check=False)
    assert r.returncode == 0, r.stderr
    s = daemon.cmd("stats")
    assert s["frontend"]["punch_holes"] >= 1 and s["frontend"]["zero_ranges"] >= 1
    assert s["tracker"]["write_zeroes"] >= 2
    want = set(range(1 * MiB // CHUNK, 2 * MiB // CHUNK)) | set(range(2 * MiB // CHUNK, (2 * MiB + 512 * 1024) // CHUNK))
    assert set(daemon.cmd("dirty")["dirty"]) == want
    assert _pread_direct(daemon.device, 1 * MiB, 1 * MiB) == bytes(1 * MiB)
    assert _pread_direct(daemon.device, 2 * MiB, 512 * 1024) == bytes(512 * 1024)
    assert _pread_direct(daemon.device, 0, 4096) == b"\xff" * 4096


# ---- file systems and detach -----------------------------------------------------------------------------


def test_ext4_mount_fsck_and_detach_refused_while_mounted(root: Path) -> None:
    need_tool("mkfs.ext4", "e2fsck")
    d = Daemon(root, "e4", 256 * MiB)
    holder: subprocess.Popen[str] | None = None
    try:
        r = subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", d.device],
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        mnt = root / "mnt"
        mnt.mkdir()
        # Keep the file system mounted in a private namespace until we tell the holder to unmount.
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
             f"mount {d.device} {mnt}; mkdir {mnt}/d; for i in $(seq 50); do head -c 20000 /dev/urandom > {mnt}/d/f$i; done; "
             f"cp -r /usr/share/doc/fio {mnt}/ 2>/dev/null || true; sync; echo mounted; read x; umount {mnt}; echo unmounted"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "mounted"
        reply = d.cmd("stop")
        assert reply["ok"] is False and reply["error"] == "DeviceBusy", reply
        assert f"mounted at {mnt}" in reply["message"], reply
        # Refused means untouched: the device still serves.
        assert _pread_direct(d.device, 0, 4096) is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "unmounted"
        assert holder.wait(BOUND) == 0
        r = subprocess.run(["e2fsck", "-fn", d.device], capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        # An open file descriptor also blocks detach, and the message names the pid.
        fd = os.open(d.device, os.O_RDONLY)
        try:
            reply = d.cmd("stop")
            assert reply["ok"] is False and f"opened by pid {os.getpid()}" in reply["message"], reply
        finally:
            os.close(fd)
        assert d.cmd("stop") == {"ok": True}
        assert d.read()["event"] == "stopped"
        assert d.proc.wait(BOUND) == 0
        assert d.loop_gone()
        assert not Path(d.device).is_symlink() and not (d.run_dir / "e4" / "state.json").exists()
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(BOUND)
        d.close()


def test_xfs_mount_and_repair(root: Path) -> None:
    need_tool("mkfs.xfs", "xfs_repair")
    d = Daemon(root, "xf", 512 * MiB)
    try:
        r = subprocess.run(["mkfs.xfs", "-q", "-f", d.device], capture_output=True, text=True, timeout=120,
                           check=False)
        assert r.returncode == 0, r.stderr
        mnt = root / "mnt"
        mnt.mkdir()
        r = _ns_shell(f"mount {d.device} {mnt}; for i in $(seq 40); do head -c 50000 /dev/urandom > {mnt}/f$i; done; "
                      f"dd if=/dev/urandom of={mnt}/big bs=1M count=16 status=none; umount {mnt}")
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["xfs_repair", "-n", d.device], capture_output=True, text=True, timeout=120,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert d.cmd("stop") == {"ok": True}
    finally:
        d.close()


# ---- failures: kill, fence, hang, second attach ----------------------------------------------------------

_WRITER = """
import mmap, os, sys, errno
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 65536); buf.write(b"w" * 65536)
size = int(sys.argv[2]); n = 0
print("writing", flush=True)
while True:
    try:
        os.pwritev(fd, [buf], (n * 65536) % size)
    except OSError as e:
        print("errno", e.errno, flush=True); sys.exit(0)
    n += 1
"""


def test_sigkill_fails_writer_with_eio_then_cleanup_stale(root: Path) -> None:
    d = Daemon(root, "k", 64 * MiB)
    writer: subprocess.Popen[str] | None = None
    try:
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, d.device, str(64 * MiB)],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "writing"
        time.sleep(0.3)  # let it write for a moment
        d.kill()
        time.sleep(1.5)  # past libfuse's 1 s attribute timeout: cleanup must not rely on cached attributes
        # The writer must get an error, not hang: bounded by the wait below.
        assert writer.wait(BOUND) == 0
        assert writer.stdout.readline().split() == ["errno", str(errno.EIO)]
        with pytest.raises(OSError) as ei:
            _pread_direct(d.device, 0, 4096)
        assert ei.value.errno == errno.EIO
        actions = cleanup_stale("k", d.run_dir, d.dev_dir)
        assert f"detached {d.loop}" in actions[0], actions
        assert d.loop_gone()
        assert not Path(d.device).is_symlink() and not (d.run_dir / "k" / "state.json").exists()
        assert cleanup_stale("k", d.run_dir, d.dev_dir) == []  # idempotent
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait(BOUND)
        d.close()


def test_stale_cleanup_refuses_while_fs_mounted_on_dead_device(root: Path) -> None:
    need_tool("mkfs.ext4")
    d = Daemon(root, "s", 64 * MiB)
    holder: subprocess.Popen[str] | None = None
    try:
        r = subprocess.run(["mkfs.ext4", "-q", "-F", d.device], capture_output=True, text=True, timeout=120,
                           check=False)
        assert r.returncode == 0, r.stderr
        mnt = root / "mnt"
        mnt.mkdir()
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount {d.device} {mnt} && echo mounted; read x; umount {mnt}; echo unmounted"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "mounted"
        d.kill()
        with pytest.raises(DeviceBusy, match=r"still in use: .*mounted at"):
            cleanup_stale("s", d.run_dir, d.dev_dir)
        assert (d.run_dir / "s" / "state.json").exists(), "a refused cleanup must keep the state file"
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "unmounted"
        holder.wait(BOUND)
        assert any(a.startswith("detached") for a in cleanup_stale("s", d.run_dir, d.dev_dir))
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(BOUND)
        d.close()


_SAME_NS = """
import json, os, subprocess, sys, time
from pathlib import Path
from baton.frontends.fuse import cleanup_stale
from baton.frontends import loopdev
root = Path(sys.argv[1])
p = subprocess.Popen([sys.executable, "-m", "baton.testing.fuse_daemon", "--backing", str(root / "n.img"),
                      "--size", str(16 << 20), "--name", "n", "--run-dir", str(root / "run"),
                      "--dev-dir", str(root / "dev")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
ready = json.loads(p.stdout.readline())
p.kill(); p.wait()
mp = root / "run" / "n" / "fuse"
before = loopdev.mounted_at(mp) is not None
try:
    os.stat(mp / "disk"); dead = "stat ok"
except OSError as e:
    dead = e.strerror
actions = cleanup_stale("n", root / "run", root / "dev")
print(json.dumps({"before": before, "dead": dead, "actions": actions, "after": loopdev.mounted_at(mp) is not None,
                  "loop": ready["loop"]}))
"""


def test_stale_cleanup_unmounts_dead_fuse_mount_in_same_namespace(root: Path) -> None:
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _SAME_NS,
                        str(root)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["before"] is True and res["after"] is False, res
    assert res["dead"] == "Transport endpoint is not connected", res
    assert any(a.startswith("unmounted dead FUSE mount") for a in res["actions"]), res
    assert any(a.startswith("detached") for a in res["actions"]), res


def test_fenced_fails_io_and_shuts_down(root: Path) -> None:
    d = Daemon(root, "f", 16 * MiB, "--fence-after", "3")
    try:
        for i in range(3):
            _pwrite_direct(d.device, i * 4096, b"a" * 4096)
        with pytest.raises(OSError) as ei:
            _pwrite_direct(d.device, 3 * 4096, b"a" * 4096)
        assert ei.value.errno == errno.EIO
        ev = d.read()
        assert ev["event"] == "stopped" and "fenced" in ev["failure"], ev
        assert d.proc.wait(BOUND) == 0
        assert not (d.run_dir / "f" / "state.json").exists()
        assert d.loop_gone()
    finally:
        d.close()


def test_watchdog_turns_a_hung_tracker_into_eio(root: Path) -> None:
    d = Daemon(root, "w", 16 * MiB, "--request-timeout", "1")
    writer: subprocess.Popen[str] | None = None
    try:
        d.cmd("hold")
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, d.device, str(16 * MiB)],
                                  stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "writing"
        assert writer.wait(BOUND) == 0
        assert writer.stdout.readline().split() == ["errno", str(errno.EIO)]
        ev = d.read()
        assert ev["event"] == "stopped" and "watchdog" in ev["failure"], ev
        assert d.proc.wait(BOUND) == 0
        assert d.loop_gone()
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait(BOUND)
        d.close()


def test_second_attach_is_refused_and_sigterm_is_not_swallowed(root: Path) -> None:
    d = Daemon(root, "two", 16 * MiB)
    try:
        d2 = Daemon(root, "two", 16 * MiB, expect_ready=False)
        try:
            assert d2.ready["event"] == "error" and d2.ready["error"] == "DeviceBusy", d2.ready
            assert f"live pid {d.proc.pid}" in d2.ready["message"]
        finally:
            d2.proc.wait(BOUND)
            d2.close()
        # libfuse installs SIGTERM handlers that would end the FUSE loop under the device; the frontend puts
        # the process's own disposition (default: terminate) back.
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(BOUND) == -signal.SIGTERM
        assert any(a.startswith("detached") for a in cleanup_stale("two", d.run_dir, d.dev_dir))
    finally:
        d.close()


def test_attach_after_killed_daemon_cleans_up_and_serves(root: Path) -> None:
    d = Daemon(root, "re", 16 * MiB)
    try:
        _pwrite_direct(d.device, 0, b"kept" * 1024)
        d.kill()
        d2 = Daemon(root, "re", 16 * MiB)  # same name, same backing file: start() cleans the dead leftovers
        try:
            assert d.loop_gone()
            st = load_state(d2.run_dir / "re" / "state.json")
            assert st is not None and st.pid == d2.proc.pid
            assert _pread_direct(d2.device, 0, 4096) == b"kept" * 1024
            assert d2.cmd("stop") == {"ok": True}
        finally:
            d2.close()
    finally:
        d.close()


def test_many_requests_in_flight_for_group_commit(daemon: Daemon) -> None:
    # libfuse 3.14 runs 10 workers and the kernel queues 12 background requests by default; the frontend
    # raises both (max_threads=32), so a tracker that blocks (group commit) sees more writes at once.
    daemon.cmd("hold")
    threads = [threading.Thread(target=_pwrite_direct, args=(daemon.device, i * CHUNK, b"q" * 4096))
               for i in range(24)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + BOUND
        seen = 0
        while time.monotonic() < deadline and seen < 20:
            seen = daemon.cmd("stats")["frontend"]["in_flight"]
            time.sleep(0.05)
        assert seen >= 20, f"only {seen} requests reached the tracker at once"
    finally:
        daemon.cmd("release")
        for t in threads:
            t.join(BOUND)
    assert len(daemon.cmd("dirty")["dirty"]) == 24


def test_live_daemon_in_another_pid_namespace_is_never_cleaned(root: Path) -> None:
    # Its pid means nothing here (a cluster node in namespaces): the lock file is what says it is alive.
    d = Daemon(root, "pn", 16 * MiB, unshare=("--pid", "--fork", "--kill-child"))
    try:
        st = load_state(d.run_dir / "pn" / "state.json")
        assert st is not None and st.pid_ns != os.readlink("/proc/self/ns/pid")
        with pytest.raises(DeviceBusy, match="served by live pid"):
            cleanup_stale("pn", d.run_dir, d.dev_dir)
        assert _pread_direct(d.device, 0, 4096) == bytes(4096)
        assert d.cmd("stop") == {"ok": True}
    finally:
        d.close()


def test_daemon_wedged_in_exit_by_its_own_namespace_is_unwedged(root: Path) -> None:
    # The daemon is the last process of a mount namespace in which ext4 on its own device is mounted: when it
    # is killed, tearing that namespace down unmounts the ext4, whose writeback only the dying daemon could
    # serve. cleanup_stale aborts the FUSE connection so the exit (and the clean-up) can finish.
    need_tool("mkfs.ext4", "nsenter")
    d = Daemon(root, "wx", 64 * MiB)
    try:
        r = subprocess.run(["mkfs.ext4", "-q", "-F", d.device], capture_output=True, text=True, timeout=120,
                           check=False)
        assert r.returncode == 0, r.stderr
        mnt = root / "mnt"
        mnt.mkdir()
        r = subprocess.run(["nsenter", "-t", str(d.proc.pid), "-m", "sh", "-ec",
                            f"mount {d.device} {mnt}; head -c 1000000 /dev/urandom > {mnt}/f"],
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        d.proc.send_signal(signal.SIGKILL)  # no wait: the exit may be wedged until cleanup_stale acts
        actions = cleanup_stale("wx", d.run_dir, d.dev_dir)
        assert any(a.startswith("detached") for a in actions) or d.loop_gone(), actions
        assert d.proc.wait(BOUND) == -signal.SIGKILL
        assert d.loop_gone()
    finally:
        d.close()
