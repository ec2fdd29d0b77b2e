"""What the source may tell the laptop about the VM: values to check, never files to open.

The source describes its running VM (``Hello.vm``, see ``QemuDriver.vm_description``). The
laptop's QEMU takes every host path it opens (RAM file, disks, kernel, initrd, serial log) from
the laptop's config or state dir; the description only *checks* them. Properties that name no
file (RAM size, vCPUs, machine, CPU model, UUID) must equal the laptop's config where that sets
them; where it leaves one unset, the source's value is used. Mismatches are refused with both
values named (:class:`~replicator.errors.LayoutMismatch`), at the Hello already when possible.
"""

from __future__ import annotations

import uuid as uuid_mod
from collections.abc import Sequence
from typing import Any

import msgpack

from ..config import Config, QemuConfig
from ..errors import DomainError, LayoutMismatch, ProtocolError
from ..vmm.disks import DiskInfo
from ..vmm.spec import RAM_BACKEND_ID
from ..wire import messages as m

#: Description fields the laptop uses (only those naming no file); "disks" is only compared.
PEER_FIELDS = ("ram_bytes", "vcpus", "machine", "cpu_model", "uuid")
MAX_DESCRIPTION = 64 * 1024
MAX_DISKS = 64


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _name(k: str, v: Any) -> str:
    if not isinstance(v, str) or not m.SAFE_NAME.fullmatch(v):
        raise ProtocolError(f"VM description: {k} {v!r} is not a plain name")
    return v


def _disk(i: int, v: Any) -> DiskInfo:
    if isinstance(v, str):                   # older sources sent bare paths
        v = {"path": v}
    if not isinstance(v, dict) or not isinstance(v.get("path"), str):
        raise ProtocolError(f"VM description: disks[{i}] must be a map with a path")
    fmt, node = v.get("format"), v.get("node")
    if (fmt is not None and not isinstance(fmt, str)) or (
            node is not None and not isinstance(node, str)):
        raise ProtocolError(f"VM description: disks[{i}] format and node must be strings")
    return DiskInfo(path=v["path"], format=fmt or "", node=node or "")


def parse_description(raw: bytes) -> dict[str, Any]:
    """Decode and type-check the source's VM description. Keeps the fields of
    :data:`PEER_FIELDS` and ``disks`` (a tuple of :class:`DiskInfo`); ignores the rest (older
    sources also sent kernel, initrd and append: the laptop never takes those)."""
    if not raw:
        return {}
    if len(raw) > MAX_DESCRIPTION:
        raise ProtocolError(f"VM description of {len(raw)} bytes is too large")
    try:
        desc = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_str_len=MAX_DESCRIPTION,
                               max_bin_len=0, max_array_len=MAX_DISKS, max_map_len=32)
    except Exception as exc:
        raise ProtocolError(f"VM description is not valid msgpack: {exc}") from None
    if not isinstance(desc, dict):
        raise ProtocolError("VM description must be a map")
    out: dict[str, Any] = {}
    for k, v in desc.items():
        if v is None:
            continue
        if k in ("machine", "cpu_model"):
            out[k] = _name(k, v)
        elif k in ("ram_bytes", "vcpus"):
            if type(v) is not int or v < 1 or k == "vcpus" and v > 255:
                raise ProtocolError(f"VM description: {k} {v!r} is not a plausible count")
            out[k] = v
        elif k == "uuid":
            try:
                out[k] = str(uuid_mod.UUID(str(v)))
            except ValueError:
                raise ProtocolError(f"VM description: uuid {v!r} is not a UUID") from None
        elif k == "libvirt_xml":
            # A libvirt domain's definition: the laptop defines its own from it, with its own
            # paths (replicator.vmm.libvirt_xml.laptop_definition refuses any other path).
            if not isinstance(v, str):
                raise ProtocolError("VM description: libvirt_xml must be a string")
            out[k] = v
        elif k == "disks":
            if not isinstance(v, list):
                raise ProtocolError("VM description: disks must be a list")
            out[k] = tuple(_disk(i, d) for i, d in enumerate(v))
    return out


def _mismatch(what: str, theirs: Any, ours: Any, key: str) -> LayoutMismatch:
    return LayoutMismatch(f"{what}: the source's VM has {theirs}, this laptop's config "
                          f"({key}) says {ours}; the laptop's config decides, so make them equal")


