"""Every GGUF tensor type the quantizer writes, run through the GGUF loader on a qwen3moe fixture.

Per type: our logits against transformers on the same dequantized weights (float32: the exact path, tight; bf16:
qlinear's int4 kernels, stated bounds), and the KL divergence from the unquantized model (figures recorded below).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
from pathlib import Path

import gguf
import pytest
import torch
from gguf_fixtures import dequantized_state_dict, ids_batch, kl, rel_err, requantize, write_moe_f32

from marco_local.decode import decode_step, set_decode_step
from marco_local.formats.gguf import GGUFFile
from marco_local.kernels import native
from marco_local.layers.kv_cache import make_cache
from marco_local.load.gguf import build_model, load_gguf
from marco_local.models.qwen3_moe import Experts

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]

# Float reference (transformers on the same dequantized weights), float32 activations: the loader's exact path.
F32_REL_TOL = 1e-4
# bf16 activations take the native kernels (activations quantized to int8 blocks, as llama.cpp does) or, without
# them, qlinear's int4 kernels (scales in bf16, activations and outputs rounded to bf16). A max-error bound is the
# wrong check there: rounding flips a near-tie in the top-k routing at one or two positions, which moves those logits
# by up to ~0.4 of max |logit|. So: median over positions of max |diff| / max |ref|, and the KL divergence from the
# dequantized float reference (measured, native: median 1.2e-2 - 2.9e-2, KL 1.5e-4 - 1.04e-2 (Q4_K); int4: median
# 1.2e-2 - 1.9e-2, KL 1.5e-4 - 5.6e-3). The KL from the unquantized model is the same for both (figures below).
BF16_MEDIAN_TOL = 0.04
BF16_KL_TOL = 0.02
# KL(unquantized transformers || ours) per token, mean over 2 x 24 positions, float32 activations, measured on this
# fixture (2 layers, random weights, vocabulary 400): the bound is a few times the measured figure.
# Measured (nats/token; float32 path, bf16 path): F32 2.2e-14, 1.6e-4 | F16 5.2e-7, 1.7e-4 | BF16 3.8e-5, 1.7e-4 |
# Q8_0 3.3e-3, 3.5e-3 | Q6_K 8.0e-3, 4.7e-3 | Q5_K 2.6e-2, 2.5e-2 | Q5_1 3.0e-2, 3.0e-2 | Q5_0 3.8e-2, 3.5e-2 |
# Q4_K 7.1e-2, 6.7e-2 | Q4_0 1.03e-1, 1.03e-1 | Q4_1 1.05e-1, 1.04e-1. A random 2-layer MoE has no redundancy and
# routing near-ties, so these are larger than on a trained model; the order (more bits, less divergence) is the check.
KL_BOUND = {
    "F32": 1e-9,
    "F16": 5e-6,
    "BF16": 2e-4,
    "Q8_0": 1e-2,
    "Q6_K": 2.5e-2,
    "Q5_K": 6e-2,
    "Q5_1": 6e-2,
    "Q5_0": 8e-2,
    "Q4_K": 0.15,
    "Q4_0": 0.2,
    "Q4_1": 0.2,
}


@pytest.fixture(scope="module")
def moe_f32(make_checkpoint, tmp_path_factory):
    return write_moe_f32(make_checkpoint, tmp_path_factory)


@pytest.fixture(scope="module")
def moe_typed(moe_f32, tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(ggml_type: str) -> Path:
        if ggml_type not in cache:
            cache[ggml_type] = tmp_path_factory.mktemp("gguf") / f"fixture-{ggml_type}.gguf"
            requantize(moe_f32[2], cache[ggml_type], ggml_type)
        return cache[ggml_type]

    return get


# the types the native kernels read run once per kernel tier (marco_local/native), the others once
TYPE_TIERS = [(t, None) for t in TYPES[:3]] + [(t, tier) for t in TYPES[3:] for tier in native.supported_tiers()]


def kernel_tier(tier: str | None):
    """Pin the native tier for a test, or skip it where this CPU cannot run it; without native kernels, one of the
    tiers' runs goes through torch's kernels instead."""
    if tier is None:
        return contextlib.nullcontext()
    if not native.available():
        if tier != "portable":
            pytest.skip("no native kernels: run once, on torch's")
        return contextlib.nullcontext()
    if tier not in native.supported_tiers():
        pytest.skip(f"this CPU cannot run the {tier} kernels")
    return native.use_tier(tier)


@pytest.fixture(scope="module")
def tier_free(moe_f32, moe_typed):
    """Per type, what does not depend on the kernel tier, computed once: the dequantized reference's and the
    unquantized model's logits; the dense model (what CUDA runs) is checked here."""
    from transformers import Qwen3MoeForCausalLM

    cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(ggml_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        if ggml_type in cache:
            return cache[ggml_type]
        _, unquantized, _ = moe_f32
        path = moe_typed(ggml_type)
        g = GGUFFile(path)
        assert g.tensors["blk.0.ffn_down_exps.weight"].type_name == ggml_type
        assert g.tensors["blk.0.ffn_gate_inp.weight"].type_name == "F32"
        reference = copy.deepcopy(unquantized)
        reference.load_state_dict(dequantized_state_dict(path, unquantized))
        assert isinstance(reference, Qwen3MoeForCausalLM)
        ids = ids_batch(unquantized.config.vocab_size)
        with torch.no_grad():
            expected = reference(ids).logits
            exact = unquantized(ids).logits
            dense = build_model(g, dtype=torch.float32, dense=True)  # dequantized once into plain modules
            got_dense = dense(ids, make_cache(dense, 32, batch_size=2))
        assert rel_err(got_dense, expected) < F32_REL_TOL
        assert type(dense.model.layers[0].mlp.experts) is Experts and type(dense.lm_head) is torch.nn.Linear
        cache[ggml_type] = expected, exact
        return cache[ggml_type]

    return get


@pytest.mark.parametrize("ggml_type,tier", TYPE_TIERS)
def test_moe_type_against_dequantized_reference_and_kl(ggml_type, tier, moe_f32, moe_typed, tier_free):
    _, unquantized, _ = moe_f32
    path = moe_typed(ggml_type)
    expected, exact = tier_free(ggml_type)
    ids = ids_batch(unquantized.config.vocab_size)
    with torch.no_grad(), kernel_tier(tier):
        model, _ = load_gguf(path, dtype=torch.float32)
        got = model(ids, make_cache(model, 32, batch_size=2))
        model16, _ = load_gguf(path, dtype=torch.bfloat16)
        got16 = model16(ids, make_cache(model16, 32, batch_size=2)).float()
    assert rel_err(got, expected) < F32_REL_TOL
    per_position = (got16 - expected).abs().amax(-1) / expected.abs().amax()
    assert per_position.median() < BF16_MEDIAN_TOL and kl(expected, got16) < BF16_KL_TOL
    divergence = kl(exact, got)
    print(
        f"\nFIGURES {ggml_type} {tier} f32-rel {rel_err(got, expected):.2e} bf16-median {per_position.median():.2e} "
        f"bf16-max {per_position.max():.2e} bf16-KL-vs-dequant {kl(expected, got16):.2e} "
        f"KL-f32 {divergence:.3e} KL-bf16 {kl(exact, got16):.3e}"
    )
    assert divergence < KL_BOUND[ggml_type], f"{ggml_type}: KL {divergence:.3g}"


def greedy_tokens(model, ids: torch.Tensor, steps: int = 16) -> list[int]:
    """Greedy continuation of `ids` (on the model's device), one token per step."""
    cache, out, x = make_cache(model, ids.shape[1] + steps + 12), [], ids
    for _ in range(steps):
        x = model(x, cache)[:, -1:].argmax(-1)
        out.append(int(x))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K", "Q8_0"])
@torch.no_grad()
def test_gguf_on_cuda(ggml_type, moe_f32, moe_typed):
    """A GGUF on CUDA: dequantized once into plain modules, decoded from CUDA graphs; the dense CPU model's logits
    (float32, on the GPU's kernels: 1e-4) and its greedy tokens."""
    from marco_local.decode.cuda_graphs import GraphedDecoder
    from marco_local.runtime import load

    path = moe_typed(ggml_type)
    cpu = build_model(GGUFFile(path), dtype=torch.float32, dense=True)
    loaded = load(str(path), dtype="f32", device="cuda")
    assert isinstance(decode_step(loaded.model), GraphedDecoder)
    ids = ids_batch(cpu.config.vocab_size, shape=(1, 12))
    want = cpu(ids, make_cache(cpu, 32))
    got = loaded.model(ids.cuda(), make_cache(loaded.model, 32)).cpu()
    assert rel_err(got, want) < 1e-4
    assert greedy_tokens(cpu, ids) == greedy_tokens(loaded.model, ids.cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("experts", ["quantized", "offloaded", "direct"])
@torch.no_grad()
def test_gguf_experts_kept_quantized_on_cuda(ggml_type, experts, moe_f32, moe_typed):
    """A GGUF on CUDA with its experts as the file's blocks (gguf_experts.py): on the GPU, or offloaded (blocks in
    pinned host RAM, 2 slots per layer; "direct": misses read in place, no cut). Decoded from CUDA graphs; the dense
    CPU model's logits (float32, 1e-4) and greedy tokens."""
    from marco_local.decode.cuda_graphs import GraphedDecoder
    from marco_local.layers.gguf_cuda import StackedGGUFExperts
    from marco_local.offload import Placement, install

    path = moe_typed(ggml_type)
    cpu = build_model(GGUFFile(path), dtype=torch.float32, dense=True)
    kept = "quantized" if experts == "quantized" else "host"
    model, _ = load_gguf(path, dtype=torch.float32, device=torch.device("cuda"), cuda_experts=kept)
    inner = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert all(isinstance(e, StackedGGUFExperts) for e in inner)
    if experts in ("offloaded", "direct"):
        install(model, Placement(experts_resident="2", misses="direct" if experts == "direct" else "copy"))
        assert model.offload.layers[0].store.rows.is_pinned()
        assert model.offload.layers[0].direct == (experts == "direct")
    else:
        assert inner[0].gate_proj_raw.is_cuda
    assert GraphedDecoder.supports(model)
    set_decode_step(model, GraphedDecoder(model, min_window=16))
    ids = ids_batch(cpu.config.vocab_size, shape=(1, 12))
    want = cpu(ids, make_cache(cpu, 32))
    got = model(ids.cuda(), make_cache(model, 32)).cpu()
    assert rel_err(got, want) < 1e-4
    assert greedy_tokens(cpu, ids) == greedy_tokens(model, ids.cuda())
    assert not decode_step(model).failed
    if experts == "direct":
        assert decode_step(model).cuts == [] and model.offload.stats().misses > 0


def test_llama_quantize_q4_k_m_mix(moe_f32, tmp_path):
    """A llama-quantize Q4_K_M file: per-tensor type mix (experts of one layer in different types) runs exactly."""
    llama_cpp = pytest.importorskip("llama_cpp")
    _, unquantized, src = moe_f32
    path = tmp_path / "fixture-q4_k_m.gguf"
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(gguf.LlamaFileType.MOSTLY_Q4_K_M), 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), ctypes.byref(params)) == 0
    g = GGUFFile(path)
    types = {name: t.type_name for name, t in g.tensors.items()}
    assert len({t for n, t in types.items() if "_exps" in n}) > 1  # ffn_down_exps gets more bits than gate/up
    reference = copy.deepcopy(unquantized)
    reference.load_state_dict(dequantized_state_dict(path, unquantized))
    ids = ids_batch(unquantized.config.vocab_size)
    with torch.no_grad():
        expected = reference(ids).logits
        model, _ = load_gguf(path, dtype=torch.float32)
        got = model(ids, make_cache(model, 32, batch_size=2))
    assert rel_err(got, expected) < F32_REL_TOL
    assert kl(unquantized(ids).logits, got) < KL_BOUND["Q4_K"]
