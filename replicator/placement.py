"""Where the domain runs: read from the two fences a node keeps, never from its config.

Every node has both halves. Each half persists its own fence at the exact protocol step that
needs it, in the domain's state directory:

- ``handed-over.json`` (the source half, :class:`~replicator.source.switch.HandoverState`):
  written before a switch pauses the domain ("switching"), before the commit is sent
  ("committing"), and once the peer confirmed ("handed-over"). Its ``generation`` is the
  placement the switch moves the domain to.
- ``state.json`` (the sink half's shadow store): ``handed_over`` is set before the shadow is
  resumed on commit, with the ``generation`` the domain runs at here from then on.

Each completed switch adds one to the placement generation (as DRBD's generation IDs count
the data's history): both nodes agree on it, since it travels in ``Hello``/``Welcome``. So the
newer of the two fences says where the domain is; with neither, the config's ``node.role``
(the domain's initial home) does. A switch still in flight ("switching" or "committing")
keeps the domain here until the source half settled it with the peer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import HandedOver, StoreError

HANDOVER_FILE = "handed-over.json"
STORE_STATE_FILE = "state.json"


@dataclass(frozen=True, slots=True)
class Placement:
    """This node's view of where the domain runs."""
    here: bool                  # the domain runs (or may still run) on this host
    generation: int             # placement generation: switches of this domain so far
    pending: str = ""           # a switch from here not settled yet: "switching"/"committing"
    decided_by: str = "role"    # "role", "handed-over" or "committed"
    running_since: float = 0.0  # when it started running here after a switch (0: unknown)
    forced: bool = False        # it was started here by hand, without the peer
    error: str = ""             # decided_by "unknown": why the fences could not be read

    def describe(self) -> str:
        where = "here" if self.here else "on the peer"
        extra = f", switch {self.pending}" if self.pending else ""
        return f"runs {where} (generation {self.generation}, {self.decided_by}{extra})"


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path} ({exc}); it records where the domain runs: "
                         f"inspect both hosts (`replicator status`) before fixing it") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path} is not a placement record")
    return data


def read_placement(root: Path, *, home: bool) -> Placement:
    """Where the domain runs, from the fences under ``root`` (``<state_dir>/<domain>``).

    ``home``: this node is the domain's initial home (``node.role = "source"``), which decides
    only while neither fence exists. An unreadable fence raises (never a guess)."""
    try:
        handed = _load(root / HANDOVER_FILE)
    except StoreError as exc:
        raise HandedOver(str(exc)) from None
    try:
        store = _load(root / STORE_STATE_FILE)
    except StoreError as exc:
        if handed and handed.get("state") == "handed-over":
            return Placement(False, int(handed.get("generation", 1)), decided_by="handed-over")
        # It may say the domain runs here: nobody may act on a guess (the sink half refuses
        # the peer naming the file, the source half does not start, no QEMU is touched).
        return Placement(False, 0, decided_by="unknown", error=str(exc))
    committed = store if store and store.get("handed_over") is True else None
    g_handed = int(handed.get("generation", 1)) if handed else -1
    g_committed = int(committed.get("generation", 1)) if committed else -1
    if handed and handed.get("state") in ("switching", "committing"):
        return Placement(True, max(g_handed - 1, g_committed, 0), pending=handed["state"],
                         decided_by="handed-over")
    if committed and g_committed > g_handed:
        return Placement(True, g_committed, decided_by="committed",
                         running_since=float(committed.get("running_since", 0.0)),
                         forced=bool(committed.get("forced", False)))
    if handed:
        # Ties go to the fence: a host that handed the domain over never takes it back alone.
        return Placement(False, max(g_handed, g_committed), decided_by="handed-over")
    generation = int(store.get("generation", 0)) if store else 0
    return Placement(home, generation)
