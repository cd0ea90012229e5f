"""Direct reads (`--expert-misses direct`, marco_local/offload/direct.py), on the CPU.

The route and gather steps run here in Python and torch ops (`route_reference`, the torch branch of `gather_rows`);
where triton is installed, its interpreter runs the CUDA kernels against them and its compiler builds them for an H100
(the two tests named after triton), and with TRITON_INTERPRET=1 set the whole file runs through the kernels on the CPU
(the GPU tests in test_offload_gpu.py run them for real). Checked: the same logits as the resident model (float32, 1e-5)
for every number of slots, eager and through the graphed decoder (which then has no cut); the device's cache stays
consistent (map, owners, the slots' bytes), evicts the least recently used slot, keeps a static profile's hot set, and
hands its state to the host's table around a prompt; hits counted on the device are exact; the CLI refuses the mode
without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from marco_local.decode import forward
from marco_local.decode.cuda_graphs import GraphedDecoder
from marco_local.errors import MarcoError
from marco_local.layers.kv_cache import make_cache
from marco_local.load.checkpoint import load_model
from marco_local.offload import Event, Placement, Trace, install
from marco_local.offload.direct import EMPTY, gather_rows, route_reference
from marco_local.offload.misses import enable_direct
from marco_local.offload.trace import simulate_direct

PROMPT = [5, 17, 33, 2, 91, 120, 7, 64, 250, 3, 44, 19]
STREAM = [9, 100, 3, 77, 250, 1, 42, 8, 19, 64, 5, 200, 31, 6, 90, 11, 2, 150, 7, 33, 18, 4, 60, 23, 99]


def direct_model(folder, slots: str, **placement):
    model = load_model(folder, dtype=torch.float32)
    install(model, Placement(experts_resident=slots, **placement))
    enable_direct(model.offload.layers, model.config.num_experts_per_tok)
    return model


@torch.no_grad()
def teacher_forced(model, decode=None) -> torch.Tensor:
    cache = make_cache(model, len(PROMPT) + len(STREAM))
    cache.keys.zero_(), cache.values.zero_()
    model(torch.tensor([PROMPT]), cache)
    step = decode or model
    return torch.stack([step(torch.tensor([[t]]), cache)[0, -1] for t in STREAM])


def assert_consistent(x) -> None:
    """The device's map and owners agree, and every occupied slot holds its expert's bytes."""
    dmap, owner = x.lru.dmap.tolist(), x.lru.owner.tolist()
    for e, s in enumerate(dmap):
        assert s < 0 or owner[s] == e
    for s, e in enumerate(owner):
        assert e < 0 or dmap[e] == s
        if e >= 0:
            assert torch.equal(x.slots[s], x.store.rows[e])


def test_route_reference_is_lru_protecting_the_token():
    """3 slots, 2 experts a token: hits stamp their slots; a miss takes the empty slot, else the least recently used
    one that the token does not use; with every slot in use by the token, it is read in place only."""
    dmap, owner, stamp, pinned, state = [-1] * 6, [-1] * 3, [EMPTY] * 3, [False] * 3, [0, 0]
    cache = (dmap, owner, stamp, pinned, state)
    assert route_reference(*cache, [0, 1]) == ([-1, -1], [0, 1])
    assert route_reference(*cache, [2, 0]) == ([-1, 0], [2, -1])  # the empty slot 2
    assert route_reference(*cache, [3, 4]) == ([-1, -1], [1, 0])  # slot 1 (expert 1, token 1), then slot 0
    assert owner == [4, 3, 2] and state == [3, 1]
    one = ([-1] * 4, [-1], [EMPTY], [False], [0, 0])
    assert route_reference(*one, [0, 1]) == ([-1, -1], [0, -1])  # one slot: the second miss has none left
    assert route_reference(*one, [0, 2]) == ([0, -1], [-1, -1])  # a hit protects the only slot
    pinned_cache = ([1, -1, -1], [-1, 0], [EMPTY, EMPTY], [False, True], [0, 0])
    pinned_cache[0][0] = 1
    assert route_reference(*pinned_cache, [1, 2]) == ([-1, -1], [0, -1])  # slot 1 is pinned


def test_gather_takes_each_row_from_its_slot_or_from_host_rows_and_fills_slots():
    host = torch.randint(0, 256, (6, 128), dtype=torch.uint8)
    slots = torch.randint(0, 256, (3, 128), dtype=torch.uint8)
    kept = slots.clone()
    out = torch.empty(4, 128, dtype=torch.uint8)
    gather_rows(
        out, slots, host, torch.tensor([1, -1, 0, -1]), torch.tensor([3, 5, 0, 2]), torch.tensor([-1, 2, -1, -1])
    )
    for got, want in zip(out, [kept[1], host[5], kept[0], host[2]], strict=True):
        assert torch.equal(got, want)
    assert torch.equal(slots[2], host[5]) and torch.equal(slots[:2], kept[:2])  # only the filled slot changed


@pytest.mark.parametrize("slots", ["1", "3", "6"])
def test_direct_decode_matches_the_resident_model(checkpoint, slots):
    folder, _ = checkpoint
    want = teacher_forced(load_model(folder, dtype=torch.float32))
    model = direct_model(folder, slots)
    assert all(x.direct for x in model.offload.layers)
    torch.testing.assert_close(teacher_forced(model), want, rtol=1e-5, atol=1e-5)
    for x in model.offload.layers:
        assert_consistent(x)
        assert x.lru.counts()[0] == len(STREAM)  # the device routed every decode token
    st = model.offload.stats()
    assert st.misses > 0 and st.hits > 0 and st.bytes_read_in_place > 0
    model.offload.close()


@pytest.mark.parametrize("policy", ["lru", "static"])
def test_a_step_stopped_between_route_and_gather_leaves_no_stale_slot(checkpoint, monkeypatch, tmp_path, policy):
    """Ctrl-C between a token's route (the device's map already names the new slots) and its gather (their bytes):
    the next call empties the cache, a static profile's pinned experts come back, and the step run again gives the
    resident model's logits, as do the steps after it."""
    from marco_local.offload import misses as offloaded

    folder, _ = checkpoint
    resident = load_model(folder, dtype=torch.float32)
    want = teacher_forced(resident)
    top_k = resident.config.num_experts_per_tok
    freq = write_profile(folder, tmp_path / "profile.json") if policy == "static" else None
    static = {"profile": str(tmp_path / "profile.json"), "policy": "static"} if freq else {}
    model = direct_model(folder, str(top_k + 1), **static)
    real, armed = offloaded.gather_rows, []

    def gather_or_stop(out, slots, host_rows, src, ids, dst):
        if armed and bool((dst >= 0).any()):  # a gather that would fill a slot the map already names
            armed.clear()
            raise KeyboardInterrupt
        real(out, slots, host_rows, src, ids, dst)

    monkeypatch.setattr(offloaded, "gather_rows", gather_or_stop)
    cache = make_cache(model, len(PROMPT) + len(STREAM))
    got = []
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache)
        stopped = []
        for i, t in enumerate(STREAM):
            if i == 2:
                armed.append(True)  # the first fill from the third decode token on
            try:
                got.append(forward(model, torch.tensor([[t]]), cache)[0, -1])
            except KeyboardInterrupt:
                stopped.append(i)
                got.append(forward(model, torch.tensor([[t]]), cache)[0, -1])
    assert len(stopped) == 1
    torch.testing.assert_close(torch.stack(got), want, rtol=1e-5, atol=1e-5)
    for x in model.offload.layers:
        assert_consistent(x)
    if freq:
        assert_hot_set_pinned(model, freq, 1)
    model.offload.close()


