"""Render Baton's Grafana dashboard over real metrics from a short demo run, with matplotlib.

This is NOT a Grafana screenshot (Grafana is not packaged in Debian 12). It is a rendering of the dashboard's own
panel queries, read from packaging/grafana/baton.json, evaluated by a real Prometheus server over metrics that
real `baton agent --metrics` processes exported during a real scenario, and drawn in a grid laid out like the
dashboard (gridPos, titles, units, thresholds of the stat panels).

The scenario, on a throw-away 256 MiB file-backed disk and a local repository (like `baton demo`), with two
"nodes" on this machine (node-a and node-b: separate BATON_RUN_DIR / BATON_DEV_DIR, one agent each, each
scraped by Prometheus as its own instance):

    node-a attaches the disk; writes; full backup; writes; incremental backup; writes, and its per-disk daemon
    is killed with kill -9 in the middle of them (the agent reports it failed); the dead attachment is cleaned
    up on node-a (what Pacemaker's stop does); node-b attaches it (takeover, epoch + 1); writes; backup; writes;
    backup; then node-b detaches.

Prometheus (the `prometheus` binary, 127.0.0.1 only, a temporary config and data directory, scrape interval
1 s, loading packaging/prometheus/baton-rules.yml) is stopped by PID at the end. The dashboard's template
variables $instance and $name are set to "All" (their allValue, ".*"). Time-series and stat panels use
query_range over the run (step 1 s; a stat shows the last value, as Grafana's default "last non-null" does),
the table uses its instant queries at the end of the run. Dotted vertical lines mark the scenario's events;
they are not part of the dashboard (it has no annotations).

    .venv/bin/python scripts/render-dashboard.py               # as root -> docs/img/dashboard-demo.png (~70 s)
    .venv/bin/python scripts/render-dashboard.py --out /tmp/d.png --keep --save-data /tmp/d.json
    .venv/bin/python scripts/render-dashboard.py --from-data /tmp/d.json --out /tmp/d.png   # redraw only

Needs root (FUSE and loop devices, like `baton demo`) and prometheus (Debian: apt-get install prometheus).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "packaging" / "grafana" / "baton.json"
RULES = ROOT / "packaging" / "prometheus" / "baton-rules.yml"
NODES = ("node-a", "node-b")
CHUNK = 64 * 1024

WRITER = r"""
import mmap, os, random, sys, time
dev, seed, rate, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
buf = mmap.mmap(-1, 65536)
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
n = size // 65536
t0 = time.monotonic()
i = 0
while True:
    buf[:] = rng.randbytes(65536)
    try:
        os.pwrite(fd, buf, rng.randrange(n) * 65536)
    except OSError as e:
        print(f"writer: write {i} failed: {e.strerror}", file=sys.stderr)
        sys.exit(3)
    i += 1
    delay = t0 + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
"""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Run:
    """The scenario's processes and files; everything it starts is stopped by PID in close()."""

    def __init__(self, work: Path, size: int) -> None:
        self.work = work
        self.size = size
        self.img = work / "shared-disk.img"
        self.repo = work / "repo"
        self.name = "demo"  # per node RUN_DIR, so it cannot collide with other attachments
        self.procs: list[subprocess.Popen[bytes]] = []
        self.attached: set[str] = set()
        self.events: list[tuple[float, str]] = []
        self.ports = {n: free_port() for n in NODES}
        self.data_size = size

    def env(self, node: str) -> dict[str, str]:
        return dict(os.environ, BATON_RUN_DIR=str(self.work / f"run-{node}"),
                    BATON_DEV_DIR=str(self.work / f"dev-{node}"))

    def baton(self, node: str | None, *args: str) -> dict[str, Any]:
        env = self.env(node) if node else dict(os.environ)
        r = subprocess.run([sys.executable, "-m", "baton", *args, "--json"], capture_output=True, text=True,
                           env=env, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"`baton {' '.join(args)}` on {node} failed (exit {r.returncode}): "
                               f"{r.stderr.strip()[-400:]}")
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as lf:
            p = subprocess.Popen(argv, env=env, stdout=lf, stderr=lf, start_new_session=True)
        self.procs.append(p)
        return p

    def mark(self, label: str) -> None:
        self.events.append((time.time(), label))
        say(label)

    def writer(self, node: str, rate: float, seconds: float, kill_daemon_after: float | None = None) -> None:
        dev = str(self.work / f"dev-{node}" / self.name)
        w = self.start([sys.executable, "-c", WRITER, dev, str(random.randrange(1 << 30)), str(rate),
                        str(self.data_size)], os.environ.copy(), self.work / "writer.log")
        if kill_daemon_after is not None:
            time.sleep(kill_daemon_after)
            pid = json.loads((self.work / f"run-{node}" / self.name / "daemon.json").read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            self.mark(f"kill -9 of {node}'s daemon")
            seconds -= kill_daemon_after
        try:
            w.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            w.terminate()
            w.wait(timeout=10)

    def backup(self, node: str) -> None:
        res = self.baton(node, "backup", self.name, "--repo", str(self.repo))
        self.mark(f"{node}: {res['mode']} backup")

    def attach(self, node: str) -> None:
        res = self.baton(node, "attach", str(self.img), "--node", node, "--name", self.name)
        self.attached.add(node)
        self.mark(f"{node} attaches (epoch {res.get('epoch', '?')})")

    def detach(self, node: str, label: str) -> None:
        self.baton(node, "detach", self.name)
        self.attached.discard(node)
        self.mark(label)

    def close(self) -> None:
        for node in list(self.attached):
            subprocess.run([sys.executable, "-m", "baton", "detach", self.name], env=self.env(node),
                           capture_output=True, timeout=120)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)


