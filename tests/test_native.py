"""The native kernels inside the quantized modules: linears and experts on raw ggml blocks, zero-copy.

Error budget: the kernels quantize activations to int8 blocks (32 values per scale for the 32-weight types, 256 for
the K-quants, as llama.cpp does), so against `x @ dequantize(W).T` in float64 the relative output error is the
activation rounding, ~0.5-0.7% on Gaussian inputs (measured 5.0e-3 Q4_1 to 7.0e-3 Q4_K at K=1024); bound 1.2e-2. The
kernels' exact integer agreement with a float64 model of that quantization is tested in tests/test_native_*.py.
"""

from __future__ import annotations

import pytest
import torch

from marco_local.kernels import native
from marco_local.layers.gguf import make_embedding, make_experts, make_linear
from quant.ggml_codecs import codec_for

if not native.available():
    pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}", allow_module_level=True)
pytestmark = pytest.mark.usefixtures("native_tier")  # every test once per kernel tier this CPU runs

NATIVE_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
REL_TOL = 1.2e-2
# experts chain two quantized products, the second on silu(g) * u (heavy-tailed): measured 1.1e-2 (Q8_0) to 1.8e-2
# (Q4_K/Q6_K); the one-token fused call against the grouped path differs by the routing weight's place and bf16
# output rounding: measured 3.5e-3
EXPERTS_REL_TOL = 2.5e-2
FUSED_VS_GROUPED_TOL = 6e-3


