"""Unit tests for the wire layer: messages, frame codec and page batches."""

from __future__ import annotations

import dataclasses
import re
import struct
import tracemalloc
import typing

import lz4.block
import msgpack
import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.errors import (FrameTooLarge, IntegrityError, MalformedFrame, ProtocolError,
                               ReplicatorError)
from replicator.wire import codec
from replicator.wire import messages as m
from replicator.wire.codec import HEADER, MAX_STR, MAX_TUPLE, FrameDecoder, decode_body, encode
from replicator.wire.pages import (CODECS, MAX_BATCH_PAGES, PAGE_SIZE, ZERO_HASH, Compressor,
                                   decode_batch, encode_batch, hash_pages)

# ----------------------------------------------------------------------------------------------
# helpers


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def raw_frame(obj) -> bytes:
    """A frame carrying an arbitrary msgpack object (bypassing the message classes)."""
    return frame(msgpack.packb(obj, use_bin_type=True))


def decode_all(data: bytes, max_frame: int = codec.DEFAULT_MAX_FRAME) -> list:
    dec = FrameDecoder(max_frame)
    dec.feed(data)
    return list(dec.messages())


def u32(*xs: int) -> bytes:
    return np.array(xs, dtype="<u4").tobytes()


def u64(*xs: int) -> bytes:
    return np.array(xs, dtype="<u8").tobytes()


SAMPLES: dict[type, list] = {
    m.Hello: [
        m.Hello(m.PROTOCOL_VERSION, "node-a", "vm1",
                (m.RegionInfo("ram", 512 * 1024 * 1024), m.RegionInfo("vram", 8192, 4096)),
                vm=b"\x81\xa3cpu\x01"),
        m.Hello(7, "", "d", ()),
    ],
    m.Welcome: [m.Welcome(1, "node-b", 42, handed_over=True), m.Welcome(1, "n", 0)],
    m.Reject: [m.Reject("another source is already replicating this domain"), m.Reject("")],
    m.ManifestChunk: [m.ManifestChunk("ram", 1024, u64(1, 2, 2**64 - 1)),
                      m.ManifestChunk("ram", 0, b"")],
    m.ManifestEnd: [m.ManifestEnd()],
    m.PageBatch: [m.PageBatch(3, "ram", "zstd", u32(1, 2), u32(5), u64(99), 4096, b"\x28\xb5"),
                  m.PageBatch(0, "r", "none", b"", b"", b"", 0, b"")],
    m.EpochEnd: [m.EpochEnd(2**63 - 1), m.EpochEnd(0)],
    m.Ack: [m.Ack(17)],
    m.Ping: [m.Ping(2**64 - 1), m.Ping(-5)],
    m.Pong: [m.Pong(12345)],
    m.VerifyRequest: [m.VerifyRequest(1)],
    m.VerifyReply: [m.VerifyReply(1, 9, (b"\x00" * 16, b"\xff" * 16)), m.VerifyReply(2, 0, ())],
    m.ErrorMessage: [m.ErrorMessage("shadow store is full \u2603")],
    m.SwitchPrepare: [m.SwitchPrepare("sw-1", "planned")],
    m.SwitchReady: [m.SwitchReady("sw-1")],
    m.SwitchVerify: [m.SwitchVerify("sw-1", 10, (b"a" * 16,))],
    m.DeviceState: [m.DeviceState("sw-1", 65536, b"\x00\x01" * 100, True),
                    m.DeviceState("sw-1", 0, b"", False)],
    m.SwitchCommit: [m.SwitchCommit("sw-1")],
    m.SwitchResult: [m.SwitchResult("sw-1", "commit", True, "", 1712345678.25),
                     m.SwitchResult("sw-1", "prepare", False, "no disk")],
    m.SwitchAbort: [m.SwitchAbort("sw-1", "operator cancelled")],
    m.SwitchRequest: [m.SwitchRequest("live"), m.SwitchRequest("stop")],
    m.AuthChallenge: [m.AuthChallenge(b"\x07" * 32, "ABCD-EFGH"), m.AuthChallenge(b"", "")],
    m.AuthProof: [m.AuthProof(b"0\x82\x01\x0a" + b"c" * 200, b"s" * 64)],
    m.PrecopyStart: [m.PrecopyStart(1), m.PrecopyStart(2**40)],
    m.PrecopyReady: [m.PrecopyReady(7)],
    m.PrecopyData: [m.PrecopyData(3, "none", 4104, b"QEVM\x00\x00\x00\x03" + bytes(4096)),
                    m.PrecopyData(3, "zstd", 4104, zstandard.compress(b"QEVM" + bytes(4100))),
                    m.PrecopyData(3, "none", 0, b"")],
    m.PrecopyReturn: [m.PrecopyReturn(3, b"\x00\x07\x00\x00")],
    m.SwitchRelease: [m.SwitchRelease("abc123")],
    m.DiskOpen: [m.DiskOpen((m.DiskInfo(0, 64 << 20, "qcow2", 65536),
                             m.DiskInfo(1, 512, "raw", 65536))), m.DiskOpen(())],
    m.DiskManifest: [m.DiskManifest(0, 0, b"\x01" * 8 * 16), m.DiskManifest(1, 1024, b"")],
    m.DiskOpened: [m.DiskOpened((0, 2**40 + 7)), m.DiskOpened(())],
    m.DiskBatch: [m.DiskBatch(9, 0, "zstd", b"\x01\x00\x00\x00", b"\x02\x00\x00\x00",
                              b"h" * 8, 65536, b"z" * 100),
                  m.DiskBatch(1, 1, "none", b"", b"", b"", 0, b"")],
    m.DiskRoundEnd: [m.DiskRoundEnd(9)],
    m.DiskAck: [m.DiskAck(9)],
    m.SwitchDisks: [m.SwitchDisks("sw-1", (b"d" * 16,)), m.SwitchDisks("sw-2", ())],
}

