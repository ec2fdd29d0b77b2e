"""Unit tests for replicator.vmm.libvirt_xml: reading a domain's facts, the laptop's definition
made from the desktop's XML, and the shadow's live definition (-incoming defer)."""

from __future__ import annotations

import uuid as uuid_mod
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from replicator.errors import DomainError, ReplicatorError
from replicator.vmm.libvirt_xml import (QEMU_NS, SHARED_MEMORY_XML, facts, laptop_definition,
                                        with_incoming)

DESK_UUID = "5f0c8a4e-2b7d-4f1e-9c3a-8d6b1e2f4a70"
DESK_DISK = "/var/lib/libvirt/images/desk.qcow2"
DESK_BASE = "/var/lib/libvirt/images/base-debian12.qcow2"
DESK_ISO = "/var/lib/libvirt/images/debian-12.5.0-amd64-netinst.iso"
DESK_SERIAL = "/var/log/libvirt/qemu/desk-serial0.log"
DESK_CHANNEL = "/var/lib/libvirt/qemu/channel/target/domain-3-desk/org.qemu.guest_agent.0"

MEMORY_BACKING = """  <memoryBacking>
    <source type='file'/>
    <access mode='shared'/>
  </memoryBacking>
"""

# What `virsh dumpxml --inactive desk` prints for a q35 VM made by virt-install/virt-manager,
# plus the <memoryBacking> replicator asks for. {memory_backing}, {os_extra} and {devices_extra}
# let single tests vary it.
DESKTOP_TEMPLATE = """<domain type='kvm'>
  <name>desk</name>
  <uuid>{uuid}</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
{memory_backing}  <vcpu placement='static'>4</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-9.2'>hvm</type>
{os_extra}    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
    <vmport state='off'/>
  </features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <pm>
    <suspend-to-mem enabled='no'/>
    <suspend-to-disk enabled='no'/>
  </pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='{disk}'/>
      <backingStore type='file'>
        <format type='qcow2'/>
        <source file='{base}'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='{iso}'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
{disks_extra}    <controller type='usb' index='0' model='qemu-xhci' ports='15'>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </controller>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='sata' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1f' function='0x2'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </controller>
    <interface type='network'>
      <mac address='52:54:00:3b:8e:12'/>
      <source network='default'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <serial type='file'>
      <source path='{serial}'/>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='file'>
      <source path='{serial}'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='{channel}'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <channel type='spicevmc'>
      <target type='virtio' name='com.redhat.spice.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='2'/>
    </channel>
    <input type='tablet' bus='usb'>
      <address type='usb' bus='0' port='1'/>
    </input>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <graphics type='spice' autoport='yes'>
      <listen type='address'/>
      <image compression='off'/>
    </graphics>
    <sound model='ich9'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x1b' function='0x0'/>
    </sound>
    <audio id='1' type='spice'/>
    <video>
      <model type='virtio' heads='1' primary='yes'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/>
    </video>
{devices_extra}    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'/>
    </memballoon>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
      <address type='pci' domain='0x0000' bus='0x06' slot='0x00' function='0x0'/>
    </rng>
  </devices>
</domain>
"""

LAPTOP_DISK = Path("/srv/replicator/state/desk/disks/vda.qcow2")
LOG_DIR = Path("/srv/replicator/state/desk")


def desktop(*, memory_backing: str = MEMORY_BACKING, os_extra: str = "",
            disks_extra: str = "", devices_extra: str = "", uuid: str = DESK_UUID) -> str:
    return DESKTOP_TEMPLATE.format(
        uuid=uuid, memory_backing=memory_backing, os_extra=os_extra, disks_extra=disks_extra,
        devices_extra=devices_extra, disk=DESK_DISK, base=DESK_BASE, iso=DESK_ISO,
        serial=DESK_SERIAL, channel=DESK_CHANNEL)


def laptop(xml: str, **kw) -> str:
    args = dict(name="desk-shadow", uuid=DESK_UUID, disks=[(LAPTOP_DISK, "qcow2")],
                kernel=None, initrd=None, log_dir=LOG_DIR)
    args.update(kw)
    return laptop_definition(xml, **args)


def with_memory(unit: str | None, value: str) -> str:
    attr = f" unit='{unit}'" if unit is not None else ""
    return desktop().replace("<memory unit='KiB'>4194304</memory>",
                             f"<memory{attr}>{value}</memory>")


# ----------------------------------------------------------------------------------------------
# facts()


