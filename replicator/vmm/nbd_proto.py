"""NBD protocol without I/O: message encoding, handshake reply parsing and the reply parser.

Only the subset replicator uses (fixed newstyle, structured replies, meta contexts; see the
protocol's ``doc/proto.md``). Everything a server sends is checked before it is trusted:
lengths are bounded before anything is allocated, reply cookies must name a request in flight,
and data and extents must lie inside the request they answer. A violation raises
:class:`~replicator.errors.NbdError`; the caller then drops the connection.
:class:`ReplyParser` is fed by :mod:`replicator.vmm.nbd`'s transport, which owns the socket.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import NamedTuple

from replicator.errors import NbdError

NBDMAGIC = 0x4E42444D41474943             # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054             # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 2, 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_BIT = 1 << 31
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE = 1, 2

#: Transmission flags (``NBD_FLAG_*`` after the handshake).
TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_FLUSH, TF_SEND_FUA = 1, 2, 4, 8
TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN = 64, 256

REPLY_FLAG_DONE = 1
RT_NONE, RT_OFFSET_DATA, RT_OFFSET_HOLE, RT_BLOCK_STATUS = 0, 1, 2, 5
RT_ERROR, RT_ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2

#: ``base:allocation`` extent flags.
STATE_HOLE, STATE_ZERO = 1, 2
#: ``qemu:dirty-bitmap:NAME`` extent flag.
STATE_DIRTY = 1

#: Largest option reply accepted during the handshake (names are <= 4096 bytes by the spec).
MAX_OPTION_REPLY = 64 << 10
#: Largest non-data reply chunk: QEMU sends at most 128 Ki extents (1 MiB) per BLOCK_STATUS.
MAX_CHUNK = (1 << 20) + 4096
#: Largest READ/WRITE a client sends in one request (the spec's usual maximum block size).
MAX_REQUEST = 32 << 20

SIMPLE_HEADER = struct.Struct(">IIQ")          # magic, error, cookie
STRUCT_HEADER = struct.Struct(">IHHQI")        # magic, flags, type, cookie, length
REQUEST = struct.Struct(">IHHQQI")             # magic, flags, type, cookie, offset, length
OPTION = struct.Struct(">QII")                 # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")          # magic, option, type, length
GREETING = struct.Struct(">QQH")               # NBDMAGIC, IHAVEOPT, handshake flags


class NbdServerError(NbdError):
    """The server refused one request (``errno`` is its NBD error); the connection stays usable."""

    def __init__(self, message: str, *, errno: int):
        self.errno = errno
        super().__init__(message)


class Extent(NamedTuple):
    """A run of bytes sharing one status: ``flags`` as defined by its meta context."""

    offset: int
    length: int
    flags: int


# --- client -> server ------------------------------------------------------------------------

def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, option, len(data)) + data


def encode_request(kind: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)


def _string(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 4096:
        raise NbdError(f"NBD name too long ({len(raw)} bytes): {text[:64]!r}...")
    return struct.pack(">I", len(raw)) + raw


def meta_context_query(export: str, contexts: list[str]) -> bytes:
    return _string(export) + struct.pack(">I", len(contexts)) + b"".join(map(_string, contexts))


def go_request(export: str) -> bytes:
    return _string(export) + struct.pack(">HH", 1, INFO_BLOCK_SIZE)


# --- handshake replies -----------------------------------------------------------------------

def parse_greeting(data: bytes) -> int:
    """The server's handshake flags; refuses anything but fixed-newstyle NBD."""
    magic, opt_magic, flags = GREETING.unpack(data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise NbdError("not an NBD server (bad greeting magic)")
    if not flags & FLAG_FIXED_NEWSTYLE:
        raise NbdError("NBD server does not speak the fixed newstyle handshake")
    return flags


def parse_option_header(data: bytes, option: int) -> tuple[int, int]:
    """``(reply type, payload length)`` of an option reply to ``option``; bounded length."""
    magic, opt, rtype, length = OPTION_REPLY.unpack(data)
    if magic != OPT_REPLY_MAGIC or opt != option:
        raise NbdError(f"bad NBD option reply (magic {magic:#x}, option {opt}, "
                       f"expected option {option})")
    if length > MAX_OPTION_REPLY:
        raise NbdError(f"NBD option reply of {length} bytes exceeds {MAX_OPTION_REPLY}")
    return rtype, length


def option_error(option: int, rtype: int, payload: bytes) -> NbdError:
    text = payload.decode(errors="replace")[:200]
    return NbdError(f"NBD server refused option {option} (error {rtype & ~REP_ERR_BIT})"
                    + (f": {text}" if text else ""))


def parse_meta_context(payload: bytes) -> tuple[int, str]:
    if len(payload) < 5:
        raise NbdError("short NBD meta context reply")
    (cid,) = struct.unpack_from(">I", payload)
    return cid, payload[4:].decode(errors="replace")


@dataclasses.dataclass
class ExportInfo:
    """What ``NBD_OPT_GO`` told about the export."""

    size: int = -1
    flags: int = 0
    block_min: int = 1
    block_pref: int = 4096
    block_max: int = MAX_REQUEST

    def update(self, payload: bytes) -> None:
        """Apply one ``NBD_REP_INFO`` payload (unknown info types are ignored, per the spec)."""
        if len(payload) < 2:
            raise NbdError("short NBD info reply")
        (itype,) = struct.unpack_from(">H", payload)
        if itype == INFO_EXPORT:
            if len(payload) != 12:
                raise NbdError("malformed NBD export info")
            self.size, self.flags = struct.unpack_from(">QH", payload, 2)
            if self.size >= 1 << 63:
                raise NbdError(f"NBD export size {self.size} out of range")
        elif itype == INFO_BLOCK_SIZE:
            if len(payload) != 14:
                raise NbdError("malformed NBD block size info")
            lo, pref, hi = struct.unpack_from(">III", payload, 2)
            if not (lo and lo & (lo - 1) == 0 and lo <= 64 << 10 and pref >= lo and hi >= lo):
                raise NbdError(f"invalid NBD block sizes {lo}/{pref}/{hi}")
            self.block_min, self.block_pref, self.block_max = lo, pref, min(hi, MAX_REQUEST)


# --- transmission replies --------------------------------------------------------------------

@dataclasses.dataclass
class Request:
    """A request in flight, as the parser needs it to check and place its reply."""

    kind: int
    offset: int
    length: int
    buf: memoryview | None = None                 # READ: where the data goes
    covered: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    extents: dict[int, list[Extent]] = dataclasses.field(default_factory=dict)
    error: NbdServerError | None = None


@dataclasses.dataclass
class Reply:
    """A finished request: ``error`` is set, or READ's buffer is full, or ``extents`` is."""

    cookie: int
    request: Request


class ReplyParser:
    """Splits the reply stream into requests' results, without copying READ data.

    Use: :meth:`expect` each request before sending it; write received bytes into
    :meth:`buffer` and call :meth:`advance` with their count, which returns the finished
    replies. Any protocol violation raises :class:`NbdError`; the parser is then unusable.
    """

    def __init__(self, contexts: set[int] | frozenset[int] = frozenset()):
        self._contexts = frozenset(contexts)
        self._pending: dict[int, Request] = {}
        self._head = bytearray(STRUCT_HEADER.size)
        self._state = "head"
        self._dst = memoryview(self._head)[:SIMPLE_HEADER.size]
        self._got = 0
        self._cookie = 0
        self._flags = 0
        self._rtype = 0
        self._len = 0
        self._payload = bytearray()

    def expect(self, cookie: int, request: Request) -> None:
        if cookie in self._pending:
            raise NbdError(f"NBD cookie {cookie} already in flight")
        self._pending[cookie] = request

    def forget(self, cookie: int) -> Request | None:
        return self._pending.pop(cookie, None)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def buffer(self) -> memoryview:
        """Where the next received bytes go (never empty)."""
        return self._dst[self._got:]

    def advance(self, nbytes: int) -> list[Reply]:
        self._got += nbytes
        done: list[Reply] = []
        while self._got == len(self._dst):
            reply = self._step()
            if reply is not None:
                done.append(reply)
        return done

    def _expect_bytes(self, state: str, view: memoryview) -> None:
        self._state, self._dst, self._got = state, view, 0

    def _lookup(self, cookie: int) -> Request:
        req = self._pending.get(cookie)
        if req is None:
            raise NbdError(f"NBD reply for cookie {cookie}, which is not in flight")
        return req

    def _step(self) -> Reply | None:
        state = self._state
        if state == "head":                    # 16 bytes: a simple reply, or most of a
            (magic,) = struct.unpack_from(">I", self._head)     # structured reply's header
            if magic == SIMPLE_REPLY_MAGIC:
                return self._simple()
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdError(f"bad NBD reply magic {magic:#x}")
            self._expect_bytes("head2", memoryview(self._head)[16:])
        elif state == "head2":
            _, self._flags, self._rtype, self._cookie, self._len = STRUCT_HEADER.unpack(self._head)
            req = self._lookup(self._cookie)
            if self._rtype == RT_OFFSET_DATA:
                if req.kind != CMD_READ or self._len <= 8:
                    raise NbdError("unexpected or empty NBD data chunk")
                self._expect_bytes("offset", memoryview(self._head)[:8])
            elif self._len > MAX_CHUNK:
                raise NbdError(f"NBD reply chunk of {self._len} bytes exceeds {MAX_CHUNK}")
            elif self._len:
                self._payload = bytearray(self._len)
                self._expect_bytes("payload", memoryview(self._payload))
            else:
                return self._chunk(b"")
        elif state == "offset":
            (offset,) = struct.unpack_from(">Q", self._head)
            req = self._pending[self._cookie]
            start, n = self._place(req, offset, self._len - 8)
            assert req.buf is not None
            self._expect_bytes("data", req.buf[start:start + n])
        elif state == "data":
            return self._chunk(None)
        else:
            return self._chunk(bytes(self._payload))
        return None

    def _simple(self) -> Reply | None:
        _, err, cookie = SIMPLE_HEADER.unpack_from(self._head)
        req = self._lookup(cookie)
        self._expect_bytes("head", memoryview(self._head)[:SIMPLE_HEADER.size])
        if err:
            req.error = NbdServerError(f"NBD server error {err}", errno=err)
        elif req.kind in (CMD_READ, CMD_BLOCK_STATUS):
            # Structured replies were negotiated: a plain success here carries no data.
            raise NbdError(f"NBD simple reply to a command {req.kind} that needs structured data")
        del self._pending[cookie]
        return Reply(cookie, req)

    def _place(self, req: Request, offset: int, n: int) -> tuple[int, int]:
        """Check a data or hole chunk lies inside ``req``; returns (buffer start, length)."""
        start = offset - req.offset
        if start < 0 or n <= 0 or start + n > req.length:
            raise NbdError(f"NBD read chunk [{offset}, +{n}) outside the request "
                           f"[{req.offset}, +{req.length})")
        req.covered.append((start, n))
        return start, n

    def _chunk(self, payload: bytes | None) -> Reply | None:
        req = self._pending[self._cookie]
        rtype = self._rtype
        if payload is None or rtype == RT_NONE:
            if rtype == RT_NONE and payload:
                raise NbdError("NBD NONE chunk with a payload")
        elif rtype == RT_OFFSET_HOLE:
            if req.kind != CMD_READ or len(payload) != 12:
                raise NbdError("unexpected or malformed NBD hole chunk")
            offset, n = struct.unpack(">QI", payload)
            start, n = self._place(req, offset, n)
            assert req.buf is not None
            req.buf[start:start + n] = bytes(n)
        elif rtype == RT_BLOCK_STATUS:
            self._block_status(req, payload)
        elif rtype in (RT_ERROR, RT_ERROR_OFFSET):
            if len(payload) < 6:
                raise NbdError("malformed NBD error chunk")
            err, mlen = struct.unpack_from(">IH", payload)
            if 6 + mlen > len(payload) or not err:
                raise NbdError("malformed NBD error chunk")
            text = payload[6:6 + mlen].decode(errors="replace")[:200]
            req.error = NbdServerError(f"NBD server error {err}: {text}", errno=err)
        elif rtype & (1 << 15):
            req.error = NbdServerError(f"NBD server error chunk type {rtype}", errno=5)
        else:
            raise NbdError(f"unknown NBD reply chunk type {rtype}")
        self._expect_bytes("head", memoryview(self._head)[:SIMPLE_HEADER.size])
        if not self._flags & REPLY_FLAG_DONE:
            return None
        del self._pending[self._cookie]
        if req.error is None:
            self._check_complete(req)
        return Reply(self._cookie, req)

    def _block_status(self, req: Request, payload: bytes) -> None:
        if req.kind != CMD_BLOCK_STATUS or len(payload) < 12 or (len(payload) - 4) % 8:
            raise NbdError("unexpected or malformed NBD block status chunk")
        (cid,) = struct.unpack_from(">I", payload)
        if cid not in self._contexts or cid in req.extents:
            raise NbdError(f"NBD block status for unknown or repeated context {cid}")
        out: list[Extent] = []
        pos, end = req.offset, req.offset + req.length
        for n, flags in struct.iter_unpack(">II", memoryview(payload)[4:]):
            if n == 0:
                raise NbdError("NBD block status extent of length 0")
            if pos >= end:
                break                          # the spec lets the last extent run past the end
            n = min(n, end - pos)
            out.append(Extent(pos, n, flags))
            pos += n
        req.extents[cid] = out

    def _check_complete(self, req: Request) -> None:
        if req.kind == CMD_READ:
            pos = 0
            for start, n in sorted(req.covered):
                if start != pos:
                    break
                pos += n
            if pos != req.length:
                raise NbdError(f"NBD read reply does not cover [{req.offset}, +{req.length}) "
                               "exactly once")
        elif req.kind == CMD_BLOCK_STATUS and set(req.extents) != self._contexts:
            raise NbdError("NBD block status reply lacks a negotiated context")
