"""The one interface a dirty tracker implements: what it does on a session and in a switch.

:class:`~replicator.source.sender.SourceReplicator` owns the connection (handshake, manifests,
disks, receiver, pings, reconnects) and :class:`~replicator.source.switch.Switcher` owns the
switch protocol (prepare, commit, fencing, an unknown outcome); both drive the domain's
:class:`Stream` for the part that depends on how dirty pages are found:

* ``scan`` (:class:`~replicator.source.scan.ScanStream`): rounds of the
  :class:`~replicator.source.tracker.ScanTracker` sent as page batches, acknowledged by epoch;
  a switch catches up, pauses the guest, sends the last round and saves the device state.
* ``qemu-precopy`` (:class:`~replicator.source.precopy.PrecopyStream`): QEMU's own migration,
  held open and relayed to the shadow; a switch releases it and QEMU sends the last delta and
  the device state itself.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

from ..link import Link
from .ledger import LagSnapshot

if TYPE_CHECKING:
    from .switch import Switcher, SwitchProgress, SwitchReport


class Stream(Protocol):
    """One tracker's half of replication, composed into the replicator and the switcher."""

    #: The tracker's name, as ``domain.tracker`` in the config spells it.
    kind: str

    # --- a session (SourceReplicator) ----------------------------------------------------------

    async def start(self, link: Link) -> list[asyncio.Task]:
        """The link is up (manifests and disks exchanged, the receiver running): start
        streaming. Returns the tasks started; they end with the session."""

    async def stop(self) -> None:
        """The session is ending (the link may be gone, the tasks still run): undo what
        :meth:`start` did, even a part of it."""

    async def session_ended(self) -> None:
        """The session's tasks ended and the link is marked down: drop what was queued for it
        (the next session re-derives it from the sink's manifest); wake whoever waits on it."""

    async def on_message(self, msg: Any) -> bool:
        """A message from the sink this tracker handles; True when handled."""

    def lag_snapshot(self) -> LagSnapshot:
        """How far behind the shadow is, and whether it is in sync."""

    def publish(self) -> None:
        """Refresh the tracker's own gauges (the replicator publishes the lag)."""

    # --- a switch (Switcher) -------------------------------------------------------------------

    async def hand_over(self, sw: Switcher, report: SwitchReport,
                        progress: SwitchProgress) -> None:
        """After the sink is prepared: bring the shadow to the paused guest's exact RAM and
        device state (final delta, verified digests, disks, device state loaded)."""

    async def roll_back(self, sw: Switcher, report: SwitchReport, paused: bool,
                        reason: str) -> None:
        """A switch failed before its commit was sent: tell the sink, and run the domain
        here again as it ran before."""

    def switch_ended(self) -> None:
        """Any switch ended (committed, rolled back or outcome unknown)."""

    async def close(self) -> None:
        """Release what the stream holds open (files, mappings)."""
