"""Disk block batches: hashing, zero detection, compression and verification. No I/O.

The disk counterpart of :mod:`.pages`: a disk is replicated in blocks of :data:`BLOCK_SIZE`
bytes (QEMU's default dirty-bitmap granularity, and the qcow2 cluster size), each identified by
its xxh3-64. A batch carries blocks of one disk; all-zero blocks travel as indices only (the
sink writes them as zeroes, which lets it keep holes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from ..errors import IntegrityError, MalformedFrame
from .messages import DiskBatch
from .pages import Compressor, decompress

BLOCK_SIZE = 64 * 1024
ZERO_BLOCK_HASH = xxhash.xxh3_64_intdigest(bytes(BLOCK_SIZE))
#: Blocks per batch at most (1 MiB of payload before compression).
MAX_BATCH_BLOCKS = 64
#: Largest disk replicated: the wire carries block indices as uint32.
MAX_DISK_BYTES = BLOCK_SIZE * (1 << 32)

_hash = xxhash.xxh3_64_intdigest


def switch_generation(switch_id: str) -> int:
    """The disk-round generation a switch starts on the host that takes the domain: both
    hosts derive it from the switch's ID. The new host's QEMU records writes into a bitmap of
    this generation from before the guest resumes; the old host's disk, verified equal at the
    switch, counts as a copy at the generation before it. A range of its own (2**41 and up):
    never one a fresh lineage (1..2**40) starts at."""
    return (1 << 41) + int(switch_id[:10] or "0", 16) % (1 << 40)


def block_count(size: int) -> int:
    """Blocks covering a disk of ``size`` bytes (the last one may be partial)."""
    return -(-size // BLOCK_SIZE)


def hash_blocks(buf: memoryview | bytes | bytearray, count: int) -> np.ndarray:
    """xxh3-64 of each block in ``buf`` (``count`` full blocks) as a uint64 array."""
    mv = memoryview(buf)
    return np.fromiter((_hash(mv[i:i + BLOCK_SIZE])
                        for i in range(0, count * BLOCK_SIZE, BLOCK_SIZE)),
                       dtype=np.uint64, count=count)


def digest(hashes: np.ndarray) -> bytes:
    """Digest of a whole block-hash table (what the switch compares)."""
    return xxhash.xxh3_128_digest(np.ascontiguousarray(hashes, dtype="<u8").tobytes())


@dataclass(frozen=True, slots=True)
class EncodedBlocks:
    message: DiskBatch
    zero_blocks: int
    data_blocks: int
    raw_bytes: int


def encode_blocks(generation: int, disk: int, indices: np.ndarray, buf: memoryview | bytearray,
                  hashes: np.ndarray, compressor: Compressor) -> EncodedBlocks:
    """A DiskBatch of the blocks in ``buf`` (one per index, full :data:`BLOCK_SIZE` each; a
    disk's partial last block is padded with zeros) whose hashes are known."""
    n = len(indices)
    if n > MAX_BATCH_BLOCKS:
        raise ValueError(f"{n} blocks exceed a batch's {MAX_BATCH_BLOCKS}")
    arr = np.frombuffer(buf, dtype=np.uint8, count=n * BLOCK_SIZE).reshape(n, BLOCK_SIZE)
    zero_mask = np.zeros(n, dtype=bool)
    cand = np.flatnonzero(hashes == np.uint64(ZERO_BLOCK_HASH))
    if len(cand):
        # The hash says zero; the bytes must agree (a collision would corrupt the copy).
        zero_mask[cand[~arr[cand].any(axis=1)]] = True
    data_mask = ~zero_mask
    raw = memoryview(buf)[:n * BLOCK_SIZE] if data_mask.all() else arr[data_mask].tobytes()
    ndata = int(data_mask.sum())
    codec, payload = compressor.pack(raw) if ndata else (compressor.codec, b"")
    msg = DiskBatch(
        generation=generation, disk=disk, codec=codec,
        zero=indices[zero_mask].astype("<u4").tobytes(),
        blocks=indices[data_mask].astype("<u4").tobytes(),
        hashes=hashes[data_mask].astype("<u8").tobytes(),
        raw_len=ndata * BLOCK_SIZE,
        payload=payload)
    return EncodedBlocks(msg, n - ndata, ndata, n * BLOCK_SIZE)



@dataclass(frozen=True, slots=True)
class DecodedBlocks:
    zero: np.ndarray          # int64 block indices
    blocks: np.ndarray        # int64 block indices, one BLOCK_SIZE slice of ``data`` each
    hashes: np.ndarray        # uint64, one per block in ``blocks``
    data: bytes


def decode_blocks(batch: DiskBatch, nblocks: int) -> DecodedBlocks:
    """Decompress and verify a batch against the disk's block count and each block's hash.

    Raises MalformedFrame for structural problems and IntegrityError when a block does not
    match its hash. Nothing is written by this function.
    """
    if len(batch.zero) % 4 or len(batch.blocks) % 4 or len(batch.hashes) % 8:
        raise MalformedFrame("block index/hash arrays have a ragged length")
    zero = np.frombuffer(batch.zero, dtype="<u4")
    blocks = np.frombuffer(batch.blocks, dtype="<u4")
    hashes = np.frombuffer(batch.hashes, dtype="<u8")
    if len(hashes) != len(blocks):
        raise MalformedFrame("one hash per block expected")
    if batch.raw_len != len(blocks) * BLOCK_SIZE:
        raise MalformedFrame("raw_len does not match the block count")
    if len(blocks) + len(zero) > MAX_BATCH_BLOCKS:
        raise MalformedFrame(f"batch of {len(blocks) + len(zero)} blocks exceeds "
                             f"{MAX_BATCH_BLOCKS}")
    if (len(zero) and int(zero.max()) >= nblocks) or (len(blocks) and
                                                        int(blocks.max()) >= nblocks):
        raise MalformedFrame("block index beyond the end of the disk")
    listed = np.concatenate([zero, blocks])
    if len(np.unique(listed)) != len(listed):
        raise MalformedFrame("a block is listed more than once in the batch")
    data = decompress(batch.codec, batch.payload, batch.raw_len) if blocks.size else b""
    if len(data) != batch.raw_len:
        raise MalformedFrame("payload does not decompress to raw_len bytes")
    actual = hash_blocks(data, len(blocks))
    if not np.array_equal(actual, hashes):
        bad = int(blocks[np.flatnonzero(actual != hashes)[0]])
        raise IntegrityError(f"block {bad} of disk {batch.disk} does not match its hash")
    return DecodedBlocks(zero.astype(np.int64), blocks.astype(np.int64), hashes, data)
