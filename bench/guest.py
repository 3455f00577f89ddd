"""Benchmark 6: the dm-era frontend in a QEMU TCG guest, as ratios measured in that one guest (issue 11).

This host's kernel may have no device-mapper, so the section boots one guest of the VM test tier
(tests/vm/harness.py, imported from there: one harness) and runs fio (``--ioengine=libaio --direct=1``) in it,
on one shared virtio disk (``/dev/vda``, ``cache=none``, written through on the host before the boot so no run
pays for the host file system's block allocation). Configurations:

- ``linear``: dm-linear over the data slice (the data area Baton's ``init`` leaves on the disk);
- ``era``: a bare ``dmsetup`` era stack with Baton's geometry: a dm-linear metadata slice near the disk's tail
  (the same size as Baton's era region, just before Baton's record area), a dm-linear origin over the data
  slice, ``era`` with 64 KiB blocks (the record's chunk size), a top dm-linear; fresh metadata every time;
- ``baton``: ``baton attach DISK --frontend dm``, fio on ``/dev/baton/NAME``;
- ``baton-backup``: the same during ``baton backup``: fio runs as the backup's ``--post`` hook, which Baton
  runs right after the freeze point, while its snapshot is active (top = ``snapshot-origin``, a transient
  ``snapshot`` whose exception store is a sparse file on a loop device in the spill directory) and before the
  backup reads anything: the figures are the copy-before-write cost of a backup window, without the backup's
  own reads and CPU (measured separately: its duration is recorded);
- ``era-snapshot``: the bare stack with the same snapshot built by hand (what ``baton-backup`` is held to);
- ``baton-daemon-stopped``: ``baton`` with its daemon stopped (SIGSTOP, then SIGCONT) while fio runs: the
  kernel stack serves without it, so this separates the daemon's own CPU use (a 1-vCPU guest) from the stack;
- trade-offs Baton controls, on the bare stack: ``era-256k`` (era blocks of 256 KiB), ``era-meta-disk`` (the
  era metadata on another virtio disk: Baton's ``external`` record placement), ``era-snapshot-cow16k`` and
  ``era-snapshot-cow256k`` (the exception store's chunk), ``era-snapshot-cow-disk`` (the exception store on a
  raw disk slice instead of a loop device over a sparse file).

Workloads, per configuration and round, in this order on the same region: first touch (one 4 KiB write at QD16
in each 64 KiB chunk of the region: every write lands in an era block not yet marked in the current era, and
under a snapshot in a chunk not yet copied), steady state (4 KiB random writes at QD16 over the same region,
whose blocks are all marked by then) and 1 MiB sequential writes at QD4. Every round runs every configuration,
in an order rotated by one each round, because a TCG guest moves the same job by up to 20 % from run to run.
Only ratios count; the ``paired`` ratios divide figures of the same round.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import JSON, KiB, MiB, Series, StepFailed, median_of, ratio, stat, unavailable
from bench.context import Context
from bench.fio import RANDWRITE, SEQWRITE, Job, Target, command, first_touch_job, parse

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64 * KiB
SECTOR = 512
NAME = "bb"  # the attachment: /dev/baton/bb
REPO = "/var/tmp/repo"  # the guest's own scratch disk
FIRST = first_touch_job(CHUNK)
JOBS: tuple[Job, ...] = (FIRST, RANDWRITE, SEQWRITE)
COLUMNS = {FIRST.name: "4K first touch QD16", RANDWRITE.name: "4K random write QD16 (steady)",
           SEQWRITE.name: "1M sequential write QD4"}


@dataclass(frozen=True)
class Config:
    name: str
    kind: str  # linear | era | baton | baton-backup
    what: str
    era_block: int = CHUNK
    meta_disk: bool = False
    snapshot: bool = False
    cow_chunk: int = CHUNK
    cow_disk: bool = False
    stop_daemon: bool = False  # SIGSTOP Baton's daemon while fio runs (the kernel stack serves without it)
    base: str = ""  # the configuration this one is a variant of (its trade-off ratio)


MAIN = (
    Config("linear", "linear", "dm-linear over the data slice"),
    Config("era", "era", "bare dmsetup era stack, Baton's geometry (64 KiB blocks, metadata at the tail)"),
    Config("baton", "baton", "`baton attach --frontend dm`, /dev/baton/NAME", base="era"),
    Config("baton-backup", "baton-backup", "the same during `baton backup` (its snapshot active)",
           base="era-snapshot"),
    Config("era-snapshot", "era", "bare era stack + snapshot-origin/snapshot as Baton builds them",
           snapshot=True, base="era"),
    Config("baton-daemon-stopped", "baton", "`baton attach --frontend dm` with its daemon stopped (SIGSTOP) "
           "while fio runs: what the daemon's own CPU use costs", stop_daemon=True, base="era"),
)
TRADEOFFS = (
    Config("era-256k", "era", "bare era stack, 256 KiB era blocks", era_block=256 * KiB, base="era"),
    Config("era-meta-disk", "era", "bare era stack, metadata on another virtio disk", meta_disk=True,
           base="era"),
    Config("era-snapshot-cow16k", "era", "bare snapshot, 16 KiB exception-store chunks", snapshot=True,
           cow_chunk=16 * KiB, base="era-snapshot"),
    Config("era-snapshot-cow256k", "era", "bare snapshot, 256 KiB exception-store chunks", snapshot=True,
           cow_chunk=256 * KiB, base="era-snapshot"),
    Config("era-snapshot-cow-disk", "era", "bare snapshot, exception store on a raw disk slice", snapshot=True,
           cow_disk=True, base="era-snapshot"),
)


class Guest:
    """The one guest, through the harness: shell commands that raise StepFailed instead of harness errors."""

    def __init__(self, harness: Any, cluster: Any, g: Any, ctx: Context) -> None:
        self.h, self.c, self.g, self.ctx = harness, cluster, g, ctx
        self.share = Path(cluster.share) / "gb"
        self.share.mkdir(parents=True, exist_ok=True)
        self.gshare = cluster.guest_path(self.share)

    def sh(self, cmd: str, timeout: float = 300, check: bool = True) -> str:
        try:
            r = self.g.run(cmd, timeout=timeout, check=check)
        except self.h.VmError as e:
            raise StepFailed(str(e)[:3000]) from e
        return str(r.out)

    def baton(self, *args: str, timeout: float = 600, rc: int | None = 0) -> JSON:
        try:
            out: JSON = self.g.baton(*args, json=True, rc=rc, timeout=timeout)
        except self.h.VmError as e:
            raise StepFailed(str(e)[:3000]) from e
        return out

    @property
    def alive(self) -> bool:
        return bool(self.g.running)


@dataclass
class Geometry:
    data_sectors: int
    meta_sectors: int
    baton_meta_offset: int  # sectors, on the data disk
    bare_meta_offset: int  # sectors, on the data disk: just below the data area's end
    region: int  # bytes fio touches, from offset 0
    cow: int  # exception store bytes (Baton's --cow-size and the bare stacks')


def _fio_script(g: Guest, cfg: Config, rnd: int, dev: str, geo: Geometry, runtime: float, seed: int
                ) -> tuple[str, dict[str, tuple[Path, str]]]:
    """A shell script running the three jobs on ``dev`` (reports into the share) with the stack's dm state
    before and after; returns its guest path and, per job, the host path of its report and its command."""
    outs: dict[str, tuple[Path, str]] = {}
    lines = ["#!/bin/sh", f"dmsetup table > {g.gshare}/{cfg.name}-r{rnd}.before 2>&1",
             f"dmsetup status >> {g.gshare}/{cfg.name}-r{rnd}.before 2>&1"]
    for job in JOBS:
        host = g.share / f"{cfg.name}-r{rnd}-{job.name}.json"
        host.unlink(missing_ok=True)
        gpath = f"{g.gshare}/{host.name}"
        rt = 0.0 if job is FIRST else runtime
        cmd = command(job, Target(device=dev), offset=0, size=geo.region, out=gpath, seed=seed, runtime_s=rt)
        outs[job.name] = (host, shlex.join(cmd))
        cpu = f"{gpath}.cpu"  # what else ran meanwhile: /proc/stat and every process's CPU ticks, before and after
        lines += [f"(head -1 /proc/stat; cat /proc/[0-9]*/stat) > {cpu}0 2>/dev/null",
                  f"{shlex.join(cmd)} > {gpath}.log 2>&1 || echo \"fio exit $?\" >> {gpath}.log",
                  f"(head -1 /proc/stat; cat /proc/[0-9]*/stat) > {cpu}1 2>/dev/null"]
    lines += [f"dmsetup table > {g.gshare}/{cfg.name}-r{rnd}.after 2>&1",
              f"dmsetup status >> {g.gshare}/{cfg.name}-r{rnd}.after 2>&1", "exit 0", ""]
    script = g.share / f"{cfg.name}-r{rnd}.sh"
    script.write_text("\n".join(lines))
    return f"{g.gshare}/{script.name}", outs


def _ticks(text: str) -> tuple[list[int], dict[str, tuple[str, int]]]:
    """(the cpu line of /proc/stat, {pid: (comm, utime + stime)}) from a snapshot the fio script took."""
    lines = text.splitlines()
    total = [int(x) for x in lines[0].split()[1:]] if lines and lines[0].startswith("cpu ") else []
    procs: dict[str, tuple[str, int]] = {}
    for ln in lines[1:]:
        with contextlib.suppress(ValueError, IndexError):
            pid, rest = ln.split(" (", 1)
            comm, tail = rest.rsplit(") ", 1)
            f = tail.split()
            procs[pid] = (comm, int(f[11]) + int(f[12]))
    return total, procs


def _cpu(prefix: Path) -> JSON:
    """The guest's CPU while one fio job ran: busy share, and the processes other than fio that used it."""
    try:
        t0, p0 = _ticks(Path(f"{prefix}.cpu0").read_text())
        t1, p1 = _ticks(Path(f"{prefix}.cpu1").read_text())
    except OSError:
        return {}
    if len(t0) < 4 or len(t1) < 4:
        return {}
    d = [b - a for a, b in zip(t0, t1, strict=False)]
    idle = d[3] + (d[4] if len(d) > 4 else 0)
    used = sorted(((v - p0.get(pid, ("", 0))[1], comm) for pid, (comm, v) in p1.items() if comm != "fio"),
                  reverse=True)
    return {"busy_pct": round(100 * (sum(d) - idle) / sum(d), 1) if sum(d) else None,
            "others_s": [[comm, round(t / 100, 2)] for t, comm in used[:4] if t > 0]}


