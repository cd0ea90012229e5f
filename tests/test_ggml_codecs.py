"""quant/ggml_codecs.py against gguf-py (bytes, decoding) and llama.cpp (K-quant bytes); error-quality bounds."""

from __future__ import annotations

import ctypes
import hashlib

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import quant.ggml_codecs as gc
from quant import ggml_types
from quant.ggml_codecs import CODECS, codec_for

GGUF_PY_QUANTIZED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]


def test_format_tables_equal_gguf_py():
    """quant/ggml_types.py copies three gguf-py tables so that the runtime need not import gguf-py."""
    ours = {t.name: (int(t), ggml_types.GGML_QUANT_SIZES[t]) for t in ggml_types.GGMLQuantizationType}
    theirs = {t.name: (int(t), gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
    assert ours == theirs
    assert {v.name: int(v) for v in ggml_types.GGUFValueType} == {v.name: int(v) for v in gguf.GGUFValueType}
    assert ggml_types.GGMLQuantizationType.Q4_K == T.Q4_K and {T.Q4_K: 1}[ggml_types.GGMLQuantizationType.Q4_K] == 1


def make_data(kind: str, rows: int = 32, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal((rows, cols))
    elif kind == "student_t":
        x = rng.standard_t(2, (rows, cols)) * 0.02
    elif kind == "outliers":
        x = rng.standard_normal((rows, cols)) * 0.01
        idx = rng.integers(0, x.size, 40)
        x.flat[idx] = rng.choice([-1, 1], 40) * rng.uniform(50, 3000, 40)
    elif kind == "zeros":
        x = np.zeros((rows, cols))
    elif kind == "mixed":
        # zero blocks, signed zeros, constant blocks, all-positive blocks and ties between +m and -m in one tensor
        x = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < 0.5)
        x[0] = 0.0
        x[1, :256] = -0.0
        x[2, :32] = 0.25
        x[3, :64] = -0.5
        x[4] = np.abs(x[4]) + 0.1
        x[5, :32] = np.tile([1.0, -1.0], 16)
        x[6, :16] = 1e-20  # below the K-quant "all zero" threshold and fp16 range
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


DATA_KINDS = ["normal", "student_t", "outliers", "zeros", "mixed"]


def gguf_bytes(x: np.ndarray, name: str) -> np.ndarray:
    q = gguf.quants.quantize(x, T[name])
    return q.view(np.uint8).reshape(x.shape[0], -1)


def gguf_decode(raw: torch.Tensor, name: str) -> np.ndarray:
    return gguf.quants.dequantize(raw.numpy(), T[name])


def assert_bits_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint32), b.astype(np.float32).view(np.uint32))


def rel_rmse(deq: torch.Tensor | np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(deq, dtype=np.float64) - x) ** 2)) / x.std())


# --------------------------------------------------------------------------------------------------------------------
# table


def test_table_matches_ggml_constants() -> None:
    assert list(CODECS) == ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
    for name, codec in CODECS.items():
        assert codec.name == name and codec.ggml_type == T[name]
        assert (codec.block_size, codec.type_size) == gguf.GGML_QUANT_SIZES[T[name]]
        assert codec_for(T[name]) is codec
        assert codec_for(int(T[name])) is codec
        assert codec_for(name.lower()) is codec
    with pytest.raises(NotImplementedError):
        codec_for(T.IQ2_XXS)


def test_shapes_and_errors() -> None:
    c = CODECS["Q4_K"]
    w = torch.randn(2, 3, 512)
    raw = c.quantize(w)
    assert raw.dtype == torch.uint8 and raw.shape == (2, 3, 2 * 144)
    out = c.dequantize(raw)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 512)
    with pytest.raises(ValueError):
        c.quantize(torch.randn(4, 384))
    with pytest.raises(ValueError):
        c.dequantize(torch.zeros(4, 100, dtype=torch.uint8))
    with pytest.raises(TypeError):
        c.dequantize(torch.zeros(4, 144, dtype=torch.int8))


# --------------------------------------------------------------------------------------------------------------------
# bytes identical to gguf-py's quantizers


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("name", GGUF_PY_QUANTIZED)
def test_quantize_bytes_match_gguf_py(name: str, kind: str) -> None:
    x = make_data(kind)
    ours = CODECS[name].quantize(torch.from_numpy(x))
    np.testing.assert_array_equal(ours.numpy(), gguf_bytes(x, name))


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZED + K_QUANTS)
def test_input_dtype_layout_and_chunking_do_not_change_bytes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.from_numpy(make_data("normal", rows=4, cols=1024)).to(torch.bfloat16)
    c = CODECS[name]
    ref = c.quantize(x.float())
    assert torch.equal(c.quantize(x), ref)  # bf16 input is widened exactly
    assert torch.equal(c.quantize(x.float().t().contiguous().t()), ref)  # non-contiguous input
    monkeypatch.setattr(gc, "CHUNK_ELEMS", 1000)  # chunks of a few blocks, not aligned to rows
    assert torch.equal(c.quantize(x), ref)
    assert torch.equal(c.dequantize(ref), CODECS[name].dequantize(ref.clone()))


