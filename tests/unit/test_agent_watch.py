"""Watch-mode decisions with injected probes and attach (no devices), the option grouping, the metrics address
rules, mount/udev event matching, and the log formats."""

from __future__ import annotations

import io
import json
import logging
import signal
from typing import Any

import pytest

from baton.agent import logs
from baton.agent.core import group_watches, parse_metrics_addr
from baton.agent.watcher import Watcher, WatchSpec
from baton.cluster import watch as w
from baton.errors import DeviceBusy, RecordNotFound, UsageError

TARGET = w.ProbeTarget(disk="/nonexistent/shared.img", path="/nonexistent/shared.img", offset=8192,
                       header_offsets=(0, 4096), disk_uuid="u-1", record_offset=0, placement="tail")


class Fake:
    """Scripted probe outcomes, a fake attachment table, and an attach that records its calls."""

    def __init__(self) -> None:
        self.outcome = w.OWNER
        self.attached: dict[str, Any] | None = None
        self.calls: list[dict[str, Any]] = []
        self.fail_with: Exception | None = None
        self.now = 1000.0

    def probe(self, t: w.ProbeTarget) -> w.ProbeResult:
        return w.ProbeResult(self.outcome, 0 if self.outcome == w.OWNER else 13)

    def find(self, disk: str, record: str | None) -> tuple[w.ProbeTarget | None, w.ProbeResult | None]:
        return TARGET, None

    def attachments(self) -> list[dict[str, Any]]:
        return [self.attached] if self.attached else []

    def attach(self, disk: str, **kw: Any) -> dict[str, Any]:
        self.calls.append({"disk": disk} | kw)
        if self.fail_with is not None:
            raise self.fail_with
        self.attached = {"name": kw["name"], "alive": True, "pid": 4242, "disk": disk, "node": kw["node"]}
        return {"name": kw["name"], "epoch": len(self.calls), "device": "/dev/baton/x", "pid": 4242}

    def watcher(self) -> Watcher:
        spec = WatchSpec(disk=TARGET.disk, node="n1", name="x", probe_interval=1.0)
        return Watcher(spec, attach_fn=self.attach, attachments_fn=self.attachments, find_fn=self.find,
                       probe_fn=self.probe, clock=lambda: self.now)


def test_first_success_attaches_then_idles_while_attached() -> None:
    f = Fake()
    wt = f.watcher()
    assert wt.step() == "arrival-attached"
    assert f.calls == [{"disk": TARGET.disk, "node": "n1", "name": "x", "frontend": "fuse", "record": None}]
    assert wt.step() == "attached-here"
    assert len(f.calls) == 1
    assert wt.statistics()["attaches"] == 1


def test_ended_attachment_is_not_grabbed_back_until_ownership_arrives_again() -> None:
    f = Fake()
    wt = f.watcher()
    wt.step()
    f.attached = None                       # detached, fenced or killed
    assert wt.step() == "probed"            # probe still succeeds (shared storage): no re-attach
    assert wt.step() == "probed"
    assert len(f.calls) == 1
    f.outcome = w.REFUSED                   # the disk goes away from this node...
    assert wt.step() == "probed"
    f.outcome = w.OWNER                     # ...and comes back: an arrival
    assert wt.step() == "arrival-attached"
    assert len(f.calls) == 2
    assert wt.statistics()["attachments_ended"] == 1


def test_an_event_rearms_the_watch() -> None:
    f = Fake()
    wt = f.watcher()
    wt.step()
    f.attached = None
    assert wt.step() == "probed"
    wt.kick("mount")
    assert wt.step() == "arrival-attached"


def test_event_never_attaches_without_a_successful_probe() -> None:
    f = Fake()
    f.outcome = w.REFUSED
    wt = f.watcher()
    wt.kick("udev", "add")
    assert wt.step() == "probed"
    assert f.calls == []


def test_udev_change_right_after_our_probe_is_its_echo() -> None:
    f = Fake()
    f.outcome = w.REFUSED
    wt = f.watcher()
    wt.step()
    f.now += 0.5
    wt.kick("udev", "change")
    assert wt.statistics()["events_ignored"] == 1
    f.now += 5
    wt.kick("udev", "change")
    assert wt.statistics()["events"] == 1