def _collect(outs: dict[str, tuple[Path, str]], series: dict[str, Series], detail: JSON) -> None:
    for job in JOBS:
        p, cmd = outs[job.name]
        try:
            text = p.read_text()
        except OSError:
            log = Path(f"{p}.log")
            series[job.name].fail(f"no fio report: {log.read_text()[-600:] if log.exists() else '(no log)'}")
            continue
        try:
            r = parse(job, text, Path(f"{p}.log").read_text() if Path(f"{p}.log").exists() else "")
        except StepFailed as e:
            series[job.name].fail(str(e))
            continue
        series[job.name].add({"iops": r["iops"], "bytes_per_s": r["bytes_per_s"], "lat_p99_us": r["lat_p99_us"]},
                             {**r, **detail, "cpu": _cpu(p), "command": cmd})


def _bare_up(cfg: Config, geo: Geometry) -> str:
    """The bare stack's build script (Baton's order: meta, origin, era, top linear; for a snapshot the top's
    snapshot-origin table is loaded, the top suspended, the snapshot created, the top resumed)."""
    ds = geo.data_sectors
    if cfg.kind == "linear":
        return f"dmsetup create gb-lin --table '0 {ds} linear /dev/vda 0'"
    mdev, moff = ("/dev/vdb", 0) if cfg.meta_disk else ("/dev/vda", geo.bare_meta_offset)
    lines = [
        "set -e",
        f"dmsetup create gb-meta --table '0 {geo.meta_sectors} linear {mdev} {moff}'",
        "dd if=/dev/zero of=/dev/mapper/gb-meta bs=64k count=1 oflag=direct status=none",  # fresh metadata
        f"dmsetup create gb-origin --table '0 {ds} linear /dev/vda 0'",
        f"dmsetup create gb-era --table '0 {ds} era /dev/mapper/gb-meta /dev/mapper/gb-origin "
        f"{cfg.era_block // SECTOR}'",
        f"dmsetup create gb-top --table '0 {ds} linear /dev/mapper/gb-era 0'",
    ]
    if cfg.snapshot:
        if cfg.cow_disk:  # after the metadata slot of the second disk
            lines.append(f"dmsetup create gb-cowdev --table '0 {geo.cow // SECTOR} linear /dev/vdb 32768'")
            cow = "/dev/mapper/gb-cowdev"
        else:  # as Baton: a sparse file in the spill directory on a (buffered) loop device, unlinked at once
            lines += ["mkdir -p /var/tmp/baton-spill", f"truncate -s {geo.cow} /var/tmp/baton-spill/gb-cow",
                      "losetup --find --show /var/tmp/baton-spill/gb-cow > /run/gb-cowloop",
                      "rm -f /var/tmp/baton-spill/gb-cow"]
            cow = "$(cat /run/gb-cowloop)"
        lines += [f"dmsetup load gb-top --table '0 {ds} snapshot-origin /dev/mapper/gb-era'",
                  "dmsetup suspend gb-top",
                  f"dmsetup create gb-snap -r --table \"0 {ds} snapshot /dev/mapper/gb-era {cow} N "
                  f"{cfg.cow_chunk // SECTOR}\"",
                  "dmsetup resume gb-top"]
    return "\n".join(lines)


