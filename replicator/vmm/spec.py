"""What one QEMU is: :class:`VmSpec` (validated on construction) and the command line that
starts it (:func:`build_argv`); :func:`spec_from_config` builds one from this host's config.

Shared by the source (a VM it launches) and the sink (the shadow): every host path in a spec
comes from this host's config or state dir, never from the peer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid as uuid_mod
from pathlib import Path
from typing import Any

from replicator.config import QemuConfig
from replicator.errors import QemuError
from replicator.vmm.disks import DiskSpec, blockdev, check_image, probe_format

QEMU_BINARY = "qemu-system-x86_64"
#: QOM id of the guest-RAM backend object; also the RAM block's name in the migration stream.
RAM_BACKEND_ID = "ram0"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_MiB = 1024 * 1024


class InvalidVmSpec(QemuError, ValueError):
    """A :class:`VmSpec` field is invalid (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class VmSpec:
    """Everything needed to start one QEMU; validated on construction (:class:`InvalidVmSpec`).

    Source VM and shadow are built from equal specs except ``name``, ``ram_path`` and
    ``serial_log``: QEMU refuses device state from a differently shaped machine.

    There is deliberately no field for raw command-line options: every field is checked and
    turned into argv elements by :func:`build_argv`.
    """

    name: str
    """VM name (``-name``, socket and log file names): letters, digits, ``._-``."""
    ram_bytes: int
    """Guest RAM size; a multiple of 1 MiB, at least 16 MiB."""
    ram_path: Path
    """File backing guest RAM (``memory-backend-file,share=on``); created/extended by QEMU."""
    vcpus: int = 1
    accel: str = "tcg"
    """``"tcg"`` or ``"kvm"``."""
    cpu_model: str | None = None
    """``-cpu`` model; ``None`` means ``"max"`` under TCG and ``"host"`` under KVM."""
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    """Kernel command line (needs ``kernel``); passed as one argv element."""
    disks: tuple[DiskSpec, ...] = ()
    """Disk images with their formats (a :class:`DiskSpec` or a ``(path, format)`` pair each),
    attached as virtio-blk in this order. There is no default format: see ``vmm.disks``."""
    serial_log: Path | None = None
    """File receiving the guest's first serial port (``-serial file:``)."""
    machine: str = "q35"
    """Machine type (e.g. ``q35`` or a versioned ``pc-q35-10.0``)."""
    uuid: str | None = None
    """Optional SMBIOS UUID (``-uuid``); give the shadow the source's UUID."""
    qemu_binary: str = QEMU_BINARY
    """Emulator to run: a name looked up in ``PATH`` or an absolute path."""

    def __post_init__(self) -> None:
        def fail(field: str, why: str) -> None:
            raise InvalidVmSpec(f"VmSpec.{field}: {why}")

        def as_path(field: str, value: Any, *, optional: bool) -> Path | None:
            if value is None:
                if optional:
                    return None
                fail(field, "is required")
            if not isinstance(value, (str, os.PathLike)):
                fail(field, f"must be a path, not {type(value).__name__}")
            p = Path(value)
            text = str(p)
            if not text or "\0" in text or "\n" in text:
                fail(field, f"invalid path {text!r}")
            return p

        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            fail("name", f"{self.name!r} must be 1-64 letters, digits or ._- (not starting with ._-)")
        if isinstance(self.ram_bytes, bool) or not isinstance(self.ram_bytes, int):
            fail("ram_bytes", "must be an integer")
        if self.ram_bytes < 16 * _MiB or self.ram_bytes % _MiB:
            fail("ram_bytes", f"{self.ram_bytes} must be a multiple of 1 MiB and at least 16 MiB")
        object.__setattr__(self, "ram_path", as_path("ram_path", self.ram_path, optional=False))
        if isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= 255:
            fail("vcpus", f"{self.vcpus!r} must be an integer in 1..255")
        if self.accel not in ("tcg", "kvm"):
            fail("accel", f"{self.accel!r} must be 'tcg' or 'kvm'")
        if self.cpu_model is not None and (
            not isinstance(self.cpu_model, str) or not _TOKEN_RE.match(self.cpu_model)
        ):
            fail("cpu_model", f"{self.cpu_model!r} must be a plain model name (letters, digits, ._-)")
        object.__setattr__(self, "kernel", as_path("kernel", self.kernel, optional=True))
        object.__setattr__(self, "initrd", as_path("initrd", self.initrd, optional=True))
        if self.append is not None:
            if not isinstance(self.append, str) or "\0" in self.append or "\n" in self.append:
                fail("append", "must be a single-line string")
        if self.kernel is None and (self.initrd is not None or self.append is not None):
            fail("kernel", "initrd/append need a kernel")
        if isinstance(self.disks, (str, os.PathLike)):
            fail("disks", "must be a sequence of disks, not a single path")
        disks = []
        for i, d in enumerate(self.disks):
            if isinstance(d, (str, os.PathLike)):
                fail(f"disks[{i}]", f"{str(d)!r} has no format; give DiskSpec(path, format)")
            try:
                disks.append(d if isinstance(d, DiskSpec) else DiskSpec(*d))
            except (QemuError, TypeError) as exc:
                fail(f"disks[{i}]", str(exc))
        object.__setattr__(self, "disks", tuple(disks))
        object.__setattr__(self, "serial_log", as_path("serial_log", self.serial_log, optional=True))
        if not isinstance(self.machine, str) or not _TOKEN_RE.match(self.machine):
            fail("machine", f"{self.machine!r} must be a plain machine type name")
        if self.uuid is not None:
            try:
                object.__setattr__(self, "uuid", str(uuid_mod.UUID(str(self.uuid))))
            except ValueError:
                fail("uuid", f"{self.uuid!r} is not a UUID")
        if not isinstance(self.qemu_binary, str) or not self.qemu_binary or "\0" in self.qemu_binary:
            fail("qemu_binary", "must be a program name or path")

    @property
    def effective_cpu_model(self) -> str:
        """The ``-cpu`` model used: ``cpu_model`` or the accelerator's default."""
        if self.cpu_model:
            return self.cpu_model
        return "host" if self.accel == "kvm" else "max"


def _opt(value: str | os.PathLike[str]) -> str:
    """Escape a value for a QEMU ``key=value,...`` option string (``,`` is written ``,,``)."""
    return str(value).replace(",", ",,")


def build_argv(
    spec: VmSpec,
    qmp_socket: str | os.PathLike[str],
    incoming: str | None = None,
    paused: bool = False,
) -> list[str]:
    """Return the full argv (program first) that starts ``spec``.

    ``qmp_socket`` is the unix socket QEMU listens on for QMP. ``incoming="defer"`` starts a
    shadow waiting for ``migrate-incoming`` (it implies ``paused``, i.e. ``-S``, so that loading
    device state never starts the guest by itself). ``paused`` alone starts a VM with its CPUs
    stopped.
    """
    if incoming not in (None, "defer"):
        raise InvalidVmSpec(f"incoming must be None or 'defer', not {incoming!r}")
    sock = str(qmp_socket)
    if not sock or len(os.fsencode(sock)) > _SUN_PATH_MAX:
        raise InvalidVmSpec(f"QMP socket path {sock!r} is empty or longer than {_SUN_PATH_MAX} bytes")

    argv = [
        spec.qemu_binary,
        "-name", spec.name,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-accel", spec.accel,
        "-cpu", spec.effective_cpu_model,
        "-smp", str(spec.vcpus),
        "-object",
        f"memory-backend-file,id={RAM_BACKEND_ID},size={spec.ram_bytes},"
        f"mem-path={_opt(spec.ram_path)},share=on",
        "-machine", f"{spec.machine},memory-backend={RAM_BACKEND_ID}",
        "-chardev", f"socket,id=qmp0,path={_opt(sock)},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
    ]
    if spec.uuid:
        argv += ["-uuid", spec.uuid]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    if spec.append is not None:
        argv += ["-append", spec.append]
    for i, disk in enumerate(spec.disks):
        # JSON -blockdev: the file name goes in verbatim, the format is explicit, and a qcow2
        # image's header cannot name a backing file for QEMU to open.
        argv += ["-blockdev", json.dumps(blockdev(disk, f"disk{i}"), separators=(",", ":")),
                 "-device", f"virtio-blk-pci,drive=disk{i},id=disk{i}-dev"]
    if spec.serial_log is not None:
        # Appended, not truncated: after a round trip the VM comes back to a QEMU on this host
        # that writes the same log (commas in the path are doubled, QEMU's option escaping).
        path = str(spec.serial_log).replace(",", ",,")
        argv += ["-chardev", f"file,id=serial0,path={path},append=on",
                 "-serial", "chardev:serial0"]
    if incoming is not None:
        argv += ["-incoming", incoming]
    if paused or incoming is not None:
        argv.append("-S")
    return argv


# --- from a host's config -------------------------------------------------------------------

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
