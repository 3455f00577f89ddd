"""The NBD wire protocol: constants and pure codecs (no I/O).

Names follow the NBD protocol specification (``doc/proto.md`` of the NetworkBlockDevice/nbd project): fixed
newstyle negotiation, option haggling, simple and structured replies, metadata contexts. Only the parts Baton's
NBD frontend speaks are here; TLS and the experimental extended headers are not.

Byte order: NBD is big-endian on the wire (network byte order). That is why these layouts use ``>`` where
Baton's on-disk formats use little-endian.

Failure behaviour: every ``unpack``/``parse`` raises a :class:`baton.format.errors.FormatError` kind (a
``ValueError``) naming what it expected and what it found (``BadMagic``, ``Truncated``, ``BadLength``,
``BadValue``: wrong magic, short or overlong data, bad UTF-8, a NUL in a string). ``pack`` of values the protocol
cannot carry raises a plain ``ValueError`` (a caller's bug). Callers map that to the protocol's
answer: ``NBD_REP_ERR_INVALID`` during option haggling, a hard disconnect in transmission.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from baton.format.errors import BadLength, BadMagic, BadValue, Truncated

# --------------------------------------------------------------------------------------------------- magics
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes the server sends (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle magic; also prefixes every client option
OPT_REPLY_MAGIC = 0x0003E889045565A9  # prefixes every option reply (fixed newstyle)
REQUEST_MAGIC = 0x25609513  # NBD_REQUEST_MAGIC
SIMPLE_REPLY_MAGIC = 0x67446698  # NBD_SIMPLE_REPLY_MAGIC
STRUCTURED_REPLY_MAGIC = 0x668E33EF  # NBD_STRUCTURED_REPLY_MAGIC

MAX_STRING = 4096  # the spec's upper bound for any string (export names, queries, messages)
EXPORT_NAME_ZEROES = 124  # reserved zero bytes after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES


class HandshakeFlag(IntFlag):
    """16-bit handshake flags sent by the server."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """32-bit client flags; any other bit set means the server must drop the connection."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """16-bit transmission flags describing the export."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Opt(IntEnum):
    """Option types (NBD_OPT_*)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Rep(IntEnum):
    """Option reply types (NBD_REP_*); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9
    ERR_EXT_HEADER_REQD = _REP_ERR + 10


