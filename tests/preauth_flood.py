"""A hostile peer that never authenticates: idle connections plus hostile pre-auth frames.

Usage: python preauth_flood.py PORT IDLE HOSTILE FIRST N

Keeps IDLE plain TCP connections to 127.0.0.1:PORT open, spread over the loopback addresses
127.0.0.FIRST .. 127.0.0.(FIRST+N-1); they never send a TLS ClientHello, and each is opened
again a second after the sink closed it. HOSTILE
TLS clients loop: handshake (no client certificate), then one hostile frame each time, chosen
in turn from :data:`KINDS` (a 4 MiB frame of nested empty arrays first), then wait for the sink
to close the connection. Prints READY once every idle connection was attempted, then runs until
stdin closes; then prints one JSON line of counts and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import ssl
import struct
import sys
import time

HEADER = struct.Struct(">I")
MiB = 1024 * 1024


def _nested_empty_arrays(n: int) -> bytes:
    """A frame whose body is one array32 of n-5 empty arrays: ~n Python lists if decoded."""
    body = b"\xdd" + struct.pack(">I", n - 5) + b"\x90" * (n - 5)
    return HEADER.pack(len(body)) + body


def _deep_arrays(n: int) -> bytes:
    """Nested one-element arrays as deep as msgpack allows, each level padded with ints."""
    level = b"\xdc\x10\x00" + b"\x01" * 4095          # array16 of 4096: 4095 ints, then a child
    body = level * min(1000, n // len(level)) + b"\xc0"
    return HEADER.pack(len(body)) + body


def _proof_with_huge_cert(n: int) -> bytes:
    """An AuthProof (type 31) whose certificate field is n bytes of bin32."""
    body = b"\x93\x1f\xc6" + struct.pack(">I", n) + b"\x30" * n + b"\xc4\x00"
    return HEADER.pack(len(body)) + body


KINDS: list[tuple[str, bytes]] = [
    ("nested-4MiB", _nested_empty_arrays(4 * MiB)),
    ("deep-4MiB", _deep_arrays(4 * MiB)),
    ("proof-3MiB", _proof_with_huge_cert(3 * MiB)),
    ("nested-4KiB", _nested_empty_arrays(4000)),
    ("slow-header", b""),                              # 1 byte a second: hits the deadline
]


class Counts:
    def __init__(self) -> None:
        self.idle_opened = 0
        self.idle_failed = 0
        self.idle_closed_by_sink = 0
        self.tls_rounds = 0
        self.tls_failed = 0
        self.frames: dict[str, int] = {}


async def _idle(port: int, addr: str, c: Counts, stop: asyncio.Event,
                first: asyncio.Event) -> None:
    """One idle connection at a time, for good: reopened a second after the sink closes it."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, local_addr=(addr, 0)), 30)
        except (OSError, asyncio.TimeoutError):
            c.idle_failed += 1
            first.set()
            await asyncio.sleep(1)
            continue
        c.idle_opened += 1
        first.set()
        read = asyncio.ensure_future(reader.read(1))
        halt = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({read, halt}, return_when=asyncio.FIRST_COMPLETED)
        read.cancel()
        halt.cancel()
        writer.transport.abort()
        if read in done:
            c.idle_closed_by_sink += 1
            await asyncio.sleep(1)


async def _hostile(port: int, addr: str, i: int, c: Counts, stop: asyncio.Event) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    k = i
    while not stop.is_set():
        name, frame = KINDS[k % len(KINDS)]
        k += 1
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="x", local_addr=(addr, 0)), 30)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            c.tls_failed += 1
            await asyncio.sleep(0.2)
            continue
        c.tls_rounds += 1
        c.frames[name] = c.frames.get(name, 0) + 1

        async def send() -> None:
            if frame:
                writer.write(frame)
                await writer.drain()
            else:
                writer.write(HEADER.pack(4000))
                while True:
                    await asyncio.sleep(1)
                    writer.write(b"\x90")
                    await writer.drain()

        async def until_closed() -> None:
            while await reader.read(65536):
                pass

        with contextlib.suppress(Exception):
            sender = asyncio.ensure_future(send())
            try:
                await asyncio.wait_for(until_closed(), 60)
            finally:
                sender.cancel()
                with contextlib.suppress(BaseException):
                    await sender
        writer.transport.abort()


async def main() -> None:
    port, idle, hostile, first_addr, naddr = (int(x) for x in sys.argv[1:6])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    c = Counts()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    addrs = [f"127.0.0.{first_addr + i % naddr}" for i in range(max(idle, hostile))]
    tasks = [asyncio.ensure_future(_hostile(port, addrs[i], i, c, stop)) for i in range(hostile)]
    t0 = time.monotonic()
    started = []
    for i in range(idle):
        started.append(asyncio.Event())
        tasks.append(asyncio.ensure_future(_idle(port, addrs[i], c, stop, started[-1])))
        if i % 50 == 49:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
    print(f"READY {c.idle_opened} {c.idle_failed} {time.monotonic() - t0:.2f}", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    print(json.dumps(vars(c)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
