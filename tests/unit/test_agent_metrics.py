"""The agent's Prometheus rendering, from fake daemon statuses (no daemons, no HTTP)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.agent.metrics import DiskSample, StatusCollector, last_backup, render

NOW = 1_800_000_000.0


def samples_of(text: bytes) -> dict[tuple[str, str], float]:
    """{(sample name, attachment name): value} of an exposition."""
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, s.labels["name"])] = s.value
    return out


def status(**over: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "name": "data", "state": "running", "disk_uuid": "0b7c7f0e-1111-2222-3333-444455556666",
        "dirty_bytes": 3 * 65536, "epoch": 7, "writes": 1234, "metadata_syncs": 56, "first_touch": 78,
        "last_backup": {"snapshot": "ab" * 16, "seq": 3, "node": "n2", "mode": "incremental", "result": "ok",
                        "end": NOW - 600.0},
        "last_backup_here": None,
    }
    st.update(over)
    return st


def test_running_disk_renders_every_series_with_labels() -> None:
    text = render([DiskSample("data", "", status())], NOW)
    got = samples_of(text)
    assert got[("baton_attached", "data")] == 1
    assert got[("baton_dirty_bytes", "data")] == 3 * 65536
    assert got[("baton_owner_epoch", "data")] == 7
    assert got[("baton_writes_total", "data")] == 1234
    assert got[("baton_metadata_syncs_total", "data")] == 56
    assert got[("baton_first_touch_total", "data")] == 78
    assert got[("baton_last_backup_timestamp_seconds", "data")] == NOW - 600
    assert got[("baton_last_backup_age_seconds", "data")] == 600
    assert got[("baton_last_backup_success", "data")] == 1
    # disk_uuid comes from the status when the sample does not name one
    assert b'disk_uuid="0b7c7f0e-1111-2222-3333-444455556666"' in text
    assert b"# TYPE baton_writes_total counter" in text
    assert b"# TYPE baton_dirty_bytes gauge" in text


def test_not_attached_disk_reports_only_attached_zero() -> None:
    got = samples_of(render([DiskSample("idle", "u-1", None)], NOW))
    assert got == {("baton_attached", "idle"): 0}


def test_failed_frontend_is_not_attached() -> None:
    got = samples_of(render([DiskSample("data", "", status(state="failed"))], NOW))
    assert got[("baton_attached", "data")] == 0
    assert got[("baton_dirty_bytes", "data")] == 3 * 65536


def test_never_backed_up_has_no_backup_series() -> None:
    got = samples_of(render([DiskSample("data", "", status(last_backup=None))], NOW))
    assert not any(k[0].startswith("baton_last_backup") for k in got)
    assert got[("baton_attached", "data")] == 1


def test_failed_attempt_here_after_success_keeps_the_success_time() -> None:
    st = status(last_backup_here={"result": "failed", "error": "repo full", "end": NOW - 60})
    got = samples_of(render([DiskSample("data", "", st)], NOW))
    assert got[("baton_last_backup_success", "data")] == 0
    assert got[("baton_last_backup_timestamp_seconds", "data")] == NOW - 600
    assert got[("baton_last_backup_age_seconds", "data")] == 600


@pytest.mark.parametrize(("rec_end", "here", "want"), [
    (None, None, (None, None)),
    (100.0, None, (100.0, 1)),
    (100.0, {"result": "ok", "end": 200.0}, (200.0, 1)),
    (100.0, {"result": "failed", "end": 50.0}, (100.0, 1)),   # an older failure does not hide a newer success
    (None, {"result": "failed", "end": 50.0}, (None, 0)),
])
def test_last_backup_rules(rec_end: float | None, here: dict[str, Any] | None,
                           want: tuple[float | None, int | None]) -> None:
    rec = {"snapshot": "x", "result": "ok", "end": rec_end} if rec_end else None
    assert last_backup({"last_backup": rec, "last_backup_here": here}) == want


def test_several_disks_and_a_failing_gather() -> None:
    text = render([DiskSample("a", "u-a", status(epoch=1)), DiskSample("b", "u-b", status(epoch=2))], NOW)
    got = samples_of(text)
    assert got[("baton_owner_epoch", "a")] == 1 and got[("baton_owner_epoch", "b")] == 2

    def boom() -> list[DiskSample]:
        raise RuntimeError("daemon table unreadable")

    c = StatusCollector(boom)
    with pytest.raises(RuntimeError):
        list(c.collect())
    assert c.statistics() == {"scrapes": 1, "scrape_errors": 1}
