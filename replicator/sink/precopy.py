"""The sink half of the ``qemu-precopy`` relay: feed the shadow QEMU, withhold its go-ahead.

For each session the sink starts a fresh shadow (``-incoming defer -S``, RAM on the shadow
image), points its incoming migration at a unix socket and writes the relayed stream into it.
It parses the stream as it passes to keep the store's per-page manifest current (so a switch is
verified by comparing digests, not by re-reading RAM), and relays the shadow's return path back
to the source — except SWITCHOVER_ACK, held until the source asks for a live switch.

QEMU writes guest pages into the shadow image itself, so the manifest is only as good as what
QEMU applied: when a session ends without a completed switch the image is re-hashed (outside any
switch's downtime) before the next session is offered a manifest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from pathlib import Path
from typing import Any

import xxhash

from ..errors import DomainError, MalformedFrame, ProtocolError, QemuError
from ..link import Link
from ..vmm.migration_format import DeviceStateBegin, PageKind, PageRecord
from ..vmm.migration_stream import PrecopyParser
from ..vmm.spec import RAM_BACKEND_ID
from ..wire import messages as m
from ..wire.pages import ZERO_HASH, decompress
from .receiver import SinkReceiver
from .switch import SinkSwitch

log = logging.getLogger(__name__)

RP_SWITCHOVER_ACK = 7
_hash = xxhash.xxh3_64_intdigest


class PrecopySink:
    def __init__(self, receiver: SinkReceiver, switch: SinkSwitch):
        self.receiver = receiver
        self.switch = switch
        self.shadow = switch.shadow
        #: QEMU's name for the guest RAM block in the stream (the store calls it "ram0").
        self.ram_block = getattr(self.shadow, "ram_block", RAM_BACKEND_ID)
        self.session = 0
        self.released = False
        self.held: list[bytes] = []
        self._qsock: socket.socket | None = None
        self._parser: PrecopyParser | None = None
        self._tasks: list[asyncio.Task] = []
        self._prev_disconnect = receiver.disconnect_handler
        receiver.precopy_handler = self.handle
        receiver.disconnect_handler = self.on_disconnect

    @property
    def sock_path(self) -> Path:
        return self.receiver.root / "precopy-in.sock"

    async def handle(self, msg: Any, link: Link) -> None:
        if isinstance(msg, m.PrecopyStart):
            self.receiver.stream_kind = "precopy"
            await self._start(msg.session, link)
        elif isinstance(msg, m.PrecopyData):
            if msg.session != self.session or self._qsock is None:
                raise ProtocolError(f"precopy data for session {msg.session}, "
                                    f"expected {self.session}")
            if not 0 <= msg.raw_len <= link.max_frame:
                raise ProtocolError(f"precopy chunk of {msg.raw_len} bytes exceeds the frame "
                                    f"limit {link.max_frame}")
            data = decompress(msg.codec, msg.data, msg.raw_len)
            if len(data) != msg.raw_len:
                raise MalformedFrame("precopy chunk does not decompress to raw_len bytes")
            await self._data(data, link)
        elif isinstance(msg, m.SwitchRelease):
            await self._release(link)

    async def _start(self, session: int, link: Link) -> None:
        store = self.receiver.store
        assert store is not None
        if RAM_BACKEND_ID not in store.regions:
            raise ProtocolError("a precopy relay needs the QEMU region 'ram0'")
        await self._teardown()
        store.begin_external_writes()
        # A shadow whose incoming migration failed cannot take another one: start afresh.
        await self.shadow.abort()
        await self.shadow.prepare(self.receiver.vm_description)
        proc = self.shadow.proc
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        try:
            sock = await proc.open_precopy_incoming(self.sock_path)
        except QemuError as exc:
            raise DomainError(f"the shadow QEMU's incoming migration did not start: {exc}") from None
        self._qsock = sock
        self._parser = PrecopyParser()
        self.session = session
        self.released = False
        self.held.clear()
        self._tasks = [asyncio.create_task(self._return_path(link, session), name="return-path")]
        log.info("precopy session %d: shadow QEMU waiting for the relayed stream", session)
        await link.send(m.PrecopyReady(session))

    async def _data(self, data: bytes, link: Link) -> None:
        assert self._parser is not None and self._qsock is not None
        store = self.receiver.store
        assert store is not None
        hashes = store.regions[RAM_BACKEND_ID].hashes
        for ev in self._parser.feed(data):
            if isinstance(ev, PageRecord):
                if ev.block == self.ram_block:
                    hashes[ev.index] = ZERO_HASH if ev.kind is PageKind.ZERO else _hash(ev.data)
            elif isinstance(ev, DeviceStateBegin):
                self._tasks.append(asyncio.create_task(self._watch_load(link),
                                                       name="watch-load"))
        await asyncio.get_running_loop().sock_sendall(self._qsock, data)

    async def _return_path(self, link: Link, session: int) -> None:
        loop = asyncio.get_running_loop()
        assert self._qsock is not None
        buf = bytearray()
        while True:
            data = await loop.sock_recv(self._qsock, 65536)
            if not data:
                return
            buf += data
            while len(buf) >= 4:
                kind, length = struct.unpack_from(">HH", buf)
                if len(buf) < 4 + length:
                    break
                msg = bytes(buf[:4 + length])
                del buf[:4 + length]
                if kind == RP_SWITCHOVER_ACK and not self.released:
                    self.held.append(msg)        # precopy stays open until "switch now"
                    continue
                await link.send(m.PrecopyReturn(session, msg))

    async def _release(self, link: Link) -> None:
        # Before the device state can come: a Resume someone pressed on the waiting shadow
        # (virt-manager, for a libvirt domain) only set QEMU's "start once loaded"; `stop`
        # clears it, so the loaded shadow stays paused until the commit.
        proc = self.shadow.proc
        if proc is not None:
            await proc.execute("stop")
        self.released = True
        log.info("precopy session %d: releasing the shadow's switchover ack", self.session)
        for msg in self.held:
            await link.send(m.PrecopyReturn(self.session, msg))
        self.held.clear()

    async def _watch_load(self, link: Link) -> None:
        """The stream reached the device state: report once the shadow has loaded it."""
        proc = self.shadow.proc
        try:
            await proc._wait_migration(60, "loading the relayed migration")
            while (state := await proc.status()) == "inmigrate":
                await asyncio.sleep(0.002)
            if state == "running":
                await proc.execute("stop")          # never two running copies
            if state != "paused":
                raise DomainError(f"shadow is {state!r} after loading, expected paused")
            self.switch.loaded = True
            await link.send(m.SwitchResult(self.switch.switch_id, "loaded", True))
        except Exception as exc:  # reported to the source, which rolls back
            log.error("precopy: the shadow failed to load: %s", exc)
            with contextlib.suppress(Exception):
                await link.send(m.SwitchResult(self.switch.switch_id, "loaded", False, str(exc)))

    async def _teardown(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._qsock is not None:
            self._qsock.close()
            self._qsock = None

    async def on_disconnect(self) -> None:
        if self._parser is not None:
            await self._teardown()
            self._parser = None
            if not self.switch.committed:
                await self.shadow.abort()
            store = self.receiver.store
            if store is not None and not store.handed_over:
                # What QEMU applied is the truth; make the manifest say exactly that.
                await asyncio.to_thread(store.end_external_writes)
        if self._prev_disconnect is not None:
            await self._prev_disconnect()