def test_facts_of_a_q35_domain():
    f = facts(desktop())
    assert f.name == "desk"
    assert f.uuid == DESK_UUID
    assert f.ram_bytes == 4 << 30
    assert f.vcpus == 4
    assert f.machine == "pc-q35-9.2"
    # The cdrom is no disk replicator carries.
    assert f.disks == ((DESK_DISK, "qcow2", "vda"),)


@pytest.mark.parametrize("unit,value,expected", [
    (None, "2097152", 2 << 30),            # libvirt's default unit is KiB
    ("KiB", "2097152", 2 << 30),
    ("k", "1024", 1 << 20),
    ("MiB", "2048", 2 << 30),
    ("M", "512", 512 << 20),
    ("GiB", "3", 3 << 30),
    ("G", "1", 1 << 30),
])
def test_facts_ram_units(unit, value, expected):
    assert facts(with_memory(unit, value)).ram_bytes == expected


def test_facts_without_memory_size_is_refused():
    xml = desktop().replace("<memory unit='KiB'>4194304</memory>", "")
    with pytest.raises(DomainError, match="no <memory> size"):
        facts(xml)


def test_facts_disks_in_order_with_formats_and_targets():
    extra = """    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/data.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg0/scratch'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/nodriver.img'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
"""
    f = facts(desktop(disks_extra=extra))
    assert f.disks == (
        (DESK_DISK, "qcow2", "vda"),
        ("/var/lib/libvirt/images/data.img", "raw", "vdb"),
        ("/dev/vg0/scratch", "raw", "vdc"),
        ("/var/lib/libvirt/images/nodriver.img", "raw", "vdd"),   # no <driver>: raw
    )


def test_facts_vcpu_and_machine_defaults():
    xml = desktop().replace("  <vcpu placement='static'>4</vcpu>\n", "").replace(
        "<type arch='x86_64' machine='pc-q35-9.2'>hvm</type>", "<type arch='x86_64'>hvm</type>")
    f = facts(xml)
    assert f.vcpus == 1
    assert f.machine == ""


@pytest.mark.parametrize("dtype", ["xen", "lxc", "vbox", "test"])
def test_facts_refuses_non_qemu_domains(dtype):
    xml = desktop().replace("<domain type='kvm'>", f"<domain type='{dtype}'>")
    with pytest.raises(DomainError, match="QEMU driver") as exc:
        facts(xml)
    assert repr(dtype) in str(exc.value)


def test_facts_accepts_type_qemu():
    xml = desktop().replace("<domain type='kvm'>", "<domain type='qemu'>")
    assert facts(xml).name == "desk"


@pytest.mark.parametrize("backing", [
    "",
    "  <memoryBacking>\n    <access mode='shared'/>\n  </memoryBacking>\n",
    "  <memoryBacking>\n    <source type='file'/>\n  </memoryBacking>\n",
    "  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='shared'/>\n"
    "  </memoryBacking>\n",
    "  <memoryBacking>\n    <source type='file'/>\n    <access mode='private'/>\n"
    "  </memoryBacking>\n",
    "  <memoryBacking>\n    <hugepages/>\n  </memoryBacking>\n",
], ids=["none", "no-source", "no-access", "memfd", "private", "hugepages-only"])
def test_facts_refuses_ram_that_is_not_a_shared_file(backing):
    with pytest.raises(DomainError) as exc:
        facts(desktop(memory_backing=backing), what="the desktop's domain")
    msg = str(exc.value)
    assert SHARED_MEMORY_XML in msg                 # the exact XML to paste
    assert "the desktop's domain 'desk'" in msg
    assert "virsh edit desk" in msg


def test_facts_of_unreadable_xml():
    with pytest.raises(DomainError, match="unreadable domain XML"):
        facts("<domain type='kvm'><name>x</name>")


def test_domain_error_is_a_replicator_error():
    assert issubclass(DomainError, ReplicatorError)


# ----------------------------------------------------------------------------------------------
# laptop_definition()


def test_laptop_definition_names_uuid_and_disks():
    out = laptop(desktop())
    root = ET.fromstring(out)                       # parses again
    assert root.findtext("name") == "desk-shadow"
    assert root.findtext("uuid") == DESK_UUID
    assert root.find("id") is None
    disk = root.find("devices/disk[@device='disk']")
    assert disk.find("source").get("file") == str(LAPTOP_DISK)
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("driver").get("discard") == "unmap"     # the rest of <driver> stays
    assert disk.find("backingStore") is None
    assert disk.find("target").get("dev") == "vda"
    # The desktop's own files appear nowhere: disk, backing file, ISO, serial log, socket.
    for path in (DESK_DISK, DESK_BASE, DESK_ISO, DESK_SERIAL, DESK_CHANNEL):
        assert path not in out, path


