"""The quantized mat-vec kernels (marco_local/kernels/triton_gguf.py), on the CPU.

Where triton is installed, its interpreter runs the kernels against the specification, the codecs' dequantization
(quant/ggml_codecs.py) followed by a float64 product, and its compiler builds them for an H100 (no GPU needed); each in
a process of its own, as triton picks the interpreter when a kernel is defined. Checked: every supported type
(the K-quants on rows of 256 and 1024, the 32-weight types on rows of 96 and 384, Nano's down_proj), experts picked
by ids repeated and out of order or taken in stack order, a shared or per-expert input in float32 and bf16, rows not
a multiple of the kernel's block, strided stacks, gate and up fused; and `StackedGGUFExperts` through the kernels
against its dequantizing path, resident and bound to an offload gather buffer's rows (what direct reads run).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_checks(code: str, interpret: bool) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        pytest.importorskip("triton.backends.nvidia")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


KERNEL_CHECK = """
import torch
import torch.nn.functional as F

from marco_local.kernels.triton_gguf import BLOCK_N, expert_matvec
from quant.ggml_codecs import codec_for


def reference(raw, codec, ids, x, N, K):
    w = codec.dequantize(raw[:, : N * (K // codec.block_size * codec.type_size)].reshape(raw.shape[0], N, -1))
    return torch.einsum("ank,ak->an", w.double()[ids], x.double().expand(len(ids), K))


def rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


g = torch.Generator().manual_seed(0)
E, N = 5, BLOCK_N * 2 + 5  # a partial last block of rows
for name, Ks in [("Q4_K", (256, 1024)), ("Q5_K", (256,)), ("Q6_K", (256, 1024)), ("Q8_0", (96, 384)),
                 ("Q4_0", (96,)), ("Q4_1", (96,)), ("Q5_0", (96, 384)), ("Q5_1", (96,))]:  # fmt: skip
    codec = codec_for(name)
    for K in Ks:
        raw = codec.quantize(torch.randn(E, N, K, generator=g)).reshape(E, -1)
        strided = torch.zeros(E, raw.shape[1] + 64, dtype=torch.uint8)[:, 32 : 32 + raw.shape[1]]
        strided.copy_(raw)  # a gather buffer's view: rows apart by more than an expert's bytes
        ids = torch.tensor([3, 0, 3, 4, 1])
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(len(ids), K, generator=g).to(dtype)
            for stack in (raw, strided):
                err = rel(expert_matvec(stack, codec, ids, x, N, K), reference(raw, codec, ids, x, N, K))
                assert err < 1e-5, (name, K, dtype, err)
            shared = x[:1]  # one input for every expert
            err = rel(expert_matvec(raw, codec, ids, shared, N, K), reference(raw, codec, ids, shared, N, K))
            assert err < 1e-5, (name, K, dtype, "shared", err)
            in_order = torch.arange(E)
            xs = torch.randn(E, K, generator=g).to(dtype)
            err = rel(expert_matvec(strided, codec, None, xs, N, K), reference(raw, codec, in_order, xs, N, K))
            assert err < 1e-5, (name, K, dtype, "in order", err)
        up = codec.quantize(torch.randn(E, N, K, generator=g)).reshape(E, -1)
        x = torch.randn(1, K, generator=g)
        want = F.silu(reference(raw, codec, ids, x, N, K)) * reference(up, codec, ids, x, N, K)
        err = rel(expert_matvec(raw, codec, ids, x, N, K, up=up), want)
        assert err < 1e-5, (name, K, "glu", err)
print("ok")
"""


def test_the_kernels_match_dequantize_then_multiply_under_triton_s_interpreter():
    run_checks(KERNEL_CHECK, interpret=True)


MODULE_CHECK = """
import copy

import torch

from marco_local.layers.gguf_cuda import StackedGGUFExperts
from marco_local.models.qwen3_moe import Experts
from marco_local.offload.store import ExpertLayout, MemoryStore
from quant.ggml_codecs import codec_for

g = torch.Generator().manual_seed(1)
E, A = 6, 4
# Nano's mix: gate/up Q4_K, down on rows of 96 (not a multiple of 256) in llama.cpp's fallback types; and all Q6_K
for types, D, I in [(("Q4_K", "Q4_K", "Q5_0"), 256, 96), (("Q4_K", "Q4_K", "Q8_0"), 512, 96),
                    (("Q6_K", "Q4_K", "Q6_K"), 256, 256)]:  # fmt: skip
    shapes = [(E, I, D), (E, I, D), (E, D, I)]
    raws = tuple(codec_for(t).quantize(torch.randn(s, generator=g)) for t, s in zip(types, shapes))
    codes = tuple(int(codec_for(t).ggml_type) for t in types)
    experts = StackedGGUFExperts(raws, codes, D, I, torch.float32, torch.device("cpu"))
    x = torch.randn(1, D, generator=g)
    ids = torch.tensor([4, 1, 5, 1])
    w = torch.rand(1, A, generator=g)
    want = Experts._one_token(experts, x, ids, w)  # the dequantizing path
    got = experts._one_token(x, ids, w)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-5, (types, err)

    # offload/direct.py: a copy whose raw buffers are views of a gather buffer holding the token's experts in order
    layout = ExpertLayout(experts, E)
    rows = MemoryStore.from_module(experts, layout).rows
    twin = copy.copy(experts)
    twin._parameters, twin._buffers = dict(experts._parameters), dict(experts._buffers)
    layout.bind(twin, rows[ids])
    assert twin.gate_proj_raw.shape[0] == A and not twin.gate_proj_raw.is_contiguous()
    err = ((twin.forward_all(x, w) - want).norm() / want.norm()).item()
    assert err < 1e-5, (types, "bound", err)

    bf16 = StackedGGUFExperts(raws, codes, D, I, torch.bfloat16, torch.device("cpu"))
    xb = x.bfloat16()
    got, want = bf16._one_token(xb, ids, w), Experts._one_token(bf16, xb, ids, w)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-2  # bf16 weights and sums there
print("ok")
"""


def test_stacked_gguf_experts_through_the_kernels_match_the_dequantizing_path():
    """Under the interpreter the module takes the kernels on the CPU (as on CUDA): against `Experts._one_token`, which
    dequantizes the gathered experts; and through a copy bound to a gather buffer, as direct reads run it."""
    run_checks(MODULE_CHECK, interpret=True)


COMPILE_CHECK = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from marco_local.kernels.triton_gguf import BLOCK_N, K_QUANTS, LEGACY, NUM_WARPS, _expert_matvec
from quant.ggml_codecs import codec_for

target = GPUTarget("cuda", 90, 32)
kernel = _expert_matvec
for t in K_QUANTS + LEGACY:
    codec = codec_for(t)
    for glu, x in [(False, "*bf16"), (True, "*fp32"), (False, "*fp32")]:
        types = ["*u8", "*u8", "*i64", x, "*fp32"] + ["i32"] * 6
        constexprs = dict(QTYPE=int(t), TS=codec.type_size, HAS_IDS=not glu, GLU=glu, BLOCK_N=BLOCK_N, BB=4)
        signature = dict(zip(kernel.arg_names, types + ["constexpr"] * len(constexprs), strict=True))
        aligned = {(i,): [["tt.divisibility", 16]] for i in range(5)}  # what the launcher sees for torch tensors
        source = ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned)
        assert triton.compile(source, target=target, options={"num_warps": NUM_WARPS}).asm["cubin"], (t, glu, x)
print("ok")
"""


def test_the_kernels_compile_for_an_h100():
    """The interpreter accepts code the compiler may not: every type, plain and fused, compiled for sm_90."""
    run_checks(COMPILE_CHECK, interpret=False)
