"""Two test hosts in network namespaces joined by a veth pair (198.18.0.0/15 only).

``desk`` is 198.18.0.1, ``lap`` is 198.18.0.2. ``rate`` shapes both directions with tbf (this
kernel has no netem, so there is no delay emulation). Created and removed by the test.
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass

DESK_ADDR = "198.18.0.1"
LAP_ADDR = "198.18.0.2"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True)


@dataclass
class TwoHosts:
    desk: str
    lap: str
    desk_if: str
    lap_if: str

    @classmethod
    def create(cls, rate: str | None = None) -> "TwoHosts":
        tag = uuid.uuid4().hex[:6]
        hosts = cls(f"rpl-desk-{tag}", f"rpl-lap-{tag}", f"rd{tag}", f"rl{tag}")
        _ip("netns", "add", hosts.desk)
        _ip("netns", "add", hosts.lap)
        try:
            _ip("link", "add", hosts.desk_if, "type", "veth", "peer", "name", hosts.lap_if)
            _ip("link", "set", hosts.desk_if, "netns", hosts.desk)
            _ip("link", "set", hosts.lap_if, "netns", hosts.lap)
            for ns, ifname, addr in ((hosts.desk, hosts.desk_if, DESK_ADDR),
                                     (hosts.lap, hosts.lap_if, LAP_ADDR)):
                _ip("addr", "add", f"{addr}/24", "dev", ifname, ns=ns)
                _ip("link", "set", ifname, "up", ns=ns)
                _ip("link", "set", "lo", "up", ns=ns)
                if rate:
                    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname,
                                    "root", "tbf", "rate", rate, "burst", "256kb",
                                    "latency", "50ms"], check=True, capture_output=True)
        except BaseException:
            hosts.destroy()
            raise
        return hosts

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.desk if host == "desk" else self.lap]

    def link_down(self) -> None:
        _ip("link", "set", self.desk_if, "down", ns=self.desk)

    def link_up(self) -> None:
        _ip("link", "set", self.desk_if, "up", ns=self.desk)

    def destroy(self) -> None:
        for ns in (self.desk, self.lap):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