def test_laptop_definition_output_has_facts():
    f = facts(laptop(desktop()))
    assert f.name == "desk-shadow"
    assert f.uuid == DESK_UUID
    assert f.ram_bytes == 4 << 30
    assert f.vcpus == 4
    assert f.machine == "pc-q35-9.2"
    assert f.disks == ((str(LAPTOP_DISK), "qcow2", "vda"),)


def test_laptop_definition_fresh_uuid_when_none():
    a = ET.fromstring(laptop(desktop(), uuid=None)).findtext("uuid")
    b = ET.fromstring(laptop(desktop(), uuid=None)).findtext("uuid")
    assert str(uuid_mod.UUID(a)) == a
    assert a != DESK_UUID and a != b


def test_laptop_definition_adds_a_uuid_the_desktop_lacks():
    xml = desktop().replace(f"  <uuid>{DESK_UUID}</uuid>\n", "")
    assert ET.fromstring(laptop(xml, uuid=None)).findtext("uuid")
    assert ET.fromstring(laptop(xml)).findtext("uuid") == DESK_UUID


def test_laptop_definition_drops_a_live_id():
    xml = desktop().replace("<domain type='kvm'>", "<domain type='kvm' id='3'>\n  <id>3</id>")
    assert ET.fromstring(laptop(xml)).find("id") is None


def test_laptop_definition_replaces_disks_in_order():
    extra = """    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/libvirt/images/data.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/third.img'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
"""
    copies = [(Path("/l/a.qcow2"), "qcow2"), (Path("/l/b.qcow2"), "qcow2"),
              (Path("/l/c.raw"), "raw")]
    out = laptop(desktop(disks_extra=extra), disks=copies)
    assert facts(out).disks == (("/l/a.qcow2", "qcow2", "vda"), ("/l/b.qcow2", "qcow2", "vdb"),
                                ("/l/c.raw", "raw", "vdc"))
    # The disk without a <driver> got one, with libvirt's driver name.
    third = ET.fromstring(out).find("devices/disk/target[@dev='vdc']/..")
    assert third.find("driver").attrib == {"name": "qemu", "type": "raw"}
    assert "/var/lib/libvirt/images/" not in out


def test_laptop_definition_empties_the_cdrom():
    root = ET.fromstring(laptop(desktop()))
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom is not None                        # the drive stays, empty
    assert cdrom.find("source") is None
    assert cdrom.find("target").get("dev") == "sda"


def test_laptop_definition_serial_and_console_go_to_log_dir():
    root = ET.fromstring(laptop(desktop()))
    serial = root.find("devices/serial/source").get("path")
    console = root.find("devices/console/source").get("path")
    assert Path(serial).parent == LOG_DIR and Path(console).parent == LOG_DIR
    assert serial == str(LOG_DIR / "desk-shadow-serial0.log")
    assert console.startswith(str(LOG_DIR / "desk-shadow-console"))


def test_laptop_definition_pty_serial_is_kept():
    xml = desktop().replace(
        f"<serial type='file'>\n      <source path='{DESK_SERIAL}'/>", "<serial type='pty'>"
    ).replace(f"<console type='file'>\n      <source path='{DESK_SERIAL}'/>",
              "<console type='pty'>")
    root = ET.fromstring(laptop(xml))
    assert root.find("devices/serial").get("type") == "pty"
    assert root.find("devices/serial/source") is None


def test_laptop_definition_drops_channel_socket_paths():
    root = ET.fromstring(laptop(desktop()))
    chan = root.find("devices/channel[@type='unix']")
    assert chan.find("source").attrib == {"mode": "bind"}   # libvirt picks its own socket
    assert chan.find("target").get("name") == "org.qemu.guest_agent.0"


@pytest.mark.parametrize("iface", [
    "<interface type='network'><mac address='52:54:00:00:00:01'/>"
    "<source network='default'/><model type='virtio'/></interface>",
    "<interface type='bridge'><mac address='52:54:00:00:00:02'/>"
    "<source bridge='br0'/><model type='virtio'/></interface>",
], ids=["network", "bridge"])
def test_laptop_definition_keeps_network_interfaces(iface):
    out = laptop(desktop(devices_extra=f"    {iface}\n"))
    root = ET.fromstring(out)
    kinds = [i.get("type") for i in root.findall("devices/interface")]
    assert kinds == ["network", ET.fromstring(iface).get("type")]
    assert root.find("devices/interface/source[@network='default']") is not None
    assert root.find("devices/graphics").get("type") == "spice"
    assert root.find("memoryBacking/access").get("mode") == "shared"


