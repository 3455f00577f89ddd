"""QEMU guests with device-mapper (dm-era, dm-snapshot), loop, FUSE and NBD, for tests this host's kernel can't run.

A :class:`VmCluster` is a set of guests (QEMU TCG, 1 vCPU, PVH boot of the Debian kernel built by
:mod:`vm.image`) that share one raw disk image, ``/dev/vda`` in every guest (``cache=none``, no image locking,
``share-rw=on``: what two nodes of a cluster see of one LUN). Each guest runs the host's own userland and this
checkout's virtual environment through a read-only 9p mount of the host's ``/`` (commands run chrooted into it),
so ``baton``, ``dmsetup``, ``era_invalidate``, ``losetup``, ``mkfs.*`` and ``fio`` are the host's. Usage::

    from vm.harness import VmCluster

    def test_something(tmp_path, vm_image):          # vm_image: tests/vm/conftest.py (skips with a reason)
        with VmCluster(tmp_path, disk_mib=256, guests=("A", "B")) as c:
            a, b = c.boot("A", "B")
            a.run("dmsetup create x --table '0 2048 linear /dev/vda 0'")
            status = a.baton("status", json=True)
            a.kill()                                   # power loss: SIGKILL of QEMU
            b.run("dd if=/dev/vda bs=4096 count=1 iflag=direct | od -An -tx1 | head -1")

Inside a guest (the chroot):

* ``/dev/vda`` the shared disk; ``/dev/vdb``... the ``extra_disks`` in the order given (also
  ``/dev/disk/by-id/virtio-NAME``); each guest's own scratch disk (ext4) is ``/var/tmp`` (spill files, COW
  stores, the chunk-index cache: the guest's tmpfs is RAM);
* ``/mnt/share`` the cluster's read-write share, :attr:`VmCluster.share` on the host (put repositories and files
  to exchange there; the host's /tmp is not visible in a guest, its own tmpfs is);
* environment: PATH starts with the checkout's ``.venv/bin``; ``BATON_NODE`` = the guest's name (also its
  hostname); ``BATON_RUN_DIR=/run/baton``, ``BATON_DEV_DIR=/dev/baton``, ``BATON_SPILL_DIR`` and
  ``BATON_CACHE_DIR`` under ``/var/tmp``; ``DM_DISABLE_UDEV=1`` (no udev: dmsetup makes /dev/mapper nodes);
  ``HOME=/var/tmp/home``; plus ``env=`` of the cluster and of each call.

Bounds and cleanup: every wait has a timeout and raises :class:`VmError` (or :class:`VmTimeout`) with the tail
of the guest's console; every QEMU process is killed by PID when the cluster closes, when its maximum lifetime
(``BATON_VM_MAX_SECONDS``, default 900) runs out, and by the kernel if this process dies (PR_SET_PDEATHSIG).
Logs stay under ``tmp_path/vm/``: ``A.console`` (the serial console, appended across reboots) and
``A.transcript`` (every command, its exit status, time and output). :meth:`VmCluster.report` gathers their
tails; tests/vm/conftest.py attaches it to a failing test's report.

Environment knobs: ``ACCEL=kvm`` (default TCG), ``BATON_VM_MEM`` (MiB per guest, default 512),
``BATON_VM_APPEND`` (more kernel command line, e.g. ``loglevel=7``), ``BATON_VM_KEEP=1`` (keep disk images),
``BATON_VM_BOOT_TIMEOUT`` (seconds, default 120), ``BATON_VM_CACHE`` (the image cache, see :mod:`vm.image`).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json as jsonlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm.image import Image, ensure_image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_BIN = (REPO / ".venv" / "bin") if (REPO / ".venv" / "bin" / "python").exists() else Path(sys.executable).parent
# What a guest must see at its host path besides the host root: the checkout, or the venv's directory when the venv
# lies outside it (a path without spaces: it goes on the kernel command line).
CHECKOUT = REPO if VENV_BIN.is_relative_to(REPO) else Path(os.path.commonpath([REPO, VENV_BIN]))
QEMU = "qemu-system-x86_64"
GUEST_SHARE = "/mnt/share"
GUEST_PATH = f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POLL = 0.02

# Guests created by this process that tests/vm/conftest.py reports on when a test fails.
LIVE: list[VmCluster] = []


class VmError(RuntimeError):
    """A guest did not boot, died, or a command in it failed; the message carries the console's tail."""


