"""Direct reads (`--expert-misses direct`, marco_local/offload/direct.py), on the CPU.

The device-side gather runs here as torch ops over the store's rows (the CUDA kernel is checked by the GPU tests in
test_offload_gpu.py). Checked: the same logits as the resident model (float32, 1e-5) for every number of slots, eager
and through the graphed decoder (which then has no cut); the hot set the host moves between tokens is the experts
with the highest decayed counts, the slots hold their bytes and the device's slot map matches the table; hits and
misses count every expert of every token; the CLI refuses the mode without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from marco_local.cuda_graphs import GraphedDecoder
from marco_local.errors import MarcoError
from marco_local.loader import load_model
from marco_local.offload import Placement, install
from marco_local.offload.direct import gather_rows
from marco_local.offload.install import enable_direct

PROMPT = [5, 17, 33, 2, 91, 120, 7, 64, 250, 3, 44, 19]
STREAM = [9, 100, 3, 77, 250, 1, 42, 8, 19, 64, 5, 200, 31, 6, 90, 11, 2, 150, 7, 33, 18, 4, 60, 23, 99]


def direct_model(folder, slots: str, every: int = 4):
    model = load_model(folder, dtype=torch.float32)
    install(model, Placement(experts_resident=slots))
    enable_direct(model.offload, model.config.num_experts_per_tok, every=every)
    return model


@torch.no_grad()
def teacher_forced(model, decode=None) -> torch.Tensor:
    cache = model.make_cache(len(PROMPT) + len(STREAM))
    cache.keys.zero_(), cache.values.zero_()
    model(torch.tensor([PROMPT]), cache)
    step = decode or model
    return torch.stack([step(torch.tensor([[t]]), cache)[0, -1] for t in STREAM])


def test_gather_takes_each_row_from_its_slot_or_from_host_rows():
    host = torch.randint(0, 256, (6, 128), dtype=torch.uint8)
    slots = torch.randint(0, 256, (2, 128), dtype=torch.uint8)
    out = torch.empty(4, 128, dtype=torch.uint8)
    gather_rows(out, slots, host, torch.tensor([1, -1, 0, -1]), torch.tensor([3, 5, 0, 2]))
    for got, want in zip(out, [slots[1], host[5], slots[0], host[2]], strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("slots", ["1", "3", "6"])
def test_direct_decode_matches_the_resident_model(checkpoint, slots):
    folder, _ = checkpoint
    want = teacher_forced(load_model(folder, dtype=torch.float32))
    model = direct_model(folder, slots)
    assert all(x.direct for x in model.offload.layers)
    torch.testing.assert_close(teacher_forced(model), want, rtol=1e-5, atol=1e-5)
    st = model.offload.stats()
    A, layers = model.config.num_experts_per_tok, len(model.offload.layers)
    decode_hits_misses = sum(x.direct_tokens for x in model.offload.layers) * A
    assert decode_hits_misses == len(STREAM) * A * layers  # every expert of every decode token counted once
    assert st["expert_misses"] > 0 and st["expert_hits"] > 0
    model.offload.close()


def test_graphed_decoder_has_no_cut_and_matches_forward(checkpoint):
    folder, _ = checkpoint
    model = direct_model(folder, "2")
    want = teacher_forced(model)
    decoder = GraphedDecoder(model, min_window=8)
    assert decoder.cuts == [] and decoder.direct == model.offload.layers
    assert GraphedDecoder.capturable(model)
    for x in model.offload.layers:
        x.reset_stats()
    torch.testing.assert_close(teacher_forced(model, decoder), want, rtol=1e-5, atol=1e-5)
    assert all(x.direct_tokens == len(STREAM) for x in model.offload.layers)  # the decoder ran the host part
    model.offload.close()


def test_rebalance_keeps_the_hottest_experts_in_the_slots(checkpoint):
    folder, _ = checkpoint
    model = direct_model(folder, "3", every=len(STREAM))  # one move, after the last token, with no limit
    hot = model.offload.hot_sets
    hot.limit = None
    teacher_forced(model)
    assert not hot.stale.any()
    for x in model.offload.layers:
        table, score = x.table, hot.score[x.hot_row]
        resident = {e for e in range(x.num_experts) if table.slot_of[e] >= 0}
        assert len(resident) == 3
        coldest_resident = min(score[e] for e in resident)
        assert all(score[e] <= coldest_resident for e in range(x.num_experts) if e not in resident)
        assert x.device_map.tolist() == table.slot_of
        for e in resident:  # the slot holds that expert's bytes
            assert torch.equal(x.slots[table.slot_of[e]], x.store.rows[e])
    model.offload.close()


def test_a_prompt_marks_the_map_stale_and_the_next_token_restores_it(checkpoint):
    folder, _ = checkpoint
    model = direct_model(folder, "2")
    cache = model.make_cache(len(PROMPT) + 2)
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache)
        assert model.offload.hot_sets.stale.all()  # the prompt streamed through every layer's slots
        model(torch.tensor([[7]]), cache)
    assert not model.offload.hot_sets.stale.any()
    for x in model.offload.layers:
        assert x.device_map.tolist() == x.table.slot_of
    model.offload.close()


def test_direct_reads_need_cuda_from_the_cli(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    with pytest.raises(MarcoError, match="needs a CUDA device"):
        install(model, Placement(experts_resident="2", misses="direct"))


def test_a_static_profile_pins_the_hot_set(checkpoint, tmp_path):
    """With --expert-policy static the profile's most frequent experts fill the slots and stay, whatever is used."""
    import json

    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    E = model.config.num_experts
    layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    freq = {str(i): [float((e * 5 + i) % E) for e in range(E)] for i in layers}  # a made-up ranking per layer
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"format": "marco-expert-profile", "num_experts": E, "layers": freq}))
    install(model, Placement(experts_resident="3", profile=str(path), policy="static"))
    enable_direct(model.offload, model.config.num_experts_per_tok, every=2)
    teacher_forced(model)
    for x in model.offload.layers:
        ranked = sorted(range(E), key=lambda e: -freq[str(x.layer)][e])
        assert {e for e in range(E) if x.table.slot_of[e] >= 0} == set(ranked[:3])
    model.offload.close()