def test_graphed_decoder_has_no_cut_and_matches_forward(checkpoint):
    folder, _ = checkpoint
    model = direct_model(folder, "2")
    want = teacher_forced(model)
    decoder = GraphedDecoder(model, min_window=8)
    assert decoder.cuts == [] and decoder.direct == model.offload.layers
    assert GraphedDecoder.capturable(model)
    torch.testing.assert_close(teacher_forced(model, decoder), want, rtol=1e-5, atol=1e-5)
    for x in model.offload.layers:
        assert_consistent(x)
    model.offload.close()


def test_hits_counted_on_the_device_are_exact(checkpoint):
    """The device's hit count equals a per-token count of the routed experts its map held when the token came."""
    folder, _ = checkpoint
    model = direct_model(folder, "3")
    want = {x.layer: 0 for x in model.offload.layers}

    def count(module, args):
        if args[0].shape[0] == 1:  # decode tokens (a prompt's hits are the slot table's own)
            dmap = module.lru.dmap.tolist()
            want[module.layer] += sum(dmap[e] >= 0 for e in args[1].reshape(-1).tolist())

    cache = make_cache(model, len(PROMPT) + len(STREAM))
    with torch.no_grad():
        model(torch.tensor([PROMPT]), cache)
        for x in model.offload.layers:
            x.reset_stats()
        handles = [x.register_forward_pre_hook(count) for x in model.offload.layers]
        for t in STREAM:
            forward(model, torch.tensor([[t]]), cache)
    for h in handles:
        h.remove()
    got = {x.layer: x.stats().hits for x in model.offload.layers}
    assert got == want and sum(want.values()) > 0
    A = model.config.num_experts_per_tok
    assert all(x.stats().hits + x.stats().misses == len(STREAM) * A for x in model.offload.layers)
    model.offload.close()