def prometheus_config(run: Run, port: int) -> str:
    jobs = "\n".join(
        f"      - targets: ['127.0.0.1:{run.ports[n]}']\n        labels: {{instance: '{n}'}}" for n in NODES)
    return (f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - '{RULES}'\n"
            f"scrape_configs:\n  - job_name: baton\n    static_configs:\n{jobs}\n")


def scenario(run: Run) -> None:
    with open(run.img, "wb") as f:
        f.truncate(run.size)
    init = run.baton(None, "init", str(run.img), "--chunk-size", "64K")
    run.data_size = int(init["data_size"])  # the record sits at the tail: writes stay below it
    run.baton(None, "repo", "init", str(run.repo))
    time.sleep(3)
    run.attach("node-a")
    run.writer("node-a", 60, 8)
    run.backup("node-a")
    run.writer("node-a", 120, 8)
    run.backup("node-a")
    run.writer("node-a", 120, 9, kill_daemon_after=5)
    time.sleep(5)  # the agent on node-a reports the dead daemon (baton_daemon_failed{failure="died"})
    run.detach("node-a", "node-a: dead attachment cleaned up")
    run.attach("node-b")
    run.writer("node-b", 80, 8)
    run.backup("node-b")
    run.writer("node-b", 150, 8)
    run.backup("node-b")
    run.writer("node-b", 40, 6)
    time.sleep(4)


# ---- evaluating the panels -----------------------------------------------------------------------------------

def substitute(expr: str) -> str:
    return expr.replace("$instance", ".*").replace("$name", ".*")


def legend(fmt: str, metric: dict[str, str], expr: str) -> str:
    if not fmt:
        return "{" + ",".join(f'{k}="{v}"' for k, v in metric.items()) + "}" if metric else expr[:40]
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    res = http_json(f"{base}/api/v1/query_range?{q}")
    if res.get("status") != "success":
        raise RuntimeError(f"query_range {expr!r}: {res}")
    return list(res["data"]["result"])


def query(base: str, expr: str, at: float) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": expr, "time": at})
    res = http_json(f"{base}/api/v1/query?{q}")
    if res.get("status") != "success":
        raise RuntimeError(f"query {expr!r}: {res}")
    return list(res["data"]["result"])


def evaluate(dash: dict[str, Any], base: str, start: float, end: float) -> dict[int, list[dict[str, Any]]]:
    """Per panel id: one entry per target with its substituted expression and result."""
    out: dict[int, list[dict[str, Any]]] = {}
    for p in dash["panels"]:
        rows = []
        for t in p.get("targets", []):
            expr = substitute(t["expr"])
            if t.get("instant"):
                rows.append({"target": t, "expr": expr, "instant": query(base, expr, end)})
            else:
                rows.append({"target": t, "expr": expr, "range": query_range(base, expr, start, end, 1.0)})
        out[p["id"]] = rows
    return out