ALL_SAMPLES = [s for cls in m.MESSAGE_TYPES for s in SAMPLES.get(cls, [])]


# ----------------------------------------------------------------------------------------------
# messages and the frame codec


def test_every_message_type_has_samples():
    assert set(SAMPLES) == set(m.MESSAGE_TYPES)
    assert len({cls.TYPE for cls in m.MESSAGE_TYPES}) == len(m.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", ALL_SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(msg):
    data = encode(msg)
    (n,) = HEADER.unpack_from(data)
    assert n == len(data) - 4
    out = decode_all(data)
    assert out == [msg]
    assert type(out[0]) is type(msg)
    # Field types survive exactly (tuples stay tuples, nested regions are RegionInfo).
    for f in dataclasses.fields(msg):
        assert type(getattr(out[0], f.name)) is type(getattr(msg, f.name))
    assert decode_body(data[4:]) == msg


def test_frame_layout_is_type_then_fields():
    msg = m.Ack(5)
    body = encode(msg)[4:]
    assert msgpack.unpackb(body) == [m.Ack.TYPE, 5]
    hello = m.Hello(1, "a", "b", (m.RegionInfo("ram", 8192),))
    assert msgpack.unpackb(encode(hello)[4:]) == [1, 1, "a", "b", [["ram", 8192, 4096]], b"", 0]


def test_optional_trailing_fields_may_be_omitted():
    # An older peer that does not send the defaulted fields is still understood.
    assert decode_all(raw_frame([m.Welcome.TYPE, 1, "n", 3])) == [m.Welcome(1, "n", 3)]
    assert decode_all(raw_frame([m.Hello.TYPE, 1, "n", "d", []])) == [m.Hello(1, "n", "d", ())]


@pytest.mark.parametrize("domain, regions, what", [
    ("vm", [["ram\x00", 4096, 4096]], "region name 'ram\\x00'"),    # wedged the store before
    ("vm", [["../../etc", 4096, 4096]], "region name"),
    ("vm", [[".hidden", 4096, 4096]], "region name"),
    ("vm", [["", 4096, 4096]], "region name"),
    ("vm", [["r" * 65, 4096, 4096]], "region name"),
    ("vm", [["räm", 4096, 4096]], "region name"),
    ("v\x00m", [], "domain name"),
    ("a/b", [], "domain name"),
    ("-vm", [], "domain name"),
])
def test_hello_names_restricted(domain, regions, what):
    with pytest.raises(MalformedFrame, match=re.escape(what)) as info:
        decode_all(raw_frame([m.Hello.TYPE, 1, "n", domain, regions, b""]))
    assert isinstance(info.value, ProtocolError) and "not allowed" in str(info.value)


def test_hello_names_at_the_limits_accepted():
    name = "a" + "B9._-" * 12 + "xyz"
    assert len(name) == 64
    (hello,) = decode_all(raw_frame([m.Hello.TYPE, 1, "n", name, [[name, 4096, 4096]], b""]))
    assert hello.domain == name and hello.regions[0].name == name


def test_float_field_accepts_int():
    out = decode_all(raw_frame([m.SwitchResult.TYPE, "s", "commit", True, "", 7]))
    assert out[0].resumed_at == 7.0 and type(out[0].resumed_at) is float


def test_byte_at_a_time_feeding():
    stream = b"".join(encode(s) for s in ALL_SAMPLES)
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i:i + 1])
        got.extend(dec.messages())
    assert got == ALL_SAMPLES
    assert dec.buffered == 0


def test_partial_frame_yields_nothing_until_complete():
    data = encode(m.Ping(1))
    dec = FrameDecoder()
    dec.feed(data[:-1])
    assert list(dec.messages()) == []
    assert dec.buffered == len(data) - 1
    dec.feed(data[-1:])
    assert list(dec.messages()) == [m.Ping(1)]


def test_several_frames_in_one_feed():
    data = encode(m.Ping(1)) + encode(m.Pong(1)) + encode(m.Ack(3))[:5]
    dec = FrameDecoder()
    dec.feed(data)
    assert list(dec.messages()) == [m.Ping(1), m.Pong(1)]
    assert dec.buffered == 5


