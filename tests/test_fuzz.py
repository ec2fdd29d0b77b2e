"""Fuzzing the wire: the frame codec in bulk, and a live sink under hostile connections.

Part 1 feeds well over 100,000 generated frames to :class:`FrameDecoder` and ``decode_body``
(random bytes, valid frames with mutated bytes, valid frames whose fields carry wrong types or
absurd values, truncated frames, oversized length headers). A fast deterministic PRNG drives the
bulk so a failure reproduces from its seed; hypothesis adds shrinking on top.

Part 2 points thousands of frames at a running sink that holds a verified shadow: garbage before
authentication (plain TCP and TLS), then, authenticated as the paired source, malformed and
hostile frames. The sink must drop each such connection, keep its shadow untouched and keep
serving the real source.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import ssl
import struct
import time
import typing
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.config import PAGE_SIZE
from replicator.errors import FrameTooLarge, IntegrityError, ProtocolError
from replicator.identity import Identity, authenticate_to_server
from replicator.link import Link
from replicator.pagefile import hash_file
from replicator.wire import messages as m
from replicator.wire.codec import HEADER, FrameDecoder, decode_body, encode
from replicator.wire.pages import (MAX_BATCH_PAGES, ZERO_HASH, Compressor, decode_batch,
                                   encode_batch, hash_pages)

from .conftest import Pair, file_configs, files_equal, wait_until

MiB = 1024 * 1024
MAX_FRAME = 1 << 16            # the decoder limit used for the bulk (small: oversize is cheap)

# ================================================================================================
# Part 1: the codec
# ================================================================================================

_HINTS = {cls: typing.get_type_hints(cls) for cls in m.MESSAGE_TYPES + (m.RegionInfo, m.DiskInfo)}
_EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]


def _rand_value(rng: random.Random, tp) -> typing.Any:
    """A random *valid* value for an annotation."""
    if tp is int:
        return rng.choice(_EDGE_INTS) if rng.random() < 0.2 else rng.randrange(-1000, 1 << 40)
    if tp is float:
        return rng.uniform(-1e9, 1e9)
    if tp is bool:
        return rng.random() < 0.5
    if tp is str:
        return "".join(rng.choice("abcdefXYZ-_.é☃0123") for _ in range(rng.randrange(0, 24)))
    if tp is bytes:
        return rng.randbytes(rng.randrange(0, 64))
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        return tuple(_rand_value(rng, inner) for _ in range(rng.randrange(0, 4)))
    if dataclasses.is_dataclass(tp):
        return _rand_message(rng, tp)
    raise TypeError(tp)


def _rand_message(rng: random.Random, cls: type) -> typing.Any:
    hints = _HINTS[cls]
    return cls(*(_rand_name(rng) if (cls, f.name) in _NAME_FIELDS
                 else _rand_value(rng, hints[f.name]) for f in dataclasses.fields(cls)))


# Fields restricted to m.SAFE_NAME (file names on the sink).
_NAME_FIELDS = {(m.Hello, "domain"), (m.RegionInfo, "name")}


def _rand_name(rng: random.Random) -> str:
    tail = "".join(rng.choice("abcXYZ019-_.") for _ in range(rng.randrange(0, 24)))
    return rng.choice("abXY09") + tail


def _real_batches(n: int) -> list[m.PageBatch]:
    """PageBatches as the source builds them (real pages, all codecs, zero pages mixed in)."""
    nrng = np.random.default_rng(7)
    out = []
    for i in range(n):
        codec = ("zstd", "lz4", "none")[i % 3]
        count = 1 + i % 6
        buf = bytearray(nrng.bytes(count * PAGE_SIZE))
        if i % 2:
            buf[:PAGE_SIZE] = bytes(PAGE_SIZE)
        idx = np.sort(nrng.choice(4096, size=count, replace=False)).astype(np.int64)
        enc = encode_batch(5, "ram0", idx, memoryview(buf), hash_pages(buf, count),
                           Compressor(codec))
        out.append(enc.message)
    return out


_HOSTILE = [
    None, True, False, 0.5, float("inf"), float("nan"), -1, 2**64 - 1, -(2**63), 2**63,
    "", "x" * 70_000, b"", b"\x00" * 300, [], [1, 2, 3], [[[[]]]], {}, {"a": 1},
    {"k": [None, {"z": b"q"}]}, msgpack.ExtType(5, b"ext"), msgpack.Timestamp(1, 2),
    ["ram0", 1 << 40, 4096], [["ram0", -4096]], ["a"] * 5000,
]


def _hostile_values(rng: random.Random) -> list:
    return _HOSTILE + [rng.randbytes(rng.randrange(1, 40)), rng.randrange(-(2**63), 2**64)]


class Tally:
    """Outcome counts; anything but a ProtocolError is recorded as a failure."""

    def __init__(self) -> None:
        self.frames = 0
        self.decoded = 0
        self.malformed = 0
        self.too_large = 0
        self.incomplete = 0
        self.failures: list[str] = []

    def bad(self, what: str, exc: BaseException, data: bytes) -> None:
        if len(self.failures) < 10:
            self.failures.append(f"{what}: {type(exc).__name__}: {exc!r} on {data[:80]!r}"
                                 f"{'...' if len(data) > 80 else ''} ({len(data)} bytes)")


def _feed_stream(t: Tally, kind: str, stream: bytes, rng: random.Random,
                 max_frame: int = MAX_FRAME) -> None:
    """Feed a byte stream in random chunks, draining after each feed (the decoder contract)."""
    dec = FrameDecoder(max_frame)
    pos = 0
    try:
        while pos < len(stream):
            step = rng.choice((1, 3, 7, 64, 512, 1 << 20))
            dec.feed(stream[pos:pos + step])
            pos += step
            for msg in dec.messages():
                if type(msg) not in m.MESSAGE_TYPES:
                    raise AssertionError(f"decoder produced a {type(msg).__name__}")
                t.decoded += 1
        if dec.buffered:
            t.incomplete += 1
    except FrameTooLarge:
        t.too_large += 1
    except ProtocolError:
        t.malformed += 1
    except Exception as exc:                           # noqa: BLE001 - that is the test
        t.bad(f"FrameDecoder[{kind}]", exc, stream)


def _decode_body_only(t: Tally, kind: str, body: bytes) -> None:
    try:
        msg = decode_body(body)
    except ProtocolError:
        return
    except Exception as exc:                           # noqa: BLE001
        t.bad(f"decode_body[{kind}]", exc, body)
        return
    if type(msg) not in m.MESSAGE_TYPES:
        t.bad(f"decode_body[{kind}]", AssertionError(type(msg).__name__), body)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(5)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
        elif op == 3 and b:
            del b[rng.randrange(len(b))]
        elif b:
            # Interesting msgpack markers: nil, never-used, map/array/str/bin/ext headers.
            b[rng.randrange(len(b))] = rng.choice(
                (0xc0, 0xc1, 0xdc, 0xdd, 0xde, 0xdf, 0xd9, 0xda, 0xdb, 0xc4, 0xc5, 0xc6,
                 0xc7, 0xd4, 0xd8, 0xcf, 0xd3, 0xcb, 0x9f, 0x8f, 0xbf))
    return bytes(b)


def _retyped_body(rng: random.Random, msg: typing.Any) -> bytes:
    """The message's msgpack list with one field (or the type, or the arity) made hostile."""
    obj = msgpack.unpackb(encode(msg)[4:], raw=False)
    op = rng.randrange(6)
    hostile = _hostile_values(rng)
    if op <= 2 and len(obj) > 1:
        obj[rng.randrange(1, len(obj))] = rng.choice(hostile)
    elif op == 3:
        obj[0] = rng.choice(hostile + [99, 255, -5, 2**40, 6.0, "6"])
    elif op == 4:
        obj.extend(rng.choice(hostile) for _ in range(rng.randrange(1, 4)))
    else:
        # Wrong nested shape: a RegionInfo list/tuple inside Hello or VerifyReply digests.
        if isinstance(msg, m.Hello):
            obj[4] = [rng.choice(hostile) for _ in range(rng.randrange(1, 3))]
        elif isinstance(msg, (m.VerifyReply, m.SwitchVerify)):
            obj[-1] = [rng.choice(hostile)]
        else:
            obj = obj[:rng.randrange(0, len(obj))]
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        return msgpack.packb([obj[0] if obj and type(obj[0]) is int else 6, None],
                             use_bin_type=True)


