"""Benchmark 4: scale. Attach time and backup planning time against disk size, memory, snapshot metadata.

Sparse images from 64 GiB to 16 TiB (the 16 TiB one is 64 KiB short, ext4's file size limit). For each size:
``baton init``; then ``reps`` times ``baton attach`` (timed: the command returns when the device is ready) and
``baton detach``; daemon RSS after attach; an untimed seed backup (a full one: bounded to SEED_TIMEOUT_S, and
skipped for bigger sizes once a smaller one did not finish); a few chunks written through the device;
a timed incremental backup, whose planning time is taken from the backup's JSON when it reports one (any
numeric field whose name contains "plan") and otherwise bounded by its whole duration.

Snapshot metadata against changed data: on the smallest size, incrementals after 16, 256 and 4096 changed
chunks; metadata bytes = growth of the repository - bytes of chunk data stored (the backup's
``bytes_stored``). The same figure at every disk size shows whether metadata follows the disk size.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from bench.common import JSON, GiB, KiB, Series, StepFailed, TiB, proc_rss, stat, tree_bytes, unavailable
from bench.context import Context
from bench.diskgen import device_size, write_chunks

CHUNK = 64 * KiB
SIZES = (64 * GiB, 256 * GiB, 1 * TiB, 4 * TiB, 16 * TiB - CHUNK)
SMOKE_SIZES = (1 * GiB, 64 * GiB)
NAME = "bench-scale"
SEED_TIMEOUT_S = 150.0


def _plan_seconds(out: JSON) -> tuple[float | None, str]:
    """The planning time a backup reports, searching one level of nesting; (None, "") if none."""
    def scan(d: dict[str, Any], prefix: str) -> tuple[float | None, str]:
        for k, v in d.items():
            if "plan" in k.lower() and isinstance(v, int | float) and not isinstance(v, bool):
                return float(v), prefix + k
        return None, ""

    v, key = scan(out, "")
    if v is not None:
        return v, key
    for k, sub in out.items():
        if isinstance(sub, dict):
            v, key = scan(sub, k + ".")
            if v is not None:
                return v, key
    return None, ""


def _incrementals(ctx: Context, size: int, img: Path, repo: Path, dev: str, counts: tuple[int, ...],
                  row: JSON) -> list[JSON]:
    """Seed backup (untimed, bounded), then one timed incremental per entry of ``counts``."""
    b = ctx.baton
    # The seed is a full backup of a sparse disk: fast only if Baton skips holes. Bound it, so a 16 TiB disk
    # costs at most SEED_TIMEOUT_S and then reports why its planning time is missing.
    seed_out, seed_m = b.backup(NAME, str(repo), timeout=SEED_TIMEOUT_S)
    row["seed_backup"] = {**seed_m.to_json(), "mode": seed_out.get("mode"), "reason": seed_out.get("reason")}
    rng = random.Random(ctx.seed + size % 9973)
    n_chunks = device_size(dev) // CHUNK
    incs: list[JSON] = []
    for k in counts:
        chunks = sorted(rng.sample(range(n_chunks), k))
        write_chunks(dev, chunks, CHUNK, ctx.seed + k)
        before = tree_bytes(repo)
        ctx.cold_for("baton", "backup", img)
        out, m = b.backup(NAME, str(repo), timeout=300)
        grown = tree_bytes(repo) - before
        stored = out.get("bytes_stored")
        plan, plan_key = _plan_seconds(out)
        incs.append({
            "changed_chunks": k, "changed_bytes": k * CHUNK, "wall_s": round(m.wall_s, 4),
            "plan_s": plan if plan is not None else round(m.wall_s, 4),
            "plan_source": plan_key or "whole backup wall time (no planning field reported)",
            "repo_growth_bytes": grown,
            "bytes_stored": stored,
            "metadata_bytes": grown - stored if isinstance(stored, int) else None,
            "peak_rss_bytes": m.peak_rss_bytes, "mode": out.get("mode"), "command": m.command,
        })
    return incs


def _one_size(ctx: Context, size: int, d: Path, counts: tuple[int, ...], skip_backups: str | None) -> JSON:
    b = ctx.baton
    img = d / f"sparse-{size}.img"
    repo = d / f"repo-{size}"
    with open(img, "wb") as f:
        f.truncate(size)
    row: JSON = {"available": True, "size_bytes": size, "bitmap_bytes": -(-size // CHUNK) // 8}
    attached = False
    try:
        row["init"] = b.init(img, "64K").to_json()
        b.repo_init(str(repo))
        attach = Series()
        st: JSON = {}
        for rep in range(ctx.reps):
            st, m = b.attach(img, "A", NAME, frontend="fuse")
            attached = True
            pid = st.get("pid")
            attach.add({"wall_s": m.wall_s, "daemon_rss_bytes": proc_rss(pid) if isinstance(pid, int) else None},
                       m.to_json())
            if rep < ctx.reps - 1:
                b.detach(NAME)
                attached = False
        row["attach"] = attach.result()
        dev = b.device(st, NAME)
        try:
            if skip_backups:
                raise StepFailed(skip_backups)
            row["incrementals"] = _incrementals(ctx, size, img, repo, dev, counts, row)
        except (StepFailed, OSError) as e:
            # Attach figures stand on their own; only the backup part of this size is unavailable.
            row["incrementals_error"] = str(e)[-1200:]
        pid = st.get("pid")
        row["daemon_rss_after_bytes"] = proc_rss(pid) if isinstance(pid, int) else None
    except (StepFailed, OSError) as e:
        row.update(unavailable(str(e)))
    finally:
        if attached:
            notes = b.cleanup(NAME)
            if notes:
                row["cleanup"] = notes
        img.unlink(missing_ok=True)
        shutil.rmtree(repo, ignore_errors=True)
    return row


def run(ctx: Context) -> JSON:
    """Run the benchmark; returns the section (sizes that fail are marked unavailable)."""
    d = ctx.subdir("scale")
    sizes = SMOKE_SIZES if ctx.smoke else SIZES
    meta_counts = (4, 64) if ctx.smoke else (16, 256, 4096)
    rows: list[JSON] = []
    for i, size in enumerate(sizes):
        ctx.log(f"scale: {size / GiB:.0f} GiB sparse")
        counts = meta_counts if i == 0 else (meta_counts[0],)
        # A seed (full) backup that did not finish on a smaller sparse disk will not finish on a bigger one.
        skip = next((f"skipped: the seed backup of the {r['size_bytes'] / GiB:.0f} GiB disk did not finish"
                     for r in rows if r.get("incrementals_error")), None)
        if ctx.smoke and i > 0:
            skip = "skipped in smoke runs (attach only)"
        rows.append(_one_size(ctx, size, d, counts, skip))
    section: JSON = {"available": True, "sizes_bytes": list(sizes), "chunk_size": CHUNK, "reps": ctx.reps,
                     "rows": rows}
    ok = [r for r in rows if r.get("available")]
    section["attach_s_by_size"] = {str(r["size_bytes"]): r["attach"].get("wall_s", {}).get("median")
                                   for r in ok if r.get("attach", {}).get("available")}
    section["plan_s_by_size"] = {str(r["size_bytes"]): r["incrementals"][0]["plan_s"]
                                 for r in ok if r.get("incrementals")}
    section["metadata_vs_changed"] = [
        {k: inc[k] for k in ("changed_bytes", "metadata_bytes", "repo_growth_bytes")} | {"size_bytes": r["size_bytes"]}
        for r in ok for inc in r.get("incrementals", [])]
    meta = [m["metadata_bytes"] for m in section["metadata_vs_changed"] if isinstance(m.get("metadata_bytes"), int)]
    section["metadata_bytes"] = stat(meta) if meta else {"n": 0}
    return section
