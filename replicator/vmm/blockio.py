"""Block-level reading and writing of a disk through an NBD export, in replication blocks.

Both halves use it: the source reads its disk through QEMU's own NBD server (dirty extents or
everything allocated), the sink reads (to hash after a crash) and writes its copy through a
``qemu-nbd`` it runs (:class:`QemuNbd`). Blocks are :data:`~replicator.wire.blocks.BLOCK_SIZE`;
a disk's partial last block is read zero-padded and written only up to the disk's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from replicator.aio import wait_for
from replicator.errors import NbdError, QemuError
from replicator.vmm.nbd import STATE_ZERO, Extent, NbdClient
from replicator.wire.blocks import (BLOCK_SIZE, MAX_BATCH_BLOCKS, ZERO_BLOCK_HASH, block_count,
                                    hash_blocks)

log = logging.getLogger(__name__)

ALLOCATION = "base:allocation"


def touched(extents: list[Extent], nblocks: int, want) -> np.ndarray:
    """Per block: does any extent whose flags satisfy ``want(flags)`` overlap it?"""
    diff = np.zeros(nblocks + 1, dtype=np.int64)
    for e in extents:
        if e.length and want(e.flags):
            diff[e.offset // BLOCK_SIZE] += 1
            diff[min(nblocks, -(-(e.offset + e.length) // BLOCK_SIZE))] -= 1
    return np.cumsum(diff[:nblocks]) > 0


def runs(mask: np.ndarray, limit: int = MAX_BATCH_BLOCKS) -> Iterator[tuple[int, int]]:
    """``(first, count)`` of the set blocks in ``mask``, in order, at most ``limit`` per run."""
    idx = np.flatnonzero(mask)
    if not len(idx):
        return
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    for part in np.split(idx, breaks):
        first, end = int(part[0]), int(part[-1]) + 1
        for b in range(first, end, limit):
            yield b, min(limit, end - b)


async def read_blocks(client: NbdClient, first: int, count: int, size: int,
                      buf: bytearray) -> memoryview:
    """Blocks ``first .. first+count`` of a disk of ``size`` bytes into ``buf``, zero-padded to
    whole blocks. Reads are split at the server's maximum request size."""
    start = first * BLOCK_SIZE
    length = min(count * BLOCK_SIZE, size - start)
    view = memoryview(buf)[:count * BLOCK_SIZE]
    step = max(BLOCK_SIZE, min(client.max_request, 32 << 20))
    for off in range(0, length, step):
        n = min(step, length - off)
        await client.read(start + off, n, view[off:off + n])
    if length < len(view):
        view[length:] = bytes(len(view) - length)
    return view


async def hash_disk(client: NbdClient, size: int, *, progress=None) -> np.ndarray:
    """Every block's hash, reading only what ``base:allocation`` does not report as zero
    (the client must have negotiated that context)."""
    nblocks = block_count(size)
    hashes = np.full(nblocks, ZERO_BLOCK_HASH, dtype=np.uint64)
    alloc = (await client.extents())[ALLOCATION]
    data = touched(alloc, nblocks, lambda f: not f & STATE_ZERO)
    buf = bytearray(MAX_BATCH_BLOCKS * BLOCK_SIZE)
    done = 0
    for first, count in runs(data):
        view = await read_blocks(client, first, count, size, buf)
        hashes[first:first + count] = await asyncio.to_thread(hash_blocks, view, count)
        done += count
        if progress is not None:
            progress(done, int(data.sum()))
    return hashes


async def write_blocks(client: NbdClient, blocks: np.ndarray, data: bytes | memoryview,
                       size: int) -> None:
    """Write whole blocks (``data`` holds one BLOCK_SIZE slice per index, in order) with one
    request per contiguous run, cut at the disk's end."""
    mv = memoryview(data)
    i = 0
    n = len(blocks)
    while i < n:
        j = i + 1
        while j < n and blocks[j] == blocks[j - 1] + 1:
            j += 1
        start = int(blocks[i]) * BLOCK_SIZE
        length = min((j - i) * BLOCK_SIZE, size - start)
        await client.write(start, mv[i * BLOCK_SIZE:i * BLOCK_SIZE + length])
        i = j


async def zero_blocks(client: NbdClient, blocks: np.ndarray, size: int) -> None:
    """Zero whole blocks (holes where the image allows), one request per contiguous run."""
    blocks = np.sort(blocks)
    i, n = 0, len(blocks)
    while i < n:
        j = i + 1
        while j < n and blocks[j] == blocks[j - 1] + 1:
            j += 1
        start = int(blocks[i]) * BLOCK_SIZE
        await client.write_zeroes(start, min((j - i) * BLOCK_SIZE, size - start), punch=True)
        i = j


# --- qemu-nbd: the sink's writer for one copy -------------------------------------------------

class QemuNbd:
    """A ``qemu-nbd`` serving one image read-write on a unix socket (mode 0600), a child of
    this daemon that dies with it (``PR_SET_PDEATHSIG``): no orphan can keep the image open
    and locked after a crash."""

    def __init__(self, image: Path, fmt: str, sock: Path):
        self.image = image
        self.format = fmt
        self.sock = sock
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        self.sock.parent.mkdir(parents=True, exist_ok=True)
        argv = ["qemu-nbd", f"--socket={self.sock}", f"--format={self.format}",
                "--cache=writeback", "--discard=unmap", "--persistent", "--shared=2",
                str(self.image)]
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent)
        except OSError as exc:
            raise QemuError(f"cannot run qemu-nbd for {self.image}: {exc.strerror}") from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.sock.exists():
            if self._proc.returncode is not None or loop.time() > deadline:
                err = b""
                if self._proc.stderr is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        err = await wait_for(self._proc.stderr.read(4096), 1)
                await self.stop()
                raise QemuError(f"qemu-nbd could not serve {self.image}: "
                                f"{err.decode(errors='replace').strip() or 'timed out'}")
            await asyncio.sleep(0.01)
        os.chmod(self.sock, 0o600)

    async def connect(self, contexts: tuple[str, ...] = (ALLOCATION,)) -> NbdClient:
        try:
            return await NbdClient.connect_unix(self.sock, "", contexts=contexts, timeout=120)
        except NbdError as exc:
            raise QemuError(f"cannot open the copy {self.image} through qemu-nbd: {exc}") \
                from None

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (qemu-nbd flushes and closes the image), then wait; SIGKILL past ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()


def _die_with_parent() -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG


async def image_info(path: Path) -> dict:
    """``qemu-img info`` of an image (format, virtual size); -U: another process may have it."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "-U", "--output=json", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode:
        raise QemuError(f"qemu-img info {path}: {err.decode(errors='replace').strip()}")
    return json.loads(out)


async def create_image(path: Path, fmt: str, size: int) -> None:
    """A new empty (sparse) image; refuses to overwrite an existing file."""
    if path.exists():
        raise QemuError(f"{path} exists already")
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", fmt, str(path), str(size),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise QemuError(f"qemu-img create {path}: {err.decode(errors='replace').strip()}")