BARE_DOWN = ("for d in gb-lin gb-snap gb-top gb-era gb-origin gb-meta gb-cowdev; do "
             "dmsetup info $d >/dev/null 2>&1 && dmsetup remove $d; done; "
             "if [ -s /run/gb-cowloop ]; then losetup -d $(cat /run/gb-cowloop); rm -f /run/gb-cowloop; fi; "
             "dmsetup ls")


def _run_config(g: Guest, cfg: Config, rnd: int, geo: Geometry, runtime: float, series: dict[str, Series]
                ) -> None:
    """One round of one configuration: build, the three jobs, tear down. Errors land in ``series``."""
    seed = g.ctx.seed + rnd
    t0 = time.monotonic()
    detail: JSON = {"round": rnd}
    try:
        if cfg.kind in ("linear", "era"):
            dev = "/dev/mapper/gb-lin" if cfg.kind == "linear" else "/dev/mapper/gb-top"
            try:
                g.sh(_bare_up(cfg, geo), timeout=120)
                script, outs = _fio_script(g, cfg, rnd, dev, geo, runtime, seed)
                g.sh(f"sh {script}", timeout=900)
            finally:
                if g.alive:
                    left = g.sh(BARE_DOWN, timeout=120, check=False)
                    if "gb-" in left:
                        raise StepFailed(f"bare stack left behind: {left.strip()}")
        else:
            st = g.baton("attach", "/dev/vda", "--name", NAME, "--frontend", "dm", "--cow-size",
                         f"{geo.cow >> 20}M")
            detail["attach_frontend"] = st.get("frontend")
            try:
                script, outs = _fio_script(g, cfg, rnd, f"/dev/baton/{NAME}", geo, runtime, seed)
                if cfg.kind == "baton" and cfg.stop_daemon:
                    pid = int(st["pid"])
                    g.sh(f"kill -STOP {pid}", timeout=60)
                    try:
                        g.sh(f"sh {script}", timeout=900)
                    finally:
                        if g.alive:
                            g.sh(f"kill -CONT {pid}", timeout=60)
                elif cfg.kind == "baton":
                    g.sh(f"sh {script}", timeout=900)
                else:
                    t1 = time.monotonic()
                    res = g.baton("backup", NAME, "--repo", REPO, "--pre", "true", "--post", f"sh {script}",
                                  "--hook-timeout", "900", timeout=1800)
                    post = (res.get("consistency") or {}).get("post") or {}
                    detail["backup"] = {k: res.get(k) for k in ("mode", "chunks_read", "bytes_read", "duration_s",
                                                               "read_s", "store_s", "snapshot")}
                    detail["backup"]["wall_s"] = round(time.monotonic() - t1, 2)
                    detail["backup"]["post_hook_s"] = post.get("seconds")
                    if post.get("exit_status") != 0:
                        raise StepFailed(f"the --post hook did not run or failed: {post}")
                    before = (g.share / f"{cfg.name}-r{rnd}.before").read_text()
                    if f"baton-{NAME}: 0 {geo.data_sectors} snapshot-origin" not in before:
                        raise StepFailed(f"no snapshot-origin top while the hook ran:\n{before[-800:]}")
                    detail["frontend_stats"] = g.baton("status", NAME).get("frontend_stats", {})
            finally:
                if g.alive:
                    g.baton("detach", NAME, rc=None)
        for suffix in ("before", "after"):
            p = g.share / f"{cfg.name}-r{rnd}.{suffix}"
            if p.exists():
                detail[f"dm_{suffix}"] = p.read_text()[-1500:]
        _collect(outs, series, detail)
    except StepFailed as e:
        for job in JOBS:
            series[job.name].fail(f"round {rnd}: {e}")
        g.ctx.log(f"guest: {cfg.name} round {rnd}: FAILED: {str(e).splitlines()[0][:300]}")
        return
    g.ctx.log(f"guest: {cfg.name} round {rnd} in {time.monotonic() - t0:.0f} s: "
              + ", ".join(f"{j.name} {median_of(series[j.name].result(), 'iops') or 0:.0f}" for j in JOBS))


