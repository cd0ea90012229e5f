"""The trace simulator and the synthetic trace generator: locality as published, files round-trip, policy sanity."""

from __future__ import annotations

import pytest

from marco_local.errors import MarcoError
from marco_local.offload import LFU, LRU, SlotTable, StaticHotSet, Trace, locality, simulate, synthetic_trace
from marco_local.offload.profile import counts_from_trace


@pytest.fixture(scope="module")
def synth():
    return synthetic_trace(num_layers=4, num_experts=232, top_k=8, tokens=300, seed=3)  # Marco-Nano's E


def test_synthetic_locality_matches_the_published_figures(synth):
    at_next, within8 = locality(synth)
    assert abs(at_next - 0.45) < 0.05 and abs(within8 - 0.80) < 0.05
    uniform = synthetic_trace(num_layers=2, num_experts=64, top_k=8, tokens=200, repeat=0.0, within=0.0, skew=0.0)
    assert locality(uniform)[0] < 0.25  # no locality knob: only chance overlap (8/64 plus a little)


def test_trace_file_round_trip(synth, tmp_path):
    path = tmp_path / "t.jsonl"
    synth.save(path)
    back = Trace.load(path)
    assert (back.num_layers, back.num_experts, back.top_k) == (4, 232, 8)
    assert [(e.layer, e.token, e.experts) for e in back.events] == [(e.layer, e.token, e.experts) for e in synth.events]
    (tmp_path / "bad.jsonl").write_text('{"format": "other"}\n')
    with pytest.raises(MarcoError):
        Trace.load(tmp_path / "bad.jsonl")


@pytest.mark.parametrize("policy", ["lru", "lfu", "static"])
def test_hit_rate_grows_with_slots_and_all_resident_misses_only_cold(synth, policy):
    """With every expert resident only first uses miss (none at all when a profile warmed the cache)."""
    profile = {k: [float(c) for c in v] for k, v in counts_from_trace(synth).items()}
    rates = [simulate(synth, policy, s, profile=profile if policy == "static" else None).hit_rate for s in (8, 16, 32)]
    assert rates[0] <= rates[1] <= rates[2]
    full = simulate(synth, policy, 232, profile=profile if policy == "static" else None)
    cold = len({(e.layer, x) for e in synth.events for row in e.experts for x in row})
    assert full.misses == (0 if policy == "static" else cold)


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_schedule_streams_a_layer_double_buffered_when_a_call_needs_more_experts_than_slots(slots):
    table = SlotTable(16, slots, LRU())
    experts = list(range(0, 16, 2))  # 8 experts
    steps = table.schedule(experts)
    groups = [list(g) for g, _ in steps]
    assert sum(groups, []) == experts and all(len(p) <= slots for _, p in steps)
    for k, (g, protected) in enumerate(steps):
        loads = table.assign(g, protected)
        assert {e for e, _ in loads} == set(g)  # nothing of the group was evicted while placing it
        assert all(table.slot_of[e] >= 0 for e in protected)  # the previous group is still there to compute
        if k and slots >= 2:
            assert set(groups[k - 1]) <= protected
    assert table.misses == 8


def test_policies_pick_the_expected_victims():
    lru = LRU()
    for e in (1, 2, 3):
        lru.insert(e)
    lru.access([1])
    assert lru.victim(set()) == 2 and lru.victim({2}) == 3
    lfu = LFU(4, decay=0.5)
    for e in (0, 1):
        lfu.insert(e)
    lfu.access([0])
    lfu.access([0])
    lfu.access([1])
    assert lfu.victim(set()) == 0  # decayed: one recent use of 1 outweighs two older uses of 0 at decay 0.5
    lfu9 = LFU(4, decay=0.99)
    for e in (0, 1):
        lfu9.insert(e)
    for used in ([0], [0], [1]):
        lfu9.access(used)
    assert lfu9.victim(set()) == 1
    static = StaticHotSet([5.0, 1.0, 3.0])
    for e in (0, 1, 2):
        static.insert(e)
    assert static.victim(set()) == 1 and static.victim({1}) == 2
