"""The native decode step (`native_decode.NativeDecoder`) against the exact float32 path of the same GGUF file.

Teacher-forced: a prompt is prefilled, then tokens are fed one at a time; each step's logits from the bf16 model's
native decoder and from its torch path (decode_step switched off) are compared with the float32 model's (exact
dequantized weights, the transformers-equivalent path). The native step keeps a float32 residual stream and quantizes
activations to int8 blocks for its products, the torch bf16 path rounds everything to bf16: both are approximations
of the float32 logits of a similar size. Measured KL(f32 || ours), nats per step (FIGURES line with -s): qwen3moe
q4_k_m native 3.1e-3 vs torch bf16 3.4e-3; llama Q8_0 2.3e-4 vs 2.6e-4; qwen3 Q8_0 2.1e-4 vs 2.1e-4.
"""

from __future__ import annotations

import pytest
import torch
from gguf_fixtures import kl, rel_err
from offload_gguf_fixtures import q4_path  # noqa: F401

from marco_local.decode import decode_step, forward, set_decode_step
from marco_local.kernels import native
from marco_local.layers.kv_cache import make_cache
from marco_local.load.gguf import load_gguf

if not native.available():
    pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}", allow_module_level=True)
pytestmark = pytest.mark.usefixtures("native_tier")  # every test once per kernel tier this CPU runs

PROMPT = [5, 17, 42, 99, 3, 250, 61, 7]
FEED = [11, 140, 23, 7, 300, 19, 88, 2, 45, 61, 130, 9]
KL_BOUND = 5e-3  # nats per step
KL_VS_TORCH_BF16 = 2.0  # the native step may not be more than twice as far from float32 as the torch bf16 path


def _steps(model, use_native: bool) -> torch.Tensor:
    """Logits [len(FEED), V] of the teacher-forced decode steps."""
    saved = decode_step(model)
    if not use_native:
        set_decode_step(model, None)
    try:
        cache = make_cache(model, len(PROMPT) + len(FEED))
        out = []
        with torch.inference_mode():
            model(torch.tensor([PROMPT]), cache, last_only=True)
            for t in FEED:
                out.append(forward(model, torch.tensor([[t]]), cache)[0, -1].float())
        return torch.stack(out)
    finally:
        set_decode_step(model, saved)


