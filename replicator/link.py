"""The replication link: framed messages over an asyncio stream, with a bandwidth cap.

Thin on purpose: the codec (``wire``) does the parsing; this only moves frames. Each frame is
written with a single ``write`` call, so tasks sharing a link never interleave frames.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .aio import wait_for
from .errors import FrameTooLarge, LinkClosed
from .wire.codec import HEADER, decode_body, encode


class RateLimiter:
    """Token bucket on wire bytes; ``rate`` 0 means unlimited. The rate can change live."""

    def __init__(self, rate: int = 0, burst: float = 0.05):
        self.rate = rate
        self.burst_seconds = burst
        self._tokens = 0.0
        self._t = time.monotonic()

    async def consume(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        cap = max(self.rate * self.burst_seconds, 256 * 1024)
        self._tokens = min(cap, self._tokens + (now - self._t) * self.rate)
        self._t = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


class Link:
    """One connection to the peer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame: int, limiter: RateLimiter | None = None):
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self.limiter = limiter or RateLimiter(0)
        self.bytes_out = 0
        self.bytes_in = 0
        self.last_recv = time.monotonic()
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    async def send(self, msg: Any) -> int:
        return await self.send_frame(encode(msg))

    async def send_frame(self, frame: bytes, *, limited: bool = True) -> int:
        if limited:
            await self.limiter.consume(len(frame))
        if self.writer.is_closing():
            raise LinkClosed(f"link to {self.peer} is closed")
        self.writer.write(frame)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise LinkClosed(f"link to {self.peer} lost: {exc}") from None
        self.bytes_out += len(frame)
        return len(frame)

    async def recv(self, max_frame: int | None = None) -> Any:
        """The next message. ``max_frame`` lowers the limit for this one frame (before
        authentication, see ``identity``). Decoding stays on the event loop: the codec's schema
        limits make it a copy of the frame's bytes at worst (a thread would not help, as msgpack
        holds the GIL)."""
        limit = self.max_frame if max_frame is None else min(max_frame, self.max_frame)
        try:
            head = await self.reader.readexactly(4)
            (n,) = HEADER.unpack(head)
            if n > limit:
                raise FrameTooLarge(f"frame of {n} bytes from {self.peer} exceeds the limit "
                                    f"of {limit}")
            body = await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise LinkClosed(f"{self.peer} closed the link") from None
        except (ConnectionError, OSError) as exc:
            raise LinkClosed(f"link to {self.peer} lost: {exc}") from None
        self.bytes_in += 4 + n
        self.last_recv = time.monotonic()
        return decode_body(body)

    async def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await wait_for(self.writer.wait_closed(), 2)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
