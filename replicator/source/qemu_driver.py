"""The QEMU domain driver: a real VM whose RAM is a shared file, driven over QMP.

The VM is either launched by the daemon from the config, or attached to by its QMP socket (the
usual case: libvirt or a user's script owns the VM). Guest RAM must be a
``memory-backend-file,share=on`` object: the tracker reads that file, and at switch time the
device state moves by a migration with ``x-ignore-shared`` that skips it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import DomainError, QemuError
from ..vmm.disks import query_disks
from ..vmm.qemu import QemuProcess
from ..vmm.spec import RAM_BACKEND_ID, spec_from_config
from .driver import DomainDriver, Region

log = logging.getLogger(__name__)

async def settle_leftover_migration(proc: QemuProcess, timeout: float = 10.0) -> None:
    """An adopted QEMU may still be in the migration its dead relay held open: wait until QEMU
    notices the closed socket (or cancel it), so that a new session can start a migration."""
    import asyncio
    import time
    deadline = time.monotonic() + timeout
    cancelled = False
    while True:
        status = (await proc.query_migrate()).get("status")
        if status in (None, "none", "completed", "failed", "cancelled"):
            return
        if not cancelled:
            log.info("an earlier run's migration is still %s; cancelling it", status)
            try:
                await proc.execute("migrate_cancel")
            except QemuError as exc:
                log.debug("migrate_cancel: %s", exc)
            cancelled = True
        if time.monotonic() > deadline:
            raise DomainError(f"the adopted QEMU's leftover migration is still {status!r} "
                              f"after {timeout:g}s")
        await asyncio.sleep(0.05)


class QemuDriver(DomainDriver):
    def __init__(self, cfg: Config, proc: QemuProcess, ram_path: Path, ram_size: int,
                 ram_block: str = RAM_BACKEND_ID):
        self.cfg = cfg
        self.proc = proc
        self.ram_path = ram_path
        self.ram_size = ram_size
        #: QEMU's id of the RAM backend (its block in migration streams); the region that
        #: replicates it is "ram0" whatever QEMU calls it.
        self.ram_block = ram_block
        self.workdir = Path(cfg.node.state_dir) / cfg.domain.name

    @classmethod
    async def create(cls, cfg: Config) -> "QemuDriver":
        q = cfg.domain.qemu
        workdir = Path(cfg.node.state_dir) / cfg.domain.name
        workdir.mkdir(parents=True, exist_ok=True)
        if q.launch:
            if q.ram_path is None:
                raise DomainError("domain.qemu.ram_path is required to launch the VM")
            spec = spec_from_config(cfg.domain.name, q, q.ram_path, q.serial_log)
            # A restarted daemon takes back the VM its earlier run launched (it kept running).
            adopted = await QemuProcess.adopt(spec.name, workdir, spec=spec)
            if adopted is not None:
                log.warning("adopted the running QEMU of domain %s (pid %d), launched by an "
                            "earlier run of this daemon", cfg.domain.name, adopted.pid)
                proc = adopted
                await settle_leftover_migration(proc)
            else:
                proc = await QemuProcess.launch(spec, workdir)
        else:
            if q.qmp_socket is None:
                raise DomainError("domain.qemu needs qmp_socket (attach) or launch = true")
            proc = await QemuProcess.attach(q.qmp_socket, workdir=workdir)
        return await cls.from_process(cfg, proc)

    @classmethod
    async def from_process(cls, cfg: Config, proc: QemuProcess,
                           ram_block: str = RAM_BACKEND_ID) -> "QemuDriver":
        """The driver for a QEMU this node already holds: the shadow that became the domain
        when a switch committed here (launched from this host's config, as a shadow)."""
        try:
            backends = await proc.shared_ram_backends()
        except QemuError:
            await proc.close()
            raise
        if ram_block not in backends or len(backends) != 1:
            await proc.close()
            raise DomainError(f"expected one shared RAM backend {ram_block!r}, found "
                              f"{sorted(backends)}")
        ram_path = Path(backends[ram_block])
        size = (await proc.execute("qom-get", {"path": f"/objects/{ram_block}",
                                                "property": "size"}))
        log.info("QEMU domain %s: guest RAM %d MiB in %s", cfg.domain.name, int(size) >> 20,
                 ram_path)
        return cls(cfg, proc, ram_path, int(size), ram_block)

    async def regions(self) -> list[Region]:
        return [Region(RAM_BACKEND_ID, self.ram_path, self.ram_size)]

    async def prepare_switch(self) -> None:
        """Set migration capabilities while the guest still runs (keeps them out of downtime)."""
        await self.proc.prepare_save()

    async def pause(self) -> None:
        await self.proc.stop()

    async def resume(self) -> None:
        # A rollback after a completed device-state save leaves QEMU in postmigrate; we only
        # get here when the sink never committed, so resuming is the right, single owner.
        await self.proc.cont(allow_postmigrate=True)

    async def is_running(self) -> bool:
        return await self.proc.status() == "running"

    async def save_device_state(self) -> bytes:
        result = await self.proc.save_device_state(self.workdir / "device-state.bin")
        return result.data

    async def vm_description(self) -> dict[str, Any]:
        """What the running QEMU is, asked from QEMU itself (not from our config): the sink
        checks its own VM definition against it. Disks carry the format QEMU opened them as."""
        p = self.proc
        machine = str(await p.execute("qom-get", {"path": "/machine", "property": "type"}))
        cpus = await p.execute("query-cpus-fast")
        cpu_type = str(await p.execute("qom-get", {"path": cpus[0]["qom-path"],
                                                    "property": "type"}))
        uuid = (await p.execute("query-uuid")).get("UUID")
        return {
            "machine": machine.removesuffix("-machine"),
            "ram_bytes": self.ram_size,
            "vcpus": len(cpus),
            "cpu_model": cpu_type.removesuffix(f"-{cpus[0].get('target', 'x86_64')}-cpu"),
            "uuid": None if not uuid or uuid == "00000000-0000-0000-0000-000000000000" else uuid,
            "disks": [{"path": d.path, "format": d.format, "node": d.node}
                      for d in await query_disks(p)],
        }

    async def close(self, leave_running: bool = False) -> None:
        """An attached VM is left as it is. A VM we launched ends here, unless
        ``leave_running`` (the daemon stops or restarts, the VM goes on and is adopted by the
        next start)."""
        if leave_running and self.proc.launched:
            log.info("leaving domain %s running (QEMU pid %s); the next start adopts it",
                     self.cfg.domain.name, self.proc.pid)
            await self.proc.detach()
            return
        await self.proc.close()