class Info(IntEnum):
    """Information types carried by NBD_REP_INFO (NBD_INFO_*)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    """Request types (NBD_CMD_*)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CmdFlag(IntFlag):
    """16-bit command flags (NBD_CMD_FLAG_*)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class ReplyType(IntEnum):
    """Structured reply chunk types (NBD_REPLY_TYPE_*); error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(IntEnum):
    """Error values allowed on the wire (NBD_E*)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# base:allocation status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
# baton:dirty status flag, the same meaning as bit 0 of QEMU's qemu:dirty-bitmap:NAME contexts
STATE_DIRTY = 1 << 0

# ----------------------------------------------------------------------------------------- struct layouts
HANDSHAKE = struct.Struct(
    ">"
    "Q"  # NBDMAGIC
    "Q"  # IHAVEOPT
    "H"  # handshake flags (HandshakeFlag)
)
CLIENT_FLAGS = struct.Struct(
    ">"
    "I"  # client flags (ClientFlag)
)
OPTION_HEADER = struct.Struct(
    ">"
    "Q"  # IHAVEOPT
    "I"  # option (Opt)
    "I"  # length of option data that follows
)
OPTION_REPLY = struct.Struct(
    ">"
    "Q"  # OPT_REPLY_MAGIC
    "I"  # the option this replies to
    "I"  # reply type (Rep)
    "I"  # length of reply data that follows
)
EXPORT_NAME_REPLY = struct.Struct(
    ">"
    "Q"  # export size in bytes
    "H"  # transmission flags (TransmissionFlag)
)
INFO_EXPORT = struct.Struct(
    ">"
    "H"  # Info.EXPORT
    "Q"  # export size in bytes
    "H"  # transmission flags
)
INFO_BLOCK_SIZE = struct.Struct(
    ">"
    "H"  # Info.BLOCK_SIZE
    "I"  # minimum block size
    "I"  # preferred block size
    "I"  # maximum payload size
)
REQUEST = struct.Struct(
    ">"
    "I"  # REQUEST_MAGIC
    "H"  # command flags (CmdFlag)
    "H"  # type (Cmd)
    "Q"  # cookie, opaque, echoed in the reply
    "Q"  # offset
    "I"  # length
)
SIMPLE_REPLY = struct.Struct(
    ">"
    "I"  # SIMPLE_REPLY_MAGIC
    "I"  # error (Errno or 0)
    "Q"  # cookie
)
STRUCTURED_REPLY = struct.Struct(
    ">"
    "I"  # STRUCTURED_REPLY_MAGIC
    "H"  # flags (ReplyFlag)
    "H"  # type (ReplyType)
    "Q"  # cookie
    "I"  # length of payload that follows
)
OFFSET_DATA = struct.Struct(
    ">"
    "Q"  # offset of the data that follows (payload start of an OFFSET_DATA chunk)
)
ERROR_CHUNK = struct.Struct(
    ">"
    "I"  # error (Errno, non-zero)
    "H"  # message length; the UTF-8 message follows
)
BLOCK_DESCRIPTOR = struct.Struct(
    ">"
    "I"  # extent length (non-zero)
    "I"  # status flags, meaning defined by the metadata context
)
U32 = struct.Struct(">I")  # length prefixes inside option data
U16 = struct.Struct(">H")  # counts and info types inside option data


# ------------------------------------------------------------------------------------------------ strings
def encode_string(text: str) -> bytes:
    """UTF-8 bytes of a protocol string. Raises ValueError for a NUL or more than MAX_STRING bytes."""
    raw = text.encode("utf-8")
    if b"\0" in raw or len(raw) > MAX_STRING:
        raise ValueError(f"NBD string must have no NUL and at most {MAX_STRING} bytes, got {len(raw)} bytes")
    return raw


def decode_string(raw: bytes | memoryview, what: str) -> str:
    """A protocol string from the wire. Raises BadLength or BadValue (naming ``what``) for its length, a NUL or
    bad UTF-8."""
    data = bytes(raw)
    if len(data) > MAX_STRING:
        raise BadLength(what, f"at most {MAX_STRING} bytes expected, found {len(data)}", expected=MAX_STRING,
                        found=len(data))
    if b"\0" in data:
        raise BadValue(what, "contains a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadValue(what, f"not valid UTF-8 ({e.reason})") from None


def _need(data: bytes | memoryview, pos: int, n: int, what: str) -> None:
    if pos + n > len(data):
        raise Truncated(what, f"{n} more bytes expected at {pos}, only {len(data) - pos} present",
                        expected=pos + n, found=len(data))


# -------------------------------------------------------------------------------------------- handshake
@dataclass(frozen=True)
class OptionHeader:
    """A client option header; ``length`` bytes of option data follow it."""

    option: int
    length: int

    def pack(self) -> bytes:
        return OPTION_HEADER.pack(IHAVEOPT, self.option, self.length)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> OptionHeader:
        if len(raw) != OPTION_HEADER.size:
            raise BadLength("option header", f"{OPTION_HEADER.size} bytes expected, found {len(raw)}",
                            expected=OPTION_HEADER.size, found=len(raw))
        magic, option, length = OPTION_HEADER.unpack(raw)
        if magic != IHAVEOPT:
            raise BadMagic("option header", f"magic {IHAVEOPT:#x} expected, found {magic:#x}", expected=IHAVEOPT,
                           found=magic)
        return cls(option, length)


@dataclass(frozen=True)
class OptionReply:
    """One server reply during option haggling."""

    option: int
    reply_type: int
    data: bytes = b""

    def pack(self) -> bytes:
        return OPTION_REPLY.pack(OPT_REPLY_MAGIC, self.option, self.reply_type, len(self.data)) + self.data

    @classmethod
    def unpack_header(cls, raw: bytes | memoryview) -> tuple[int, int, int]:
        """(option, reply_type, data length) of a reply header."""
        if len(raw) != OPTION_REPLY.size:
            raise BadLength("option reply", f"{OPTION_REPLY.size} bytes expected, found {len(raw)}",
                            expected=OPTION_REPLY.size, found=len(raw))
        magic, option, rtype, length = OPTION_REPLY.unpack(raw)
        if magic != OPT_REPLY_MAGIC:
            raise BadMagic("option reply", f"magic {OPT_REPLY_MAGIC:#x} expected, found {magic:#x}",
                           expected=OPT_REPLY_MAGIC, found=magic)
        return option, rtype, length


def pack_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The server's answer to NBD_OPT_EXPORT_NAME: size, transmission flags and (unless NO_ZEROES) 124 zeroes."""
    return EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(EXPORT_NAME_ZEROES))


