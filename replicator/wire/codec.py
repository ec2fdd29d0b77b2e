"""Frame codec: ``be32 length`` + msgpack ``[type, field, ...]``. No I/O.

The decoder is sans-I/O in the hypercorn style: feed it bytes, take messages out. A frame's
declared length is checked against ``max_frame`` *before* its body is buffered, so a hostile
length costs nothing. Decoded fields are checked against the message's annotations; anything
off raises :class:`~replicator.errors.MalformedFrame`.

Decoding is bounded by the schema before msgpack builds anything: the frame must start as
``[type, ...]`` (a fixarray and a small int), and that type's limits apply to the whole body:
no maps or extension types, arrays no longer than its widest field list or tuple, strings and
binaries only where it has such fields, and no more arrays than its schema holds. A hostile
frame (millions of nested empty arrays, say) is refused after a few objects instead of costing
seconds and hundreds of MiB on the event loop. Messages with tuple fields are small by nature,
so their frames are capped at :data:`MAX_LISTY_FRAME`.
"""

from __future__ import annotations

import dataclasses
import struct
import typing
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from ..errors import FrameTooLarge, MalformedFrame
from . import messages as m

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
# Before a peer has proven who it is, the only frames are the challenge (~100 bytes) and the
# proof (certificate + signature, ~600 bytes): nothing from a stranger needs more.
PRE_AUTH_MAX_FRAME = 4096
# Strings in this protocol are names and messages; nothing legitimate is longer.
MAX_STR = 64 * 1024
MAX_TUPLE = 4096
# Hello, VerifyReply and SwitchVerify (the messages with tuple fields) are a few KiB at most.
MAX_LISTY_FRAME = 1024 * 1024


def _checker(tp: Any) -> Callable[[Any], Any]:
    """Build a function that validates (and converts) one decoded field."""
    if tp is int:
        def check_int(v: Any) -> int:
            if type(v) is not int:
                raise MalformedFrame(f"expected int, got {type(v).__name__}")
            return v
        return check_int
    if tp is float:
        def check_float(v: Any) -> float:
            if type(v) not in (int, float):
                raise MalformedFrame(f"expected float, got {type(v).__name__}")
            f = float(v)
            if f != v:
                # An integer beyond 2**53 would silently become another number.
                raise MalformedFrame(f"integer {v} is not exactly a float")
            return f
        return check_float
    if tp is bool:
        def check_bool(v: Any) -> bool:
            if type(v) is not bool:
                raise MalformedFrame(f"expected bool, got {type(v).__name__}")
            return v
        return check_bool
    if tp is str:
        def check_str(v: Any) -> str:
            if type(v) is not str or len(v) > MAX_STR:
                raise MalformedFrame("expected a string of sane length")
            return v
        return check_str
    if tp is bytes:
        def check_bytes(v: Any) -> bytes:
            if type(v) is not bytes:
                raise MalformedFrame(f"expected bytes, got {type(v).__name__}")
            return v
        return check_bytes
    if typing.get_origin(tp) is tuple:
        inner = _checker(typing.get_args(tp)[0])

        def check_tuple(v: Any) -> tuple:
            if type(v) is not list or len(v) > MAX_TUPLE:
                raise MalformedFrame("expected a list of sane length")
            return tuple(inner(x) for x in v)
        return check_tuple
    if dataclasses.is_dataclass(tp):
        return _struct_decoder(tp)
    raise TypeError(f"no wire type for {tp!r}")  # pragma: no cover - schema bug


def _struct_decoder(cls: type) -> Callable[[Any], Any]:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls)]
    checks = [_checker(hints[f.name]) for f in fields]
    required = sum(1 for f in fields
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)

    def decode(v: Any) -> Any:
        if type(v) is not list or not required <= len(v) <= len(fields):
            raise MalformedFrame(f"{cls.__name__}: wrong number of fields")
        return cls(*(c(x) for c, x in zip(checks, v)))
    return decode


def _struct_encode(obj: Any) -> list:
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, tuple):
            v = [_struct_encode(x) if dataclasses.is_dataclass(x) else x for x in v]
        out.append(v)
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class _Limits:
    """What one message type's frame may contain, derived from its annotations."""
    max_array: int
    max_str: int
    max_bin: int
    max_arrays: int          # the message's own list, its tuples and the structs in them
    max_body: int