# ---- drawing ---------------------------------------------------------------------------------------------------

def fmt_unit(unit: str | None) -> Callable[[float], str]:
    def s(v: float) -> str:
        a = abs(v)
        if a < 60:
            return f"{v:.0f} s" if a >= 10 or v == 0 else f"{v:.1f} s"
        if a < 3600:
            return f"{v / 60:.1f} min"
        if a < 86400:
            return f"{v / 3600:.1f} hour"
        return f"{v / 86400:.1f} day"

    def b(v: float) -> str:
        for u in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(v) < 1024 or u == "TiB":
                return f"{v:.0f} {u}" if u == "B" else f"{v:.1f} {u}"
            v /= 1024
        return f"{v:.1f} TiB"

    def ops(v: float) -> str:
        return f"{v:.1f} ops/s" if abs(v) < 100 else f"{v:.0f} ops/s"

    def plain(v: float) -> str:
        return f"{v:g}" if v == int(v) else f"{v:.2f}"

    return {"s": s, "bytes": b, "ops": ops}.get(unit or "", plain)


COLORS = {"green": "#37872d", "orange": "#e0752d", "red": "#c4162a", "text": "#1f60c4"}
SERIES = ["#1f77b4", "#e6550d", "#2ca02c", "#9467bd", "#d62728", "#8c564b", "#17becf", "#bcbd22"]


def threshold_color(panel: dict[str, Any], v: float) -> str:
    steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps")
    if not steps:
        return COLORS["text"]
    color = steps[0]["color"]
    for st in steps[1:]:
        if st["value"] is not None and v >= st["value"]:
            color = st["color"]
    return str(COLORS.get(color, color))