def test_simulated_direct_mode_learns_a_fixed_hot_set():
    """A trace whose tokens always use the same 4 of 16 experts: after the first token's move they all hit."""
    from marco_local.offload import Event, Trace
    from marco_local.offload.trace import simulate_direct

    trace = Trace(1, 16, 4, [Event(0, t, [[3, 7, 11, 15]]) for t in range(40)])
    sim = simulate_direct(trace, slots=4, every=16, deferred=False)
    assert (sim.hits, sim.misses) == (39 * 4, 4)
    shifting = Trace(1, 16, 4, [Event(0, t, [[0 if t < 20 else 1, 4, 5, 6]]) for t in range(100)])  # 1 takes over
    at_once, deferred = simulate_direct(shifting, 4, 16, deferred=False), simulate_direct(shifting, 4, 16)
    assert deferred.misses == at_once.misses + 16  # (CUDA) expert 1 is copied in for the 16 tokens after its move
    uniform = Trace(1, 16, 4, [Event(0, t, [[(t * 5 + j * 3) % 16 for j in range(4)]]) for t in range(64)])
    assert sim.hits > simulate_direct(uniform, slots=4, every=16).hits


def test_hits_counted_on_the_host_are_exact(checkpoint):
    """Residency changes only at a move, so the hits derived from the device's access counts equal a per-token count
    of the routed experts that were resident when the token ran."""
    folder, _ = checkpoint
    model = direct_model(folder, "3", every=3)
    want = {x.layer: 0 for x in model.offload.layers}

    def count(module, args):
        x, idx = args[0], args[1]
        if x.shape[0] == 1:  # decode tokens (the prompt's hits are the slot table's own)
            want[module.layer] += sum(module.table.slot_of[e] >= 0 for e in idx.reshape(-1).tolist())

    cache = model.make_cache(len(PROMPT) + len(STREAM) + 1)
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache)
        model(torch.tensor([[1]]), cache)  # the hot set returns after the prompt (inside layer 0's call)
        for x in model.offload.layers:
            x.reset_stats()
        handles = [x.register_forward_pre_hook(count) for x in model.offload.layers]
        for t in STREAM:
            model(torch.tensor([[t]]), cache)
    for h in handles:
        h.remove()
    got = {x.layer: x.stats()["hits"] for x in model.offload.layers}
    assert got == want and sum(want.values()) > 0
    model.offload.close()


