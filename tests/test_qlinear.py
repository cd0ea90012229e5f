"""Quantized linears and experts against `x @ codec.dequantize(raw).T` in float32, for every GGUF type.

Tolerances (see layers/gguf.py): bf16 activations run the int4 kernel with bf16 group scales: each represented
weight within 2^-6.5 of its block's largest |w| (measured worst 2^-6.75, Q5_1/Q5_K), and a relative output error
below 6e-3 (measured 2.4e-3 for the 4-bit types and Q8_0, up to 3.9e-3 for the 5-bit ones); float32 activations take
the exact path (1e-5). These tests pin the int4 path (the one used without the native kernels); the native kernels'
own tests are tests/test_native*.py.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as GT

from marco_local.kernels import native
from marco_local.layers.gguf import (
    CHUNK_ROWS,
    DENSE,
    LAYOUTS,
    _pack_rows,
    _packs_in_chunks,
    make_embedding,
    make_experts,
    make_linear,
)
from marco_local.models.qwen3_moe import Experts
from quant.ggml_codecs import codec_for

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
BF16_REL_TOL = 6e-3
F32_REL_TOL = 1e-5
BLOCK_TOL = 2**-6.5


@pytest.fixture(autouse=True)
def int4_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "supports", lambda ggml_type: False)


def _quantized(name: str, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights (with a per-row offset, so the asymmetric types see non-zero mins) -> (raw bytes, reference)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05 + 0.01 * torch.randn(*shape[:-1], 1, generator=g)
    codec = codec_for(name)
    raw = codec.quantize(w)
    return raw, codec.dequantize(raw)


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", TYPES)
def test_linear_matches_dequantized_reference(name: str) -> None:
    N, K = 200, 512  # 200 rows: not a multiple of the kernel's 64-row block, so padding is exercised
    raw, w = _quantized(name, (N, K), seed=1)
    lin, exact = make_linear(raw, name, N, K), make_linear(raw, name, N, K, exact=True)
    g = torch.Generator().manual_seed(2)
    for tokens in (1, 7):
        x = torch.randn(tokens, K, generator=g)
        y32 = exact(x)
        assert y32.dtype == torch.float32 and y32.shape == (tokens, N)
        assert _rel(y32, x @ w.T) < F32_REL_TOL
        y32 = lin(x)  # float32 activations on the fast kernels (a GGUF model's prompt on the native kernels)
        assert y32.dtype == torch.float32 and _rel(y32, x @ w.T) < BF16_REL_TOL
        xb = x.bfloat16()
        yb = lin(xb.view(1, tokens, K))
        assert yb.dtype == torch.bfloat16 and yb.shape == (1, tokens, N)
        assert _rel(yb[0], xb.float() @ w.T) < BF16_REL_TOL


@pytest.mark.parametrize("name", [n for n in TYPES if GT[n] in LAYOUTS])
def test_represented_weights_within_block_bound(name: str) -> None:
    """Feed the identity: the kernel's output rows are its represented weights (rounded to bf16 on output)."""
    N, K = 64, 256
    raw, w = _quantized(name, (N, K), seed=3)
    lin = make_linear(raw, name, N, K)
    rep = lin(torch.eye(K, dtype=torch.bfloat16)).float().T  # [N, K]
    block = codec_for(name).block_size
    blockmax = w.abs().view(N, K // block, block).amax(-1, keepdim=True).expand(-1, -1, block).reshape(N, K)
    assert ((rep - w).abs() <= BLOCK_TOL * blockmax + 1e-7).all()


def test_chunked_packing_is_checked_on_this_cpu() -> None:
    """Packing in row chunks is used only where this CPU's kernel gives the whole matrix's bytes that way."""
    n = torch.randint(0, 16, (3 * CHUNK_ROWS + 16, 64), dtype=torch.uint8)
    parts = torch.cat([_pack_rows(n[i : i + CHUNK_ROWS]) for i in range(0, n.shape[0], CHUNK_ROWS)])
    assert _packs_in_chunks(CHUNK_ROWS) == torch.equal(parts, _pack_rows(n))
    assert _packs_in_chunks(CHUNK_ROWS)  # every layout torch has shipped packs whole row blocks of <= 64 rows


def test_linear_chunked_repack(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("marco_local.layers.gguf.CHUNK_ROWS", 64)
    raw, w = _quantized("Q4_K", (200, 256), seed=4)
    x = torch.randn(3, 256).bfloat16()
    assert _rel(make_linear(raw, GT.Q4_K, 200, 256)(x), x.float() @ w.T) < BF16_REL_TOL


def _experts_pair(types: tuple[str, str, str], E: int = 6, D: int = 256, I: int = 256, seed: int = 5):
    (gr, gw), (ur, uw), (dr, dw) = (
        _quantized(types[0], (E, I, D), seed),
        _quantized(types[1], (E, I, D), seed + 1),
        _quantized(types[2], (E, D, I), seed + 2),
    )
    ours = make_experts(gr, ur, dr, types, E, D, I)
    ours.exact_twin = make_experts(gr, ur, dr, types, E, D, I, exact=True)
    ref = Experts(E, D, I)
    with torch.no_grad():
        ref.gate_proj.copy_(gw)
        ref.up_proj.copy_(uw)
        ref.down_proj.copy_(dw)
    return ours, ref


def _routing(T: int, E: int, A: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:A] for _ in range(T)])
    w = torch.softmax(torch.randn(T, A, generator=g), -1)
    return idx, w


