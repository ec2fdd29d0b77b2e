"""A small asyncio NBD client for QEMU's and qemu-nbd's exports (unix socket or TCP).

Speaks the fixed newstyle handshake with structured replies and meta contexts
(``base:allocation``, ``qemu:dirty-bitmap:NAME``), then READ, WRITE, WRITE_ZEROES, FLUSH and
BLOCK_STATUS with up to ``depth`` requests in flight. READ data lands straight in the caller's
buffer (an :class:`asyncio.BufferedProtocol`: a stream reader would copy every byte twice).
The protocol itself is in :mod:`replicator.vmm.nbd_proto`; this module owns the socket.

Failures are :class:`~replicator.errors.NbdError`: a request the server refused raises
:class:`NbdServerError` and leaves the connection usable; a protocol violation, a lost
connection or a reply that does not come within ``timeout`` breaks the connection and fails
every request in flight. Building block for disk replication (issue 11); the replication
engine does not use it yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import Sequence

from replicator.errors import NbdError
from replicator.vmm import nbd_proto as p
from replicator.vmm.nbd_proto import Extent, NbdServerError

__all__ = ["Extent", "NbdClient", "NbdError", "NbdServerError",
           "STATE_DIRTY", "STATE_HOLE", "STATE_ZERO"]

STATE_HOLE, STATE_ZERO, STATE_DIRTY = p.STATE_HOLE, p.STATE_ZERO, p.STATE_DIRTY

#: BLOCK_STATUS lengths are 32-bit; stay 64 KiB-aligned below 4 GiB.
_MAX_STATUS = (1 << 32) - (64 << 10)
_MAX_ZEROES = 1 << 30
_MAX_GO_INFOS = 64


class _Wire(asyncio.BufferedProtocol):
    """The socket: handshake bytes are buffered, transmission bytes go to a ReplyParser."""

    def __init__(self, client: NbdClient):
        self._client = client
        self.transport: asyncio.Transport | None = None
        self.parser: p.ReplyParser | None = None
        self._scratch = bytearray(4096)
        self._hs = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._drain: list[asyncio.Future[None]] = []
        self.paused = False
        self.lost: BaseException | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.parser.buffer() if self.parser is not None else memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self.parser is None:
            self._hs += self._scratch[:nbytes]
            if len(self._hs) > 2 * p.MAX_OPTION_REPLY:
                self._client._fail(NbdError("NBD server floods the handshake"))
            self._wake()
            return
        try:
            replies = self.parser.advance(nbytes)
        except NbdError as exc:
            self._client._fail(exc)
            return
        self._client._deliver(replies)

    async def read_exactly(self, n: int) -> bytes:
        """Handshake only: the next ``n`` bytes from the server."""
        while len(self._hs) < n:
            if self.lost is not None:
                raise NbdError(f"NBD server closed the connection during the handshake "
                               f"({self.lost})")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = bytes(self._hs[:n])
        del self._hs[:n]
        return data

    def start_transmission(self, parser: p.ReplyParser) -> None:
        if self._hs:
            raise NbdError("NBD server sent data before any request")
        self.parser = parser

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def drain(self) -> None:
        while self.paused and self.lost is None:
            fut = asyncio.get_running_loop().create_future()
            self._drain.append(fut)
            await fut

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for fut in self._drain:
            if not fut.done():
                fut.set_result(None)
        self._drain.clear()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or NbdError("server closed the connection")
        self._wake()
        self.resume_writing()
        if not self.closed.done():
            self.closed.set_result(None)
        self._client._fail(NbdError(f"NBD server closed the connection ({self.lost})"))


class NbdClient:
    """One NBD connection to one export. Create with :meth:`connect_unix` / :meth:`connect_tcp`.

    ``contexts`` names the meta contexts to negotiate; each must be granted. ``depth`` bounds
    the requests in flight; ``timeout`` bounds the handshake and every request's reply.
    """

    def __init__(self, where: str, *, depth: int, timeout: float):
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.where = where
        self.timeout = timeout
        self.info = p.ExportInfo()
        self.contexts: dict[str, int] = {}
        self._wire: _Wire | None = None
        self._slots = asyncio.Semaphore(depth)
        self._futures: dict[int, asyncio.Future[p.Request]] = {}
        self._parser: p.ReplyParser | None = None
        self._cookie = 0
        self._error: NbdError | None = None

    # -- connecting -------------------------------------------------------------------------

    @classmethod
    async def connect_unix(cls, path: str | os.PathLike[str], export: str = "", *,
                           contexts: Sequence[str] = (), depth: int = 16,
                           timeout: float = 30.0) -> NbdClient:
        """Connect to the export ``export`` on the unix socket ``path``."""
        self = cls(f"nbd+unix:///{export}?socket={os.fspath(path)}", depth=depth, timeout=timeout)
        loop = asyncio.get_running_loop()
        await self._connect(lambda: loop.create_unix_connection(self._new_wire, os.fspath(path)),
                            export, contexts)
        return self

    @classmethod
    async def connect_tcp(cls, host: str, port: int, export: str = "", *,
                          contexts: Sequence[str] = (), depth: int = 16,
                          timeout: float = 30.0) -> NbdClient:
        """Connect to the export ``export`` at ``host:port``."""
        self = cls(f"nbd://{host}:{port}/{export}", depth=depth, timeout=timeout)
        loop = asyncio.get_running_loop()
        await self._connect(lambda: loop.create_connection(self._new_wire, host, port),
                            export, contexts)
        return self

    def _new_wire(self) -> _Wire:
        self._wire = _Wire(self)
        return self._wire

    async def _connect(self, opener, export: str, contexts: Sequence[str]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    await opener()
                except OSError as exc:
                    raise NbdError(f"cannot connect to {self.where}: "
                                   f"{exc.strerror or exc}") from None
                await self._handshake(export, list(contexts))
        except TimeoutError:
            self._abort()
            raise NbdError(f"NBD handshake with {self.where} took over {self.timeout:g}s") from None
        except BaseException as exc:
            self._abort()
            if isinstance(exc, NbdError) and not str(exc).startswith(self.where):
                raise NbdError(f"{self.where}: {exc}") from None
            raise

    async def _option(self, option: int, data: bytes = b"") -> None:
        assert self._wire is not None and self._wire.transport is not None
        self._wire.transport.write(p.encode_option(option, data))

    async def _option_reply(self, option: int) -> tuple[int, bytes]:
        assert self._wire is not None
        rtype, n = p.parse_option_header(await self._wire.read_exactly(p.OPTION_REPLY.size),
                                         option)
        payload = await self._wire.read_exactly(n) if n else b""
        if rtype & p.REP_ERR_BIT:
            raise p.option_error(option, rtype, payload)
        return rtype, payload

    async def _handshake(self, export: str, contexts: list[str]) -> None:
        wire = self._wire
        assert wire is not None and wire.transport is not None
        flags = p.parse_greeting(await wire.read_exactly(p.GREETING.size))
        wire.transport.write(struct.pack(">I", p.FLAG_FIXED_NEWSTYLE | (flags & p.FLAG_NO_ZEROES)))
        await self._option(p.OPT_STRUCTURED_REPLY)
        rtype, _ = await self._option_reply(p.OPT_STRUCTURED_REPLY)
        if rtype != p.REP_ACK:
            raise NbdError(f"unexpected reply {rtype} to NBD_OPT_STRUCTURED_REPLY")
        if contexts:
            await self._option(p.OPT_SET_META_CONTEXT, p.meta_context_query(export, contexts))
            for _ in range(len(contexts) + 1):
                rtype, payload = await self._option_reply(p.OPT_SET_META_CONTEXT)
                if rtype == p.REP_ACK:
                    break
                if rtype != p.REP_META_CONTEXT:
                    raise NbdError(f"unexpected reply {rtype} to NBD_OPT_SET_META_CONTEXT")
                cid, name = p.parse_meta_context(payload)
                if name not in contexts or name in self.contexts:
                    raise NbdError(f"NBD server granted unrequested meta context {name!r}")
                self.contexts[name] = cid
            else:
                raise NbdError("NBD server sent too many meta context replies")
            missing = [c for c in contexts if c not in self.contexts]
            if missing:
                raise NbdError(f"export {export!r} has no meta context {', '.join(missing)}")
            if len(set(self.contexts.values())) != len(self.contexts):
                raise NbdError("NBD server gave two meta contexts the same id")
        await self._option(p.OPT_GO, p.go_request(export))
        for _ in range(_MAX_GO_INFOS):
            rtype, payload = await self._option_reply(p.OPT_GO)
            if rtype == p.REP_ACK:
                break
            if rtype != p.REP_INFO:
                raise NbdError(f"unexpected reply {rtype} to NBD_OPT_GO")
            self.info.update(payload)
        else:
            raise NbdError("NBD server sent too many info replies")
        if self.info.size < 0:
            raise NbdError("NBD server did not say the export's size")
        self._parser = p.ReplyParser(set(self.contexts.values()))
        wire.start_transmission(self._parser)

    # -- export properties ------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.info.size

    @property
    def read_only(self) -> bool:
        return bool(self.info.flags & p.TF_READ_ONLY)

    @property
    def max_request(self) -> int:
        """Largest READ or WRITE one request may carry."""
        return self.info.block_max

    @property
    def closed(self) -> bool:
        return self._error is not None

    # -- requests ---------------------------------------------------------------------------

    async def read(self, offset: int, length: int,
                   buf: bytearray | memoryview | None = None) -> memoryview:
        """Read ``length`` bytes at ``offset`` into ``buf`` (or a new buffer); holes read as
        zeros. Cancelling a read breaks the connection: its data would still land in ``buf``."""
        view = memoryview(buf if buf is not None else bytearray(length))
        if len(view) < length or view.readonly:
            raise ValueError("read buffer is read-only or shorter than the length")
        view = view.cast("B")[:length]
        self._check(offset, length, self.max_request)
        if length:
            await self._submit(p.CMD_READ, offset, length, buf=view)
        return view

    async def write(self, offset: int, data: bytes | bytearray | memoryview, *,
                    fua: bool = False) -> None:
        """Write ``data`` at ``offset`` (``fua``: durable when the reply comes)."""
        data = memoryview(data).cast("B")
        self._check(offset, len(data), self.max_request, writing=True)
        if len(data):
            await self._submit(p.CMD_WRITE, offset, len(data), self._fua(fua), payload=data)

    async def write_zeroes(self, offset: int, length: int, *, punch: bool = True,
                           fua: bool = False) -> None:
        """Zero a range; ``punch`` lets the server deallocate it (a hole)."""
        self._check(offset, length, None, writing=True)
        if not self.info.flags & p.TF_SEND_WRITE_ZEROES:
            raise NbdError(f"{self.where}: the export does not support WRITE_ZEROES")
        flags = self._fua(fua) | (0 if punch else p.CMD_FLAG_NO_HOLE)
        end = offset + length
        while offset < end:
            n = min(end - offset, _MAX_ZEROES)
            await self._submit(p.CMD_WRITE_ZEROES, offset, n, flags)
            offset += n

    async def flush(self) -> None:
        """Make every completed write durable."""
        if not self.info.flags & p.TF_SEND_FLUSH:
            return              # the server writes through: nothing to flush
        await self._submit(p.CMD_FLUSH, 0, 0)

    async def block_status(self, offset: int, length: int) -> dict[str, list[Extent]]:
        """One BLOCK_STATUS request: each context's extents from ``offset``. They may cover
        less than ``length`` (the server decides), never more."""
        self._check(offset, length, None)
        length = min(length, _MAX_STATUS)
        if not self.contexts:
            raise NbdError(f"{self.where}: no meta context was negotiated")
        if not length:
            return {name: [] for name in self.contexts}
        req = await self._submit(p.CMD_BLOCK_STATUS, offset, length)
        return {name: req.extents[cid] for name, cid in self.contexts.items()}

    async def extents(self, offset: int = 0,
                      length: int | None = None) -> dict[str, list[Extent]]:
        """Each context's extents covering ``[offset, offset+length)`` (default: to the end),
        as many BLOCK_STATUS requests as that takes; adjacent equal extents are merged."""
        end = self.size if length is None else offset + length
        self._check(offset, end - offset, None)
        out: dict[str, list[Extent]] = {name: [] for name in self.contexts}
        pos = offset
        while pos < end:
            got = await self.block_status(pos, end - pos)
            if any(not exts for exts in got.values()):
                raise NbdError(f"{self.where}: block status at {pos} returned no extent")
            stop = min(exts[-1].offset + exts[-1].length for exts in got.values())
            for name, exts in got.items():
                merged = out[name]
                for e in exts:
                    n = min(e.length, stop - e.offset)
                    if n <= 0:
                        break
                    last = merged[-1] if merged else None
                    if last and last.flags == e.flags and last.offset + last.length == e.offset:
                        merged[-1] = Extent(last.offset, last.length + n, e.flags)
                    else:
                        merged.append(Extent(e.offset, n, e.flags))
            pos = stop
        return out

    def _fua(self, fua: bool) -> int:
        return p.CMD_FLAG_FUA if fua and self.info.flags & p.TF_SEND_FUA else 0

    def _check(self, offset: int, length: int, limit: int | None, writing: bool = False) -> None:
        if self._error is not None:
            raise self._error
        if offset < 0 or length < 0 or offset + length > self.size:
            raise NbdError(f"{self.where}: range [{offset}, +{length}) outside the export "
                           f"of {self.size} bytes")
        if limit is not None and length > limit:
            raise NbdError(f"{self.where}: request of {length} bytes exceeds the server's "
                           f"maximum {limit}")
        if writing and self.read_only:
            raise NbdError(f"{self.where}: the export is read-only")

    async def _submit(self, kind: int, offset: int, length: int, flags: int = 0, *,
                      payload: memoryview | None = None,
                      buf: memoryview | None = None) -> p.Request:
        async with self._slots:
            if self._error is not None:
                raise self._error
            wire, parser = self._wire, self._parser
            assert wire is not None and wire.transport is not None and parser is not None
            self._cookie += 1
            cookie = self._cookie
            req = p.Request(kind, offset, length, buf)
            fut: asyncio.Future[p.Request] = asyncio.get_running_loop().create_future()
            parser.expect(cookie, req)
            self._futures[cookie] = fut
            wire.transport.write(p.encode_request(kind, cookie, offset, length, flags))
            if payload is not None:
                wire.transport.write(payload)
            try:
                async with asyncio.timeout(self.timeout):
                    await wire.drain()
                    return await fut
            except TimeoutError:
                self._fail(NbdError(f"{self.where}: no reply within {self.timeout:g}s"))
                raise self._error from None  # type: ignore[misc]
            except asyncio.CancelledError:
                if kind == p.CMD_READ:
                    self._fail(NbdError(f"{self.where}: a read was cancelled in flight"))
                raise

    def _deliver(self, replies: list[p.Reply]) -> None:
        for reply in replies:
            fut = self._futures.pop(reply.cookie, None)
            if fut is None or fut.done():
                continue
            if reply.request.error is not None:
                fut.set_exception(reply.request.error)
            else:
                fut.set_result(reply.request)

    def _fail(self, exc: NbdError) -> None:
        """Break the connection: every request in flight and every later one fails."""
        if self._error is None:
            if not str(exc).startswith(self.where):
                exc = NbdError(f"{self.where}: {exc}")
            self._error = exc
        self._abort()
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            if not fut.done():
                fut.set_exception(self._error)
                fut.exception()       # nobody may be left to retrieve it

    def _abort(self) -> None:
        if self._wire is not None and self._wire.transport is not None:
            self._wire.transport.abort()

    async def close(self) -> None:
        """Wait (up to ``timeout``) for requests in flight, send NBD_CMD_DISC, close."""
        wire = self._wire
        if wire is None or wire.transport is None:
            return
        if self._error is None:
            with contextlib.suppress(TimeoutError, NbdError):
                async with asyncio.timeout(self.timeout):
                    while self._futures:
                        await asyncio.gather(*self._futures.values(), return_exceptions=True)
        if self._error is None:
            wire.transport.write(p.encode_request(p.CMD_DISC, 0, 0, 0))
            self._error = NbdError(f"{self.where}: connection closed")
            wire.transport.close()          # sends DISC first, unlike abort()
        else:
            self._abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout):
                await wire.closed

    async def __aenter__(self) -> NbdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