def test_laptop_definition_replaces_kernel_and_initrd():
    os_extra = ("    <kernel>/var/lib/libvirt/boot/vmlinuz-6.1</kernel>\n"
                "    <initrd>/var/lib/libvirt/boot/initrd.img-6.1</initrd>\n"
                "    <cmdline>console=ttyS0 root=/dev/vda1</cmdline>\n")
    out = laptop(desktop(os_extra=os_extra), kernel=Path("/l/boot/vmlinux"),
                 initrd=Path("/l/boot/initramfs.cpio.gz"))
    root = ET.fromstring(out)
    assert root.findtext("os/kernel") == "/l/boot/vmlinux"
    assert root.findtext("os/initrd") == "/l/boot/initramfs.cpio.gz"
    assert root.findtext("os/cmdline") == "console=ttyS0 root=/dev/vda1"
    assert "/var/lib/libvirt/boot" not in out


@pytest.mark.parametrize("given,missing", [
    ({}, "kernel"),
    ({"initrd": Path("/l/boot/initramfs.cpio.gz")}, "kernel"),
    ({"kernel": Path("/l/boot/vmlinux")}, "initrd"),
])
def test_laptop_definition_refuses_a_kernel_boot_without_the_laptops_files(given, missing):
    os_extra = ("    <kernel>/var/lib/libvirt/boot/vmlinuz-6.1</kernel>\n"
                "    <initrd>/var/lib/libvirt/boot/initrd.img-6.1</initrd>\n")
    with pytest.raises(DomainError, match=rf"domain\.qemu\.{missing}\b"):
        laptop(desktop(os_extra=os_extra), **given)


def test_laptop_definition_ignores_a_kernel_the_desktop_does_not_boot():
    out = laptop(desktop(), kernel=Path("/l/boot/vmlinux"), initrd=Path("/l/boot/initrd"))
    assert ET.fromstring(out).find("os/kernel") is None


def test_laptop_definition_allows_system_firmware():
    os_extra = ("    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd"
                "</loader>\n")
    root = ET.fromstring(laptop(desktop(os_extra=os_extra)))
    assert root.findtext("os/loader") == "/usr/share/OVMF/OVMF_CODE_4M.fd"


def test_laptop_definition_refuses_firmware_outside_usr_share():
    os_extra = "    <loader readonly='yes' type='pflash'>/home/u/fw/OVMF_CODE.fd</loader>\n"
    with pytest.raises(DomainError, match="/home/u/fw/OVMF_CODE.fd.*/usr/share"):
        laptop(desktop(os_extra=os_extra))


def test_laptop_definition_refuses_nvram():
    os_extra = ("    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd"
                "</loader>\n"
                "    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>"
                "/var/lib/libvirt/qemu/nvram/desk_VARS.fd</nvram>\n")
    with pytest.raises(DomainError, match="<nvram>"):
        laptop(desktop(os_extra=os_extra))


def test_laptop_definition_refuses_qemu_commandline():
    xml = desktop().replace(
        "<domain type='kvm'>", f"<domain type='kvm' xmlns:qemu='{QEMU_NS}'>").replace(
        "</devices>\n", "</devices>\n  <qemu:commandline>\n"
        "    <qemu:arg value='-set'/>\n    <qemu:arg value='device.x.romfile=/etc/x'/>\n"
        "  </qemu:commandline>\n")
    assert ET.fromstring(xml).find(f"{{{QEMU_NS}}}commandline") is not None
    with pytest.raises(DomainError, match="<qemu:...>"):
        laptop(xml)


@pytest.mark.parametrize("tag,device", [
    ("hostdev", "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
                "<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source>"
                "</hostdev>"),
    ("filesystem", "<filesystem type='mount' accessmode='passthrough'>"
                   "<driver type='virtiofs'/><source dir='/home/u/share'/>"
                   "<target dir='share'/></filesystem>"),
    ("tpm", "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"),
    ("shmem", "<shmem name='ivshmem0'><model type='ivshmem-plain'/>"
              "<size unit='M'>4</size></shmem>"),
    ("redirdev", "<redirdev bus='usb' type='spicevmc'/>"),
    ("smartcard", "<smartcard mode='passthrough' type='spicevmc'/>"),
    ("vsock", "<vsock model='virtio'><cid auto='yes'/></vsock>"),
])
def test_laptop_definition_refuses_host_passthrough(tag, device):
    with pytest.raises(DomainError, match=f"<{tag}>"):
        laptop(desktop(devices_extra=f"    {device}\n"))


