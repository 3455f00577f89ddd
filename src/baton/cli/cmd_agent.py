"""baton agent: the per-node daemon (control socket, metrics, structured logs, optional ownership watch)."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from typing import Any

import click

from baton import frontends
from baton.cli import emit

# Options that belong to the --watch before them, in the order they may follow it.
_WATCH_KEYS = ("watch", "node", "name", "frontend", "record", "probe_interval")


class _OrderedCommand(click.Command):
    """Remembers the order of the --watch group options (click keeps only per-option value lists)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not any(a in ctx.help_option_names for a in args):
            parser = self.make_parser(ctx)
            _, _, order = parser.parse_args(args=list(args))
            ctx.meta["baton.agent.order"] = [p.name for p in order if p.name in _WATCH_KEYS]
        return super().parse_args(ctx, args)


def _ordered(ctx: click.Context, values: dict[str, Sequence[Any]]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    used = dict.fromkeys(values, 0)
    for key in ctx.meta.get("baton.agent.order", []):
        out.append((key, values[key][used[key]]))
        used[key] += 1
    return out


@click.command("agent", cls=_OrderedCommand)
@click.option("--metrics", "metrics", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (off by default). HOST defaults to "
                   "127.0.0.1; a non-loopback HOST needs --metrics-allow-remote.")
@click.option("--metrics-allow-remote", is_flag=True,
              help="Allow --metrics on a non-loopback address (the endpoint has no authentication).")
@click.option("--watch", multiple=True, metavar="DISK",
              help="Watch DISK and attach it when its ownership arrives on this node (repeatable; the options "
                   "below follow the --watch they apply to).")
@click.option("--node", multiple=True,
              help="This node's cluster name, for the --watch before it (before any --watch: for all). "
                   "Default: env BATON_NODE.")
@click.option("--name", multiple=True, help="Attachment name for the --watch before it (default: DISK's name).")
@click.option("--frontend", multiple=True, type=click.Choice(frontends.choices()),
              help="Frontend for the --watch before it (default fuse; auto: dm where the kernel has it, else "
                   "fuse).")
@click.option("--record", multiple=True, metavar="SPEC",
              help="external:RECORD_DISK[#SLOT] for the --watch before it, if its record is on a record disk.")
@click.option("--probe-interval", multiple=True, type=float, metavar="SECONDS",
              help="Seconds between probe writes for the --watch before it (default 5).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Log lines on stderr: text, or one JSON object per line.")
@click.option("--status", "query", is_flag=True,
              help="Do not run an agent: ask the running one (RUN_DIR/agent.sock) for its status and print it.")
@click.option("--json", "as_json", is_flag=True, help="With --status: print JSON.")
@click.pass_context
def command(ctx: click.Context, metrics: str | None, metrics_allow_remote: bool, watch: tuple[str, ...],
            node: tuple[str, ...], name: tuple[str, ...], frontend: tuple[str, ...], record: tuple[str, ...],
            probe_interval: tuple[float, ...], log_format: str, query: bool, as_json: bool) -> None:
    """Run the per-node agent in the foreground until SIGTERM/SIGINT (systemd Type=simple).

    It answers RUN_DIR/agent.sock with the status of every attachment on this node, logs what happens to them
    on stderr, and with --metrics serves Prometheus metrics gathered from the per-disk daemons on each scrape
    (baton_dirty_bytes, baton_owner_epoch, baton_writes_total, baton_metadata_syncs_total,
    baton_first_touch_total, baton_last_backup_timestamp_seconds, baton_last_backup_age_seconds,
    baton_last_backup_success, baton_attached; labels name and disk_uuid).

    Watch mode (--watch DISK --node NODE, off by default) attaches DISK when its ownership arrives: a mount or
    udev event for it, or the periodic probe write to its record area starting to succeed. The probe proves
    only that this node can write the disk now. Storage that accepts writes from every node (an image file, a
    LUN without reservations) passes it everywhere. Use watch mode only where the storage itself enforces one
    writer (SCSI-3 reservations, DRBD), and never on a disk that Pacemaker's ocf:baton:disk also manages.

    Stopping the agent detaches nothing: the per-disk daemons keep serving.

    \b
    Examples:
      baton agent --metrics 127.0.0.1:9470 --log-format json
      baton agent --watch /dev/mapper/mpatha --node n1 --name data --probe-interval 5
      baton agent --status --json
    """
    if query:
        from baton.agent.control import request

        st = request({"op": "status"})
        emit(st, as_json, _human(st))
        return
    from baton.agent import logs
    from baton.agent.core import Agent, group_watches, parse_metrics_addr

    items = _ordered(ctx, {"watch": watch, "node": node, "name": name, "frontend": frontend, "record": record,
                           "probe_interval": probe_interval})
    # BATON_NODE is the default for every watch without its own --node (read here, not as click's envvar,
    # which click would drop as soon as one --node is on the command line).
    specs = group_watches(items, default_node=os.environ.get("BATON_NODE", ""))
    addr = parse_metrics_addr(metrics, allow_remote=metrics_allow_remote) if metrics else None
    logs.setup(log_format)
    agent = Agent(watches=specs, metrics=addr)

    def on_signal(signum: int, frame: Any) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()


def _human(st: dict[str, Any]) -> str:
    a = st.get("agent", {})
    lines = [f"agent pid {a.get('pid')}  up {a.get('uptime_s')} s  metrics {a.get('metrics') or 'off'}"]
    for wt in a.get("watches", []):
        probe = (wt.get("probe") or {}).get("outcome", "-")
        lines.append(f"watch {wt['disk']} as {wt['name']} (node {wt['node']}): probe {probe}, "
                     f"{'attached here' if wt.get('attached_here') else 'not attached here'}")
    for at in st.get("attachments", []):
        lines.append(f"{at.get('name')}: {at.get('state')}  epoch {at.get('epoch', '-')}  "
                     f"dirty {at.get('dirty_bytes', '-')} bytes  {at.get('device') or at.get('socket') or ''}")
    if not st.get("attachments"):
        lines.append("no attachments on this node")
    return "\n".join(lines)
