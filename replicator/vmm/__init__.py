"""Hypervisor control: the QEMU process layer shared by the source and the sink."""

from replicator.vmm.qemu import (
    DEVICE_STATE_CAPABILITIES,
    QEMU_BINARY,
    RAM_BACKEND_ID,
    DeviceStateLoad,
    DeviceStateSave,
    InvalidVmSpec,
    MigrationStreamError,
    QemuProcess,
    QmpCommandError,
    QmpEvent,
    StreamHeader,
    VmSpec,
    build_argv,
    parse_stream_header,
    stream_capabilities,
)

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