def peer_values(q: QemuConfig, desc: dict[str, Any], ram_bytes: int) -> dict[str, Any]:
    """The shadow's non-path VmSpec fields: this laptop's config where it sets them, else the
    source's (or the launch default). ``ram_bytes`` is the shadow store's ram0 region."""
    theirs = desc.get("ram_bytes")
    if theirs is not None and theirs != ram_bytes:
        raise LayoutMismatch(f"RAM size: the source's VM has {_size(theirs)}, but offered a "
                             f"{_size(ram_bytes)} ram0 region")
    if q.ram_size and q.ram_size != ram_bytes:
        raise _mismatch("RAM size", _size(ram_bytes), _size(q.ram_size), "domain.qemu.ram_size")
    out: dict[str, Any] = {"ram_bytes": ram_bytes}
    for key, label, default in (("vcpus", "vCPUs", 1), ("machine", "machine type", "q35"),
                                ("cpu_model", "CPU model", None)):
        ours, theirs = getattr(q, key), desc.get(key)
        if ours and theirs is not None and ours != theirs:
            raise _mismatch(label, repr(theirs), repr(ours), f"domain.qemu.{key}")
        out[key] = ours or theirs or default
    out["uuid"] = desc.get("uuid")
    return out


def check_disks(copies: int, reported: Sequence[DiskInfo] | None) -> None:
    """The source's QEMU must have as many disks as this laptop keeps copies of (the copies are
    matched by position; their paths are this host's own)."""
    if reported is None:
        return                                  # the source did not say
    if len(reported) != copies:
        raise LayoutMismatch(f"disks: the source's QEMU has {len(reported)} disk(s), this "
                             f"laptop holds {copies} cop{'y' if copies == 1 else 'ies'} "
                             "(they come with the source's DiskOpen)")


def check_offer(cfg: Config, hello: m.Hello) -> None:
    """The Hello checks that need no disk access: region sizes bounded by this sink's config
    and, for a QEMU domain, the description's properties and disk list against the config."""
    d = cfg.domain
    total = sum(r.size for r in hello.regions)
    # A QEMU domain whose ram_size is set is bounded exactly by it (peer_values, below).
    if total > d.max_ram_size and not (d.is_qemu and d.qemu.ram_size):
        raise LayoutMismatch(f"the source offers {_size(total)} of guest RAM, more than this "
                             f"sink's domain.max_ram_size ({_size(d.max_ram_size)})")
    if not d.is_qemu:
        return
    names = [r.name for r in hello.regions]
    if names != [RAM_BACKEND_ID]:
        raise LayoutMismatch(f"a QEMU domain has one region {RAM_BACKEND_ID!r}; the source "
                             f"offers {names}")
    desc = parse_description(hello.vm)
    if bool(desc.get("libvirt_xml")) != (d.driver == "libvirt") and desc:
        # QEMU calls the RAM block "pc.ram" under libvirt and "ram0" in VMs replicator
        # launches: the device state of one cannot load into the other.
        raise LayoutMismatch(f"the source's VM is {'' if desc.get('libvirt_xml') else 'not '}"
                             f"a libvirt domain, this host's domain.driver is {d.driver!r}; "
                             "both hosts must use the same driver")
    peer_values(d.qemu, desc, hello.regions[0].size)
    reported = desc.get("disks")
    if reported is not None and d.qemu.disks and len(d.qemu.disks) != len(reported):
        raise LayoutMismatch(
            f"disks: the source's QEMU has {len(reported)} disk(s), this laptop's "
            f"domain.qemu.disks lists {len(d.qemu.disks)} copies (one per disk, in order; or "
            "none, to keep them in the state directory)")


async def check_opened_files(proc: Any, allowed: set[str]) -> None:
    """QEMU re-reads each image header itself: make sure that, whatever a header said by
    then (an external data file written in after our check), every file it opened is one of
    this host's disks (``allowed``)."""
    nodes = await proc.execute("query-named-block-nodes", {"flat": True})
    opened = {n.get("image", {}).get("filename") or n.get("file", "") for n in nodes
              if n.get("drv") in ("file", "host_device")}
    extra = sorted(f for f in opened if f and f not in allowed)
    if extra:
        raise DomainError(f"the shadow QEMU opened {extra}, which this host's config does "
                          "not name as disks; refusing to use it")
