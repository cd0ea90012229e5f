"""The captured CUDA decode step (marco_local/decode/cuda_graphs.py).

On the CPU the decoder's segments run eagerly: the fixed-shape step (one segment for a resident model, cut at each
offloaded MoE layer otherwise) is checked against `forward` in float32 (1e-5), with the "gqa4-denselayer" fixture
too (one dense layer). On a CUDA device: the graphed decoder's greedy tokens equal the eager model's over a run that
crosses windows, its logits match step by step (1e-4, float32: other kernels), resident and offloaded.
"""

from __future__ import annotations

import pytest
import torch

from marco_local.decode import decode_step, set_decode_step
from marco_local.decode.cuda_graphs import GraphedDecoder, window_for
from marco_local.errors import MarcoError
from marco_local.generate import PromptCache, generate_step
from marco_local.layers.kv_cache import make_cache
from marco_local.load.checkpoint import load_model
from marco_local.load.offloaded import load_offloaded
from marco_local.offload import Placement
from marco_local.sampling import make_sampler

PROMPT = [5, 17, 33, 2, 91, 120, 7, 64, 250, 3, 44, 19]
STREAM = [9, 100, 3, 77, 250, 1, 42, 8, 19, 64, 5, 200, 31, 6, 90, 11, 2, 150, 7, 33, 18]


def test_window_is_a_power_of_two_above_the_position_and_within_the_cache():
    assert window_for(0, 4096) == 256
    assert window_for(255, 4096) == 256
    assert window_for(256, 4096) == 512
    assert window_for(3000, 4096) == 4096
    assert window_for(300, 400) == 400
    assert window_for(5, 100, min_window=4) == 8