@torch.no_grad()
def check_direct_layer(inner, top_k: int, tokens: int = 6) -> None:
    """One stacked-experts module (bf16 stacks, bitsandbytes 4-bit, GGUF blocks) offloaded with direct reads: each
    token's output equals the unwrapped module's gathered path, while the hot set moves every 2 tokens."""
    import copy

    from marco_local.offload import LRU, ExpertLayout, MemoryStore, OffloadedExperts
    from marco_local.offload.direct import HotSets

    reference = copy.deepcopy(inner)
    layout = ExpertLayout(inner, inner.num_experts)
    x = OffloadedExperts(inner, MemoryStore.from_module(inner, layout), 2, LRU())
    hot = HotSets([x], top_k, every=2)
    g = torch.Generator().manual_seed(0)
    D = inner.shapes["gate_proj"][1] if hasattr(inner, "shapes") else inner.gate_proj.shape[-1]
    for _ in range(tokens):
        h = torch.randn(1, D, generator=g)
        idx = torch.randperm(inner.num_experts, generator=g)[:top_k].view(1, top_k)
        w = torch.rand(1, top_k, generator=g)
        torch.testing.assert_close(x(h, idx, w), reference.forward_gathered(h, idx, w), rtol=1e-6, atol=1e-6)
    assert hot.tokens == tokens and x.stats()["hits"] > 0


def test_direct_reads_of_stacked_float_experts(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    check_direct_layer(model.model.layers[0].mlp.experts, model.config.num_experts_per_tok)


def test_deferred_moves_show_entering_experts_at_the_next_move(checkpoint):
    """CUDA's deferred moves, with synchronous copies: an entering expert is in the table at once but hidden from the
    device's map (read in place, a miss) until the next move shows it; the logits never change."""
    folder, _ = checkpoint
    want = teacher_forced(load_model(folder, dtype=torch.float32))
    model = direct_model(folder, "2", every=3)
    hot = model.offload.hot_sets
    hot.defer = True
    hidden_before: dict[int, set[int]] = {}
    deferred = []
    rebalance = hot.rebalance

    def checked(limit):
        rebalance(limit)
        for x in model.offload.layers:
            visible, planned = x.device_map.tolist(), x.table.slot_of
            assert all(visible[e] in (-1, planned[e]) for e in range(x.num_experts))
            for e in hidden_before.get(x.layer, ()):  # hidden at the last move: shown now, unless moved out since
                assert planned[e] < 0 or visible[e] == planned[e]
            hidden_before[x.layer] = {e for e in range(x.num_experts) if planned[e] >= 0 and visible[e] < 0}
            deferred.append(len(hidden_before[x.layer]))

    hot.rebalance = checked
    torch.testing.assert_close(teacher_forced(model), want, rtol=1e-5, atol=1e-5)
    assert max(deferred) > 0  # some moves were deferred
    model.offload.close()


KERNEL_CHECK = """
import torch
from marco_local.offload import direct

torch.manual_seed(0)
B = 4096 + 64 * 3  # not a whole number of the kernel's blocks: the mask matters
host = torch.randint(0, 256, (10, B), dtype=torch.uint8)
slots = torch.randint(0, 256, (4, B), dtype=torch.uint8)
slot_ids, expert_ids = torch.tensor([2, -1, 0, -1, 3, -1]), torch.tensor([5, 9, 1, 0, 7, 4])
got = torch.zeros(6, B, dtype=torch.uint8)
direct._launch(got.view(torch.int32), slots.view(torch.int32), host.view(torch.int32), slot_ids, expert_ids, B // 4)
for k in range(6):
    want = slots[slot_ids[k]] if slot_ids[k] >= 0 else host[expert_ids[k]]
    assert torch.equal(got[k], want), k
print("ok")
"""


def test_the_triton_kernel_under_triton_s_interpreter():
    """The CUDA gather kernel itself, run by triton's CPU interpreter (where triton is installed; its own process,
    as the interpreter is chosen when the kernel is built)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
