"""Test tiers: unit and property tests run anywhere; integration, faults and cluster tests need root and
real tools, and are skipped with a stated reason when those are missing (CI installs them all)."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile(
    "ci", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


def need_tool(*names: str) -> None:
    for n in names:
        if shutil.which(n) is None:
            pytest.skip(f"needs {n} (installed by scripts/setup.sh test)")
