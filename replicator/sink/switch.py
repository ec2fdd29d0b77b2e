"""The switch, sink side: verify the shadow, load the device state, run it on commit.

The sink never runs the shadow before ``SwitchCommit``, and never before it verified that every
page of the shadow equals the source's (a stale page makes QEMU report success and the guest
kernel panic later). It persists "the domain runs here" *before* it resumes the shadow, so a
restarted sink — and a reconnecting source — know the outcome. A link lost before the commit
aborts the switch here: the source resumes its VM.
"""

from __future__ import annotations

import abc
import logging
import time
from typing import Any

from ..errors import ReplicatorError
from ..faults import checkpoint
from ..link import Link
from ..wire import messages as m
from ..wire.blocks import switch_generation
from .receiver import SinkReceiver

log = logging.getLogger(__name__)

MAX_DEVICE_STATE = 256 * 1024 * 1024


class Shadow(abc.ABC):
    """The paused copy of the domain on this host."""

    @abc.abstractmethod
    async def prepare(self, vm_description: bytes) -> None:
        """Make sure the shadow can take over (started paused, disks reachable)."""

    @abc.abstractmethod
    async def load_device_state(self, data: bytes) -> None:
        """Load the domain's device state; the shadow stays paused."""

    @abc.abstractmethod
    async def run(self) -> float:
        """Resume the shadow; returns the wall-clock time it started running."""

    async def track_disks(self, generation: int) -> None:
        """Record the disks' writes from before the shadow resumes (by default: no disks)."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Back to a clean waiting state after a failed switch (shadow stays paused)."""

    def status(self) -> dict:
        return {}

    async def close(self) -> None:
        pass


class NullShadow(Shadow):
    """For file domains: there is no VMM here; 'running' is a recorded fact."""

    def __init__(self) -> None:
        self.running = False
        self.device_state = b""

    async def prepare(self, vm_description: bytes) -> None:
        pass

    async def load_device_state(self, data: bytes) -> None:
        self.device_state = data

    async def run(self) -> float:
        self.running = True
        return time.time()

    async def abort(self) -> None:
        self.device_state = b""

    def status(self) -> dict:
        return {"kind": "file", "running": self.running}


_STEPS = {m.SwitchPrepare: "prepare", m.SwitchVerify: "verify", m.DeviceState: "device",
          m.SwitchCommit: "commit", m.SwitchDisks: "disks"}


class SinkSwitch:
    """Handles the switch messages of the receiver's session."""

    def __init__(self, receiver: SinkReceiver, shadow: Shadow):
        self.receiver = receiver
        self.shadow = shadow
        self.switch_id = ""
        self.verified = False
        self.disks_verified = False
        self.loaded = False
        self.committed = False
        self.last_result: dict[str, Any] | None = None
        self.aborts = 0                          # switches abandoned before a commit
        self._chunks: list[bytes] = []
        self._size = 0
        receiver.switch_handler = self.handle
        receiver.disconnect_handler = self.on_disconnect

    def _reset(self) -> None:
        self.switch_id = ""
        self.verified = self.loaded = self.disks_verified = False
        self._chunks.clear()
        self._size = 0

    async def _answer(self, link: Link, step: str, ok: bool, message: str = "",
                      resumed_at: float = 0.0) -> None:
        if not ok:
            log.warning("switch %s: refusing %s: %s", self.switch_id, step, message)
        await link.send(m.SwitchResult(self.switch_id, step, ok, message, resumed_at))

    async def handle(self, msg: Any, link: Link) -> None:
        store = self.receiver.store
        assert store is not None
        try:
            if isinstance(msg, m.SwitchPrepare):
                self._reset()
                self.switch_id = msg.switch_id
                if store.handed_over:
                    await self._answer(link, "prepare", False, "the domain already runs here")
                    return
                log.info("switch %s (%s): preparing the shadow", msg.switch_id, msg.mode)
                await self.shadow.prepare(self.receiver.vm_description)
                await link.send(m.SwitchReady(msg.switch_id))
            elif msg.switch_id != self.switch_id:
                await link.send(m.SwitchResult(msg.switch_id, "unknown", False,
                                               "no such switch in progress"))
            elif isinstance(msg, m.SwitchVerify):
                ours = store.digests()
                if tuple(msg.digests) != ours:
                    bad = [r for r, a, b in zip(store.regions, msg.digests, ours) if a != b]
                    await self._answer(link, "verify", False,
                                       f"shadow differs from the source in {', '.join(bad)}")
                    return
                self.verified = True
                await self._answer(link, "verify", True)
            elif isinstance(msg, m.SwitchDisks):
                # Every copy equals the source's disk; its writer stops so the shadow (which
                # activates the copies when it loads the device state) is their only user.
                await self.receiver.disks.verify_and_release(msg.digests)
                self.disks_verified = True
                await checkpoint("sink-disks-released")
                await self._answer(link, "disks", True)
            elif isinstance(msg, m.DeviceState):
                if not self.verified:
                    await self._answer(link, "device", False, "shadow not verified")
                    return
                self._size += len(msg.data)
                if self._size > MAX_DEVICE_STATE:
                    await self._answer(link, "device", False, "device state too large")
                    return
                self._chunks.append(msg.data)
                if msg.last:
                    data = b"".join(self._chunks)
                    self._chunks.clear()
                    await self.shadow.load_device_state(data)
                    self.loaded = True
                    await self._answer(link, "device", True)
            elif isinstance(msg, m.SwitchCommit):
                if not (self.verified and self.loaded):
                    await self._answer(link, "commit", False,
                                       "shadow not verified or device state not loaded")
                    return
                if self.receiver.disks.opened and not self.disks_verified:
                    await self._answer(link, "commit", False, "disk copies not verified")
                    return
                # Persist first: from here on this host owns the domain, even across restarts.
                store.set_handed_over(True, generation=self.receiver.peer_generation + 1)
                self.committed = True
                await checkpoint("sink-commit-persisted")
                if self.receiver.disks.opened:
                    # The way back: the disks' writes are recorded from before the guest runs.
                    await self.shadow.track_disks(switch_generation(self.switch_id))
                resumed_at = await self.shadow.run()
                self.receiver.metrics.handed_over.set(1)
                self.last_result = {"switch_id": self.switch_id, "result": "ok",
                                    "resumed_at": resumed_at}
                log.info("switch %s committed: the domain runs here", self.switch_id)
                await checkpoint("sink-committed")
                await self._answer(link, "commit", True, resumed_at=resumed_at)
            elif isinstance(msg, m.SwitchAbort):
                log.warning("switch %s aborted by the source: %s", msg.switch_id, msg.reason)
                await self._abandon()
        except ReplicatorError as exc:
            # Answer in the step's own name: the source matches answers by step.
            step = _STEPS.get(type(msg), type(msg).__name__)
            if not self.committed:
                await self.shadow.abort()
                await self.receiver.disks.resume()
            await self._answer(link, step, False, str(exc))

    async def _abandon(self) -> None:
        """A switch that will not commit: the shadow waits again, the copies are written
        again (they are shadows, never used by a VM that ran)."""
        await self.shadow.abort()
        await self.receiver.disks.resume()
        self._reset()
        self.aborts += 1

    async def on_disconnect(self) -> None:
        if self.switch_id and not self.committed:
            log.warning("switch %s: source lost before commit; shadow stays paused",
                        self.switch_id)
            await self._abandon()
