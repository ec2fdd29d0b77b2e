"""The libvirt test environment itself (tests/libvirt_env.py) against the real libvirtd: the
project's test guest boots as a libvirt domain, and a domain without shared memory is what
libvirt keeps."""

from __future__ import annotations

import subprocess

import pytest

from replicator.guestlog import counters

from .conftest import wait_until
from .libvirt_env import TestDomain, cleanup_stale, domain_names, ensure_libvirtd

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module", autouse=True)
def libvirtd():
    ensure_libvirtd()
    ensure_libvirtd()  # idempotent: a second call finds both daemons and starts nothing
    cleanup_stale("rtest-env-")


async def test_guest_boots_under_libvirt(guest):
    dom = TestDomain("rtest-env-boot", guest)
    try:
        assert not dom.serial_log.exists()
        dom.define()
        assert dom.state() == "shut off"
        dom.start()
        await wait_until(lambda: len(counters(dom.serial_log)) >= 2, 120,
                         "the guest's COUNTER lines on its serial log")
        assert dom.state() == "running"
        assert dom.domstate_reason() == "running (booted)"
        live = dom.dumpxml()
        assert "<memoryBacking>" in live and "<access mode='shared'/>" in live
        assert str(dom.disk) in live
    finally:
        dom.cleanup()
    assert "rtest-env-boot" not in domain_names()
    assert not dom.dir.exists()
    dom.cleanup()  # a second cleanup of a domain that is gone is not an error


async def test_domain_without_shared_memory(guest):
    dom = TestDomain("rtest-env-private", guest, shared_memory=False, ram_mib=128)
    try:
        # The disk carries the data the tests check later (0x5a in its first 4 MiB).
        subprocess.run(["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5a 0 4M",
                        str(dom.disk)], check=True, capture_output=True)
        assert "memoryBacking" not in dom.xml
        dom.define()
        assert "memoryBacking" not in dom.dumpxml(inactive=True)
        dom.start()
        assert dom.state() == "running"
        xml = dom.dumpxml()
        assert "memoryBacking" not in xml
        assert "<memory unit='KiB'>131072</memory>" in xml
    finally:
        dom.cleanup()
    assert "rtest-env-private" not in domain_names()
