"""Where a CPU decode step's time goes: each native entry point timed per call, the rest is Python and torch glue.

Usage: python3 bench/profile_decode.py MODEL.gguf [--tokens 64] [--threads 2] [--context 512]

Loads the GGUF as `marco run` does, fills the KV cache with a `--context`-token prompt (attention's cost grows with
it), then decodes `--tokens` tokens greedily with every call into the native library timed (wall clock; a ctypes call
holds the interpreter, so per-call times add up to the native share of the step). Prints one row per stage: calls per
token, us per token, share of the step.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch

from marco_local.decode import decode_step
from marco_local.generate import prefill
from marco_local.kernels import native
from marco_local.layers.kv_cache import make_cache
from marco_local.runtime import load

# native entry point -> the stage it is in a decode step (marco_matmul is told apart by its row count)
STAGES = {
    "marco_rms_norm": "RMSNorm",
    "marco_matmul_multi": "q/k/v products",
    "marco_attn_decode": "attention (q/k norm, RoPE, cache, softmax)",
    "marco_route": "router (logits, top-k)",
    "marco_moe_routed": "MoE: router and 8 experts (SwiGLU)",
    "marco_moe": "MoE or dense FFN (SwiGLU)",
    "marco_dequant_rows": "embedding row",
}


class TimedLibrary:
    """Stands in for the ctypes library: forwards every call, adding its wall time to `seconds[stage]`."""

    def __init__(self, lib, vocab: int) -> None:
        self._lib, self._vocab = lib, vocab
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str):
        fn = getattr(self._lib, name)
        if not name.startswith("marco_"):
            return fn

        def timed(*args):
            start = time.perf_counter()
            result = fn(*args)
            if name == "marco_matmul":
                stage = "output matrix (logits)" if args[3] == self._vocab else "attention output product"
            else:
                stage = STAGES.get(name, name)
            self.seconds[stage] += time.perf_counter() - start
            self.calls[stage] += 1
            return result

        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load(str(args.model), device="cpu")
    model = loaded.model
    vocab = model.config.vocab_size
    decoder = decode_step(model)
    if decoder is None:
        raise SystemExit("this model has no native decode step (bf16 GGUF on the CPU with native kernels)")
    cache = make_cache(model, args.context + args.tokens + 8)  # + the warm-up tokens
    prompt = torch.randint(0, vocab, (1, args.context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = prefill(model, prompt, cache)
        for _ in range(4):  # warm-up
            logits = model(logits[:, -1].float().argmax(-1, keepdim=True), cache)
        timed = TimedLibrary(native.library(), vocab)
        native._lib, decoder.lib = timed, timed  # the MoE blocks reach the library through native.library()
        start = time.perf_counter()
        for _ in range(args.tokens):
            logits = model(logits[:, -1].float().argmax(-1, keepdim=True), cache)
        total = time.perf_counter() - start
    n = args.tokens
    print(f"{args.model.name}: {n} tokens after a {args.context}-token prompt, {args.threads} threads: "
          f"{n / total:.1f} tok/s, {total / n * 1e6:.0f} us per token")  # fmt: skip
    print(f"{'stage':<44} {'calls/token':>11} {'us/token':>9} {'share':>6}")
    rows = sorted(timed.seconds.items(), key=lambda kv: -kv[1])
    glue = total - sum(timed.seconds.values())
    for stage, sec in [*rows, ("Python and torch between the calls", glue)]:
        calls = f"{timed.calls[stage] / n:.0f}" if stage in timed.calls else ""
        print(f"{stage:<44} {calls:>11} {sec / n * 1e6:>9.0f} {sec / total:>6.1%}")


if __name__ == "__main__":
    main()
