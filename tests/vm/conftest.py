"""The VM tier: tests that run Baton inside QEMU guests with device-mapper (see tests/vm/README.md).

Every test here is marked ``vm``. The session fixture ``vm_image`` finds QEMU and the guest image (building it
into the cache the first time, see vm/image.py); when either can't be had, every test that uses it is skipped
with the reason, which is also printed on stderr and in the session summary. ``BATON_VM_REQUIRED=1`` turns
that skip into a failure (for a CI that must run the tier).

When a test fails, the console and command transcript of every guest it started are added to its report.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vm import harness
from vm.image import Image, ImageError, ensure_image

HERE = Path(__file__).resolve().parent
_SKIP: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vm: runs in QEMU guests with device-mapper, dm-era and dm-snapshot "
                                       "(qemu-system-x86, a Debian kernel image: tests/vm/README.md)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vm)


def _unavailable() -> tuple[str | None, Image | None]:
    if shutil.which(harness.QEMU) is None:
        return f"{harness.QEMU} is not installed (scripts/setup.sh test installs qemu-system-x86)", None
    for tool in ("mkfs.ext4", "dmsetup", "era_invalidate"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh test installs it; guests run the host's)", None
    try:
        return None, ensure_image()
    except ImageError as e:
        return f"no guest image: {e}", None


@pytest.fixture(scope="session")
def vm_image() -> Image:
    """The guest image; skips (with the reason printed) when QEMU or the image can't be had."""
    reason, image = _unavailable()
    if image is None:
        msg = f"VM tier skipped: {reason}"
        if os.environ.get("BATON_VM_REQUIRED") == "1":
            pytest.fail(f"{msg} (BATON_VM_REQUIRED=1)")
        if not _SKIP:
            _SKIP.append(msg)
            print(f"tests/vm: {msg}", file=sys.__stderr__, flush=True)
        pytest.skip(msg)
    return image


@pytest.fixture(autouse=True)
def _vm_report(request: pytest.FixtureRequest) -> Iterator[None]:
    """Remember which clusters this test made, so a failure can show their consoles (and those of open
    clusters of wider-scoped fixtures)."""
    request.node._vm_before = len(harness.LIVE)
    yield
    harness.LIVE[:] = [c for c in harness.LIVE if not c.closed]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("setup", "call") and rep.failed and hasattr(item, "_vm_before"):
        for c in [c for c in harness.LIVE[:item._vm_before] if not c.closed] + harness.LIVE[item._vm_before:]:
            rep.sections.append((f"VM guests ({c.dir})", c.report()))


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    for line in _SKIP:
        terminalreporter.write_line(f"tests/vm: {line}", yellow=True)
