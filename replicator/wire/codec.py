"""Frame codec: ``be32 length`` + msgpack ``[type, field, ...]``. No I/O.

The decoder is sans-I/O in the hypercorn style: feed it bytes, take messages out. A frame's
declared length is checked against ``max_frame`` *before* its body is buffered, so a hostile
length costs nothing. Decoded fields are checked against the message's annotations; anything
off raises :class:`~replicator.errors.MalformedFrame`.
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
# Strings in this protocol are names and messages; nothing legitimate is longer.
MAX_STR = 64 * 1024
MAX_TUPLE = 4096


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
            return float(v)
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


_DECODERS: dict[int, tuple[type, Callable[[Any], Any]]] = {}
for _cls in m.MESSAGE_TYPES:
    assert _cls.TYPE not in _DECODERS, _cls
    _DECODERS[_cls.TYPE] = (_cls, _struct_decoder(_cls))

_packer = msgpack.Packer(use_bin_type=True)


def encode(msg: Any) -> bytes:
    """Encode one message into a complete frame (length prefix included)."""
    body = msgpack.packb([msg.TYPE, *_struct_encode(msg)], use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes | memoryview) -> Any:
    """Decode one frame body (without the length prefix)."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise MalformedFrame(f"undecodable msgpack: {exc.__class__.__name__}") from None
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise MalformedFrame("frame is not [type, fields...]")
    entry = _DECODERS.get(obj[0])
    if entry is None:
        raise MalformedFrame(f"unknown message type {obj[0]}")
    return entry[1](obj[1:])


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