def test_bf16_source_bits_pass_through_as_the_float32_path_writes_them() -> None:
    """BF16 from a bf16 tensor skips the float32 rounding; the bytes are the same, special values included."""
    bits = [0x0000, 0x8000, 0x0001, 0x807F, 0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0xFF81, 0x7FFF, 0x3F80, 0xC2F7]
    x = torch.tensor(bits * 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(4, -1)
    assert torch.equal(CODECS["BF16"].quantize(x), CODECS["BF16"].quantize(x.float()))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K"])
def test_works_under_inference_mode_and_on_inference_tensors(name: str) -> None:
    c = CODECS[name]
    x = torch.from_numpy(make_data("normal", rows=4, cols=1024))
    raw = c.quantize(x)
    with torch.inference_mode():
        x_inf = x.clone()
        assert torch.equal(c.quantize(x_inf), raw)
        assert torch.equal(c.dequantize(raw.clone()), c.dequantize(raw))
    assert torch.equal(c.quantize(x_inf), raw)  # an inference tensor read outside inference mode


# --------------------------------------------------------------------------------------------------------------------
# decoding bit-exact with gguf-py's dequantizers


@pytest.mark.parametrize("kind", DATA_KINDS)
@pytest.mark.parametrize("name", list(CODECS))
def test_dequantize_of_our_bytes_matches_gguf_py(name: str, kind: str) -> None:
    x = make_data(kind)
    raw = CODECS[name].quantize(torch.from_numpy(x))
    assert_bits_equal(CODECS[name].dequantize(raw).numpy(), gguf_decode(raw, name))


# byte offsets of the ggml_half scale fields in each block (ggml-common.h)
HALF_FIELDS = {
    "Q8_0": [0],
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
}


@pytest.mark.parametrize("name", list(HALF_FIELDS))
def test_dequantize_of_random_bytes_matches_gguf_py(name: str) -> None:
    c = CODECS[name]
    g = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (64, 4 * c.type_size), dtype=torch.uint8, generator=g)
    blocks = raw.view(-1, c.type_size)
    for at in HALF_FIELDS[name]:  # finite fp16 scales of random sign and magnitude, including zeros and subnormals
        d = torch.randn(blocks.shape[0], generator=g) * 10.0 ** torch.randint(-8, 3, (blocks.shape[0],), generator=g)
        d[::17] = 0
        blocks[:, at : at + 2] = d.to(torch.float16).view(torch.uint8).view(-1, 2)
    assert_bits_equal(c.dequantize(raw).numpy(), gguf_decode(raw, name))


# --------------------------------------------------------------------------------------------------------------------
# K-quants: llama.cpp's reference quantizer, byte for byte


def det_data(rows: int, cols: int, seed: int) -> np.ndarray:
    """Platform-independent test data: splitmix64 integers -> Irwin-Hall normals (exact float32 ops only).

    Even rows are ~N(0, 1); odd rows are a normal over (|normal| + 0.05), i.e. heavy-tailed.
    """
    k = np.arange(rows * cols * 24, dtype=np.uint64) + np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    z = k * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    u = ((z >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)).reshape(2, rows, cols, 12)
    acc = u[..., 0].copy()
    for i in range(1, 12):
        acc = acc + u[..., i]
    g, h = acc - np.float32(6)
    x = g.copy()
    x[1::2] = g[1::2] / (np.abs(h[1::2]) + np.float32(0.05))
    return x.astype(np.float32)


# sha256 of llama.cpp's bytes for det_data(16, 1024, 7), from llama-cpp-python 0.3.36's `llama_model_quantize`
# (pure mode, no imatrix -> quantize_row_q*_K_ref); see bench/codec_rmse.py
LLAMA_CPP_SHA256 = {
    "Q4_K": "3e9b6b667528b3dbc9e936252900b4189e1ff98b37cb080b803976b354ea3cef",
    "Q5_K": "21c05b49f1dd5b315ca4c615f55f5cb1b8d7f5d6e3082f4b233e4f9152c13637",
    "Q6_K": "5ac38a40161824ed7d024430654e4a51e613cca02c15dcb394f0751609154cc0",
}


@pytest.mark.parametrize("name", K_QUANTS)
def test_kquant_bytes_match_recorded_llama_cpp(name: str) -> None:
    raw = CODECS[name].quantize(torch.from_numpy(det_data(16, 1024, 7)))
    assert hashlib.sha256(raw.numpy().tobytes()).hexdigest() == LLAMA_CPP_SHA256[name]


