"""Reading page files (guest RAM, shadow images) efficiently; shared by source and sink.

Reads go through ``preadv`` into one reusable buffer and skip holes with ``SEEK_DATA`` /
``SEEK_HOLE``: reading a sparse tmpfs file through a shared mmap would allocate its holes.
"""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import xxhash

from .config import PAGE_SIZE
from .wire.pages import ZERO_HASH, hash_pages

CHUNK_PAGES = 1024          # 4 MiB per read: big enough for preadv, small enough for the cache


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Page-aligned (start, end) byte ranges of ``fd`` that may hold data; holes read as zero."""
    try:
        out = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:      # no data after pos
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            start -= start % PAGE_SIZE
            end = min(end + (-end) % PAGE_SIZE, size)
            out.append((start, end))
            pos = end
        return out
    except OSError:
        return [(0, size)]               # filesystem without SEEK_DATA: read everything


def hash_file(fd: int, size: int, buf: bytearray | None = None,
              mapping: mmap.mmap | None = None) -> np.ndarray:
    """xxh3-64 of every page of the first ``size`` bytes of ``fd`` (holes/past EOF are zero).

    With ``mapping`` (a shared read-only map of the whole file) data extents are hashed in
    place, without copying them through ``buf``; holes are never touched, so a sparse tmpfs
    file allocates nothing. The map is used only while the file is at least ``size`` long
    (touching a mapped page past EOF would raise SIGBUS).
    """
    npages = size // PAGE_SIZE
    cur = np.full(npages, ZERO_HASH, dtype=np.uint64)
    st_size = os.fstat(fd).st_size
    if mapping is not None and st_size >= size and len(mapping) >= size:
        whole = memoryview(mapping)
        try:
            for start, end in data_extents(fd, size):
                for off in range(start, end, CHUNK_PAGES * PAGE_SIZE):
                    stop = min(end, off + CHUNK_PAGES * PAGE_SIZE)
                    cur[off // PAGE_SIZE:stop // PAGE_SIZE] = hash_pages(
                        whole[off:stop], (stop - off) // PAGE_SIZE)
        finally:
            whole.release()
        return cur
    buf = buf if buf is not None else bytearray(CHUNK_PAGES * PAGE_SIZE)
    mv = memoryview(buf)
    for start, end in data_extents(fd, min(size, st_size)):
        off = start
        while off < end:
            want = min(end - off, len(buf))
            got = os.preadv(fd, [mv[:want]], off)
            if got <= 0:
                break
            if got % PAGE_SIZE:           # partial last page: the rest reads as zero
                pad = PAGE_SIZE - got % PAGE_SIZE
                mv[got:got + pad] = bytes(pad)
                got += pad
            n = got // PAGE_SIZE
            p0 = off // PAGE_SIZE
            cur[p0:p0 + n] = hash_pages(mv, n)
            off += got
    return cur


def digest_hashes(hashes: np.ndarray) -> bytes:
    """A short digest of a whole per-page hash table (equal tables, equal digests)."""
    return xxhash.xxh3_128_digest(np.ascontiguousarray(hashes, dtype="<u8").tobytes())


def read_pages(fd: int, indices: np.ndarray, buf: bytearray) -> memoryview:
    """Read the pages ``indices`` (sorted) into ``buf``, consecutive runs in one call each."""
    n = len(indices)
    mv = memoryview(buf)[:n * PAGE_SIZE]
    if not n:
        return mv
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate(([0], breaks)).tolist()
    ends = np.concatenate((breaks, [n])).tolist()
    for s, e in zip(starts, ends):
        want = (e - s) * PAGE_SIZE
        got = os.preadv(fd, [mv[s * PAGE_SIZE:e * PAGE_SIZE]], int(indices[s]) * PAGE_SIZE)
        if got < want:                    # past EOF of a sparse/short file: zeros
            mv[s * PAGE_SIZE + max(got, 0):e * PAGE_SIZE] = bytes(want - max(got, 0))
    return mv


def copy_data(src: int, dst: int, size: int) -> int:
    """Copy the data extents of ``src`` into ``dst`` (a fresh, all-hole file of the same size:
    holes are left as they are); returns the bytes copied. ``copy_file_range`` lets the kernel
    share or copy the blocks without a trip through user space."""
    copied = 0
    for start, end in data_extents(src, size):
        off = start
        while off < end:
            try:
                n = os.copy_file_range(src, dst, min(end - off, 1 << 30), off, off)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                # Another file system (or a kernel that cannot): through user space.
                data = os.pread(src, min(end - off, 4 << 20), off)
                n = os.pwrite(dst, data, off) if data else 0
            if n <= 0:
                raise OSError(errno.EIO, "copying a page file's data copied nothing")
            off += n
        copied += end - start
    return copied


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of ``fd`` (it reads as zeros, the size stays): fallocate(2) with
    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, which Python's os module does not offer."""
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, 0x02 | 0x01, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
