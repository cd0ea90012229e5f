"""The captured CUDA decode step (marco_local/cuda_graphs.py).

`forward_at`, the fixed-shape step a graph captures, is checked on the CPU against `forward` in float32 (1e-5), with
the "gqa4-denselayer" fixture too (one dense layer). On a CUDA device: the graphed decoder's greedy tokens equal the
eager model's over a run that crosses windows, its logits match step by step (1e-4, float32: other kernels), and
models with host-side paths (offloaded experts) are refused.
"""

from __future__ import annotations

import pytest
import torch

from marco_local.cuda_graphs import GraphedDecoder, window_for
from marco_local.generate import PromptCache, generate_step
from marco_local.loader import load_model
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


@pytest.mark.parametrize("shape", ["base", "gqa4-denselayer"])
@torch.no_grad()
def test_forward_at_matches_forward(make_checkpoint, shape):
    overrides = {} if shape == "base" else dict(num_key_value_heads=1, mlp_only_layers=[1])
    folder, _ = make_checkpoint(shape, seed=len(shape), **overrides)
    model = load_model(folder, dtype=torch.float32)
    eager, static = model.make_cache(48), model.make_cache(48)
    static.keys.zero_(), static.values.zero_()  # masked positions must be finite (KVCache zero-fills on CUDA)
    model(torch.tensor([PROMPT]), eager)
    model(torch.tensor([PROMPT]), static)
    cos, sin = model.rotary(0, 48, torch.float32, torch.device("cpu"))
    for token in STREAM:
        want = model(torch.tensor([[token]]), eager)
        window = window_for(static.offset, static.max_len, min_window=8)
        got = model.forward_at(torch.tensor([[token]]), torch.tensor([static.offset]), cos, sin, static, window)
        static.advance(1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    n = eager.offset
    torch.testing.assert_close(static.keys[:, :, :, :n], eager.keys[:, :, :, :n], rtol=1e-5, atol=1e-5)


def test_cpu_models_are_not_graphed(checkpoint):
    folder, _ = checkpoint
    assert not GraphedDecoder.supports(load_model(folder, dtype=torch.float32))


def greedy(model, steps: int) -> list[int]:
    cache = PromptCache(model.make_cache(len(PROMPT) + steps))
    return list(generate_step(model, PROMPT, cache, make_sampler(0.0), max_tokens=steps, prefill_step_size=8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_graphed_decode_matches_eager_on_cuda(checkpoint):
    from marco_local.offload import Placement, install

    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32, device="cuda")
    assert GraphedDecoder.supports(model)
    want = greedy(model, 40)  # eager
    decoder = GraphedDecoder(model, min_window=16)
    model.decode_step = decoder
    assert greedy(model, 40) == want
    assert decoder.captures >= 3  # windows 16 (first steps), 32, 52 (= the cache length)

    eager, graphed = model.make_cache(64), model.make_cache(64)
    model(torch.tensor([PROMPT], device="cuda"), eager)
    model(torch.tensor([PROMPT], device="cuda"), graphed)
    for token in STREAM:
        t = torch.tensor([[token]], device="cuda")
        model.decode_step = None
        a = model(t, eager)
        model.decode_step = decoder
        b = model(t, graphed)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert graphed.offset == eager.offset

    install(model, Placement(experts_resident="2"))
    assert not GraphedDecoder.supports(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runtime_attaches_the_graphed_decoder_on_cuda(checkpoint):
    from marco_local.runtime import load

    folder, _ = checkpoint
    loaded = load(str(folder), dtype="f32", device="cuda")
    assert isinstance(loaded.model.decode_step, GraphedDecoder)
