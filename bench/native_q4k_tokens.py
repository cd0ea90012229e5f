"""Time native.matmul for Q4_K with several tokens (prefill's expert products): 384 x 1024 and 2048 x 1024 matrices,
M = 1, 4, 16, 45, 128 tokens, 1 and 2 threads, matrices warm in cache.

Usage: python3 bench/native_q4k_tokens.py. Prints the best of 5 runs per case, in us per call. To compare two
checkouts, run it from each (with PYTHONPATH set to the checkout) alternately: the machine's timings drift.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco_local import native  # noqa: E402
from quant.ggml_codecs import codec_for  # noqa: E402


def best_time(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, k: int, reps: int, runs: int = 5) -> float:
    for _ in range(min(reps, 20)):
        native.matmul(x, raw, ggml_type, k)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(reps):
            native.matmul(x, raw, ggml_type, k)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def main() -> None:
    c = codec_for("Q4_K")
    torch.manual_seed(0)
    k = 1024
    print("rows threads M us")
    for n in (384, 2048):
        raw = c.quantize(torch.randn(n, k)).reshape(n, -1)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for m in (1, 4, 16, 45, 128):
                reps = max(5, int(20000 * 384 / n / m))  # ~0.1-0.2 s per run
                t = best_time(torch.randn(m, k), raw, c.ggml_type, k, reps)
                print(f"{n} {threads} {m} {t * 1e6:.1f}", flush=True)


if __name__ == "__main__":
    main()
