"""The QEMU shadow: the same VM, started paused on the shadow image, waiting for a switch.

Its guest RAM is the shadow store's ``ram0.img`` (``memory-backend-file,share=on``), which the
receiver keeps writing while QEMU sits in ``-incoming defer -S``; its disks are this host's
copies (:mod:`.disks`), which QEMU holds inactive (unlocked, nothing cached that matters) until
the switch, while the receiver's ``qemu-nbd`` writes them. At switch time it loads the
device state (``x-ignore-shared``: RAM is already there) and is resumed only on commit.

The VM definition comes from this host's config: every file QEMU opens is named there (or is
in the state dir). The source's description only supplies values that name no file (RAM size,
vCPUs, machine, CPU model) where the config leaves them unset, and is refused where it
contradicts the config (:mod:`.vmcheck`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DomainError, QemuError
from ..vmm.spec import RAM_BACKEND_ID, VmSpec, spec_from_config
from ..vmm.disks import check_image
from ..vmm.qemu import QemuProcess
from . import vmcheck
from .receiver import SinkReceiver
from .switch import Shadow

log = logging.getLogger(__name__)


def parse_description(raw: bytes) -> dict[str, Any]:
    """Decode and type-check the source's VM description (see :mod:`.vmcheck`)."""
    return vmcheck.parse_description(raw)


def _reachable(path: Path) -> None:
    if not os.access(path, os.R_OK | os.W_OK):
        raise DomainError(f"disk copy {path} is not readable and writable here")


async def load_paused(proc: Any, data: bytes) -> None:
    """Load the switch's device state into a waiting shadow, which must stay paused."""
    # A Resume someone pressed on the waiting shadow (virt-manager, for a libvirt domain) only
    # set QEMU's "start once loaded"; `stop` clears it, so the loaded VM stays paused until
    # the commit, as the two-phase switch needs.
    await proc.execute("stop")
    result = await proc.load_device_state(data)
    if result.status != "paused":
        raise DomainError(f"shadow is {result.status!r} after loading, expected paused")


async def record_disk_writes(proc: Any, generation: int) -> None:
    """Record the guest's disk writes from before it resumes (a bitmap of ``generation``):
    the way back then sends only the blocks written since."""
    from ..vmm.bitmaps import DirtyTracking
    try:
        await DirtyTracking(proc).add_recording(generation)
    except QemuError as exc:
        # Not fatal: the way back then compares every block (sending only differences).
        log.warning("could not start disk write tracking before resuming: %s", exc)


