"""libvirt domains with daemons killed at every phase of a switch (as systemd does it).

The same phase walks as tests/test_crash_qemu.py, with the VM libvirt's: it outlives any
daemon (libvirtd owns it), and which host runs it is read from libvirt (``virsh domstate``,
what virt-manager shows), cross-checked with the daemons. After each kill and restart exactly
one host runs the guest, its counter goes on, its memory check passes, and replication is in
sync again with less than half the RAM re-sent.
"""

from __future__ import annotations

import pytest

from .test_crash_qemu import _sink_killed_at_each_phase, _source_killed_at_each_phase
from .test_faults import daemons  # noqa: F401  (fixture)
from .test_libvirt_qemu import LibvirtPair

pytestmark = pytest.mark.qemu
#: No disk writes by the guest: the phase walks compare the disk with its copy after a switch.
APPEND = "console=ttyS0 quiet fill=25 dirty=2 memcheck=3"


async def _walk(tmp_path, guest, daemons, tracker: str, body) -> None:
    pair = LibvirtPair(tmp_path, guest, daemons, tracker, append=APPEND)
    try:
        await pair.start()
        await pair.wait_replicating(180)
        await body(pair)
    except BaseException:
        pair.dump_logs()
        raise
    finally:
        pair.stop()


@pytest.mark.parametrize("tracker,mode", [("qemu-precopy", "live")])
async def test_libvirt_desktop_daemon_killed_at_each_switch_phase(tmp_path, guest, daemons,
                                                                  tracker, mode):
    await _walk(tmp_path, guest, daemons, tracker,
                lambda pair: _source_killed_at_each_phase(pair, mode))


@pytest.mark.parametrize("tracker,mode", [("scan", "stop")])
async def test_libvirt_laptop_daemon_killed_at_each_switch_phase(tmp_path, guest, daemons,
                                                                 tracker, mode):
    await _walk(tmp_path, guest, daemons, tracker,
                lambda pair: _sink_killed_at_each_phase(pair, mode))