def test_failed_attach_backs_off_then_retries() -> None:
    f = Fake()
    f.fail_with = RecordNotFound("no record")
    wt = f.watcher()
    assert wt.step() == "arrival-failed"
    assert wt.step() == "waiting-backoff"         # 2 s backoff at a 1 s interval, clock not moved
    f.now += 2.5
    f.fail_with = None
    assert wt.step() == "arrival-attached"
    assert len(f.calls) == 2


def test_attach_busy_means_someone_attached_it_here() -> None:
    f = Fake()
    f.fail_with = DeviceBusy("already attached")
    wt = f.watcher()
    assert wt.step() == "attached-here"
    f.fail_with = None
    assert wt.step() == "probed"                  # disarmed: no second attach
    assert len(f.calls) == 1


def test_unknown_probe_relocates_the_record() -> None:
    f = Fake()
    found = []

    def find(disk: str, record: str | None) -> tuple[w.ProbeTarget | None, w.ProbeResult | None]:
        found.append(disk)
        return TARGET, None

    wt = f.watcher()
    wt._find = find
    f.outcome = w.UNKNOWN
    wt.step()
    wt.step()
    assert len(found) == 2 and f.calls == []


# -- option grouping -------------------------------------------------------------------------------------------


def test_group_watches_in_order() -> None:
    specs = group_watches([("node", "n9"), ("watch", "/dev/a"), ("name", "aa"), ("probe_interval", 2.0),
                           ("watch", "/dev/b"), ("node", "n2"), ("frontend", "nbd")])
    assert [(s.disk, s.node, s.name, s.frontend, s.probe_interval) for s in specs] == [
        ("/dev/a", "n9", "aa", "fuse", 2.0), ("/dev/b", "n2", "", "nbd", 5.0)]


def test_watch_accepts_every_attach_frontend_choice() -> None:
    """auto and dm, as `baton attach --frontend` takes them (the daemon resolves auto when it attaches)."""
    specs = group_watches([("watch", "/dev/a"), ("node", "n1"), ("frontend", "auto"),
                           ("watch", "/dev/b"), ("node", "n1"), ("frontend", "dm")])
    assert [s.frontend for s in specs] == ["auto", "dm"]
    with pytest.raises(UsageError):
        group_watches([("watch", "/dev/a"), ("node", "n1"), ("frontend", "iscsi")])


@pytest.mark.parametrize("items", [
    [("name", "x"), ("watch", "/dev/a"), ("node", "n")],          # option before any --watch
    [("watch", "/dev/a"), ("node", "n"), ("node", "m")],           # twice in one group
    [("watch", "/dev/a")],                                         # no node
    [("watch", "/dev/a"), ("node", "n"), ("watch", "/dev/a2"), ("node", "n"), ("name", "a")],  # name clash
    [("watch", "/dev/a"), ("node", "n"), ("probe_interval", 0.0)],
])
def test_group_watches_refuses(items: list[tuple[str, Any]]) -> None:
    with pytest.raises(UsageError):
        group_watches(items, default_node="")


def test_metrics_address_rules() -> None:
    assert parse_metrics_addr("127.0.0.1:9470") == ("127.0.0.1", 9470)
    assert parse_metrics_addr(":9471") == ("127.0.0.1", 9471)
    assert parse_metrics_addr("9472") == ("127.0.0.1", 9472)
    assert parse_metrics_addr("[::1]:9473") == ("::1", 9473)
    for bad in ("0.0.0.0:9470", "192.0.2.1:9470", "[2001:db8::1]:1"):
        with pytest.raises(UsageError):
            parse_metrics_addr(bad)
        assert parse_metrics_addr(bad, allow_remote=True)[1] in (9470, 1)
    for bad in ("127.0.0.1:http", "127.0.0.1:70000", "a:b:c"):
        with pytest.raises(UsageError):
            parse_metrics_addr(bad)


# -- events ----------------------------------------------------------------------------------------------------

MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
30 22 0:40 / /srv/shared rw,relatime shared:9 - nfs4 filer:/vol rw
31 22 8:16 / /mnt/raw rw,relatime - ext4 /dev/sdb rw
"""


def test_relevant_mounts_for_an_image_file_is_its_file_system() -> None:
    got = w.relevant_mounts("/srv/shared/vm/disk.img", MOUNTINFO)
    assert got == {MOUNTINFO.splitlines()[1]}
    # Before the shared file system is mounted, the root holds the path: the set differs, so a mount is an event.
    before = w.relevant_mounts("/srv/shared/vm/disk.img", MOUNTINFO.splitlines()[0] + "\n")
    assert before != got


def test_relevant_mounts_by_source_path() -> None:
    assert w.relevant_mounts("/dev/sdb", MOUNTINFO) == {MOUNTINFO.splitlines()[2]}


def test_udev_event_parsing_and_matching() -> None:
    ev = w.parse_udev_event("UDEV  [123.4] change   /devices/virtual/block/sdb (block)\nACTION=change\n"
                            "DEVNAME=/dev/sdb\nMAJOR=8\nMINOR=16\nDEVLINKS=/dev/disk/by-id/wwn-0x5000 /dev/mapper/m\n")
    assert ev["ACTION"] == "change" and ev["MAJOR"] == "8"
    assert w.udev_event_concerns(ev, "/dev/disk/by-id/wwn-0x5000")
    assert w.udev_event_concerns(ev, "/nonexistent/x", numbers=(8, 16))
    assert not w.udev_event_concerns(ev, "/nonexistent/x", numbers=(8, 32))
    assert not w.udev_event_concerns(ev, "/srv/shared/disk.img")


# -- logs ------------------------------------------------------------------------------------------------------


def test_json_and_text_log_lines() -> None:
    buf = io.StringIO()
    logs.setup("json", stream=buf)
    try:
        logging.getLogger("baton.agent").info("watch.attached", extra={"fields": {"name": "d", "epoch": 3}})
        line = json.loads(buf.getvalue().splitlines()[-1])
        assert line["event"] == "watch.attached" and line["name"] == "d" and line["epoch"] == 3
        assert line["level"] == "info" and line["ts"].endswith("Z")
        buf2 = io.StringIO()
        logs.setup("text", stream=buf2)
        logging.getLogger("baton.agent").warning("watch.device_gone", extra={"fields": {"detail": "no such file"}})
        assert buf2.getvalue().rstrip().endswith('WARNING watch.device_gone detail="no such file"')
    finally:
        root = logging.getLogger("baton")
        for h in list(root.handlers):
            root.removeHandler(h)
        root.propagate = True


def test_cli_keeps_watch_options_with_their_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    import baton.agent.core as core
    from baton.cli.cmd_agent import command

    got: dict[str, Any] = {}

    class FakeAgent:
        def __init__(self, *, watches: list[WatchSpec], metrics: tuple[str, int] | None) -> None:
            got.update(watches=watches, metrics=metrics)

        def run(self) -> int:
            return 0

        def stop(self) -> None:
            pass

    monkeypatch.setattr(core, "Agent", FakeAgent)
    monkeypatch.setenv("BATON_NODE", "n5")
    monkeypatch.setattr(logs, "setup", lambda fmt: None)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own handlers
    r = CliRunner().invoke(command, ["--watch", "/x/a.img", "--name", "A", "--watch", "/x/b.img", "--node", "n2",
                                     "--frontend", "nbd", "--probe-interval", "2", "--metrics", ":9999"])
    assert r.exit_code == 0, repr(r.exception)
    assert [(s.disk, s.node, s.name, s.frontend, s.probe_interval) for s in got["watches"]] == [
        ("/x/a.img", "n5", "A", "fuse", 5.0), ("/x/b.img", "n2", "", "nbd", 2.0)]
    assert got["metrics"] == ("127.0.0.1", 9999)
    r = CliRunner().invoke(command, ["--watch", "/x/a.img", "--name", "A", "--name", "B"])
    assert isinstance(r.exception, UsageError)