def _prefill(path: Path, size: int) -> None:
    """Write zeros over the whole image on the host (no holes, no unwritten extents left to allocate)."""
    buf = bytes(4 * MiB)
    with open(path, "r+b") as f:
        done = 0
        while done < size:
            n = min(len(buf), size - done)
            f.write(buf[:n])
            done += n
        f.flush()
        os.fsync(f.fileno())


def _versions(g: Guest, image: Any) -> JSON:
    out: JSON = {"kernel_package_version": getattr(image, "kernel_version", None)}
    probes = {"guest_kernel": "uname -r", "guest_kernel_build": "cat /proc/version",
              "dm_targets": "dmsetup targets | grep -E '^(era|snapshot|snapshot-origin|linear) '",
              "dmsetup": "dmsetup --version | head -2 | tr '\\n' ' '", "fio": "fio --version",
              "guest_cpus_mem": "echo $(nproc) vCPU, $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB"}
    for k, cmd in probes.items():
        with contextlib.suppress(StepFailed):
            out[k] = g.sh(cmd, timeout=60, check=False).strip()
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # the guest runs this checkout, as it is now
        git = ["git", "-C", str(ROOT)]
        out["baton_commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                             timeout=30).stdout.strip()
        out["baton_src_uncommitted"] = subprocess.run([*git, "status", "--short", "src"], capture_output=True,
                                                      text=True, timeout=30).stdout.split("\n")[:20]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["qemu"] = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                                     timeout=30).stdout.splitlines()[0]
    return out


