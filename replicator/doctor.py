"""``replicator doctor``: check a host's config and domain before running, and say what to fix.

Each check prints ``ok`` or ``PROBLEM`` with the fix (for a libvirt domain without shared
memory: the exact XML to add). Nothing is changed: the user decides.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from .config import Config, load_config
from .errors import ReplicatorError


class Report:
    def __init__(self) -> None:
        self.problems = 0

    def ok(self, what: str) -> None:
        print(f"ok       {what}")

    def problem(self, what: str) -> None:
        self.problems += 1
        print(f"PROBLEM  {what}")


async def _libvirt(cfg: Config, report: Report) -> None:
    from .vmm.libvirt import LibvirtHost
    from .vmm.libvirt_xml import facts

    name = cfg.domain.libvirt_name
    try:
        lv = await LibvirtHost.open(cfg.domain.libvirt.uri)
    except ReplicatorError as exc:
        report.problem(str(exc))
        return
    version = await lv.call("version", lv.conn.getLibVersion)
    report.ok(f"libvirt {version // 1000000}.{version // 1000 % 1000}.{version % 1000} at "
              f"{lv.uri}")
    dom = await lv.lookup(name)
    if dom is None:
        if cfg.node.role == "sink":
            report.ok(f"no domain {name!r} here yet: it is defined from the desktop's XML, with "
                      "this host's disk copies, when replication starts")
        else:
            report.problem(f"libvirt has no domain {name!r} (set domain.libvirt.name)")
        return
    xml = await lv.call("reading the XML", dom.XMLDesc, lv.libvirt.VIR_DOMAIN_XML_INACTIVE)
    try:
        f = facts(xml, what="libvirt domain")
    except ReplicatorError as exc:
        report.problem(str(exc))
        return
    report.ok(f"domain {name!r}: {f.ram_bytes >> 20} MiB RAM in a shared file, {f.vcpus} "
              f"vCPU(s), machine {f.machine}, {len(f.disks)} disk(s)")
    for path, fmt, target in f.disks:
        if not path:
            report.problem(f"disk {target}: not a file; replicator carries file disks only")
    active = await lv.call("isActive", dom.isActive)
    report.ok(f"domain {name!r} is {'running or paused' if active else 'shut off'}"
              + ("" if active or cfg.node.role == "sink" else
                 ": replication starts once it runs"))


def _qemu(cfg: Config, report: Report) -> None:
    q = cfg.domain.qemu
    binary = shutil.which("qemu-system-x86_64")
    if binary:
        report.ok(f"QEMU at {binary}")
    else:
        report.problem("qemu-system-x86_64 is not installed")
    if q.launch and q.ram_path is not None and not os.access(q.ram_path.parent, os.W_OK):
        report.problem(f"cannot write the RAM file's directory {q.ram_path.parent}")
    for disk in q.disks:
        if cfg.node.role == "source" and not disk.path.exists():
            report.problem(f"disk {disk.path} does not exist")


def run(config: str | os.PathLike[str]) -> int:
    report = Report()
    try:
        cfg = load_config(config)
    except ReplicatorError as exc:
        report.problem(str(exc))
        return 1
    report.ok(f"config {config}: node {cfg.node.name}, domain {cfg.domain.name} "
              f"({cfg.domain.driver}, tracker {cfg.domain.tracker})")
    if not cfg.peer.id and not cfg.peer.insecure_plaintext:
        report.problem("peer.id is not set: run `replicator id` on the peer and "
                       "`replicator pair ID` here")
    state = Path(cfg.node.state_dir)
    if state.exists() and not os.access(state, os.W_OK):
        report.problem(f"cannot write the state dir {state}")
    if cfg.domain.driver == "libvirt":
        asyncio.run(_libvirt(cfg, report))
    elif cfg.domain.driver == "qemu":
        _qemu(cfg, report)
    print(f"{report.problems} problem(s)" if report.problems else "no problems found")
    return 1 if report.problems else 0