def test_a_prompt_goes_through_the_hosts_table_and_back(checkpoint):
    folder, _ = checkpoint
    model = direct_model(folder, "3")
    cache = make_cache(model, len(PROMPT) + 8)
    with torch.no_grad():
        for t in (7, 9, 11):
            forward(model, torch.tensor([[t]]), cache)
        device_before = [x.lru.owner.tolist() for x in model.offload.layers]
        x0 = model.offload.layers[0]
        x0.lru.to_table(x0.table)
        assert x0.table.expert_in == device_before[0]  # the table takes the device's placement
        model(torch.tensor([PROMPT[:5]]), cache)  # a prompt: streamed through the host's table
        for x in model.offload.layers:
            assert x.lru.dmap.tolist() == x.table.slot_of and x.lru.owner.tolist() == x.table.expert_in
            assert_consistent(x)
        forward(model, torch.tensor([[3]]), cache)
    model.offload.close()


def write_profile(folder, path) -> dict[str, list[float]]:
    """A made-up expert profile of the checkpoint (a ranking per layer), written to `path`: its frequencies."""
    import json

    probe = load_model(folder, dtype=torch.float32)
    E = probe.config.num_experts
    layers = [i for i, layer in enumerate(probe.model.layers) if hasattr(layer.mlp, "experts")]
    freq = {str(i): [float((e * 5 + i) % E) for e in range(E)] for i in layers}
    path.write_text(json.dumps({"format": "marco-expert-profile", "num_experts": E, "layers": freq}))
    return freq


def assert_hot_set_pinned(model, freq: dict[str, list[float]], hot: int) -> None:
    """Each layer's `hot` most frequent profile experts are pinned and resident on the device."""
    for x in model.offload.layers:
        ranked = sorted(range(x.num_experts), key=lambda e: -freq[str(x.layer)][e])
        assert sorted(x.misses.pinned) == sorted(ranked[:hot])
        dmap, pinned = x.lru.dmap.tolist(), x.lru.pinned.tolist()
        assert all(dmap[e] >= 0 and pinned[dmap[e]] for e in ranked[:hot])
        assert_consistent(x)


