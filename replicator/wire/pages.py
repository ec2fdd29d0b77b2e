"""Page batches: hashing, zero detection, compression and verification. No I/O.

Pages are handled a batch at a time: the caller hands a buffer holding ``n`` consecutive
4 KiB pages (not necessarily consecutive in guest RAM) and their indices. Hashes are xxh3-64
per page; compression is one frame per batch (better ratio and far fewer calls than per page).
"""

from __future__ import annotations

from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash
import zstandard

from ..errors import IntegrityError, MalformedFrame
from .messages import PageBatch

PAGE_SIZE = 4096
ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_HASH = xxhash.xxh3_64_intdigest(ZERO_PAGE)
CODECS = ("zstd", "lz4", "none")
MAX_BATCH_PAGES = 4096          # matches config's batch_pages limit; bounds decompression

_hash = xxhash.xxh3_64_intdigest


def hash_pages(buf: memoryview | bytes | bytearray, count: int) -> np.ndarray:
    """xxh3-64 of each 4 KiB page in ``buf`` (``count`` pages) as a uint64 array."""
    mv = memoryview(buf)
    return np.fromiter((_hash(mv[i:i + PAGE_SIZE])
                        for i in range(0, count * PAGE_SIZE, PAGE_SIZE)),
                       dtype=np.uint64, count=count)


class Compressor:
    """One codec, reused across batches (not thread-safe: one per sender).

    :meth:`pack` sends a batch that does not shrink (already compressed or encrypted data
    in the guest, random fill) as it is, and then does not try the next ``skip_after_miss``
    batches: compressing incompressible data costs the source as much CPU as the rest of its
    work on a batch, and the sink a pointless copy.
    """

    #: A batch whose compressed size is above this share of its size travels uncompressed.
    WORTH = 0.97

    def __init__(self, codec: str = "zstd", level: int = 1, skip_after_miss: int = 16):
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec!r}")
        self.codec = codec
        self._zc = zstandard.ZstdCompressor(level=level) if codec == "zstd" else None
        self.skip_after_miss = skip_after_miss
        self._skip = 0

    def pack(self, data: bytes | memoryview) -> tuple[str, bytes | memoryview]:
        """``(codec, payload)`` for ``data``: compressed, or ``("none", data)`` itself when
        compressing does not pay (the caller copies it into its frame)."""
        if self.codec == "none":
            return "none", data
        if self._skip > 0:
            self._skip -= 1
            return "none", data
        out = self.compress(data)
        if len(out) > len(data) * self.WORTH:
            self._skip = self.skip_after_miss
            return "none", data
        return self.codec, out

    def compress(self, data: bytes | memoryview) -> bytes:
        if self.codec == "zstd":
            return self._zc.compress(data)
        if self.codec == "lz4":
            return lz4.block.compress(data, store_size=False)
        return bytes(data)


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    message: PageBatch
    zero_pages: int
    data_pages: int
    raw_bytes: int        # bytes of page content represented (zero pages included)


def encode_batch(epoch: int, region: str, indices: np.ndarray, buf: memoryview | bytearray,
                 hashes: np.ndarray, compressor: Compressor) -> EncodedBatch:
    """Build a PageBatch from pages in ``buf`` whose hashes are already known.

    Zero pages (hash equal to the zero hash *and* content all zero) travel as indices only.
    """
    n = len(indices)
    arr = np.frombuffer(buf, dtype=np.uint8, count=n * PAGE_SIZE).reshape(n, PAGE_SIZE)
    maybe_zero = hashes == np.uint64(ZERO_HASH)
    if maybe_zero.any():
        # The hash says zero; the bytes must agree (a collision would corrupt the shadow).
        cand = np.flatnonzero(maybe_zero)
        is_zero = ~arr[cand].any(axis=1)
        zero_mask = np.zeros(n, dtype=bool)
        zero_mask[cand[is_zero]] = True
    else:
        zero_mask = np.zeros(n, dtype=bool)
    data_mask = ~zero_mask
    data_idx = indices[data_mask]
    if data_mask.all():
        raw = memoryview(buf)[:n * PAGE_SIZE]
    else:
        raw = arr[data_mask].tobytes()
    codec, payload = compressor.pack(raw) if len(data_idx) else (compressor.codec, b"")
    msg = PageBatch(
        epoch=epoch, region=region, codec=codec,
        zero=indices[zero_mask].astype("<u4").tobytes(),
        pages=data_idx.astype("<u4").tobytes(),
        hashes=hashes[data_mask].astype("<u8").tobytes(),
        raw_len=len(data_idx) * PAGE_SIZE,
        payload=payload,
    )
    return EncodedBatch(msg, int(zero_mask.sum()), len(data_idx), n * PAGE_SIZE)


