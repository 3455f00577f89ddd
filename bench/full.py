"""Benchmark 3: full backup, restore and verify, against restic and borg.

One image with realistic content (the same generator as benchmark 1). Each repetition uses a fresh repository
per tool, and every step starts from a cold cache:

=========  ===========================  =====================  ===========================
step       Baton                        restic                 borg (fixed 64 KiB chunks)
=========  ===========================  =====================  ===========================
backup     ``baton backup DISK --full``  ``restic backup``      ``borg create``
restore    ``baton restore --to``        ``restic restore``     ``borg extract``
verify     ``baton verify``              ``check --read-data``  ``check --verify-data``
=========  ===========================  =====================  ===========================

Restore time includes a ``sync`` afterwards, so a tool that leaves its output in the page cache pays for the
write-back like one that writes with O_DIRECT. The first repetition compares every restored image with the
source byte for byte. The restore target's own sequential write rate is measured too (O_DIRECT, fsync), since
the target is "restore >= 0.7 x the target's sequential write rate".
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from bench.common import (
    JSON,
    GiB,
    Measured,
    Series,
    StepFailed,
    check,
    median_of,
    ratio,
    stat,
    syncfs,
    tree_bytes,
    unavailable,
)
from bench.context import Context
from bench.diskgen import files_identical, make_image, seq_write_rate
from bench.peers import Borg, Restic

TOOLS = ("baton", "baton-aes", "restic", "borg")
STEPS = ("backup", "restore", "verify")


def _synced(m: Measured, target: Path) -> float:
    """Wall time of a restore plus the write-back of what it left dirty (syncfs of the target's file system)."""
    t0 = time.perf_counter()
    syncfs(target)
    return m.wall_s + (time.perf_counter() - t0)


def _baton_rep(ctx: Context, img: Path, root: Path, check_identical: bool, s: dict[str, Series],
               encrypted: bool) -> None:
    b = ctx.baton
    repo = root / "baton-repo"
    if encrypted:
        # The key file is created by `repo init`; later commands find it through BATON_KEY_FILE.
        key = root / "repo.key"
        check([b.exe, "repo", "init", str(repo), "--encryption", "aes-256-gcm", "--key-file", str(key)],
              env=b.env, timeout=120)
        b.env["BATON_KEY_FILE"] = str(key)
    else:
        b.env.pop("BATON_KEY_FILE", None)
        b.repo_init(str(repo))
    ctx.cold_for("baton", "backup", img)
    out, m = b.backup(str(img), str(repo), full=True)
    snap = str(out.get("snapshot", ""))
    s["backup"].add({"wall_s": m.wall_s, "bytes_read": m.read_bytes, "bytes_stored": tree_bytes(repo),
                     "peak_rss_bytes": m.peak_rss_bytes, "cpu_s": m.cpu_s},
                    {**m.to_json(), "reported": {k: out.get(k) for k in (
                        "snapshot", "mode", "reason", "bytes_read", "bytes_stored", "holes_skipped_bytes",
                        "plan_s", "read_s", "store_s", "commit_s", "pipeline_s", "peak_rss_bytes")}})
    target = root / "restored.img"
    ctx.cold_for("baton", "restore", img)
    rm = b.restore(snap, str(repo), target, os.path.getsize(img))
    wall = _synced(rm, target)
    detail: JSON = rm.to_json()
    if check_identical:
        # The restored disk is the exposed device: the image minus any tail record area.
        n = os.path.getsize(target)
        detail["identical"] = files_identical(target, img, n) if n else False
    s["restore"].add({"wall_s": wall, "bytes_per_s": os.path.getsize(target) / wall if wall else None,
                      "peak_rss_bytes": rm.peak_rss_bytes}, detail)
    target.unlink(missing_ok=True)
    ctx.cold_for("baton", "verify", img)
    vout, vm = b.verify(str(repo), snap)
    s["verify"].add({"wall_s": vm.wall_s, "bytes_read": vm.read_bytes, "peak_rss_bytes": vm.peak_rss_bytes},
                    {**vm.to_json(), "reported": vout})


def _peer_rep(ctx: Context, img: Path, root: Path, tool: Restic | Borg, check_identical: bool,
              s: dict[str, Series]) -> None:
    name = "restic" if isinstance(tool, Restic) else "borg"
    tool.init()
    ctx.cold_for(name, "backup", img)
    m = tool.backup(img)[0] if isinstance(tool, Restic) else tool.create(img)[0]
    s["backup"].add({"wall_s": m.wall_s, "bytes_read": m.read_bytes, "bytes_stored": tool.size(),
                     "peak_rss_bytes": m.peak_rss_bytes, "cpu_s": m.cpu_s}, m.to_json())
    target_dir = root / "restored"
    target_dir.mkdir(exist_ok=True)
    ctx.cold_for(name, "restore", img)
    rm = tool.restore(target_dir) if isinstance(tool, Restic) else tool.extract(target_dir)
    wall = _synced(rm, target_dir)
    # restic recreates the absolute path under the target, borg the relative name given at create time.
    found = [Path(r) / f for r, _, fs in os.walk(target_dir) for f in fs if f == img.name]
    detail: JSON = rm.to_json()
    if check_identical:
        detail["identical"] = bool(found) and files_identical(img, found[0])
    size = os.path.getsize(found[0]) if found else 0
    s["restore"].add({"wall_s": wall, "bytes_per_s": size / wall if wall and size else None,
                      "peak_rss_bytes": rm.peak_rss_bytes}, detail)
    shutil.rmtree(target_dir, ignore_errors=True)
    ctx.cold_for(name, "verify", img)
    vm = tool.check_read_data() if isinstance(tool, Restic) else tool.check_verify_data()
    s["verify"].add({"wall_s": vm.wall_s, "bytes_read": vm.read_bytes, "peak_rss_bytes": vm.peak_rss_bytes},
                    vm.to_json())


def run(ctx: Context) -> JSON:
    """Run the benchmark; returns the section (a failing tool's rows are marked unavailable)."""
    d = ctx.subdir("full")
    img = d / "disk.img"
    section: JSON = {"available": True, "size_bytes": ctx.size, "reps": ctx.reps,
                     "settings": {"borg": "--encryption none --compression lz4 --chunker-params fixed,65536",
                                  "restic": "repository v2, compression auto, encrypted (mandatory)",
                                  "baton": "repository defaults of `baton repo init` (no encryption, zstd-1)",
                                  "baton-aes": "`baton repo init --encryption aes-256-gcm --key-file KEY`"}}
    try:
        ctx.log(f"full: writing a {ctx.size >> 20} MiB image")
        section["image"] = make_image(img, ctx.size, ctx.seed + 1)
        baton_err: str | None = None
        try:
            ctx.baton.init(img, "64K")
        except StepFailed as e:
            baton_err = f"init failed: {e}"
        section["target_seq_write"] = seq_write_rate(d, min(ctx.size, 1 * GiB))
        series = {t: {st: Series() for st in STEPS} for t in TOOLS}
        for rep in range(ctx.reps):
            for tool in TOOLS:
                root = d / f"{tool}-{rep}"
                root.mkdir(exist_ok=True)
                ctx.log(f"full: {tool} rep {rep + 1}")
                try:
                    if tool.startswith("baton"):
                        if baton_err:
                            raise StepFailed(baton_err)
                        _baton_rep(ctx, img, root, rep == 0, series[tool], encrypted=tool == "baton-aes")
                    else:
                        peer = Restic(root) if tool == "restic" else Borg(root)
                        _peer_rep(ctx, img, root, peer, rep == 0, series[tool])
                except (StepFailed, OSError) as e:
                    for stp in STEPS:
                        if len(series[tool][stp].samples) <= rep:
                            series[tool][stp].fail(str(e))
                finally:
                    ctx.baton.env.pop("BATON_KEY_FILE", None)
                    shutil.rmtree(root, ignore_errors=True)
        rows = {t: {stp: series[t][stp].result() for stp in STEPS} for t in TOOLS}
        section["results"] = rows
        ratios: JSON = {}
        for stp in STEPS:
            for bname in ("baton", "baton-aes"):
                bt = median_of(rows[bname][stp], "wall_s")
                for pname in ("restic", "borg"):
                    ratios[f"{pname}_over_{bname}.{stp}_wall"] = ratio(median_of(rows[pname][stp], "wall_s"), bt)
        wr = section["target_seq_write"]["bytes_per_s"]
        for t in TOOLS:
            ratios[f"{t}.restore_rate_over_target_seq_write"] = ratio(median_of(rows[t]["restore"], "bytes_per_s"),
                                                                      wr)
        section["ratios"] = ratios
        section["restore_rate_bytes_per_s"] = {t: stat([r["bytes_per_s"] for r in rows[t]["restore"].get("runs", [])
                                                         if r.get("bytes_per_s")]) for t in TOOLS}
    except (StepFailed, OSError) as e:
        section.update(unavailable(f"full benchmark aborted: {e}"))
    finally:
        img.unlink(missing_ok=True)
    return section