def lockstep(model, decoder: GraphedDecoder, steps: list[int], tol: float = 1e-5) -> None:
    """Feed the same tokens to the eager forward and to the decoder's step (on the CPU its segments run eagerly),
    each on its own cache: logits agree at every step (float32) and so do the caches."""
    device = model.model.norm.weight.device
    eager, static = make_cache(model, 48), make_cache(model, 48)
    static.keys.zero_(), static.values.zero_()  # masked positions must be finite (KVCache zero-fills on CUDA)
    model(torch.tensor([PROMPT], device=device), eager)
    model(torch.tensor([PROMPT], device=device), static)
    for token in steps:
        t = torch.tensor([[token]], device=device)
        set_decode_step(model, None)
        want = model(t, eager)  # the eager forward
        got = decoder(t, static)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    n = eager.offset
    assert static.offset == n
    torch.testing.assert_close(static.keys[:, :, :, :n], eager.keys[:, :, :, :n], rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", ["base", "gqa4-denselayer"])
@torch.no_grad()
def test_resident_step_matches_forward(make_checkpoint, shape):
    """One segment: the whole step in fixed shapes (windows 16 -> 32 -> 48 on the way)."""
    overrides = {} if shape == "base" else dict(num_key_value_heads=1, mlp_only_layers=[1])
    folder, _ = make_checkpoint(shape, seed=len(shape), **overrides)
    model = load_model(folder, dtype=torch.float32)
    decoder = GraphedDecoder(model, min_window=8)
    assert decoder.cuts == []
    lockstep(model, decoder, STREAM)


@pytest.mark.parametrize("shape", ["base", "gqa4-denselayer"])
@pytest.mark.parametrize("slots", ["2", "5"])
@torch.no_grad()
def test_offloaded_step_matches_forward(make_checkpoint, shape, slots):
    """Cut at each offloaded MoE layer: the host makes the routed experts resident between segments (2 slots = the
    top-k: every new expert evicts). Same logits as the offloaded model's own forward, with misses and prefetch."""
    overrides = {} if shape == "base" else dict(num_key_value_heads=1, mlp_only_layers=[1])
    folder, _ = make_checkpoint(shape, seed=len(shape), **overrides)
    model = load_offloaded(folder, Placement(experts_resident=slots, prefetch=True), torch.float32, "cpu")
    decoder = GraphedDecoder(model, min_window=8)
    moe_layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    assert decoder.cuts == moe_layers and len(moe_layers) == (3 if shape == "base" else 2)
    placed = {x.layer: 0 for x in model.offload.layers}
    for x in model.offload.layers:

        def counted(row, h, guess=None, x=x, inner=x.slots_for_token):
            placed[x.layer] += 1
            return inner(row, h, guess)

        x.slots_for_token = counted
    lockstep(model, decoder, STREAM)
    assert placed == {i: len(STREAM) for i in moe_layers}  # the host's part ran once per cut per step
    stats = model.offload.stats()
    assert stats.misses > 0 and stats.prefetch_precision is not None
    model.offload.close()


@torch.no_grad()
def test_the_decoder_prefetches_from_guesses_made_in_its_segments(checkpoint):
    """With prefetch, a segment also leaves the next layer's guessed experts for the host (read with the routing in
    one wait). The decoder then caches, prefetches and scores exactly as the forward does on the same tokens."""
    folder, _ = checkpoint
    stats = []
    for use_decoder in (False, True):
        model = load_offloaded(folder, Placement(experts_resident="2", prefetch=True), torch.float32, "cpu")
        decoder = GraphedDecoder(model, min_window=8)
        assert all(decoder.speculates[:-1]) and not decoder.speculates[-1]  # the last MoE layer has no next
        cache = make_cache(model, len(PROMPT) + len(STREAM))
        cache.keys.zero_(), cache.values.zero_()
        model(torch.tensor([PROMPT]), cache)
        model.offload.reset_stats()
        for token in STREAM:
            t = torch.tensor([[token]])
            decoder(t, cache) if use_decoder else model(t, cache)
        st = model.offload.stats()
        stats.append({"hits": st.hits, "misses": st.misses, "precision": st.prefetch_precision,
                      "recall": st.prefetch_recall})  # fmt: skip
        model.offload.close()
    assert stats[0] == stats[1] and stats[0]["precision"] is not None


@pytest.mark.parametrize("full", ["all", "first"])
@torch.no_grad()
def test_layers_holding_every_expert_are_not_cut(checkpoint, full):
    """A layer whose slots hold every expert (`load_all`, what install does on CUDA when the budget fits them all)
    maps ids to slots on the device: no cut there, and the step still matches the forward; its token counts as hits."""
    folder, _ = checkpoint
    model = load_offloaded(folder, Placement(experts_resident="100%"), torch.float32, "cpu")
    layers = model.offload.layers
    for x in layers if full == "all" else layers[:1]:
        x.load_all()
    decoder = GraphedDecoder(model, min_window=8)
    moe_layers = [x.layer for x in layers]
    assert decoder.cuts == ([] if full == "all" else moe_layers[1:])
    assert decoder.full == (layers if full == "all" else layers[:1])
    assert GraphedDecoder.capturable(model)
    lockstep(model, decoder, STREAM)
    model.offload.reset_stats()
    cache = make_cache(model, 8)
    cache.keys.zero_(), cache.values.zero_()
    for token in (5, 9, 13):
        decoder(torch.tensor([[token]]), cache)
    A = model.config.num_experts_per_tok
    for x in layers:  # every layer counts each token's experts once, the full ones as hits
        st = x.stats()
        assert st.hits + st.misses == 3 * A and (st.misses == 0 or x not in decoder.full)
    model.offload.close()


def test_a_decoder_used_in_and_out_of_inference_mode(checkpoint):
    """generate() decodes under torch.inference_mode, a caller may not: buffers made in one (a window's mask) are
    written in the other, which torch forbids for inference tensors unless the step itself runs in inference mode."""
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    decoder = GraphedDecoder(model, min_window=8)
    cache = make_cache(model, 16)
    cache.keys.zero_(), cache.values.zero_()
    with torch.no_grad():
        model(torch.tensor([PROMPT[:3]]), cache)
    with torch.inference_mode():
        first = decoder(torch.tensor([[5]]), cache)
    with torch.no_grad():
        second = decoder(torch.tensor([[6]]), cache)  # the same window (8): its mask is rewritten
    assert torch.isfinite(first).all() and torch.isfinite(second).all() and cache.offset == 5


@torch.no_grad()
def test_a_chat_that_trims_and_refills_the_cache(checkpoint):
    """A chat reuses one cache: decode, drop the last tokens (a regenerated reply), prefill a new turn, decode on.
    Positions written before a trim stay in the window under the mask; the decoder agrees with the forward
    throughout, and says when the context is full, as the forward does."""
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    decoder = GraphedDecoder(model, min_window=8)
    eager, static = make_cache(model, 32), make_cache(model, 32)
    static.keys.zero_(), static.values.zero_()
    for cache in (eager, static):
        model(torch.tensor([PROMPT]), cache)

    def step(token: int) -> None:
        want = model(torch.tensor([[token]]), eager)
        torch.testing.assert_close(decoder(torch.tensor([[token]]), static), want, rtol=1e-5, atol=1e-5)

    for token in STREAM[:6]:
        step(token)
    for cache in (eager, static):
        cache.trim(4)
        model(torch.tensor([[40, 41, 42]]), cache)  # a new turn's tokens, prefilled by the forward
    for token in STREAM[6:21]:  # 12 + 6 - 4 + 3 + 15 = the 32 positions
        step(token)
    assert static.offset == eager.offset == 32
    with pytest.raises(MarcoError, match="context window full"):
        decoder(torch.tensor([[1]]), static)


def test_cpu_models_are_not_graphed(checkpoint):
    folder, _ = checkpoint
    assert not GraphedDecoder.supports(load_model(folder, dtype=torch.float32))


def greedy(model, steps: int) -> list[int]:
    cache = PromptCache(make_cache(model, len(PROMPT) + steps))
    return list(generate_step(model, PROMPT, cache, make_sampler(0.0), max_tokens=steps, prefill_step_size=8))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@torch.no_grad()
def test_graphed_decode_matches_eager_on_cuda(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32, device="cuda")
    assert GraphedDecoder.supports(model)
    want = greedy(model, 40)  # eager
    decoder = GraphedDecoder(model, min_window=16)
    set_decode_step(model, decoder)
    assert greedy(model, 40) == want
    assert decoder.captures >= 3 and not decoder.failed  # windows 16 (first steps), 32, 52 (= the cache length)
    lockstep(model, decoder, STREAM, tol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("slots", ["2", "5", "8"])
@torch.no_grad()
def test_graphed_offloaded_decode_matches_eager_on_cuda(checkpoint, slots):
    folder, _ = checkpoint
    model = load_offloaded(folder, Placement(experts_resident=slots, prefetch=True), torch.float32, "cuda")
    assert GraphedDecoder.supports(model)
    want = greedy(model, 40)
    decoder = GraphedDecoder(model, min_window=16)
    set_decode_step(model, decoder)
    assert greedy(model, 40) == want
    full = slots == "8"  # every expert fits: loaded at install, no cut (and no miss after it)
    assert decoder.captures >= 3 and not decoder.failed and len(decoder.cuts) == (0 if full else 3)
    lockstep(model, decoder, STREAM, tol=1e-4)
    assert (model.offload.stats().misses == 0) == full
    model.offload.close()
    fewer = load_offloaded(folder, Placement(experts_resident="1", misses="copy"), torch.float32, "cuda")
    assert not GraphedDecoder.supports(fewer)  # a token's experts do not fit its slots: the eager streaming path
    direct = load_offloaded(folder, Placement(experts_resident="1"), torch.float32, "cuda")
    assert GraphedDecoder.supports(direct)  # auto reads misses in place: any number of slots, one graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runtime_attaches_the_graphed_decoder_on_cuda(checkpoint):
    from marco_local.runtime import load

    folder, _ = checkpoint
    loaded = load(str(folder), dtype="f32", device="cuda")
    assert isinstance(decode_step(loaded.model), GraphedDecoder) and decode_step(loaded.model).cuts == []
    loaded = load(str(folder), dtype="f32", device="cuda", placement=Placement(experts_resident="2"))
    assert isinstance(decode_step(loaded.model), GraphedDecoder) and decode_step(loaded.model).cuts == []  # direct
    loaded = load(str(folder), dtype="f32", device="cuda", placement=Placement(experts_resident="2", misses="copy"))
    assert isinstance(decode_step(loaded.model), GraphedDecoder) and len(decode_step(loaded.model).cuts) == 3