def run(ctx: Context) -> JSON:
    """Boot one guest and run every configuration ``ctx.reps`` times (smoke: tiny sizes, no trade-offs)."""
    region = 8 * MiB if ctx.smoke else 128 * MiB
    runtime = 1.0 if ctx.smoke else 5.0
    cow = 2 * region
    disk_mib = 64 if ctx.smoke else 384
    aux_mib = 16 + (cow >> 20)  # the second disk: a metadata slot (16 MiB), then a raw exception store
    configs = MAIN if ctx.smoke else MAIN + TRADEOFFS
    section: JSON = {
        "available": True, "region_bytes": region, "runtime_s": runtime, "rounds": ctx.reps, "chunk_size": CHUNK,
        "cow_size": cow, "disk_bytes": disk_mib * MiB, "configs": {c.name: c.what for c in configs},
        "workloads": [j.name for j in JOBS], "columns": COLUMNS,
    }
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)  # the VM tier's harness, used as it is (tests/vm/harness.py)
    try:
        harness = importlib.import_module("vm.harness")
        vm_image = importlib.import_module("vm.image")
        image = vm_image.ensure_image(log=False)
    except Exception as e:  # no QEMU, no image, no network for the first build: say why, measure nothing
        return unavailable(f"the VM tier cannot run here: {type(e).__name__}: {e}")
    series = {c.name: {j.name: Series() for j in JOBS} for c in configs}
    order_log: list[list[str]] = []
    with harness.VmCluster(ctx.subdir("guest"), disk_mib=disk_mib, guests=("A",), extra_disks={"aux": aux_mib},
                           image=image, max_seconds=600 if ctx.smoke else 5400) as c:
        _prefill(c.disk, disk_mib * MiB)
        _prefill(c.disks["aux"], aux_mib * MiB)
        t0 = time.monotonic()
        (a,) = c.boot("A")
        g = Guest(harness, c, a, ctx)
        section["boot_s"] = round(time.monotonic() - t0, 2)
        try:
            section["versions"] = _versions(g, image)
            ctx.log(f"guest: booted in {section['boot_s']} s; {section['versions'].get('guest_kernel')}")
            g.baton("init", "/dev/vda")
            g.baton("repo", "init", REPO)
            g.baton("attach", "/dev/vda", "--name", NAME, "--frontend", "dm", "--cow-size", f"{cow >> 20}M")
            meta = g.sh(f"dmsetup table baton-{NAME}:meta").split()
            origin = g.sh(f"dmsetup table baton-{NAME}:origin").split()
            t1 = time.monotonic()
            first = g.baton("backup", NAME, "--repo", REPO, timeout=1800)  # the full one: later ones are incremental
            section["initial_backup"] = {"mode": first.get("mode"), "wall_s": round(time.monotonic() - t1, 1)}
            g.baton("detach", NAME)
            data_sectors, meta_sectors = int(origin[1]), int(meta[1])
            if len(meta) != 5 or origin[2] != "linear" or meta[2] != "linear":
                raise StepFailed(f"unexpected Baton stack tables: meta {meta}, origin {origin}")
            bare_off = (data_sectors - meta_sectors - 2048) // 2048 * 2048
            geo = Geometry(data_sectors, meta_sectors, int(meta[4]), bare_off, region, cow)
            if region // SECTOR > bare_off:
                raise StepFailed(f"the fio region ({region} bytes) reaches the bare stack's metadata slice")
            section["geometry"] = {
                "data_bytes": data_sectors * SECTOR, "era_metadata_bytes": meta_sectors * SECTOR,
                "baton_metadata_offset": geo.baton_meta_offset * SECTOR,
                "bare_metadata_offset": bare_off * SECTOR, "era_block_bytes": CHUNK,
                "baton_tables": {"meta": " ".join(meta), "origin": " ".join(origin)},
            }
            names = [cf.name for cf in configs]
            for rnd in range(ctx.reps):
                order = names[rnd % len(names):] + names[:rnd % len(names)]
                order_log.append(order)
                ctx.log(f"guest: round {rnd + 1}/{ctx.reps}: {', '.join(order)}")
                for name in order:
                    if not g.alive:
                        raise StepFailed("the guest went down")
                    cfg = next(cf for cf in configs if cf.name == name)
                    _run_config(g, cfg, rnd, geo, runtime, series[name])
        except StepFailed as e:
            section["error"] = str(e)[:3000]
        finally:
            if section.get("error") or any(sr.errors for row in series.values() for sr in row.values()):
                section["console_tail"] = c.report(lines=30).replace(str(c.dir), "VM_DIR")[-4000:]
    section["order"] = order_log
    results: JSON = {}
    for cf in configs:
        rows = {k: s.result() for k, s in series[cf.name].items()}
        results[cf.name] = {"available": any(r.get("available") for r in rows.values()), **rows}
    section["results"] = results
    section["ratios"] = _ratios(results, configs)
    section["targets"] = _targets(section["ratios"])
    if not any(r["available"] for r in results.values()):
        section["available"] = False
        section.setdefault("error", "no configuration could be measured")
    return section


