"""The switch, source side: hand the running domain to the sink, or roll back.

Protocol (the sink's half is ``replicator.sink.switch``)::

    prepare   SwitchPrepare -> SwitchReady        shadow up, disk copies complete
    catch-up  (live mode) sync rounds while running until the final delta is small; one disk
              round
    pause     driver.pause()                       downtime starts
    delta     sync(): last round sent and durable on the sink
    verify    SwitchVerify(digests) -> ok          every page of the shadow equals the source's
    disks     last disk round acked; SwitchDisks(digests) -> ok: every copy equals the disk,
              the sink stops writing the copies
    device    DeviceState* -> ok                   shadow loaded the device state, still paused
    commit    SwitchCommit -> ok                   sink persisted "running here", then cont
    fence     handed_over persisted here           this host never resumes the domain itself

What moves the memory (catch-up to device state) is the tracker's: the domain's
:class:`~replicator.source.stream.Stream` runs it (``hand_over``) with the steps this class
offers, and undoes it on a rollback (``roll_back``).

Any failure before ``SwitchCommit`` is sent resumes the domain here (rollback) and tells the sink
to abort. Once the commit is sent and its answer lost, *this side cannot know* whether the
sink runs the domain, so it stays paused and asks the sink when the link is back (the sink's
``Welcome.handed_over``): the VM runs on exactly one host, never two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..aio import wait_for
from ..errors import HandedOver, PeerError, ReplicatorError, SwitchError, SwitchInProgress
from ..durable import atomic_write
from ..faults import checkpoint
from ..wire import messages as m
from .converge import Deadlines, Throttle, deadlines
from .driver import DomainDriver
from .sender import SourceReplicator

log = logging.getLogger(__name__)


@dataclass
class SwitchReport:
    """Outcome of one switch, as the API, CLI and metrics show it."""
    switch_id: str
    mode: str
    result: str = "running"              # running | ok | rolled_back | unknown
    message: str = ""
    phase: str = "prepare"
    started_at: float = field(default_factory=time.time)
    downtime_ms: float | None = None
    time_to_switch_ms: float | None = None
    catchup_rounds: int = 0
    final_delta_pages: int = 0
    final_delta_bytes: int = 0
    device_state_bytes: int = 0
    shadow_verified: bool = False
    disk_final_delta_bytes: int = 0      # disk blocks sent while paused (zero blocks counted)
    disks_verified: bool = False         # every disk copy's digest matched (no disks: False)
    peer: str = ""
    # How it ended: "live" (converged), "throttled" (converged once QEMU slowed the guest) or
    # "stopped" (paused to send the rest: stop mode, or a live switch past its deadlines).
    path: str = ""
    throttle: str = ""                   # past the live deadline: dirty-limit | auto-converge |
                                         # none (no throttle here: straight to stop)
    throttle_percent: int = 0            # auto-converge: the highest CPU throttle QEMU applied
    live_deadline_s: float | None = None
    stop_deadline_s: float | None = None
    #: Milliseconds spent in each phase, in order (where a switch's time and downtime go).
    phase_ms: dict = field(default_factory=dict)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "phase":
            now, prev = time.monotonic(), self.__dict__.get("phase")
            if prev != value:
                since = self.__dict__.get("_phase_since")
                if prev is not None and since is not None:
                    self.phase_ms[prev] = round(self.phase_ms.get(prev, 0.0)
                                                + (now - since) * 1000, 2)
                object.__setattr__(self, "_phase_since", now)
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SwitchProgress:
    """How far a switch got: decides between rollback and "outcome unknown"."""
    t_request: float
    t_pause: float = 0.0
    wall_pause: float = 0.0
    paused: bool = False
    committed_sent: bool = False


class HandoverState:
    """Persisted fencing flag: once set, this node must never resume the domain."""

    def __init__(self, path: Path, generation: int = 0):
        self.path = path
        #: The placement generation the domain runs at here; a hand-over is the next one.
        self.generation = generation

    def load(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            # Unreadable fencing state: refuse to guess in the dangerous direction.
            raise HandedOver(f"cannot read {self.path} ({exc}); assuming the domain was handed "
                             "over — inspect both hosts, then remove the file") from None

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps({**state, "generation": self.generation + 1}))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class Switcher:
    """Runs switches for one :class:`SourceReplicator`; one at a time.

    ``throttle``: QEMU's guest throttling (QEMU domains only; the qemu-precopy stream arms the
    same one with each held-open migration).
    """

    def __init__(self, rep: SourceReplicator, driver: DomainDriver, state: HandoverState,
                 *, throttle: Throttle | None = None, target_downtime: float = 0.05,
                 step_timeout: float = 60.0):
        self.rep = rep
        self.driver = driver
        self.state = state
        self.throttle = throttle
        self.target_downtime = target_downtime
        self.step_timeout = step_timeout
        self.current: SwitchReport | None = None
        self.last: SwitchReport | None = None
        self._lock = asyncio.Lock()

    @property
    def handed_over(self) -> bool:
        """The commit was (or may have been) sent: this node must never resume on its own."""
        state = self.state.load()
        return state is not None and state.get("state") != "switching"

    @property
    def interrupted(self) -> dict | None:
        """A switch this node started and never got to commit (the daemon died meanwhile)."""
        state = self.state.load()
        return state if state and state.get("state") == "switching" else None

    async def settle_interrupted(self) -> None:
        """After a restart mid-switch, before the commit: the sink cannot have committed (it
        needs our SwitchCommit, sent only after "committing" is persisted), so this host still
        owns the domain. Resume it if the switch had paused it (postmigrate included)."""
        state = self.interrupted
        if state is None:
            return
        report = SwitchReport(state.get("switch_id", "unknown"), state.get("mode", "unknown"),
                              result="rolled_back", peer=state.get("peer", ""),
                              message="the daemon restarted during the switch; rolled back")
        if state.get("was_running", True) and not await self.driver.is_running():
            await self.driver.resume()
            log.warning("switch %s was interrupted by a restart before its commit; the domain "
                        "runs here again", report.switch_id)
        else:
            log.warning("switch %s was interrupted by a restart before its commit; the domain "
                        "stays here", report.switch_id)
        self.state.clear()
        self.last = report
        self.rep.metrics.switches.labels(report.mode, "rolled_back").inc()

    async def switch(self, mode: str = "live") -> SwitchReport:
        if mode not in ("live", "stop"):
            raise SwitchError(f"unknown switch mode {mode!r}", rolled_back=False)
        if self._lock.locked():
            raise SwitchInProgress()
        async with self._lock:
            if self.handed_over:
                raise HandedOver("this node already handed the domain over; it runs on the peer")
            if not await self.driver.is_running():
                # Paused by its user (virt-manager) or stopped by itself: a rollback must not
                # resume what replicator did not pause, and QEMU has no held-open migration of
                # a stopped VM. Resume it, then switch.
                raise SwitchError("the domain is paused here, not by replicator; resume it, "
                                  "then switch", rolled_back=False)
            report = SwitchReport(uuid.uuid4().hex[:12], mode, peer=self.rep.sink_node)
            self.current = report
            mt = self.rep.metrics
            try:
                await self._run(report)
            except SwitchError as exc:
                report.result = "rolled_back" if exc.rolled_back else "unknown"
                report.message = str(exc)
                mt.switches.labels(mode, report.result).inc()
                raise
            finally:
                self.last = report
                self.current = None
                if report.throttle:
                    mt.switch_throttles.labels(report.throttle).inc()
            mt.switches.labels(mode, "ok").inc()
            mt.switch_paths.labels(mode, report.path).inc()
            if report.downtime_ms is not None:
                mt.switch_downtime.labels(mode).observe(report.downtime_ms / 1000)
                mt.last_switch_downtime.set(report.downtime_ms / 1000)
            if report.time_to_switch_ms is not None:
                mt.switch_duration.labels(mode).observe(report.time_to_switch_ms / 1000)
            mt.handed_over.set(1)
            return report

    # --- the steps a tracker's hand-over uses ----------------------------------------------------

    async def step(self, report: SwitchReport, msg: object,
                   answer: str | None) -> m.SwitchResult | None:
        """Send one step's message and wait for the sink's verdict on step ``answer``; None:
        the answer comes in a later step (the precopy release)."""
        if answer is None:
            await self._step_nowait(msg)
            return None
        link = self.rep.link
        if link is None:
            raise PeerError(f"link to the sink lost before {answer}")
        await link.send(msg)
        return await self._expect(report, answer)

    async def expect(self, report: SwitchReport, step: str,
                     within: float | None = None) -> m.SwitchResult:
        """The sink's verdict on ``step``, waiting one step, or up to ``within`` seconds (in
        whole steps)."""
        end = time.monotonic() + (within or 0)
        while True:
            try:
                return await self._expect(report, step)
            except asyncio.TimeoutError:
                if time.monotonic() >= end:
                    raise

    async def _step_nowait(self, msg: object) -> None:
        link = self.rep.link
        if link is None:
            raise PeerError("link to the sink lost")
        await link.send(msg)

    async def _expect(self, report: SwitchReport, step: str) -> m.SwitchResult:
        while True:
            reply = await self.rep.next_response((m.SwitchResult, m.SwitchReady),
                                                 self.step_timeout)
            if reply.switch_id == report.switch_id:
                break
            log.debug("ignoring a late answer for switch %s", reply.switch_id)
        if isinstance(reply, m.SwitchReady):
            return m.SwitchResult(reply.switch_id, step, True)
        if reply.step != step:
            raise SwitchError(f"sink answered {reply.step!r} for switch {reply.switch_id}, "
                              f"expected {step!r} for {report.switch_id}")
        if not reply.ok:
            raise SwitchError(f"sink refused at {step}: {reply.message}")
        return reply

    async def _run(self, report: SwitchReport) -> None:
        rep = self.rep
        ctx = SwitchProgress(t_request=time.monotonic())
        log.info("switch %s (%s mode) to %s: preparing", report.switch_id, report.mode,
                 rep.sink_node)
        try:
            if not rep.connected.is_set():
                raise SwitchError(f"sink not connected ({rep.last_error or 'connecting'})")
            report.phase = "prepare"
            rep.drop_responses()
            # Persisted before anything can pause the domain: a daemon killed from here until
            # the commit knows, when it restarts, that it must resume the domain itself.
            self.state.save({"switch_id": report.switch_id, "peer": rep.sink_node,
                             "mode": report.mode, "state": "switching", "at": time.time(),
                             "was_running": await self.driver.is_running()})
            if rep.disks is not None and (why := rep.disks.ready()):
                raise SwitchError(f"not ready: {why}")
            await self.step(report, m.SwitchPrepare(report.switch_id, report.mode), "prepare")
            await rep.stream.hand_over(self, report, ctx)
            await self._commit(report, ctx)
            if self.throttle is not None:
                # The guest is paused for good; leave its QEMU as it was. Past the commit no
                # error may reach the rollback below.
                with contextlib.suppress(Exception):
                    await self.throttle.undo()
        except (ReplicatorError, asyncio.TimeoutError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            if ctx.committed_sent:
                # The commit may have reached the sink: resuming here could run the VM twice.
                log.error("switch %s: lost the sink's answer to commit (%s); the domain stays "
                          "paused here until the sink says whether it runs it", report.switch_id,
                          reason)
                asyncio.get_running_loop().create_task(self._resolve_after_reconnect(report))
                raise SwitchError(f"commit outcome unknown ({reason}); domain paused here "
                                  "until the sink is reachable", rolled_back=False) from None
            await rep.stream.roll_back(self, report, ctx.paused, reason)
            if rep.disks is not None:
                rep.disks.release()
            if self.interrupted:
                self.state.clear()
            raise SwitchError(f"switch failed at {report.phase}: {reason}; the domain runs "
                              "here again", rolled_back=True) from None
        finally:
            rep.stream.switch_ended()

    async def catch_up_disks(self, report: SwitchReport) -> None:
        """Before the pause: disk rounds back to back, so that the paused one carries only
        the writes since the last (live mode: one acknowledged round first, while the guest
        runs, so that a backlog is not paid for in the downtime)."""
        disks = self.rep.disks
        if disks is None:
            return
        disks.hurry()
        if report.mode == "live":
            link = self.rep.link
            if link is None:
                raise PeerError("link to the sink lost before the disk catch-up")
            report.phase = "disk-catch-up"
            await disks.sync(link, self.drain_timeout(disks.lag_bytes))

    async def hand_over_disks(self, report: SwitchReport) -> None:
        """Guest paused (its writes drained): the last disk round, acknowledged; our exports
        removed (QEMU must not inactivate an exported disk); then the sink compares each copy's
        digest with ours and stops writing its copies, so the shadow can open them."""
        disks = self.rep.disks
        if disks is None:
            return
        report.phase = "disk-delta"
        link = self.rep.link
        if link is None:
            raise PeerError("link to the sink lost before the last disk round")
        disks.hold()
        report.disk_final_delta_bytes = await disks.sync(
            link, self.drain_timeout(disks.lag_bytes), paused=True)
        await checkpoint("source-disk-delta")
        await disks.quiesce()
        report.phase = "disk-verify"
        await self.step(report, m.SwitchDisks(report.switch_id, disks.digests()), "disks")
        report.disks_verified = True

    async def pause_guest(self, progress: SwitchProgress) -> None:
        """Pause the guest: the downtime starts now."""
        progress.t_pause = time.monotonic()
        progress.wall_pause = time.time()
        await self.driver.pause()
        progress.paused = True

    def deadlines_for(self, report: SwitchReport) -> Deadlines:
        """This live switch's deadlines, from the estimate when it was requested."""
        dl = deadlines(self.rep.cfg.switch, self.rep.lag_snapshot().switch_estimate)
        report.live_deadline_s, report.stop_deadline_s = dl.live, dl.stop
        return dl

    def link_rate(self) -> float:
        """Bytes/s the link carries now: the best seen, or the configured cap if lower."""
        rate = self.rep.ledger.link_rate or 100e6
        cap = self.rep.limiter.rate
        return min(rate, cap) if cap else rate

    def drain_timeout(self, remaining: int) -> float:
        """Longest wait for a paused guest's last pages: one step plus twice their link time."""
        return self.step_timeout + 2 * remaining / self.link_rate()

    async def escalate(self, report: SwitchReport, migrating: bool) -> bool:
        """Past the live deadline: QEMU throttles the guest, if it can here."""
        used = "none"
        if self.throttle is not None:
            used = await self.throttle.engage(self.link_rate(), migrating)
        report.throttle = used
        log.warning("switch %s: not converged by its live deadline (%.1f s); %s",
                    report.switch_id, report.live_deadline_s or 0,
                    f"throttling the guest ({used})" if used != "none" else
                    "no throttle here, stop mode")
        return used != "none"

    async def _commit(self, report: SwitchReport, ctx: SwitchProgress) -> None:
        """Point of no return: from here on this side never resumes on its own."""
        rep = self.rep
        report.phase = "commit"
        self.state.save({"switch_id": report.switch_id, "peer": rep.sink_node,
                         "state": "committing", "at": time.time()})
        ctx.committed_sent = True
        await checkpoint("source-committing")
        reply = await self.step(report, m.SwitchCommit(report.switch_id), "commit")
        await checkpoint("source-committed")
        t_running = time.monotonic()
        self.state.save({"switch_id": report.switch_id, "peer": rep.sink_node,
                         "state": "handed-over", "at": time.time()})
        report.phase = "done"
        report.result = "ok"
        sink_downtime = (reply.resumed_at - ctx.wall_pause) if reply.resumed_at else None
        # Same clock (one machine, or NTP): the sink's timestamp is the honest end point.
        # Otherwise fall back to our own view, which includes half a round trip.
        if sink_downtime is not None and 0 <= sink_downtime <= (t_running - ctx.t_pause):
            report.downtime_ms = sink_downtime * 1000
        else:
            report.downtime_ms = (t_running - ctx.t_pause) * 1000
        report.time_to_switch_ms = (t_running - ctx.t_request) * 1000
        log.info("switch %s done: domain runs on %s; downtime %.1f ms, time to switch "
                 "%.1f ms, final delta %d pages", report.switch_id, rep.sink_node,
                 report.downtime_ms, report.time_to_switch_ms, report.final_delta_pages)

    async def abort(self, report: SwitchReport, reason: str) -> None:
        """A rollback's first step: tell the sink (best effort: the link may be gone)."""
        log.warning("switch %s failed at %s: %s; rolling back", report.switch_id, report.phase,
                    reason)
        link = self.rep.link
        if link is not None:
            with contextlib.suppress(Exception):
                await wait_for(link.send(m.SwitchAbort(report.switch_id, reason)), 2)

    @property
    def pending_commit(self) -> dict | None:
        """The persisted state of a switch whose commit outcome is not known yet."""
        state = self.state.load()
        return state if state and state.get("state") == "committing" else None

    async def resolve_pending(self) -> None:
        """After a restart during an ambiguous commit: ask the sink, then settle."""
        state = self.pending_commit or {}
        report = SwitchReport(state.get("switch_id", "unknown"), "unknown", result="unknown",
                              peer=state.get("peer", ""))
        self.last = report
        log.warning("switch %s: commit outcome unknown since before a restart; the domain "
                    "stays paused here until the sink says who runs it", report.switch_id)
        await self._resolve_after_reconnect(report, seen=0)
        if report.result == "ok":
            self.rep.metrics.handed_over.set(1)

    async def _resolve_after_reconnect(self, report: SwitchReport,
                                       seen: int | None = None) -> None:
        """After an ambiguous commit: wait for the sink to tell us who runs the domain."""
        rep = self.rep
        seen = rep.sessions if seen is None else seen
        rep.urgent = True                     # the domain is paused: no back-off
        try:
            await self._await_verdict(report, seen)
        finally:
            rep.urgent = False

    async def _await_verdict(self, report: SwitchReport, seen: int) -> None:
        rep = self.rep
        while True:
            await asyncio.sleep(0.05)
            if rep.sessions == seen:
                continue
            if rep.sink_handed_over:
                self.state.save({"switch_id": report.switch_id, "peer": rep.sink_node,
                                 "state": "handed-over", "at": time.time()})
                report.result = "ok"
                log.info("switch %s: sink confirms it runs the domain", report.switch_id)
            else:
                self.state.clear()
                await self.driver.resume()
                if rep.disks is not None:
                    rep.disks.release()           # the disks replicate again
                report.result = "rolled_back"
                log.warning("switch %s: sink never committed; domain resumed here",
                            report.switch_id)
            return

