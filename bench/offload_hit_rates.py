"""Expert-cache hit rate of each policy against cache size, on real and synthetic routing traces (offline simulator).

Traces (decode events only, one token per layer call):
  demo       the built-in demo model (16 experts, top-4, random weights) fed a multilingual text token by token;
             random weights route almost uniformly, so this is close to the no-locality worst case
  synthetic  28 layers x 232 experts, top-8, Qwen3-30B-A3B-like locality (~45% of a token's experts repeat at the
             next token, ~80% within 8; `synthetic_trace` defaults, measured locality printed)
  uniform    the same shape with no locality (every expert drawn afresh; Zipf skew 0)
  FILE       any trace recorded with `marco run --trace FILE` / `marco profile --trace FILE` (--trace, repeatable)
Policies: lru and lfu start cold on the second half of the trace; static is given a profile (per-layer expert counts)
of the first half, which also warms its cache; direct is `--expert-misses direct`'s on-device LRU (cold start,
`simulate_direct`). Replays use the live cache's own `SlotTable` (direct: its own route step), so these are the hit
rates `marco run` would count (tests/test_offload.py checks the equality).

Usage: python bench/offload_hit_rates.py [--tokens 512] [--trace FILE ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from marco_local.decode import forward  # noqa: E402
from marco_local.layers.kv_cache import make_cache  # noqa: E402
from marco_local.offload import Trace, locality, record_trace, simulate, synthetic_trace  # noqa: E402
from marco_local.offload.profile import counts_from_trace  # noqa: E402
from marco_local.offload.trace import simulate_direct  # noqa: E402

SIZES = (0.05, 0.10, 0.25, 0.50, 0.75)
TEXT = (
    "The capital of France is Paris. Marco is a mixture-of-experts language model. "
    "La capitale de la France est Paris. Die Hauptstadt von Deutschland ist Berlin. "
    "La capital de España es Madrid. Türkiye'nin başkenti Ankara'dır. Столица России — Москва. "
    "法国的首都是巴黎。日本の首都は東京です。한국의 수도는 서울입니다. Ibu kota Indonesia adalah Jakarta. "
)


@torch.inference_mode()
def demo_trace(tokens: int) -> Trace:
    from marco_local.runtime import load

    lm = load("demo", dtype="f32", device="cpu")
    ids = (lm.tokenizer.encode(TEXT) * (tokens // 20 + 2))[: tokens + 1]
    cache = make_cache(lm.model, len(ids))
    with record_trace(lm.model) as trace:
        for t in ids:  # one token per call: decode-shaped events
            forward(lm.model, torch.tensor([[t]]), cache)
    return trace


def split(trace: Trace) -> tuple[Trace, Trace]:
    """(first half, second half) by token position."""
    last = max(e.token for e in trace.events)
    first = Trace(trace.num_layers, trace.num_experts, trace.top_k, [e for e in trace.events if e.token <= last // 2])
    second = Trace(trace.num_layers, trace.num_experts, trace.top_k, [e for e in trace.events if e.token > last // 2])
    return first, second


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--trace", type=Path, action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    traces = {
        "demo (real, random weights)": demo_trace(args.tokens),
        "synthetic (Qwen3-30B-A3B-like locality)": synthetic_trace(28, 232, 8, args.tokens, seed=0),
        "uniform (no locality)": synthetic_trace(28, 232, 8, args.tokens, repeat=0.0, within=0.0, skew=0.0),
    }
    for path in args.trace:
        traces[str(path)] = Trace.load(path).decode_only()
    header = " | ".join(f"{s:.0%}" for s in SIZES)
    print(f"| trace | locality next / within 8 | policy | {header} |")
    print("|---|---|---|" + "---|" * len(SIZES))
    for name, trace in traces.items():
        at_next, within8 = locality(trace)
        first, second = split(trace)
        profile = {k: [float(c) for c in v] for k, v in counts_from_trace(first).items()}
        for policy in ("lru", "lfu", "static", "direct"):
            cells = []
            for frac in SIZES:
                slots = max(1, round(frac * trace.num_experts))
                if policy == "direct":  # the on-device LRU of --expert-misses direct
                    sim = simulate_direct(second, slots)
                else:
                    sim = simulate(second, policy, slots, profile=profile if policy == "static" else None)
                cells.append(f"{sim.hit_rate:.0%}")
            loc = f"{at_next:.0%} / {within8:.0%}"
            print(f"| {name} | {loc} | {policy} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