def run_codec_fuzz(seed: int, n: int) -> Tally:
    rng = random.Random(seed)
    t = Tally()
    pool = [_rand_message(rng, cls) for cls in m.MESSAGE_TYPES for _ in range(40)]
    pool += _real_batches(60)
    frames = [encode(x) for x in pool]
    # Valid frames decode to what was encoded (else the mutations below would be meaningless).
    for msg, fr in zip(pool, frames):
        dec = FrameDecoder()
        dec.feed(fr)
        got = list(dec.messages())
        assert got == [msg], (msg, got)
    deep = b"\x91" * 5000 + b"\xc0"
    for i in range(n):
        kind = i % 8
        t.frames += 1
        if kind == 0:                                  # random bytes, random length
            data = rng.randbytes(rng.randrange(0, 700))
            if rng.random() < 0.5 and len(data) >= 4:  # ...with a plausible length prefix
                data = HEADER.pack(len(data) - 4) + data[4:]
            _feed_stream(t, "random", data, rng)
            _decode_body_only(t, "random", data[4:])
        elif kind in (1, 2):                           # valid frame, bytes mutated
            src = rng.choice(frames)
            mutated = _mutate(rng, src)
            if rng.random() < 0.7:                     # keep the header honest: body fuzz
                body = _mutate(rng, src[4:])
                mutated = HEADER.pack(len(body)) + body
            _feed_stream(t, "mutated", mutated, rng)
            _decode_body_only(t, "mutated", mutated[4:])
        elif kind in (3, 4):                           # wrong types / huge values
            body = _retyped_body(rng, rng.choice(pool))
            if len(body) > MAX_FRAME:
                _feed_stream(t, "retyped", HEADER.pack(len(body)) + body, rng,
                             max_frame=1 << 20)
            else:
                _feed_stream(t, "retyped", HEADER.pack(len(body)) + body, rng)
            _decode_body_only(t, "retyped", body)
        elif kind == 5:                                # truncated frames: must just wait
            src = rng.choice(frames)
            cut = rng.randrange(0, len(src))
            dec = FrameDecoder(MAX_FRAME)
            try:
                dec.feed(src[:cut])
                got = list(dec.messages())
            except Exception as exc:                   # noqa: BLE001
                t.bad("truncated", exc, src[:cut])
            else:
                if got or dec.buffered != cut:
                    t.bad("truncated", AssertionError(f"yielded {got}"), src[:cut])
                t.incomplete += 1
            _decode_body_only(t, "truncated", src[4:max(4, cut)])
        elif kind == 6:                                # oversized length headers
            _oversized(t, rng, rng.choice(frames))
        else:                                          # several frames back to back, one bad
            parts = [rng.choice(frames) for _ in range(rng.randrange(1, 5))]
            j = rng.randrange(len(parts))
            parts[j] = rng.choice((
                HEADER.pack(len(deep)) + deep,
                _mutate(rng, parts[j]),
                HEADER.pack(0),
                HEADER.pack(1) + b"\xc1",
                HEADER.pack(3) + b"\x92\x09\xc0",       # Ping(nonce=None)
                HEADER.pack(10) + b"\x92\x09\xc7\x05\xff" + b"\x00" * 5,  # bad timestamp ext
                HEADER.pack(6) + b"\x92\x09\x81\x01\x02\xc0",  # int map key (strict)
            ))
            _feed_stream(t, "stream", b"".join(parts), rng)
    return t


