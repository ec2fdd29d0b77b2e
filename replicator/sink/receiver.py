"""The sink side of the stream: accept the source, verify and store its pages.

One source at a time per domain. Each connection: check the ``Hello`` (protocol version, domain
name, region layout), answer with the acked epoch and the full manifest so the source sends only
what differs, then apply page batches. Every page is verified against its hash before it is
written; any malformed or hostile frame drops the connection without touching the shadow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..aio import finish, wait_for
from ..config import Config, parse_address
from ..errors import (IntegrityError, LayoutMismatch, PeerError, ProtocolError, ReplicatorError,
                      StoreError)
from ..identity import authenticate_client, identity_for, pinned_peer
from ..link import Link
from ..metrics import Metrics
from ..wire import messages as m
from ..wire.pages import decode_batch
from .admission import Admission
from .disks import DiskCopies
from .store import ShadowStore
from ..vmm.spec import RAM_BACKEND_ID
from .vmcheck import check_offer

log = logging.getLogger(__name__)

MANIFEST_CHUNK_PAGES = 512 * 1024
# What a connection's reader buffers before pausing the socket: a few pre-auth frames until the
# peer proved its ID (a stranger's 4 MiB frame is refused by its header, not buffered), then
# room for page batches.
PRE_AUTH_READ_LIMIT = 16 * 1024
SESSION_READ_LIMIT = 1 << 20
# Epochs grow by one per round; a peer jumping far ahead is broken or hostile (and would
# eventually overflow the 64-bit epoch the journal and the wire carry).
MAX_EPOCH_STEP = 1 << 20

#: Handler for switch messages: (message, link) -> None. Installed by the switch layer.
SwitchHandler = Callable[[Any, Link], Awaitable[None]]


class SinkReceiver:
    """Accepts the source's connection and keeps the shadow store up to date."""

    def __init__(self, cfg: Config, metrics: Metrics | None = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics("sink", cfg.domain.name)
        self.root = Path(cfg.node.state_dir) / cfg.domain.name
        self.store: ShadowStore | None = None
        self.link: Link | None = None
        self.source_node = ""
        self.vm_description: bytes = b""
        self.last_error = ""
        self.switch_handler: SwitchHandler | None = None
        self.disconnect_handler: Callable[[], Awaitable[None]] | None = None
        self.precopy_handler: SwitchHandler | None = None
        self.stream_kind = ""                    # "scan" or "precopy", once the source says
        self.peer_generation = 0                 # the source's placement generation (Hello)
        #: Whether the domain runs (or may run) on this host: then no source may stream to
        #: it, and a source that connects is told so (``Welcome.handed_over``). The node sets
        #: this; by default the store's own record decides.
        self.domain_here: Callable[[], bool] = (
            lambda: self.store is not None and self.store.handed_over)
        #: Awaited before a Hello is answered (the node turning around after a switch).
        self.settle: Callable[[], Awaitable[None]] | None = None
        #: This host's placement generation and where it got it, for the Welcome.
        self.placement: Callable[[], tuple[int, float, bool]] = (
            lambda: (self.store.generation, self.store.running_since, self.store.forced)
            if self.store is not None else (0, 0.0, False))
        self.connected = asyncio.Event()
        self._lsock: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        self._active: asyncio.Task | None = None      # the paired source's session
        self._settling: asyncio.Task | None = None    # a session waiting in `settle`
        self._busy = asyncio.Lock()
        self.identity = identity_for(cfg)
        self._pinned = pinned_peer(cfg) if self.identity is not None else ""
        self._ssl = self.identity.server_context() if self.identity is not None else None
        self.admission = Admission(cfg.peer.max_unauthenticated,
                                   cfg.peer.max_unauthenticated_per_address, self.metrics)
        #: Region images elsewhere than in the state dir: a QEMU domain's RAM file, when
        #: this host's config names one (the VM that ran here ran on it).
        ram = cfg.domain.qemu.ram_path if cfg.domain.driver == "qemu" else None
        self.images = {RAM_BACKEND_ID: Path(ram)} if ram is not None else {}
        #: This host's copies of the source's disks (opened when the source offers disks).
        self.disks = DiskCopies(cfg, self.root, self.metrics)

    # --- server --------------------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        host, port = parse_address(self.cfg.peer.listen, key="peer.listen")
        # Our own accept loop: admission runs on the bare socket, and TLS is set up on it with
        # nothing read yet (see _authenticated). A stranger beyond the caps costs no TLS.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._lsock = socket.create_server((host, port), family=family, backlog=256)
        self._lsock.setblocking(False)
        self._accept_task = asyncio.create_task(self._accept_loop(), name="accept")
        sock = self._lsock.getsockname()
        log.info("sink listening on %s:%d for domain %s", sock[0], sock[1], self.cfg.domain.name)
        return sock[0], sock[1]

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._lsock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._lsock)
            except OSError as exc:
                # EMFILE and friends: back off instead of spinning; pending ones time out.
                log.warning("accepting a connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handle(conn), name="connection")
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

    async def stop(self) -> None:
        self.admission.close()
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._accept_task
            self._accept_task = None
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
        for task in list(self._conn_tasks):
            if task is not self._active:
                task.cancel()
        if self.link is not None:
            await self.link.close()
        async with self._busy:
            pass
        if self.store is not None:
            self.store.close(clean=True)
            self.store = None
        await self.disks.close()

    async def request_switch(self, mode: str) -> None:
        """Ask the connected source to switch the domain to this host."""
        link = self.link
        if link is None or not self.connected.is_set():
            raise PeerError(f"the peer {self.source_node or ''} is not connected: it cannot be "
                            "asked to switch (press switch on the host that runs the VM)")
        await link.send(m.SwitchRequest(mode))

    async def end_session(self) -> None:
        """End the paired source's session, if any, and wait until it is over."""
        if self.link is not None:
            await self.link.close()
        elif self._settling is not None and self._settling is self._active:
            # A session parked in `settle` while the node turns around (which is what calls
            # us): it opened nothing yet, so end it now instead of waiting out its wait (the
            # source reconnects at once).
            self._settling.cancel()
        async with self._busy:
            pass

    async def _authenticated(self, conn: socket.socket) -> Link | None:
        """The connection once it is TLS and proved the paired source's ID, within
        peer.handshake_timeout and under the admission caps; None once refused and closed."""
        try:
            peername = conn.getpeername()
        except OSError:
            conn.close()
            return None
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        pending = self.admission.admit(peername, peer)
        timeout = self.cfg.peer.handshake_timeout
        tls_done = self._ssl is None
        loop = asyncio.get_running_loop()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout):
                # Nothing has read the socket: the client's first bytes (its ClientHello) wait
                # in the kernel for the TLS layer. Reading them into a plaintext reader first
                # and then calling start_tls loses them: the handshake hangs (uvloop: always).
                reader = asyncio.StreamReader(limit=PRE_AUTH_READ_LIMIT, loop=loop)
                protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, sock=conn, ssl=self._ssl,
                    ssl_handshake_timeout=(timeout + 1) if self._ssl is not None else None)
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)
                tls_done = True
                link = Link(reader, writer, self.cfg.stream.max_frame_bytes)
                if self.identity is not None:
                    await authenticate_client(link, self.identity, self._pinned, timeout)
            # The paired source: the reader may buffer as much as page batches need (it pauses
            # the socket beyond twice this; StreamReader has no public setter for it).
            reader._limit = SESSION_READ_LIMIT
            return link
        except asyncio.CancelledError:
            # Evicted (see Admission) or the sink stops: either way this connection just ends.
            # Not re-raised: asyncio (3.11) logs a cancelled connection handler as an error.
            asyncio.current_task().uncancel()
            if pending.evicted is None:
                _abort(writer, conn)
                return None
            reason, text = pending.evicted
        except Exception as exc:                     # whatever a stranger causes is a refusal
            reason, text = Admission.classify(exc, tls_done, timeout)
        finally:
            self.admission.release(pending)
        line = self.admission.refused(pending, reason, text)
        if tls_done and not pending.evicted:
            self.metrics.frames_rejected.inc()
            if not self.connected.is_set():          # the paired source's state wins
                self.last_error = line
        _abort(writer, conn)
        return None

    async def _handle(self, conn: socket.socket) -> None:
        link = await self._authenticated(conn)
        if link is None:
            return
        if self._busy.locked():
            # Only the paired (authenticated) source gets here: a new connection from it means
            # the old one is dead even if we have not noticed yet. Let the old session end.
            if self.link is not None:
                await self.link.close()
            try:
                await wait_for(self._busy.acquire(), self.cfg.peer.timeout)
            except asyncio.TimeoutError:
                await _reject(link, "another source is already replicating this domain")
                return
            self._busy.release()
        async with self._busy:
            self._active = asyncio.current_task()
            try:
                await self._session(link)
            except (PeerError, asyncio.TimeoutError) as exc:
                self.last_error = str(exc) or "peer timed out"
                log.warning("source %s: %s", link.peer, self.last_error)
            except (ProtocolError, IntegrityError) as exc:
                self.last_error = f"dropped {link.peer}: {exc}"
                self.metrics.frames_rejected.inc()
                log.warning("%s", self.last_error)
                with contextlib.suppress(Exception):
                    await wait_for(link.send(m.ErrorMessage(str(exc))), 1)
            except StoreError as exc:
                self.last_error = str(exc)
                self.metrics.store_errors.inc()
                log.error("%s", exc)
                with contextlib.suppress(Exception):
                    await wait_for(link.send(m.ErrorMessage(str(exc))), 1)
            except ReplicatorError as exc:
                self.last_error = str(exc)
                log.error("session with %s failed: %s", link.peer, exc)
                with contextlib.suppress(Exception):
                    await wait_for(link.send(m.ErrorMessage(str(exc))), 1)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not take the daemon (and its shadow) down with one connection.
                log.exception("unexpected error in session with %s", link.peer)
            finally:
                if self.store is not None:
                    self.store.abort_epoch()
                if self.disconnect_handler is not None:
                    with contextlib.suppress(Exception):
                        await self.disconnect_handler()
                self.link = None
                self._active = None
                self.connected.clear()
                self.metrics.peer_connected.set(0)
                await link.close()

    # --- session -------------------------------------------------------------------------------

    def _open_store(self, hello: m.Hello) -> ShadowStore:
        if hello.domain != self.cfg.domain.name:
            raise LayoutMismatch(f"source offers domain {hello.domain!r}, this sink keeps "
                                 f"{self.cfg.domain.name!r}")
        for r in hello.regions:
            if r.page_size != 4096 or r.size <= 0 or r.size % 4096:
                raise LayoutMismatch(f"region {r.name!r}: unsupported size/page size")
            if not m.SAFE_NAME.fullmatch(r.name):     # also checked when decoding
                raise LayoutMismatch(f"region name {r.name!r} is not allowed")
        if len({r.name for r in hello.regions}) != len(hello.regions):
            raise LayoutMismatch("duplicate region names")
        # Sizes bounded by this sink's config; a QEMU domain's description checked against it.
        check_offer(self.cfg, hello)
        offered = list(hello.regions)
        existing = (list(self.store._infos) if self.store is not None
                    else ShadowStore.existing_layout(self.root))
        if existing is not None and existing != offered:
            have = ", ".join(f"{r.name}={r.size}" for r in existing)
            want = ", ".join(f"{r.name}={r.size}" for r in offered)
            raise LayoutMismatch(f"layout mismatch: the shadow holds [{have}], the source offers "
                                 f"[{want}]; remove {self.root} on the sink to start over")
        if self.store is not None:
            return self.store
        return ShadowStore.open(self.root, offered, self.images)

    async def _session(self, link: Link) -> None:
        hello = await wait_for(link.recv(), self.cfg.peer.timeout)
        if not isinstance(hello, m.Hello):
            raise ProtocolError(f"expected Hello, got {type(hello).__name__}")
        if hello.version != m.PROTOCOL_VERSION:
            await _reject(link, f"protocol version {hello.version} is not supported "
                                f"(this sink speaks {m.PROTOCOL_VERSION})")
            raise ProtocolError(f"source speaks protocol {hello.version}")
        if hello.domain != self.cfg.domain.name:
            await _reject(link, f"source offers domain {hello.domain!r}, this node keeps "
                                f"{self.cfg.domain.name!r}")
            raise LayoutMismatch(f"source offers domain {hello.domain!r}")
        self.source_node = hello.node
        if self.settle is not None:
            # The node may be turning around (ending its VM, making its RAM and disks the
            # shadow): answer once it knows where the domain runs.
            self._settling = asyncio.current_task()
            try:
                await self.settle()
            finally:
                self._settling = None
        if self.domain_here():
            # Never a stream into a domain that runs here: tell the peer (it may be waiting
            # for a switch's outcome; or it runs the domain too: a split brain it reports).
            generation, since, forced = self.placement()
            await link.send(m.Welcome(m.PROTOCOL_VERSION, self.cfg.node.name, 0, True,
                                      generation, since, forced))
            log.info("source %s connected; the domain runs here, so nothing to receive",
                     hello.node)
            return
        try:
            # In a thread: a store opened on a RAM file this host's VM ran on is re-hashed.
            self.store = await asyncio.to_thread(self._open_store, hello)
        except (LayoutMismatch, StoreError) as exc:
            await _reject(link, str(exc))
            raise
        store = self.store
        self.vm_description = hello.vm
        self.peer_generation = hello.generation
        generation, since, forced = self.placement()
        await link.send(m.Welcome(m.PROTOCOL_VERSION, self.cfg.node.name, store.epoch,
                                  False, generation, since, forced))
        for name, r in store.regions.items():
            h = r.hashes
            for first in range(0, len(h), MANIFEST_CHUNK_PAGES):
                chunk = h[first:first + MANIFEST_CHUNK_PAGES].astype("<u8").tobytes()
                await link.send(m.ManifestChunk(name, first, chunk))
        await link.send(m.ManifestEnd())
        self.link = link
        self.last_error = ""
        self.connected.set()
        self.metrics.peer_connected.set(1)
        log.info("source %s (%s) connected; shadow at epoch %d", hello.node, link.peer, store.epoch)
        npages = {name: r.npages for name, r in store.regions.items()}
        seen_in = link.bytes_in
        # One batch is verified and written in a thread while the loop receives (and decrypts)
        # the next; any other message waits until it is written.
        applying: asyncio.Future | None = None
        try:
            while True:
                if applying is None:
                    msg = await wait_for(link.recv(), self.cfg.peer.timeout)
                else:
                    recv = asyncio.ensure_future(wait_for(link.recv(), self.cfg.peer.timeout))
                    try:
                        # A bad batch ends the session as soon as it is found, not at the
                        # next frame (which may never come).
                        await asyncio.wait({recv, applying}, return_when=asyncio.FIRST_COMPLETED)
                        self.metrics.pages_written.inc(await asyncio.shield(applying))
                        applying = None
                        msg = await recv
                    finally:
                        if recv.done():
                            if not recv.cancelled():
                                recv.exception()
                        else:
                            recv.cancel()
                self.metrics.received_bytes.inc(link.bytes_in - seen_in)
                seen_in = link.bytes_in
                if isinstance(msg, m.PageBatch):
                    if msg.region not in npages:
                        raise ProtocolError(f"batch for unknown region {msg.region!r}")
                    if not store.epoch < msg.epoch <= store.epoch + MAX_EPOCH_STEP:
                        raise ProtocolError(f"batch for epoch {msg.epoch}, the shadow is at "
                                            f"{store.epoch}")
                    applying = asyncio.ensure_future(
                        asyncio.to_thread(self._apply, msg, npages[msg.region]))
                    self.stream_kind = "scan"
                else:
                    await self._on_message(link, store, msg)
        finally:
            if applying is not None:
                # It writes into the store: let it end before anyone closes the store.
                await finish(applying)

    async def _on_message(self, link: Link, store: Any, msg: Any) -> None:
        """Every message of a session but page batches."""
        if isinstance(msg, m.EpochEnd):
            if not store.epoch < msg.epoch <= store.epoch + MAX_EPOCH_STEP:
                raise ProtocolError(f"epoch {msg.epoch} cannot end now (the shadow is at "
                                    f"{store.epoch})")
            await asyncio.to_thread(store.commit_epoch, msg.epoch)
            self.metrics.acked_epoch.set(msg.epoch)
            await link.send(m.Ack(msg.epoch))
        elif isinstance(msg, m.DiskBatch):
            await self.disks.apply(msg)
        elif isinstance(msg, m.DiskRoundEnd):
            await self.disks.end_round(msg.generation)
            await link.send(m.DiskAck(msg.generation))
        elif isinstance(msg, m.DiskOpen):
            try:
                await self.disks.open(msg.disks, self._source_disk_paths())
            except LayoutMismatch as exc:
                await _reject(link, str(exc))
                raise
            await self.disks.send_manifests(link)
        elif isinstance(msg, m.Ping):
            await link.send(m.Pong(msg.nonce))
        elif isinstance(msg, m.VerifyRequest):
            await link.send(m.VerifyReply(msg.nonce, store.epoch, store.digests()))
        elif isinstance(msg, m.ErrorMessage):
            raise PeerError(f"source reported: {msg.message}")
        elif self.precopy_handler is not None and isinstance(
                msg, (m.PrecopyStart, m.PrecopyData, m.SwitchRelease)):
            await self.precopy_handler(msg, link)
        elif self.switch_handler is not None and isinstance(msg, _SWITCH_MESSAGES):
            await self.switch_handler(msg, link)
        else:
            raise ProtocolError(f"unexpected {type(msg).__name__} from the source")

    def _source_disk_paths(self) -> tuple[str, ...]:
        from .vmcheck import parse_description
        try:
            reported = parse_description(self.vm_description).get("disks") or ()
        except ReplicatorError:
            return ()
        return tuple(d.path for d in reported)

    def _apply(self, batch: m.PageBatch, npages: int) -> int:
        decoded = decode_batch(batch, npages)      # verifies every page before any write
        assert self.store is not None
        return self.store.write_batch(batch.region, batch.epoch, decoded)


_SWITCH_MESSAGES = (m.SwitchPrepare, m.SwitchVerify, m.SwitchDisks, m.DeviceState,
                    m.SwitchCommit, m.SwitchAbort, m.SwitchResult, m.SwitchReady)


def _abort(writer: asyncio.StreamWriter | None, conn: socket.socket) -> None:
    with contextlib.suppress(Exception):
        if writer is not None and writer.transport is not None:
            writer.transport.abort()
            return
        conn.close()


async def _reject(link: Link, reason: str) -> None:
    log.warning("refusing %s: %s", link.peer, reason)
    with contextlib.suppress(Exception):
        await wait_for(link.send(m.Reject(reason)), 2)
    await link.close()
