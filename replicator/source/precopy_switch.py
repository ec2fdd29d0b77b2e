"""The switch for the precopy relay: QEMU sends the last delta and the device state itself.

Live: the sink releases the withheld SWITCHOVER_ACK; QEMU stops the guest once its remaining
dirty pages fit and sends them plus the device state. Stop: we stop the guest and QEMU
completes at once. Either way the shadow loads the stream, the manifests (kept current on both
sides as the stream passed) are compared by digest, and the commit follows as for any switch
(:class:`~replicator.source.switch.Switcher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from ..config import PAGE_SIZE
from ..errors import PeerError, QemuError, SwitchError
from ..faults import checkpoint
from ..pagefile import digest_hashes
from ..vmm.qmp_events import QmpEvent
from ..vmm.spec import RAM_BACKEND_ID
from ..wire import messages as m
from .converge import Deadlines

if TYPE_CHECKING:
    from .precopy import PrecopyStream
    from .switch import Switcher, SwitchProgress, SwitchReport

log = logging.getLogger(__name__)


async def hand_over(stream: PrecopyStream, sw: Switcher, report: SwitchReport,
                    progress: SwitchProgress) -> None:
    """Release (live) or pause (stop), then wait until the shadow loaded the whole stream and
    the source QEMU completed; verify the manifests by digest."""
    rep = stream.rep
    proc = sw.driver.proc
    live = report.mode == "live"
    if live:
        dl = sw.deadlines_for(report)
        # Once the ACK is out QEMU pauses the guest as soon as what is left fits its
        # downtime-limit: never longer than our target (stop mode pauses at once).
        await stream.throttle.set_downtime_limit(sw.target_downtime)
    await sw.catch_up_disks(report)
    mark = proc.event_mark()
    stream.begin_switch()                         # drain QEMU's socket continuously
    await checkpoint("source-before-pause")
    report.phase = "final-delta"
    if live:
        await sw.step(report, m.SwitchRelease(report.switch_id), None)
    else:
        report.path = "stopped"
        await sw.pause_guest(progress)
    progress.paused = True                        # live: QEMU pauses it, any moment now
    await checkpoint("source-paused")

    def records() -> int:
        return stream.pages_forwarded + stream.zero_records + stream.pages_dropped

    before = records()
    if live:
        stop = await _converge(stream, sw, report, progress, mark, dl)
        before = records()
        progress.wall_pause = stop.qemu_wall or stop.wall
        progress.t_pause = stop.monotonic
    if rep.disks is not None:
        # QEMU waits in pre-switchover with the guest stopped and its disks still active:
        # the last disk delta goes now, then QEMU may inactivate them and complete.
        await _await_migration_status(sw, "pre-switchover")
        await sw.hand_over_disks(report)
        await proc.execute("migrate-continue", {"state": "pre-switchover"})
        report.phase = "final-delta"
    # The guest is paused: QEMU sends what is left, then the device state.
    remaining = int((await proc.query_migrate()).get("ram", {}).get("remaining") or 0)
    await sw.expect(report, "loaded", within=sw.drain_timeout(remaining))
    # QEMU on the source completes once the shadow's SHUT came back through the relay;
    # only then can a lost link no longer make it resume the guest by itself.
    report.phase = "source-complete"
    deadline = time.monotonic() + sw.step_timeout
    while (info := await proc.query_migrate()).get("status") != "completed":
        if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
            raise SwitchError(f"source QEMU's migration ended {info.get('status')!r}")
        await asyncio.sleep(0.002)
    report.final_delta_pages = records() - before
    report.final_delta_bytes = report.final_delta_pages * PAGE_SIZE
    # "Rounds" here are QEMU's dirty-bitmap syncs while the migration was held open.
    report.catchup_rounds = int(info.get("ram", {}).get("dirty-sync-count") or 0)
    report.device_state_bytes = max(0, stream.stream_bytes - stream.device_state_offset)
    await checkpoint("source-final-delta")
    report.phase = "verify"
    shipped = rep.ledger.regions[RAM_BACKEND_ID].shipped
    await sw.step(report, m.SwitchVerify(report.switch_id, stream.session_no,
                                         (digest_hashes(shipped),)), "verify")
    report.shadow_verified = True
    await checkpoint("source-device-sent")


async def _await_migration_status(sw: Switcher, status: str) -> None:
    proc = sw.driver.proc
    deadline = time.monotonic() + sw.step_timeout
    while (info := await proc.query_migrate()).get("status") != status:
        if info.get("status") in ("failed", "cancelled", "completed", "none"):
            raise SwitchError(f"source QEMU's migration ended {info.get('status')!r} "
                              f"before {status}: {info.get('error-desc', '')}")
        if time.monotonic() > deadline:
            raise SwitchError(f"source QEMU's migration did not reach {status} within "
                              f"{sw.step_timeout:g}s")
        await asyncio.sleep(0.001)


async def _converge(stream: PrecopyStream, sw: Switcher, report: SwitchReport,
                    progress: SwitchProgress, mark: int, dl: Deadlines) -> QmpEvent:
    """Live, after the ACK went out: wait for QEMU to pause the guest by itself; past the
    live deadline throttle the guest, past the stop deadline pause it ourselves (QEMU then
    sends the rest, as in stop mode). Returns the STOP event that began the downtime."""
    proc = sw.driver.proc
    stop = await _await_stop(stream, sw, report, mark, progress.t_request + dl.live)
    if stop is None and await sw.escalate(report, migrating=True):
        report.path = "throttled"
        stop = await _await_stop(stream, sw, report, mark, progress.t_request + dl.stop)
    if stop is None:
        report.path = "stopped"
        log.warning("switch %s: no convergence within %.1f s; pausing the guest to send "
                    "the rest", report.switch_id, time.monotonic() - progress.t_request)
        await sw.driver.pause()
        # The first STOP since the release, ours or QEMU's own (they may cross).
        stop = await proc.wait_event("STOP", timeout=sw.step_timeout, after=mark)
    elif not report.path:
        report.path = "live"
    return stop


async def _await_stop(stream: PrecopyStream, sw: Switcher, report: SwitchReport, mark: int,
                      until: float) -> QmpEvent | None:
    """The guest's STOP since ``mark``, or None once ``until`` (monotonic) passed."""
    proc = sw.driver.proc
    while (left := until - time.monotonic()) > 0:
        with contextlib.suppress(QemuError):      # no STOP yet; the query tells the rest
            return await proc.wait_event("STOP", timeout=min(0.5, left), after=mark)
        info = await proc.query_migrate()
        if info.get("status") in ("failed", "cancelled", "none"):
            raise SwitchError(f"source QEMU's migration ended {info.get('status')!r}: "
                              f"{info.get('error-desc', '')}")
        pct = int(info.get("cpu-throttle-percentage") or 0)
        report.throttle_percent = max(report.throttle_percent, pct)
        await stream.throttle.ramp(pct)
        if not stream.rep.connected.is_set():
            raise PeerError("link to the sink lost")
    return None


async def roll_back(stream: PrecopyStream, sw: Switcher, report: SwitchReport,
                    reason: str) -> None:
    """Cancel the migration and run the guest here again, wherever QEMU left it; the relayed
    stream is spent, so the session ends and the next one starts a new migration."""
    link = stream.rep.link
    stream.switching.clear()
    await sw.abort(report, reason)
    proc = sw.driver.proc
    with contextlib.suppress(QemuError):
        info = await proc.query_migrate()
        if info.get("status") not in ("completed", "failed", "cancelled", "none"):
            await proc.execute("migrate_cancel")   # also ends auto-converge's throttle
    # Wherever QEMU left it (stopped for the switch, postmigrate after completing), the
    # sink never committed: this host runs the domain.
    for _ in range(200):
        state = await proc.status()
        if state == "running":
            break
        if state not in ("finish-migrate",):
            with contextlib.suppress(QemuError):
                await proc.cont(allow_postmigrate=True)
        await asyncio.sleep(0.01)
    log.info("switch %s: domain resumed here", report.switch_id)
    await stream.throttle.undo()
    if link is not None:
        await link.close()