def _oversized(t: Tally, rng: random.Random, good: bytes) -> None:
    """A header declaring more than max_frame must be refused before any of its body is fed.

    The body is fed after the header in random chunks; the decoder must raise FrameTooLarge no
    later than the feed that completes the header (draining messages after every feed).
    """
    limit = rng.choice((MAX_FRAME, 1000, 4096 * 256 * 2))
    n = rng.choice((limit + 1, limit + 2, 2 * limit, 2**31, 2**32 - 1, rng.randrange(limit + 1,
                                                                                   2**32)))
    prefix = good if rng.random() < 0.5 and len(good) - 4 <= limit else b""
    header_end = len(prefix) + 4
    stream = prefix + HEADER.pack(n) + rng.randbytes(rng.randrange(0, 3000))
    dec = FrameDecoder(limit)
    pos = 0
    try:
        while pos < len(stream):
            step = rng.choice((1, 2, 3, 5, 100, 4096))
            dec.feed(stream[pos:pos + step])
            pos += step
            list(dec.messages())
            if pos >= header_end:
                raise AssertionError(f"header of {n} bytes (limit {limit}) completed at byte "
                                     f"{header_end} but nothing was raised after {pos} bytes")
    except FrameTooLarge:
        t.too_large += 1
        # Only the chunk that completed the header may have carried body bytes with it (the
        # good frame before it may still be buffered: feed refuses before it is taken out).
        if dec.buffered > len(prefix) + 4 + 4096:
            t.bad("oversized", AssertionError(f"buffered {dec.buffered} bytes"), stream[:64])
    except Exception as exc:                           # noqa: BLE001
        t.bad("oversized", exc, stream[:64])


def test_codec_fuzz_bulk_only_protocol_errors():
    t0 = time.monotonic()
    total = Tally()
    for seed in range(4):                              # 4 x 30,000 frames
        t = run_codec_fuzz(seed, 30_000)
        for k in ("frames", "decoded", "malformed", "too_large", "incomplete"):
            setattr(total, k, getattr(total, k) + getattr(t, k))
        total.failures += [f"seed {seed}: {f}" for f in t.failures]
    elapsed = time.monotonic() - t0
    print(f"\ncodec fuzz: {total.frames} frames in {elapsed:.1f}s: {total.decoded} messages "
          f"decoded, {total.malformed} malformed, {total.too_large} too large, "
          f"{total.incomplete} incomplete")
    assert not total.failures, "non-protocol errors:\n" + "\n".join(total.failures)
    assert total.frames >= 100_000
    # The generator must actually reach every outcome, or the fuzz proves little.
    assert total.decoded > 5_000 and total.malformed > 30_000
    assert total.too_large >= 15_000 and total.incomplete > 10_000


def test_codec_rejects_oversized_header_before_body_even_after_partial_frames():
    """Explicit cases: header split across feeds, after a partial good frame, at the limit."""
    good = encode(m.Ping(7))
    for limit in (len(good) - 4, 1000):
        for split in range(1, 4):
            dec = FrameDecoder(limit)
            dec.feed(good[:3])
            assert list(dec.messages()) == []
            dec.feed(good[3:] + HEADER.pack(limit + 1)[:split])
            assert list(dec.messages()) == [m.Ping(7)]
            with pytest.raises(FrameTooLarge):
                dec.feed(HEADER.pack(limit + 1)[split:])
                list(dec.messages())
            assert dec.buffered == 4


def _decode_batch_only(t: Tally, batch: m.PageBatch, npages: int) -> None:
    try:
        decode_batch(batch, npages)
    except (ProtocolError, IntegrityError):
        return
    except Exception as exc:                           # noqa: BLE001
        t.bad("decode_batch", exc, repr(batch)[:200].encode())


def test_page_batch_fuzz_only_malformed_or_integrity_errors():
    """decode_batch (what the sink runs on every PageBatch) on mutated real batches."""
    rng = random.Random(11)
    batches = _real_batches(30)
    one = np.array([3], "<u4").tobytes()
    h0 = np.array([ZERO_HASH], "<u8").tobytes()
    big = bytes(64 * MiB)
    hostile = [
        # zstd bombs: declaring 64 MiB, and declaring nothing while expanding to 8 MiB
        m.PageBatch(6, "ram0", "zstd", b"", one, h0, PAGE_SIZE,
                    zstandard.ZstdCompressor().compress(big)),
        m.PageBatch(6, "ram0", "zstd", b"", one, h0, PAGE_SIZE,
                    zstandard.ZstdCompressor(write_content_size=False).compress(big[:8 * MiB])),
        m.PageBatch(6, "ram0", "lz4", b"", one, h0, PAGE_SIZE,
                    __import__("lz4.block").block.compress(big[:8 * MiB], store_size=False)),
        # more pages than a batch may carry
        m.PageBatch(6, "ram0", "none", np.arange(MAX_BATCH_PAGES + 1, dtype="<u4").tobytes(),
                    b"", b"", 0, b""),
    ]
    del big
    t = Tally()
    for i in range(8_000):
        b = rng.choice(batches)
        field = rng.choice(("zero", "pages", "hashes", "payload", "raw_len", "codec", "mix"))
        if field in ("zero", "pages", "hashes", "payload"):
            val = getattr(b, field)
            val = _mutate(rng, val) if val and rng.random() < 0.7 else rng.randbytes(
                rng.choice((0, 3, 4, 8, 12, 4096, 16384)))
            b = replace(b, **{field: val})
        elif field == "raw_len":
            b = replace(b, raw_len=rng.choice((-1, 0, 1, b.raw_len - 1, b.raw_len + 1,
                                               2**40, 2**63 - 1)))
        elif field == "codec":
            b = replace(b, codec=rng.choice(("zstd", "lz4", "none", "gzip", "", "ZSTD")))
        else:
            b = rng.choice(hostile)
        t.frames += 1
        _decode_batch_only(t, b, rng.choice((8, 4096, 1 << 20)))
    assert not t.failures, "\n".join(t.failures)
    print(f"\npage batch fuzz: {t.frames} batches")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), data=st.binary(max_size=300),
       where=st.integers(0, 10_000))
