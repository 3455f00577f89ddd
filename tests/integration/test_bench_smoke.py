"""The benchmark command keeps working: ``python -m bench --smoke`` at tiny sizes writes complete results.

No speed is asserted. The checks are structural: every benchmark section is present and carries measured
numbers, every row is either available with numbers or unavailable with a reason, the run recorded the
machine, tool versions and commands, and the markdown summary and plots were written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import need_root, need_tool

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("incremental", "tracking", "full", "scale", "rollback", "memory")


def numbers(node: Any) -> int:
    """How many numeric leaves (not booleans) a JSON tree holds."""
    if isinstance(node, bool):
        return 0
    if isinstance(node, int | float):
        return 1
    if isinstance(node, dict):
        return sum(numbers(v) for v in node.values())
    if isinstance(node, list):
        return sum(numbers(v) for v in node)
    return 0


def rows(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every dict carrying an ``available`` flag, with where it sits."""
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        if "available" in node:
            found.append((path, node))
        for k, v in node.items():
            found += rows(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += rows(v, f"{path}[{i}]")
    return found


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bench_smoke_writes_complete_results(tmp_path: Path) -> None:
    need_root()
    need_tool("fio", "restic", "borg", "losetup")
    out = tmp_path / "results"
    log = tmp_path / "bench.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=270)
        except subprocess.TimeoutExpired:
            # SIGTERM first: the benchmark then detaches its disks and releases its loop devices.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"bench --smoke did not finish in 270 s:\n{log.read_text()[-3000:]}")
    assert rc == 0, log.read_text()[-3000:]

    data = json.loads((out / "latest.json").read_text())
    assert data["smoke"] is True
    assert data["command"].startswith("python -m bench --smoke")
    assert data["machine"]["cores"] >= 1 and data["machine"]["memory_bytes"] > 0 and data["machine"]["kernel"]
    assert set(data["tools"]) >= {"baton", "restic", "borg", "fio"}
    assert data["cold_cache"]["failures"] == 0, data["cold_cache"]

    for name in SECTIONS:
        section = data["sections"][name]
        assert numbers(section) > 0, f"section {name} has no numbers: {section}"
        for where, row in rows(section, name):
            if row["available"]:
                continue
            assert isinstance(row.get("error"), str) and row["error"], f"{where} unavailable without a reason"

    # The peers and the raw device need no Baton command, so their rows must hold real measurements.
    inc = data["sections"]["incremental"]
    assert [c["rate_pct"] for c in inc["cells"]] == [0.1, 1.0, 10.0, 50.0]
    for cell in inc["cells"]:
        for peer in ("restic", "borg"):
            row = cell["contenders"][peer]
            assert row["available"], row
            assert row["wall_s"]["median"] > 0 and row["bytes_read"]["median"] > 0
            assert "command" in row["runs"][0]
        assert cell["contenders"]["physical_bound"]["wall_s"]["median"] > 0
        # Baton --full goes into a repository of its own, so it stores the round's new data as the incremental
        # does (into the incremental's repository it would find every new chunk stored and only hash).
        inc_row, full_row = cell["contenders"]["baton_incremental"], cell["contenders"]["baton_full"]
        if inc_row["available"] and full_row["available"]:
            for i, f in zip(inc_row["runs"], full_row["runs"], strict=True):
                assert f["reported"]["mode"] == "full" and i["reported"]["mode"] == "incremental", (i, f)
                assert f["reported"]["bytes_stored"] >= 0.9 * i["reported"]["bytes_stored"] > 0, (i, f)
    raw = data["sections"]["tracking"]["results"]["raw-loop"]
    assert raw["available"], raw
    assert raw["randwrite-4k-qd16"]["iops"]["median"] > 0
    assert raw["randwrite-4k-qd16"]["runs"][0]["command"].startswith("fio ")
    full = data["sections"]["full"]["results"]
    for peer in ("restic", "borg"):
        assert full[peer]["restore"]["runs"][0]["identical"] is True, full[peer]["restore"]

    # Memory: the backup after the failover is incremental and reads just the changed chunks; both processes'
    # peaks are measured.
    mem = data["sections"]["memory"]
    assert mem["available"], mem
    assert mem["incremental"]["mode"] == "incremental", mem["incremental"]
    assert mem["incremental"]["chunks_read"] == mem["changes"]["chunks"]
    assert mem["incremental"]["together_bytes"] > mem["incremental"]["client_peak_rss_bytes"] > 0

    md = (out / "latest.md").read_text()
    for heading in ("## 1. Incremental after failover", "## 2. Tracking cost", "## 3. Full backup",
                    "## 4. Scale", "## 7. Memory"):
        assert heading in md
    assert (out / "img" / "incremental.png").stat().st_size > 0
    assert (out / "img" / "tracking.png").stat().st_size > 0
    dated = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(dated) == 1