@pytest.mark.parametrize(
    "types",
    [(n, n, n) for n in TYPES] + [("Q4_K", "Q4_K", "Q5_0"), ("Q4_K", "Q5_K", "Q6_K"), ("Q8_0", "Q4_0", "Q4_1")],
)
def test_experts_match_dequantized_reference(types: tuple[str, str, str]) -> None:
    E, D, A = 6, 256, 3
    ours, ref = _experts_pair(types, E=E, D=D)
    g = torch.Generator().manual_seed(6)
    for T in (1, 5):  # decode fast path and grouped prefill
        x = torch.randn(T, D, generator=g)
        idx, w = _routing(T, E, A, seed=T)
        want = ref(x, idx, w)
        assert _rel(ours.exact_twin(x, idx, w), want) < F32_REL_TOL
        assert _rel(ours(x, idx, w), want) < 3 * BF16_REL_TOL  # float32 activations on the fast kernels
        xb = x.bfloat16()
        want_b = ref(xb.float(), idx, w)
        got = ours(xb, idx, w.bfloat16())
        assert got.dtype == torch.bfloat16 and got.shape == (T, D)
        # two chained quantized matmuls plus bf16 rounding of the hidden activations and routing weights
        assert _rel(got, want_b) < 3 * BF16_REL_TOL


def test_decode_path_matches_grouped_path() -> None:
    ours, _ = _experts_pair(("Q4_K", "Q4_K", "Q5_0"))
    x = torch.randn(1, 256).bfloat16()
    idx, w = _routing(1, 6, 3, seed=9)
    fast = ours(x, idx, w.bfloat16())
    slow = Experts.forward(ours, x, idx, w.bfloat16())  # the parent's routing over expert_forward
    assert _rel(fast, slow.float()) < 2 * BF16_REL_TOL


def test_experts_keep_no_float_weights() -> None:
    ours, _ = _experts_pair(("Q4_K", "Q4_K", "Q6_K"))
    assert not list(ours.parameters())
    assert all(t not in DENSE for t in ours.types)


@pytest.mark.parametrize("name", ["Q6_K", "Q8_0", "F16"])
def test_embedding_rows_exact(name: str) -> None:
    raw, w = _quantized(name, (50, 256), seed=7)
    emb = make_embedding(raw, name, 50, 256, dtype=torch.float32)
    ids = torch.tensor([[3, 0, 49]])
    assert torch.equal(emb(ids), w[ids])
    assert torch.equal(make_linear(raw, name, 50, 256).rows(ids), w[ids])


def test_bad_raw_shape_is_an_error() -> None:
    raw, _ = _quantized("Q4_0", (8, 64), seed=8)
    with pytest.raises(ValueError, match="expected uint8 bytes"):
        make_linear(raw, "Q4_0", 8, 96)
