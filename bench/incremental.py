"""Benchmark 1: incremental backup after failover.

Workload: one disk image (default 4 GiB) with realistic content. For each change rate (0.1, 1, 10, 50 % of the
64 KiB chunks) and each repetition, a *round* writes that many whole chunks through ``/dev/baton/NAME`` split
over three owners: A attaches and writes a third, is killed with SIGKILL; B takes over (epoch+1) and writes the
next third, is killed; C takes over and writes the rest and stays the owner. Then, each after a cold cache:

1. ``baton backup NAME`` (incremental from the record),
2. ``baton backup NAME --full`` into a second repository of its own (seeded and then backed up in full once per
   round, like the incremental's), so it too stores the round's new data, as restic and borg do; into the
   incremental's repository it would find every new chunk already stored and only hash,
3. ``restic backup`` of the image file (its previous snapshot is the parent),
4. ``borg create`` of the image file (fixed 64 KiB chunker),

plus the physical bound: changed bytes / the image's cold sequential read rate.

Before the first round every contender takes an untimed seed backup, so every timed run is an incremental
(for the peers: a re-read of the whole file with deduplication against the previous one).

If ``baton attach`` is unavailable the rounds write straight into the image file and the Baton rows are marked
unavailable; the peer rows and the physical bound are still measured.
"""

from __future__ import annotations

import random
from pathlib import Path

from bench.common import (
    JSON,
    KiB,
    Series,
    StepFailed,
    disk_sectors_read,
    median_of,
    proc_io,
    proc_rss,
    ratio,
    stat,
    tree_bytes,
    unavailable,
)
from bench.context import Context
from bench.diskgen import device_size, make_image, pick_chunks, seq_read_rate, write_chunks
from bench.peers import Borg, Restic

CHUNK = 64 * KiB
RATES = (0.1, 1.0, 10.0, 50.0)
NAME = "bench-inc"
NODES = ("A", "B", "C")


class _Disk:
    """The benchmark disk and who serves it now."""

    def __init__(self, ctx: Context, img: Path, name: str = NAME) -> None:
        self.ctx = ctx
        self.img = img
        self.name = name  # the attachment name (/dev/baton/NAME)
        self.attached = False
        self.attach_error: str | None = None  # why writes cannot go through Baton (then: the image file)
        self.backup_error: str | None = None  # why Baton backups cannot be measured
        self.takeovers = 0
        self.owner = ""  # the node that writes now ("" when writing straight to the image file)
        self.target = str(img)

    @property
    def baton_error(self) -> str | None:
        """Why the Baton rows are unavailable, once known."""
        return self.attach_error or self.backup_error

    def takeover(self, node: str) -> str:
        """Kill -9 the current owner (if any) and attach as ``node``; returns the path to write to.
        Falls back to the image file when Baton cannot attach, recording why."""
        b = self.ctx.baton
        if self.attach_error is None:
            try:
                if self.attached:
                    b.kill9(self.name)
                    self.attached = False
                st, _ = b.attach(self.img, node, self.name, frontend="fuse")
                self.attached = True
                self.takeovers += 1
                self.owner = node
                self.target = b.device(st, self.name)
                return self.target
            except StepFailed as e:
                self.attach_error = f"attach/takeover as {node} failed: {e}"
                self.ctx.log(f"incremental: writing to the image file from here on: {self.attach_error[:200]}")
        self.owner = ""
        self.target = str(self.img)
        return self.target


