"""A switch ends in bounded time, whatever the guest does.

A live switch runs live until its *live deadline* (derived from the switch estimate, or set),
then asks QEMU to throttle the guest until the *stop deadline*, then pauses the guest and sends
what is left, as stop mode does. The report names the path taken: ``live``, ``throttled`` or
``stopped``, and the throttle used.

QEMU's throttles:

* ``dirty-limit``: ``set-vcpu-dirty-limit`` caps each vCPU's dirty rate. Needs KVM with a dirty
  ring; needs no migration, so it serves both trackers, and is set only when needed.
* ``auto-converge``: QEMU slows the vCPUs while a migration does not converge. The capability
  cannot change while a migration runs, so for the held-open ``qemu-precopy`` migration it is
  armed when the migration starts, disarmed by its parameters (at most 1% throttle, and only
  while the guest dirties faster than the link carries) and turned up only by a switch.

Whatever was set is undone when the switch rolls back (and when a held-open migration ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from ..config import SwitchConfig
from ..errors import QemuError
from ..vmm.qmp_events import QmpCommandError

log = logging.getLogger(__name__)

# Parameters we change, with QEMU's defaults (restored when nothing else was recorded).
_PARAM_DEFAULTS = {"cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                   "max-cpu-throttle": 99, "throttle-trigger-threshold": 50,
                   "downtime-limit": 300}
# auto-converge armed but idle: dirtying faster than the link for 2 s gets a 1% throttle.
_DISARMED = {"cpu-throttle-initial": 1, "cpu-throttle-increment": 1, "max-cpu-throttle": 1,
             "throttle-trigger-threshold": 100}


@dataclass(frozen=True)
class Deadlines:
    """Seconds after the switch request."""
    live: float          # escalate: throttle the guest
    stop: float          # pause the guest and send the rest


def deadlines(cfg: SwitchConfig, estimate: float) -> Deadlines:
    live = cfg.live_deadline or max(cfg.live_deadline_min, cfg.live_deadline_factor * estimate)
    return Deadlines(live, live + cfg.throttle_time)


class Throttle:
    """QEMU's own guest throttling for one QEMU domain (``proc``: a QemuProcess)."""

    def __init__(self, proc: Any, cfg: SwitchConfig):
        self.proc = proc
        self.cfg = cfg
        self.armed = False              # auto-converge armed for the running migration
        self.engaged = ""               # what this switch turned on
        self._dirty_limit: bool | None = None
        self._saved: dict[str, int] | None = None
        self._ramped = True

    async def dirty_limit_available(self) -> bool:
        """KVM with a dirty ring (else QEMU refuses set-vcpu-dirty-limit). Probed once: set a
        limit no guest reaches, then cancel it."""
        if self.cfg.throttle not in ("auto", "dirty-limit"):
            return False
        if self._dirty_limit is None:
            self._dirty_limit = False
            with contextlib.suppress(QemuError):
                if (await self.proc.execute("query-kvm")).get("enabled"):
                    await self.proc.execute("set-vcpu-dirty-limit", {"dirty-rate": 1 << 30})
                    await self.proc.execute("cancel-vcpu-dirty-limit")
                    self._dirty_limit = True
        return self._dirty_limit

    async def _save_params(self) -> None:
        if self._saved is None:
            params = await self.proc.execute("query-migrate-parameters")
            saved = {k: int(params.get(k, v)) for k, v in _PARAM_DEFAULTS.items()}
            if all(saved[k] == v for k, v in _DISARMED.items()):
                saved = dict(_PARAM_DEFAULTS)   # left armed by a daemon that died: QEMU's own
            self._saved = saved

    async def set_downtime_limit(self, seconds: float) -> None:
        """QEMU completes a live migration once what is left fits this pause (default 300 ms,
        longer than stop mode would pause a guest the link keeps up with)."""
        await self._save_params()
        await self.proc.execute("migrate-set-parameters",
                                {"downtime-limit": max(1, round(seconds * 1000))})

    async def arm(self) -> None:
        """Before the held-open migration starts (no migration may be running)."""
        want = (self.cfg.throttle == "auto-converge"
                or (self.cfg.throttle == "auto" and not await self.dirty_limit_available()))
        if want:
            await self._save_params()
            await self.proc.execute("migrate-set-parameters", _DISARMED)
        await self.proc.set_migrate_capabilities({"auto-converge": want})
        self.armed = want

    async def engage(self, link_rate: float, migrating: bool) -> str:
        """Throttle the guest now; returns the throttle used, or "none"."""
        if self.cfg.throttle == "none" or self.cfg.throttle_time <= 0:
            return "none"
        if await self.dirty_limit_available():
            cpus = len(await self.proc.execute("query-cpus-fast")) or 1
            # Half the link in all: the guest dirties slower than the link drains.
            rate = max(1, int(link_rate / 2 / 1e6 / cpus))
            await self.proc.execute("set-vcpu-dirty-limit", {"dirty-rate": rate})
            self.engaged = "dirty-limit"
            log.info("switch: throttling the guest with dirty-limit at %d MB/s per vCPU", rate)
        elif self.armed and migrating:
            # Already at the idle 1%? QEMU then only adds the increment: make its first step
            # land on throttle_initial (ramp() restores the increment once it is there).
            now = int((await self.proc.query_migrate()).get("cpu-throttle-percentage") or 0)
            first = max(self.cfg.throttle_increment, self.cfg.throttle_initial - now)
            await self.proc.execute("migrate-set-parameters", {
                "cpu-throttle-initial": self.cfg.throttle_initial,
                "cpu-throttle-increment": min(100, first),
                "max-cpu-throttle": 99, "throttle-trigger-threshold": 50})
            self._ramped = first == self.cfg.throttle_increment
            self.engaged = "auto-converge"
            log.info("switch: throttling the guest with auto-converge (from %d%%, +%d%%)",
                     self.cfg.throttle_initial, self.cfg.throttle_increment)
        else:
            return "none"
        return self.engaged

    async def ramp(self, percent: int) -> None:
        """auto-converge reached ``percent``: from its first step on, the configured
        increment."""
        if self.engaged == "auto-converge" and not self._ramped and percent > 1:
            await self.proc.execute("migrate-set-parameters",
                                    {"cpu-throttle-increment": self.cfg.throttle_increment})
            self._ramped = True

    async def undo(self) -> None:
        """Back to how the QEMU was before: no dirty limit, our parameters restored and, once
        no migration runs (a cancelled one passes through "cancelling"), auto-converge off."""
        if self.engaged == "dirty-limit":
            with contextlib.suppress(QemuError):
                await self.proc.execute("cancel-vcpu-dirty-limit")
        self.engaged = ""
        if self._saved is not None:
            with contextlib.suppress(QemuError):
                await self.proc.execute("migrate-set-parameters", self._saved)
            self._saved = None
        for _ in range(100 if self.armed else 0):
            try:
                await self.proc.set_migrate_capabilities({"auto-converge": False})
                self.armed = False
            except QmpCommandError:
                await asyncio.sleep(0.02)     # still "cancelling"
            except QemuError:
                break                         # QEMU is gone
            else:
                break
        if self.armed:
            log.warning("could not turn QEMU's auto-converge off (a migration still runs)")
