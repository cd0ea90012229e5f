"""A/B two builds of the native library in one process: decode-shaped calls (one token through 8 Q4_K experts, the
router, attention over 512 positions, a matvec) and a 16-token product, the two libraries' calls interleaved so both
see the same machine noise; prints the best of 40 runs of 5 calls each, in us, and new/old.

Usage: python3 bench/native_ab.py OLD_LIBRARY [threads] [small]
  OLD_LIBRARY: another build's libmarco_ggml.so, e.g. from a checkout of main:
    PYTHONPATH=../main python3 -c "from marco_local.kernels import native; print(native.library()._name)"
  small: shapes that stay in cache (hidden 512, 4 experts of 256), where per-call overheads show.
The new library is this checkout's, for the tier `native.describe()` names (MARCO_NATIVE_ISA picks another).
"""

import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco_local.kernels import native  # noqa: E402
from quant.ggml_codecs import codec_for  # noqa: E402


def load_old(path: str) -> ctypes.CDLL:
    """The calls timed here, bound by hand: an older library may lack functions `native._bind` binds (these calls
    must have this checkout's signatures)."""
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib = ctypes.CDLL(path)
    lib.marco_matmul.argtypes, lib.marco_matmul.restype = [i, p, i64, i, i, p, i, p, i], i
    lib.marco_moe.argtypes, lib.marco_moe.restype = [i, p, p, p, p, i, i, i, i, i, p, p, i], i
    lib.marco_route.argtypes, lib.marco_route.restype = [p, p, i, i, i, i, i, i, p, p, i], i
    lib.marco_attend.argtypes, lib.marco_attend.restype = [p, p, p, i64, i, i, i, i, f, i, p, i], i
    return lib


def main() -> None:
    old, new = load_old(sys.argv[1]), native.library()
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads()
    D, inter, A = (512, 256, 4) if "small" in sys.argv[3:] else (2048, 768, 8)
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    c = codec_for("Q4_K")
    experts = [[c.quantize(torch.randn(*s) * 0.05).reshape(s[0], -1) for _ in range(A)] for s in ((inter, D),) * 2]
    down = [c.quantize(torch.randn(D, inter) * 0.05).reshape(D, -1) for _ in range(A)]
    ptrs = [[t.data_ptr() for t in ts] for ts in (*experts, down)]
    x, rw, router = torch.randn(D), torch.rand(A), torch.randn(128, D).bfloat16()
    w = c.quantize(torch.randn(2048, D)).reshape(2048, -1)
    x16 = torch.randn(16, D)
    keys, values, q = torch.randn(4, 512, 128).bfloat16(), torch.randn(4, 512, 128).bfloat16(), torch.randn(32, 128)
    cases = {
        f"moe {A} experts Q4_K {D}x{inter}, 1 token": lambda: native.moe(x, *ptrs, rw, (12, 12, 12), D, inter),
        "route 128 experts": lambda: native.route(x, router, 8, True),
        "attention 32 heads x 512 positions": lambda: native.attend(q, keys, values, 128**-0.5),
        f"matvec Q4_K 2048x{D}": lambda: native.matmul(x[None], w, 12, D),
        f"matmul Q4_K 2048x{D}, 16 tokens": lambda: native.matmul(x16, w, 12, D),
    }
    print(f"old: {sys.argv[1]}\nnew: {native.describe()}, {threads} thread(s)")
    for name, fn in cases.items():
        best = {"old": float("inf"), "new": float("inf")}
        for run in range(41):
            for tag, lib in (("old", old), ("new", new)) if run % 2 else (("new", new), ("old", old)):
                native.library = lambda lib=lib: lib  # the wrappers reach the library through native.library()
                t = time.perf_counter()
                for _ in range(5):
                    fn()
                if run:  # the first run warms up
                    best[tag] = min(best[tag], (time.perf_counter() - t) / 5)
        ratio = best["new"] / best["old"]
        print(f"{name:40s} old {best['old'] * 1e6:9.1f}  new {best['new'] * 1e6:9.1f}  new/old {ratio:.3f}", flush=True)


if __name__ == "__main__":
    main()
