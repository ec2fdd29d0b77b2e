"""The libvirt shadow: the same VM as a libvirt domain on this host, paused, waiting.

The domain is this host's libvirt definition of the desktop's VM: the one the user defined
here, or, when there is none, one made from the desktop's XML with this host's paths
(:func:`~..vmm.libvirt_xml.laptop_definition`: disks are this host's copies, every other host
path is refused). The shadow is that domain started by libvirt, paused, with QEMU told
``-incoming defer`` (a ``<qemu:commandline>`` in the live definition only); after a switch it
is a normal running libvirt domain that virsh and virt-manager show.

libvirt gives each start a fresh RAM file under its ``memory_backing_dir`` (and removes it when
the domain stops), so at every start the shadow store's RAM image moves into that file
(:meth:`~.store.ShadowStore.adopt_image`: copied once, then a hard link keeps it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DomainError, QemuError
from ..vmm.disks import check_image
from ..vmm.libvirt import LibvirtError, LibvirtHost, LibvirtQemu, keep_file
from ..vmm.libvirt_xml import LIBVIRT_RAM_BLOCK, facts, laptop_definition, with_incoming
from ..vmm.spec import RAM_BACKEND_ID
from . import vmcheck
from .qemu_shadow import load_paused, record_disk_writes
from .receiver import SinkReceiver
from .switch import Shadow

log = logging.getLogger(__name__)


class LibvirtShadow(Shadow):
    ram_block = LIBVIRT_RAM_BLOCK

    def __init__(self, cfg: Config, receiver: SinkReceiver):
        self.cfg = cfg
        self.receiver = receiver
        self.name = cfg.domain.libvirt_name
        self.proc: LibvirtQemu | None = None
        self.running = False
        self.workdir = Path(cfg.node.state_dir) / cfg.domain.name
        self.serial_log = cfg.domain.qemu.serial_log or self.workdir / "serial.log"
        self._lv: LibvirtHost | None = None
        self._lock = asyncio.Lock()

    async def _host(self) -> LibvirtHost:
        # Through open() each time: a connection libvirtd closed is replaced there.
        self._lv = await LibvirtHost.open(self.cfg.domain.libvirt.uri)
        return self._lv

    # --- the definition ----------------------------------------------------------------------

    async def _definition(self, vm_description: bytes) -> tuple[Any, str]:
        """This host's domain (defined from the desktop's XML if it is not yet) and its XML."""
        lv = await self._host()
        copies = [(c.spec.path, c.spec.format) for c in self.receiver.disks.copies]
        dom = await lv.lookup(self.name)
        if dom is None:
            desc = vmcheck.parse_description(vm_description)
            desktop_xml = desc.get("libvirt_xml")
            if not desktop_xml:
                raise DomainError("the peer's domain is not a libvirt domain; both hosts must "
                                  "use driver = \"libvirt\"")
            q = self.cfg.domain.qemu
            xml = laptop_definition(desktop_xml, name=self.name,
                                    uuid=await self._free_uuid(lv, desc.get("uuid")),
                                    disks=copies, kernel=q.kernel, initrd=q.initrd,
                                    log_dir=self.serial_log.parent)
            xml = xml.replace(str(self.serial_log.parent / f"{self.name}-serial0.log"),
                              str(self.serial_log))
            dom = await lv.call(f"defining domain {self.name}", lv.conn.defineXML, xml)
            log.info("defined libvirt domain %s on this host from the peer's XML, with this "
                     "host's disk copies %s", self.name, [str(p) for p, _ in copies])
        xml = await lv.call("reading the domain XML", dom.XMLDesc,
                            lv.libvirt.VIR_DOMAIN_XML_INACTIVE)
        mine = facts(xml, what="this host's libvirt domain")
        ours = [p for p, _, _ in mine.disks]
        if ours != [str(p) for p, _ in copies]:
            raise DomainError(f"this host's libvirt domain {self.name} uses disks {ours}, but "
                              f"replicator keeps the copies in {[str(p) for p, _ in copies]}; "
                              "list those in domain.qemu.disks (in order) or fix the domain")
        return dom, xml

    @staticmethod
    async def _free_uuid(lv: LibvirtHost, uuid: str | None) -> str | None:
        """The desktop's UUID, unless another domain here has it (then libvirt picks one)."""
        if not uuid:
            return None
        try:
            await lv.call("looking up a UUID", lv.conn.lookupByUUIDString, uuid)
        except LibvirtError:
            return uuid
        return None

    # --- the shadow ---------------------------------------------------------------------------

    async def prepare(self, vm_description: bytes) -> None:
        async with self._lock:
            if self.proc is not None and not self.proc._gone:
                return
            if self.proc is not None:
                await self.proc.close()
                self.proc = None
            await self._start(vm_description)

    async def _start(self, vm_description: bytes) -> None:
        store = self.receiver.store
        if store is None or RAM_BACKEND_ID not in store.regions:
            raise DomainError("the shadow store has no ram0 region yet; wait for replication")
        lv = await self._host()
        dom, xml = await self._definition(vm_description)
        size = store.regions[RAM_BACKEND_ID].info.size
        if facts(xml).ram_bytes != size:
            raise DomainError(f"this host's domain {self.name} has "
                              f"{facts(xml).ram_bytes >> 20} MiB of RAM, the peer's "
                              f"{size >> 20} MiB")
        if await lv.call("isActive", dom.isActive):
            await self._end_leftover(dom)
        for copy in self.receiver.disks.copies:
            check_image(copy.spec)
        log.info("starting libvirt domain %s as the shadow (paused, -incoming defer)", self.name)
        await lv.call(f"starting {self.name} paused", lv.conn.createXML, with_incoming(xml),
                      lv.libvirt.VIR_DOMAIN_START_PAUSED)
        proc = await LibvirtQemu.attach(lv, self.name, self.workdir)
        try:
            ram_file = Path(await proc.execute("qom-get", {
                "path": f"/objects/{LIBVIRT_RAM_BLOCK}", "property": "mem-path"}))
            started = time.monotonic()
            await vmcheck.check_opened_files(
                proc, {str(c.spec.path) for c in self.receiver.disks.copies})
            # The bulk copy in a thread (pages may keep arriving; they are copied again).
            copied = 0
            dst = store.begin_adopt(RAM_BACKEND_ID, ram_file)
            if dst is not None:
                try:
                    copied = await asyncio.to_thread(store.copy_for_adopt, RAM_BACKEND_ID, dst)
                except BaseException:
                    store.abandon_adopt(RAM_BACKEND_ID, dst)
                    raise
                store.finish_adopt(RAM_BACKEND_ID, ram_file, dst)
            log.info("shadow RAM is %s now (%d MiB of data copied in %.2f s)", ram_file,
                     copied >> 20, time.monotonic() - started)
            await proc.prepare_load()
        except BaseException:
            await proc.destroy()
            raise
        self.proc = proc

    async def _end_leftover(self, dom: Any) -> None:
        """This host's domain is active though no shadow of ours runs: a shadow an earlier
        run left (waiting, or its migration failed) is ended; a running VM is never touched."""
        lv = await self._host()
        proc = await LibvirtQemu.attach(lv, self.name, self.workdir)
        state = await proc.status()
        if state == "running" or not await self._ours(dom, state):
            await proc.close()
            raise DomainError(f"libvirt domain {self.name} is {state} on this host, started by "
                              "someone else than replicator; it cannot be the shadow (a split "
                              "brain? see replicator status)")
        log.warning("ending libvirt domain %s (%s), a shadow an earlier run left", self.name,
                    state)
        await proc.destroy()

    async def _ours(self, dom: Any, state: str) -> bool:
        """Whether this run of the domain is one replicator made: a shadow (started with
        ``-incoming``, waiting or loaded) or this host's VM after it handed itself over. A run
        someone started by hand, even paused, is not ours to end."""
        if state in ("inmigrate", "postmigrate"):
            return True
        lv = await self._host()
        live = await lv.call("reading the domain XML", dom.XMLDesc, 0)
        return "value='-incoming'" in live or 'value="-incoming"' in live

    async def load_device_state(self, data: bytes) -> None:
        if self.proc is None:
            raise DomainError("shadow domain is not running")
        await load_paused(self.proc, data)

    async def track_disks(self, generation: int) -> None:
        if self.proc is not None:
            await record_disk_writes(self.proc, generation)

    async def run(self) -> float:
        if self.proc is None:
            raise DomainError("shadow domain is not running")
        mark = self.proc.event_mark()
        await self.proc.resume_domain()       # through libvirt: virsh says "running"
        self.running = True
        try:
            ev = await self.proc.wait_event("RESUME", timeout=10, after=mark)
        except QemuError:
            return time.time()
        return ev.qemu_wall or ev.wall

    async def abort(self) -> None:
        async with self._lock:
            if self.proc is not None and not self.running:
                await self.proc.destroy()
                self.proc = None

    async def recover(self, handed_over: bool) -> None:
        """After a restart: settle this host's libvirt domain. Committed here: it is the
        domain (resume it if a crash came between commit and resume). Otherwise a paused
        copy is either a waiting shadow or this host's VM paused after handing over: keep
        its RAM as the shadow's image and end it."""
        async with self._lock:
            lv = await self._host()
            dom = await lv.lookup(self.name)
            if dom is None or not await lv.call("isActive", dom.isActive):
                if handed_over:
                    log.critical("the domain was committed to this host, but libvirt domain %s "
                                 "is not running; start it with virsh", self.name)
                return
            proc = await LibvirtQemu.attach(lv, self.name, self.workdir)
            state = await proc.status()
            if handed_over:
                self.proc = proc
                if state == "paused":
                    await proc.resume_domain()
                    log.warning("resumed the committed domain %s that a restart left paused",
                                self.name)
                self.running = await proc.status() == "running"
                return
            if state == "running" or not await self._ours(dom, state):
                await proc.close()
                log.critical("libvirt domain %s is %s here, started by hand, while the peer "
                             "has the domain; leaving it alone (see replicator status)",
                             self.name, state)
                return
            if state == "postmigrate":
                ram = await proc.execute("qom-get", {"path": f"/objects/{LIBVIRT_RAM_BLOCK}",
                                                     "property": "mem-path"})
                keep_file(Path(ram), self.workdir / f"{RAM_BACKEND_ID}.img")
            log.warning("ending libvirt domain %s (%s) left by an earlier run; a fresh shadow "
                        "starts when needed", self.name, state)
            await proc.destroy()

    async def boot(self) -> None:
        """``replicator takeover --force``: start the domain here from this host's disks
        (a fresh boot; the peer is gone)."""
        async with self._lock:
            lv = await self._host()
            dom = await lv.lookup(self.name)
            if dom is None:
                raise DomainError(f"libvirt domain {self.name} is not defined on this host")
            if self.proc is not None:
                await self.proc.destroy()
                self.proc = None
            await lv.call(f"starting {self.name}", dom.create)
            self.proc = await LibvirtQemu.attach(lv, self.name, self.workdir)
            self.running = True

    def take_process(self) -> LibvirtQemu | None:
        proc, self.proc, self.running = self.proc, None, False
        return proc

    def status(self) -> dict:
        return {"kind": "libvirt", "domain": self.name, "running": self.running,
                "pid": self.proc.pid if self.proc else None,
                "serial_log": str(self.serial_log)}

    async def close(self) -> None:
        if self.proc is not None:
            if self.running:
                await self.proc.close()                     # the domain runs on; let go
            else:
                await self.proc.destroy()                   # a waiting shadow ends
            self.proc = None
        if self._lv is not None:
            await self._lv.close()
            self._lv = None