def test_a_static_profile_pins_its_hot_set(checkpoint, tmp_path):
    """With --expert-policy static the profile's most frequent experts (all but top-k of the slots) never leave."""
    folder, _ = checkpoint
    freq = write_profile(folder, tmp_path / "profile.json")
    top_k = load_model(folder, dtype=torch.float32).config.num_experts_per_tok
    model = direct_model(folder, str(top_k + 2), profile=str(tmp_path / "profile.json"), policy="static")
    teacher_forced(model)
    assert_hot_set_pinned(model, freq, 2)
    model.offload.close()
    with pytest.raises(MarcoError, match="least recently used"):
        direct_model(folder, "3", policy="lfu")


def test_direct_reads_need_cuda_from_the_cli(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    with pytest.raises(MarcoError, match="needs a CUDA device"):
        install(model, Placement(experts_resident="2", misses="direct"))


def test_simulated_direct_mode_is_an_lru_cache():
    trace = Trace(1, 16, 4, [Event(0, t, [[3, 7, 11, 15]]) for t in range(40)])
    sim = simulate_direct(trace, slots=4)
    assert (sim.hits, sim.misses) == (39 * 4, 4)
    cycling = Trace(1, 16, 2, [Event(0, t, [[t % 3, 10 + t % 3]]) for t in range(30)])  # 6 experts round robin
    assert simulate_direct(cycling, slots=4).hits == 0  # LRU's worst case: each expert evicted just before reuse


@torch.no_grad()
def check_direct_layer(inner, top_k: int, tokens: int = 8) -> None:
    """One stacked-experts module (bf16 stacks, bitsandbytes 4-bit, GGUF blocks) offloaded with direct reads: each
    token's output equals the unwrapped module's gathered path, and the cache stays consistent."""
    import copy

    from marco_local.offload import LRU, ExpertLayout, MemoryStore, OffloadedExperts

    reference = copy.deepcopy(inner)
    layout = ExpertLayout(inner, inner.num_experts)
    x = OffloadedExperts(inner, MemoryStore.from_module(inner, layout), 3, LRU())
    x.enable_direct(torch.zeros(top_k * layout.expert_bytes, dtype=torch.uint8), top_k)
    g = torch.Generator().manual_seed(0)
    D = inner.shapes["gate_proj"][1] if hasattr(inner, "shapes") else inner.gate_proj.shape[-1]
    for t in range(tokens):
        h = torch.randn(1, D, generator=g)
        pool = 4 if t % 2 else inner.num_experts  # some tokens reuse a few experts: hits as well as misses
        idx = torch.randperm(pool, generator=g)[:top_k].view(1, top_k)
        w = torch.rand(1, top_k, generator=g)
        torch.testing.assert_close(x(h, idx, w), reference.forward_gathered(h, idx, w), rtol=1e-6, atol=1e-6)
        assert_consistent(x)
    assert x.stats().hits > 0


def test_direct_reads_of_stacked_float_experts(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    check_direct_layer(model.model.layers[0].mlp.experts, model.config.num_experts_per_tok)


KERNEL_CHECK = """
import random
import torch
from marco_local.offload import direct

torch.manual_seed(0)
B = 4096 + 64 * 3  # not a whole number of the gather kernel's blocks: the mask matters
host = torch.randint(0, 256, (10, B), dtype=torch.uint8)
slots = torch.randint(0, 256, (4, B), dtype=torch.uint8)
kept = slots.clone()
src, ids = torch.tensor([2, -1, 0, -1, 3, -1]), torch.tensor([5, 9, 1, 0, 7, 4])
dst = torch.tensor([-1, 1, -1, -1, -1, -1])
got = torch.zeros(6, B, dtype=torch.uint8)
direct._gather_kernel()[(6, 2)](got.view(torch.int32), slots.view(torch.int32), host.view(torch.int32), src, ids, dst,
                                B // 4, BLOCK=1024)
for k in range(6):
    assert torch.equal(got[k], kept[src[k]] if src[k] >= 0 else host[ids[k]]), k
assert torch.equal(slots[1], host[9]) and torch.equal(slots[[0, 2, 3]], kept[[0, 2, 3]])

for E, S, K, pins in ((24, 7, 4, ()), (16, 3, 4, ()), (40, 16, 8, ((0, 5), (1, 9)))):
    rng = random.Random(E)
    dmap, owner = torch.full((E,), -1), torch.full((S,), -1)
    stamp, pinned = torch.full((S,), direct.EMPTY), torch.zeros(S, dtype=torch.int32)
    for slot, e in pins:
        dmap[e], owner[slot], pinned[slot] = slot, e, 1
    state = torch.zeros(2, dtype=torch.long)
    src, dst = torch.empty(K, dtype=torch.long), torch.empty(K, dtype=torch.long)
    ref = [dmap.tolist(), owner.tolist(), stamp.tolist(), [p != 0 for p in pinned.tolist()], state.tolist()]
    for t in range(150):
        ids = rng.sample(range(E) if t % 3 else range(E // 3), K)
        want = direct.route_reference(*ref, ids)
        direct._route_kernel()[(1,)](torch.tensor(ids), dmap, owner, stamp, pinned, state, src, dst, K, S,
                                     BK=direct._pow2(K), BS=direct._pow2(S))
        assert (src.tolist(), dst.tolist()) == want, t
        assert [dmap.tolist(), owner.tolist(), stamp.tolist(), state.tolist()] == [ref[0], ref[1], ref[2], ref[4]], t
print("ok")
"""


def test_the_triton_kernels_under_triton_s_interpreter():
    """The CUDA kernels themselves, run by triton's CPU interpreter (where triton is installed; a process of their
    own, as the interpreter is chosen when a kernel is built): the route kernel step by step against
    `route_reference` (LRU, fewer slots than experts per token, pinned slots), the gather kernel row by row."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from marco_local.offload.direct import _gather_kernel, _route_kernel

target = GPUTarget("cuda", 90, 32)
route = _route_kernel()
types = ["*i64"] * 4 + ["*i32"] + ["*i64"] * 3 + ["i32", "i32", "constexpr", "constexpr"]
for bk, bs in [(8, 256), (8, 8), (2, 1)]:
    source = ASTSource(route, dict(zip(route.arg_names, types, strict=True)), constexprs={"BK": bk, "BS": bs})
    assert triton.compile(source, target=target, options={"num_warps": 1}).asm["cubin"]
gather = _gather_kernel()
types = ["*i32"] * 3 + ["*i64"] * 3 + ["i32", "constexpr"]
aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 6)}
signature = dict(zip(gather.arg_names, types, strict=True))
source = ASTSource(gather, signature, constexprs={"BLOCK": 1024}, attrs=aligned)
ptx = triton.compile(source, target=target).asm["ptx"]
loads = [line for line in ptx.splitlines() if "ld.global" in line and ".b32" in line]
assert loads and all(".v4.b32" in line for line in loads), loads
print("ok")
"""


def test_the_triton_kernels_compile_for_an_h100():
    """The interpreter accepts code the compiler may not: both kernels are compiled here for sm_90 (no GPU needed;
    a process of its own, without the interpreter) at Marco's shapes (8 experts per token, 256 slots at most), and
    the gather's loads from aligned rows, which is what triton's launcher sees for 64-byte rows, are 16-byte vector
    loads, as a bus read wants."""
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_layer_holding_every_expert_leaves_direct_reads(checkpoint):
    """What install does on CUDA when the budget fits every expert (`load_all`): the layer maps ids to slots for
    good, so a prompt must not hand the host's table a direct-read state."""
    folder, _ = checkpoint
    want = teacher_forced(load_model(folder, dtype=torch.float32))
    model = direct_model(folder, "100%")
    for x in model.offload.layers:
        x.load_all()
        assert not x.direct and x.slot_map is not None
    torch.testing.assert_close(teacher_forced(model), want, rtol=1e-5, atol=1e-5)
    model.offload.close()