def _check(path, name: str) -> None:
    exact, _ = load_gguf(path, dtype=torch.float32)
    model, _ = load_gguf(path, dtype=torch.bfloat16)
    assert decode_step(model) is not None and decode_step(exact) is None
    assert make_cache(model, 4).keys.dtype == torch.float16  # llama.cpp's default cache type, on the native kernels
    want = _steps(exact, use_native=False)
    fast, slow = _steps(model, use_native=True), _steps(model, use_native=False)
    kl_fast, kl_slow = kl(want[None], fast[None]), kl(want[None], slow[None])
    print(
        f"\nFIGURES {name}: KL native {kl_fast:.2e}, KL torch-bf16 {kl_slow:.2e}, rel native {rel_err(fast, want):.2e}"
    )
    assert kl_fast < KL_BOUND and kl_fast < KL_VS_TORCH_BF16 * kl_slow + 1e-5
    assert (fast.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_qwen3moe_q4_k_m(q4_path):
    _check(q4_path, "qwen3moe q4_k_m")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_architectures(arch, checkpoint, tmp_path):
    from test_gguf_runtime import dense_reference, write_dense_gguf

    folder, _ = checkpoint
    ref = dense_reference(arch, folder, hidden_size=128, intermediate_size=256, head_dim=32, tie_word_embeddings=True)
    path = tmp_path / f"{arch}.gguf"
    write_dense_gguf(path, arch, ref, folder, "Q8_0")
    _check(path, f"{arch} Q8_0")


def test_direct_moe_call_equals_the_module_call(q4_path):
    """The decoder calls a fused MoE block's kernel itself; the logits are bit-identical to calling the block, and a
    hook on the experts (a trace recorder) still sees every token."""
    model, _ = load_gguf(q4_path, dtype=torch.bfloat16)
    decoder = decode_step(model)
    assert all(L["moe"] is not None for L in decoder.layers)
    direct = _steps(model, use_native=True)
    fused = [L["moe"] for L in decoder.layers]
    for L in decoder.layers:
        L["moe"] = None
    try:
        assert torch.equal(_steps(model, use_native=True), direct)
    finally:
        for L, f in zip(decoder.layers, fused, strict=True):
            L["moe"] = f
    seen = []
    handle = model.model.layers[1].mlp.experts.register_forward_pre_hook(lambda m, args: seen.append(1))
    try:
        assert torch.equal(_steps(model, use_native=True), direct)
    finally:
        handle.remove()
    assert len(seen) == 1 + len(FEED)  # the prompt, then each step


def _offloaded(path, slots: str):
    from marco_local.offload import Placement, install

    model, _ = load_gguf(path, dtype=torch.bfloat16, experts_in_file=True)
    install(model, Placement(experts_resident=slots), files=[path])
    return model


def test_offloaded_experts_in_two_native_calls_equal_the_module_call(q4_path):
    """An offloaded MoE block is routed and computed by the decoder itself (`marco_route`, the host's slot table,
    `marco_moe` on the slots' addresses): logits bit-identical to the resident model's fused call and to the module
    path (taken when a hook observes the experts), with the same hits and misses, and the module path not run."""
    from marco_local.offload import offload_stats

    want = _steps(load_gguf(q4_path, dtype=torch.bfloat16)[0], use_native=True)
    split, module = _offloaded(q4_path, "3"), _offloaded(q4_path, "3")
    placed = []
    for layer in split.model.layers:
        off = layer.mlp.experts
        off.slots_for_token = lambda row, x, off=off: placed.append(row) or type(off).slots_for_token(off, row, x)
    handles = [layer.mlp.experts.register_forward_pre_hook(lambda m, a: None) for layer in module.model.layers]
    got = _steps(split, use_native=True)
    assert torch.equal(got, want) and torch.equal(_steps(module, use_native=True), want)
    assert len(placed) == len(FEED) * len(split.model.layers)
    a, b = offload_stats(split), offload_stats(module)
    assert (a.hits, a.misses) == (b.hits, b.misses) and a.misses > 0
    for h in handles:
        h.remove()


@pytest.mark.parametrize("offload", [False, True])
def test_a_routing_replaced_on_the_block_is_honoured(q4_path, offload):
    """A routing set on a block instance (bench/offload_speed.py's synthetic trace) replaces the fused call's own
    routing in the decoder, resident or offloaded: the same logits as the module path under that routing, and not
    the model's own."""
    own = _steps(load_gguf(q4_path, dtype=torch.bfloat16)[0], use_native=True)
    runs = []
    for observed in (False, True):
        model = _offloaded(q4_path, "3") if offload else load_gguf(q4_path, dtype=torch.bfloat16)[0]
        for layer in model.model.layers:
            block = layer.mlp
            k, E = block.top_k, block.gate.weight.shape[0]

            def route(x, k=k, E=E):  # the last k experts, equal weights
                ids = torch.arange(E - k, E).view(1, k)
                return ids, torch.full((1, k), 1.0 / k, dtype=x.dtype)

            block.route = route
            if observed:  # the module path
                block.experts.register_forward_pre_hook(lambda m, a: None)
        runs.append(_steps(model, use_native=True))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], own)


def test_native_steps_leave_a_cache_the_torch_path_continues(q4_path):
    """Keys/values written by native steps are read by a later multi-token chunk (the torch path)."""
    model, _ = load_gguf(q4_path, dtype=torch.bfloat16)
    exact, _ = load_gguf(q4_path, dtype=torch.float32)
    got = []
    for m in (model, exact):
        cache = make_cache(m, 32)
        with torch.inference_mode():
            m(torch.tensor([PROMPT]), cache, last_only=True)
            for t in FEED[:4]:
                forward(m, torch.tensor([[t]]), cache)
            got.append(m(torch.tensor([FEED[4:9]]), cache).float())
    assert kl(got[1], got[0]) < KL_BOUND


def test_context_full_is_the_usual_error(q4_path):
    from marco_local.errors import MarcoError

    model, _ = load_gguf(q4_path, dtype=torch.bfloat16)
    cache = make_cache(model, 3)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache, last_only=True)
        with pytest.raises(MarcoError, match="context window full"):
            forward(model, torch.tensor([[4]]), cache)


@pytest.mark.parametrize(
    "setting,expected",
    [
        ("1", "kernels: native {tier} (forced by MARCO_NATIVE_ISA"),  # then "; without OpenMP" where so built
        ("0", "kernels: torch int4 (disabled by MARCO_NATIVE=0)"),
    ],
)
def test_verbose_run_names_the_kernels(q4_path, setting, expected, native_tier):
    """`marco run -v` says which kernels ran, which tier and why, and why not the native ones (the user's clue to a
    slow machine)."""
    import os
    import subprocess
    import sys

    if setting == "0" and native_tier != "portable":
        pytest.skip("the same run for every tier")
    env = {**os.environ, "NO_COLOR": "1", "MARCO_NATIVE": setting, "MARCO_NATIVE_ISA": native_tier}
    args = [sys.executable, "-m", "marco_local", "run", str(q4_path), "--raw", "-n", "3", "-v", "--temperature", "0"]
    r = subprocess.run(args, input=b"hello", capture_output=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert expected.format(tier=native_tier) in r.stderr.decode().splitlines()[-1]