def draw(dash: dict[str, Any], data: dict[int, list[dict[str, Any]]], events: list[tuple[float, str]],
         start: float, end: float, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    notes: list[str] = []
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dash["panels"])
    width_in, height_in = 20.0, rows * 0.7 + 1.6
    fig = plt.figure(figsize=(width_in, height_in), dpi=100, facecolor="#f4f5f5")
    top, bottom, left, right = 0.6 / height_in, 1.0 / height_in, 0.005, 0.995  # figure fractions
    cw, ch = (right - left) / 24, (1 - top - bottom) / rows

    def rect(g: dict[str, int], plot: bool) -> tuple[float, float, float, float]:
        """The dashboard's gridPos as a figure rectangle, leaving room for the title (and axis labels)."""
        pad_l = (0.75 if plot else 0.1) / width_in
        pad_b = (0.32 if plot else 0.1) / height_in
        pad_t = 0.42 / height_in
        x0 = left + g["x"] * cw + pad_l
        y0 = 1 - top - (g["y"] + g["h"]) * ch + pad_b
        return (x0, y0, left + (g["x"] + g["w"]) * cw - 0.006 - x0, (g["h"] * ch) - pad_b - pad_t)

    t0 = datetime.fromtimestamp(start, UTC)
    t1 = datetime.fromtimestamp(end, UTC)
    fig.suptitle(f"{dash['title']} dashboard (packaging/grafana/baton.json): its panel queries over a real demo run, "
                 f"{t0:%Y-%m-%d %H:%M:%S}-{t1:%H:%M:%S} UTC, Node = All, Disk = All. Rendered by "
                 f"scripts/render-dashboard.py with matplotlib, not by Grafana; dotted lines: scenario events.",
                 fontsize=11, x=0.01, ha="left", y=1 - 0.15 / height_in, va="top")
    for p in dash["panels"]:
        g = p["gridPos"]
        ax = fig.add_axes(rect(g, p["type"] == "timeseries"))
        ax.set_facecolor("white")
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        f = fmt_unit(unit)
        ax.set_title(p["title"], loc="left", fontsize=11, fontweight="bold", pad=10)
        targets = data[p["id"]]
        if p["type"] == "stat":
            series = targets[0]["range"]
            ax.set_xticks([])
            ax.set_yticks([])
            if not series:
                ax.text(0.5, 0.5, "No data", ha="center", va="center", fontsize=20, color="#777",
                        transform=ax.transAxes)
                notes.append(f"panel {p['id']} '{p['title']}': no data")
                continue
            vals = series[0]["values"]
            ts = [float(t) for t, _ in vals]
            ys = [float(v) for _, v in vals]
            last = ys[-1]
            color = threshold_color(p, last)
            ax2 = ax.inset_axes((0, 0, 1, 0.45))
            ax2.fill_between(ts, ys, color=color, alpha=0.18, linewidth=0)
            ax2.plot(ts, ys, color=color, linewidth=1)
            ax2.set_xlim(start, end)
            ax2.set_ylim(min(0.0, min(ys)), max(ys) * 1.1 if max(ys) > 0 else 1)
            ax2.axis("off")
            ax.text(0.5, 0.62, f(last), ha="center", va="center", fontsize=26, fontweight="bold", color=color,
                    transform=ax.transAxes)
        elif p["type"] == "timeseries":
            step = p.get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("lineInterpolation")
            k = 0
            for t in targets:
                for s in t["range"]:
                    xs = [float(a) for a, _ in s["values"]]
                    ys = [float(v) for _, v in s["values"]]
                    lab = legend(t["target"].get("legendFormat", ""), s["metric"], t["expr"])
                    kw: dict[str, Any] = {"color": SERIES[k % len(SERIES)], "linewidth": 1.6, "label": lab}
                    if t["target"]["refId"] == "B":
                        kw["linestyle"] = "--"
                    # Prometheus leaves gaps where a series is absent; draw them as gaps, as Grafana does.
                    segs: list[tuple[list[Any], list[float]]] = [([], [])]
                    prev = None
                    for x, y, a in zip(xs, ys, (float(a) for a, _ in s["values"]), strict=True):
                        if prev is not None and a - prev > 1.5:
                            segs.append(([], []))
                        segs[-1][0].append(x)
                        segs[-1][1].append(y)
                        prev = a
                    for i, (sx, sy) in enumerate(segs):
                        if i:
                            kw.pop("label", None)
                        if step == "stepAfter":
                            ax.step(sx, sy, where="post", **kw)
                        else:
                            ax.plot(sx, sy, **kw)
                    k += 1
            if k == 0:
                ax.text(0.5, 0.5, "No data", ha="center", va="center", fontsize=16, color="#777",
                        transform=ax.transAxes)
                notes.append(f"panel {p['id']} '{p['title']}': no data")
            ax.set_xlim(start, end)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{datetime.fromtimestamp(v, UTC):%H:%M:%S}"))
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=8, steps=[1, 2, 5, 10]))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, f=f: f(v)))
            if p["id"] == 11:
                ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            if unit == "bytes":  # ticks at round binary sizes, as Grafana's "bytes (IEC)" does
                ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=7, steps=[1, 2, 4, 8, 10]))
                lo, hi = ax.get_ylim()
                mib = 1 << 20
                nice = [mib * m for m in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100, 128, 256)]
                base = next((n for n in nice if (hi - lo) / n <= 8), nice[-1])
                ax.yaxis.set_major_locator(matplotlib.ticker.MultipleLocator(base))
            ax.grid(True, color="#e3e3e3")
            ax.tick_params(labelsize=8)
            for i, (ets, _label) in enumerate(events, 1):
                ax.axvline(ets, color="#999", linestyle=":", linewidth=1)
                ax.annotate(str(i), (ets, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 1),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7, color="#555")
            if k:
                ax.legend(fontsize=8, loc="upper left", framealpha=0.85)
        elif p["type"] == "table":
            draw_table(ax, p, targets, notes)
    items = [f"{i}  {datetime.fromtimestamp(ts, UTC):%H:%M:%S}  {label}"
             for i, (ts, label) in enumerate(events, 1)]
    lines = ["   ·   ".join(items[j:j + 5]) for j in range(0, len(items), 5)]
    fig.text(0.01, 0.004, "Scenario events (the numbered dotted lines): " + "\n".join(lines), fontsize=9,
             color="#333", ha="left", va="bottom", linespacing=1.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)
    return notes