def _timed_baton(ctx: Context, disk: _Disk, repo: Path, full: bool, changed: int) -> tuple[JSON, JSON]:
    """One cold-cache Baton backup of the attached disk: (metrics, detail)."""
    b = ctx.baton
    pid, io0 = b.daemon_io(NAME)
    sec0 = disk_sectors_read(ctx.scratch_device)
    before = tree_bytes(repo)
    ctx.cold_for("baton", "backup", disk.img)
    out, m = b.backup(NAME, str(repo), full=full)
    io1 = proc_io(pid) if pid else {}
    # The backup runs inside the per-disk daemon; its peak RSS (since this owner's takeover) counts too.
    daemon_hwm = (proc_rss(pid, "VmHWM") or 0) if pid else 0
    sec1 = disk_sectors_read(ctx.scratch_device)
    daemon_read = (io1.get("read_bytes", 0) - io0.get("read_bytes", 0)) if io0 and io1 else 0
    metrics: JSON = {
        "wall_s": m.wall_s,
        # The backup may read through the daemon or the device; the larger of the two is the honest figure
        # (summing would double-count reads of the loop device that the daemon then serves from the file).
        "bytes_read": max(m.read_bytes, daemon_read),
        "bytes_stored": tree_bytes(repo) - before,
        "peak_rss_bytes": max(m.peak_rss_bytes, daemon_hwm),
        "cpu_s": m.cpu_s,
    }
    detail = {
        "client_peak_rss_bytes": m.peak_rss_bytes,
        "daemon_peak_rss_bytes": daemon_hwm,
        **m.to_json(),
        "process_read_bytes": m.read_bytes,
        "daemon_read_bytes": daemon_read,
        "device_read_bytes_systemwide": (sec1 - sec0) * 512 if sec0 is not None and sec1 is not None else None,
        "reported": {k: out.get(k) for k in ("snapshot", "mode", "reason", "bytes_read", "bytes_stored",
                                              "chunks_changed", "duration_s", "node", "plan_s", "read_s",
                                              "store_s", "commit_s", "pipeline_s", "peak_rss_bytes")},
        "changed_bytes": changed,
    }
    return metrics, detail


def _timed_peer(ctx: Context, img: Path, tool: Restic | Borg) -> tuple[JSON, JSON]:
    before = tool.size()
    ctx.cold_for("restic" if isinstance(tool, Restic) else "borg", "backup", img)
    if isinstance(tool, Restic):
        m, summary = tool.backup(img)
    else:
        m, summary = tool.create(img)
    metrics: JSON = {
        "wall_s": m.wall_s,
        "bytes_read": m.read_bytes,
        "bytes_stored": tool.size() - before,
        "peak_rss_bytes": m.peak_rss_bytes,
        "cpu_s": m.cpu_s,
    }
    return metrics, {**m.to_json(), "reported": summary}


