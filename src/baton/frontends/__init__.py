"""Frontends: the ways a tracked disk is served, behind one interface (:class:`baton.frontends.base.Frontend`).

* ``fuse``: /dev/baton/NAME, a loop device over a one-file FUSE export (:mod:`baton.frontends.fuse`);
* ``nbd``: an NBD export on RUN_DIR/NAME.sock, or TCP when asked (:mod:`baton.frontends.nbd`).

:func:`get` is the registry: it maps a kind to its class, importing the module only then (the FUSE module
binds libfuse3 when used). A new frontend is one module that defines a ``Frontend`` subclass as ``FRONTEND``,
one entry in ``_MODULES``, and a pass of :mod:`baton.testing.frontend_suite`.

Layer: above the tracker, below the repository and the engines; frontends import only ``tracker`` and lower.
"""

from __future__ import annotations

import importlib

from baton.errors import UsageError
from baton.frontends.base import Endpoint, FailureKind, Frontend, FrontendConfig, FrontendFailure

__all__ = ["Endpoint", "FailureKind", "Frontend", "FrontendConfig", "FrontendFailure", "get", "kinds"]

_MODULES: dict[str, str] = {
    "fuse": "baton.frontends.fuse",
    "nbd": "baton.frontends.nbd",
}


def kinds() -> tuple[str, ...]:
    """The registered frontend kinds, the default ("fuse") first."""
    return tuple(_MODULES)


def get(kind: str) -> type[Frontend]:
    """The Frontend class registered as ``kind``; UsageError for an unknown kind."""
    module = _MODULES.get(kind)
    if module is None:
        raise UsageError(f"--frontend {kind!r}: expected one of {', '.join(kinds())}")
    cls: type[Frontend] = importlib.import_module(module).FRONTEND
    if cls.kind != kind:
        raise AssertionError(f"{module}.FRONTEND is registered as {kind!r} but says it is {cls.kind!r}")
    return cls
