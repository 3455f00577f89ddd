"""Benchmark 2: what write tracking costs, per frontend.

Configurations, each on a fully written image of ``reps x REGION`` bytes:

- ``raw-loop``: ``losetup --direct-io=on`` straight on the FUSE configuration's backing file (the ceiling);
- ``fuse-tracking``: ``/dev/baton/NAME`` (FUSE file + loop device) with tracking on;
- ``fuse-no-tracking``: the same frontend attached with ``--no-tracking`` (marked unavailable when that
  option does not exist);
- ``nbd-tracking`` / ``nbd-no-tracking``: the NBD unix socket, driven by fio's ``nbd`` engine.

Workloads (fio): first-touch 4 KiB writes at QD16 that each land in a chunk nothing has marked yet (repetition
``r`` uses region ``r``, so every repetition really is first-touch); then steady state on region 0, whose chunks
are all marked: 4 KiB random write QD16, 4 KiB random read QD16 and 1 MiB sequential write QD4.

The FUSE and NBD configurations use separate images, so NBD's first-touch runs see a clean record too.
Metadata syncs per 1000 first-touch writes come from ``baton status --json`` (``metadata_syncs``, ``writes``)
read before and after each first-touch run.
"""

from __future__ import annotations

from bench.common import (
    JSON,
    KiB,
    MiB,
    Series,
    StepFailed,
    loop_device,
    median_of,
    proc_rss,
    ratio,
    stat,
    unavailable,
)
from bench.context import Context
from bench.diskgen import make_image
from bench.fio import RANDREAD, RANDWRITE, SEQWRITE, Job, Target, first_touch_job, run_job

CHUNK = 64 * KiB
CONFIGS = ("raw-loop", "fuse-tracking", "fuse-no-tracking", "nbd-tracking", "nbd-no-tracking")


def _counters(ctx: Context, name: str) -> tuple[int, int, int]:
    """(writes, metadata_syncs, dirty_chunks) from ``baton status --json``."""
    st = ctx.baton.status(name)
    return (int(st.get("writes", 0) or 0), int(st.get("metadata_syncs", 0) or 0),
            int(st.get("dirty_chunks", 0) or 0))


def _run_rep(ctx: Context, config: str, target: Target, name: str | None, region: int, runtime: float,
             rep: int, series: dict[str, Series], sync_rows: list[JSON]) -> None:
    """One repetition of every workload on one configuration; failures are recorded per workload."""
    first = first_touch_job(CHUNK)
    d = ctx.subdir("tracking")
    try:
        before = _counters(ctx, name) if name else None
        r = run_job(first, target, offset=rep * region, size=region, scratch=d)
        if name and before is not None:
            after = _counters(ctx, name)
            dw, ds = after[0] - before[0], after[1] - before[1]
            r["baton_writes"] = dw
            r["metadata_syncs"] = ds
            r["syncs_per_1000_writes"] = round(1000 * ds / dw, 2) if dw else None
            # dirty_chunks before/after shows the run really was first-touch (it grows by about fio_ios).
            sync_rows.append({"config": config, "rep": rep, "writes": dw, "fio_ios": r["ios"],
                              "metadata_syncs": ds, "syncs_per_1000_writes": r["syncs_per_1000_writes"],
                              "dirty_chunks_before": before[2], "dirty_chunks_after": after[2]})
        series[first.name].add({"iops": r["iops"], "bytes_per_s": r["bytes_per_s"]}, r)
    except StepFailed as e:
        series[first.name].fail(str(e))
    job: Job
    for job in (RANDWRITE, RANDREAD, SEQWRITE):
        try:
            r = run_job(job, target, offset=0, size=region, scratch=d, seed=ctx.seed + rep, runtime_s=runtime)
            series[job.name].add({"iops": r["iops"], "bytes_per_s": r["bytes_per_s"],
                                  "lat_p99_us": r["lat_p99_us"]}, r)
        except StepFailed as e:
            series[job.name].fail(str(e))