def test_frame_too_large_from_header_alone():
    dec = FrameDecoder(max_frame=1 << 16)
    with pytest.raises(FrameTooLarge):
        dec.feed(HEADER.pack(0xFFFFFFFF))
    assert dec.buffered == 4          # nothing of the body was needed to decide


def test_frame_too_large_header_fed_byte_by_byte():
    dec = FrameDecoder(max_frame=1000)
    hdr = HEADER.pack(1001)
    for b in hdr[:3]:
        dec.feed(bytes([b]))
        assert list(dec.messages()) == []
    with pytest.raises(FrameTooLarge):
        dec.feed(hdr[3:])


def test_frame_too_large_after_a_good_frame():
    dec = FrameDecoder(max_frame=1000)
    dec.feed(encode(m.Ping(1)))
    assert list(dec.messages()) == [m.Ping(1)]
    with pytest.raises(FrameTooLarge):
        dec.feed(HEADER.pack(1 << 30))


def test_frame_too_large_second_header_in_same_feed():
    # A huge header behind a good frame is refused by feed itself, before anything more is
    # buffered for it, even though the good frame has not been taken out yet.
    dec = FrameDecoder(max_frame=1000)
    with pytest.raises(FrameTooLarge):
        dec.feed(encode(m.Ping(1)) + HEADER.pack(1 << 30))


def test_frame_at_exact_limit_is_accepted():
    msg = m.DeviceState("s", 0, b"x" * 100, False)
    data = encode(msg)
    assert decode_all(data, max_frame=len(data) - 4) == [msg]
    with pytest.raises(FrameTooLarge):
        decode_all(data, max_frame=len(data) - 5)


def test_frame_too_large_is_a_protocol_error():
    assert issubclass(FrameTooLarge, ProtocolError)
    assert issubclass(MalformedFrame, ProtocolError)
    assert issubclass(ProtocolError, ReplicatorError)


@pytest.mark.parametrize("obj", [
    {"type": 9}, 9, "ping", b"\x09", None, [], [None, 1], ["9", 1], [9.0, 1], [[9], 1],
    [{"t": 9}, 1], [b"\x09", 1],
    [True, 1, "n", "d", []],            # True == 1 == Hello.TYPE, but a bool is not a type id
], ids=repr)
def test_malformed_not_a_list_of_type_and_fields(obj):
    with pytest.raises(MalformedFrame):
        decode_all(raw_frame(obj))


@pytest.mark.parametrize("type_id", [0, 14, 19, 29, 56, 255, -1, 2**64 - 1])
def test_malformed_unknown_type(type_id):
    with pytest.raises(MalformedFrame, match="unknown message type"):
        decode_all(raw_frame([type_id, 1]))


@pytest.mark.parametrize("obj", [
    [m.Ping.TYPE],                                  # too few
    [m.Ping.TYPE, 1, 2],                            # too many
    [m.ManifestEnd.TYPE, 1],                        # fields for a field-less message
    [m.Welcome.TYPE, 1, "n"],                       # missing a required field
    [m.Welcome.TYPE, 1, "n", 3, False, "extra"],    # one more than all fields
    [m.Hello.TYPE, 1, "n", "d", [["ram"]]],         # nested RegionInfo too short
    [m.Hello.TYPE, 1, "n", "d", [["ram", 4096, 4096, 1]]],   # nested too long
], ids=repr)
def test_malformed_field_count(obj):
    with pytest.raises(MalformedFrame):
        decode_all(raw_frame(obj))


@pytest.mark.parametrize("obj", [
    [m.Ping.TYPE, True],                                            # bool where int expected
    [m.Ping.TYPE, 1.0],                                             # float where int
    [m.Ping.TYPE, "1"],
    [m.Reject.TYPE, b"reason"],                                     # bytes where str
    [m.Reject.TYPE, "x" * (MAX_STR + 1)],                           # insane string
    [m.ManifestChunk.TYPE, "ram", 0, "not bytes"],                  # str where bytes
    [m.ManifestChunk.TYPE, "ram", 0, [1, 2]],                       # list where bytes
    [m.ManifestChunk.TYPE, "ram", 0, {"a": b""}],                   # dict where bytes
    [m.Welcome.TYPE, 1, "n", 0, 1],                                 # int where bool
    [m.SwitchResult.TYPE, "s", "x", True, "", "now"],               # str where float
    [m.SwitchResult.TYPE, "s", "x", True, "", False],               # bool where float
    [m.VerifyReply.TYPE, 1, 1, b"abc"],                             # bytes where tuple
    [m.VerifyReply.TYPE, 1, 1, ["abc"]],                            # str inside tuple[bytes]
    [m.VerifyReply.TYPE, 1, 1, [b""] * (MAX_TUPLE + 1)],            # insane tuple
    [m.Hello.TYPE, 1, "n", "d", [{"name": "ram"}]],                 # dict where struct
    [m.Hello.TYPE, 1, "n", "d", [["ram", "4096"]]],                 # nested wrong type
    [m.Hello.TYPE, 1, "n", "d", [["ram", True]]],
    [m.PageBatch.TYPE, 1, "ram", "none", "", b"", b"", 0, b""],     # str where bytes
    [m.PageBatch.TYPE, 1, "ram", "none", b"", b"", b"", True, b""],  # bool where int
], ids=lambda o: repr(o)[:60])
def test_malformed_field_types(obj):
    with pytest.raises(MalformedFrame):
        decode_all(raw_frame(obj))


