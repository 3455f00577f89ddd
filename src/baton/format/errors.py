"""The one error tree of the format layer: what a codec found wrong in the bytes it was given.

::

    FormatError (ValueError)        a structure fails a check; carries what / expected / found
    ├── Truncated                   fewer bytes than the structure needs
    ├── BadMagic                    not this kind of structure (foreign data)
    │   └── Blank                   an all-zero block: never written (not damage)
    ├── BadVersion                  a format version this Baton does not read
    ├── BadLength                   the length field disagrees with the layout or with the bytes present
    ├── BadChecksum                 the stored checksum does not match the bytes (damage or a torn write)
    ├── BadIdentity                 an intact structure that says it lives elsewhere or belongs to another disk
    │   └── OtherDiskSize           an intact tail anchor written for a disk of another size (a copied disk)
    └── BadValue                    a field holds a value the format does not define

Every codec in ``baton.format`` raises only these (``pack`` of impossible values raises a plain ``ValueError``:
that is a caller's bug, not bad input). Codecs check in a fixed order (STYLE §6): length, magic, version, length
field, checksum, identity, values, so the kind says how far the bytes got.

What a kind *means* is decided by the layer that read the bytes: the record layer turns a pair of ``Blank``
copies into ``RecordNotFound``, ``BadVersion`` into ``RecordVersionError``, the rest into ``RecordCorrupt``.
Repository objects (packs, index files, pages, envelopes) are always read where a good copy is required, so their
codecs raise the ``Repo*`` twins below, which are also :class:`baton.errors.RepoCorrupt` (exit 7): a repository
caller can catch ``RepoCorrupt`` and a format-aware caller the kind, and the message is the same either way.
Nothing is classified by its message text.
"""

from __future__ import annotations

from typing import Any

from baton.errors import RepoCorrupt


class FormatError(ValueError):
    """A structure failed a check. ``what`` names the structure (and which copy), ``expected`` and ``found``
    say what the check wanted and what the bytes hold; ``reason`` is the sentence after ``what: ``."""

    def __init__(self, what: str, reason: str = "", *, expected: Any = None, found: Any = None) -> None:
        if not reason:
            reason = f"expected {expected}, found {found}"
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason
        self.expected = expected
        self.found = found


class Truncated(FormatError):
    """Fewer bytes than the structure needs."""


class BadMagic(FormatError):
    """No structure of this kind here (foreign data)."""


class Blank(BadMagic):
    """An all-zero block where the structure should be: it was never written (a blank disk, an unused copy)."""


class BadVersion(FormatError):
    """A structure of a format version this Baton does not read."""


class BadLength(FormatError):
    """The structure's length field disagrees with its layout or with the bytes present."""


class BadChecksum(FormatError):
    """The stored checksum does not match the bytes: damage, or a write that never completed."""


class BadIdentity(FormatError):
    """An intact structure that names another location, copy, region, ring slot or disk than where it was read."""


class OtherDiskSize(BadIdentity):
    """An intact tail anchor written for a disk of another size: a copied or resized disk, not damage."""


class BadValue(FormatError):
    """A field holds a value the format does not define (unknown kind, impossible chunk size, ...)."""


# Repository objects: the same kinds, which are also RepoCorrupt (exit 7) for the repository's callers.


class RepoFormatError(FormatError, RepoCorrupt):
    """A repository object (pack, index file, index page, envelope) fails a check."""

    hint = ""


class RepoTruncated(RepoFormatError, Truncated):
    pass


class RepoBadMagic(RepoFormatError, BadMagic):
    pass


class RepoBadVersion(RepoFormatError, BadVersion):
    pass


class RepoBadLength(RepoFormatError, BadLength):
    pass


class RepoBadChecksum(RepoFormatError, BadChecksum):
    pass


class RepoBadValue(RepoFormatError, BadValue):
    pass