def test_kquant_bytes_match_live_llama_cpp(tmp_path) -> None:
    """Same check against whatever llama.cpp is installed, on the awkward inputs too (runs only with llama_cpp)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tensors = {
        "blk.0.ffn_up.weight": make_data("mixed", 32, 1024),
        "blk.0.ffn_gate.weight": make_data("student_t", 32, 1024),
        "blk.0.ffn_down.weight": np.abs(make_data("normal", 32, 1024)),  # non-negative: mins are all -0.0
        "blk.0.attn_v.weight": det_data(32, 1024, 3),  # llama.cpp's quantizer wants one attn_v per layer
    }
    src = tmp_path / "f32.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    for key, value in [
        ("context_length", 256),
        ("embedding_length", 1024),
        ("block_count", 1),
        ("feed_forward_length", 32),
        ("head_count", 8),
        ("head_count_kv", 8),
    ]:
        getattr(w, f"add_{key}")(value)
    w.add_layer_norm_rms_eps(1e-6)
    for tname, t in tensors.items():
        w.add_tensor(tname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    llama_cpp.llama_backend_init()
    for name, ftype in [("Q4_K", 15), ("Q5_K", 17), ("Q6_K", 18)]:
        dst = tmp_path / f"{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.pure, params.nthread = ftype, True, 2
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
        for t in gguf.GGUFReader(str(dst)).tensors:
            ours = CODECS[name].quantize(torch.from_numpy(tensors[t.name])).numpy()
            np.testing.assert_array_equal(ours, np.asarray(t.data).reshape(ours.shape), err_msg=f"{name} {t.name}")


@pytest.mark.parametrize("name", K_QUANTS)
def test_kquant_zero_and_tiny_blocks(name: str) -> None:
    c = CODECS[name]
    x = torch.zeros(3, 256)
    x[1, 5] = 1e-20  # non-zero but below GROUP_MAX_EPS / fp16 range
    x[2, 100:132] = -0.75  # one constant negative sub-block in an otherwise zero block
    raw = c.quantize(x)
    out = c.dequantize(raw)
    assert torch.equal(out[0], torch.zeros(256))
    assert out[1].abs().max() < 1e-6
    assert torch.allclose(out[2, 100:132], torch.full((32,), -0.75), rtol=0.02)
    assert_bits_equal(out.numpy(), gguf_decode(raw, name))


# --------------------------------------------------------------------------------------------------------------------
# error quality


def naive_kquant(x: np.ndarray, name: str) -> np.ndarray:
    """Same code bits without any search and with unquantized float scales: min/max (Q4_K, Q5_K) or absmax (Q6_K)."""
    if name == "Q6_K":
        g = x.reshape(-1, 16).astype(np.float64)
        d = np.abs(g).max(-1, keepdims=True) / 31.5
        d[d == 0] = 1
        return (np.clip(np.round(g / d), -32, 31) * d).reshape(x.shape)
    nmax = 15 if name == "Q4_K" else 31
    g = x.reshape(-1, 32).astype(np.float64)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    d = (hi - lo) / nmax
    d[d == 0] = 1
    return (np.clip(np.round((g - lo) / d), 0, nmax) * d + lo).reshape(x.shape)


# rmse / std measured on make_data(kind, 128, 1024); llama.cpp's bytes give the same figures (bench/codec_rmse.py).
# For scale, on the same data: Q4_0 0.0860 / 0.1184, Q4_1 0.0783 / 0.1078, Q5_1 0.0380 / 0.0534, Q8_0 0.0054 / 0.0110
# (normal / student_t); the naive K variants give Q4_K 0.0783 / 0.1078, Q5_K 0.0380 / 0.0534, Q6_K 0.0208 / 0.0314.
RMSE_FIGURES = {
    ("Q4_K", "normal"): 0.07155,
    ("Q5_K", "normal"): 0.03626,
    ("Q6_K", "normal"): 0.01775,
    ("Q4_K", "student_t"): 0.08653,
    ("Q5_K", "student_t"): 0.04683,
    ("Q6_K", "student_t"): 0.02788,
}


@pytest.mark.parametrize("kind", ["normal", "student_t"])
@pytest.mark.parametrize("name", K_QUANTS)
def test_kquant_error_beats_naive_and_stays_within_recorded_figure(name: str, kind: str) -> None:
    x = make_data(kind, 128, 1024)
    c = CODECS[name]
    ours = rel_rmse(c.dequantize(c.quantize(torch.from_numpy(x))), x)
    naive = rel_rmse(naive_kquant(x, name), x)
    assert ours < naive
    assert ours < RMSE_FIGURES[(name, kind)] * 1.02


@pytest.mark.slow
def test_quantize_one_nano_layer_of_gate_projections_in_tens_of_seconds() -> None:
    import time

    w = torch.randn(232, 384, 1024).to(torch.bfloat16)
    t0 = time.perf_counter()
    raw = CODECS["Q4_K"].quantize(w)
    assert raw.shape == (232, 384, 576)
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("name", list(CODECS))
def test_block_decoding_builds_no_tensor_from_host_data(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF experts kept quantized on CUDA are decoded per token inside a CUDA graph (gguf_experts.py), and a graph
    being captured refuses a copy from host memory: `torch.tensor(list, device=...)` is one. (Q6_K's shift table was,
    and every Q6_K capture failed on an H100.)"""
    c = CODECS[name]
    raw = c.quantize(torch.randn(4, 2 * c.block_size)).view(-1, c.type_size)
    want = c._dequantize_blocks(raw)

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("torch.tensor() from host data while decoding blocks")

    monkeypatch.setattr(torch, "tensor", refuse)
    assert torch.equal(c._dequantize_blocks(raw), want)
