"""The seam between the per-disk daemon and the ways a tracked disk is served: the :class:`Frontend` ABC.

A frontend serves one tracker (:class:`baton.tracker.TrackerLike`, the write path) to clients: as a block
device (FUSE file + loop device), as an NBD export, or as a device-mapper stack whose writes the kernel tracks
(dm-era: the tracker's record is where the frontend folds them, and its point-in-time hook is how a backup
freezes them). The daemon holds a
``Frontend`` and nothing more specific: it never asks which kind it has, never reads a frontend's private
attributes, and never looks inside an error message. A new frontend is one module that implements this class,
one line in the registry (:func:`baton.frontends.get`), and a pass of the conformance suite
(:mod:`baton.testing.frontend_suite`).

Contract, common to every frontend:

* **Record before ack.** A write (and a discard, a write-zeroes) is acknowledged only after ``tracker.write``
  (``discard``, ``write_zeroes``) returned; a flush and a FUA write reach ``tracker.flush`` or ``fua=True``.
  The dm frontend is the exception that keeps the rule: its writes never reach this process, dm-era commits a
  chunk's bit to its metadata before the write is issued, and the frontend folds that metadata into the record.
* **Errors.** An exception from the tracker fails that one request with EIO. :class:`baton.errors.Fenced` also
  shuts the whole frontend down: every later request fails with EIO without reaching the tracker, the device
  or socket goes away, :meth:`Frontend.wait` returns, and :attr:`Frontend.failure` says ``FENCED``.
* **Lifecycle.** :meth:`start` (returns the :class:`Endpoint` once clients can use it; on failure nothing is
  left behind), :attr:`ready`, :meth:`wait` (returns once the frontend stopped, asked to or by itself),
  :meth:`stop`. One instance serves one start/stop cycle; every method is thread-safe.
* **Statistics.** :meth:`statistics` returns plain integer counters (requests, bytes, errors, ...).
* **Leftovers.** :meth:`cleanup_stale` removes what a killed process serving NAME left behind (a dead mount,
  a loop device, a socket), and refuses while any of it is still in use.
"""

from __future__ import annotations

import abc
import enum
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from baton.errors import BatonError, Fenced
from baton.tracker import TrackerLike


class FailureKind(enum.Enum):
    """Why a frontend stopped serving by itself. The daemon acts on the kind, never on a message."""

    FENCED = "fenced"  # the tracker found a newer owner epoch on disk: stop, never write the record again
    HUNG = "hung"  # a request was stuck in the tracker longer than the frontend allows (its watchdog fired)
    DIED = "died"  # the frontend's own serving machinery ended: its kernel session was unmounted or aborted
    #                from outside, its server loop failed


@dataclass(frozen=True)
class FrontendFailure:
    """A frontend's typed failure: ``kind`` decides what happens, ``message`` is for people, ``cause`` is the
    exception behind it (the :class:`Fenced` for ``FENCED``) when there is one."""

    kind: FailureKind
    message: str
    cause: BaseException | None = None

    def __str__(self) -> str:
        return self.message

    def error(self) -> BatonError:
        """The error the daemon ends with (its exit status comes from ``baton.errors.exit_code``): the
        ``Fenced`` for a fence, a plain BatonError naming the failure otherwise."""
        if isinstance(self.cause, Fenced):
            return self.cause
        if self.kind is FailureKind.FENCED:
            return Fenced(self.message)
        return BatonError(f"the frontend stopped: {self.message}")


@dataclass(frozen=True)
class Endpoint:
    """What a started frontend exposes to clients: a block device path, a unix socket, a TCP address."""

    device: str | None = None  # /dev/baton/NAME (a block device: mkfs, mount)
    socket: str | None = None  # RUN_DIR/NAME.sock (NBD over a unix socket)
    tcp: str | None = None  # HOST:PORT actually bound (NBD over TCP, only when asked)

    def __str__(self) -> str:
        return self.device or self.socket or self.tcp or "-"


@dataclass(frozen=True)
class FrontendConfig:
    """Where and how a frontend serves attachment NAME. ``tcp`` only means something to a frontend that can
    listen on TCP (NBD); the others ignore it."""

    name: str
    run_dir: Path  # RUN_DIR: the frontend keeps its private files under RUN_DIR/NAME/
    dev_dir: Path  # BATON_DEV_DIR: a block-device frontend publishes DEV_DIR/NAME
    tcp: tuple[str, int] | None = None
    disk: str = ""  # the data disk's path (the dm frontend builds its device-mapper stack on it)
    cow_size: int | None = None  # bytes of a backup's exception store (dm); None: the frontend's default
    # Seconds to wait after the takeover before loading the previous owner's era metadata (dm): a previous dm
    # owner on another node that is alive (no STONITH) fences itself within its heartbeat, and must have
    # switched its metadata device to error before a second era target loads that metadata.
    fence_wait: float = 0.0


class Frontend(abc.ABC):
    """Serves one tracker to clients. See the module docstring for the contract."""

    kind: ClassVar[str]  # the registry's name for it: "fuse", "nbd", "dm"
    # Whether this frontend folds dm-era metadata into the record itself (dm). The daemon settles a record
    # left with FLAG_ERA_PENDING by a dm owner before any other frontend serves it.
    folds_era: ClassVar[bool] = False

    @classmethod
    @abc.abstractmethod
    def create(cls, tracker: TrackerLike, config: FrontendConfig) -> Frontend:
        """A frontend for ``tracker`` as attachment ``config.name``, not started yet."""

    @classmethod
    def cleanup_stale(cls, config: FrontendConfig) -> list[str]:
        """Remove what a dead process that served ``config.name`` with this frontend left behind; return what
        was done. Raises DeviceBusy (and keeps everything) while any of it is still in use. Default: nothing
        to clean up."""
        return []

    @abc.abstractmethod
    def start(self) -> Endpoint:
        """Start serving; return once clients can use the endpoint. On failure (DeviceBusy: the name is taken
        by a live process; DeviceError: the kernel side cannot be set up) nothing is left behind."""

    @property
    @abc.abstractmethod
    def endpoint(self) -> Endpoint | None:
        """What :meth:`start` returned; None before it."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True while the frontend serves (started, and neither stopped nor failed)."""

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> bool:
        """Block until the frontend stopped (by :meth:`stop` or by itself), at most ``timeout`` seconds;
        True if it did."""

    @property
    @abc.abstractmethod
    def failure(self) -> FrontendFailure | None:
        """Why the frontend stopped by itself; None while it serves and after a stop that was asked for."""

    @abc.abstractmethod
    def stop(self, force: bool = False) -> None:
        """Stop serving and remove the endpoint; idempotent. Without ``force`` a frontend whose device is in
        use (mounted, held, open) refuses with DeviceBusy and changes nothing; with ``force`` the remaining
        users get EIO. A failing final flush of the tracker is raised after the teardown."""

    @abc.abstractmethod
    def statistics(self) -> dict[str, int]:
        """Counters over the frontend's life (requests, bytes, errors; per frontend, documented there)."""


class ServeLock:
    """An flock on RUN_DIR/NAME/lock, held by the process serving NAME for as long as it serves it (the FUSE and
    dm frontends share it: one lock file per attachment name, whichever frontend serves it).

    The kernel drops it when the process dies, however it dies, so it tells a live daemon from a dead one even
    across pid namespaces. The file is never deleted: deleting a lock file lets two processes lock two
    different inodes under one name. The descriptor is close-on-exec, so children never inherit the lock.
    """

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "lock"
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def try_acquire(self) -> bool:
        assert self.fd is not None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None