def test_hypothesis_spliced_frames_only_protocol_errors(seed, data, where):
    """Random bytes spliced into a stream of valid frames, fed at once and byte by byte."""
    rng = random.Random(seed)
    msgs = [_rand_message(rng, rng.choice(m.MESSAGE_TYPES)) for _ in range(3)]
    stream = b"".join(encode(x) for x in msgs)
    at = where % (len(stream) + 1)
    stream = stream[:at] + data + stream[at:]
    t = Tally()
    _feed_stream(t, "spliced", stream, rng)
    _decode_body_only(t, "spliced", data)
    assert not t.failures, t.failures


# ================================================================================================
# Part 2: a live sink
# ================================================================================================

RAM = 16 * MiB
NPAGES = RAM // PAGE_SIZE


def _ids(d: Path) -> tuple[Identity, str, str]:
    src = Identity.load_or_create(d / "source" / "identity", "desktop")
    snk = Identity.load_or_create(d / "sink" / "identity", "laptop")
    return src, src.node_id, snk.node_id


async def synced_sink(d: Path, workload, *, timeout: float = 5.0) -> Pair:
    """A sink holding a verified shadow of a 16 MiB region; the real source is stopped again."""
    workload(d / "ram", RAM, rate=0, fill=0.5)
    sink_cfg, source_cfg = file_configs(d)
    # A short peer timeout so silent hostile connections are dropped quickly.
    sink_cfg = replace(sink_cfg, peer=replace(sink_cfg.peer, timeout=timeout))
    pair = Pair(d, sink_cfg, source_cfg)
    await pair.start_sink()
    await pair.start_source()
    await pair.wait_connected(30)
    assert await pair.source.rep.verify(30)
    assert files_equal(d / "ram", d / "sink" / "vm1" / "ram0.img")
    await pair.source.stop()
    pair.source = None
    await wait_until(lambda: not pair.sink.receiver._busy.locked(), 30, "the session to end")
    return pair


def shadow_state(pair: Pair) -> dict:
    """Everything of the shadow a hostile frame could have changed, in memory and on disk."""
    rec = pair.sink.receiver
    root = pair.d / "sink" / "vm1"
    out = {name: (root / name).read_bytes() for name in
           ("ram0.img", "layout.json", "state.json", "journal", "manifest")
           if (root / name).exists()}
    if rec.store is not None:
        out["epoch"] = rec.store.epoch
        out["digests"] = rec.store.digests()
        out["hashes"] = rec.store.regions["ram0"].hashes.tobytes()
    return out


def assert_same_shadow(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), (before.keys(), after.keys())
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"hostile traffic changed the shadow: {changed}"


def rejected(pair: Pair) -> float:
    return pair.sink.metrics.registry.get_sample_value("replicator_frames_rejected_total") or 0.0


