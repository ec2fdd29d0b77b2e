"""Hypervisor control: the QEMU process layer shared by the source and the sink."""

from replicator.vmm.migration import DEVICE_STATE_CAPABILITIES, DeviceStateLoad, DeviceStateSave
from replicator.vmm.qemu import QemuProcess
from replicator.vmm.qmp_events import QmpCommandError, QmpEvent
from replicator.vmm.spec import QEMU_BINARY, RAM_BACKEND_ID, InvalidVmSpec, VmSpec, build_argv
from replicator.vmm.stream_header import (MigrationStreamError, StreamHeader, parse_stream_header,
                                          stream_capabilities)

__all__ = [
    "DEVICE_STATE_CAPABILITIES",
    "QEMU_BINARY",
    "RAM_BACKEND_ID",
    "DeviceStateLoad",
    "DeviceStateSave",
    "InvalidVmSpec",
    "MigrationStreamError",
    "QemuProcess",
    "QmpCommandError",
    "QmpEvent",
    "StreamHeader",
    "VmSpec",
    "build_argv",
    "parse_stream_header",
    "stream_capabilities",
]