@pytest.mark.parametrize("body", [
    b"",                        # empty frame
    b"\xc1",                    # never-used msgpack byte
    b"\x93\x09",                # array of 3, truncated
    b"\x92\x09\x01\x01",        # trailing data after a complete object
    b"\xdd\xff\xff\xff\xff",    # array32 claiming 4 billion items
    b"\xc6\x7f\xff\xff\xff",    # bin32 claiming 2 GiB
    b"\x92\x09\xd4\x05\x00",    # ext type where int expected
    b"\x92\x09\xd6\xff\x00\x00\x00\x01",   # timestamp ext
    b"\x92\x0b\x81\x01\x02",    # map with an int key (strict_map_key)
    b"\x91" * 100_000 + b"\x09",  # absurd nesting
], ids=lambda b: b[:10].hex())
def test_malformed_garbage_msgpack(body):
    with pytest.raises(MalformedFrame):
        decode_all(frame(body))


def test_malformed_frame_consumed_then_stream_continues():
    # The decoder does not get stuck on a bad frame (the caller decides to drop the peer).
    dec = FrameDecoder()
    dec.feed(frame(b"\xc1") + encode(m.Ping(4)))
    it = dec.messages()
    with pytest.raises(MalformedFrame):
        next(it)
    assert list(dec.messages()) == [m.Ping(4)]


# --- hypothesis: arbitrary bytes ----------------------------------------------------------------

@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), chunk=st.integers(1, 64))
def test_fuzz_arbitrary_bytes_only_protocol_errors(data, chunk):
    dec = FrameDecoder(max_frame=1 << 16)
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i:i + chunk])
            for msg in dec.messages():
                assert type(msg) in m.MESSAGE_TYPES
    except (MalformedFrame, FrameTooLarge):
        pass


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.tuples(st.integers(0, 15),
                                 st.sampled_from([c.TYPE for c in m.MESSAGE_TYPES]),
                                 st.binary(max_size=200)), min_size=1, max_size=4),
       chunk=st.integers(1, 300))
def test_fuzz_well_framed_garbage_bodies(frames, chunk):
    # Frames with sane lengths whose bodies start like a message (fixarray, known type id) and
    # continue with arbitrary bytes.
    stream = b"".join(frame(bytes([0x90 | nfields, t]) + tail) for nfields, t, tail in frames)
    dec = FrameDecoder(max_frame=1 << 16)
    try:
        for i in range(0, len(stream), chunk):
            dec.feed(stream[i:i + chunk])
            for msg in dec.messages():
                assert type(msg) in m.MESSAGE_TYPES
    except (MalformedFrame, FrameTooLarge):
        pass


# --- hypothesis: structurally valid messages with mutated fields ---------------------------------

_ints = st.integers(-(2**63), 2**64 - 1)
_texts = st.text(max_size=40)
_bins = st.binary(max_size=40)


def _value_strategy(tp) -> st.SearchStrategy:
    if tp is int:
        return _ints
    if tp is float:
        return st.floats(allow_nan=False)
    if tp is bool:
        return st.booleans()
    if tp is str:
        return _texts
    if tp is bytes:
        return _bins
    if typing.get_origin(tp) is tuple:
        return st.lists(_value_strategy(typing.get_args(tp)[0]), max_size=4).map(tuple)
    if dataclasses.is_dataclass(tp):
        return _message_strategy(tp)
    raise TypeError(tp)


# Fields the messages restrict to m.SAFE_NAME (they become file names on the sink).
NAME_FIELDS = {(m.Hello, "domain"), (m.RegionInfo, "name")}
_names = st.from_regex(m.SAFE_NAME, fullmatch=True)


def _message_strategy(cls) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    return st.builds(cls, **{f.name: _names if (cls, f.name) in NAME_FIELDS
                             else _value_strategy(hints[f.name])
                             for f in dataclasses.fields(cls)})


messages_st = st.one_of(*[_message_strategy(c) for c in m.MESSAGE_TYPES])

_any_value = st.recursive(
    st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=False), _texts, _bins),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)


