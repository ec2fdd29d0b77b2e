"""The asyncio NBD client against qemu-nbd (raw and qcow2 files) and against a hostile server.

qemu-nbd, qemu-img and qemu-io come from qemu-utils (deploy/install-deps.sh); a missing tool
fails the test. The hostile server is a small asyncio server in this file that completes the
handshake and then answers wrongly; every case must end in a clear NbdError, never a hang.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from replicator.errors import NbdError, QemuError, ReplicatorError
from replicator.vmm import nbd_proto as p
from replicator.vmm.nbd import STATE_HOLE, STATE_ZERO, Extent, NbdClient, NbdServerError

MiB = 1 << 20
SIZE = 16 * MiB


def tool(name: str) -> str:
    exe = shutil.which(name)
    assert exe, f"{name} is not installed (deploy/install-deps.sh installs qemu-utils)"
    return exe


def run(*argv: str) -> None:
    subprocess.run([tool(argv[0]), *argv[1:]], check=True, capture_output=True)


class QemuNbd:
    """``qemu-nbd`` serving one image as export ``disk`` (shared, persistent)."""

    def __init__(self, image: Path, fmt: str, *, sock: Path | None = None, port: int = 0,
                 read_only: bool = False):
        argv = [tool("qemu-nbd"), "-f", fmt, "-x", "disk", "-t", "-e", "4"]
        argv += ["-k", str(sock)] if sock else ["-b", "127.0.0.1", "-p", str(port)]
        if read_only:
            argv.append("-r")
        self.sock, self.port = sock, port
        self.proc = subprocess.Popen([*argv, str(image)], stderr=subprocess.PIPE)

    async def ready(self) -> None:
        for _ in range(200):
            assert self.proc.poll() is None, self.proc.stderr.read().decode()  # type: ignore
            if self.sock and self.sock.exists():
                return
            if not self.sock:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        return
            await asyncio.sleep(0.02)
        raise AssertionError("qemu-nbd did not start listening")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def nbd_servers():
    started: list[QemuNbd] = []

    async def start(image: Path, fmt: str, **kw) -> QemuNbd:
        server = QemuNbd(image, fmt, **kw)
        started.append(server)
        await server.ready()
        return server

    yield start
    for server in started:
        server.stop()


def make_image(d: Path, fmt: str) -> tuple[Path, bytearray]:
    """A 16 MiB image with data only in [1 MiB, 2 MiB); returns it and its expected bytes."""
    image = d / f"disk.{fmt}"
    if fmt == "raw":
        image.write_bytes(b"")
        os.truncate(image, SIZE)
    else:
        run("qemu-img", "create", "-f", "qcow2", str(image), str(SIZE))
    run("qemu-io", "-f", fmt, "-c", f"write -P 0xab {MiB} {MiB}", str(image))
    model = bytearray(SIZE)
    model[MiB:2 * MiB] = b"\xab" * MiB
    return image, model


def image_bytes(image: Path, fmt: str) -> bytes:
    out = image.with_suffix(".check")
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out))
    return out.read_bytes()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_read_write_zeroes_flush_block_status(shm_dir, nbd_servers, fmt):
    image, model = make_image(shm_dir, fmt)
    server = await nbd_servers(image, fmt, sock=shm_dir / "nbd.sock")
    async with await NbdClient.connect_unix(server.sock, "disk", contexts=["base:allocation"],
                                            depth=8, timeout=10) as c:
        assert c.size == SIZE and not c.read_only
        # A hole is reported as a hole (and zero), the written MiB as data.
        alloc = (await c.extents())["base:allocation"]
        assert alloc == [Extent(0, MiB, STATE_HOLE | STATE_ZERO), Extent(MiB, MiB, 0),
                         Extent(2 * MiB, SIZE - 2 * MiB, STATE_HOLE | STATE_ZERO)]
        assert bytes(await c.read(0, 3 * MiB)) == model[:3 * MiB]

        pattern = os.urandom(256 << 10)
        await c.write(4 * MiB, pattern)
        model[4 * MiB:4 * MiB + len(pattern)] = pattern
        await c.write_zeroes(MiB + (256 << 10), 512 << 10)
        model[MiB + (256 << 10):MiB + (768 << 10)] = bytes(512 << 10)
        await c.flush()
        # Many reads in flight (more than the depth), each into its own slice of one buffer.
        buf = bytearray(SIZE)
        view = memoryview(buf)
        step = 128 << 10
        await asyncio.gather(*[c.read(off, step, view[off:off + step])
                               for off in range(0, SIZE, step)])
        assert buf == model
        alloc = (await c.extents())["base:allocation"]
        assert Extent(4 * MiB, len(pattern), 0) in alloc
        zeroed = [e for e in alloc if e.offset <= MiB + (256 << 10) < e.offset + e.length]
        assert zeroed[0].flags & STATE_ZERO
        # A range the export does not have is refused before anything is sent.
        with pytest.raises(NbdError, match="outside the export"):
            await c.read(SIZE - 4096, 8192)
        assert bytes(await c.read(SIZE - 4096, 4096)) == model[-4096:]
    server.stop()
    assert image_bytes(image, fmt) == model


async def test_tcp_read_only_and_unknown_export(shm_dir, nbd_servers):
    image, model = make_image(shm_dir, "raw")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await nbd_servers(image, "raw", port=port, read_only=True)
    async with await NbdClient.connect_tcp("127.0.0.1", port, "disk", timeout=10) as c:
        assert c.read_only
        assert bytes(await c.read(MiB - 10, 20)) == model[MiB - 10:MiB + 10]
        with pytest.raises(NbdError, match="read-only"):
            await c.write(0, b"x")
        with pytest.raises(NbdError, match="no meta context was negotiated"):
            await c.block_status(0, 4096)
    with pytest.raises(NbdError, match="'nope' not present"):
        await NbdClient.connect_tcp("127.0.0.1", port, "nope", timeout=10)
    with pytest.raises(NbdError, match="no meta context qemu:dirty-bitmap:x"):
        await NbdClient.connect_tcp("127.0.0.1", port, "disk", timeout=10,
                                    contexts=["base:allocation", "qemu:dirty-bitmap:x"])
    with pytest.raises(NbdError, match="cannot connect"):
        await NbdClient.connect_unix(shm_dir / "absent.sock", "disk", timeout=10)
    assert issubclass(NbdError, QemuError) and issubclass(NbdError, ReplicatorError)


async def test_throughput_256mib(shm_dir, nbd_servers):
    """Prints the rate of reading 256 MiB through qemu-nbd (1 MiB x 8 in flight); asserts
    only that every byte arrived."""
    size, chunk = 256 * MiB, MiB
    pattern = os.urandom(chunk)
    image = shm_dir / "big.raw"
    with open(image, "wb") as f:
        for _ in range(size // chunk):
            f.write(pattern)
    server = await nbd_servers(image, "raw", sock=shm_dir / "big.sock", read_only=True)
    async with await NbdClient.connect_unix(server.sock, "disk", depth=8, timeout=30) as c:
        bufs = asyncio.Queue()
        for _ in range(8):
            bufs.put_nowait(bytearray(chunk))
        bad = 0

        async def one(off: int) -> None:
            nonlocal bad
            buf = await bufs.get()
            try:
                await c.read(off, chunk, buf)
                bad += buf != pattern          # bytearray ==: memcmp (memoryview == is slow)
            finally:
                bufs.put_nowait(buf)

        wall, cpu = time.monotonic(), time.process_time()
        await asyncio.gather(*[one(off) for off in range(0, size, chunk)])
        wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    print(f"\nNBD read of 256 MiB via qemu-nbd: {size / wall / 1e6:.0f} MB/s, "
          f"{cpu / (size / (1 << 30)):.2f} s CPU per GiB")
    assert bad == 0


# --- a hostile server ------------------------------------------------------------------------

Answer = Callable[[int, int, int, int, int], bytes | None]   # (flags, kind, cookie, off, len)


def structured(cookie: int, rtype: int, payload: bytes, flags: int = p.REPLY_FLAG_DONE) -> bytes:
    return p.STRUCT_HEADER.pack(p.STRUCTURED_REPLY_MAGIC, flags, rtype, cookie,
                                len(payload)) + payload


def opt_reply(option: int, rtype: int, payload: bytes = b"") -> bytes:
    return p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, option, rtype, len(payload)) + payload


class FakeServer:
    """Completes a plausible handshake (1 MiB export, ``base:allocation`` as context 1), then
    sends what ``answer`` returns for each request (``None``: silence; ``b"close"``: hang up).
    ``greeting`` / ``on_go`` replace the handshake's parts for handshake cases."""

    def __init__(self, answer: Answer | None = None, *, greeting: bytes | None = None,
                 on_go: bytes | None = None):
        self.answer, self.greeting, self.on_go = answer, greeting, on_go
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(self.greeting if self.greeting is not None else
                    p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, 3))
            await r.readexactly(4)
            while True:
                _, opt, n = p.OPTION.unpack(await r.readexactly(16))
                await r.readexactly(n)
                if opt == p.OPT_SET_META_CONTEXT:
                    w.write(opt_reply(opt, p.REP_META_CONTEXT, struct.pack(">I", 1)
                                      + b"base:allocation") + opt_reply(opt, p.REP_ACK))
                elif opt == p.OPT_GO:
                    w.write(self.on_go if self.on_go is not None else
                            opt_reply(opt, p.REP_INFO, struct.pack(">HQH", 0, MiB, 0x4D))
                            + opt_reply(opt, p.REP_ACK))
                    break
                else:
                    w.write(opt_reply(opt, p.REP_ACK))
            while True:
                _, flags, kind, cookie, off, n = p.REQUEST.unpack(await r.readexactly(28))
                if kind == p.CMD_DISC:
                    break
                out = self.answer(flags, kind, cookie, off, n) if self.answer else None
                if out == b"close":
                    break
                if out:
                    w.write(out)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


