"""Prometheus metrics of the disks attached on this node, gathered from the per-disk daemons on each scrape.

Nothing is cached between scrapes: every scrape asks each daemon for its status (the same answer as
``baton status NAME --json``) and renders it, so a value is never older than the scrape. Every series carries
the labels ``name`` (the attachment name) and ``disk_uuid`` (the record's disk identity, '' when unknown).

=====================================  =======  ==========================================================
metric                                 type     meaning
=====================================  =======  ==========================================================
baton_attached                         gauge    1 when the daemon answered and serves the disk, else 0
baton_dirty_bytes                      gauge    bytes the record marks changed since the last backup
baton_owner_epoch                      gauge    the owner epoch this node holds (the fencing token)
baton_writes_total                     counter  write requests through the tracker since the daemon started
baton_metadata_syncs_total             counter  durable record syncs (group commits) since the daemon started
baton_first_touch_total                counter  writes that had to mark a clean chunk first
baton_last_backup_timestamp_seconds    gauge    end of the last *successful* backup (any node; unix time)
baton_last_backup_age_seconds          gauge    now minus the above
baton_last_backup_success              gauge    1 if the last backup attempt known here succeeded, else 0
baton_daemon_failed                    gauge    1 for an attachment on this node that is not served, with
                                                label ``failure``: died, fenced, unreachable or frontend
baton_record_suspect                   gauge    1 when the record saw damage that may hide marks (the next
                                                backup is full), else 0
=====================================  =======  ==========================================================

Counters restart from zero with the daemon (a takeover, a restart); Prometheus' ``rate()`` handles that.
The last-backup series are absent for a disk that was never backed up. "The last attempt known here" is the
newer of the record's last committed backup (any node) and the last attempt made through this node's daemon,
so a failed backup on another node is not seen; alert on the age as well as on the success flag.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

LABELS = ["name", "disk_uuid"]


@dataclass(frozen=True)
class DiskSample:
    """What one scrape knows about one disk."""

    name: str
    disk_uuid: str = ""
    status: Mapping[str, Any] | None = None  # the daemon's live status; None when not attached or unreachable
    failure: str | None = None  # why an attachment on this node is not served (died, fenced, unreachable)


def last_backup(status: Mapping[str, Any]) -> tuple[float | None, int | None]:
    """(end of the last successful backup, 1/0 success of the last known attempt) from a daemon status.
    Either is None when unknown."""
    rec = status.get("last_backup") or {}
    here = status.get("last_backup_here") or {}
    ok_end: float | None = None
    if rec.get("end") and rec.get("result", "ok") == "ok":
        ok_end = float(rec["end"])
    if here.get("end") and here.get("result") == "ok" and (ok_end is None or float(here["end"]) > ok_end):
        ok_end = float(here["end"])
    last_end = float(rec["end"]) if rec.get("end") else None
    last_ok = rec.get("result", "ok") == "ok" if last_end is not None else None
    if here.get("end") and (last_end is None or float(here["end"]) >= last_end):
        last_ok = here.get("result") == "ok"
    return ok_end, (None if last_ok is None else int(last_ok))


def families(samples: Iterable[DiskSample], now: float) -> list[Metric]:
    """The metric families for ``samples`` at time ``now`` (pure: no I/O)."""
    g_att = GaugeMetricFamily("baton_attached", "1 when this node's daemon serves the disk, else 0", labels=LABELS)
    g_dirty = GaugeMetricFamily("baton_dirty_bytes", "Bytes marked changed since the last backup", labels=LABELS)
    g_epoch = GaugeMetricFamily("baton_owner_epoch", "Owner epoch held by this node (fencing token)", labels=LABELS)
    c_writes = CounterMetricFamily("baton_writes", "Write requests through the tracker", labels=LABELS)
    c_syncs = CounterMetricFamily("baton_metadata_syncs", "Durable record syncs (group commits)", labels=LABELS)
    c_first = CounterMetricFamily("baton_first_touch", "Writes that marked a clean chunk first", labels=LABELS)
    g_ts = GaugeMetricFamily("baton_last_backup_timestamp_seconds", "End of the last successful backup (unix time)",
                             labels=LABELS)
    g_age = GaugeMetricFamily("baton_last_backup_age_seconds", "Seconds since the last successful backup ended",
                              labels=LABELS)
    g_ok = GaugeMetricFamily("baton_last_backup_success", "1 if the last known backup attempt succeeded",
                             labels=LABELS)
    g_failed = GaugeMetricFamily("baton_daemon_failed", "1 for an attachment here that is not served (label "
                                 "failure: died, fenced, unreachable, frontend)", labels=[*LABELS, "failure"])
    g_suspect = GaugeMetricFamily("baton_record_suspect", "1 when the record may have lost marks (next backup "
                                  "is full)", labels=LABELS)
    for s in samples:
        st = s.status
        uuid = s.disk_uuid or (str(st.get("disk_uuid") or "") if st else "")
        labels = [s.name, uuid]
        running = st is not None and st.get("state", "running") == "running"
        g_att.add_metric(labels, 1.0 if running else 0.0)
        failure = s.failure or (str(st.get("failure") or "frontend") if st is not None and not running else None)
        if failure:
            g_failed.add_metric([*labels, failure], 1.0)
        if st is None:
            continue
        if st.get("suspect") is not None:
            g_suspect.add_metric(labels, 1.0 if st["suspect"] else 0.0)
        if st.get("dirty_bytes") is not None:
            g_dirty.add_metric(labels, float(st["dirty_bytes"]))
        if st.get("epoch") is not None:
            g_epoch.add_metric(labels, float(st["epoch"]))
        for fam, key in ((c_writes, "writes"), (c_syncs, "metadata_syncs"), (c_first, "first_touch")):
            if st.get(key) is not None:
                fam.add_metric(labels, float(st[key]))
        ok_end, ok = last_backup(st)
        if ok_end is not None:
            g_ts.add_metric(labels, ok_end)
            g_age.add_metric(labels, max(0.0, now - ok_end))
        if ok is not None:
            g_ok.add_metric(labels, float(ok))
    return [g_att, g_dirty, g_epoch, c_writes, c_syncs, c_first, g_ts, g_age, g_ok, g_failed, g_suspect]


class StatusCollector(Collector):
    """A prometheus_client collector that calls ``gather`` on every scrape. A failing ``gather`` makes the
    scrape fail (HTTP 500, counted in ``statistics()``): an empty answer would look like "no disks"."""

    def __init__(self, gather: Callable[[], list[DiskSample]], clock: Callable[[], float] = time.time) -> None:
        self.gather = gather
        self.clock = clock
        self.scrapes = 0
        self.scrape_errors = 0

    def collect(self) -> Iterable[Metric]:
        self.scrapes += 1
        try:
            samples = self.gather()
        except Exception:
            self.scrape_errors += 1
            raise
        return families(samples, self.clock())

    def describe(self) -> Iterable[Metric]:
        # No describe-time scrape: registering must not ask the daemons anything.
        return []

    def statistics(self) -> dict[str, int]:
        return {"scrapes": self.scrapes, "scrape_errors": self.scrape_errors}


def render(samples: list[DiskSample], now: float) -> bytes:
    """The text exposition of ``samples`` (what /metrics returns), for tests and one-shot use."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(lambda: samples, clock=lambda: now))
    return generate_latest(reg)


def registry_for(collector: StatusCollector) -> CollectorRegistry:
    """A registry holding only Baton's series (no process/platform collectors: the endpoint is about disks)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg
