"""The libvirt domain driver: a VM that libvirt runs (virt-manager, GNOME Boxes, cockpit).

Everything is found through libvirt: the domain's RAM size, vCPUs, machine and disks from its
XML, its RAM file from QEMU (libvirt puts it under ``memory_backing_dir``), its state from
libvirt. The user edits nothing but, once, the ``<memoryBacking>`` that :mod:`..vmm.libvirt_xml`
asks for. What differs from :class:`.QemuDriver` is how QEMU is reached (libvirt's passthrough,
:class:`~..vmm.libvirt.LibvirtQemu`) and that the domain is libvirt's: replicator never ends it,
except after a switch, when this host's copy becomes the shadow (:meth:`LibvirtDriver.end_here`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DomainError
from ..vmm.libvirt import LibvirtHost, LibvirtQemu, keep_file
from ..vmm.libvirt_xml import LIBVIRT_RAM_BLOCK, facts
from .qemu_driver import QemuDriver, settle_leftover_migration

log = logging.getLogger(__name__)


class LibvirtDriver(QemuDriver):
    """The source's handle on a libvirt domain."""

    lv: LibvirtHost
    xml: str = ""

    @classmethod
    async def create(cls, cfg: Config) -> LibvirtDriver:   # type: ignore[override]
        name = cfg.domain.libvirt_name
        workdir = Path(cfg.node.state_dir) / cfg.domain.name
        workdir.mkdir(parents=True, exist_ok=True)
        host = await LibvirtHost.open(cfg.domain.libvirt.uri)
        try:
            dom = await host.lookup(name)
            if dom is None:
                raise DomainError(f"libvirt ({host.uri}) has no domain {name!r} "
                                  "(domain.libvirt.name, else domain.name)")
            live = await host.call("reading the domain XML", dom.XMLDesc, 0)
            facts(live, what="libvirt domain")          # refuses without shared RAM
            proc = await LibvirtQemu.attach(host, name, workdir)
            try:
                await settle_leftover_migration(proc)
                drv = await cls.from_process(cfg, proc, LIBVIRT_RAM_BLOCK)
            except BaseException:
                await proc.close()                      # its event callbacks
                raise
        except BaseException:
            await host.close()
            raise
        drv.lv = host
        drv.xml = await host.call("reading the domain XML", dom.XMLDesc,
                                  host.libvirt.VIR_DOMAIN_XML_INACTIVE)
        log.info("libvirt domain %s (%s): QMP through libvirt's passthrough (libvirt marks the "
                 "domain tainted: custom monitor control commands)", name, host.uri)
        return drv

    @classmethod
    async def from_libvirt_process(cls, cfg: Config, proc: LibvirtQemu) -> LibvirtDriver:
        """The driver for the domain a switch committed to this host (its shadow QEMU)."""
        drv = await cls.from_process(cfg, proc, LIBVIRT_RAM_BLOCK)
        drv.lv = proc.lv
        drv.xml = await proc.lv.call("reading the domain XML", proc.dom.XMLDesc,
                                     proc.lv.libvirt.VIR_DOMAIN_XML_INACTIVE)
        return drv

    async def resume(self) -> None:
        # Through libvirt (not QMP cont), so virsh and virt-manager say "running" again.
        state = await self.proc.status()
        if state == "running":
            return
        await self.proc.resume_domain()

    async def after_interference(self) -> None:
        """After a held-open migration ended: if libvirt's own operation (a memory dump, say)
        paused the VM and then failed to resume it because QEMU was finishing our migration
        meanwhile ("paused (api error)"), resume it as libvirt meant to. A VM its user paused
        stays paused."""
        lv = self.lv.libvirt
        state, reason = await self.lv.call("reading the domain state", self.proc.dom.state)
        if state == lv.VIR_DOMAIN_PAUSED and reason == lv.VIR_DOMAIN_PAUSED_API_ERROR:
            log.warning("libvirt could not resume domain %s after its own operation (QEMU was "
                        "finishing replicator's held-open migration); resuming it now",
                        self.proc.name)
            await self.proc.resume_domain()

    async def vm_description(self) -> dict[str, Any]:
        desc = await super().vm_description()
        desc["libvirt_xml"] = self.xml
        return desc

    async def end_here(self, keep_ram_at: Path) -> None:
        """The domain runs on the peer now: keep this host's RAM file as the shadow's image
        (``keep_ram_at``), then end the paused QEMU through libvirt (shut off, still defined)."""
        if self.proc.returncode is not None:
            # Already shut off (by its user, say): libvirt removed the RAM file with it, so
            # the peer sends what differs from whatever the shadow image holds.
            log.warning("libvirt domain %s was already shut off; its RAM could not be kept",
                        self.proc.name)
            return
        state = await self.proc.status()
        if state == "running":
            raise DomainError(f"libvirt domain {self.proc.name} runs; not ending it")
        keep_file(self.ram_path, keep_ram_at)
        await self.proc.destroy()
        log.info("libvirt domain %s ended here (it runs on the peer); its RAM is kept as %s",
                 self.proc.name, keep_ram_at)

    async def close(self, leave_running: bool = False) -> None:
        """libvirt owns the domain: it is never ended here, only let go of."""
        await self.proc.close()
        await self.lv.close()
