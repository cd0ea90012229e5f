"""Disk tier (CPU-only): a model whose experts are several times `--ram-mem` runs with its experts read from the
checkpoint file, gives the same tokens as the fully loaded model, and its resident memory stays within the budget.

Measured in a fresh subprocess: the peak RSS (VmHWM, reset after warming the runtime) minus the RSS before loading must
stay below the budget itself. Activations and the allocator's slack (~8 MiB here) come out of the budget's working
reserve; MARGIN only absorbs run-to-run jitter. The file's pages sit in the OS page cache, which is not
the process's RSS: experts are read with os.preadv, never through an mmap.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from marco_local.demo import write_tokenizer_files
from marco_local.generate import PromptCache, generate_step
from marco_local.layers.kv_cache import make_cache
from marco_local.load.checkpoint import load_model
from marco_local.sampling import make_sampler

MARGIN = 1 << 20
BUDGET = 32 << 20
CONFIG = {
    "model_type": "qwen3_moe",
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 64,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,  # random tied embeddings make a random model repeat its input
    "torch_dtype": "bfloat16",
}
PROMPT = list(range(3, 40))
STEPS = 16


def write_random_checkpoint(folder: Path, tok, cfg: dict, seed: int = 0) -> None:
    """A bf16 qwen3_moe checkpoint in transformers 4.x's per-expert layout, random weights (router widened)."""
    g = torch.Generator().manual_seed(seed)
    D, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def w(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale / shape[-1] ** 0.5).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    cfg = {**cfg, "vocab_size": tok.get_vocab_size(), "eos_token_id": tok.token_to_id("<|im_end|>")}
    tensors = {"model.embed_tokens.weight": w(cfg["vocab_size"], D, scale=D**0.5), "model.norm.weight": norm(D)}
    tensors["lm_head.weight"] = w(cfg["vocab_size"], D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": norm(D),
            p + "post_attention_layernorm.weight": norm(D),
            p + "self_attn.q_proj.weight": w(H * hd, D),
            p + "self_attn.k_proj.weight": w(KV * hd, D),
            p + "self_attn.v_proj.weight": w(KV * hd, D),
            p + "self_attn.o_proj.weight": w(D, H * hd),
            p + "self_attn.q_norm.weight": norm(hd),
            p + "self_attn.k_norm.weight": norm(hd),
            p + "mlp.gate.weight": w(E, D, scale=3.0),
        }
        for e in range(E):
            q = f"{p}mlp.experts.{e}."
            tensors |= {q + "gate_proj.weight": w(I, D), q + "up_proj.weight": w(I, D), q + "down_proj.weight": w(D, I)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))
    write_tokenizer_files(tok, folder)


MEASURE = textwrap.dedent(
    """
    import gc, json, sys, torch
    torch.set_num_threads(1)
    from marco_local.config import ModelConfig
    from marco_local.models.qwen3_moe import Qwen3MoeForCausalLM
    from marco_local.generate import PromptCache, generate_step
    from marco_local.layers.kv_cache import make_cache
    from marco_local.load.offloaded import load_offloaded
    from marco_local.offload import Placement, offload_stats
    from marco_local.sampling import make_sampler

    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def greedy(model):
        cache = PromptCache(make_cache(model, len(prompt) + steps))
        return list(generate_step(model, prompt, cache, make_sampler(0.0), max_tokens=steps, prefill_step_size=16))

    folder, budget, prompt, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    # warm the runtime on a one-layer model of the same shapes first: torch's lazily loaded meta kernels, oneDNN's
    # per-shape kernels and OpenMP buffers are the runtime's cost, paid once per process, not the model's memory
    tiny = ModelConfig("qwen3_moe", 400, 256, 1, 4, 2, 4, 4, 512, head_dim=64)  # the big model's shapes
    with torch.device("meta"):
        Qwen3MoeForCausalLM(tiny)
    warm = Qwen3MoeForCausalLM(tiny).to(torch.bfloat16)
    with torch.no_grad():
        for p in warm.parameters():
            p.normal_(0, 0.1)
    greedy(warm)
    del warm
    gc.collect()
    base = rss("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    model = load_offloaded(folder, Placement(ram_mem=budget, ctx=128), dtype=torch.bfloat16)
    tokens = greedy(model)
    st = offload_stats(model)
    stats = {"fixed": st.fixed_bytes, "fast": st.fast_bytes, "resident": st.resident_fraction, "misses": st.misses}
    print(json.dumps({"base": base, "peak": rss("VmHWM:"), "end": rss("VmRSS:"), "tokens": tokens, "stats": stats}))
    """
)


@pytest.fixture(scope="module")
def big(tmp_path_factory, tokenizer_obj):
    folder = tmp_path_factory.mktemp("offload-disk")
    write_random_checkpoint(folder, tokenizer_obj, CONFIG)
    return folder


def test_experts_larger_than_the_budget_run_from_disk_within_it(big):
    experts = 3 * CONFIG["hidden_size"] * CONFIG["moe_intermediate_size"] * 2 * CONFIG["num_experts"] * 4
    assert experts > 5 * BUDGET
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = load_model(big, dtype=torch.bfloat16)
        cache = PromptCache(make_cache(plain, len(PROMPT) + STEPS))
        want = list(generate_step(plain, PROMPT, cache, make_sampler(0.0), max_tokens=STEPS, prefill_step_size=16))
        del plain
    finally:
        torch.set_num_threads(n)
    args = [sys.executable, "-c", MEASURE, str(big), str(BUDGET), json.dumps(PROMPT), str(STEPS)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["tokens"] == want
    stats = got["stats"]
    assert stats["fixed"] + stats["fast"] <= BUDGET
    assert stats["resident"] < 0.25 and stats["misses"] > 0
    grown = got["peak"] - got["base"]
    print(f"RSS: +{grown / 2**20:.1f} MiB peak over the warmed runtime, budget {BUDGET >> 20} MiB")
    assert grown <= BUDGET + MARGIN, f"RSS grew {grown / 2**20:.1f} MiB, budget {BUDGET >> 20} MiB + margin"