def _limits(cls: type) -> _Limits:
    arrays, widest, strs, bins, listy = 1, 1 + len(dataclasses.fields(cls)), False, False, False

    def visit(tp: Any) -> None:
        nonlocal arrays, widest, strs, bins, listy
        if tp is str:
            strs = True
        elif tp is bytes:
            bins = True
        elif typing.get_origin(tp) is tuple:
            inner = typing.get_args(tp)[0]
            listy, widest = True, max(widest, MAX_TUPLE)
            arrays += 1 + (MAX_TUPLE if dataclasses.is_dataclass(inner) else 0)
            visit(inner)
        elif dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            widest = max(widest, len(dataclasses.fields(tp)))
            for f in dataclasses.fields(tp):
                visit(hints[f.name])

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        visit(hints[f.name])
    return _Limits(widest, MAX_STR if strs else 0, (1 << 32) - 1 if bins else 0, arrays,
                   MAX_LISTY_FRAME if listy else (1 << 32) - 1)


_DECODERS: dict[int, tuple[type, Callable[[Any], Any], _Limits]] = {}
for _cls in m.MESSAGE_TYPES:
    assert _cls.TYPE not in _DECODERS, _cls
    # The type must fit a positive fixint: decode_body reads it from the frame's second byte.
    assert 0 <= _cls.TYPE < 0x80 and len(dataclasses.fields(_cls)) < 15, _cls
    _DECODERS[_cls.TYPE] = (_cls, _struct_decoder(_cls), _limits(_cls))

_packer = msgpack.Packer(use_bin_type=True)


def encode(msg: Any) -> bytes:
    """Encode one message into a complete frame (length prefix included)."""
    body = msgpack.packb([msg.TYPE, *_struct_encode(msg)], use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> Any:
    """Decode one frame body (without the length prefix)."""
    # Our encoder always writes a fixarray (0x91-0x9f) and the type as a positive fixint:
    # read the type from the bytes and decode under that type's limits (module docstring).
    if len(body) < 2 or not 0x91 <= body[0] <= 0x9f:
        raise MalformedFrame("frame is not [type, fields...]")
    entry = _DECODERS.get(body[1])
    if entry is None:
        raise MalformedFrame(f"unknown message type {body[1]}" if body[1] < 0x80 else
                             f"unknown message type (encoded as 0x{body[1]:02x}...)")
    cls, decode, lim = entry
    if len(body) > lim.max_body:
        raise MalformedFrame(f"{cls.__name__} frame of {len(body)} bytes is larger than any "
                             f"such message (limit {lim.max_body})")
    arrays = 0

    def no_maps(d: dict) -> dict:
        raise MalformedFrame(f"{cls.__name__} frame holds a map")

    def count_array(a: list) -> list:
        nonlocal arrays
        arrays += 1
        if arrays > lim.max_arrays:
            raise MalformedFrame(f"{cls.__name__} frame holds more arrays than the message has")
        return a
    try:
        obj = msgpack.unpackb(body, raw=False, use_list=True, list_hook=count_array,
                              object_hook=no_maps,
                              max_array_len=lim.max_array, max_map_len=0, max_ext_len=0,
                              max_str_len=lim.max_str, max_bin_len=lim.max_bin)
    except MalformedFrame:
        raise
    except ValueError as exc:  # a limit: say which, it names the culprit in the logs
        raise MalformedFrame(f"{cls.__name__} frame: {exc}") from None
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise MalformedFrame(f"undecodable msgpack: {exc.__class__.__name__}") from None
    if type(obj) is not list:
        raise MalformedFrame("frame is not [type, fields...]")
    return decode(obj[1:])


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` then iterate ``messages()``."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data
        # Check every complete header as soon as it arrives, before buffering a huge body
        # (also those behind frames the caller has not taken out yet).
        pos = 0
        while len(self._buf) - pos >= 4:
            (n,) = HEADER.unpack_from(self._buf, pos)
            if n > self.max_frame:
                raise FrameTooLarge(f"frame of {n} bytes exceeds the limit of {self.max_frame}")
            pos += 4 + n

    def messages(self) -> Iterator[Any]:
        while len(self._buf) >= 4:
            (n,) = HEADER.unpack_from(self._buf)
            if n > self.max_frame:
                raise FrameTooLarge(f"frame of {n} bytes exceeds the limit of {self.max_frame}")
            if len(self._buf) < 4 + n:
                return
            body = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            yield decode_body(body)

    @property
    def buffered(self) -> int:
        return len(self._buf)