class LoopErrors:
    """Collects what reaches the event loop's exception handler (unhandled task errors)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __enter__(self) -> "LoopErrors":
        self.loop = asyncio.get_running_loop()
        self.prev = self.loop.get_exception_handler()

        def handler(loop, ctx):
            exc = ctx.get("exception")
            self.seen.append(f"{ctx.get('message')}: {exc!r}")
        self.loop.set_exception_handler(handler)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.set_exception_handler(self.prev)


async def _read_until_eof(reader: asyncio.StreamReader, timeout: float = 30) -> bytes:
    got = bytearray()

    async def run() -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while chunk := await reader.read(65536):
                got.extend(chunk)
    await asyncio.wait_for(run(), timeout)
    return bytes(got)


async def _frames_until_eof(link: Link, timeout: float = 30) -> list:
    """Messages the sink sends until it closes the connection (fails if it never does)."""
    got: list = []

    async def run() -> None:
        while True:
            try:
                got.append(await link.recv())
            except ProtocolError as exc:
                got.append(exc)
            except Exception:                          # noqa: BLE001 - EOF / reset
                return
    await asyncio.wait_for(run(), timeout)
    await link.close()
    return got


def _close_quietly(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


# --- (a) before authentication ------------------------------------------------------------------

def _plain_payloads(rng: random.Random, hello_frame: bytes) -> list[list[bytes]]:
    """Chunks sent over plain TCP to a TLS listener."""
    tls_hdr = b"\x16\x03\x01"
    kinds = [
        lambda: [rng.randbytes(rng.randrange(1, 3000))],
        lambda: [hello_frame],                                   # plaintext downgrade attempt
        lambda: [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
        lambda: [tls_hdr + struct.pack(">H", 0x4000) + rng.randbytes(rng.randrange(0, 600))
                 for _ in range(rng.randrange(1, 4))],           # records of garbage
        lambda: [tls_hdr + b"\xff\xff" + rng.randbytes(100)],    # record length beyond limit
        lambda: [HEADER.pack(0xFFFFFFFF), rng.randbytes(64)],
        lambda: [rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(2, 6))],
        lambda: [b"\x00" * 5],                                   # stalls: handshake timeout
    ]
    return [rng.choice(kinds)() for _ in range(1)]


async def _plain_garbage(port: int, chunks: list[bytes]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = 0
    try:
        for c in chunks:
            writer.write(c)
            await writer.drain()
            sent += 1
    except (ConnectionError, OSError):
        pass
    try:
        await _read_until_eof(reader)
    finally:
        _close_quietly(writer)
    return sent


def _bad_proofs(rng: random.Random, src: Identity, impostor: Identity, sink_id: str,
                nonce: bytes, challenge_nonce: bytes) -> list[tuple[str, list[bytes], bool]]:
    """(name, frames, closes-early) sent over TLS instead of a valid AuthProof."""
    cert = src.cert_der
    flipped = bytearray(cert)
    flipped[len(cert) // 2] ^= 0x40
    other_nonce_sig = src.sign_proof(nonce, sink_id)             # replay of another session
    return [
        ("garbage", [rng.randbytes(rng.randrange(1, 2000))], False),
        ("oversized", [HEADER.pack(0xFFFFFFFF) + rng.randbytes(32)], False),
        ("hello first", [encode(m.Hello(m.PROTOCOL_VERSION, "desktop", "vm1",
                                        (m.RegionInfo("ram0", RAM),)))], False),
        ("pings first", [encode(m.Ping(i)) for i in range(3)], False),
        ("garbage cert", [encode(m.AuthProof(rng.randbytes(300), rng.randbytes(70)))], False),
        ("truncated cert", [encode(m.AuthProof(cert[:len(cert) // 2], rng.randbytes(70)))],
         False),
        ("bit-flipped cert", [encode(m.AuthProof(bytes(flipped), other_nonce_sig))], False),
        ("random signature", [encode(m.AuthProof(cert, rng.randbytes(72)))], False),
        ("empty signature", [encode(m.AuthProof(cert, b""))], False),
        ("replayed signature", [encode(m.AuthProof(cert, other_nonce_sig))], False),
        ("impostor", [encode(m.AuthProof(impostor.cert_der,
                                         impostor.sign_proof(challenge_nonce, sink_id)))],
         False),
        ("unknown type", [HEADER.pack(3) + b"\x92\x63\xc0"], False),
        ("empty frame", [HEADER.pack(0)], False),
        ("proof then junk", [encode(m.AuthProof(cert, rng.randbytes(72))),
                             rng.randbytes(100)], False),
        ("close at once", [], True),
        ("half a frame then close", [encode(m.AuthProof(cert, rng.randbytes(72)))[:40]], True),
    ]


async def _tls_no_proof(port: int, rng: random.Random, src: Identity, impostor: Identity,
                        sink_id: str, pick: int) -> tuple[str, int]:
    ctx = src.client_context()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"), 30)
    link = Link(reader, writer, 64 * MiB)
    chal = await asyncio.wait_for(link.recv(), 30)
    assert isinstance(chal, m.AuthChallenge) and chal.server_id == sink_id
    name, frames, early = _bad_proofs(rng, src, impostor, sink_id, os.urandom(32),
                                      chal.nonce)[pick]
    sent = 0
    with contextlib.suppress(Exception):
        for f in frames:
            await link.send_frame(f)
            sent += 1
    if early:
        await link.close()
    else:
        got = await _frames_until_eof(link)
        assert not any(isinstance(x, (m.Welcome, m.ManifestChunk)) for x in got), (name, got)
    return name, sent


# --- (b) authenticated as the paired source -----------------------------------------------------

async def _auth_session(port: int, ident: Identity, sink_id: str) -> tuple[Link, m.Welcome]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ident.client_context(), server_hostname="127.0.0.1",
        limit=1 << 20), 30)
    link = Link(reader, writer, 64 * MiB)
    await authenticate_to_server(link, ident, sink_id, 30)
    await link.send(m.Hello(m.PROTOCOL_VERSION, "desktop", "vm1", (m.RegionInfo("ram0", RAM),)))
    welcome = await asyncio.wait_for(link.recv(), 30)
    assert isinstance(welcome, m.Welcome), welcome
    hashes = bytearray()
    while True:
        msg = await asyncio.wait_for(link.recv(), 30)
        if isinstance(msg, m.ManifestEnd):
            break
        assert isinstance(msg, m.ManifestChunk), msg
        hashes += msg.hashes
    assert len(hashes) == NPAGES * 8
    return link, welcome


def _batch(epoch: int, pages: list[int], content: list[bytes], codec: str = "none",
           **override) -> m.PageBatch:
    buf = b"".join(content)
    idx = np.array(pages, dtype=np.int64)
    hashes = hash_pages(buf, len(pages))
    msg = encode_batch(epoch, "ram0", idx, memoryview(bytearray(buf)), hashes,
                       Compressor(codec)).message
    return replace(msg, **override)


def _hostile_frames(rng: random.Random, epoch: int, max_frame: int) -> list[tuple[str, list[bytes],
                                                                                 str]]:
    """(name, frames, expected) with expected 'error' (ErrorMessage + drop) or 'drop'."""
    e = epoch + 1                              # the next epoch: only the hostile part is wrong
    pg = lambda: rng.randbytes(PAGE_SIZE)      # noqa: E731 - random content, never the shadow's
    p = rng.randrange(NPAGES)
    good = _batch(e, [p], [pg()])
    flip = bytearray(good.payload)
    flip[rng.randrange(len(flip))] ^= 1 << rng.randrange(8)
    one = np.array([p], "<u4").tobytes()
    h_zero = np.array([ZERO_HASH], "<u8").tobytes()
    zbig = _BOMBS["zstd"]
    out: list[tuple[str, typing.Any, str]] = [
        ("page beyond region", _batch(e, [NPAGES], [pg()]), "error"),
        ("page far beyond region", _batch(e, [2**32 - 1], [pg()]), "error"),
        ("zero page beyond region", replace(good, zero=np.array([NPAGES + 7], "<u4").tobytes()),
         "error"),
        ("wrong hash", replace(good, hashes=np.array([rng.getrandbits(64)], "<u8").tobytes()),
         "error"),
        ("payload bit flip", replace(good, payload=bytes(flip)), "error"),
        ("zstd bomb (declared)", m.PageBatch(e, "ram0", "zstd", b"", one, h_zero, PAGE_SIZE,
                                             zbig), "error"),
        ("zstd bomb (undeclared)", m.PageBatch(e, "ram0", "zstd", b"", one, h_zero, PAGE_SIZE,
                                               _BOMBS["zstd-stream"]), "error"),
        ("lz4 bomb", m.PageBatch(e, "ram0", "lz4", b"", one, h_zero, PAGE_SIZE, _BOMBS["lz4"]),
         "error"),
        ("garbage zstd", replace(_batch(e, [p], [pg()], "zstd"), payload=rng.randbytes(300)),
         "error"),
        ("epoch replayed", _batch(epoch, [p], [pg()]), "error"),
        ("epoch backwards", _batch(max(epoch - 1, 0), [p], [pg()]), "error"),
        ("epoch zero", _batch(0, [p], [pg()]), "error"),
        ("epoch negative", _batch(-(2**63), [p], [pg()]), "error"),
        ("unknown region", replace(good, region="ram1"), "error"),
        ("path region", replace(good, region="../../etc/passwd"), "error"),
        ("unknown codec", replace(good, codec="gzip"), "error"),
        ("raw_len too big", replace(good, raw_len=2 * PAGE_SIZE), "error"),
        ("raw_len negative", replace(good, raw_len=-1), "error"),
        ("ragged pages", replace(good, pages=good.pages + b"\x01"), "error"),
        ("page listed twice", _batch(e, [p, p], [pg(), pg()]), "error"),
        ("page as zero and data", replace(good, zero=one), "error"),
        ("hash count", replace(good, hashes=good.hashes * 2), "error"),
        ("too many pages", m.PageBatch(e, "ram0", "none",
                                       np.arange(MAX_BATCH_PAGES + 1, dtype="<u4").tobytes(),
                                       b"", b"", 0, b""), "error"),
        ("epoch ends twice", m.EpochEnd(epoch), "error"),
        ("epoch end zero", m.EpochEnd(0), "error"),
        ("epoch end negative", m.EpochEnd(-5), "error"),
        ("Welcome from source", m.Welcome(1, "x", 0), "error"),
        ("Ack from source", m.Ack(e), "error"),
        ("Pong from source", m.Pong(1), "error"),
        ("manifest from source", m.ManifestChunk("ram0", 0, b"\x00" * 64), "error"),
        ("ManifestEnd from source", m.ManifestEnd(), "error"),
        ("Reject from source", m.Reject("no"), "error"),
        ("second Hello", m.Hello(m.PROTOCOL_VERSION, "desktop", "vm1",
                                 (m.RegionInfo("ram0", RAM),)), "error"),
        ("challenge from source", m.AuthChallenge(b"\x00" * 32, "X"), "error"),
        ("proof mid-session", m.AuthProof(b"c", b"s"), "error"),
        ("VerifyReply from source", m.VerifyReply(1, 1, (b"x",)), "error"),
        ("PrecopyStart to a file sink", m.PrecopyStart(1), "error"),
        ("PrecopyData to a file sink", m.PrecopyData(1, "none", 4, b"QEVM"), "error"),
        ("unknown type", HEADER.pack(3) + b"\x92\x63\x01", "error"),
        ("type as string", HEADER.pack(4) + b"\x92\xa1\x36\x01", "error"),
        ("epoch as string", _raw([6, "1", "ram0", "none", b"", b"", b"", 0, b""]), "error"),
        ("fields missing", _raw([6, e, "ram0"]), "error"),
        ("dict for bytes", _raw([6, e, "ram0", "none", {"a": 1}, b"", b"", 0, b""]), "error"),
        ("deep nesting", HEADER.pack(5001) + b"\x91" * 5000 + b"\xc0", "error"),
        ("empty frame", HEADER.pack(0), "error"),
        ("garbage body", _garbage_frame(rng), "error"),
        ("length over limit", HEADER.pack(max_frame + 1), "error"),
        ("length 4 GiB", HEADER.pack(0xFFFFFFFF) + rng.randbytes(100), "error"),
        ("half a frame, then gone", encode(good)[:rng.randrange(5, 200)], "close"),
    ]
    return [(name, [x if isinstance(x, bytes) else encode(x)], exp) for name, x, exp in out]


def _raw(obj: list) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _garbage_frame(rng: random.Random) -> bytes:
    body = rng.randbytes(rng.randrange(1, 500))
    return HEADER.pack(len(body)) + body


_BOMBS: dict[str, bytes] = {}


def _make_bombs() -> None:
    if not _BOMBS:
        big = bytes(64 * MiB)
        _BOMBS["zstd"] = zstandard.ZstdCompressor().compress(big)
        _BOMBS["zstd-stream"] = zstandard.ZstdCompressor(write_content_size=False).compress(
            big[:8 * MiB])
        import lz4.block
        _BOMBS["lz4"] = lz4.block.compress(big[:8 * MiB], store_size=False)


async def test_live_sink_survives_hostile_connections(shm_dir, workload):
    """(a) garbage before authentication, plain TCP and TLS; (b) malformed and hostile frames
    from a peer authenticated as the paired source. Each is dropped; the shadow is untouched;
    the real source comes back to nothing to send."""
    _make_bombs()
    rng = random.Random(2024)
    src, source_id, sink_id = _ids(shm_dir)
    impostor = Identity.load_or_create(shm_dir / "impostor" / "identity", "desktop")
    pair = await synced_sink(shm_dir, workload)
    rec = pair.sink.receiver
    port = pair.port
    before = shadow_state(pair)
    rejected0 = rejected(pair)
    frames = 0
    connections = 0
    t0 = time.monotonic()
    try:
        with LoopErrors() as loop_errors:
            # (a1) plain TCP: the TLS handshake fails; 50 connections at a time.
            hello = encode(m.Hello(m.PROTOCOL_VERSION, "desktop", "vm1",
                                   (m.RegionInfo("ram0", RAM),)))
            plain = [c for _ in range(400) for c in _plain_payloads(rng, hello)]
            gate = asyncio.Semaphore(100)

            async def one_plain(chunks: list[bytes]) -> int:
                async with gate:
                    return await _plain_garbage(port, chunks)
            sent = await asyncio.gather(*(one_plain(c) for c in plain))
            frames += sum(sent)
            connections += len(sent)
            t_plain = time.monotonic() - t0
            assert rejected(pair) == rejected0, "no session may start without TLS"

            # (a2) TLS, but no valid proof of being the paired source; 20 at a time.
            kinds = len(_bad_proofs(rng, src, impostor, sink_id, b"", b""))
            picks = [i % kinds for i in range(kinds * 20)]
            rng.shuffle(picks)
            names: dict[str, int] = {}
            for i in range(0, len(picks), 20):
                res = await asyncio.gather(*(_tls_no_proof(port, rng, src, impostor, sink_id, k)
                                             for k in picks[i:i + 20]))
                for name, sent in res:
                    names[name] = names.get(name, 0) + 1
                    frames += sent
                connections += len(res)
            # Every one was refused by the authentication step (and counted).
            await wait_until(lambda: rejected(pair) >= rejected0 + len(picks), 30,
                             "the sink to count every refused connection")
            assert rejected(pair) == rejected0 + len(picks)
            assert "refused" in rec.last_error
            assert rec.store is not None and not rec.connected.is_set()
            assert_same_shadow(before, shadow_state(pair))
            t_tls = time.monotonic() - t0 - t_plain

            # (b) authenticated as the paired source, then hostile frames; one at a time.
            max_frame = pair.sink_cfg.stream.max_frame_bytes
            outcomes: dict[str, int] = {}
            expect_rejected = rejected(pair)
            for rnd in range(8):
                batch = _hostile_frames(rng, before["epoch"], max_frame)
                rng.shuffle(batch)
                for name, hostile, expected in batch:
                    await wait_until(lambda: not rec._busy.locked(), 30, "the last session")
                    link, welcome = await _auth_session(port, src, sink_id)
                    frames += 1
                    assert welcome.acked_epoch == before["epoch"], (name, welcome)
                    pings = rng.randrange(0, 4)
                    for i in range(pings):
                        await link.send(m.Ping(i))
                    if rng.random() < 0.2:
                        await link.send(m.VerifyRequest(7))
                        pings += 1
                    frames += pings
                    for f in hostile:
                        with contextlib.suppress(Exception):
                            await link.send_frame(f)
                        frames += 1
                    connections += 1
                    if expected == "close":
                        await link.close()
                        outcomes[name] = outcomes.get(name, 0) + 1
                        continue
                    got = await _frames_until_eof(link)
                    kinds_got = [type(x).__name__ for x in got]
                    # Valid frames before the hostile one were served, then an error, then EOF.
                    assert kinds_got.count("Pong") + kinds_got.count("VerifyReply") <= pings
                    assert got and isinstance(got[-1], m.ErrorMessage), (name, got)
                    for x in got:
                        if isinstance(x, m.VerifyReply):
                            assert x.digests == before["digests"], name
                    expect_rejected += 1
                    outcomes[name] = outcomes.get(name, 0) + 1
            await wait_until(lambda: not rec._busy.locked(), 30, "the last session")
            assert rejected(pair) == expect_rejected
            assert "dropped" in rec.last_error or "closed" in rec.last_error
            assert not loop_errors.seen, loop_errors.seen[:5]
        after = shadow_state(pair)
        assert_same_shadow(before, after)
        elapsed = time.monotonic() - t0
        print(f"\nlive sink fuzz: {frames} frames over {connections} connections in "
              f"{elapsed:.1f}s ({len(plain)} plain TCP in {t_plain:.1f}s, {len(picks)} TLS "
              f"without proof in {t_tls:.1f}s, "
              f"{sum(outcomes.values())} authenticated with {len(outcomes)} kinds of hostile "
              f"frames)")
        assert frames >= 2000 and connections >= 1000

        # The real source reconnects; the shadow needs nothing.
        source = await pair.start_source()
        await pair.wait_connected(30)
        assert await source.rep.verify(30)
        assert source.rep.ledger.raw_sent == 0, "the shadow lost pages to the hostile traffic"
        assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")
    finally:
        await pair.stop()


async def test_pre_auth_proof_with_an_unsupported_key_type_is_refused_cleanly(shm_dir,
                                                                             workload):
    """A certificate whose key algorithm the crypto library does not know is a bad proof like
    any other: refused, recorded, counted -- not an unhandled exception in the server."""
    src, source_id, sink_id = _ids(shm_dir)
    pair = await synced_sink(shm_dir, workload)
    rec = pair.sink.receiver
    before = shadow_state(pair)
    r0 = rejected(pair)
    ec_oid = bytes.fromhex("06072a8648ce3d0201")               # id-ecPublicKey
    assert src.cert_der.count(ec_oid) == 1
    odd_cert = src.cert_der.replace(ec_oid, bytes.fromhex("06072a8648ce3d0205"))
    try:
        with LoopErrors() as loop_errors:
            for _ in range(3):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", pair.port, ssl=src.client_context(),
                    server_hostname="127.0.0.1")
                link = Link(reader, writer, 64 * MiB)
                chal = await asyncio.wait_for(link.recv(), 30)
                await link.send(m.AuthProof(odd_cert, os.urandom(72)))
                got = await _frames_until_eof(link)
                assert not got, got
            await asyncio.sleep(0.5)
        assert not loop_errors.seen, ("the sink let an exception escape its connection "
                                      f"handler: {loop_errors.seen[0]}")
        assert rejected(pair) == r0 + 3, "refused connections were not counted"
        assert "refused" in rec.last_error
        assert_same_shadow(before, shadow_state(pair))
    finally:
        await pair.stop()


# --- in-protocol but hostile frames from the paired source ---------------------------------------

async def _one_reply(link: Link, timeout: float = 10) -> typing.Any:
    try:
        return await asyncio.wait_for(link.recv(), timeout)
    except Exception as exc:                          # noqa: BLE001
        return exc


async def _real_source_catches_up(pair: Pair, changed_page: int) -> typing.Any:
    """Start the real source again after one page changed; it must verify, sending one page."""
    path = pair.d / "ram"
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, os.urandom(PAGE_SIZE), changed_page * PAGE_SIZE)
    finally:
        os.close(fd)
    source = await pair.start_source()
    task = source._task
    await wait_until(lambda: source.rep.connected.is_set() or task.done(), 30,
                     "the real source to reconnect")

    def died() -> None:
        if task.done():
            exc = task.exception() if not task.cancelled() else "cancelled"
            raise AssertionError(f"the real source's replication task died: {exc!r} "
                                 f"(last_error {source.rep.last_error!r}, connected "
                                 f"{source.rep.connected.is_set()})")
    died()
    try:
        ok = await source.rep.verify(30)
    except Exception:
        await asyncio.sleep(0.5)
        died()
        raise
    assert ok, pair.sink.receiver.last_error
    return source


async def test_epoch_jump_from_the_paired_peer_cannot_stop_replication(shm_dir, workload):
    """EpochEnd(2**64-1) is a well-formed frame. Whether the sink refuses it or not, the real
    source must still be able to replicate afterwards."""
    src, _, sink_id = _ids(shm_dir)
    pair = await synced_sink(shm_dir, workload)
    try:
        link, welcome = await _auth_session(pair.port, src, sink_id)
        await link.send(m.EpochEnd(2**64 - 1))
        reply = await _one_reply(link)
        await link.close()
        await wait_until(lambda: not pair.sink.receiver._busy.locked(), 30, "the session")
        print(f"\nsink answered EpochEnd(2**64-1) with {reply!r}; "
              f"store epoch now {pair.sink.receiver.store.epoch}")
        source = await _real_source_catches_up(pair, 5)
        assert source.rep.ledger.raw_sent == PAGE_SIZE
        assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img")
    finally:
        await pair.stop()


async def test_page_listed_as_zero_and_as_data_cannot_make_the_manifest_lie(shm_dir, workload):
    """A batch naming one page both as a zero page and as a data page (with the page's true
    content and hash) is malformed. If the sink applies it, the image must hold what the
    manifest claims -- otherwise verify() passes over a shadow that differs from the source."""
    src, _, sink_id = _ids(shm_dir)
    pair = await synced_sink(shm_dir, workload)
    try:
        p = 10                                           # a data page (fill is 50 %)
        with open(shm_dir / "ram", "rb") as f:
            f.seek(p * PAGE_SIZE)
            content = f.read(PAGE_SIZE)
        assert content != bytes(PAGE_SIZE)
        link, welcome = await _auth_session(pair.port, src, sink_id)
        e = welcome.acked_epoch + 1
        batch = _batch(e, [p], [content], zero=np.array([p], "<u4").tobytes())
        await link.send(batch)
        await link.send(m.EpochEnd(e))
        reply = await _one_reply(link)
        await link.close()
        await wait_until(lambda: not pair.sink.receiver._busy.locked(), 30, "the session")
        store = pair.sink.receiver.store
        img = hash_file(store.regions["ram0"].fd, RAM)
        man = store.regions["ram0"].hashes
        lying = np.flatnonzero((man != 0) & (man != img))
        assert not lying.size, (f"sink answered {reply!r}; its manifest now claims hashes its "
                                f"image does not hold for pages {lying.tolist()}")
        source = await _real_source_catches_up(pair, 3000)
        assert files_equal(shm_dir / "ram", shm_dir / "sink" / "vm1" / "ram0.img"), \
            "verify() passed but the shadow image differs from the source"
    finally:
        await pair.stop()
