"""Shared kit for the benchmarks: measured processes, statistics, cold cache, loop devices, machine facts.

Measurement model (the same for Baton and its peers, so ratios compare like with like):

- *wall time*: ``time.perf_counter`` around the whole command, interpreter start included;
- *bytes read*: the kernel's block-layer read accounting of the process and every child it reaped
  (``ru_inblock`` from ``wait4``, which Linux derives from the same counter as ``/proc/PID/io``
  ``read_bytes``), so page-cache hits do not count and ``O_DIRECT`` reads do;
- *peak RSS*: ``ru_maxrss`` from ``wait4`` (the largest resident set of the process or a reaped child).

A daemon that does work on behalf of a command (Baton's per-disk daemon) is sampled separately through
``/proc/PID/io`` before and after, see :func:`proc_io`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.util import pid_alive as util_pid_alive

JSON = dict[str, Any]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_SUFFIX = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}


def parse_size(text: str) -> int:
    """``"4G"`` -> 4 GiB. Binary suffixes K/M/G/T (optionally followed by ``iB``); raises ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 4G, 1T)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])


def fmt_size(n: float) -> str:
    """Human binary size: 4294967296 -> ``"4 GiB"``."""
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= factor:
            v = n / factor
            return f"{v:.0f} {unit}" if v == int(v) or v >= 100 else f"{v:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Measured:
    """One finished (or timed-out) command with its resource use."""

    cmd: tuple[str, ...]
    rc: int
    wall_s: float
    read_bytes: int  # block-layer bytes read by the process and reaped children
    write_bytes: int  # block-layer bytes written (ru_oublock * 512)
    peak_rss_bytes: int  # ru_maxrss: also counts the benchmark's own RSS at fork time (see hwm_bytes)
    cpu_s: float  # user + system
    stdout: str
    stderr: str
    timed_out: bool
    hwm_bytes: int | None = None  # VmHWM of the command's own process, sampled every 20 ms until it exits

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    @property
    def command(self) -> str:
        return shlex.join(self.cmd)

    def error(self) -> str:
        """A one-paragraph reason for a failure: exit status plus the tail of stderr."""
        what = "timed out" if self.timed_out else f"exit {self.rc}"
        text = self.stderr.strip() or self.stdout.strip()
        # The last line says what went wrong (a traceback's exception, a tool's final complaint).
        last = text.splitlines()[-1] if text else ""
        return f"`{self.command}` {what}: {last}\n{text[-800:]}"

    def to_json(self) -> JSON:
        return {
            "command": self.command,
            "rc": self.rc,
            "wall_s": round(self.wall_s, 4),
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "hwm_bytes": self.hwm_bytes,
            "cpu_s": round(self.cpu_s, 3),
        }


class StepFailed(Exception):
    """A benchmark step failed; the message is what the result row records as its ``error``."""


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 900.0,
) -> Measured:
    """Run ``cmd`` to completion and measure it. Never raises for a non-zero exit (see ``Measured.ok``).

    Output goes to temporary files, not pipes, so a command that leaves a daemon behind holding its stdout
    (``baton attach``) returns as soon as the command itself exits. On timeout the command's own process
    group (it is started in a new session) gets SIGKILL; nothing else is touched.
    Raises FileNotFoundError when the executable does not exist.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env, cwd=cwd,
            start_new_session=True,
        )
        fired = threading.Event()

        def _kill() -> None:
            fired.set()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, _kill)
        timer.start()
        # ru_maxrss of a child counts the address space it was forked from (this process) before its exec, so
        # a small command run by a large benchmark reports the benchmark's size. VmHWM is the peak of the
        # exec'd program alone; sampled until the process is gone (its last sample is within 20 ms of the end).
        hwm: list[int] = []
        done = threading.Event()

        def _sample() -> None:
            while not done.wait(0.02):
                v = proc_rss(proc.pid, "VmHWM")
                if v:
                    hwm.append(v)

        sampler = threading.Thread(target=_sample, daemon=True)
        sampler.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:
            # Interrupted (SIGTERM/SIGINT): stop the command we started, then let the caller clean up.
            _kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
            raise
        finally:
            timer.cancel()
            done.set()
            sampler.join()
        wall = time.perf_counter() - t0
        # Popen must not try to reap the pid again.
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(
            cmd=tuple(cmd), rc=proc.returncode, wall_s=wall,
            read_bytes=ru.ru_inblock * 512, write_bytes=ru.ru_oublock * 512,
            peak_rss_bytes=ru.ru_maxrss * 1024, cpu_s=ru.ru_utime + ru.ru_stime,
            stdout=out.read().decode(errors="replace"), stderr=err.read().decode(errors="replace"),
            timed_out=fired.is_set(), hwm_bytes=max(hwm) if hwm else None,
        )


def check(cmd: Sequence[str], **kw: Any) -> Measured:
    """:func:`run`, raising :class:`StepFailed` with the command and its stderr when it does not succeed."""
    try:
        m = run(cmd, **kw)
    except FileNotFoundError as e:
        raise StepFailed(f"`{shlex.join(cmd)}`: {e.strerror}: {e.filename}") from e
    if not m.ok:
        raise StepFailed(m.error())
    return m


def last_json(text: str) -> JSON:
    """The last JSON object in a command's stdout (whole text first, then line by line from the end)."""
    text = text.strip()
    with contextlib.suppress(ValueError):
        v = json.loads(text)
        if isinstance(v, dict):
            return v
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                v = json.loads(line)
                if isinstance(v, dict):
                    return v
    raise StepFailed(f"no JSON object in output: {text[-300:]!r}")


