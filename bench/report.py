"""Rendering: the markdown summary, the PNG plots (matplotlib, Agg) and docs/performance.md's figures block.

Everything here reads the results dict only; missing or unavailable rows render as "n/a" with their reason
listed, never as an exception.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.common import JSON, fmt_size, median_of

BEGIN = "<!-- BEGIN bench figures (written by `python -m bench`; edit the text around it, not inside) -->"
END = "<!-- END bench figures -->"

LABELS = {
    "baton_incremental": "Baton incremental",
    "baton_full": "Baton --full",
    "restic": "restic",
    "borg": "borg (fixed 64 KiB)",
    "physical_bound": "physical bound",
}


def _num(v: float | None, fmt: str = "{:.3g}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _spread(row: JSON, key: str, fmt: str = "{:.3g}") -> str:
    """``median [min-max]`` of a statistic, or n/a."""
    if not row.get("available", True):
        return "n/a"
    s = row.get(key)
    if not isinstance(s, dict) or "median" not in s:
        return "n/a"
    if "min" in s and s.get("n", 1) > 1:
        return f"{fmt.format(s['median'])} [{fmt.format(s['min'])}-{fmt.format(s['max'])}]"
    return fmt.format(s["median"])


def _size(row: JSON, key: str) -> str:
    v = median_of(row, key)
    return "n/a" if v is None else fmt_size(v)


def _mbps(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 1e6:.0f} MB/s"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


# --- markdown ---------------------------------------------------------------------------------------------


def markdown(results: JSON, img_dir: Path, base: Path, *, title: bool = True) -> str:
    """The summary. Image links are relative to ``base`` (the directory the markdown will live in)."""
    m = results.get("machine", {})
    tools = results.get("tools", {})
    lines: list[str] = []
    if title:
        lines += ["# Baton benchmark results", ""]
    lines += [
        f"- Command: `{results.get('command')}` ({'smoke sizes' if results.get('smoke') else 'full sizes'}); "
        f"started {results.get('started_utc')}, finished {results.get('finished_utc')}.",
        f"- Machine: {m.get('cores')} cores ({m.get('cpu_model')}), {fmt_size(m.get('memory_bytes', 0))} RAM, "
        f"kernel {m.get('kernel')}, scratch on {m.get('scratch_fs')}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start', []))}, at end "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_end', []))} (the machine is shared: high load means "
        f"noisier figures).",
        "- Tools: " + "; ".join(f"{k}: {v or 'not installed / not available'}" for k, v in tools.items()) + ".",
        f"- Repetitions: {results.get('reps')}; figures are median [min-max]. Cold cache "
        f"(syncfs, fadvise DONTNEED on the image, `echo 3 > /proc/sys/vm/drop_caches`, tool warm-up) before "
        f"every timed backup, restore and verify: {results.get('cold_cache', {}).get('drops', 0)} drops, "
        f"{results.get('cold_cache', {}).get('failures', 0)} failures"
        f"{' (smoke: fadvise only)' if results.get('cold_cache', {}).get('light') else ''}.",
        "",
    ]
    secs = results.get("sections", {})
    plots = results.get("plots", {})

    def img(name: str, alt: str) -> None:
        if name in plots:
            rel = os.path.relpath(img_dir / f"{name}.png", base)
            lines.extend([f"![{alt}]({rel})", ""])

    unavailable: list[str] = []

    def note(where: str, row: JSON) -> None:
        if isinstance(row, dict) and row.get("available") is False:
            unavailable.append(f"- {where}: {str(row.get('error', '')).splitlines()[0][:300]}")

    if "incremental" in secs:
        s = secs["incremental"]
        lines += [f"## 1. Incremental after failover ({fmt_size(s.get('size_bytes', 0))} disk, 64 KiB chunks)", ""]
        note("incremental", s)
        sr = s.get("seq_read", {}).get("bytes_per_s", {})
        lines += [f"Cold sequential read rate of the image: {_mbps(sr.get('median'))}. "
                  f"Takeovers by kill -9 during the run: {s.get('takeovers', 0)}.", ""]
        if s.get("baton_error"):
            lines += [f"Baton rows unavailable: {s['baton_error'].splitlines()[0][:300]}", ""]
        lines += ["| change | changed | contender | wall s | bytes read | stored | peak RSS |",
                  "|---|---|---|---|---|---|---|"]
        for cell in s.get("cells", []):
            ch = fmt_size(cell["changed_bytes"].get("median", 0))
            for key, row in cell["contenders"].items():
                note(f"incremental {cell['rate_pct']} % {LABELS.get(key, key)}", row)
                lines.append(f"| {cell['rate_pct']} % | {ch} | {LABELS.get(key, key)} | {_spread(row, 'wall_s')} | "
                             f"{_size(row, 'bytes_read')} | {_size(row, 'bytes_stored')} | "
                             f"{_size(row, 'peak_rss_bytes')} |")
        lines += ["", "| change | restic ÷ Baton inc | borg ÷ Baton inc | Baton inc ÷ bound | Baton read ÷ changed "
                  "(kernel / reported) | restic ÷ Baton full | borg ÷ Baton full |", "|---|---|---|---|---|---|---|"]
        for cell in s.get("cells", []):
            r = cell["ratios"]
            rep = [x["reported"]["bytes_read"] for x in cell["contenders"]["baton_incremental"].get("runs", [])
                   if isinstance(x.get("reported", {}).get("bytes_read"), int)]
            rep_ratio = (sorted(rep)[len(rep) // 2] / cell["changed_bytes"]["median"]) if rep else None
            lines.append(f"| {cell['rate_pct']} % | {_x(r['restic_wall_over_baton_incremental'])} | "
                         f"{_x(r['borg_wall_over_baton_incremental'])} | "
                         f"{_x(r['baton_incremental_over_physical_bound'])} | "
                         f"{_x(r['baton_incremental_bytes_read_over_changed'])} / {_x(rep_ratio)} | "
                         f"{_x(r['restic_wall_over_baton_full'])} | {_x(r['borg_wall_over_baton_full'])} |")
        lines.append("")
        img("incremental", "backup wall time against change rate")

    if "tracking" in secs:
        s = secs["tracking"]
        lines += [f"## 2. Tracking cost (fio; region {fmt_size(s.get('region_bytes', 0))}, "
                  f"{s.get('runtime_s')} s per steady-state run)", ""]
        note("tracking", s)
        if s.get("rerun"):
            lines += [f"This section comes from a separate run: `{s['rerun']['command']}` "
                      f"({s['rerun']['started_utc']}; {s['rerun']['why']}).", ""]
        lines += ["| config | first-touch 4K QD16 IOPS | 4K randwrite QD16 IOPS | 4K randread QD16 IOPS | "
                  "1M seq write |", "|---|---|---|---|---|"]
        for cfg, row in s.get("results", {}).items():
            note(f"tracking {cfg}", row)
            if not row.get("available"):
                lines.append(f"| {cfg} | n/a | n/a | n/a | n/a |")
                continue
            w = s.get("workloads", [])
            cols = [_spread(row.get(j, {}), "iops", "{:.0f}") for j in w[:3]]
            seq = row.get(w[3], {}) if len(w) > 3 else {}
            lines.append(f"| {cfg} | {' | '.join(cols)} | {_mbps(median_of(seq, 'bytes_per_s'))} |")
        spk = s.get("syncs_per_1000_first_touch_writes", {})
        lines += ["", f"Metadata syncs per 1000 first-touch writes at QD16: {_num(spk.get('median'))}"
                  f" (runs: {', '.join(str(r.get('syncs_per_1000_writes')) + ' ' + r['config'] for r in s.get('metadata_syncs', []))}).", ""]
        rat = s.get("ratios", {})
        pairs = [("fuse on/off", "fuse_tracking_over_no_tracking"), ("nbd on/off", "nbd_tracking_over_no_tracking"),
                 ("fuse on/raw", "fuse-tracking_over_raw_loop"), ("fuse off/raw", "fuse-no-tracking_over_raw_loop"),
                 ("nbd on/raw", "nbd-tracking_over_raw_loop"), ("nbd off/raw", "nbd-no-tracking_over_raw_loop")]
        if any(v is not None for v in rat.values()):
            lines += ["IOPS ratios (for the 1 MiB sequential write: bandwidth ratios):", "",
                      "| workload | " + " | ".join(p[0] for p in pairs) + " |", "|---" * (len(pairs) + 1) + "|"]
            for j in s.get("workloads", []):
                lines.append(f"| {j} | " + " | ".join(_x(rat.get(f"{p[1]}.{j}")) for p in pairs) + " |")
            lines.append("")
        img("tracking", "IOPS per frontend and configuration")

    if "full" in secs:
        s = secs["full"]
        lines += [f"## 3. Full backup, restore, verify ({fmt_size(s.get('size_bytes', 0))} image)", ""]
        note("full", s)
        tw = s.get("target_seq_write", {}).get("bytes_per_s")
        lines += [f"Restore target's sequential write rate (O_DIRECT + fsync): {_mbps(tw)}.", "",
                  "| tool | backup s | stored | backup peak RSS | restore s (incl. sync) | restore rate | "
                  "verify s | restored identical |", "|---|---|---|---|---|---|---|---|"]
        for t, steps in s.get("results", {}).items():
            for st, row in steps.items():
                note(f"full {t} {st}", row)
            bk, rs, vf = steps.get("backup", {}), steps.get("restore", {}), steps.get("verify", {})
            ident = [r.get("identical") for r in rs.get("runs", []) if "identical" in r]
            lines.append(f"| {t} | {_spread(bk, 'wall_s')} | {_size(bk, 'bytes_stored')} | "
                         f"{_size(bk, 'peak_rss_bytes')} | {_spread(rs, 'wall_s')} | "
                         f"{_mbps(median_of(rs, 'bytes_per_s'))} | {_spread(vf, 'wall_s')} | "
                         f"{ident[0] if ident else 'n/a'} |")
        rat = {k: v for k, v in s.get("ratios", {}).items() if v is not None}
        if rat:
            lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {_x(v)} |" for k, v in rat.items()]
        lines.append("")
        img("full", "full backup, restore and verify times")

    if "scale" in secs:
        s = secs["scale"]
        lines += ["## 4. Scale (sparse images)", ""]
        note("scale", s)
        lines += ["| disk | bitmap | attach s | daemon RSS | incremental plan s | plan source | metadata bytes |",
                  "|---|---|---|---|---|---|---|"]
        for row in s.get("rows", []):
            note(f"scale {fmt_size(row.get('size_bytes', 0))}", row)
            inc = (row.get("incrementals") or [{}])[0]
            att = row.get("attach", {})
            lines.append(f"| {fmt_size(row.get('size_bytes', 0))} | {fmt_size(row.get('bitmap_bytes', 0))} | "
                         f"{_spread(att, 'wall_s')} | {_size(att, 'daemon_rss_bytes')} | "
                         f"{_num(inc.get('plan_s'))} | {inc.get('plan_source', 'n/a')} | "
                         f"{_num(inc.get('metadata_bytes'), '{:.0f}')} |")
        mv = s.get("metadata_vs_changed", [])
        if mv:
            lines += ["", "| disk | changed | repository growth | of which metadata |", "|---|---|---|---|"]
            lines += [f"| {fmt_size(r['size_bytes'])} | {fmt_size(r['changed_bytes'])} | "
                      f"{fmt_size(r['repo_growth_bytes'])} | {_num(r.get('metadata_bytes'), '{:.0f}')} B |" for r in mv]
        lines.append("")
        img("scale", "attach and planning time against disk size")

    if "rollback" in secs:
        s = secs["rollback"]
        lines += [f"## 5. Rollback against full restore ({fmt_size(s.get('size_bytes', 0))} disk, "
                  f"{s.get('rate_pct', 1.0)} % of the chunks changed)", ""]
        note("rollback", s)
        lines += ["| command | wall s (incl. syncfs) | bytes written (reported) | kernel write bytes "
                  "(command / daemon) | peak RSS | identical to the snapshot |", "|---|---|---|---|---|---|"]
        res = s.get("results", {})
        for key, label in (("rollback", "`baton rollback DISK SNAP`"), ("restore", "`baton restore SNAP --to FILE`")):
            row = res.get(key, {})
            note(f"rollback {key}", row)
            ident = [r.get("identical") for r in row.get("runs", []) if "identical" in r]
            lines.append(f"| {label} | {_spread(row, 'wall_s')} | {_size(row, 'bytes_written')} | "
                         f"{_size(row, 'kernel_write_bytes')} / {_size(row, 'daemon_write_bytes')} | "
                         f"{_size(row, 'peak_rss_bytes')} | "
                         f"{'n/a' if not ident else all(x is True for x in ident)} |")
        v = s.get("verdict", {})
        if v:
            frac = v.get("written_fraction")

            def met(x: object) -> str:
                return "n/a" if x is None else ("met" if x else "MISSED")

            lines += ["", f"Written by the rollback: {_num(None if frac is None else 100 * frac)} % of the disk "
                      f"(target < 2 %: {met(v.get('written_fraction_met'))}); restore ÷ rollback wall time: "
                      f"{_x(v.get('speedup'))} (target ≥ 10x: {met(v.get('speedup_met'))})."]
        lines.append("")

    if "memory" in secs:
        from bench.memory import markdown as memory_markdown

        lines += memory_markdown(secs["memory"])

    if "guest" in secs:
        from bench.guest import markdown as guest_markdown

        lines += guest_markdown(secs["guest"])

    if unavailable:
        lines += ["## Unavailable rows", "", *unavailable, ""]
    return "\n".join(lines)


# --- plots ------------------------------------------------------------------------------------------------


def plots(results: JSON, img_dir: Path) -> dict[str, str]:
    """Write the PNGs that have data; returns {plot name: file name}. Missing matplotlib -> no plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    img_dir.mkdir(parents=True, exist_ok=True)
    secs = results.get("sections", {})
    out: dict[str, str] = {}
    sub = f"{results.get('machine', {}).get('cores')} cores, {results.get('started_utc', '')[:10]}"

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(img_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        out[name] = f"{name}.png"

    inc = secs.get("incremental", {})
    if inc.get("cells"):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        any_line = False
        for key in LABELS:
            xs, ys, lo, hi = [], [], [], []
            for cell in inc["cells"]:
                row = cell["contenders"].get(key, {})
                v = median_of(row, "wall_s")
                if v is None:
                    continue
                st = row["wall_s"]
                xs.append(cell["rate_pct"])
                ys.append(v)
                lo.append(v - st.get("min", v))
                hi.append(st.get("max", v) - v)
            if xs:
                any_line = True
                style = "--" if key == "physical_bound" else "-"
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o" + style, capsize=3, label=LABELS[key])
        if any_line:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("chunks changed (%) across A→B→C kill -9 takeovers")
            ax.set_ylabel("backup wall time (s), cold cache")
            ax.set_title(f"Incremental after failover, {fmt_size(inc.get('size_bytes', 0))} disk ({sub})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            save(fig, "incremental")
        else:
            plt.close(fig)

    trk = secs.get("tracking", {})
    res = trk.get("results", {})
    if res:
        import numpy as np

        configs = [c for c, r in res.items() if r.get("available")]
        w = trk.get("workloads", [])
        if configs and len(w) >= 4:
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [3, 1]})
            x = np.arange(3)
            width = 0.8 / len(configs)
            for i, c in enumerate(configs):
                vals = [median_of(res[c].get(j, {}), "iops") or 0.0 for j in w[:3]]
                ax1.bar(x + i * width, vals, width, label=c)
                seq = median_of(res[c].get(w[3], {}), "bytes_per_s") or 0.0
                ax2.bar(i, seq / 1e6, 0.8, label=c)
            ax1.set_xticks(x + width * (len(configs) - 1) / 2, [j.replace("-qd16", "") for j in w[:3]])
            ax1.set_ylabel("IOPS (median)")
            ax1.set_title(f"4 KiB at QD16 ({sub})")
            ax1.legend(fontsize=8)
            ax2.set_xticks(range(len(configs)), configs, rotation=60, ha="right", fontsize=8)
            ax2.set_ylabel("MB/s")
            ax2.set_title("1 MiB sequential write")
            save(fig, "tracking")

    fl = secs.get("full", {})
    fres = fl.get("results", {})
    if fres:
        tools = [t for t in fres if any(fres[t][s].get("available") for s in fres[t])]
        if tools:
            fig, ax = plt.subplots(figsize=(7, 4))
            steps = ["backup", "restore", "verify"]
            width = 0.8 / len(tools)
            for i, t in enumerate(tools):
                vals = [median_of(fres[t].get(s, {}), "wall_s") or 0.0 for s in steps]
                ax.bar([k + i * width for k in range(3)], vals, width, label=t)
            ax.set_xticks([k + width * (len(tools) - 1) / 2 for k in range(3)], steps)
            ax.set_ylabel("wall time (s), cold cache")
            ax.set_title(f"Full backup / restore / verify, {fmt_size(fl.get('size_bytes', 0))} ({sub})")
            ax.legend()
            save(fig, "full")

    sc = secs.get("scale", {})
    att, plan = sc.get("attach_s_by_size", {}), sc.get("plan_s_by_size", {})
    if att or plan:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, series in (("attach", att), ("incremental plan (or whole backup)", plan)):
            pts = sorted((int(k), v) for k, v in series.items() if v is not None)
            if pts:
                ax.plot([p[0] / 2**30 for p in pts], [p[1] for p in pts], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("disk size (GiB, sparse)")
        ax.set_ylabel("seconds")
        ax.set_title(f"Scale ({sub})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, "scale")
    return out


# --- docs/performance.md --------------------------------------------------------------------------------


def update_performance_doc(doc: Path, results: JSON, _summary: str) -> bool:
    """Replace the figures block between the BEGIN/END markers of ``doc`` with the latest summary (links
    relative to docs/). Returns False (and changes nothing) when the doc or its markers are missing."""
    try:
        text = doc.read_text()
    except OSError:
        return False
    if BEGIN not in text or END not in text:
        return False
    body = markdown(results, doc.parent / "img", doc.parent, title=False).replace("\n## ", "\n### ")
    if body.startswith("## "):
        body = "#" + body
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n\n{body}\n{END}{tail}")
    return True
