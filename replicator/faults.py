"""Fault-injection checkpoints for tests of the switch protocol.

Off unless ``REPLICATOR_FAULT_DIR`` is set in the daemon's environment. Then, at a named
checkpoint, if ``<dir>/block-<name>`` exists the daemon creates ``<dir>/at-<name>`` and waits
until the block file is removed — long enough for a test to cut the link or kill a peer at
exactly that phase.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


async def checkpoint(name: str) -> None:
    directory = os.environ.get("REPLICATOR_FAULT_DIR")
    if not directory:
        return
    block = Path(directory) / f"block-{name}"
    if not block.exists():
        return
    log.warning("fault injection: holding at %s", name)
    (Path(directory) / f"at-{name}").touch()
    while block.exists():
        await asyncio.sleep(0.02)
    log.warning("fault injection: released at %s", name)
