"""What a QMP connection reports besides results: its command errors and its events.

* :class:`QmpCommandError`: QEMU answered a command with an error (carries QEMU's message);
* :class:`QmpEvent`: one event, timestamped on arrival (``time.monotonic()``, ``time.time()``
  and QEMU's own wall-clock stamp), so the switch can measure downtime from the source's
  ``STOP`` to the shadow's ``RESUME``;
* :class:`QmpEventLog`: receives every event of one ``qemu.qmp`` client, keeps the latest, and
  wakes whoever waits for one by name (:meth:`QemuProcess.wait_event
  <replicator.vmm.qemu.QemuProcess.wait_event>` is built on it);
* :class:`QuietQMPClient`: the ``qemu.qmp`` client, minus its per-message formatting cost,
  passing file descriptors under uvloop too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from qemu.qmp import EventListener, QMPClient

from replicator.aio import wait_for
from replicator.errors import QemuError

__all__ = ["QmpCommandError", "QmpEvent", "QmpEventLog", "QuietQMPClient"]


class QuietQMPClient(QMPClient):
    """A ``QMPClient`` that formats a message for its debug log only when that log is on.

    qemu.qmp 0.0.6's ``_cb_inbound``/``_cb_outbound`` hooks call ``str(msg)`` (an indented
    ``json.dumps``) for every message before handing it to ``logger.debug``, even with DEBUG
    off: a daemon taking hundreds of events a second spent ~14% of its CPU there
    (bench/RESULTS-cost.md). Passing
    the message itself lets ``logging`` format it only when the record is emitted.
    """

    def _cb_outbound(self, msg: Any) -> Any:
        self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Any) -> Any:
        self.logger.debug("<-- %s", msg)
        return msg

    def send_fd_scm(self, fd: int) -> None:
        """Send ``fd`` to QEMU (SCM_RIGHTS, with one space byte QEMU's JSON parser skips), for
        a following ``getfd``. qemu.qmp reaches for the transport's private ``_sock``, which
        uvloop's transports do not have: send on a duplicate of the socket's descriptor
        instead (the same socket; closing the duplicate leaves it open)."""
        if self._writer is None:
            raise QemuError("QMP is not connected; cannot pass a file descriptor")
        transport = self._writer.transport
        real = transport.get_extra_info("socket")
        if real is None or real.family != socket.AF_UNIX:
            raise QemuError("passing a file descriptor to QEMU needs QMP on a unix socket")
        if transport.get_write_buffer_size():
            # A command still partly unsent: the space byte would land inside its JSON.
            raise QemuError("QMP transport busy; cannot pass a file descriptor now")
        with socket.socket(fileno=os.dup(real.fileno())) as sock:
            sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   struct.pack("@i", fd))])


class QmpCommandError(QemuError):
    """QEMU answered a QMP command with an error.

    ``command`` is the QMP command, ``error_class`` QEMU's error class (e.g. ``GenericError``) and
    ``desc`` QEMU's own message.
    """

    def __init__(self, message: str, *, command: str, error_class: str, desc: str):
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(message)


@dataclasses.dataclass(frozen=True)
class QmpEvent:
    """One QMP event as received, with the times it arrived."""

    seq: int
    """Arrival order on this connection, from 1 (compare with :meth:`QmpEventLog.mark`)."""
    name: str
    data: Mapping[str, Any]
    monotonic: float
    """``time.monotonic()`` when the event reached us."""
    wall: float
    """``time.time()`` when the event reached us."""
    qemu_wall: float | None
    """QEMU's own wall-clock stamp of the event (seconds since the epoch), when present."""


_Waiter = tuple[str, Callable[[QmpEvent], bool] | None, "asyncio.Future[QmpEvent]"]


class QmpEventLog(EventListener):
    """Receives every event from one QMP client; records it instead of queueing it.

    Overriding ``accept`` (documented as overridable) lets us stamp events the moment the client
    dispatches them, without an unbounded queue or a consumer task. The latest ``keep`` events
    are kept, and the latest of each name.
    """

    def __init__(self, client: QMPClient, keep: int = 512):
        super().__init__()
        self._client = client
        self._seq = 0
        self._events: deque[QmpEvent] = deque(maxlen=keep)
        self._last: dict[str, QmpEvent] = {}
        self._waiters: list[_Waiter] = []
        client.register_listener(self)

    def accept(self, event: Any) -> bool:
        self._record(event)
        return False

    def _record(self, msg: Mapping[str, Any]) -> None:
        now_m, now_w = time.monotonic(), time.time()
        self._seq += 1
        stamp = msg.get("timestamp") or {}
        qemu_wall = None
        if isinstance(stamp, Mapping) and "seconds" in stamp:
            qemu_wall = stamp["seconds"] + stamp.get("microseconds", 0) / 1e6
        ev = QmpEvent(seq=self._seq, name=str(msg.get("event")), data=dict(msg.get("data") or {}),
                      monotonic=now_m, wall=now_w, qemu_wall=qemu_wall)
        self._events.append(ev)
        self._last[ev.name] = ev
        # The client's default listener would keep every event forever; we do the keeping.
        self._client.events.clear()
        for waiter in list(self._waiters):
            name, match, fut = waiter
            if fut.done():
                self._waiters.remove(waiter)
            elif name == ev.name and (match is None or match(ev)):
                fut.set_result(ev)
                self._waiters.remove(waiter)

    def mark(self) -> int:
        """A marker for "events from now on" (the ``seq`` of the latest event received)."""
        return self._seq

    @property
    def recent(self) -> tuple[QmpEvent, ...]:
        """The most recent events received, oldest first."""
        return tuple(self._events)

    def last(self, name: str) -> QmpEvent | None:
        """The most recent event called ``name``, if any was received."""
        return self._last.get(name)

    async def wait(
        self,
        name: str,
        *,
        timeout: float,
        after: int | None,
        match: Callable[[QmpEvent], bool] | None,
        owner: str,
        check: Callable[[str], Awaitable[None]],
    ) -> QmpEvent:
        """Wait for the event ``name`` (see :meth:`QemuProcess.wait_event
        <replicator.vmm.qemu.QemuProcess.wait_event>`).

        ``owner`` names the QEMU in the timeout message; ``check(doing)`` runs every 250 ms while
        nothing came and raises when QEMU exited.
        """
        if after is not None:
            for ev in self._events:
                if ev.seq > after and ev.name == name and (match is None or match(ev)):
                    return ev
        fut: asyncio.Future[QmpEvent] = asyncio.get_running_loop().create_future()
        entry = (name, match, fut)
        self._waiters.append(entry)
        try:
            deadline = time.monotonic() + timeout
            while True:
                step = min(0.25, deadline - time.monotonic())
                if step <= 0:
                    raise QemuError(f"QEMU {owner}: no {name} event within {timeout:g}s")
                try:
                    return await wait_for(asyncio.shield(fut), step)
                except asyncio.TimeoutError:
                    pass
                await check(f"waiting for {name}")
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
            if not fut.done():
                fut.cancel()

    def cancel_waiters(self) -> None:
        """The connection is going away: nobody waits any longer."""
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
