"""A node: both halves, and the domain's placement deciding which one works.

Every host runs the same node. Where the domain runs (:mod:`replicator.placement`, read from
the halves' own fences, never from the config) decides the direction: the host that runs it
streams to the other (its source half), the other keeps the shadow (its sink half, listening
all the time, so that it also answers "the domain runs here" to a peer that asks). After a
switch both nodes turn around by themselves: the old host ends its paused VM and keeps its RAM
file and disks as the new shadow, re-hashed, so the new host sends only what differs.

A split brain (both hosts ran the domain since they last agreed, e.g. one was started by hand
while the other was off) is refused and reported, never merged; ``replicator discard-here``
on the host whose copy is to go makes it the shadow again (:meth:`PeerNode.discard_here`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from .config import Config
from .errors import DomainError, HandedOver, ReplicatorError, SwitchError
from .faults import checkpoint
from .metrics import Metrics
from .node import SinkNode, SourceNode, _log_crash
from .placement import HANDOVER_FILE, Placement, read_placement

log = logging.getLogger(__name__)

RECONCILE_INTERVAL = 0.2


class PeerNode:
    """One host's node: a source half while the domain runs here, a sink half otherwise."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = Metrics(cfg.node.role, cfg.domain.name)
        self.root = Path(cfg.node.state_dir) / cfg.domain.name
        self.home = cfg.node.role == "source"
        # A one-way config (from before the round trip) lacks one of the two addresses.
        self.can_send = bool(cfg.peer.address)
        self.can_receive = bool(cfg.peer.listen)
        self.placement = Placement(self.home, 0)
        self.source: SourceNode | None = None
        self.sink: SinkNode | None = None
        self.split_brain: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._warned = False
        self._domain_absent: str | None = None   # why the libvirt domain is not replicated
        self._next_try = 0.0
        self._turning = False       # handing the domain over: no stream in until the shadow is

    @property
    def role(self) -> str:
        return "source" if self.source is not None else "sink"

    @property
    def address(self) -> tuple[str, int] | None:
        return self.sink.address if self.sink is not None else None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.placement = read_placement(self.root, home=self.home)
        log.info("domain %s %s", self.cfg.domain.name, self.placement.describe())
        if not self.placement.here:
            await self._forget_stale_shadow(self.placement)
        if self.can_receive:
            self.sink = SinkNode(self.cfg, metrics=self.metrics)
            self.sink.domain_here = lambda: self.placement.here or self._turning
            self.sink.settle = self._settled
            # While turning around it still answers "runs here", at the generation it ran
            # at: the peer (one generation on) sees a hand-over in progress, not a split brain.
            self.sink.placement = lambda: (self.placement.generation - int(self._turning),
                                           self.placement.running_since, self.placement.forced)
            unknown = self.placement.decided_by == "unknown"
            await self.sink.start(domain_here=None if unknown else self.placement.here)
        elif not self.placement.here:
            log.warning("the domain runs on the peer and peer.listen is not set: this host "
                        "keeps no shadow and cannot take the domain back (set peer.listen)")
        if self.placement.here:
            try:
                await self._become_source()
            except DomainError as exc:
                if self.cfg.domain.driver != "libvirt":
                    raise
                # The user's VM is shut off (the service started first, say): wait for it.
                self._waiting_for_domain(exc)
        self._task = asyncio.create_task(self._reconcile(), name="placement")
        self._task.add_done_callback(_log_crash)

    async def stop(self, leave_domain_running: bool = False) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        async with self._lock:
            if self.source is not None:
                await self.source.stop(leave_domain_running=leave_domain_running)
            if self.sink is not None:
                await self.sink.stop(leave_domain_running=leave_domain_running)

    # --- turning around --------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Follow the placement the halves' fences record: a switch from here ends in the
        sink half, a commit here in the source half."""
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL)
            try:
                placement = read_placement(self.root, home=self.home)
            except ReplicatorError as exc:
                log.error("cannot read where the domain runs: %s", exc)
                continue
            if placement.decided_by == "unknown":
                if placement.error != self.placement.error:
                    log.error("where the domain runs is unknown (%s): changing nothing",
                              placement.error)
                    self.placement = placement if self.source is None else self.placement
                continue
            try:
                await self._follow(placement)
            except ReplicatorError as exc:
                # One failed step must not end the following: the next tick tries again.
                log.error("following where the domain runs: %s", exc)

    async def _follow(self, placement: Placement) -> None:
        """One tick: turn around if the placement changed, else follow the domain itself."""
        async with self._lock:
            changed = placement.here != self.placement.here
            if changed and placement.here:
                log.info("domain %s now %s: replicating it to the peer",
                         self.cfg.domain.name, placement.describe())
                self.placement = placement          # no stream into it from here on
                await self._become_source()
            elif changed:
                log.info("domain %s now %s: keeping its shadow here",
                         self.cfg.domain.name, placement.describe())
                await self._turn_to_sink(placement)
            self.placement = placement
            if not changed and placement.here:
                await self._follow_domain()
            self._check_split_brain()

    def _waiting_for_domain(self, exc: Exception) -> None:
        if self._domain_absent is None:
            log.warning("%s; replicating once it runs again", exc)
        self._domain_absent = str(exc)

    async def _follow_domain(self) -> None:
        """A libvirt domain comes and goes with the user (virt-manager's shut down, force off,
        run): a source half whose domain stopped lets go of it (a new run is a new QEMU with a
        new RAM file), and one starts again once the domain runs. Never a switch."""
        if self.cfg.domain.driver != "libvirt" or self.split_brain is not None:
            return
        src = self.source
        if src is not None:
            proc = getattr(src.driver, "proc", None)
            switching = src.switcher is not None and src.switcher.current is not None
            if proc is None or proc.returncode is None or switching:
                return
            log.warning("libvirt domain %s stopped (shut down or destroyed by its user); "
                        "replication pauses until it runs again", self.cfg.domain.libvirt_name)
            self.source = None
            with contextlib.suppress(Exception):
                await src.stop(leave_domain_running=True)
            self._domain_absent = "stopped"
            self._next_try = time.monotonic() + 1.0
            return
        if time.monotonic() < self._next_try:
            return
        self._next_try = time.monotonic() + 2.0
        try:
            await self._become_source()
        except ReplicatorError as exc:
            # Shut off (also after a switch committed it here), or not usable yet.
            self._waiting_for_domain(exc)
            return
        if self._domain_absent is not None:
            log.info("libvirt domain %s runs again: replicating it", self.cfg.domain.libvirt_name)
        self._domain_absent = None

    async def _settled(self) -> None:
        """Until the node finished turning around (bounded: a peer waits for the answer)."""
        for _ in range(200):
            if not self._turning:
                return
            await asyncio.sleep(0.05)

    async def _become_source(self) -> None:
        """The domain runs here: hand its QEMU to the source half and stream to the peer."""
        p = self.placement
        proc = None
        if self.cfg.domain.is_qemu:
            proc = await self._domain_process(p)
        if p.decided_by == "committed":
            # The fence of an earlier hand-over from here is older than this commit.
            (self.root / HANDOVER_FILE).unlink(missing_ok=True)
        if not self.can_send:
            if not self._warned:
                log.warning("the domain runs here and peer.address is not set: not replicating "
                            "it back to the peer (set peer.address for the round trip)")
                self._warned = True
            if proc is not None and self.sink is not None:
                self.sink.switch_handler.shadow.proc = proc      # keep it where status sees it
                self.sink.switch_handler.shadow.running = True
            return
        self.source = SourceNode(self.cfg, metrics=self.metrics, proc=proc,
                                 generation=p.generation)
        try:
            await self.source.start()
        except BaseException:
            src, self.source = self.source, None
            with contextlib.suppress(Exception):
                await src.stop(leave_domain_running=True)
            raise

    async def _domain_process(self, p: Placement) -> Any:
        """The QEMU that runs the domain here, if this node launched it as a shadow."""
        from .vmm.qemu import QemuProcess
        shadow = self.sink.switch_handler.shadow if self.sink is not None else None
        if p.decided_by == "committed" and not p.pending and shadow is not None:
            # The commit is persisted before the shadow resumes: let the switch finish that.
            for _ in range(600):
                if shadow.proc is None or shadow.running:
                    break
                await asyncio.sleep(0.05)
            if shadow.proc is None:
                await shadow.recover(True)           # adopts it; resumes a commit cut short
            proc = shadow.take_process()
            if proc is None:
                raise ReplicatorError(
                    f"domain {self.cfg.domain.name} was committed to this host (generation "
                    f"{p.generation}) but its QEMU is gone; start it from {self.root} by hand")
            return proc
        if p.generation > 0 and self.cfg.domain.driver == "qemu":
            # A switch from here was cut short: its QEMU stays as it is for the source half
            # to settle (never resumed before the peer said it never committed); only the
            # migration its dead relay held open is ended, so that QEMU can run again.
            from .source.qemu_driver import settle_leftover_migration
            proc = await QemuProcess.adopt(self.cfg.domain.name, self.root)
            if proc is not None:
                await settle_leftover_migration(proc)
            return proc
        return None                                  # the home's own VM: launched or attached

    async def _turn_to_sink(self, placement: Placement) -> None:
        """Take ``placement`` (the domain on the peer) and become its shadow. The shadow is
        made of this host's RAM file and disks before the peer may stream into them: the
        receiver answers only once ``_turning`` is over."""
        self._turning = True
        self.placement = placement
        try:
            await self._become_sink(placement)
        finally:
            self._turning = False

    async def _become_sink(self, placement: Placement) -> None:
        """The domain was handed over: end the paused VM here, keep its RAM and disks as the
        shadow (re-hashed: the peer sends only what differs)."""
        src, self.source = self.source, None
        kept = _verified_disks(src) if src is not None else None
        if src is not None:
            end_here = getattr(src.driver, "end_here", None)
            try:
                if end_here is not None:
                    # A libvirt domain: keep its RAM file (libvirt removes it) as the shadow's
                    # image, then shut it off through libvirt.
                    await end_here(self.root / "ram0.img")
            finally:
                await src.stop(leave_domain_running=False)
        self.split_brain = None
        await self._forget_stale_shadow(placement, kept)
        await checkpoint("peer-shadow-ready")

    async def _forget_stale_shadow(self, p: Placement, kept: tuple | None = None) -> None:
        """Make this host's RAM file and disks the shadow of the domain that now runs on the
        peer, if that was not done yet for this placement generation. ``kept``: the disks as
        the switch verified them (generation, entries): they count as copies of the peer's,
        whose QEMU records writes from before it resumed; else they are hashed anew."""
        from .sink.disks import DiskCopies
        from .sink.store import ShadowStore
        state = self.root / "state.json"
        try:
            known = json.loads(state.read_text()) if state.exists() else {}
        except (OSError, ValueError):
            known = {}
        if p.decided_by != "handed-over" or (known and not known.get("handed_over")
                                             and int(known.get("generation", -1)) >= p.generation):
            return
        rec = self.sink.receiver if self.sink is not None else None
        if rec is not None:
            await rec.end_session()
            if rec.store is not None:
                rec.store.close(clean=False)
                rec.store = None
            await rec.disks.forget()
        else:
            DiskCopies.forget_files(self.root)
        if kept is not None:
            generation, disks = kept
            DiskCopies.keep_as_copies(self.root, disks, generation)
            log.info("this host's disks are the peer's copies at generation %d (the switch "
                     "verified them): the way back sends only blocks written since", generation)
        ShadowStore.forget(self.root, p.generation)
        log.info("this host's RAM image and disks are the shadow now (generation %d); they are "
                 "re-hashed when the peer connects", p.generation)

    def _check_split_brain(self) -> None:
        """Both hosts say the domain runs there: refuse, and say which copy is which."""
        src = self.source
        if src is None or src.rep is None or self.placement.pending:
            self.split_brain = None
            return
        rep = src.rep
        if not rep.sink_handed_over or src.switcher is None or src.switcher.current is not None:
            self.split_brain = None
            return
        peer_gen, peer_since, peer_forced = rep.sink_placement
        here = self.placement
        if peer_gen < here.generation and not here.forced:
            # The peer has not learnt yet that a switch gave the domain to this host (its
            # commit answer was lost): it asks, learns, and turns into the shadow.
            self.split_brain = None
            return
        newer = ("the peer's" if (peer_gen, peer_since) > (here.generation, here.running_since)
                 else "this host's")
        message = (
            f"SPLIT BRAIN: domain {self.cfg.domain.name} runs on both hosts. Here "
            f"({self.cfg.node.name}): generation {here.generation}, running since "
            f"{_when(here.running_since)}{' (started by hand)' if here.forced else ''}. "
            f"{rep.sink_node or 'the peer'}: generation {peer_gen}, running since "
            f"{_when(peer_since)}{' (started by hand)' if peer_forced else ''}. {newer} copy is "
            f"newer. Their RAM and disks differ and are never merged: on the host whose copy "
            f"is to be discarded, stop the VM's work and run `replicator discard-here`; that "
            f"host then becomes the shadow after a full compare.")
        if self.split_brain is None:
            log.critical("%s", message)
        self.split_brain = {"message": message, "here_generation": here.generation,
                            "peer_generation": peer_gen, "peer_forced": peer_forced,
                            "newer": "peer" if newer == "the peer's" else "here"}
        rep.last_error = message

    # --- placement without the peer ----------------------------------------------------------

    async def takeover(self) -> dict:
        """Start the domain here without the peer (``replicator takeover --force``): a fresh
        boot from this host's disks. Recorded as a new generation started by hand, so that a
        peer that ran the domain too is seen as a split brain, never merged."""
        async with self._lock:
            if self.placement.here:
                raise ReplicatorError("the domain already runs here")
            sink = self.sink
            if sink is None or not self.cfg.domain.is_qemu:
                raise ReplicatorError("takeover needs a QEMU domain and peer.listen (a shadow)")
            rec = sink.receiver
            if rec.connected.is_set():
                raise ReplicatorError(f"the peer {rec.source_node} is connected and runs the "
                                      "domain: switch from there instead")
            await rec.end_session()
            await sink.switch_handler.shadow.abort()
            await rec.disks.close()
            store = rec.store
            if store is None:
                from .sink.store import ShadowStore
                layout = ShadowStore.existing_layout(rec.root)
                if layout is None:
                    raise ReplicatorError("this host holds no copy of the domain yet")
                store = rec.store = await asyncio.to_thread(ShadowStore.open, rec.root,
                                                            layout, rec.images)
            generation = self.placement.generation + 1
            # The fence first: from here on this host owns the domain, across restarts.
            store.set_handed_over(True, generation=generation, forced=True)
            await sink.switch_handler.shadow.boot()
            log.warning("domain %s started here by hand (takeover --force, generation %d)",
                        self.cfg.domain.name, generation)
        return {"message": f"domain {self.cfg.domain.name} boots here (generation "
                           f"{generation}, started by hand)"}

    async def discard_here(self) -> dict:
        """Resolve a split brain in the peer's favour: end the domain here and make this
        host's RAM file and disks the peer's shadow (compared in full when it connects)."""
        async with self._lock:
            src = self.source
            if src is None or not self.placement.here:
                raise ReplicatorError("the domain does not run here: nothing to discard")
            rep = src.rep
            if not (self.split_brain or (rep is not None and rep.sink_handed_over)):
                raise ReplicatorError("no split brain: the peer does not run the domain. To "
                                      "move it, use switch")
            peer_gen = rep.sink_placement[0] if rep is not None else 0
            generation = max(self.placement.generation, peer_gen)
            state = self.root / HANDOVER_FILE
            from .durable import atomic_write
            atomic_write(state, json.dumps({"state": "handed-over", "generation": generation,
                                            "peer": rep.sink_node if rep else "",
                                            "discarded": True, "at": time.time()}))
            placement = read_placement(self.root, home=self.home)
            log.warning("split brain: discarding this host's copy of domain %s; it becomes the "
                        "peer's shadow (generation %d)", self.cfg.domain.name, generation)
            await self._turn_to_sink(placement)
        return {"message": f"the domain here was stopped and its copy discarded; this host is "
                           f"the shadow of {rep.sink_node if rep else 'the peer'} now"}

    # --- what the API calls ----------------------------------------------------------------

    async def switch(self, mode: str) -> dict:
        """"Switch now", pressed on either host: here the domain moves to the peer; on the
        host that keeps the shadow, the peer is asked to move it here."""
        if self.split_brain is not None:
            raise ReplicatorError(self.split_brain["message"])
        if self.source is not None:
            return await self.source.switch(mode)
        if self.sink is None or self.placement.here:
            raise HandedOver("no switch from here: this host neither runs the domain nor "
                             "keeps its shadow")
        return await self._pull(mode)

    async def _pull(self, mode: str) -> dict:
        """Ask the peer to switch the domain here and wait for the outcome: the commit (the
        domain runs here) or the switch given up (it runs on there still)."""
        sink = self.sink
        assert sink is not None
        handler, rec = sink.switch_handler, sink.receiver
        aborts, before = handler.aborts, handler.switch_id
        t0 = time.monotonic()
        await rec.request_switch(mode)
        started = False
        while True:
            await asyncio.sleep(0.05)
            store = rec.store
            if store is not None and store.handed_over and handler.committed:
                result = dict(handler.last_result or {})
                result.update(mode=mode, requested_here=True, peer=rec.source_node,
                              time_to_switch_ms=(time.monotonic() - t0) * 1000)
                return result
            started = started or (handler.switch_id not in ("", before))
            if handler.aborts > aborts:
                raise SwitchError(f"the switch from {rec.source_node} was rolled back; the "
                                  "domain runs there still (see its log)", rolled_back=True)
            if not started and time.monotonic() - t0 > 2 * self.cfg.peer.timeout:
                raise SwitchError(f"{rec.source_node} did not start the switch (not ready? "
                                  "see its status and log)", rolled_back=True)
            if started and not rec.connected.is_set() and not handler.committed:
                raise SwitchError(f"the link to {rec.source_node} was lost during the switch; "
                                  "the domain runs where its status says", rolled_back=False)

    async def pause_replication(self) -> dict:
        if self.source is None:
            raise ReplicatorError("nothing to pause: the domain runs on the peer")
        return await self.source.pause_replication()

    async def resume_replication(self) -> dict:
        if self.source is None:
            raise ReplicatorError("nothing to resume: the domain runs on the peer")
        return await self.source.resume_replication()

    async def domain_state(self) -> str | None:
        if self.source is not None:
            return await self.source.domain_state()
        if self.sink is not None:
            return await self.sink.domain_state()
        return None

    @property
    def rep(self) -> Any:
        return self.source.rep if self.source is not None else None

    def publish(self) -> None:
        if self.source is not None:
            self.source.publish()

    def status(self) -> dict:
        if self.source is not None:
            out = self.source.status()
        elif self.sink is not None:
            out = self.sink.status()
        else:
            out = {"role": "sink", "node": self.cfg.node.name, "domain": self.cfg.domain.name,
                   "time": time.time()}
        p = self.placement
        out["placement"] = {"here": p.here, "generation": p.generation, "pending": p.pending,
                            "decided_by": p.decided_by, "running_since": p.running_since,
                            "forced": p.forced, "home": self.home}
        # The same keys whichever half works: where the domain is, and what this node sent
        # over its life (both directions' source halves count into the same counters).
        out["handed_over"] = bool(out.get("handed_over")) or not p.here
        out.setdefault("runs_domain", p.here and not out["handed_over"])
        out["two_way"] = self.can_send and self.can_receive
        if "sent_bytes" not in out:
            sent = self.metrics.sent_bytes
            out["sent_bytes"] = {k: int(sent.labels(k)._value.get()) for k in ("raw", "wire")}
        if self.split_brain is not None:
            out["split_brain"] = self.split_brain
            out["in_sync"] = False
        if self.source is None and p.here and self._domain_absent is not None:
            # A libvirt domain its user shut off (or one replicator cannot use yet): say why.
            out["domain_problem"] = self._domain_absent
            out["in_sync"] = False
        return out


def _verified_disks(src: SourceNode) -> tuple[int, list] | None:
    """(generation, [(path, format, size, block hashes)]) of this host's disks after a switch
    that verified them equal on the peer, or None (they are hashed anew then)."""
    # The switch may still be finishing (its report not yet the last one) when the
    # placement already says the domain runs on the peer.
    sw = src.switcher
    rep, report = src.rep, (sw.current or sw.last) if sw is not None else None
    disks = getattr(rep, "disks", None)
    if disks is None or report is None or report.result != "ok" or not report.disks_verified:
        return None
    from .wire.blocks import switch_generation
    configured = src.cfg.domain.qemu.disks
    entries = []
    for i, d in enumerate(disks.disks):
        path = str(configured[i].path) if i < len(configured) else d.info.path
        entries.append((path, d.info.format, d.info.size, d.shipped.copy()))
    return switch_generation(report.switch_id) - 1, entries


def _when(t: float) -> str:
    if not t:
        return "before the last agreed switch"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