def test_laptop_definition_refuses_a_disk_count_mismatch():
    with pytest.raises(DomainError, match="1 disk.*2 cop"):
        laptop(desktop(), disks=[(LAPTOP_DISK, "qcow2"), (Path("/l/b.qcow2"), "qcow2")])
    with pytest.raises(DomainError, match="1 disk.*0 cop"):
        laptop(desktop(), disks=[])


def test_laptop_definition_refuses_a_block_disk():
    xml = desktop().replace(
        f"<disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' "
        f"discard='unmap'/>\n      <source file='{DESK_DISK}'/>",
        "<disk type='block' device='disk'>\n      <driver name='qemu' type='raw'/>\n"
        "      <source dev='/dev/vg0/desk'/>")
    assert "type='block'" in xml
    with pytest.raises(DomainError, match="disk type 'block'"):
        laptop(xml, disks=[(LAPTOP_DISK, "raw")])


@pytest.mark.parametrize("device,path", [
    ("<interface type='ethernet'><mac address='52:54:00:00:00:03'/>"
     "<script path='/etc/evil'/><model type='virtio'/></interface>", "/etc/evil"),
    ("<interface type='vhostuser'><mac address='52:54:00:00:00:04'/>"
     "<source type='unix' path='/run/ovs/vhu0' mode='server'/><model type='virtio'/>"
     "</interface>", "/run/ovs/vhu0"),
    ("<interface type='network'><source network='default'/><model type='virtio'/>"
     "<rom file='/etc/shadow'/></interface>", "/etc/shadow"),
    ("<serial type='dev'><source path='/dev/ttyS0'/><target port='1'/></serial>",
     "/dev/ttyS0"),
    ("<serial type='unix'><source mode='bind' path='/tmp/serial.sock'/><target port='1'/>"
     "</serial>", "/tmp/serial.sock"),
    ("<serial type='pty'><log file='/root/.bashrc' append='on'/><target port='1'/></serial>",
     "/root/.bashrc"),
    ("<parallel type='file'><source path='/etc/cron.d/x'/><target port='0'/></parallel>",
     "/etc/cron.d/x"),
    ("<disk type='file' device='floppy'><source file='/home/u/f.img'/>"
     "<target dev='fda' bus='fdc'/><mirror type='file' file='/home/u/mirror.img'/></disk>",
     "/home/u/mirror.img"),
])
def test_laptop_definition_refuses_other_host_paths(device, path):
    with pytest.raises(DomainError, match="names the host|interface of type") as exc:
        laptop(desktop(devices_extra=f"    {device}\n"))
    # Refused by the path itself, or earlier by the kind of device that carries it.
    assert repr(path) in str(exc.value) or "interface of type" in str(exc.value)


def test_laptop_definition_refuses_sysinfo_file_entries():
    xml = desktop().replace("  <devices>\n", "  <sysinfo type='fwcfg'>\n"
                            "    <entry name='opt/com.example/secret' file='/etc/ssh/ssh_host_"
                            "ed25519_key'/>\n  </sysinfo>\n  <devices>\n")
    with pytest.raises(DomainError, match="ssh_host_ed25519_key"):
        laptop(xml)


def test_laptop_definition_without_devices_is_refused():
    xml = desktop()
    start, end = xml.index("  <devices>"), xml.index("</devices>\n") + len("</devices>\n")
    with pytest.raises(DomainError, match="no <devices>"):
        laptop(xml[:start] + xml[end:])


# Host paths the laptop's QEMU (or libvirt) would open or run, in element text and attributes
# other than file/path/dir/dev (which an earlier _refuse_other_paths looked at only). Each must
# be refused, or at least not reach the laptop's definition.
def _root_with(xml: str, anchor: str, new: str) -> str:
    assert anchor in xml
    return xml.replace(anchor, new, 1)