class QemuShadow(Shadow):
    def __init__(self, cfg: Config, receiver: SinkReceiver):
        self.cfg = cfg
        self.receiver = receiver
        self.proc: QemuProcess | None = None
        self.running = False
        self.workdir = Path(cfg.node.state_dir) / cfg.domain.name
        self.serial_log = cfg.domain.qemu.serial_log or self.workdir / "shadow-serial.log"
        self._lock = asyncio.Lock()

    def _spec(self, vm_description: bytes) -> VmSpec:
        """The shadow's VmSpec. Every path comes from this host's config or state dir; from
        the source's description only values that name no file, each checked against the
        config (:func:`.vmcheck.peer_values`), and its disk list is compared with ours."""
        q = self.cfg.domain.qemu
        desc = parse_description(vm_description)
        store = self.receiver.store
        if store is None or RAM_BACKEND_ID not in store.regions:
            raise DomainError("the shadow store has no ram0 region yet; wait for replication")
        region = store.regions[RAM_BACKEND_ID]
        values = vmcheck.peer_values(q, desc, region.info.size)
        copies = self.receiver.disks
        vmcheck.check_disks(len(copies.copies), desc.get("disks"))
        # The disks are this host's copies (created and kept by the receiver), never the
        # source's paths.
        try:
            spec = spec_from_config(self.cfg.domain.name, dataclasses.replace(q, disks=()),
                                    region.path, self.serial_log, values)
            spec = dataclasses.replace(spec, disks=copies.specs())
        except QemuError as exc:
            raise DomainError(f"cannot describe the shadow VM: {exc}") from None
        return spec

    @staticmethod
    def _check_disks(spec: VmSpec) -> None:
        for disk in spec.disks:
            _reachable(disk.path)
            check_image(disk)           # again, right before QEMU opens it

    async def prepare(self, vm_description: bytes) -> None:
        async with self._lock:
            await self._prepare(vm_description)

    async def _prepare(self, vm_description: bytes) -> None:
        if self.proc is not None and self.proc.returncode is None:
            return
        spec = self._spec(vm_description)
        self._check_disks(spec)
        log.info("starting shadow QEMU for %s (%d MiB on %s, paused, -incoming defer)",
                 spec.name, spec.ram_bytes >> 20, spec.ram_path)
        self.proc = await QemuProcess.launch(spec, self.workdir, incoming="defer")
        try:
            await self._check_opened_files(spec)
            await self.proc.prepare_load()
        except BaseException:
            await self.proc.close()
            self.proc = None
            raise

    async def _check_opened_files(self, spec: Any) -> None:
        await vmcheck.check_opened_files(self.proc, {str(d.path) for d in spec.disks})

    async def load_device_state(self, data: bytes) -> None:
        if self.proc is None:
            raise DomainError("shadow QEMU is not running")
        await load_paused(self.proc, data)

    async def track_disks(self, generation: int) -> None:
        if self.proc is not None:
            await record_disk_writes(self.proc, generation)

    async def run(self) -> float:
        if self.proc is None:
            raise DomainError("shadow QEMU is not running")
        ev = await self.proc.cont()
        self.running = True
        if ev is None:
            import time
            return time.time()
        return ev.qemu_wall or ev.wall

    async def abort(self) -> None:
        # A shadow that loaded device state cannot take another stream: start afresh next time.
        async with self._lock:
            if self.proc is not None and not self.running:
                await self.proc.close()
                self.proc = None

    async def recover(self, handed_over: bool) -> None:
        """After a restart: settle the shadow QEMU an earlier run of this daemon left behind.

        Deterministic: if the domain was committed here (``handed_over``), that QEMU *is* the
        domain: adopt it, and resume it if the crash came between persisting the commit and
        resuming. Otherwise it is only a disposable shadow (its incoming migration may have
        died with the old relay): end it; a fresh one starts when needed. Never two shadows
        on one image.
        """
        async with self._lock:
            try:
                proc = await QemuProcess.adopt(self.cfg.domain.name, self.workdir)
            except QemuError as exc:
                log.error("cannot reconnect to the shadow QEMU of an earlier run: %s", exc)
                return
            if proc is None:
                if handed_over:
                    log.critical("the domain was committed to this host, but the QEMU that ran "
                                 "it is gone; start it from %s by hand", self.workdir)
                return
            if not handed_over:
                log.warning("ending the shadow QEMU of an earlier run (pid %s); a fresh shadow "
                            "starts when needed", proc.pid)
                await proc.close()
                return
            self.proc = proc
            state = await proc.status()
            if state == "paused":
                # The commit was persisted, then the daemon died before resuming it.
                await proc.cont()
                state = await proc.status()
                log.warning("resumed the committed domain (pid %s) that a restart left paused",
                            proc.pid)
            self.running = state == "running"
            if self.running:
                log.info("adopted the running domain (QEMU pid %s)", proc.pid)
            else:
                log.critical("the domain was committed here but its QEMU (pid %s) is %r",
                             proc.pid, state)

    async def boot(self) -> None:
        """Start the domain afresh on this host's RAM file and disk copies (``replicator
        takeover --force``: the peer is gone, so there is no device state; the guest boots)."""
        async with self._lock:
            if self.proc is not None:
                await self.proc.close()
                self.proc = None
            q = self.cfg.domain.qemu
            store = self.receiver.store
            if store is not None and RAM_BACKEND_ID in store.regions:
                ram_path, size = store.regions[RAM_BACKEND_ID].path, store.regions[
                    RAM_BACKEND_ID].info.size
            else:
                ram_path = self.receiver.images.get(RAM_BACKEND_ID) or self.workdir / "ram0.img"
                size = q.ram_size
            disks = self.receiver.disks.local_specs()
            try:
                spec = spec_from_config(self.cfg.domain.name, dataclasses.replace(q, disks=()),
                                        ram_path, self.serial_log,
                                        {"ram_bytes": size} if size else None)
                spec = dataclasses.replace(spec, disks=disks)
            except QemuError as exc:
                raise DomainError(f"cannot describe the VM to boot here: {exc}") from None
            self._check_disks(spec)
            log.warning("booting domain %s here without the peer (%d MiB on %s, %d disk(s))",
                        spec.name, spec.ram_bytes >> 20, ram_path, len(disks))
            self.proc = await QemuProcess.launch(spec, self.workdir)
            self.running = True

    def take_process(self) -> QemuProcess | None:
        """Hand the QEMU that runs the domain to the node's source half (QMP has one client):
        from now on this shadow holds nothing."""
        proc, self.proc, self.running = self.proc, None, False
        return proc

    def status(self) -> dict:
        return {"kind": "qemu", "running": self.running,
                "pid": self.proc.pid if self.proc else None,
                "serial_log": str(self.serial_log)}

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.running:
            # The domain runs here now: it must outlive this daemon, so leave it alone.
            return
        await self.proc.close()
        self.proc = None
