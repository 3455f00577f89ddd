"""fio jobs for the tracking benchmark, run one at a time with JSON output.

Targets are either a block device (``libaio``, ``direct=1``) or an NBD unix socket (fio's ``nbd`` engine,
which speaks the protocol itself through libnbd). Every job is pinned to a region with ``offset``/``size`` so
first-touch and steady-state runs know which chunks they hit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.common import JSON, StepFailed, run


@dataclass(frozen=True)
class Target:
    """Where fio sends I/O: ``device`` (a block device path) or ``socket`` (an NBD unix socket)."""

    device: str | None = None
    socket: str | None = None

    def args(self) -> list[str]:
        if self.socket:
            return ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={self.socket}"]
        if self.device:
            return ["--ioengine=libaio", f"--filename={self.device}", "--direct=1"]
        raise ValueError("fio target needs a device or a socket")


@dataclass(frozen=True)
class Job:
    """One fio workload. ``runtime_s`` 0 means "run through the region once" (first-touch)."""

    name: str
    rw: str
    bs: str
    iodepth: int
    runtime_s: float = 0.0


RANDWRITE = Job("randwrite-4k-qd16", "randwrite", "4k", 16)
RANDREAD = Job("randread-4k-qd16", "randread", "4k", 16)
SEQWRITE = Job("seqwrite-1m-qd4", "write", "1m", 4)


def first_touch_job(chunk_size: int) -> Job:
    """4 KiB writes at QD16, each in a chunk nothing has written yet: fio's ``write:SKIP`` strides by one
    chunk after every 4 KiB write, so the region's chunks are touched exactly once, in order."""
    return Job("first-touch-4k-qd16", f"write:{chunk_size - 4096}", "4k", 16)


def command(job: Job, target: Target, *, offset: int, size: int, out: str, seed: int = 42,
            runtime_s: float | None = None) -> list[str]:
    """The fio argv of ``job`` over ``[offset, offset+size)``, writing its JSON report to ``out``."""
    rt = job.runtime_s if runtime_s is None else runtime_s
    cmd = [
        "fio", f"--name={job.name}", *target.args(), f"--rw={job.rw}", f"--bs={job.bs}",
        f"--iodepth={job.iodepth}", f"--offset={offset}", f"--size={size}", "--numjobs=1",
        f"--randseed={seed}", "--norandommap", "--group_reporting", "--output-format=json",
        f"--output={out}",
    ]
    if rt > 0:
        cmd += ["--time_based", f"--runtime={int(rt * 1000)}ms"]  # fio truncates fractional seconds to 0
        if rt >= 3:
            cmd.append("--ramp_time=1s")  # skip the queue fill-up; pointless for sub-3 s smoke runs
    return cmd


def parse(job: Job, text: str, stderr: str = "") -> JSON:
    """IOPS, bandwidth and latencies from fio's JSON report ``text``; StepFailed for no JSON or a job error."""
    try:
        # fio appends its own warnings to the output file; the JSON document is the outermost braces.
        data = json.loads(text[text.index("{"): text.rindex("}") + 1])
    except ValueError as e:
        raise StepFailed(f"fio gave no JSON ({e}): {stderr[-400:]}") from e
    j = data["jobs"][0]
    if j.get("error"):
        raise StepFailed(f"fio job error {j['error']}: {stderr[-400:]}")
    side = j["read"] if "read" in job.rw else j["write"]
    lat = side.get("clat_ns", {})
    pct = lat.get("percentile", {})
    return {
        "iops": round(float(side["iops"]), 1),
        "bytes_per_s": int(side["bw_bytes"]),
        "ios": int(side["total_ios"]),
        "lat_mean_us": round(float(lat.get("mean", 0.0)) / 1000, 1),
        "lat_p99_us": round(float(pct.get("99.000000", 0.0)) / 1000, 1),
        "runtime_s": round(float(side.get("runtime", 0)) / 1000, 3),
    }


def run_job(job: Job, target: Target, *, offset: int, size: int, scratch: Path, seed: int = 42,
            runtime_s: float | None = None) -> JSON:
    """Run ``job`` over ``[offset, offset+size)``; returns IOPS, bandwidth, latencies and the command.
    Raises StepFailed when fio fails or reports a job error."""
    out = scratch / f"fio-{job.name}.json"
    rt = job.runtime_s if runtime_s is None else runtime_s
    cmd = command(job, target, offset=offset, size=size, out=str(out), seed=seed, runtime_s=runtime_s)
    m = run(cmd, timeout=max(120.0, rt * 4 + 60))
    if not m.ok:
        raise StepFailed(m.error())
    try:
        text = out.read_text()
    except OSError as e:
        raise StepFailed(f"fio gave no JSON ({e}): {m.stderr[-400:]}") from e
    finally:
        out.unlink(missing_ok=True)
    return {**parse(job, text, m.stderr), "command": m.command}