def data(cookie: int, off: int, payload: bytes, flags: int = p.REPLY_FLAG_DONE) -> bytes:
    return structured(cookie, p.RT_OFFSET_DATA, struct.pack(">Q", off) + payload, flags)


HOSTILE: dict[str, tuple[Answer, str]] = {
    "wrong cookie": (lambda f, k, c, o, n: data(c + 1000, o, bytes(n)), "not in flight"),
    "oversized chunk": (lambda f, k, c, o, n: p.STRUCT_HEADER.pack(
        p.STRUCTURED_REPLY_MAGIC, 1, p.RT_BLOCK_STATUS, c, 1 << 30), "exceeds"),
    "data outside the request": (lambda f, k, c, o, n: data(c, o + n, b"x" * 16), "outside"),
    "half a read": (lambda f, k, c, o, n: data(c, o, bytes(n // 2)), "does not cover"),
    "overlapping read": (lambda f, k, c, o, n: data(c, o, bytes(n // 2), 0)
                         + data(c, o, bytes(n // 2)), "does not cover"),
    "bad magic": (lambda f, k, c, o, n: b"\xde\xad\xbe\xef" + bytes(12), "bad NBD reply magic"),
    "simple success to a read": (lambda f, k, c, o, n: p.SIMPLE_HEADER.pack(
        p.SIMPLE_REPLY_MAGIC, 0, c), "needs structured data"),
    "hang up": (lambda f, k, c, o, n: b"close", "closed the connection"),
    "silence": (lambda f, k, c, o, n: None, "no reply within"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_server_breaks_the_connection(case):
    answer, message = HOSTILE[case]
    server = FakeServer(answer)
    port = await server.start()
    try:
        async with asyncio.timeout(10):
            c = await NbdClient.connect_tcp("127.0.0.1", port, "disk", timeout=1.0, depth=4)
            reads = [c.read(i * 4096, 4096) for i in range(3)]
            results = await asyncio.gather(*reads, return_exceptions=True)
            assert all(isinstance(r, NbdError) for r in results), results
            assert message in str(results[0])
            assert c.closed
            with pytest.raises(NbdError):
                await c.read(0, 4096)           # later requests fail at once
            await c.close()
    finally:
        server.close()


async def test_hostile_block_status():
    def unknown_context(f, k, c, o, n):
        return structured(c, p.RT_BLOCK_STATUS, struct.pack(">III", 7, 4096, 0))

    def zero_length(f, k, c, o, n):
        return structured(c, p.RT_BLOCK_STATUS, struct.pack(">III", 1, 0, 0))

    for answer, message in [(unknown_context, "unknown or repeated context 7"),
                            (zero_length, "length 0")]:
        server = FakeServer(answer)
        port = await server.start()
        try:
            async with asyncio.timeout(10):
                c = await NbdClient.connect_tcp("127.0.0.1", port, "disk", timeout=1.0,
                                                contexts=["base:allocation"])
                with pytest.raises(NbdError, match=message):
                    await c.block_status(0, 65536)
                await c.close()
        finally:
            server.close()


async def test_server_error_keeps_connection_usable():
    def answer(f, k, c, o, n):
        if o == 0:
            msg = b"Input/output error"
            return structured(c, p.RT_ERROR, struct.pack(">IH", 5, len(msg)) + msg)
        # A hole chunk then a data chunk, out of order: zeros then bytes.
        half = n // 2
        return (data(c, o + half, b"\x11" * (n - half), 0)
                + structured(c, p.RT_OFFSET_HOLE, struct.pack(">QI", o, half)))

    server = FakeServer(answer)
    port = await server.start()
    try:
        async with asyncio.timeout(10):
            c = await NbdClient.connect_tcp("127.0.0.1", port, "disk", timeout=1.0)
            with pytest.raises(NbdServerError, match="Input/output error") as err:
                await c.read(0, 4096)
            assert err.value.errno == 5
            buf = bytearray(b"\xff" * 8192)
            got = await c.read(8192, 8192, buf)
            assert bytes(got) == bytes(4096) + b"\x11" * 4096
            assert not c.closed
            await c.close()
    finally:
        server.close()


HANDSHAKE: dict[str, tuple[dict, str]] = {
    "not NBD": ({"greeting": b"HTTP/1.1 400 Bad Request\r\n\r\n"}, "bad greeting magic"),
    "oversized option reply": ({"on_go": p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, p.OPT_GO,
                                                             p.REP_INFO, 1 << 30)}, "exceeds"),
    "reply to another option": ({"on_go": opt_reply(p.OPT_ABORT, p.REP_ACK)},
                                "bad NBD option reply"),
    "no export size": ({"on_go": opt_reply(p.OPT_GO, p.REP_ACK)}, "did not say the export's size"),
    "silent": ({"on_go": b""}, "handshake with"),
    "endless info": ({"on_go": opt_reply(p.OPT_GO, p.REP_INFO, struct.pack(">H", 99)) * 100},
                     "too many info replies"),
}


@pytest.mark.parametrize("case", list(HANDSHAKE))
async def test_hostile_handshake(case):
    kw, message = HANDSHAKE[case]
    server = FakeServer(**kw)
    port = await server.start()
    try:
        async with asyncio.timeout(10):
            with pytest.raises(NbdError, match=message):
                await NbdClient.connect_tcp("127.0.0.1", port, "disk", timeout=1.0)
    finally:
        server.close()


def test_client_works_on_uvloop(shm_dir):
    """The daemons run on uvloop, whose transports are not asyncio.Transport subclasses (an
    isinstance check in the client's protocol broke every connection there)."""
    import uvloop

    image, model = make_image(shm_dir, "qcow2")
    server = QemuNbd(image, "qcow2", sock=shm_dir / "nbd.sock")

    async def main() -> None:
        await server.ready()
        async with await NbdClient.connect_unix(server.sock, "disk",
                                                contexts=["base:allocation"], timeout=10) as c:
            assert bytes(await c.read(MiB, MiB)) == bytes(model[MiB:2 * MiB])
            await c.write(0, b"\x01" * 4096)
            await c.flush()
            alloc = (await c.extents())["base:allocation"]
            assert alloc[0].offset == 0 and not alloc[0].flags & STATE_ZERO

    try:
        uvloop.run(main())
    finally:
        server.stop()
