"""The QEMU domain driver: a real VM whose RAM is a shared file, driven over QMP.

The VM is either launched by the daemon from the config, or attached to by its QMP socket (the
usual case: libvirt or a user's script owns the VM). Guest RAM must be a
``memory-backend-file,share=on`` object: the tracker reads that file, and at switch time the
device state moves by a migration with ``x-ignore-shared`` that skips it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..config import Config, QemuConfig
from ..errors import DomainError, QemuError
from ..vmm.disks import DiskSpec, check_image, probe_format, query_disks
from ..vmm.qemu import RAM_BACKEND_ID, QemuProcess, VmSpec
from .driver import DomainDriver, Region

log = logging.getLogger(__name__)

#: What :meth:`QemuDriver.vm_description` reports about the running VM. The sink checks these
#: against its own config and takes none of them as a path (see ``sink.vmcheck``).
DESCRIPTION_FIELDS = ("machine", "ram_bytes", "vcpus", "cpu_model", "uuid", "disks")
#: VmSpec fields ``spec_from_config`` lets a caller override: none of them names a file.
OVERRIDABLE = frozenset({"ram_bytes", "vcpus", "machine", "cpu_model", "uuid"})
DEFAULT_RAM = 512 * 1024**2


def resolve_accel(accel: str) -> str:
    """``auto`` means KVM when /dev/kvm opens read-write; the config can force ``tcg``.

    ``query-kvm`` alone is not trusted: on nested hosts KVM opens and reports enabled while
    guests die with emulation failures, so such hosts must say ``accel = "tcg"``.
    """
    if accel != "auto":
        return accel
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "tcg"
    os.close(fd)
    return "kvm"


def config_disks(q: QemuConfig) -> tuple[DiskSpec, ...]:
    """The configured disks with their formats: as configured, or (``auto``) as the file's
    header shows; each checked to be a self-contained image of that format."""
    disks = []
    for d in q.disks:
        disk = DiskSpec(d.path, probe_format(d.path) if d.format == "auto" else d.format)
        check_image(disk)
        disks.append(disk)
    return tuple(disks)


def spec_from_config(name: str, q: QemuConfig, ram_path: Path, serial_log: Path | None,
                     overrides: dict[str, Any] | None = None) -> VmSpec:
    """The VmSpec of this host's config. ``overrides`` may only set fields that name no file
    (:data:`OVERRIDABLE`): on a sink, values checked against the source's description."""
    fields: dict[str, Any] = dict(
        name=name, ram_bytes=q.ram_size or DEFAULT_RAM, ram_path=ram_path, vcpus=q.vcpus or 1,
        accel=resolve_accel(q.accel), machine=q.machine or "q35", cpu_model=q.cpu_model or None,
        kernel=q.kernel, initrd=q.initrd, append=q.append or None, disks=config_disks(q),
        serial_log=serial_log)
    if overrides:
        if not OVERRIDABLE.issuperset(overrides):
            raise QemuError(f"VmSpec fields {sorted(set(overrides) - OVERRIDABLE)} come only "
                            "from this host's config")
        fields.update(overrides)
    return VmSpec(**fields)


async def _settle_leftover_migration(proc: QemuProcess, timeout: float = 10.0) -> None:
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
    has_device_state = True

    def __init__(self, cfg: Config, proc: QemuProcess, ram_path: Path, ram_size: int):
        self.cfg = cfg
        self.proc = proc
        self.ram_path = ram_path
        self.ram_size = ram_size
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
                await _settle_leftover_migration(proc)
            else:
                proc = await QemuProcess.launch(spec, workdir)
        else:
            if q.qmp_socket is None:
                raise DomainError("domain.qemu needs qmp_socket (attach) or launch = true")
            proc = await QemuProcess.attach(q.qmp_socket, workdir=workdir)
        try:
            backends = await proc.shared_ram_backends()
        except QemuError:
            await proc.close()
            raise
        if RAM_BACKEND_ID not in backends or len(backends) != 1:
            await proc.close()
            raise DomainError(f"expected one shared RAM backend {RAM_BACKEND_ID!r}, found "
                              f"{sorted(backends)}")
        ram_path = Path(backends[RAM_BACKEND_ID])
        size = (await proc.execute("qom-get", {"path": f"/objects/{RAM_BACKEND_ID}",
                                                "property": "size"}))
        log.info("QEMU domain %s: guest RAM %d MiB in %s", cfg.domain.name, int(size) >> 20,
                 ram_path)
        return cls(cfg, proc, ram_path, int(size))

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
