"""libvirt domain XML: what replicator needs from a domain, and the laptop's definition of it.

No I/O here. :func:`facts` reads what the source needs (RAM, vCPUs, machine, disks) and refuses a
domain a tracker cannot work with, naming the exact XML to add (never changing the domain
behind the user's back). :func:`laptop_definition` turns the desktop's XML into the laptop's:
the laptop decides every file its QEMU opens, so each host path in the desktop's XML is either
replaced by one of the laptop's (disk copies, kernel, serial log) or refused.
"""

from __future__ import annotations

import dataclasses
import posixpath
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from pathlib import Path

from replicator.errors import DomainError

__all__ = ["DomainFacts", "facts", "laptop_definition", "with_incoming", "SHARED_MEMORY_XML",
           "LIBVIRT_RAM_BLOCK"]

#: libvirt's id for the guest RAM backend (``-object memory-backend-file,id=pc.ram``).
LIBVIRT_RAM_BLOCK = "pc.ram"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"

SHARED_MEMORY_XML = """<memoryBacking>
  <source type='file'/>
  <access mode='shared'/>
</memoryBacking>"""

_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2,
          "mb": 1000**2, "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4,
          "tib": 1024**4, "tb": 1000**4}
# Elements that hand a host resource to the guest: the laptop cannot take them from the desktop.
_REFUSED = ("hostdev", "filesystem", "smartcard", "redirdev", "shmem", "tpm", "vsock")


@dataclasses.dataclass(frozen=True)
class DomainFacts:
    name: str
    uuid: str
    ram_bytes: int
    vcpus: int
    machine: str
    disks: tuple[tuple[str, str, str], ...]     # (path, format, target dev)


