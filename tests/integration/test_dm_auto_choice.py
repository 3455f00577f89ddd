"""`baton attach` with the default frontend (auto) on a node without device-mapper: the real CLI and daemon.

auto serves the disk with fuse and `status --json` says so and why (frontend, frontend_reason); `--frontend dm`
is refused with the reason and what to use instead, leaving nothing attached. The dm frontend itself runs in
QEMU guests (tests/vm/test_dm_frontend.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from baton.host import dm
from faults.procs import Env, need_fuse_loop, raw_disk

pytestmark = pytest.mark.integration


@pytest.mark.skipif(dm.dm_support()[0], reason="this node has device-mapper with dm-era: auto would pick dm")
def test_auto_serves_fuse_here_and_status_says_why(tmp_path: Path) -> None:
    need_fuse_loop()
    _, why = dm.dm_support()
    print(f"dm_support: {why}")
    env = Env(tmp_path, prefix="auto")
    disk = raw_disk(tmp_path, 32 << 20)
    env.baton("init", str(disk))
    name = env.name()
    try:
        refused = env.json("attach", str(disk), "--node", "n1", "--name", name, "--frontend", "dm", rc=3)
        assert refused["error"] == "DeviceError"
        assert refused["message"].startswith("--frontend dm: ") and why in refused["message"]
        assert "--frontend fuse" in refused["hint"]
        assert not (env.run_dir / name / "daemon.json").exists()

        res = env.json("attach", str(disk), "--node", "n1", "--name", name)  # the default: auto
        assert res["frontend"] == "fuse"
        assert res["frontend_reason"] == f"auto: fuse, because {why}"
        st = env.json("status", name)
        assert (st["frontend"], st["frontend_reason"]) == ("fuse", res["frontend_reason"])
        human = env.baton("status", name).stdout
        assert f"frontend fuse: auto: fuse, because {why}" in human
        env.json("detach", name)
    finally:
        env.cleanup()
