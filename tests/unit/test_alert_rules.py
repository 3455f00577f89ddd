"""The Prometheus alert rules and the Grafana dashboard (packaging/): promtool checks the rules and runs their
unit tests (packaging/prometheus/tests/*.yml, among them "a timer silently stops backing up"), and every Baton
metric they name is one the agent really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from baton.agent.metrics import DiskSample, render

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "packaging" / "prometheus"
RULES = PROM / "baton-rules.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "baton.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("needs promtool (Debian package prometheus; installed by scripts/setup.sh test)")
    return path


def test_promtool_check_rules() -> None:
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_rule_unit_tests() -> None:
    tests = sorted((PROM / "tests").glob("*.yml"))
    assert tests, "no rule unit tests"
    assert any("a timer silently stops backing up" in t.read_text() for t in tests)
    r = subprocess.run([promtool(), "test", "rules", *map(str, tests)], capture_output=True, text=True,
                       timeout=120, cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr


def exported_metrics() -> set[str]:
    """Every sample name the agent renders, for samples that make every family appear."""
    now = 1_800_000_000.0
    running = {"name": "data", "state": "running", "disk_uuid": "u", "dirty_bytes": 1, "epoch": 2, "writes": 3,
               "metadata_syncs": 4, "first_touch": 5, "suspect": False,
               "last_backup": {"result": "ok", "end": now - 60}, "last_backup_here": None}
    text = render([DiskSample("data", "u", running), DiskSample("dead", "v", None, failure="died")], now).decode()
    return {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln and not ln.startswith("#")}


def names_in(text: str) -> set[str]:
    return set(re.findall(r"\bbaton_[a-z_]+", text)) - {"baton_rules"}


def test_rules_and_dashboard_name_only_exported_metrics() -> None:
    exported = exported_metrics()
    assert {"baton_daemon_failed", "baton_record_suspect", "baton_last_backup_timestamp_seconds"} <= exported
    used = names_in(RULES.read_text())
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used |= names_in("\n".join(exprs))
    assert used, "no metric names found"
    assert used <= exported, f"not exported by the agent: {sorted(used - exported)}"


def test_each_alert_of_the_brief_exists() -> None:
    text = RULES.read_text()
    for alert in ("BatonBackupTooOld", "BatonBackupFailed", "BatonDaemonFailed", "BatonDirtyGrowingWithoutBackup",
                  "BatonRecordSuspect"):
        assert f"alert: {alert}" in text
