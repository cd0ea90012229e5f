"""Time native.matmul with several tokens (prefill's products) for the types with a 4-token kernel (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): 384 x 1024 and 1024 x 1024 matrices, M = 1, 4, 16, 45, 128 tokens, 1 and 2 threads,
matrices warm in cache.

Usage: python3 bench/native_tokens.py [TYPE ...] (default: Q8_0 Q5_0 Q6_K). Prints the best of 5 runs per case, in us
per call. To compare two checkouts, run a copy of this file with PYTHONPATH set to each checkout, alternately: the
machine's timings drift.
"""

import sys

import torch
from native_kernels_kquants import best_time  # this folder is on sys.path when the script runs

from quant.ggml_codecs import codec_for


def main() -> None:
    names = sys.argv[1:] or ["Q8_0", "Q5_0", "Q6_K"]
    torch.manual_seed(0)
    k = 1024
    print("type rows threads M us")
    for name in names:
        c = codec_for(name)
        for n in (384, 1024):
            raw = c.quantize(torch.randn(n, k)).reshape(n, -1)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for m in (1, 4, 16, 45, 128):
                    reps = max(5, int(10000 * 384 / n / m))  # ~0.05-0.1 s per run
                    t = best_time(torch.randn(m, k), raw, c.ggml_type, k, reps)
                    print(f"{name} {n} {threads} {m} {t * 1e6:.1f}", flush=True)


if __name__ == "__main__":
    main()