def proc_io(pid: int) -> JSON:
    """``/proc/PID/io`` as a dict of ints; empty when the process is gone or not readable."""
    try:
        text = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return {}
    return {k.strip(): int(v) for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def proc_rss(pid: int, field: str = "VmRSS") -> int | None:
    """Resident set size of a live process in bytes (``VmRSS``; ``VmHWM`` for its peak so far), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


pid_alive = util_pid_alive  # one definition, in baton.util


def kill_and_wait(pid: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> bool:
    """Send ``sig`` to one process we started and wait until it is gone; True when it is."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


# --- statistics ---------------------------------------------------------------------------------------


def stat(samples: Sequence[float]) -> JSON:
    """Median and spread of repeated measurements. ``spread_pct`` = (max - min) / median * 100."""
    xs = [float(x) for x in samples]
    if not xs:
        return {"n": 0}
    med = statistics.median(xs)
    return {
        "median": round(med, 6),
        "min": round(min(xs), 6),
        "max": round(max(xs), 6),
        "spread_pct": round((max(xs) - min(xs)) / med * 100, 1) if med else 0.0,
        "n": len(xs),
        "samples": [round(x, 6) for x in xs],
    }


def median_of(row: JSON, key: str) -> float | None:
    """``row[key]["median"]`` when the row is available and has that statistic."""
    if not row.get("available", True):
        return None
    v = row.get(key)
    if isinstance(v, dict) and isinstance(v.get("median"), int | float):
        return float(v["median"])
    if isinstance(v, int | float):
        return float(v)
    return None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 3)


def unavailable(error: str, **extra: Any) -> JSON:
    """The row recorded when a step cannot run."""
    return {"available": False, "error": error[-1200:], **extra}