def pack_server_reply(name: str, details: str = "") -> bytes:
    """Data of an NBD_REP_SERVER reply to NBD_OPT_LIST: name length, name, optional human-readable details."""
    raw = encode_string(name)
    return U32.pack(len(raw)) + raw + encode_string(details)


def pack_info_export(size: int, flags: int) -> bytes:
    """Data of an NBD_REP_INFO carrying NBD_INFO_EXPORT."""
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def pack_info_string(info: Info, text: str) -> bytes:
    """Data of an NBD_REP_INFO carrying NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    return U16.pack(info) + encode_string(text)


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """Data of an NBD_REP_INFO carrying NBD_INFO_BLOCK_SIZE."""
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def pack_meta_context_reply(context_id: int, name: str) -> bytes:
    """Data of an NBD_REP_META_CONTEXT reply."""
    return U32.pack(context_id) + encode_string(name)


@dataclass(frozen=True)
class InfoRequest:
    """Option data of NBD_OPT_INFO and NBD_OPT_GO: an export name and the NBD_INFO_* items asked for."""

    name: str
    requests: tuple[int, ...] = ()

    def pack(self) -> bytes:
        raw = encode_string(self.name)
        return (
            U32.pack(len(raw)) + raw + U16.pack(len(self.requests)) + b"".join(U16.pack(r) for r in self.requests)
        )

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> InfoRequest:
        """Parse option data; Truncated or BadLength if lengths disagree with the option length."""
        _need(data, 0, 4, "INFO/GO name length")
        (nlen,) = U32.unpack_from(data, 0)
        _need(data, 4, nlen + 2, "INFO/GO name and request count")
        name = decode_string(data[4 : 4 + nlen], "export name")
        (count,) = U16.unpack_from(data, 4 + nlen)
        pos = 6 + nlen
        if len(data) != pos + 2 * count:
            raise BadLength("INFO/GO", f"{pos + 2 * count} bytes of option data expected, found {len(data)}",
                            expected=pos + 2 * count, found=len(data))
        reqs = tuple(U16.unpack_from(data, pos + 2 * i)[0] for i in range(count))
        return cls(name, reqs)


@dataclass(frozen=True)
class MetaContextRequest:
    """Option data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: an export name and queries."""

    export_name: str
    queries: tuple[str, ...] = ()

    def pack(self) -> bytes:
        raw = encode_string(self.export_name)
        out = [U32.pack(len(raw)), raw, U32.pack(len(self.queries))]
        for q in self.queries:
            qraw = encode_string(q)
            out += [U32.pack(len(qraw)), qraw]
        return b"".join(out)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> MetaContextRequest:
        """Parse option data; Truncated or BadLength if any length would read beyond the option data or leave
        bytes over."""
        _need(data, 0, 4, "meta context export name length")
        (nlen,) = U32.unpack_from(data, 0)
        _need(data, 4, nlen + 4, "meta context export name and query count")
        name = decode_string(data[4 : 4 + nlen], "export name")
        (count,) = U32.unpack_from(data, 4 + nlen)
        pos = 8 + nlen
        queries: list[str] = []
        for i in range(count):
            _need(data, pos, 4, f"query {i} length")
            (qlen,) = U32.unpack_from(data, pos)
            _need(data, pos + 4, qlen, f"query {i}")
            queries.append(decode_string(data[pos + 4 : pos + 4 + qlen], f"query {i}"))
            pos += 4 + qlen
        if pos != len(data):
            raise BadLength("meta context", f"{pos} bytes of option data expected, found {len(data)}", expected=pos,
                            found=len(data))
        return cls(name, tuple(queries))


# ------------------------------------------------------------------------------------------ transmission
@dataclass(frozen=True)
class Request:
    """A transmission-phase request header (a WRITE's payload follows it on the wire)."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    def pack(self) -> bytes:
        return REQUEST.pack(REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Request:
        if len(raw) != REQUEST.size:
            raise BadLength("request", f"{REQUEST.size} bytes expected, found {len(raw)}", expected=REQUEST.size,
                            found=len(raw))
        magic, flags, rtype, cookie, offset, length = REQUEST.unpack(raw)
        if magic != REQUEST_MAGIC:
            raise BadMagic("request", f"magic {REQUEST_MAGIC:#x} expected, found {magic:#x}", expected=REQUEST_MAGIC,
                           found=magic)
        return cls(flags, rtype, cookie, offset, length)


@dataclass(frozen=True)
class SimpleReply:
    """A simple reply header (a successful READ's data follows it)."""

    error: int
    cookie: int

    def pack(self) -> bytes:
        return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, self.error, self.cookie)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> SimpleReply:
        if len(raw) != SIMPLE_REPLY.size:
            raise BadLength("simple reply", f"{SIMPLE_REPLY.size} bytes expected, found {len(raw)}",
                            expected=SIMPLE_REPLY.size, found=len(raw))
        magic, error, cookie = SIMPLE_REPLY.unpack(raw)
        if magic != SIMPLE_REPLY_MAGIC:
            raise BadMagic("simple reply", f"magic {SIMPLE_REPLY_MAGIC:#x} expected, found {magic:#x}",
                           expected=SIMPLE_REPLY_MAGIC, found=magic)
        return cls(error, cookie)


@dataclass(frozen=True)
class ChunkHeader:
    """A structured reply chunk header; ``length`` bytes of payload follow it."""

    flags: int
    type: int
    cookie: int
    length: int

    def pack(self) -> bytes:
        return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, self.flags, self.type, self.cookie, self.length)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> ChunkHeader:
        if len(raw) != STRUCTURED_REPLY.size:
            raise BadLength("structured reply", f"{STRUCTURED_REPLY.size} bytes expected, found {len(raw)}",
                            expected=STRUCTURED_REPLY.size, found=len(raw))
        magic, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack(raw)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise BadMagic("structured reply", f"magic {STRUCTURED_REPLY_MAGIC:#x} expected, found {magic:#x}",
                           expected=STRUCTURED_REPLY_MAGIC, found=magic)
        return cls(flags, rtype, cookie, length)


