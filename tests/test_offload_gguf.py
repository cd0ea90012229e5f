"""Expert offloading of a quantized GGUF model (qlinear's QExperts: per-expert data in lists and plain attributes):
the same tokens and bit-identical logits with one slot and with a few, in bf16 (int4 kernels) and f32 (exact path)."""

from __future__ import annotations

import pytest
import torch

from marco_local.generate import PromptCache, generate_step
from marco_local.offload import Placement, install, offload_stats
from marco_local.sampling import make_sampler

PROMPT = [5, 17, 33, 2, 91, 120, 7, 64, 250, 3, 44, 19, 8, 77, 150, 31, 200, 11, 96, 42]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waiting on a shared, oversubscribed CPU (100x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def greedy(model, steps: int = 10) -> list[int]:
    cache = PromptCache(model.make_cache(len(PROMPT) + steps))
    return list(generate_step(model, PROMPT, cache, make_sampler(0.0), max_tokens=steps, prefill_step_size=8))


@torch.inference_mode()
def prefill_logits(model) -> torch.Tensor:
    return model(torch.tensor([PROMPT]), model.make_cache(len(PROMPT)))


@pytest.fixture(scope="module")
def q4_path(make_checkpoint, tmp_path_factory):
    from marco_local.checkpoint import Checkpoint
    from marco_local.config import load_config
    from quant.gguf_writer import write_gguf

    shape = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=512, num_hidden_layers=2)
    folder, _ = make_checkpoint("offload-q4", seed=7, head_dim=64, **shape)
    path = tmp_path_factory.mktemp("gguf") / "q4.gguf"
    write_gguf(Checkpoint(folder), load_config(folder), folder, path, "q4_k_m")
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_gguf_experts_offload_identically(q4_path, dtype):
    from marco_local.gguf_loader import load_gguf

    plain, _ = load_gguf(q4_path, dtype=dtype, device=torch.device("cpu"))
    want, logits = greedy(plain), prefill_logits(plain)
    for slots in ("1", "3"):
        model, _ = load_gguf(q4_path, dtype=dtype, device=torch.device("cpu"))
        install(model, Placement(experts_resident=slots), files=[q4_path])
        assert greedy(model) == want
        assert torch.equal(prefill_logits(model), logits)
        assert offload_stats(model)["expert_slots_per_layer"] == int(slots)


def test_ram_budget_with_experts_held_in_ram_is_refused_clearly(q4_path):
    from marco_local.errors import MarcoError
    from marco_local.gguf_loader import load_gguf

    model, _ = load_gguf(q4_path, dtype=torch.bfloat16, device=torch.device("cpu"))
    with pytest.raises(MarcoError, match="cannot stay in the file"):
        install(model, Placement(ram_mem="1GiB"), files=[q4_path])