_zd = zstandard.ZstdDecompressor()


def decompress(codec: str, payload: bytes, raw_len: int) -> bytes:
    """A batch payload back to at most ``raw_len`` bytes; a payload that claims (or would
    produce) more is refused before anything that large is allocated."""
    if codec == "zstd":
        try:
            # A frame may declare any content size; refuse before zstd allocates for it.
            if zstandard.frame_content_size(payload) > raw_len:
                raise MalformedFrame("zstd payload declares more than raw_len bytes")
            return _zd.decompress(payload, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise MalformedFrame(f"zstd payload: {exc}") from None
    if codec == "lz4":
        try:
            return lz4.block.decompress(payload, uncompressed_size=raw_len)
        except Exception as exc:  # lz4 raises LZ4BlockError
            raise MalformedFrame(f"lz4 payload: {exc}") from None
    if codec == "none":
        return payload
    raise MalformedFrame(f"unknown codec {codec!r}")


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    zero: np.ndarray          # uint32 indices
    pages: np.ndarray         # uint32 indices
    hashes: np.ndarray        # uint64, one per page in ``pages``
    data: bytes               # len(pages) * PAGE_SIZE bytes


def decode_batch(batch: PageBatch, npages: int) -> DecodedBatch:
    """Decompress and verify a batch against the region's page count and each page's hash.

    Raises MalformedFrame for structural problems and IntegrityError when a page's content
    does not match its hash. Nothing is written by this function.
    """
    if len(batch.zero) % 4 or len(batch.pages) % 4 or len(batch.hashes) % 8:
        raise MalformedFrame("page index/hash arrays have a ragged length")
    zero = np.frombuffer(batch.zero, dtype="<u4")
    pages = np.frombuffer(batch.pages, dtype="<u4")
    hashes = np.frombuffer(batch.hashes, dtype="<u8")
    if len(hashes) != len(pages):
        raise MalformedFrame("one hash per page expected")
    if batch.raw_len != len(pages) * PAGE_SIZE:
        raise MalformedFrame("raw_len does not match the page count")
    if len(pages) + len(zero) > MAX_BATCH_PAGES:
        raise MalformedFrame(f"batch of {len(pages) + len(zero)} pages exceeds {MAX_BATCH_PAGES}")
    if (len(zero) and int(zero.max()) >= npages) or (len(pages) and int(pages.max()) >= npages):
        raise MalformedFrame("page index beyond the end of the region")
    listed = np.concatenate([zero, pages])
    if len(np.unique(listed)) != len(listed):
        raise MalformedFrame("a page is listed more than once in the batch")
    data = decompress(batch.codec, batch.payload, batch.raw_len) if pages.size else b""
    if len(data) != batch.raw_len:
        raise MalformedFrame("payload does not decompress to raw_len bytes")
    actual = hash_pages(data, len(pages))
    if not np.array_equal(actual, hashes):
        bad = int(pages[np.flatnonzero(actual != hashes)[0]])
        raise IntegrityError(f"page {bad} of region {batch.region!r} does not match its hash")
    return DecodedBatch(zero.astype(np.int64), pages.astype(np.int64), hashes, data)