def run(ctx: Context) -> JSON:
    """Run the benchmark; returns the section (failed configurations are marked unavailable)."""
    region = 16 * MiB if ctx.smoke else 256 * MiB
    runtime = 0.5 if ctx.smoke else 5.0
    d = ctx.subdir("tracking")
    b = ctx.baton
    jobs = [first_touch_job(CHUNK), RANDWRITE, RANDREAD, SEQWRITE]
    results: dict[str, JSON] = {}
    sync_rows: list[JSON] = []
    daemon_rss: dict[str, int | None] = {}
    section: JSON = {
        "available": True, "region_bytes": region, "runtime_s": runtime, "reps": ctx.reps, "chunk_size": CHUNK,
        "configs": list(CONFIGS), "workloads": [j.name for j in jobs],
    }
    no_tracking = b.has("attach", "--no-tracking")
    images = {"fuse": d / "fuse.img", "nbd": d / "nbd.img"}
    try:
        for fe, img in images.items():
            ctx.log(f"tracking: writing the {fe} image ({ctx.reps * region >> 20} MiB + record room)")
            # Room past the regions for a tail record, so the regions are all inside the exposed device.
            make_image(img, ctx.reps * region + 64 * MiB, ctx.seed + 3)
        # Repetition-major order: every configuration runs once per round, so load from other users of
        # the machine drifts over all configurations alike instead of skewing one of them.
        series = {c: {j.name: Series() for j in jobs} for c in CONFIGS}
        errors: dict[str, str] = {}
        cleanups: dict[str, list[str]] = {}
        for rep in range(ctx.reps):
            for config in CONFIGS:
                if config in errors:
                    continue
                fe = "nbd" if config.startswith("nbd") else "fuse"
                name = f"bench-trk-{fe}"
                attached = False
                try:
                    if config == "raw-loop":
                        with loop_device(images["fuse"]) as dev:
                            ctx.log(f"tracking: rep {rep + 1} {config} on {dev}")
                            _run_rep(ctx, config, Target(device=dev), None, region, runtime, rep, series[config],
                                     sync_rows)
                        continue
                    tracking = not config.endswith("no-tracking")
                    if not tracking and not no_tracking:
                        raise StepFailed("`baton attach --no-tracking` is not available in this build")
                    if tracking and rep == 0:
                        b.init(images[fe], "64K")
                    extra = () if tracking else ("--no-tracking",)
                    st, am = b.attach(images[fe], "A", name, frontend=fe, extra=extra)
                    attached = True
                    target = (Target(socket=b.socket(st, name)) if fe == "nbd"
                              else Target(device=b.device(st, name)))
                    ctx.log(f"tracking: rep {rep + 1} {config} ({'socket' if fe == 'nbd' else 'device'} ready in "
                            f"{am.wall_s:.2f}s)")
                    _run_rep(ctx, config, target, name if tracking else None, region, runtime, rep,
                             series[config], sync_rows)
                    pid = st.get("pid")
                    daemon_rss[config] = proc_rss(pid) if isinstance(pid, int) else None
                except StepFailed as e:
                    errors[config] = str(e)
                finally:
                    if attached:
                        cleanups.setdefault(config, []).extend(b.cleanup(name))
        for config in CONFIGS:
            rows = {k: sr.result() for k, sr in series[config].items()}
            if any(r.get("available") for r in rows.values()):
                results[config] = {"available": True, **rows}
                if config in errors:
                    results[config]["error_in_a_later_repetition"] = errors[config]
            else:
                results[config] = unavailable(errors.get(config, "no workload succeeded"))
            if cleanups.get(config):
                results[config]["cleanup"] = cleanups[config]
        section["results"] = results
        section["metadata_syncs"] = sync_rows
        section["syncs_per_1000_first_touch_writes"] = stat(
            [r["syncs_per_1000_writes"] for r in sync_rows if r.get("syncs_per_1000_writes") is not None])
        section["daemon_rss_bytes"] = daemon_rss
        section["ratios"] = _ratios(results, jobs)
    except (StepFailed, OSError) as e:
        section.update(unavailable(f"tracking benchmark aborted: {e}"))
    finally:
        b.force_release()
        for img in images.values():
            img.unlink(missing_ok=True)
    return section


def _ratios(results: dict[str, JSON], jobs: list[Job]) -> JSON:
    """IOPS ratios pair by pair: tracking on/off in each frontend, and each configuration over raw loop."""
    def iops(config: str, job: str) -> float | None:
        row = results.get(config, {})
        return median_of(row.get(job, {}), "iops") if row.get("available") else None

    out: JSON = {}
    for j in jobs:
        for fe in ("fuse", "nbd"):
            out[f"{fe}_tracking_over_no_tracking.{j.name}"] = ratio(iops(f"{fe}-tracking", j.name),
                                                                    iops(f"{fe}-no-tracking", j.name))
            for cfg in (f"{fe}-tracking", f"{fe}-no-tracking"):
                out[f"{cfg}_over_raw_loop.{j.name}"] = ratio(iops(cfg, j.name), iops("raw-loop", j.name))
    return out
