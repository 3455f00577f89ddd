"""The packaging tier: build the Debian package and install it on a clean Debian 12 root (debootstrap).

Needs root, debootstrap, dpkg-deb, unshare and nsenter (scripts/setup.sh test installs them); otherwise each test
is skipped with the reason. The first run bootstraps the base root and caches it under /var/cache/baton-tests.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "packaging: builds the .deb and installs it on a clean Debian 12 root "
                                       "(root, debootstrap, network to a Debian mirror)")
