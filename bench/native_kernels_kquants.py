"""Time native.matmul for the K-quants: one token, 768 rows x 1024 inputs, 1 thread, matrix warm in cache; then a
151936 x 1024 Q6_K matrix (an lm_head, ~128 MB, read from memory) at 1 and 2 threads.

Usage: python3 bench/native_kernels_kquants.py [rows] [k] [reps]. Prints the best of 5 runs of `reps` calls per type,
the call overhead (a 1-row matrix: ctypes, activation quantization, output tensor) and the lm_head's GB/s.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco_local.kernels import native  # noqa: E402
from quant.ggml_codecs import codec_for  # noqa: E402


def best_time(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, k: int, reps: int, runs: int = 5) -> float:
    for _ in range(min(reps, 10)):
        native.matmul(x, raw, ggml_type, k)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(reps):
            native.matmul(x, raw, ggml_type, k)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def main() -> None:
    rows, k, reps = (int(a) for a in (sys.argv[1:] + ["768", "1024", "200"][len(sys.argv) - 1 :]))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, k)
    for name in ("Q4_K", "Q5_K", "Q6_K"):
        c = codec_for(name)
        raw = c.quantize(torch.randn(rows, k)).reshape(rows, -1)
        t = best_time(x, raw, c.ggml_type, k, reps)
        t1 = best_time(x, raw[:1], c.ggml_type, k, reps * 4)
        print(f"{name}: {t * 1e6:7.1f} us per {rows}x{k} matvec (1-row call: {t1 * 1e6:.1f} us)")
    # lm_head: tile a small quantized matrix (quantizing 151936 rows takes minutes)
    c = codec_for("Q6_K")
    n = 151936
    small = c.quantize(torch.randn(512, 1024)).reshape(512, -1)
    raw = small.repeat(n // 512 + 1, 1)[:n].contiguous()
    x = torch.randn(1, 1024)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        t = best_time(x, raw, c.ggml_type, 1024, 3, runs=7)
        print(f"Q6_K lm_head {n}x1024, {threads} thread(s): {t * 1e3:.2f} ms, {raw.numel() / t / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