def _quantized(name: str, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05 + 0.01 * torch.randn(*shape[:-1], 1, generator=g)
    codec = codec_for(name)
    raw = codec.quantize(w)
    return raw, codec.dequantize(raw).double()


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", NATIVE_TYPES)
def test_linear_runs_on_the_file_bytes(name: str) -> None:
    """Every native type against x @ W.T in float64 (the exact sums are in tests/test_native_{legacy,kquants}.py)."""
    N, K = 200, 512
    raw, w = _quantized(name, (N, K), seed=1)
    lin = make_linear(raw, name, N, K)
    assert lin.native and lin.q is None and lin.raw.data_ptr() == raw.data_ptr()  # nothing repacked or copied
    g = torch.Generator().manual_seed(2)
    for tokens in (1, 5):
        x = torch.randn(tokens, K, generator=g).bfloat16()
        y = lin(x)
        assert y.dtype == torch.bfloat16 and y.shape == (tokens, N)
        assert _rel(y, x.double() @ w.T) < REL_TOL


@pytest.mark.parametrize("name", NATIVE_TYPES)
def test_embedding_rows_are_bit_exact(name: str) -> None:
    """dequant.c's rows against the codec (itself bit-exact with gguf-py and ggml): the same float32 bits, including
    rows read through a strided view and repeated ids; an id outside the table is an IndexError, not a stray read."""
    raw, _ = _quantized(name, (300, 512), seed=3)
    codec = codec_for(name)
    ids = torch.tensor([[0, 299, 17, 17], [5, 6, 7, 298]])
    want = codec.dequantize(raw[ids.reshape(-1)]).reshape(2, 4, 512)
    emb = make_embedding(raw, name, 300, 512, dtype=torch.float32)
    assert torch.equal(emb(ids).view(torch.int32), want.view(torch.int32))
    wide = torch.zeros(300, raw.shape[1] + 40, dtype=torch.uint8)  # rows 40 bytes apart from the next one's start
    wide[:, : raw.shape[1]] = raw
    rows = native.dequant_rows(wide[:, : raw.shape[1]], codec.ggml_type, ids, 512)
    assert torch.equal(rows.view(torch.int32), want.reshape(8, 512).view(torch.int32))
    for bad in (300, -1):
        with pytest.raises(IndexError):
            native.dequant_rows(raw, codec.ggml_type, torch.tensor([1, bad]), 512)


def test_strided_rows() -> None:
    """Rows need not be contiguous with each other (a slice of a larger matrix, an expert inside a stack)."""
    raw, w = _quantized("Q8_0", (64, 256), seed=3)
    x = torch.randn(2, 256)
    y = native.matmul(x, raw[::2], codec_for("Q8_0").ggml_type, 256)
    assert y.shape == (2, 32) and _rel(y, x.double() @ w[::2].T) < REL_TOL


def _experts(types: tuple[str, str, str], E: int = 6, D: int = 256, I: int = 512):  # noqa: E741
    shapes = ((E, I, D), (E, I, D), (E, D, I))
    pairs = [_quantized(t, shape, seed=10 + i) for i, (t, shape) in enumerate(zip(types, shapes, strict=True))]
    return make_experts(*(raw for raw, _ in pairs), types, E, D, I), [w for _, w in pairs]


def _reference(ws, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    g, u, d = ws
    out = torch.zeros(x.shape[0], d.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, wt in zip(idx[t].tolist(), weights[t].double().tolist(), strict=True):
            h = torch.nn.functional.silu(x[t].double() @ g[e].T) * (x[t].double() @ u[e].T)
            out[t] += wt * (h @ d[e].T)
    return out


@pytest.mark.parametrize(
    "types", [("Q4_K", "Q4_K", "Q6_K"), ("Q4_K", "Q4_K", "Q5_0"), ("Q8_0", "Q8_0", "Q8_0"), ("Q5_K", "Q6_K", "Q4_0")]
)
def test_experts_decode_and_prefill(types: tuple[str, str, str]) -> None:
    experts, ws = _experts(types)
    assert experts.native and not hasattr(experts, "down_bank")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 256, generator=g).bfloat16()
    idx = torch.tensor([[0, 3, 5], [1, 3, 4], [5, 2, 0], [4, 4, 1], [2, 1, 0]])
    weights = torch.softmax(torch.randn(5, 3, generator=g), -1).bfloat16()
    want = _reference(ws, x, idx, weights)
    grouped = experts(x, idx, weights)  # several tokens: grouped by expert, native matmuls per expert
    assert _rel(grouped, want) < EXPERTS_REL_TOL
    one = torch.cat([experts(x[t : t + 1], idx[t : t + 1], weights[t : t + 1]) for t in range(5)])  # fused call
    assert _rel(one, want) < EXPERTS_REL_TOL
    assert _rel(one, grouped.double()) < FUSED_VS_GROUPED_TOL


def test_bad_type_or_shape_is_an_error() -> None:
    raw, _ = _quantized("Q4_0", (4, 64), seed=5)
    with pytest.raises(ValueError):
        native.matmul(torch.randn(1, 64), raw, 1, 64)  # F16: not a native type
    with pytest.raises(ValueError):
        native.matmul(torch.randn(1, 48), raw, 2, 48)  # not a whole number of blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("positions", [1, 7, 300])
def test_decode_attention_on_a_16_bit_cache(positions: int, dtype: torch.dtype) -> None:
    """One query over a bf16 or float16 cache (GQA 16/8, a layer slice of a longer cache) against float64 attention:
    the kernel accumulates in float32 (measured 4e-7 at 300 positions)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(positions)
    H, Hkv, hd, max_len = 16, 8, 128, 512
    keys = torch.randn(Hkv, max_len, hd, generator=g).to(dtype)
    values = torch.randn(Hkv, max_len, hd, generator=g).to(dtype)
    keys[0, 0, :4] = torch.tensor([1e-6, -3e-8, 6e4, 0.0])  # float16 subnormals and large values are widened right
    q = torch.randn(H, hd, generator=g)
    got = native.attend(q, keys[:, :positions], values[:, :positions], hd**-0.5)
    k64, v64 = keys[:, :positions].double()[None], values[:, :positions].double()[None]
    want = F.scaled_dot_product_attention(q.double().view(1, H, 1, hd), k64, v64, enable_gqa=True).view(H, hd)
    assert _rel(got, want) < 1e-5


def test_the_decode_step_stores_keys_as_torch_rounds_them() -> None:
    """marco_attn_decode writes the new key and value into a float16 cache rounded as torch's .to(float16) rounds
    (nearest even; overflow to inf; subnormals), and into a bf16 cache as .to(bfloat16)."""
    import ctypes

    hd = 128
    values = torch.cat([
        torch.tensor([0.0, -(2.0**-20), 1.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 7e4, 2.0**-24, 2.0**-25,
                      1.5 * 2.0**-25, 2.0**-14, 2.0**-14 - 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11]),
        torch.randn(hd - 16) * torch.logspace(-9, 5, hd - 16),
    ])  # fmt: skip
    for dtype in (torch.float16, torch.bfloat16):
        k_cache, v_cache = torch.zeros(1, 4, hd, dtype=dtype), torch.zeros(1, 4, hd, dtype=dtype)
        qkv = torch.cat([torch.randn(hd), values, values.flip(0)])  # one query head, one kv head
        cos, sin = torch.ones(hd), torch.zeros(hd)  # RoPE at position 0: the identity (finite values only)
        out = torch.empty(hd)
        lib = native.library()
        code = lib.marco_attn_decode(
            qkv.data_ptr(), 1, 1, hd, None, None, ctypes.c_float(1e-6), cos.data_ptr(), sin.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), 2, int(dtype == torch.float16),
            out.data_ptr(), 1,
        )  # fmt: skip
        assert code == 0
        assert torch.equal(k_cache[0, 2].view(torch.int16), values.to(dtype).view(torch.int16)), dtype
        assert torch.equal(v_cache[0, 2].view(torch.int16), values.flip(0).to(dtype).view(torch.int16)), dtype


@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("router_dtype", [torch.bfloat16, torch.float32])
def test_route_matches_the_model_semantics(norm_topk: bool, router_dtype: torch.dtype) -> None:
    """Router logits in float64 from the same (bf16 or float32) weights, softmax, top-k, renormalised; float32 weights,
    not rounded (NativeMoeBlock casts them to a bf16 model's dtype)."""
    g = torch.Generator().manual_seed(6)
    E, D, k = 40, 256, 8
    router = (torch.randn(E, D, generator=g) * 0.1).to(router_dtype)
    for _ in range(5):
        x = torch.randn(D, generator=g).bfloat16().float()
        ids, weights = native.route(x, router, k, norm_topk)
        probs = torch.softmax(router.double() @ x.double(), -1)
        want_w, want_ids = torch.topk(probs, k)
        if norm_topk:
            want_w = want_w / want_w.sum()
        assert ids.tolist() == want_ids.tolist()
        assert weights.dtype == torch.float32
        assert torch.allclose(weights.double(), want_w, rtol=1e-5, atol=0)


def test_fused_moe_block_equals_routing_then_experts() -> None:
    """`NativeMoeBlock`'s one-call path equals its two-step path (native routing, then the experts), bit for bit:
    the offloaded model relies on it (it routes, then runs experts from its slots)."""
    from marco_local.config import ModelConfig
    from marco_local.layers.gguf import NativeMoeBlock

    experts, _ = _experts(("Q4_K", "Q4_K", "Q5_0"), E=12)
    cfg = ModelConfig.from_dict(
        {
            "model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 512,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128,
            "num_experts": 12, "num_experts_per_tok": 4, "vocab_size": 100, "norm_topk_prob": True,
        }
    )  # fmt: skip
    block = NativeMoeBlock(cfg).bfloat16()
    block.experts = experts
    torch.nn.init.normal_(block.gate.weight, std=0.1)
    x = torch.randn(1, 1, 256).bfloat16()
    fused = block(x)
    seen = []
    experts.register_forward_pre_hook(lambda mod, args: seen.append(args[1].tolist()))  # observed: two steps
    two_step = block(x)
    assert len(seen) == 1 and torch.equal(fused, two_step)