@dataclass(frozen=True)
class ErrorChunk:
    """Payload of an NBD_REPLY_TYPE_ERROR chunk: a non-zero error and a human-readable message."""

    error: int
    message: str = ""

    def pack(self) -> bytes:
        if self.error == 0:
            raise ValueError("error chunk: error must be non-zero")
        raw = encode_string(self.message)
        return ERROR_CHUNK.pack(self.error, len(raw)) + raw

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> ErrorChunk:
        _need(payload, 0, ERROR_CHUNK.size, "error chunk")
        error, mlen = ERROR_CHUNK.unpack_from(payload, 0)
        if error == 0:
            raise BadValue("error chunk", "error 0 found, non-zero expected", expected="non-zero", found=0)
        if len(payload) != ERROR_CHUNK.size + mlen:
            raise BadLength("error chunk", f"{ERROR_CHUNK.size + mlen} bytes expected, found {len(payload)}",
                            expected=ERROR_CHUNK.size + mlen, found=len(payload))
        return cls(error, decode_string(payload[ERROR_CHUNK.size :], "error message"))


@dataclass(frozen=True)
class BlockStatusChunk:
    """Payload of an NBD_REPLY_TYPE_BLOCK_STATUS chunk: a context id and (length, flags) descriptors."""

    context_id: int
    extents: tuple[tuple[int, int], ...]

    def pack(self) -> bytes:
        if not self.extents:
            raise ValueError("block status: at least one descriptor is required")
        out = [U32.pack(self.context_id)]
        for length, flags in self.extents:
            if length <= 0:
                raise ValueError(f"block status: descriptor length must be positive, got {length}")
            out.append(BLOCK_DESCRIPTOR.pack(length, flags))
        return b"".join(out)

    @classmethod
    def unpack(cls, payload: bytes | memoryview) -> BlockStatusChunk:
        n, rest = divmod(len(payload) - 4, BLOCK_DESCRIPTOR.size)
        if len(payload) < 4 + BLOCK_DESCRIPTOR.size or rest:
            raise BadLength("block status", f"4 + 8*n (n >= 1) bytes expected, found {len(payload)}",
                            expected="4 + 8*n (n >= 1)", found=len(payload))
        (ctx,) = U32.unpack_from(payload, 0)
        extents = tuple(BLOCK_DESCRIPTOR.unpack_from(payload, 4 + 8 * i) for i in range(n))
        if any(length == 0 for length, _ in extents):
            raise BadValue("block status", "zero-length descriptor", expected="length > 0", found=0)
        return cls(ctx, extents)