def _value(results: JSON, cfg: str, job: str, rnd: int | None = None) -> float | None:
    row = results.get(cfg, {}).get(job, {})
    if not row.get("available"):
        return None
    if rnd is None:
        return median_of(row, "iops")
    vals = [r["iops"] for r in row.get("runs", []) if r.get("round") == rnd]
    return float(vals[0]) if vals else None


def _pair(results: JSON, num: str, den: str) -> JSON:
    out: JSON = {}
    rounds = sorted({r.get("round") for row in results.get(num, {}).values() if isinstance(row, dict)
                     for r in row.get("runs", [])} - {None})
    for job in JOBS:
        paired = [x for x in (ratio(_value(results, num, job.name, rn), _value(results, den, job.name, rn))
                              for rn in rounds) if x is not None]
        out[job.name] = {"of_medians": ratio(_value(results, num, job.name), _value(results, den, job.name)),
                         "paired": stat(paired)}
    return out


def _ratios(results: JSON, configs: tuple[Config, ...]) -> JSON:
    """IOPS ratios (bandwidth ratios for the 1 MiB job: the same thing): every configuration over dm-linear,
    and every configuration over its base (Baton over the bare stack, a trade-off over its default)."""
    out: JSON = {}
    for cf in configs:
        if cf.name != "linear":
            out[f"{cf.name}/linear"] = _pair(results, cf.name, "linear")
        if cf.base:
            out[f"{cf.name}/{cf.base}"] = _pair(results, cf.name, cf.base)
    return out


