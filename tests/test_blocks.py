"""Disk block batches (wire/blocks.py) and block helpers (vmm/blockio.py): no I/O, no QEMU."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from replicator.errors import IntegrityError, MalformedFrame
from replicator.vmm.blockio import runs, touched
from replicator.vmm.nbd import Extent
from replicator.wire.blocks import (BLOCK_SIZE, MAX_BATCH_BLOCKS, ZERO_BLOCK_HASH, block_count,
                                    decode_blocks, digest, encode_blocks, hash_blocks)
from replicator.wire.codec import decode_body, encode
from replicator.wire.pages import Compressor


def blocks_with(n: int, zero: set[int]) -> bytearray:
    buf = bytearray(os.urandom(n * BLOCK_SIZE))
    for i in zero:
        buf[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = bytes(BLOCK_SIZE)
    return buf


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_round_trip_zero_blocks_travel_as_indices(codec):
    buf = blocks_with(6, {1, 4})
    idx = np.array([10, 11, 12, 20, 21, 30])
    hashes = hash_blocks(buf, 6)
    enc = encode_blocks(7, 0, idx, buf, hashes, Compressor(codec))
    assert enc.zero_blocks == 2 and enc.data_blocks == 4 and enc.raw_bytes == 6 * BLOCK_SIZE
    assert enc.message.raw_len == 4 * BLOCK_SIZE
    msg = decode_body(encode(enc.message)[4:])          # through the codec, as on the wire
    dec = decode_blocks(msg, 64)
    assert dec.zero.tolist() == [11, 21]
    assert dec.blocks.tolist() == [10, 12, 20, 30]
    data = np.frombuffer(buf, np.uint8).reshape(6, BLOCK_SIZE)
    assert dec.data == data[[0, 2, 3, 5]].tobytes()
    assert (hash_blocks(dec.data, 4) == hashes[[0, 2, 3, 5]]).all()


def test_a_block_that_does_not_match_its_hash_is_refused():
    buf = blocks_with(2, set())
    enc = encode_blocks(1, 0, np.array([0, 1]), buf, hash_blocks(buf, 2), Compressor("none"))
    payload = bytearray(enc.message.payload)
    payload[BLOCK_SIZE + 5] ^= 1
    bad = dataclasses.replace(enc.message, payload=bytes(payload))
    with pytest.raises(IntegrityError, match="block 1 of disk 0"):
        decode_blocks(bad, 4)


def test_a_zero_hash_over_nonzero_bytes_is_not_sent_as_zero():
    """A block whose (claimed) hash is the zero block's but whose bytes are not zero travels as
    data: the sink then refuses it, rather than silently writing zeros."""
    buf = blocks_with(1, set())
    hashes = np.array([ZERO_BLOCK_HASH], dtype=np.uint64)
    enc = encode_blocks(1, 0, np.array([3]), buf, hashes, Compressor("none"))
    assert enc.zero_blocks == 0
    with pytest.raises(IntegrityError):
        decode_blocks(enc.message, 8)


@pytest.mark.parametrize("change, match", [
    (dict(blocks=np.array([9], "<u4").tobytes()), "beyond the end"),
    (dict(zero=np.array([0], "<u4").tobytes()), "more than once"),
    (dict(raw_len=3), "raw_len"),
    (dict(hashes=b"\0" * 7), "ragged"),
    (dict(codec="gzip"), "unknown codec"),
    (dict(zero=np.arange(MAX_BATCH_BLOCKS, dtype="<u4").tobytes()), "exceeds"),
])
def test_malformed_batches_are_refused(change, match):
    buf = blocks_with(1, set())
    enc = encode_blocks(1, 0, np.array([0]), buf, hash_blocks(buf, 1), Compressor("zstd"))
    with pytest.raises(MalformedFrame, match=match):
        decode_blocks(dataclasses.replace(enc.message, **change), 8)


def test_zstd_bomb_is_refused_before_allocating():
    import zstandard
    bomb = zstandard.ZstdCompressor().compress(bytes(64 * BLOCK_SIZE))
    buf = blocks_with(1, set())
    enc = encode_blocks(1, 0, np.array([0]), buf, hash_blocks(buf, 1), Compressor("zstd"))
    with pytest.raises(MalformedFrame, match="declares more"):
        decode_blocks(dataclasses.replace(enc.message, codec="zstd", payload=bomb), 8)


def test_block_count_digest_and_extent_helpers():
    assert block_count(1) == 1 and block_count(BLOCK_SIZE) == 1
    assert block_count(BLOCK_SIZE + 512) == 2
    a = np.arange(5, dtype=np.uint64)
    assert digest(a) == digest(a.copy()) != digest(a[::-1].copy())
    # An extent touching a block at all marks it; unaligned ends round outwards.
    ext = [Extent(0, 100, 1), Extent(100, 3 * BLOCK_SIZE, 0), Extent(3 * BLOCK_SIZE + 100,
                                                                    BLOCK_SIZE, 1)]
    assert touched(ext, 6, lambda f: f & 1).tolist() == [True, False, False, True, True, False]
    mask = np.zeros(200, dtype=bool)
    mask[[1, 2, 3, 10]] = True
    mask[100:200] = True
    assert list(runs(mask, 64)) == [(1, 3), (10, 1), (100, 64), (164, 36)]