_NOT_CAUGHT = {
    # libvirt executes <emulator> (text, not an attribute) as the laptop's QEMU binary.
    "emulator-text": (lambda: _root_with(
        desktop(), "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
        "<emulator>/home/mallory/qemu-system-x86_64</emulator>"),
        "/home/mallory/qemu-system-x86_64"),
    # An NVDIMM backed by any host file (mapped shared into the guest); <path> is text.
    "nvdimm-path-text": (lambda: desktop(devices_extra=(
        "    <memory model='nvdimm' access='shared'><source><path>/etc/shadow</path>"
        "</source><target><size unit='KiB'>524288</size><node>0</node></target></memory>\n")),
        "/etc/shadow"),
    # QEMU reads an ACPI table file into the guest; the path is text.
    "acpi-table-text": (lambda: desktop(os_extra=(
        "    <acpi><table type='slic'>/root/.ssh/id_ed25519</table></acpi>\n")),
        "/root/.ssh/id_ed25519"),
    # "/usr/share/" prefix check, then "..": the firmware is any file QEMU can read.
    "loader-dotdot": (lambda: desktop(os_extra=(
        "    <loader readonly='yes' type='rom'>/usr/share/../../root/.ssh/id_ed25519"
        "</loader>\n")), "/usr/share/../../root/.ssh/id_ed25519"),
    # A VNC/SPICE socket the laptop's QEMU creates where the desktop says: attribute 'socket'.
    "graphics-socket": (lambda: _root_with(
        desktop(), "<listen type='address'/>", "<listen type='socket' socket='/etc/x.sock'/>"),
        "/etc/x.sock"),
    # <qemu:override> sets a device's properties: its option ROM is read from any host file.
    # Only <qemu:commandline> is refused.
    "qemu-override-romfile": (lambda: _root_with(_root_with(
        desktop(), "<domain type='kvm'>", f"<domain type='kvm' xmlns:qemu='{QEMU_NS}'>"),
        "</devices>\n", "</devices>\n  <qemu:override><qemu:device alias='net0'>"
        "<qemu:frontend><qemu:property name='romfile' type='string' value='/etc/shadow'/>"
        "</qemu:frontend></qemu:device></qemu:override>\n"), "/etc/shadow"),
    # Device nodes libvirt opens for a tap interface: attributes 'tap' and 'vhost'.
    "interface-backend": (lambda: desktop(devices_extra=(
        "    <interface type='ethernet'><backend tap='/dev/mapper/secret' "
        "vhost='/dev/sda'/><model type='virtio'/></interface>\n")), "/dev/mapper/secret"),
}


@pytest.mark.parametrize("case", sorted(_NOT_CAUGHT))
def test_laptop_definition_refuses_uncaught_host_paths(case):
    make, path = _NOT_CAUGHT[case]
    try:
        out = laptop(make())
    except DomainError:
        return
    assert path not in out, f"{path} reaches the laptop's definition"


# ----------------------------------------------------------------------------------------------
# with_incoming()


def _args(xml: str) -> list[str]:
    cmd = ET.fromstring(xml).find(f"{{{QEMU_NS}}}commandline")
    assert cmd is not None
    return [a.get("value") for a in cmd.findall(f"{{{QEMU_NS}}}arg")]


def test_with_incoming_adds_incoming_defer():
    out = with_incoming(laptop(desktop()))
    assert _args(out) == ["-incoming", "defer"]
    assert f"xmlns:qemu=\"{QEMU_NS}\"" in out          # what libvirt needs to see it
    f = facts(out)
    assert f.name == "desk-shadow" and f.disks == ((str(LAPTOP_DISK), "qcow2", "vda"),)


def test_with_incoming_keeps_the_users_args():
    mine = desktop().replace(
        "<domain type='kvm'>", f"<domain type='kvm' xmlns:qemu='{QEMU_NS}'>").replace(
        "</devices>\n", "</devices>\n  <qemu:commandline>\n"
        "    <qemu:arg value='-global'/>\n"
        "    <qemu:arg value='kvm-pit.lost_tick_policy=discard'/>\n"
        "    <qemu:env name='QEMU_AUDIO_DRV' value='none'/>\n"
        "  </qemu:commandline>\n")
    out = with_incoming(mine)
    root = ET.fromstring(out)
    cmds = root.findall(f"{{{QEMU_NS}}}commandline")
    assert len(cmds) == 1
    assert _args(out) == ["-global", "kvm-pit.lost_tick_policy=discard", "-incoming", "defer"]
    assert cmds[0].find(f"{{{QEMU_NS}}}env").get("name") == "QEMU_AUDIO_DRV"
    assert facts(out).name == "desk"


def test_with_incoming_of_unreadable_xml():
    with pytest.raises(DomainError):
        with_incoming("<domain")
