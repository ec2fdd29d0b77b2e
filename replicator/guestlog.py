"""What the test guest says on its serial console, and byte counts for people.

The project's test guest (``deploy/guest/``) prints ``COUNTER n`` every 0.5 s and, when asked
by kernel arguments, the results of its memory check (``memcheck=<s>``) and disk check
(``diskcheck=<s>``). The demo, the benches and the tests read them from the serial log.
"""

from __future__ import annotations

import re
from pathlib import Path

COUNTER_RE = re.compile(rb"COUNTER (\d+)")


def counters(path: Path) -> list[int]:
    try:
        return [int(x) for x in COUNTER_RE.findall(path.read_bytes())]
    except FileNotFoundError:
        return []


def memchecks(path: Path) -> list[tuple[bool, int]]:
    """The guest's memory-check results in a serial log (kernel arg ``memcheck=<s>``), in order:
    ``(ok, pass number)`` per finished pass, complete lines only; the per-page
    ``MEMCHECK FAIL page=`` lines are not passes and are left out."""
    try:
        log = path.read_bytes()
    except FileNotFoundError:
        return []
    return [(m[1] == b"OK", int(m[2]))
            for m in re.finditer(rb"MEMCHECK (OK|FAIL) pass=(\d+) (?:pages|bad)=\d+\n", log)]


def diskchecks(path: Path) -> list[tuple[bool, int]]:
    """The guest's disk-check results in a serial log (kernel arg ``diskcheck=<s>``), in order:
    ``(ok, round number)`` per finished round, complete lines only; the per-block
    ``DISKCHECK FAIL round=<k> region=`` lines are not rounds and are left out, and
    ``DISKCHECK FAIL no disk`` counts as a failed round 0."""
    try:
        log = path.read_bytes()
    except FileNotFoundError:
        return []
    return [(m[1] == b"OK", int(m[2] or 0)) for m in re.finditer(
        rb"DISKCHECK (OK|FAIL) (?:round=(\d+) (?:regions|bad)=\d+|no disk)\n", log)]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