def _conforms(v, tp) -> bool:
    """Does a decoded msgpack value have exactly the shape the annotation asks for?"""
    if tp is int:
        return type(v) is int
    if tp is float:
        return type(v) in (int, float) and float(v) == v
    if tp is bool:
        return type(v) is bool
    if tp is str:
        return type(v) is str and len(v) <= MAX_STR
    if tp is bytes:
        return type(v) is bytes
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        return type(v) is list and len(v) <= MAX_TUPLE and all(_conforms(x, inner) for x in v)
    if dataclasses.is_dataclass(tp):
        fields = dataclasses.fields(tp)
        hints = typing.get_type_hints(tp)
        required = sum(1 for f in fields if f.default is dataclasses.MISSING
                       and f.default_factory is dataclasses.MISSING)
        return (type(v) is list and required <= len(v) <= len(fields)
                and all(_conforms(x, hints[f.name]) for x, f in zip(v, fields))
                and all(m.SAFE_NAME.fullmatch(x) for x, f in zip(v, fields)
                        if (tp, f.name) in NAME_FIELDS))
    raise TypeError(tp)


@settings(max_examples=500, deadline=None)
@given(msg=messages_st)
def test_fuzz_round_trip_any_valid_message(msg):
    assert decode_all(encode(msg)) == [msg]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg=messages_st, data=st.data())
def test_fuzz_mutated_fields(msg, data):
    body = msgpack.unpackb(encode(msg)[4:])
    op = data.draw(st.sampled_from(["replace", "retype", "drop", "append", "truncate"]))
    if op == "replace" and len(body) > 1:
        i = data.draw(st.integers(1, len(body) - 1))
        body[i] = data.draw(_any_value)
    elif op == "retype":
        body[0] = data.draw(st.one_of(st.sampled_from([c.TYPE for c in m.MESSAGE_TYPES]),
                                      _any_value))
    elif op == "drop" and len(body) > 1:
        del body[data.draw(st.integers(1, len(body) - 1))]
    elif op == "append":
        body.append(data.draw(_any_value))
    else:
        body = body[:data.draw(st.integers(0, len(body)))]
    wire = raw_frame(body)
    by_type = {c.TYPE: c for c in m.MESSAGE_TYPES}
    cls = by_type.get(body[0]) if body and type(body[0]) is int else None
    ok = cls is not None and _conforms(body[1:], cls)
    if ok:
        (out,) = decode_all(wire)
        assert type(out) is cls
        hints = typing.get_type_hints(cls)
        for f, v in zip(dataclasses.fields(cls), body[1:]):
            got = getattr(out, f.name)
            tp = hints[f.name]
            if tp is float:
                assert type(got) is float and got == v
            elif typing.get_origin(tp) is tuple:
                assert type(got) is tuple and len(got) == len(v)
            elif not dataclasses.is_dataclass(tp):
                assert type(got) is type(v) and got == v
    else:
        with pytest.raises(MalformedFrame):
            decode_all(wire)


# ----------------------------------------------------------------------------------------------
# page batches

NPAGES = 64


