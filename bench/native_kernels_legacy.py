"""Time native.matmul for the 32-weight ggml types: one token, 768 rows x 1024 inputs, 1 thread, matrix warm.

Usage: python3 bench/native_kernels_legacy.py [rows] [k] [reps]. Prints the best of 5 runs of `reps` calls per type.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco_local.kernels import native  # noqa: E402
from quant.ggml_codecs import codec_for  # noqa: E402


def main() -> None:
    rows, k, reps = (int(a) for a in (sys.argv[1:] + ["768", "1024", "200"][len(sys.argv) - 1 :]))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, k)
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        c = codec_for(name)
        raw = c.quantize(torch.randn(rows, k)).reshape(rows, -1)
        for _ in range(10):
            native.matmul(x, raw, c.ggml_type, k)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                native.matmul(x, raw, c.ggml_type, k)
            best = min(best, (time.perf_counter() - t) / reps)
        print(f"{name}: {best * 1e6:7.1f} us per {rows}x{k} matvec")


if __name__ == "__main__":
    main()