def run(ctx: Context) -> JSON:
    """Run the benchmark; returns the section (never raises StepFailed: failed rows are marked)."""
    d = ctx.subdir("incremental")
    img = d / "disk.img"
    size = ctx.size
    ctx.log(f"incremental: writing a {size >> 20} MiB image")
    image = make_image(img, size, ctx.seed)
    disk = _Disk(ctx, img)
    b = ctx.baton
    brepo = d / "baton-repo"
    frepo = d / "baton-full-repo"  # the --full rows' own repository (module docstring)
    restic, borg = Restic(d), Borg(d)
    peers_ok: dict[str, str | None] = {"restic": None, "borg": None}
    section: JSON = {
        "available": True,
        "size_bytes": size,
        "chunk_size": CHUNK,
        "rates_pct": list(RATES),
        "reps": ctx.reps,
        "image": image,
        "method": "rounds of whole-chunk O_DIRECT writes through the tracked device by owners A, B, C with "
                  "kill -9 takeovers; cold cache (fadvise DONTNEED + drop_caches) before every timed run; "
                  "peers back up the image file; Baton --full into a repository of its own",
    }
    try:
        try:
            b.init(img, "64K")
            b.repo_init(str(brepo))
            b.repo_init(str(frepo))
        except StepFailed as e:
            disk.attach_error = f"init failed: {e}"
        # Seed: the first owner attaches; everybody takes an untimed first backup.
        dev = disk.takeover("A")
        usable = device_size(dev) if disk.attached else size
        n_chunks = usable // CHUNK
        section["usable_bytes"] = usable
        seeds: JSON = {}
        if disk.baton_error is None:
            try:
                out, m = b.backup(NAME, str(brepo))
                seeds["baton"] = {**m.to_json(), "mode": out.get("mode"), "reason": out.get("reason")}
                out, m = b.backup(NAME, str(frepo), full=True)
                seeds["baton_full"] = {**m.to_json(), "mode": out.get("mode"), "reason": out.get("reason")}
            except StepFailed as e:
                disk.backup_error = f"seed backup failed: {e}"
        ctx.log("incremental: seed backups (untimed)")
        for tname, tool in (("restic", restic), ("borg", borg)):
            try:
                tool.init()
                ctx.cold(img)
                m, _ = tool.backup(img) if isinstance(tool, Restic) else tool.create(img)
                seeds[tname] = m.to_json()
            except StepFailed as e:
                peers_ok[tname] = str(e)
        section["seed_backups"] = seeds

        rng = random.Random(ctx.seed)
        read_rates: list[float] = []
        cells: list[JSON] = []
        for rate in RATES:
            series = {k: Series() for k in ("baton_incremental", "baton_full", "restic", "borg")}
            changed_samples: list[int] = []
            rounds: list[JSON] = []
            for rep in range(ctx.reps):
                chunks = pick_chunks(n_chunks, rate, rng)
                rng.shuffle(chunks)
                thirds = [chunks[i::3] for i in range(3)]
                writes: list[JSON] = []
                for node, group in zip(NODES, thirds, strict=True):
                    # Smoke runs keep one A->B->C chain (the first round) to stay short; later rounds are
                    # written by the current owner.
                    if not ctx.smoke or (not cells and rep == 0) or not disk.attached:
                        disk.takeover(node)
                    # A fresh content seed per round and owner: no round rewrites bytes an earlier round wrote,
                    # which would let chunk-level dedup store less than really changed.
                    content_seed = ctx.seed + 1000 * len(cells) + 10 * rep + len(writes)
                    w = write_chunks(disk.target, sorted(group), CHUNK, content_seed)
                    writes.append({"node": disk.owner, "via": "baton device" if disk.attached else "image file", **w})
                changed = len(chunks) * CHUNK
                changed_samples.append(changed)
                rounds.append({"rate_pct": rate, "rep": rep, "writes": writes})
                ctx.log(f"incremental: {rate} % rep {rep + 1}: {len(chunks)} chunks changed by A->B->C")
                for key, full in (("baton_incremental", False), ("baton_full", True)):
                    if disk.baton_error is not None:
                        series[key].fail(disk.baton_error)
                        continue
                    try:
                        series[key].add(*_timed_baton(ctx, disk, frepo if full else brepo, full, changed))
                    except StepFailed as e:
                        series[key].fail(str(e))
                for tname, tool in (("restic", restic), ("borg", borg)):
                    err = peers_ok[tname]
                    if err is not None:
                        series[tname].fail(err)
                        continue
                    try:
                        series[tname].add(*_timed_peer(ctx, img, tool))
                    except StepFailed as e:
                        series[tname].fail(str(e))
                ctx.cold(img)
                read_rates.append(seq_read_rate(img)["bytes_per_s"])
            rows = {k: s.result() for k, s in series.items()}
            changed_med = stat(changed_samples)["median"]
            rate_med = stat(read_rates)["median"]
            rows["physical_bound"] = {"available": True, "wall_s": {"median": round(changed_med / rate_med, 6)},
                                      "bytes_read": {"median": changed_med},
                                      "note": "changed bytes / cold sequential read rate of the image"}
            inc = median_of(rows["baton_incremental"], "wall_s")
            cells.append({
                "rate_pct": rate,
                "changed_bytes": stat(changed_samples),
                "contenders": rows,
                "ratios": {
                    "restic_wall_over_baton_incremental": ratio(median_of(rows["restic"], "wall_s"), inc),
                    "borg_wall_over_baton_incremental": ratio(median_of(rows["borg"], "wall_s"), inc),
                    "baton_full_wall_over_baton_incremental": ratio(median_of(rows["baton_full"], "wall_s"), inc),
                    "baton_incremental_over_physical_bound": ratio(inc, median_of(rows["physical_bound"], "wall_s")),
                    "baton_incremental_bytes_read_over_changed":
                        ratio(median_of(rows["baton_incremental"], "bytes_read"), changed_med),
                    "restic_wall_over_baton_full": ratio(median_of(rows["restic"], "wall_s"),
                                                         median_of(rows["baton_full"], "wall_s")),
                    "borg_wall_over_baton_full": ratio(median_of(rows["borg"], "wall_s"),
                                                       median_of(rows["baton_full"], "wall_s")),
                },
                "rounds": rounds,
            })
        section["seq_read"] = {"bytes_per_s": stat(read_rates),
                               "method": "O_DIRECT 4 MiB sequential reads of the whole image after a cold cache"}
        section["cells"] = cells
        section["takeovers"] = disk.takeovers
        if disk.baton_error is not None:
            section["baton_error"] = disk.baton_error
    except (StepFailed, OSError) as e:
        section.update(unavailable(f"incremental benchmark aborted: {e}"))
    finally:
        notes = b.cleanup(NAME) if disk.attached or disk.takeovers else []
        if notes:
            section["cleanup"] = notes
        section["repo_bytes"] = {"baton": tree_bytes(brepo), "baton_full": tree_bytes(frepo),
                                 "restic": restic.size(), "borg": borg.size()}
        for p in (img,):
            p.unlink(missing_ok=True)
    return section
