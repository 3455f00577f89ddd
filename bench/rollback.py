"""Benchmark 5: rollback after a small change, against a full restore of the same snapshot (issue 13).

Target: "Rollback after 1 % of a 4 GiB disk changed writes under 2 % of the disk and is >= 10x faster than a
full restore, side by side in the benchmark."

Workload: one image with realistic content (the generator of benchmarks 1 and 3), ``baton init``, attached as
``/dev/baton/bench-rb`` (FUSE), one untimed backup: snapshot S. Then, per repetition:

1. 1 % of the 64 KiB chunks get new content, whole-chunk O_DIRECT writes through the tracked device
   (:func:`bench.diskgen.write_chunks`, as in benchmark 1);
2. cold cache, then ``baton rollback DISK S --repo R --json`` (DISK is attached here, so the chunks are written
   through the device and recorded), plus a ``syncfs`` of the image's file system afterwards;
3. the device is compared with S's content, 4 MiB block by block (SHA-256 of each block of the image's data
   area taken right after the backup);
4. cold cache, then ``baton restore S --repo R --to FILE`` of the same snapshot onto a new file, plus a
   ``syncfs`` (as in benchmark 3); FILE is compared the same way and removed;
5. untimed ``baton backup NAME``, so the next repetition starts from the same state (the rollback keeps the
   record's marks: without it, each repetition would consider the previous ones' chunks too).

Bytes written: the rollback's own ``bytes_written`` (its JSON), and the kernel's block-layer write accounting of
the command (``ru_oublock``; the rollback writes to the device through the page cache and fsyncs) and of the
daemon that serves the device (``/proc/PID/io`` ``write_bytes`` before and after, which includes its record
updates). For the restore: the command's ``ru_oublock``. Baton's restore is sparse: zero chunks become holes.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from bench.common import (
    JSON,
    KiB,
    MiB,
    Series,
    StepFailed,
    last_json,
    median_of,
    proc_io,
    ratio,
    stat,
    unavailable,
)
from bench.context import Context
from bench.diskgen import device_size, make_image, pick_chunks, write_chunks
from bench.full import _synced
from bench.incremental import _Disk

CHUNK = 64 * KiB
RATE_PCT = 1.0
NAME = "bench-rb"
BLOCK = 4 * MiB
TARGET_WRITTEN_FRACTION = 0.02
TARGET_SPEEDUP = 10.0


def digests(path: str | Path, length: int, block: int = BLOCK) -> list[bytes]:
    """SHA-256 of each ``block`` of the first ``length`` bytes of ``path`` (a short file ends the list early)."""
    out: list[bytes] = []
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < length:
            data = f.read(min(block, length - done))
            if not data:
                break
            out.append(hashlib.sha256(data).digest())
            done += len(data)
    return out


def mismatches(ref: list[bytes], path: str | Path, length: int) -> int:
    """How many ``BLOCK``-sized blocks of ``path`` differ from the reference (missing blocks count)."""
    got = digests(path, length)
    return sum(1 for i, d in enumerate(ref) if i >= len(got) or got[i] != d)


def run(ctx: Context) -> JSON:
    """Run the benchmark; returns the section (never raises StepFailed: failed rows are marked)."""
    d = ctx.subdir("rollback")
    img = d / "disk.img"
    repo = d / "baton-repo"
    target = d / "restored.img"
    b = ctx.baton
    disk = _Disk(ctx, img, NAME)
    section: JSON = {
        "available": True,
        "size_bytes": ctx.size,
        "chunk_size": CHUNK,
        "rate_pct": RATE_PCT,
        "reps": ctx.reps,
        "targets": {"written_fraction_below": TARGET_WRITTEN_FRACTION, "speedup_at_least": TARGET_SPEEDUP},
        "method": "1 % of the chunks rewritten through the attached device (O_DIRECT), then cold cache and "
                  "`baton rollback DISK SNAP --repo R --json` (+ syncfs) against cold cache and "
                  "`baton restore SNAP --repo R --to FILE` (+ syncfs) of the same snapshot; both checked block "
                  "by block against the snapshot's content",
    }
    try:
        b.require("rollback")
        ctx.log(f"rollback: writing a {ctx.size >> 20} MiB image")
        section["image"] = make_image(img, ctx.size, ctx.seed + 2)
        b.init(img, "64K")
        b.repo_init(str(repo))
        dev = disk.takeover("A")
        if not disk.attached:
            raise StepFailed(disk.attach_error or "attach failed")
        usable = device_size(dev)
        n_chunks = usable // CHUNK
        section["usable_bytes"] = usable
        out, m = b.backup(NAME, str(repo))
        snap = str(out.get("snapshot", ""))
        if not snap:
            raise StepFailed(f"backup printed no snapshot id: {out}")
        section["snapshot_backup"] = {**m.to_json(), "snapshot": snap, "mode": out.get("mode")}
        ref = digests(img, usable)  # S's content: the data area as backed up (nothing written since)
        rng = random.Random(ctx.seed + 2)
        series = {"rollback": Series(), "restore": Series()}
        for rep in range(ctx.reps):
            chunks = pick_chunks(n_chunks, RATE_PCT, rng)
            w = write_chunks(disk.target, chunks, CHUNK, ctx.seed + 500 + rep)
            changed = len(chunks) * CHUNK
            ctx.log(f"rollback: rep {rep + 1}: {len(chunks)} chunks changed; rolling back to {snap[:12]}")
            try:
                pid, io0 = b.daemon_io(NAME)
                ctx.cold_for("baton", "rollback", img)
                rout, rm = b.cmd("rollback", str(img), snap, "--repo", str(repo), timeout=3600)
                wall = _synced(rm, img)
                io1 = proc_io(pid) if pid else {}
                daemon_written = (io1.get("write_bytes", 0) - io0.get("write_bytes", 0)) if io0 and io1 else None
                bad = mismatches(ref, disk.target, usable)
                series["rollback"].add(
                    {"wall_s": wall, "bytes_written": rout.get("bytes_written"),
                     "written_fraction": rout.get("written_fraction"),
                     "kernel_write_bytes": rm.write_bytes, "daemon_write_bytes": daemon_written,
                     "peak_rss_bytes": rm.peak_rss_bytes, "cpu_s": rm.cpu_s},
                    {**rm.to_json(), "changed_bytes": changed, "changes": w, "identical": bad == 0,
                     "blocks_differing": bad,
                     "reported": {k: rout.get(k) for k in (
                         "mode", "method", "fallback_reason", "chunks_considered", "chunks_written",
                         "bytes_written", "bytes_read_disk", "zero_chunks_written", "written_fraction",
                         "seconds", "disk_size")}})
            except StepFailed as e:
                series["rollback"].fail(str(e))
            try:
                ctx.cold_for("baton", "restore", img)
                tm = b.restore(snap, str(repo), target, usable)
                twall = _synced(tm, target)
                bad = mismatches(ref, target, usable)
                tout = last_json(tm.stdout)
                series["restore"].add(
                    {"wall_s": twall, "bytes_written": tout.get("bytes_written"),
                     "kernel_write_bytes": tm.write_bytes,
                     "bytes_per_s": usable / twall if twall else None, "peak_rss_bytes": tm.peak_rss_bytes,
                     "cpu_s": tm.cpu_s},
                    {**tm.to_json(), "identical": bad == 0, "blocks_differing": bad,
                     "restored_size": os.path.getsize(target) if target.exists() else None,
                     "reported": tout})
            except (StepFailed, OSError) as e:
                series["restore"].fail(str(e))
            finally:
                target.unlink(missing_ok=True)
            if rep + 1 < ctx.reps:
                # The rollback keeps the record's last backup and marks; a backup now (same content as S)
                # makes the next repetition consider only its own changes, like this one.
                b.backup(NAME, str(repo))
        rows = {k: s.result() for k, s in series.items()}
        section["results"] = rows
        rb_wall, rs_wall = median_of(rows["rollback"], "wall_s"), median_of(rows["restore"], "wall_s")
        frac = median_of(rows["rollback"], "written_fraction")
        speedup = ratio(rs_wall, rb_wall)
        identical = [r.get("identical") for s in ("rollback", "restore") for r in rows[s].get("runs", [])]
        section["ratios"] = {
            "restore_wall_over_rollback_wall": speedup,
            "rollback_written_over_changed": ratio(median_of(rows["rollback"], "bytes_written"),
                                                   float(len(chunks) * CHUNK)),
        }
        section["verdict"] = {
            "written_fraction": frac,
            "written_fraction_met": None if frac is None else frac < TARGET_WRITTEN_FRACTION,
            "speedup": speedup,
            "speedup_met": None if speedup is None else speedup >= TARGET_SPEEDUP,
            "all_identical": bool(identical) and all(x is True for x in identical),
        }
        section["changed_bytes"] = stat([len(chunks) * CHUNK])
    except (StepFailed, OSError) as e:
        section.update(unavailable(f"rollback benchmark aborted: {e}"))
    finally:
        notes = b.cleanup(NAME) if disk.attached or disk.takeovers else []
        if notes:
            section["cleanup"] = notes
        target.unlink(missing_ok=True)
        img.unlink(missing_ok=True)
    return section