def draw_table(ax: Any, p: dict[str, Any], targets: list[dict[str, Any]], notes: list[str]) -> None:
    ax.axis("off")
    rename = {}
    for tr in p.get("transformations", []):
        if tr["id"] == "organize":
            rename = tr["options"].get("renameByName", {})
    keys = ("name", "disk_uuid", "instance")
    merged: dict[tuple[str, ...], dict[str, str]] = {}
    cols: list[str] = []
    for t in targets:
        col = rename.get(f"Value #{t['target']['refId']}", t["target"]["refId"])
        cols.append(col)
        for s in t["instant"]:
            key = tuple(s["metric"].get(k, "") for k in keys)
            merged.setdefault(key, {})[col] = fmt_unit(None)(float(s["value"][1]))
    if not merged:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", fontsize=16, color="#777", transform=ax.transAxes)
        notes.append(f"panel {p['id']} '{p['title']}': no data")
        return
    header = [*keys, *cols]
    body = [[k[0], (k[1][:8] + "…") if len(k[1]) > 9 else k[1], k[2], *(v.get(c, "") for c in cols)]
            for k, v in sorted(merged.items())]
    tab = ax.table(cellText=body, colLabels=header, loc="upper center", cellLoc="left", colLoc="left")
    tab.auto_set_font_size(False)
    tab.set_fontsize(10)
    tab.scale(1, 1.6)
    for (r, _c), cell in tab.get_celld().items():
        cell.set_edgecolor("#dddddd")
        if r == 0:
            cell.set_facecolor("#eef0f2")
            cell.set_text_props(fontweight="bold")
    ax.text(0, 0.02, "instant queries at the end of the run (disk_uuid shortened)", fontsize=8, color="#777",
            transform=ax.transAxes)


# ---- main ------------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard-demo.png")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, Prometheus data)")
    ap.add_argument("--save-data", type=Path, help="also write the query results and events as JSON")
    ap.add_argument("--from-data", type=Path, help="only draw, from a file written by --save-data")
    args = ap.parse_args()
    dash = json.loads(DASHBOARD.read_text())
    if args.from_data:
        saved = json.loads(args.from_data.read_text())
        data = {int(k): v for k, v in saved["data"].items()}
        draw(dash, data, [tuple(e) for e in saved["events"]], saved["start"], saved["end"], args.out)
        say(f"wrote {args.out}")
        return 0
    if os.geteuid() != 0:
        print("render-dashboard: needs root (FUSE and loop devices, like `baton demo`): run it as root",
              file=sys.stderr)
        return 2
    prom_bin = shutil.which("prometheus")
    if not prom_bin:
        print("render-dashboard: no prometheus binary: apt-get install prometheus", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="baton-dashboard-", dir="/var/tmp"))
    run = Run(work, 256 << 20)
    prom_port = free_port()
    base = f"http://127.0.0.1:{prom_port}"
    say(f"work directory {work}")
    try:
        for n in NODES:
            (work / f"run-{n}").mkdir()
            run.start([sys.executable, "-m", "baton", "agent", "--log-format", "json", "--metrics",
                       f"127.0.0.1:{run.ports[n]}"], run.env(n), work / f"agent-{n}.log")
        (work / "prometheus.yml").write_text(prometheus_config(run, prom_port))
        run.start([prom_bin, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                   f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1d"],
                  os.environ.copy(), work / "prometheus.log")
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"prometheus did not become ready; see {work / 'prometheus.log'}")
            time.sleep(0.3)
        start = time.time()
        scenario(run)
        end = time.time()
        targets = http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
        for t in targets:
            say(f"target {t['labels'].get('instance')}: health {t['health']} {t.get('lastError') or ''}")
        rules = http_json(f"{base}/api/v1/rules")["data"]["groups"]
        say(f"rule groups loaded by Prometheus: {[g['name'] for g in rules]}")
        data = evaluate(dash, base, math.floor(start), math.ceil(end))
        if args.save_data:
            args.save_data.write_text(json.dumps({"data": data, "events": run.events, "start": math.floor(start),
                                                  "end": math.ceil(end)}))
        notes = draw(dash, data, run.events, math.floor(start), math.ceil(end), args.out)
        for p in dash["panels"]:
            for t in data[p["id"]]:
                res = t["range"] if "range" in t else t["instant"]
                say(f"panel {p['id']:>2} {p['title'][:38]:<38} {t['target']['refId']}: {len(res)} series")
        for n in notes:
            say(n)
        say(f"wrote {args.out}")
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
        print(f"render-dashboard: {e} (logs in {work}; run again with --keep to keep them)", file=sys.stderr)
        return 1
    finally:
        run.close()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