def make_pages(rng: np.random.Generator, n: int, zero_at: set[int]) -> bytearray:
    # Distinct pages that compress (random 512-byte runs, each repeated): random pages
    # would travel uncompressed (Compressor.pack) and not exercise the codec.
    buf = bytearray(b"".join(rng.bytes(512) * (PAGE_SIZE // 512) for _ in range(n)))
    for i in zero_at:
        buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    return buf


def build(codec_name: str, *, n=12, zero_at=frozenset({1, 4, 5}), seed=1, epoch=3,
          indices=None):
    rng = np.random.default_rng(seed)
    buf = make_pages(rng, n, set(zero_at))
    idx = (np.array(indices, dtype=np.int64) if indices is not None
           else np.sort(rng.choice(NPAGES, size=n, replace=False)).astype(np.int64))
    hashes = hash_pages(buf, n)
    enc = encode_batch(epoch, "ram", idx, memoryview(buf), hashes, Compressor(codec_name))
    return enc, idx, buf, hashes


@pytest.mark.parametrize("codec_name", CODECS)
def test_batch_round_trip_with_zero_pages(codec_name):
    zero_at = {1, 4, 5}
    n = 12
    enc, idx, buf, hashes = build(codec_name, n=n, zero_at=zero_at)
    msg = enc.message
    assert enc.zero_pages == 3 and enc.data_pages == n - 3 and enc.raw_bytes == n * PAGE_SIZE
    assert msg.codec == codec_name and msg.epoch == 3 and msg.region == "ram"
    zero_mask = np.isin(np.arange(n), sorted(zero_at))
    assert np.frombuffer(msg.zero, "<u4").tolist() == idx[zero_mask].tolist()
    assert np.frombuffer(msg.pages, "<u4").tolist() == idx[~zero_mask].tolist()
    assert np.frombuffer(msg.hashes, "<u8").tolist() == hashes[~zero_mask].tolist()
    assert msg.raw_len == (n - 3) * PAGE_SIZE
    # Zero pages travel as indices only: the payload only carries the data pages.
    if codec_name == "none":
        assert len(msg.payload) == (n - 3) * PAGE_SIZE
    assert len(msg.payload) < n * PAGE_SIZE

    # Through the frame codec and back.
    (wire_msg,) = decode_all(encode(msg))
    dec = decode_batch(wire_msg, NPAGES)
    assert dec.zero.tolist() == idx[zero_mask].tolist()
    assert dec.pages.tolist() == idx[~zero_mask].tolist()
    assert dec.hashes.tolist() == hashes[~zero_mask].tolist()
    arr = np.frombuffer(bytes(buf), np.uint8).reshape(n, PAGE_SIZE)
    assert dec.data == arr[~zero_mask].tobytes()


@pytest.mark.parametrize("codec_name", CODECS)
def test_batch_all_zero_pages_has_empty_payload(codec_name):
    enc, idx, _, _ = build(codec_name, n=5, zero_at=set(range(5)))
    assert enc.message.payload == b"" and enc.message.pages == b"" and enc.message.raw_len == 0
    dec = decode_batch(enc.message, NPAGES)
    assert dec.zero.tolist() == idx.tolist() and dec.pages.size == 0 and dec.data == b""


@pytest.mark.parametrize("codec_name", CODECS)
def test_batch_no_zero_pages(codec_name):
    enc, idx, buf, _ = build(codec_name, n=6, zero_at=set())
    assert enc.message.zero == b""
    dec = decode_batch(enc.message, NPAGES)
    assert dec.pages.tolist() == idx.tolist() and dec.data == bytes(buf)


def test_zero_hash_without_zero_content_is_not_a_zero_page():
    # A hash claiming "zero" is not enough: the bytes are checked too.
    rng = np.random.default_rng(5)
    buf = bytearray(rng.bytes(2 * PAGE_SIZE))
    hashes = np.array([ZERO_HASH, ZERO_HASH], dtype=np.uint64)
    enc = encode_batch(1, "ram", np.array([3, 4]), memoryview(buf), hashes, Compressor("none"))
    assert enc.zero_pages == 0 and enc.message.zero == b""
    assert np.frombuffer(enc.message.pages, "<u4").tolist() == [3, 4]
    with pytest.raises(IntegrityError):       # and the lie is caught on the other side
        decode_batch(enc.message, NPAGES)


def test_compression_shrinks_compressible_pages():
    buf = bytearray(b"abcd" * (8 * PAGE_SIZE // 4))
    hashes = hash_pages(buf, 8)
    for name in ("zstd", "lz4"):
        enc = encode_batch(1, "ram", np.arange(8), memoryview(buf), hashes, Compressor(name))
        assert len(enc.message.payload) < PAGE_SIZE
        assert decode_batch(enc.message, NPAGES).data == bytes(buf)


def test_unknown_compressor_codec():
    with pytest.raises(ValueError):
        Compressor("gzip")


@pytest.mark.parametrize("pos", [0, 1234, 5 * PAGE_SIZE - 1])
def test_flipped_payload_byte_is_integrity_error(pos):
    enc, _, _, _ = build("none", n=8, zero_at={2})
    payload = bytearray(enc.message.payload)
    payload[pos] ^= 0x01
    bad = dataclasses.replace(enc.message, payload=bytes(payload))
    with pytest.raises(IntegrityError):
        decode_batch(bad, NPAGES)


def test_flipped_hash_is_integrity_error():
    enc, _, _, _ = build("zstd", n=4, zero_at=set())
    h = bytearray(enc.message.hashes)
    h[-1] ^= 0x80
    with pytest.raises(IntegrityError):
        decode_batch(dataclasses.replace(enc.message, hashes=bytes(h)), NPAGES)


def test_index_beyond_region():
    enc, idx, _, _ = build("none", n=4, zero_at={0}, indices=[0, 1, 2, NPAGES - 1])
    assert decode_batch(enc.message, NPAGES).pages.tolist() == [1, 2, NPAGES - 1]
    with pytest.raises(MalformedFrame):
        decode_batch(enc.message, NPAGES - 1)           # a data page beyond the end
    enc2, _, _, _ = build("none", n=2, zero_at={1}, indices=[0, NPAGES])
    with pytest.raises(MalformedFrame):
        decode_batch(enc2.message, NPAGES)              # a zero page beyond the end


@pytest.mark.parametrize("field,value", [
    ("zero", b"\x01\x00\x00"),
    ("pages", u32(1) + b"\x00"),
    ("hashes", u64(1)[:7]),
])
def test_ragged_arrays(field, value):
    enc, _, _, _ = build("none", n=1, zero_at=set(), indices=[1])
    with pytest.raises(MalformedFrame):
        decode_batch(dataclasses.replace(enc.message, **{field: value}), NPAGES)


def test_batch_page_count_limit():
    n = MAX_BATCH_PAGES
    ok = m.PageBatch(1, "ram", "none", u32(*range(n)), b"", b"", 0, b"")
    assert decode_batch(ok, n + 1).zero.size == n
    too_many = m.PageBatch(1, "ram", "none", u32(*range(n + 1)), b"", b"", 0, b"")
    with pytest.raises(MalformedFrame):
        decode_batch(too_many, n + 1)
    mixed = m.PageBatch(1, "ram", "none", u32(*range(n)), u32(n), u64(ZERO_HASH), PAGE_SIZE,
                        bytes(PAGE_SIZE))
    with pytest.raises(MalformedFrame):
        decode_batch(mixed, n + 1)


def test_hash_count_mismatch():
    enc, _, _, _ = build("none", n=2, zero_at=set())
    with pytest.raises(MalformedFrame):
        decode_batch(dataclasses.replace(enc.message, hashes=enc.message.hashes[:8]), NPAGES)


@pytest.mark.parametrize("codec_name", CODECS)
@pytest.mark.parametrize("delta", [-PAGE_SIZE, PAGE_SIZE, -1, 1])
def test_raw_len_mismatch(codec_name, delta):
    enc, _, _, _ = build(codec_name, n=3, zero_at=set())
    with pytest.raises(MalformedFrame):
        decode_batch(dataclasses.replace(enc.message, raw_len=enc.message.raw_len + delta),
                     NPAGES)


def test_payload_shorter_than_raw_len_codec_none():
    enc, _, _, _ = build("none", n=3, zero_at=set())
    with pytest.raises(MalformedFrame):
        decode_batch(dataclasses.replace(enc.message, payload=enc.message.payload[:-1]), NPAGES)


def test_unknown_codec_in_batch():
    enc, _, _, _ = build("none", n=1, zero_at=set())
    with pytest.raises(MalformedFrame):
        decode_batch(dataclasses.replace(enc.message, codec="gzip"), NPAGES)


@pytest.mark.parametrize("codec_name", ["zstd", "lz4"])
def test_garbage_compressed_payload(codec_name):
    enc, _, _, _ = build(codec_name, n=2, zero_at=set())
    with pytest.raises(MalformedFrame):
        decode_batch(dataclasses.replace(enc.message, payload=b"\x00garbage" * 10), NPAGES)


def _bomb_batch(payload: bytes, npages: int = 1, codec_name: str = "zstd") -> m.PageBatch:
    """A batch claiming ``npages`` pages whose payload expands to far more."""
    page = bytes(PAGE_SIZE)
    h = xxhash.xxh3_64_intdigest(page)
    return m.PageBatch(1, "ram", codec_name, b"", u32(*range(npages)), u64(*[h] * npages),
                       npages * PAGE_SIZE, payload)


def test_zstd_decompression_bomb_is_malformed():
    payload = zstandard.ZstdCompressor().compress(bytes(16 * 1024 * 1024))
    assert len(payload) < 4096
    with pytest.raises(MalformedFrame):
        decode_batch(_bomb_batch(payload), NPAGES)


def test_zstd_bomb_without_content_size_is_malformed():
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 20))
    with pytest.raises(MalformedFrame):
        decode_batch(_bomb_batch(payload), NPAGES)


def test_zstd_bomb_does_not_allocate_its_declared_size():
    # raw_len is one page: decoding must never need (much) more than that, whatever the zstd
    # frame header claims. A 2 KB payload declaring 64 MiB must not cost 64 MiB.
    payload = zstandard.ZstdCompressor().compress(bytes(64 * 1024 * 1024))
    batch = _bomb_batch(payload)
    tracemalloc.start()
    try:
        with pytest.raises(MalformedFrame):
            decode_batch(batch, NPAGES)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"decoding a one-page batch allocated {peak} bytes"


def test_zstd_bomb_declaring_a_terabyte_is_malformed():
    # Hand-made frame: header with single-segment flag and an 8-byte content size of 1 TiB,
    # then one RLE block. It must be refused as malformed, not crash the receiver.
    header = struct.pack("<I", 0xFD2FB528) + bytes([0xE0]) + struct.pack("<Q", 1 << 40)
    block = ((PAGE_SIZE << 3) | (1 << 1) | 1).to_bytes(3, "little") + b"\x00"
    payload = header + block
    assert zstandard.frame_content_size(payload) == 1 << 40
    with pytest.raises(MalformedFrame):
        decode_batch(_bomb_batch(payload), NPAGES)


def test_lz4_bomb_is_malformed():
    payload = lz4.block.compress(bytes(1 << 20), store_size=False)
    with pytest.raises(MalformedFrame):
        decode_batch(_bomb_batch(payload, codec_name="lz4"), NPAGES)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 16), zero_bits=st.integers(0, 2**16 - 1),
       codec_name=st.sampled_from(CODECS), seed=st.integers(0, 2**32 - 1))
def test_fuzz_batch_round_trip(n, zero_bits, codec_name, seed):
    rng = np.random.default_rng(seed)
    zero_at = {i for i in range(n) if zero_bits >> i & 1}
    buf = make_pages(rng, n, zero_at)
    idx = np.sort(rng.choice(NPAGES, size=n, replace=False)).astype(np.int64)
    hashes = hash_pages(buf, n)
    enc = encode_batch(1, "ram", idx, memoryview(buf), hashes, Compressor(codec_name))
    dec = decode_batch(decode_all(encode(enc.message))[0], NPAGES)
    assert sorted(dec.zero.tolist() + dec.pages.tolist()) == idx.tolist()
    assert set(dec.zero.tolist()) == {int(idx[i]) for i in zero_at}
    pos = {int(p): i for i, p in enumerate(idx)}
    for j, p in enumerate(dec.pages.tolist()):
        assert dec.data[j * PAGE_SIZE:(j + 1) * PAGE_SIZE] == \
            bytes(buf[pos[p] * PAGE_SIZE:(pos[p] + 1) * PAGE_SIZE])


# --- schema limits: what a hostile frame can make msgpack build -----------------------------------

_N = 4 * 1024 * 1024


@pytest.mark.parametrize("shape", ["4M empty arrays", "deep arrays of ints", "4096 empty maps",
                                   "4096 arrays of 4096", "ext"])
@pytest.mark.parametrize("cls", m.MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_hostile_structure_is_refused_before_msgpack_builds_it(cls, shape):
    """Typed as any message, a frame of millions of nested objects is refused as malformed
    while allocating next to nothing (the old decoder built ~300 MiB of lists from 4 MiB)."""
    head = b"\x92" + bytes([cls.TYPE])
    body = head + {
        "4M empty arrays": b"\xdd" + struct.pack(">I", _N) + b"\x90" * _N,
        "deep arrays of ints": (b"\xdc\x10\x00" + b"\x01" * 4095) * 1000 + b"\xc0",
        "4096 empty maps": b"\xdc\x10\x00" + b"\x80" * 4096,
        "4096 arrays of 4096": b"\xdc\x10\x00" + (b"\xdc\x10\x00" + b"\xc0" * 4096) * 4096,
        "ext": b"\xc7\x00\x05" * 4096,
    }[shape]
    tracemalloc.start()
    try:
        with pytest.raises(MalformedFrame):
            decode_body(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024, (cls.__name__, shape, peak)


def test_messages_with_tuples_are_capped_in_size():
    small = m.Hello(m.PROTOCOL_VERSION, "n", "vm", (m.RegionInfo("ram", 4096),), vm=b"v" * 1000)
    assert decode_all(encode(small)) == [small]
    big = dataclasses.replace(small, vm=b"v" * codec.MAX_LISTY_FRAME)
    with pytest.raises(MalformedFrame, match="larger than any such message"):
        decode_all(encode(big))
    # The widest legitimate ones still decode.
    wide = m.Hello(m.PROTOCOL_VERSION, "n", "vm",
                   tuple(m.RegionInfo(f"r{i}", 4096) for i in range(MAX_TUPLE)))
    assert decode_all(encode(wide)) == [wide]
    reply = m.VerifyReply(1, 2, (b"\x00" * 16,) * MAX_TUPLE)
    assert decode_all(encode(reply)) == [reply]


@pytest.mark.parametrize("body", [
    b"\xdc\x00\x02\x09\x01",                # array16 header: our encoder writes fixarrays
    b"\x92\xcc\x09\x01",                    # type as uint8
    b"\x92\x09\xc7\x00\x05",                # zero-length ext where an int belongs
], ids=lambda b: b.hex())
def test_non_canonical_frame_starts_are_refused(body):
    with pytest.raises(MalformedFrame):
        decode_all(frame(body))


def test_float_field_refuses_an_integer_it_cannot_hold_exactly():
    """2**53 + 1 as a float is 2**53: decoding must refuse it, not change the number (found
    by the property test above)."""
    body = msgpack.unpackb(encode(m.SwitchResult("s", "commit", True, "", 0.0))[4:])
    body[5] = 2**53 + 1
    with pytest.raises(MalformedFrame, match="not exactly a float"):
        decode_all(raw_frame(body))
    body[5] = 2**53
    (out,) = decode_all(raw_frame(body))
    assert out.resumed_at == float(2**53)


def test_incompressible_batches_travel_as_they_are_and_pause_compression():
    rng = np.random.default_rng(7)
    comp = Compressor("zstd", skip_after_miss=2)
    compressible = b"".join(rng.bytes(512) * 8 for _ in range(4))
    random = rng.bytes(4 * PAGE_SIZE)
    codec, payload = comp.pack(compressible)
    assert codec == "zstd" and len(payload) < len(compressible) // 4
    codec, payload = comp.pack(random)
    assert codec == "none" and bytes(payload) == random
    # The next two are not tried, however well they would compress; then compression resumes.
    assert [comp.pack(compressible)[0] for _ in range(3)] == ["none", "none", "zstd"]
    # What each batch says it is decodes on the other side, either way.
    idx = np.arange(4, dtype=np.int64)
    for buf in (random, compressible):
        enc = encode_batch(1, "ram", idx, memoryview(buf), hash_pages(buf, 4), comp)
        frame = encode(enc.message)
        dec = decode_batch(decode_body(frame[4:]), NPAGES)
        assert dec.data == buf
    assert Compressor("none").pack(random) == ("none", random)