class VmTimeout(VmError):
    """A guest step ran past its timeout (the guest is left running; the cluster kills it on close)."""


class VmCommandError(VmError):
    """A command in a guest exited with an unexpected status."""

    def __init__(self, msg: str, result: Result) -> None:
        super().__init__(msg)
        self.result = result


@dataclass(frozen=True)
class Result:
    """What a guest command did: exit status, standard output and standard error (text)."""

    rc: int
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def json(self) -> Any:
        return jsonlib.loads(self.out)


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name)
    return float(v) if v else default


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return f"({path.name}: none)"
    return "\n".join(text.splitlines()[-lines:])


def _pdeathsig() -> None:
    # The kernel SIGKILLs QEMU when the thread that started it dies (a killed pytest leaves no guests behind).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_compiled = False


def _compile_sources() -> None:
    """Refresh the checkout's bytecode once per process: guests see the tree read-only and would otherwise
    recompile every module edited since the host last imported it, on every command."""
    global _compiled
    if not _compiled:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src")], capture_output=True,
                       timeout=300)
        _compiled = True


class Job:
    """A command submitted to a guest's agent; :meth:`wait` for its :class:`Result`."""

    def __init__(self, guest: Guest, seq: int, cmd: str, timeout: float, *, diagnose: bool = True) -> None:
        self.guest, self.seq, self.cmd, self.timeout = guest, seq, cmd, timeout
        self.diagnose = diagnose  # on timeout: dump the guest's tasks and kill the job (not for those helpers)
        self.base = guest.agent_dir / f"{seq:06d}"
        self.started = time.monotonic()
        self.generation = guest.generation
        self.result: Result | None = None

    @property
    def pid(self) -> int | None:
        """The job's shell PID inside the guest (its session and process group leader), once started."""
        try:
            return int((self.base.parent / f"{self.base.name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def done(self) -> bool:
        return self.result is not None or (self.base.parent / f"{self.base.name}.rc").exists()

    def _read(self, name: str) -> str:
        try:
            return (self.base.parent / f"{self.base.name}.{name}").read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float | None = None) -> Result:
        """Block until the job exits (bounded by ``timeout``, default the job's own) and return its result.
        Raises :class:`VmTimeout` (with a task dump on the console) or :class:`VmError` if the guest died."""
        if self.result is not None:
            return self.result
        limit = self.started + self.timeout if timeout is None else time.monotonic() + timeout
        rc_file = self.base.parent / f"{self.base.name}.rc"
        while not rc_file.exists():
            if self.generation != self.guest.generation or not self.guest.running:
                raise VmError(self.guest.describe_failure(f"guest {self.guest.name} went down while running "
                                                          f"job {self.seq}: {self.cmd}"))
            if time.monotonic() > limit:
                tasks = "(not collected)"
                if self.diagnose:
                    tasks = self.guest.dump_tasks()
                    with contextlib.suppress(VmError):
                        self.kill()
                raise VmTimeout(self.guest.describe_failure(
                    f"guest {self.guest.name}: job {self.seq} still running after "
                    f"{time.monotonic() - self.started:.0f} s (its process group is killed): {self.cmd}\n"
                    f"--- stdout so far\n{self._read('out')[-3000:]}\n--- stderr so far\n"
                    f"{self._read('err')[-3000:]}\n--- guest tasks (SysRq w, l; dmesg tail)\n{tasks}"))
            time.sleep(POLL)
        try:
            rc = int(rc_file.read_text())
        except ValueError:
            rc = -1
        self.result = Result(rc, self._read("out"), self._read("err"))
        self.guest._log(f"job {self.seq} exit {rc} after {time.monotonic() - self.started:.2f} s\n"
                        + _indent("out", self.result.out) + _indent("err", self.result.err))
        return self.result

    def kill(self, sig: str = "KILL") -> None:
        """Signal the job's process group in the guest (not processes that left it, e.g. daemons)."""
        pid = self.pid
        if pid is not None and not self.done() and self.guest.running:
            self.guest.run_bg(f"kill -{sig} -{pid} 2>/dev/null || true", timeout=30, _diagnose=False).wait()


def _indent(label: str, text: str, limit: int = 4000) -> str:
    if not text:
        return ""
    if len(text) > limit:
        text = f"[... {len(text) - limit} bytes]\n" + text[-limit:]
    return f"  {label}:\n" + "".join(f"    {line}\n" for line in text.splitlines())


class Guest:
    """One QEMU guest of a :class:`VmCluster`. Boot it, run commands in it, kill it (power loss) or shut it
    down; it can boot again afterwards (same disks, same scratch disk: a node that restarts)."""

    def __init__(self, cluster: VmCluster, name: str, index: int) -> None:
        self.cluster, self.name, self.index = cluster, name, index
        self.dir = cluster.dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.agent_dir = cluster.share / "agent" / name
        self.console = cluster.dir / f"{name}.console"
        self.transcript = cluster.dir / f"{name}.transcript"
        self.scratch = self.dir / "scratch.img"
        self.monitor_path = cluster.sockets / f"{name}.mon"
        self.proc: subprocess.Popen[bytes] | None = None
        self.generation = 0
        self.boot_seconds: float | None = None
        self._seq = itertools.count(1)
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def qemu_argv(self) -> list[str]:
        c = self.cluster
        accel = os.environ.get("ACCEL", "tcg")
        if accel == "kvm":
            accel_args = ["-accel", "kvm", "-cpu", "host"]
        else:
            accel_args = ["-accel", "tcg,thread=multi", "-cpu", "max"]
        append = (f"console=ttyS0 panic=-1 quiet loglevel=4 8250.nr_uarts=1 no_timer_check baton_vm.name={self.name} "
                  f"baton_vm.checkout={CHECKOUT} "
                  + os.environ.get("BATON_VM_APPEND", "")).strip()
        argv = [QEMU, "-name", self.name, "-machine", "pc", *accel_args, "-smp", "1", "-m", str(c.mem_mib),
                "-nodefaults", "-no-user-config", "-vga", "none", "-display", "none", "-no-reboot",
                "-chardev", f"file,id=con,path={self.console},append=on", "-serial", "chardev:con",
                "-monitor", f"unix:{self.monitor_path},server=on,wait=off",
                "-kernel", str(c.image.vmlinux), "-initrd", str(c.image.initramfs), "-append", append,
                "-device", "virtio-rng-pci"]
        for i, (serial, path) in enumerate(c.shared_disks):
            argv += ["-drive", f"file={path},format=raw,if=none,id=d{i},cache=none,aio=threads,file.locking=off",
                     "-device", f"virtio-blk-pci,drive=d{i},serial={serial},share-rw=on"]
        argv += ["-drive", f"file={self.scratch},format=raw,if=none,id=scratch,cache=unsafe",
                 "-device", "virtio-blk-pci,drive=scratch,serial=scratch",
                 "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
                 "-virtfs", f"local,path={c.share},mount_tag=share,security_model=none,multidevs=remap",
                 # The checkout again at its own path: under /tmp, /run or /mnt (a CI clone) the host root's copy is
                 # hidden by the guest's own /tmp, /run and /mnt, which the init binds over them.
                 "-virtfs", f"local,path={CHECKOUT},mount_tag=checkout,security_model=none,readonly=on,"
                 "multidevs=remap"]
        return argv

    def boot(self, *, timeout: float | None = None, wait: bool = True) -> Guest:
        """Start QEMU and (``wait``) block until the guest's agent is ready; :attr:`boot_seconds` is the time
        from the start of QEMU to ready. Raises :class:`VmError` if QEMU exits first or ``timeout`` passes."""
        if self.running:
            raise VmError(f"guest {self.name} is already running")
        if not self.scratch.exists():
            with open(self.scratch, "wb") as f:
                f.truncate(self.cluster.scratch_mib << 20)
            cp = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "scratch",
                                 "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(self.scratch)],
                                capture_output=True, text=True, timeout=120)
            if cp.returncode != 0:
                raise VmError(f"mkfs.ext4 of {self.scratch} failed: {cp.stderr.strip()}")
        shutil.rmtree(self.agent_dir, ignore_errors=True)
        self.agent_dir.mkdir(parents=True)
        self.generation += 1
        argv = self.qemu_argv()
        self._log(f"boot (generation {self.generation}): {shlex.join(argv)}")
        with open(self.dir / "qemu.stderr", "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         preexec_fn=_pdeathsig, start_new_session=True)
        self._started = time.monotonic()
        lifetime = self.cluster.max_seconds
        self._timer = threading.Timer(lifetime, self._expire, args=(self.proc, lifetime))
        self._timer.daemon = True
        self._timer.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        limit = time.monotonic() + (timeout or _env_float("BATON_VM_BOOT_TIMEOUT", 120))
        ready, failed = self.agent_dir / "ready", self.agent_dir / "failed"
        while not ready.exists():
            if failed.exists():
                raise VmError(self.describe_failure(f"guest {self.name} failed to start: "
                                                    f"{failed.read_text().strip()}"))
            if not self.running:
                raise VmError(self.describe_failure(f"QEMU of guest {self.name} exited during boot "
                                                    f"(status {self.proc.returncode if self.proc else None})"))
            if time.monotonic() > limit:
                raise VmTimeout(self.describe_failure(f"guest {self.name} not ready after "
                                                      f"{time.monotonic() - self._started:.0f} s"))
            time.sleep(POLL)
        self.boot_seconds = time.monotonic() - self._started
        self._log(f"ready after {self.boot_seconds:.2f} s (guest uptime {ready.read_text().strip()} s)")

    def _expire(self, proc: subprocess.Popen[bytes], lifetime: float) -> None:
        if proc.poll() is None:
            self._log(f"maximum lifetime {lifetime:.0f} s reached (BATON_VM_MAX_SECONDS): SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)

    def kill(self) -> None:
        """Power loss: SIGKILL the QEMU process (the guest's page cache and in-flight writes are lost)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            self._log("kill (SIGKILL of QEMU: power loss)")
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        self._reap(proc, 30)

    def shutdown(self, timeout: float = 60) -> None:
        """Clean power-off: the agent syncs, unmounts the scratch disk and powers off; SIGKILL after
        ``timeout``. Nothing is detached first: detach attachments before calling this if a test needs it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self._log("shutdown")
        (self.agent_dir / "poweroff").touch()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._log(f"no power-off after {timeout:.0f} s: SIGKILL")
            os.kill(proc.pid, signal.SIGKILL)
        self._reap(proc, 30)

    def _reap(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:  # QEMU in uninterruptible sleep on the host: report, don't hang
            self._log(f"QEMU pid {proc.pid} did not exit {timeout:.0f} s after SIGKILL")
        if self._timer is not None:
            self._timer.cancel()
        self.generation += 1  # jobs of the dead instance fail fast

    # -- commands --------------------------------------------------------------------------------------------

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        base = {"PATH": GUEST_PATH, "HOME": "/var/tmp/home", "LANG": "C.UTF-8", "DM_DISABLE_UDEV": "1",
                "BATON_NODE": self.name, "BATON_RUN_DIR": "/run/baton", "BATON_DEV_DIR": "/dev/baton",
                "BATON_SPILL_DIR": "/var/tmp/baton-spill", "BATON_CACHE_DIR": "/var/tmp/baton-cache",
                "BATON_VM": "1"}
        if "BATON_SEED" in os.environ:
            base["BATON_SEED"] = os.environ["BATON_SEED"]
        return base | dict(self.cluster.env) | dict(env or {})

    def run_bg(self, cmd: str | Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str = "/",
               input: str | bytes | None = None, timeout: float = 120, _diagnose: bool = True) -> Job:
        """Start ``cmd`` (a shell command line, or an argv list) in the guest and return its :class:`Job`
        without waiting. ``timeout`` only bounds a later :meth:`Job.wait`."""
        if not self.running:
            raise VmError(f"guest {self.name} is not running")
        if not isinstance(cmd, str):
            cmd = shlex.join(cmd)
        with self._lock:
            seq = next(self._seq)
        job = Job(self, seq, cmd, timeout, diagnose=_diagnose)
        name = job.base.name
        lines = [f"echo $$ > {shlex.quote(f'{GUEST_SHARE}/agent/{self.name}/{name}.pid')}"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.environment(env).items()]
        if input is not None:
            (self.agent_dir / f"{name}.in").write_bytes(input.encode() if isinstance(input, str) else input)
            lines.append(f"exec < {shlex.quote(f'{GUEST_SHARE}/agent/{self.name}/{name}.in')}")
        lines += [f"cd {shlex.quote(cwd)} || exit 126", cmd, ""]
        tmp = self.agent_dir / f"{name}.tmp"
        tmp.write_text("\n".join(lines))
        self._log(f"job {seq}: {cmd}")
        job.started = time.monotonic()
        tmp.rename(self.agent_dir / f"{name}.job")
        return job

    def run(self, cmd: str | Sequence[str], *, timeout: float = 120, check: bool = True,
            env: Mapping[str, str] | None = None, cwd: str = "/", input: str | bytes | None = None) -> Result:
        """Run ``cmd`` in the guest and wait (at most ``timeout`` s). ``check``: raise
        :class:`VmCommandError` on a non-zero exit status."""
        r = self.run_bg(cmd, env=env, cwd=cwd, input=input, timeout=timeout).wait()
        if check and r.rc != 0:
            shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
            raise VmCommandError(f"guest {self.name}: exit {r.rc}: {shown}\n--- stdout\n{r.out[-3000:]}\n"
                                 f"--- stderr\n{r.err[-3000:]}", r)
        return r

    def python(self, code: str, *args: str, timeout: float = 120, check: bool = True,
               env: Mapping[str, str] | None = None) -> Result:
        """Run Python ``code`` with the checkout's interpreter (``sys.argv[1:]`` = ``args``)."""
        return self.run([str(VENV_BIN / "python"), "-c", code, *args], timeout=timeout, check=check, env=env)

    def modprobe(self, *modules: str) -> None:
        """Load modules of the image that are not loaded at boot (xfs, dm-thin-pool...: tests/vm/image.py).
        The kernel also loads them by itself when needed (``mount -t xfs``)."""
        for m in modules:
            self.run(["chroot", "/mnt/guest", "modprobe", m], timeout=60)

    def baton(self, *args: str, json: bool = False, rc: int | None = 0, timeout: float = 300,
              env: Mapping[str, str] | None = None) -> Any:
        """The checkout's ``baton ARGS`` in the guest. ``json``: append ``--json`` and return the parsed
        output (errors print JSON too); otherwise the :class:`Result`. ``rc``: the expected exit status
        (None: any)."""
        argv = [str(VENV_BIN / "baton"), *args, *(["--json"] if json else [])]
        r = self.run(argv, timeout=timeout, check=False, env=env)
        if rc is not None and r.rc != rc:
            raise VmCommandError(f"guest {self.name}: baton {shlex.join(args)}: exit {r.rc}, expected {rc}\n"
                                 f"--- stdout\n{r.out[-3000:]}\n--- stderr\n{r.err[-3000:]}", r)
        if not json:
            return r
        try:
            return jsonlib.loads(r.out)
        except ValueError as e:
            raise VmCommandError(f"guest {self.name}: baton {shlex.join(args)} --json printed no JSON\n"
                                 f"--- stdout\n{r.out[-3000:]}\n--- stderr\n{r.err[-3000:]}", r) from e

    # -- diagnostics -----------------------------------------------------------------------------------------

    def monitor(self, command: str, timeout: float = 10) -> str:
        """One QEMU human-monitor command (``info registers``, ``sendkey alt-sysrq-w``...); its output."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.monitor_path))
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            s.sendall(command.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"(qemu) "):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return buf.decode(errors="replace").removesuffix("(qemu) ")

    def dump_tasks(self) -> str:
        """Blocked and running tasks (SysRq w and l) into the kernel log; returns the log's tail (also in the
        transcript). For a guest whose agent does not answer, SysRq w goes in through the QEMU monitor and
        lands on the console only at loglevel 7 (``BATON_VM_APPEND=loglevel=7``)."""
        if not self.running:
            return "(guest not running)"
        try:
            job = self.run_bg("echo w > /proc/sysrq-trigger; echo l > /proc/sysrq-trigger; dmesg | tail -n 300",
                              timeout=15, _diagnose=False)
            return job.wait().out[-20000:]
        except VmError:
            with contextlib.suppress(OSError):
                self.monitor("sendkey alt-sysrq-w")
            return "(the guest's agent did not answer; SysRq w sent through the QEMU monitor)"

    def describe_failure(self, what: str) -> str:
        return (f"{what}\n--- {self.console} (tail)\n{_tail(self.console)}\n--- {self.dir / 'qemu.stderr'}\n"
                f"{_tail(self.dir / 'qemu.stderr', 10)}")

    def _log(self, text: str) -> None:
        with open(self.transcript, "a") as f:
            f.write(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self.cluster.t0:7.2f}] {text}\n")


class VmCluster:
    """Guests sharing one raw disk image. Use as a context manager: closing kills every guest by PID.

    ``disk_mib``: size of the shared disk (``/dev/vda``, host path :attr:`disk`, sparse, zero-filled);
    ``extra_disks``: more shared disks, name -> MiB (``/dev/vdb``... in order; host paths in :attr:`disks`);
    ``scratch_mib``: each guest's own ext4 scratch disk (``/var/tmp`` in the guest; sparse on the host);
    ``env``: added to every command's environment; ``max_seconds``: each QEMU's lifetime bound (default
    ``BATON_VM_MAX_SECONDS`` or 900 s; a boot starts it anew)."""

    def __init__(self, tmp_path: Path, *, disk_mib: int = 256, guests: Iterable[str] = ("A", "B"),
                 extra_disks: Mapping[str, int] | None = None, mem_mib: int | None = None,
                 scratch_mib: int = 2048, env: Mapping[str, str] | None = None, image: Image | None = None,
                 max_seconds: float | None = None) -> None:
        self.t0 = time.monotonic()
        self.dir = Path(tmp_path) / "vm"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.share = self.dir / "share"
        self.share.mkdir(exist_ok=True)
        self.disk = self.dir / "disk.img"
        self.disks: dict[str, Path] = {"disk": self.disk}
        sizes = {"disk": disk_mib}
        for name, mib in (extra_disks or {}).items():
            if name in ("disk", "scratch") or not name.replace("-", "").isalnum():
                raise ValueError(f"extra disk name {name!r}: use letters, digits and '-', not disk or scratch")
            self.disks[name], sizes[name] = self.dir / f"{name}.img", mib
        self.shared_disks: list[tuple[str, Path]] = list(self.disks.items())
        for name, path in self.disks.items():
            if not path.exists():
                with open(path, "wb") as f:
                    f.truncate(sizes[name] << 20)
        self.mem_mib = mem_mib or int(_env_float("BATON_VM_MEM", 512))
        self.scratch_mib = scratch_mib
        self.max_seconds = max_seconds or _env_float("BATON_VM_MAX_SECONDS", 900)
        self.env = dict(env or {})
        self.image = image or ensure_image()
        self.sockets = Path(tempfile.mkdtemp(prefix="bvm-"))  # short: unix socket paths are limited to 107 bytes
        self.guests: dict[str, Guest] = {}
        for i, name in enumerate(guests):
            if not name.replace("-", "").isalnum():
                raise ValueError(f"guest name {name!r}: use letters, digits and '-'")
            self.guests[name] = Guest(self, name, i)
        self.closed = False
        _compile_sources()
        LIVE.append(self)

    def __enter__(self) -> VmCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Guest:
        return self.guests[name]

    def boot(self, *names: str, timeout: float | None = None) -> list[Guest]:
        """Boot the named guests (default: all) at the same time; wait until each is ready."""
        todo = [self.guests[n] for n in (names or self.guests)]
        for g in todo:
            g.boot(wait=False)
        for g in todo:
            g.wait_ready(timeout)
        return todo

    def guest_path(self, host_path: Path | str) -> str:
        """Where a path under :attr:`share` is inside a guest."""
        rel = Path(host_path).resolve().relative_to(self.share.resolve())
        return f"{GUEST_SHARE}/{rel}" if str(rel) != "." else GUEST_SHARE

    def report(self, lines: int = 60) -> str:
        """The tails of every guest's console and transcript (what a failing test prints)."""
        out = []
        for g in self.guests.values():
            out.append(f"===== guest {g.name}: {g.console}\n{_tail(g.console, lines)}")
            out.append(f"===== guest {g.name}: {g.transcript}\n{_tail(g.transcript, lines)}")
        return "\n".join(out)

    def close(self) -> None:
        """Kill every guest (by PID), then delete the disk images unless BATON_VM_KEEP=1. Logs stay."""
        self.closed = True
        try:
            for g in self.guests.values():
                g.kill()
        finally:
            shutil.rmtree(self.sockets, ignore_errors=True)
            if os.environ.get("BATON_VM_KEEP") != "1":
                for p in [*self.disks.values(), *(g.scratch for g in self.guests.values())]:
                    with contextlib.suppress(OSError):
                        p.unlink()