def _parse(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainError(f"libvirt gave unreadable domain XML: {exc}") from None


def _ram_bytes(root: ET.Element) -> int:
    mem = root.find("memory")
    if mem is None or not (mem.text or "").strip().isdigit():
        raise DomainError("the domain XML has no <memory> size")
    unit = (mem.get("unit") or "KiB").lower()
    return int(mem.text.strip()) * _UNITS.get(unit, 1024)


def shared_memory_problem(root: ET.Element) -> str | None:
    """Why guest RAM is not a shared file replicator can read, or None if it is."""
    mb = root.find("memoryBacking")
    source = mb.find("source") if mb is not None else None
    access = mb.find("access") if mb is not None else None
    if source is None or source.get("type") != "file":
        return "guest RAM is not backed by a file (<memoryBacking><source type='file'/>)"
    if access is None or access.get("mode") != "shared":
        return "guest RAM is not shared (<memoryBacking><access mode='shared'/>)"
    return None


def facts(xml: str, *, what: str = "the domain") -> DomainFacts:
    """What replicator needs from a domain's XML. Refuses (:class:`DomainError`) a domain whose
    RAM is not a shared file, with the XML to add and where."""
    root = _parse(xml)
    name = root.findtext("name") or ""
    if root.get("type") not in ("kvm", "qemu"):
        raise DomainError(f"{what} {name!r} is a {root.get('type')!r} domain; replicator "
                          "works with libvirt's QEMU driver (type 'kvm' or 'qemu')")
    problem = shared_memory_problem(root)
    if problem:
        raise DomainError(
            f"{what} {name!r}: {problem}. replicator reads guest RAM from its file while the "
            f"VM runs; add this inside <domain> (virsh edit {name}, or virt-manager's XML "
            f"tab), then shut the VM down and start it again:\n{SHARED_MEMORY_XML}")
    vcpu = root.find("vcpu")
    ostype = root.find("os/type")
    disks = []
    for disk in root.findall("devices/disk"):
        if disk.get("device", "disk") != "disk":
            continue
        src = disk.find("source")
        path = (src.get("file") or src.get("dev") or "") if src is not None else ""
        driver = disk.find("driver")
        target = disk.find("target")
        disks.append((path, (driver.get("type") if driver is not None else None) or "raw",
                      target.get("dev", "") if target is not None else ""))
    return DomainFacts(
        name=name, uuid=root.findtext("uuid") or "", ram_bytes=_ram_bytes(root),
        vcpus=int((vcpu.text or "1").strip()) if vcpu is not None else 1,
        machine=ostype.get("machine", "") if ostype is not None else "",
        disks=tuple(disks))


def laptop_definition(desktop_xml: str, *, name: str, uuid: str | None,
                      disks: list[tuple[Path, str]], kernel: Path | None,
                      initrd: Path | None, log_dir: Path) -> str:
    """The laptop's definition of the desktop's domain: the desktop's XML with the laptop's
    name, UUID and paths. ``disks``: the laptop's copies, in the order of the desktop's disks.
    Anything else naming a host file or device is refused, so that a desktop (or something
    speaking for it) cannot make the laptop's QEMU open a file the laptop did not name."""
    root = _parse(desktop_xml)
    ET.register_namespace("qemu", QEMU_NS)
    if any(el.tag.startswith(f"{{{QEMU_NS}}}") for el in root.iter()):
        raise DomainError("the desktop's domain has <qemu:...> elements (command line, "
                          "overrides); the laptop does not take those from its peer: define "
                          "the domain on the laptop yourself")
    if root.find("name") is None:
        raise DomainError("the desktop's domain XML has no <name>")
    # Not the desktop's to decide here: the live id, and how the laptop's libvirt confines and
    # runs QEMU (its own security labels and emulator binary apply).
    for tag in ("id", "seclabel"):
        for el in root.findall(tag):
            root.remove(el)
    for parent in root.iter():
        for el in parent.findall("emulator"):
            parent.remove(el)
    root.find("name").text = name                           # type: ignore[union-attr]
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = ET.SubElement(root, "uuid")
    uuid_el.text = uuid or str(uuid_mod.uuid4())
    devices = root.find("devices")
    if devices is None:
        raise DomainError("the desktop's domain XML has no <devices>")
    for tag in _REFUSED:
        if devices.find(tag) is not None:
            raise DomainError(f"the desktop's domain passes a host resource through (<{tag}>); "
                              "define the domain on the laptop yourself")
    for el in devices.findall("interface"):
        if el.get("type") not in _INTERFACES:
            raise DomainError(f"the desktop's domain has an interface of type "
                              f"{el.get('type')!r} (a host device or a socket it chose); "
                              "define the domain on the laptop yourself")
    for tag in ("serial", "console", "channel", "parallel"):
        for el in devices.findall(tag):
            if el.get("type") in ("tcp", "udp"):
                raise DomainError(f"the desktop's domain connects a <{tag}> to a network "
                                  "address it chose; define the domain on the laptop yourself")
    allowed: set[str] = set()
    wanted = [d for d in devices.findall("disk") if d.get("device", "disk") == "disk"]
    if len(wanted) != len(disks):
        raise DomainError(f"the desktop's domain has {len(wanted)} disk(s), the laptop has "
                          f"{len(disks)} cop{'y' if len(disks) == 1 else 'ies'}")
    for el, (path, fmt) in zip(wanted, disks):
        if el.get("type") != "file" or el.find("source") is None:
            raise DomainError(f"disk type {el.get('type')!r} is not supported (file only)")
        el.find("source").set("file", str(path))            # type: ignore[union-attr]
        driver = el.find("driver")
        if driver is None:
            driver = ET.SubElement(el, "driver", {"name": "qemu"})
        driver.set("type", fmt)
        for child in list(el):
            if child.tag == "backingStore":
                el.remove(child)
        allowed.add(str(path))
    for el in devices.findall("disk"):
        if el.get("device", "disk") != "disk" and el.find("source") is not None:
            el.remove(el.find("source"))                    # empty CD/floppy drive
    for i, el in enumerate(devices.findall("serial") + devices.findall("console")):
        src = el.find("source")
        if el.get("type") == "file" and src is not None and src.get("path"):
            src.set("path", str(log_dir / f"{name}-{el.tag}{i}.log"))
            allowed.add(src.get("path", ""))
    for el in devices.findall("channel"):
        src = el.find("source")
        if src is not None and "path" in src.attrib:
            del src.attrib["path"]                          # libvirt picks its own socket
    os_el = root.find("os")
    for tag, value in (("kernel", kernel), ("initrd", initrd)):
        el = os_el.find(tag) if os_el is not None else None
        if el is None:
            continue
        if value is None:
            raise DomainError(f"the desktop's domain boots a <{tag}> file; set "
                              f"domain.qemu.{tag} on the laptop to the laptop's copy")
        el.text = str(value)
        allowed.add(str(value))
    if os_el is not None and os_el.find("nvram") is not None:
        raise DomainError("the desktop's domain has UEFI variables (<nvram>), which replicator "
                          "does not carry yet")
    loader = os_el.find("loader") if os_el is not None else None
    if loader is not None and loader.text:
        if posixpath.normpath(loader.text) != loader.text or not loader.text.startswith(
                "/usr/share/"):
            raise DomainError(f"firmware {loader.text} is not a system firmware under "
                              "/usr/share")
        allowed.add(loader.text)
    _refuse_other_paths(root, allowed)
    return ET.tostring(root, encoding="unicode")


#: Interface types that name no host device or socket of the desktop's choosing.
_INTERFACES = {"network", "bridge", "user", "ethernet"}
#: Attributes of a <source> that name a host resource in any form (relative names too).
_RESOURCE_ATTRS = {"file", "path", "dir", "dev", "script", "socket"}
#: Host paths any VM may name: the entropy sources of a virtio-rng (libvirt allows only these).
_HARMLESS = {"/dev/urandom", "/dev/random", "/dev/hwrng"}
#: Where text may start with "/" without naming a host file (the guest's own words).
_FREE_TEXT = {"title", "description", "metadata", "cmdline"}


def _refuse_other_paths(root: ET.Element, allowed: set[str]) -> None:
    """A last net: any attribute value or element text that names a host path (begins with
    "/") and is not one the laptop chose is refused, whatever the element."""
    def walk(el: ET.Element) -> None:
        if el.tag in _FREE_TEXT:
            return
        attrs = {} if el.tag == "target" else el.attrib
        for k, v in attrs.items():
            resource = k == "script" or (el.tag == "source" and k in _RESOURCE_ATTRS)
            if resource and v and v not in allowed and v not in _HARMLESS:
                raise DomainError(f"the desktop's domain names the host resource {v!r} "
                                  f"(<{el.tag} {k}=...>); the laptop does not open what its "
                                  "peer chose: define the domain on the laptop yourself")
        values = [(f"{k}=", v) for k, v in attrs.items()]
        values.append(("", (el.text or "").strip()))
        for what, value in values:
            if value.startswith("/") and value not in allowed and value not in _HARMLESS:
                raise DomainError(f"the desktop's domain names the host path {value!r} "
                                  f"(<{el.tag} {what}...>); the laptop does not open paths "
                                  "its peer chose: define the domain on the laptop yourself")
        for child in el:
            walk(child)
    walk(root)


def with_incoming(inactive_xml: str) -> str:
    """The live definition of a shadow: the domain as defined, started by QEMU with
    ``-incoming defer`` (libvirt starts it paused; QEMU waits for the device state)."""
    root = _parse(inactive_xml)
    ET.register_namespace("qemu", QEMU_NS)
    cmd = root.find(f"{{{QEMU_NS}}}commandline")           # the user's own args stay
    if cmd is None:
        cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for value in ("-incoming", "defer"):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": value})
    return ET.tostring(root, encoding="unicode")
