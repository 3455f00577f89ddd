"""Baton's one error tree. Every error is classified by what the caller should do about it.

::

    BatonError                      exit 1   something went wrong; the message says what to do
    ├── UsageError                  exit 2   the command line or an argument is wrong
    ├── DeviceError                 exit 3   the disk/device is wrong, missing, too small or in use
    │   ├── DeviceBusy              exit 3   mounted, attached or open elsewhere on this machine
    │   └── ReadOnlyDevice          exit 3   a write reached a read-only device (a mounted snapshot)
    ├── RecordError                 exit 4   the change record cannot be used as it is
    │   ├── RecordNotFound          exit 4   no Baton record on this disk (run `baton init`)
    │   ├── RecordCorrupt           exit 4   checksums/magic fail where a good copy is required
    │   ├── RecordVersionError      exit 4   written by a Baton version this one cannot read
    │   ├── WrongDisk               exit 4   the record (or slot) belongs to another disk
    │   └── RecordFull              exit 4   no free slot on a record disk
    ├── Fenced                      exit 5   a newer owner epoch is on disk: this node must stop writing
    ├── NotOwner                    exit 6   this node does not own the disk (`backup --if-owner` maps this to 0)
    │   └── NotAttached             exit 6   no attachment of that NAME on this node (no daemon state at all)
    ├── RepoError                   exit 7   the repository cannot be used
    │   ├── RepoNotFound            exit 7
    │   ├── RepoCorrupt             exit 7   a pack/index/snapshot fails its checks (names the object)
    │   ├── RepoLocked              exit 7   another operation holds the lock
    │   ├── RepoFull                exit 7   ENOSPC or quota on the store
    │   ├── KeyError_               exit 7   missing, wrong or insecure key file
    │   └── StorageError            exit 7   the store failed (network, permission); transient ones are retried
    │       ├── TransientStorageError
    │       └── ObjectNotFound      exit 7   the store has no object under that key
    ├── DaemonError                 exit 8   the per-disk daemon or agent is not reachable / died
    └── VerifyFailed                exit 9   verify found missing or corrupt data (the report names it)

Exit codes are mapped in exactly one place: :data:`EXIT_CODES`, read through :func:`exit_code` by ``baton.cli``
(and by the per-disk daemon for its own exit status). Besides it the CLI only knows 0 (success), 1 (an internal
error: a bug, printed without a traceback) and 130 (interrupted).

Below this tree sits the format layer's own: :mod:`baton.format.errors` (``FormatError`` -> ``Truncated``,
``BadMagic`` -> ``Blank``, ``BadVersion``, ``BadLength``, ``BadChecksum``, ``BadIdentity`` -> ``OtherDiskSize``,
``BadValue``), each carrying what / expected / found. Codecs raise those; the layer that read the bytes decides
what they mean (``baton.record``: RecordNotFound / RecordVersionError / WrongDisk / RecordCorrupt; repository
objects raise kinds that are also ``RepoCorrupt``). Errors are told apart by their type, never by their text.

Nothing here is swallowed: a layer either handles an error completely or lets it rise.
"""

from __future__ import annotations


class BatonError(Exception):
    """Base of every error Baton raises on purpose. ``str(err)`` is the user-facing message."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint

    def user_message(self) -> str:
        msg = str(self)
        return f"{msg}\n  hint: {self.hint}" if self.hint else msg


class UsageError(BatonError):
    """The command line or an argument is wrong."""


class DeviceError(BatonError):
    """The data disk, record disk or target is wrong, missing or too small."""


class DeviceBusy(DeviceError):
    """The device is mounted, attached or held open elsewhere on this machine."""


class ReadOnlyDevice(DeviceError):
    """A write reached a read-only device (a snapshot served by ``baton mount``)."""


class RecordError(BatonError):
    """The change record cannot be used as it is."""


class RecordNotFound(RecordError):
    """No Baton record was found where one was expected."""

    hint = "initialise the disk with `baton init DISK` first"


class RecordCorrupt(RecordError):
    """A record structure failed its checks and no good copy exists."""


class RecordVersionError(RecordError):
    """The record was written by a format version this Baton cannot read."""


class WrongDisk(RecordError):
    """The record (or record-disk slot) describes a different data disk."""


class RecordFull(RecordError):
    """A record disk has no free slot, or a record area is too small."""


class Fenced(BatonError):
    """A newer owner epoch is on disk. The holder must stop tracking and never write the record again."""

    def __init__(self, message: str, *, mine: int = 0, on_disk: int = 0, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.mine = mine
        self.on_disk = on_disk


class NotOwner(BatonError):
    """This node does not own the disk."""


class NotAttached(NotOwner):
    """No attachment of that NAME on this node: no daemon state, live or dead (`status NAME`, `backup NAME`)."""


class RepoError(BatonError):
    """The backup repository cannot be used."""


class RepoNotFound(RepoError):
    """No repository at that URL."""

    hint = "create one with `baton repo init URL`"


class RepoCorrupt(RepoError):
    """A repository object failed its checks."""


class RepoLocked(RepoError):
    """Another operation holds a conflicting repository lock."""


class RepoFull(RepoError):
    """The store is out of space or quota."""


class KeyError_(RepoError):
    """The key file is missing, wrong or readable by others."""


class StorageError(RepoError):
    """The object store failed."""


class TransientStorageError(StorageError):
    """A failure that may succeed when retried (timeouts, 5xx, throttling)."""


class ObjectNotFound(StorageError):
    """The store holds no object under the requested key (never retried)."""


class DaemonError(BatonError):
    """The per-disk daemon or the node agent is not reachable, or died."""


class VerifyFailed(BatonError):
    """Verification found missing or corrupt data."""


EXIT_CODES: dict[type[BatonError], int] = {
    UsageError: 2,
    DeviceError: 3,
    RecordError: 4,
    Fenced: 5,
    NotOwner: 6,
    RepoError: 7,
    DaemonError: 8,
    VerifyFailed: 9,
    BatonError: 1,
}


def public_name(err: BaseException) -> str:
    """The name of ``err``'s nearest class defined here: what ``--json`` errors and the control protocol carry,
    so a receiver can rebuild the class (a codec's ``RepoBadChecksum`` travels as ``RepoCorrupt``)."""
    for cls in type(err).__mro__:
        if cls.__module__ == __name__ and issubclass(cls, BatonError):
            return cls.__name__
    return "BatonError"


def exit_code(err: BaseException) -> int:
    """The process exit code for ``err``: the entry of its nearest class in :data:`EXIT_CODES`."""
    for cls in type(err).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1
