"""The cluster harness itself, with a stock resource (ocf:heartbeat:Dummy): the cluster forms, fencing really
kills a live node, a killed owner is fenced and its resource fails over without failing back, and teardown
leaves nothing behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Cluster, missing_tools

pytestmark = [pytest.mark.cluster]


@pytest.mark.timeout(240)
def test_fencing_and_failover_with_dummy() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if missing_tools():
        pytest.skip(f"needs {', '.join(missing_tools())} (installed by scripts/setup.sh test)")
    c = Cluster(3)
    try:
        c.setup()
        c.start()
        c.wait_formed(60)
        c.enable_fencing()
        c.cib_create("resources", '<primitive id="d" class="ocf" provider="heartbeat" type="Dummy">'
                     '<operations><op id="d-mon" name="monitor" interval="2s"/></operations></primitive>')
        owner = c.wait_resource("d", 60)

        # Fencing on request really powers a live node off (the broker SIGKILLs its namespace init).
        victim = next(n for n in c.nodes if n != owner)
        c.exec(owner, "stonith_admin", "--reboot", victim, "--timeout", "30", timeout=60)
        assert not c.nodes[victim].alive(), f"{victim} survived fencing"
        assert any(t == victim for _, _, t in c.fence_log)
        c.start(victim)
        c.wait_formed(60)

        # The owner dies: the survivors fence it, then run the resource elsewhere.
        c.kill(owner, "owner")
        new = c.wait_resource("d", 60, not_on=[owner])
        assert sum(1 for _, _, t in c.fence_log if t == owner) >= 1, c.fence_log
        c.start(owner)
        c.wait_formed(60)
        assert c.state().resources["d"] == [new], "the resource failed back despite stickiness"
        stats = c.statistics()
        assert stats["node_kills"] >= 1 and stats["fence_requests"] >= 2, stats
    finally:
        c.teardown()
        print(c.format_timeline())
    assert not c.leftovers(), c.leftovers()
