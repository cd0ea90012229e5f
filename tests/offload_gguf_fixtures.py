"""Shared by the GGUF offloading tests: a tiny q4_k_m GGUF fixture, a fixed prompt, greedy and prefill helpers."""

from __future__ import annotations

import pytest
import torch

from marco_local.decode import forward
from marco_local.generate import PromptCache, generate_step
from marco_local.layers.kv_cache import make_cache
from marco_local.sampling import make_sampler

PROMPT = [5, 17, 33, 2, 91, 120, 7, 64, 250, 3, 44, 19, 8, 77, 150, 31, 200, 11, 96, 42]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waiting on a shared, oversubscribed CPU (100x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def greedy(model, prompt=PROMPT, steps: int = 10) -> list[int]:
    cache = PromptCache(make_cache(model, len(prompt) + steps))
    return list(generate_step(model, prompt, cache, make_sampler(0.0), max_tokens=steps, prefill_step_size=8))


@torch.inference_mode()
def prefill_logits(model) -> torch.Tensor:
    return model(torch.tensor([PROMPT]), make_cache(model, len(PROMPT)))


@torch.inference_mode()
def decode_logits(model, steps: int = 4) -> torch.Tensor:
    """The logits of single-token steps after the prompt (the decode path, which a prefill does not take)."""
    cache = make_cache(model, len(PROMPT) + steps)
    model(torch.tensor([PROMPT]), cache)
    return torch.cat([forward(model, torch.tensor([[PROMPT[i]]]), cache) for i in range(steps)])


def write_q4(make_checkpoint, tmp_path_factory, name: str, **overrides):
    from marco_local.config import load_config
    from marco_local.formats.checkpoint import Checkpoint
    from quant.gguf_writer import write_gguf

    shape = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=512, num_hidden_layers=2)
    folder, _ = make_checkpoint(name, seed=7, head_dim=64, **shape, **overrides)
    path = tmp_path_factory.mktemp("gguf") / "q4.gguf"
    write_gguf(Checkpoint(folder), load_config(folder), folder, path, "q4_k_m")
    return path


@pytest.fixture(scope="module")
def q4_path(make_checkpoint, tmp_path_factory):
    return write_q4(make_checkpoint, tmp_path_factory, "offload-q4")


@pytest.fixture(scope="module")
def q4_top4_path(make_checkpoint, tmp_path_factory):
    """Four experts per token: their sum in bf16 depends on its order (a sum of two would not)."""
    return write_q4(make_checkpoint, tmp_path_factory, "offload-q4-top4", num_experts_per_tok=4)


@pytest.fixture
def int4_kernels(monkeypatch):
    """Pin qlinear's torch int4 path (the one used without the native kernels)."""
    from marco_local.kernels import native

    monkeypatch.setattr(native, "supports", lambda ggml_type: False)


def native_or_skip():
    from marco_local.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