def _targets(ratios: JSON) -> JSON:
    """Issue 11's targets: Baton >= 0.98x the bare era stack in every column (held to the bare snapshot during
    a backup), steady state >= 0.9x dm-linear."""
    out: JSON = {}

    def check(key: str, job: str, floor: float) -> None:
        r = ratios.get(key, {}).get(job, {})
        v = r.get("of_medians")
        out[f"{key} {job} >= {floor}"] = {"value": v, "paired": r.get("paired", {}),
                                          "met": None if v is None else v >= floor}

    for job in JOBS:
        check("baton/era", job.name, 0.98)
    for job in JOBS:
        check("baton-backup/era-snapshot", job.name, 0.98)
    check("baton/linear", RANDWRITE.name, 0.9)
    return out


# --- rendering (bench.report calls this for the summary) ---------------------------------------------------


def _cell(row: JSON, job: Job) -> str:
    r = row.get(job.name, {})
    if not r.get("available"):
        return "n/a"
    key, scale, fmt = ("bytes_per_s", 1e6, "{:.0f}") if job is SEQWRITE else ("iops", 1.0, "{:.0f}")
    s = r.get(key, {})
    if s.get("n", 0) > 1:
        return (f"{fmt.format(s['median'] / scale)} [{fmt.format(s['min'] / scale)}-"
                f"{fmt.format(s['max'] / scale)}]")
    return fmt.format(s.get("median", 0) / scale)


def _rat(r: JSON) -> str:
    v = r.get("of_medians")
    if v is None:
        return "n/a"
    p = r.get("paired", {})
    return f"{v:.2f}" + (f" [{p['min']:.2f}-{p['max']:.2f}]" if p.get("n", 0) > 1 else "")


def markdown(s: JSON) -> list[str]:
    """The section's tables: figures per configuration, ratios, targets."""
    lines = [f"## 6. dm-era frontend in a TCG guest (fio in one guest; region {s.get('region_bytes', 0) >> 20} MiB, "
             f"{s.get('runtime_s')} s per steady run, {s.get('rounds')} rounds)", ""]
    if not s.get("available", True) and "results" not in s:
        return [*lines, f"Unavailable: {str(s.get('error', '')).splitlines()[0][:300]}", ""]
    v = s.get("versions", {})
    lines += [f"Guest: {v.get('guest_kernel')} ({v.get('kernel_package_version')}), {v.get('guest_cpus_mem')}, "
              f"{v.get('qemu')}, {v.get('fio')}; boot {s.get('boot_s')} s.", ""]
    if s.get("error"):
        lines += [f"Stopped early: {str(s['error']).splitlines()[0][:300]}", ""]
    lines += ["| config | " + " | ".join(COLUMNS[j.name] + (" MB/s" if j is SEQWRITE else " IOPS") for j in JOBS)
              + " |", "|---" * (len(JOBS) + 1) + "|"]
    for name, row in s.get("results", {}).items():
        lines.append(f"| {name} | " + " | ".join(_cell(row, j) for j in JOBS) + " |")
    lines += ["", "Ratios, median over median [range of the same round's ratios]:", "",
              "| ratio | " + " | ".join(COLUMNS[j.name] for j in JOBS) + " |", "|---" * (len(JOBS) + 1) + "|"]
    for key, r in s.get("ratios", {}).items():
        lines.append(f"| {key} | " + " | ".join(_rat(r.get(j.name, {})) for j in JOBS) + " |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for key, t in s.get("targets", {}).items():
        met = "n/a" if t.get("met") is None else ("met" if t["met"] else "MISSED")
        val = "n/a" if t.get("value") is None else f"{t['value']:.3f}"
        lines.append(f"| {key} | {val} | {met} |")
    errs = [f"- {name} {job}: {str(row.get(job, {}).get('error', ''))[:200]}"
            for name, row in s.get("results", {}).items() for job in row
            if isinstance(row.get(job), dict) and row[job].get("available") is False]
    if errs:
        lines += ["", "Unavailable:", *errs]
    lines.append("")
    return lines
