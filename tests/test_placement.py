"""Where the domain runs, from the two fences a node keeps (replicator.placement)."""

from __future__ import annotations

import json

import pytest

from replicator.errors import HandedOver
from replicator.placement import read_placement
from replicator.wire.blocks import switch_generation


def write(root, name, data):
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_neither_fence_the_role_decides(tmp_path):
    assert read_placement(tmp_path, home=True).here
    p = read_placement(tmp_path, home=False)
    assert not p.here and p.decided_by == "role" and p.generation == 0


def test_a_hand_over_sends_it_away_and_a_newer_commit_brings_it_back(tmp_path):
    write(tmp_path, "handed-over.json", {"state": "handed-over", "generation": 1})
    p = read_placement(tmp_path, home=True)
    assert (p.here, p.generation, p.decided_by) == (False, 1, "handed-over")
    # The shadow made of this host's RAM (store reset at the hand-over's generation).
    write(tmp_path, "state.json", {"handed_over": False, "generation": 1})
    assert not read_placement(tmp_path, home=True).here
    # The way back committed here: generation 2 beats the hand-over's 1.
    write(tmp_path, "state.json", {"handed_over": True, "generation": 2, "running_since": 5.0})
    p = read_placement(tmp_path, home=True)
    assert (p.here, p.generation, p.decided_by, p.running_since) == (True, 2, "committed", 5.0)
    # Handed over again (generation 3): away, although the store still says it ran here.
    write(tmp_path, "handed-over.json", {"state": "handed-over", "generation": 3})
    assert not read_placement(tmp_path, home=True).here


def test_a_tie_goes_to_the_fence(tmp_path):
    write(tmp_path, "handed-over.json", {"state": "handed-over", "generation": 2})
    write(tmp_path, "state.json", {"handed_over": True, "generation": 2})
    assert not read_placement(tmp_path, home=False).here


@pytest.mark.parametrize("state", ["switching", "committing"])
def test_a_switch_in_flight_keeps_it_here(tmp_path, state):
    write(tmp_path, "state.json", {"handed_over": True, "generation": 3})
    write(tmp_path, "handed-over.json", {"state": state, "generation": 4})
    p = read_placement(tmp_path, home=False)
    assert (p.here, p.pending, p.generation) == (True, state, 3)


def test_files_from_before_generations_count_as_the_first_switch(tmp_path):
    desk, lap = tmp_path / "desk", tmp_path / "lap"
    write(desk, "handed-over.json", {"state": "handed-over"})
    write(lap, "state.json", {"handed_over": True})
    assert not read_placement(desk, home=True).here
    p = read_placement(lap, home=False)
    assert p.here and p.generation == 1


def test_an_unreadable_fence_is_never_a_guess(tmp_path):
    write(tmp_path, "handed-over.json", "{not json")
    with pytest.raises(HandedOver):
        read_placement(tmp_path, home=True)
    (tmp_path / "handed-over.json").unlink()
    write(tmp_path, "state.json", "")
    p = read_placement(tmp_path, home=True)
    assert (p.here, p.decided_by) == (False, "unknown") and "state.json" in p.error
    # A hand-over fence still decides: the domain is on the peer either way.
    write(tmp_path, "handed-over.json", {"state": "handed-over", "generation": 4})
    p = read_placement(tmp_path, home=True)
    assert (p.here, p.decided_by, p.generation) == (False, "handed-over", 4)


def test_switch_generations_are_shared_and_apart_from_fresh_lineages():
    a, b = switch_generation("0123456789ab"), switch_generation("0123456789ab")
    assert a == b and a >= 1 << 41
    assert switch_generation("ffffffffffff") < (1 << 41) + (1 << 40)
    assert switch_generation("0123456789ab") != switch_generation("1123456789ab")


def test_status_says_where_the_domain_runs_and_a_split_brain():
    from replicator.cli import format_status
    st = {"role": "sink", "node": "desktop", "domain": "vm", "two_way": True,
          "placement": {"here": False, "generation": 3, "pending": "", "forced": False},
          "peer": {"node": "laptop", "connected": True}, "acked_epoch": 9, "ram_bytes": 1 << 30}
    text = format_status(st)
    assert "runs on the peer (generation 3); both ways" in text
    st.update(role="source", placement={"here": True, "generation": 4, "forced": True},
              split_brain={"message": "SPLIT BRAIN: domain vm runs on both hosts."})
    text = format_status(st)
    assert "runs HERE (generation 4, started by hand)" in text and "SPLIT BRAIN" in text
