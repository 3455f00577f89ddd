"""Frontends: the ways a tracked disk is served, behind one interface (:class:`baton.frontends.base.Frontend`).

* ``fuse``: /dev/baton/NAME, a loop device over a one-file FUSE export (:mod:`baton.frontends.fuse`);
* ``nbd``: an NBD export on RUN_DIR/NAME.sock, or TCP when asked (:mod:`baton.frontends.nbd`);
* ``dm``: /dev/baton/NAME, a device-mapper stack whose writes dm-era tracks in the kernel
  (:mod:`baton.frontends.dm`).

:func:`get` is the registry: it maps a kind to its class, importing the module only then (the FUSE module
binds libfuse3 when used). A new frontend is one module that defines a ``Frontend`` subclass as ``FRONTEND``,
one entry in ``_MODULES``, and a pass of :mod:`baton.testing.frontend_suite`.

:func:`choose` turns what the user asked for (a kind, or ``auto``, the default) into a kind and the sentence
saying why, which ``status --json`` shows as ``frontend`` and ``frontend_reason``: ``auto`` is ``dm`` where
the kernel has device-mapper with dm-era and dm-snapshot, the disk is a block device or an image file, and the
record has an era region (format v3); otherwise ``fuse``.

Layer: above the tracker, below the repository and the engines; frontends import only ``tracker`` and lower.
"""

from __future__ import annotations

import importlib
import os
import stat
from typing import TYPE_CHECKING

from baton.errors import DeviceError, RecordError, UsageError
from baton.frontends.base import Endpoint, FailureKind, Frontend, FrontendConfig, FrontendFailure

if TYPE_CHECKING:  # the record code is imported where it is used: `baton backup NAME` never needs it
    from baton.record.core import Record

__all__ = ["AUTO", "Endpoint", "FailureKind", "Frontend", "FrontendConfig", "FrontendFailure", "choices", "choose",
           "get", "kinds"]

AUTO = "auto"  # the default of `baton attach --frontend`: dm where it can run, else fuse (see choose)

_MODULES: dict[str, str] = {
    "fuse": "baton.frontends.fuse",
    "nbd": "baton.frontends.nbd",
    "dm": "baton.frontends.dm",
}


def kinds() -> tuple[str, ...]:
    """The registered frontend kinds ("fuse" first: what ``auto`` falls back to)."""
    return tuple(_MODULES)


def choices() -> tuple[str, ...]:
    """What ``--frontend`` accepts: ``auto`` (the default), then every registered kind."""
    return (AUTO, *kinds())


def get(kind: str) -> type[Frontend]:
    """The Frontend class registered as ``kind``; UsageError for an unknown kind."""
    module = _MODULES.get(kind)
    if module is None:
        raise UsageError(f"--frontend {kind!r}: expected one of {', '.join(choices())}")
    cls: type[Frontend] = importlib.import_module(module).FRONTEND
    if cls.kind != kind:
        raise AssertionError(f"{module}.FRONTEND is registered as {kind!r} but says it is {cls.kind!r}")
    return cls


def _disk_kind_problem(disk: str) -> str:
    """'' when ``disk`` is a block device or an image file, else what it is."""
    try:
        mode = os.stat(disk).st_mode
    except OSError as e:
        return f"{disk} cannot be examined ({e.strerror})"
    if stat.S_ISBLK(mode) or stat.S_ISREG(mode):
        return ""
    return f"{disk} is neither a block device nor an image file"


def choose(requested: str, *, disk: str, record: Record) -> tuple[str, str]:
    """The frontend kind to serve ``disk`` with, and why: ``requested`` as given (``dm`` checked first: a clear
    DeviceError or RecordError saying why it cannot run here, and what to run), or for ``auto`` dm where it can
    run and fuse otherwise, the reason naming what was missing."""
    from baton.host.dm import dm_support
    from baton.record.core import era_unsupported_reason

    if requested not in choices():
        get(requested)  # UsageError naming the choices
    if requested not in (AUTO, "dm"):
        return requested, f"requested (--frontend {requested})"
    ok, why = dm_support()
    disk_problem = _disk_kind_problem(disk)
    record_problem = era_unsupported_reason(record) or ""
    if requested == "dm":
        if not ok:
            raise DeviceError(f"--frontend dm: {why}", hint="attach with --frontend fuse, or --frontend auto")
        if disk_problem:
            raise DeviceError(f"--frontend dm: {disk_problem}")
        if record_problem:
            raise RecordError(f"--frontend dm: {record_problem}")
        return "dm", f"requested (--frontend dm); this node has {why}"
    problem = (why if not ok else "") or disk_problem or record_problem
    if problem:
        return "fuse", f"auto: fuse, because {problem}"
    return "dm", f"auto: dm, because this node has {why}, {disk} is a block device or an image file, and its " \
                 "record has an era region"