# --- caches, loop devices -----------------------------------------------------------------------------


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: str | Path) -> None:
    """Flush the one file system holding ``path`` (``syncfs(2)``). Unlike ``sync()``, this cannot hang on
    somebody else's stuck FUSE mount elsewhere on a shared machine. Raises OSError on failure."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(path))
    finally:
        os.close(fd)


class ColdCache:
    """Drops the page cache before a timed run: ``sync; echo 3 > /proc/sys/vm/drop_caches`` plus
    ``posix_fadvise(DONTNEED)`` on the named data files. Failures are counted, not raised, and reported.

    ``warm`` commands (e.g. ``restic version``, ``baton backup --help`` plus an import of Baton's engines:
    ``bench.batonctl.WARM_IMPORTS``) run after the drop, untimed, so the
    timed run does not count loading the tool's own program files as data read: the *data* is cold, the
    tool is as warm as on a server that runs it every day. The data files are dropped again afterwards.
    """

    def __init__(self, light: bool = False) -> None:
        # light: only fadvise the data files (smoke runs, where speed is not the point but run time is).
        self.light = light
        self.drops = 0
        self.warmups = 0
        self.failures: list[str] = []

    @staticmethod
    def _fadvise(paths: Sequence[str | Path]) -> None:
        for p in paths:
            with contextlib.suppress(OSError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def __call__(self, *paths: str | Path, warm: Sequence[Sequence[str]] = (),
                 env: dict[str, str] | None = None) -> None:
        if self.light:
            self._fadvise(paths)
            return
        for p in paths:
            with contextlib.suppress(OSError):
                syncfs(p)
        self._fadvise(paths)
        # In a child with a timeout: drop_caches walks every superblock and can block behind a hung mount
        # that is not ours; then the run records the failure and goes on instead of hanging with it.
        m = run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], timeout=60)
        if m.ok:
            self.drops += 1
        else:
            self.failures.append(m.error())
        for cmd in warm:
            with contextlib.suppress(OSError):
                run(cmd, env=env, timeout=120)
                self.warmups += 1
        if warm:
            self._fadvise(paths)

    def statistics(self) -> JSON:
        return {"light": self.light, "drops": self.drops, "warmups": self.warmups, "failures": len(self.failures),
                "last_failure": self.failures[-1:]}


WARM = {
    "restic": [["restic", "version"]],
    "borg": [["borg", "create", "--help"]],
}


@contextlib.contextmanager
def loop_device(path: str | Path, *, direct_io: bool = True) -> Iterator[str]:
    """A loop device over ``path`` (``losetup --find --show``); detached (only this one) on exit."""
    cmd = ["losetup", "--find", "--show"] + (["--direct-io=on"] if direct_io else []) + [str(path)]
    dev = check(cmd, timeout=60).stdout.strip()
    try:
        yield dev
    finally:
        run(["losetup", "-d", dev], timeout=60)


def loops_backed_under(prefix: str | Path) -> list[str]:
    """Loop devices whose backing file lies under ``prefix`` (our scratch directory), for cleanup."""
    m = run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], timeout=30)
    if not m.ok or not m.stdout.strip():
        return []
    pre = str(prefix)
    out: list[str] = []
    for d in json.loads(m.stdout).get("loopdevices", []):
        back = str(d.get("back-file") or "")
        if back.startswith(pre):
            out.append(str(d["name"]))
    return out


def mounts_under(prefix: str | Path) -> list[str]:
    """Mount points under ``prefix``, deepest first, for cleanup."""
    pre = str(prefix)
    pts: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 1 and parts[1].startswith(pre):
                pts.append(parts[1])
    return sorted(pts, key=len, reverse=True)


def tree_bytes(path: str | Path) -> int:
    """Sum of the apparent sizes of the regular files under ``path`` (a repository's size)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


# --- machine and tools --------------------------------------------------------------------------------


def machine(scratch: Path) -> JSON:
    """Cores, memory, kernel, CPU model and the scratch file system, recorded with every result."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    fs = run(["findmnt", "-n", "-T", str(scratch), "-o", "FSTYPE,SOURCE"], timeout=10).stdout.split()
    return {
        "cores": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "scratch_fs": fs[0] if fs else "",
        "scratch_device": fs[1] if len(fs) > 1 else "",
        "loadavg_at_start": list(os.getloadavg()),
    }


def tool_versions(baton_exe: str) -> JSON:
    """The first line of each tool's version output; ``None`` for a tool that is not installed."""
    probes = {
        "baton": [baton_exe, "--version"],
        "restic": ["restic", "version"],
        "borg": ["borg", "--version"],
        "fio": ["fio", "--version"],
        "losetup": ["losetup", "--version"],
    }
    out: JSON = {}
    for name, cmd in probes.items():
        try:
            m = run(cmd, timeout=30)
            out[name] = (m.stdout.strip() or m.stderr.strip()).splitlines()[0] if m.ok else None
        except (FileNotFoundError, IndexError):
            out[name] = None
    return out


def disk_sectors_read(device: str) -> int | None:
    """Sectors read so far by a whole block device (``/sys/block/DEV/stat``), e.g. the scratch disk.
    System-wide, so other users' reads count too; reported next to the per-process figure, not instead."""
    name = os.path.basename(os.path.realpath(device)) if device else ""
    try:
        return int(Path(f"/sys/class/block/{name}/stat").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return None


class Series:
    """The samples of one contender in one benchmark cell (e.g. restic at 1 % change).

    ``add`` records one repetition's metrics plus its details (the exact command); ``fail`` records an error
    and the cell carries on. ``result`` gives ``{"available": True, metric: stat(...), "runs": [...]}``, or an
    unavailable row when no repetition succeeded.
    """

    def __init__(self) -> None:
        self.samples: list[JSON] = []
        self.runs: list[JSON] = []
        self.errors: list[str] = []

    def add(self, metrics: dict[str, float | int | None], detail: JSON) -> None:
        self.samples.append({k: v for k, v in metrics.items() if v is not None})
        self.runs.append({**detail, **{k: v for k, v in metrics.items() if v is not None}})

    def fail(self, error: str) -> None:
        self.errors.append(error)

    def result(self) -> JSON:
        if not self.samples:
            return unavailable(self.errors[-1] if self.errors else "not run")
        keys: list[str] = []
        for s in self.samples:
            keys += [k for k in s if k not in keys]
        out: JSON = {"available": True}
        for k in keys:
            out[k] = stat([s[k] for s in self.samples if k in s])
        out["runs"] = self.runs
        if self.errors:
            out["errors"] = self.errors
        return out
