"""Compare quant/ggml_codecs.py with llama.cpp's own quantizer (through llama-cpp-python) on the same tensors.

Writes a tiny one-layer F32 llama GGUF holding a few 256x1024 test tensors (gaussian, heavy-tailed student-t df=2,
all-positive, sparse with zero and constant sub-blocks, rows scaled over 8 decades), quantizes it with
`llama_model_quantize` in "pure" mode (every 2-D weight to the preset's base type, no importance matrix: llama.cpp then
runs `quantize_row_*_ref`), reads the result back with gguf.GGUFReader and reports, per type and tensor, the share of
blocks identical to ours and the relative RMSE (rmse / std) of llama.cpp's bytes and ours, both decoded with gguf-py.
Then times quantizing one Marco-Nano layer's gate projections (232 x 384 x 1024, bf16) with our codecs.

Usage: python bench/codec_rmse.py [--skip-timing]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quant.ggml_codecs import CODECS  # noqa: E402

# base type -> llama.cpp ftype whose "pure" mode quantizes every 2-D weight to it
PRESETS = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}


def make_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Row length 1024 (4 K-quant super-blocks), 256 rows each; names only have to be llama tensor names."""
    rng = np.random.default_rng(seed)
    shape = (256, 1024)
    sparse = rng.standard_normal(shape) * (rng.random(shape) < 0.3)
    sparse[::3, :64] = 0  # whole zero sub-blocks and blocks
    sparse[1::3, :32] = -0.5  # constant negative sub-blocks (max == min)
    return {
        "blk.0.ffn_up.weight": rng.standard_normal(shape),  # gaussian
        "blk.0.ffn_gate.weight": rng.standard_t(2, shape) * 0.02,  # heavy tails
        "blk.0.ffn_down.weight": rng.random(shape) * 0.1,  # all positive: the min is clamped to 0
        "blk.0.attn_q.weight": sparse,
        "blk.0.attn_k.weight": rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, 2, (256, 1)),  # row scales
    }


def as_f32(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def write_f32_gguf(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal one-layer llama model: just the metadata llama_model_quantize needs to load the hparams."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(1024)
    w.add_block_count(1)
    w.add_feed_forward_length(256)
    w.add_head_count(8)
    w.add_head_count_kv(8)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    # llama.cpp's quantizer counts attn_v tensors against the layer count
    w.add_tensor("blk.0.attn_v.weight", np.zeros((1024, 1024), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")


def rel_rmse(deq: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((deq.astype(np.float64) - ref) ** 2)) / ref.std())


def compare() -> None:
    import llama_cpp

    llama_cpp.llama_backend_init()
    tensors = as_f32(make_tensors())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "f32.gguf"
        write_f32_gguf(src, tensors)
        # "same values": decoded floats compare equal (-0.0 == 0.0); gguf-py, whose bytes ours match for the legacy
        # types, differs from ggml's C only in the sign of a zero d/m field
        print(f"{'type':6} {'tensor':22} {'same blocks':>11} {'same values':>11} {'llama.cpp':>10} {'ours':>10}")
        for name, ftype in PRESETS.items():
            dst = Path(tmp) / f"{name}.gguf"
            llama_quantize(src, dst, ftype)
            reader = gguf.GGUFReader(str(dst))
            codec = CODECS[name]
            for t in reader.tensors:
                if t.name not in tensors:
                    continue
                assert t.tensor_type == codec.ggml_type, (t.name, t.tensor_type)
                x = tensors[t.name]
                theirs = np.asarray(t.data).reshape(x.shape[0], -1)
                ours = codec.quantize(torch.from_numpy(x)).numpy()
                blocks_t = theirs.reshape(-1, codec.type_size)
                blocks_o = ours.reshape(-1, codec.type_size)
                same = float(np.mean(np.all(blocks_t == blocks_o, axis=1)))
                deq_t = gguf.quants.dequantize(theirs, codec.ggml_type)
                deq_o = gguf.quants.dequantize(ours, codec.ggml_type)
                same_values = bool(np.array_equal(deq_t, deq_o))
                r_t, r_o = rel_rmse(deq_t, x), rel_rmse(deq_o, x)
                print(f"{name:6} {t.name:22} {same:11.4f} {same_values!s:>11} {r_t:10.5f} {r_o:10.5f}")


def timing() -> None:
    w = torch.randn(232, 384, 1024, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for name in ("Q4_K", "Q5_K", "Q6_K", "Q8_0"):
        t0 = time.perf_counter()
        raw = CODECS[name].quantize(w)
        dt = time.perf_counter() - t0
        print(
            f"{name}: quantize 232x384x1024 bf16 -> {tuple(raw.shape)} in {dt:.1f} s "
            f"({torch.get_num_threads()} worker threads)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    compare()
    if not args.skip_timing:
        timing()


if __name__ == "__main__":
    main()
