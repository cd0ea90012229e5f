"""Decode speed with 50/25/10% of the experts resident (the rest read from the checkpoint file) against fully resident.

Model: Marco-Nano-shaped bf16 Hugging Face checkpoint with random weights (bench/quantize_nano.py's builder: hidden
1024, 232 experts x 384, top-8, 16/8 heads of 128) and fewer layers; the vocabulary is scaled with the layer count
(151936 x layers / 28) so that lm_head keeps its real share of a token's work. Two routings:
  real      the model's own router (random weights route almost uniformly: a worst case for any cache)
  synthetic the router replaced, for decode tokens, by a synthetic trace with Qwen3-30B-A3B-like locality
            (~45% of a token's experts repeat at the next token, ~80% within 8; marco_local.offload.synthetic_trace)
Each run prefills the same prompt, then times `--tokens` decode steps fed with fixed random token ids (tok/s, best
of two passes), and reports the expert hit rate, MiB read per token and time stalled on misses per token. The file's
pages are in the OS page cache after the first pass (as on a machine with spare RAM); that is not the process's
memory.

With `--gguf FILE` (a Marco-Nano-shaped Q4_K_M GGUF, e.g. bench/bench_vs_llamacpp.py's), the model is that file:
fully resident = the native kernels on the memory-mapped file, pages prefaulted at load (without the native kernels:
every expert repacked into RAM); offloaded = the experts left in the file (`experts_in_file`), read as raw ggml blocks
with os.preadv into a slot on a miss (repacked into the int4 form without the native kernels). Load time
and the process RSS (psutil; peak over the run, VmHWM reset before each load) are reported per configuration;
offloaded configurations run first so that the resident model's freed heap does not blur their RSS.

Usage: python bench/offload_speed.py [--layers 4] [--tokens 32] [--threads 1] [--keep DIR] [--gguf FILE]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize_nano  # noqa: E402

from marco_local.decode import forward  # noqa: E402
from marco_local.generate import prefill  # noqa: E402
from marco_local.layers.kv_cache import make_cache  # noqa: E402
from marco_local.load.checkpoint import load_model  # noqa: E402
from marco_local.load.offloaded import load_offloaded  # noqa: E402
from marco_local.offload import Placement, install, offload_stats, synthetic_trace  # noqa: E402


def use_trace_routing(model, layers: int, tokens: int, seed: int = 0) -> None:
    """Replace each MoE block's router for single-token calls by the next token of a synthetic trace."""
    cfg = model.config
    trace = synthetic_trace(layers, cfg.num_experts, cfg.num_experts_per_tok, tokens, seed=seed)
    per_layer: dict[int, list[list[int]]] = {}
    for ev in trace.events:
        per_layer.setdefault(ev.layer, []).append(ev.experts[0])
    for i, layer in enumerate(model.model.layers):
        block, rows, real = layer.mlp, per_layer[i], layer.mlp.route
        step = iter(rows)

        def route(x, rows=rows, step=step, real=real):
            if x.shape[0] != 1:
                return real(x)
            idx = torch.tensor([next(step)], device=x.device)
            return idx, torch.full(idx.shape, 1.0 / idx.shape[1], dtype=x.dtype, device=x.device)

        block.route = route  # replaced on the instance: the native decoder then routes through it


def evict_file_pages(folder: Path) -> None:
    """Drop the checkpoint's pages from the OS page cache (only this file's pages: nothing else is affected)."""
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@torch.inference_mode()
def timed(
    model, prompt: list[int], stream: list[int], repeats: int = 2, cold: Path | None = None
) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s): prefill `prompt` as the runtime does (`generate.prefill`), then feed `stream` one
    token per forward (what a decode step computes). Tokens are fed rather than sampled because a random model's own
    text repeats one token (tied random embeddings), which would make its routing trivially local. Best of `repeats`
    passes (shared CPU); with `cold`, that folder's file pages are evicted before each pass.
    """
    best_p = best_d = 0.0
    device = next(model.parameters()).device
    for _ in range(repeats):
        if cold is not None:
            evict_file_pages(cold)
        cache = make_cache(model, len(prompt) + len(stream))
        t0 = time.perf_counter()
        prefill(model, torch.tensor([prompt], device=device), cache)
        best_p = max(best_p, len(prompt) / (time.perf_counter() - t0))
        rt = getattr(model, "offload", None)
        if rt is not None:
            rt.reset_stats()  # decode only
        t0 = time.perf_counter()
        for token in stream:
            forward(model, torch.tensor([[token]], device=device), cache)
        best_d = max(best_d, len(stream) / (time.perf_counter() - t0))
    return best_p, best_d


def rss(key: str = "VmRSS:") -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def gguf_main(args) -> None:
    from marco_local.layers.gguf import trim_heap
    from marco_local.load.gguf import load_gguf

    path = args.gguf
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 700, (args.prompt,), generator=g).tolist()
    stream = torch.randint(3, 700, (args.tokens,), generator=g).tolist()
    runs = [(f"{p}%", p, False) for p in (50, 25, 10)] + [(f"{p}% + prefetch", p, True) for p in (50, 25, 10)]
    results = {}  # (routing, name) -> (load_s, prefill, tps, stats, rss_peak)

    def measure(routing: str, name: str, make) -> None:
        gc.collect()
        trim_heap()
        before = rss()
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        t = time.perf_counter()
        model = make()
        load_s = time.perf_counter() - t
        layers = model.config.num_hidden_layers
        if routing == "synthetic":
            use_trace_routing(model, layers, 4 * args.tokens + 64)
        timed(model, prompt[:8], stream[:4], repeats=1)
        prefill, tps = timed(model, prompt, stream, repeats=args.repeats)
        st = offload_stats(model)
        results[(routing, name)] = (load_s, prefill, tps, st, rss("VmHWM:") - before, rss("VmHWM:"))
        print(f"{routing} {name}: load {load_s:.1f} s, decode {tps:.2f} tok/s", file=sys.stderr, flush=True)
        if getattr(model, "offload", None) is not None:
            model.offload.close()
        del model

    def offloaded(pct: int, prefetch: bool):
        def make():
            model, _ = load_gguf(path, dtype=torch.bfloat16, experts_in_file=True)
            install(model, Placement(experts_resident=f"{pct}%", prefetch=prefetch), files=[path])
            return model

        return make

    for routing in ("real", "synthetic"):
        for name, pct, prefetch in runs:
            if prefetch and routing == "synthetic":
                continue
            measure(routing, name, offloaded(pct, prefetch))
    for routing in ("real", "synthetic"):
        measure(routing, "resident", lambda: load_gguf(path, dtype=torch.bfloat16)[0])
    print(f"\n{path.name}, bf16 activations, torch threads {args.threads}, file pages warm in the page cache")
    print(f"prefill {args.prompt} tokens in one chunk; decode {args.tokens} tokens; best of {args.repeats} passes\n")
    print(
        "| routing | experts resident | load s | peak RSS GiB (+ over start) | prefill tok/s | vs resident "
        "| decode tok/s | vs resident | hit rate | MiB read/token | stall ms/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for routing in ("real", "synthetic"):
        base = results[(routing, "resident")]
        for name in ["resident"] + [r[0] for r in runs]:
            if (routing, name) not in results:
                continue
            load_s, prefill, tps, st, grown, peak = results[(routing, name)]
            hit = f"{st.hit_rate:.0%}" if st else "-"
            mib = f"{st.bytes_moved / args.tokens / 2**20:.1f}" if st else "-"
            stall = f"{st.stall_s / args.tokens * 1000:.1f}" if st else "-"
            pf = st.prefetch_precision if st else None
            extra = f" (prefetch precision {pf:.0%}, recall {st.prefetch_recall:.0%})" if pf is not None else ""
            mem = f"{peak / 2**30:.2f} (+{grown / 2**30:.2f})"
            speeds = f"{prefill:.1f} | {prefill / base[1]:.2f} | {tps:.2f} | {tps / base[2]:.2f}"
            print(f"| {routing} | {name}{extra} | {load_s:.1f} | {mem} | {speeds} | {hit} | {mib} | {stall} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="build/reuse the checkpoint in this folder")
    ap.add_argument("--prompt", type=int, default=128, help="prefill length (one chunk)")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint's page-cache pages before each pass")
    ap.add_argument("--gguf", type=Path, help="a Marco-Nano-shaped GGUF file instead of a bf16 checkpoint")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per configuration (best is kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.gguf is not None:
        gguf_main(args)
        return
    quantize_nano.NANO["vocab_size"] = round(151936 * args.layers / 28 / 64) * 64
    folder = args.keep or Path(tempfile.gettempdir()) / f"marco-offload-nano-{args.layers}l"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        size = quantize_nano.build_checkpoint(folder, args.layers)
        print(f"built {folder} ({size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 700, (args.prompt,), generator=g).tolist()
    stream = torch.randint(3, 700, (args.tokens,), generator=g).tolist()
    E = quantize_nano.NANO["num_experts"]
    runs = [("resident", None, False)] + [(f"{p}%", p, False) for p in (50, 25, 10)]
    runs += [(f"{p}% + prefetch", p, True) for p in (50, 25, 10)]
    rows = []
    for routing in ("real", "synthetic"):
        base = None
        for name, pct, prefetch in runs:
            if prefetch and routing == "synthetic":
                continue  # the speculation applies the real next router; a replaced router makes it meaningless
            gc.collect()
            if pct is None:
                model = load_model(folder, dtype=torch.bfloat16)
            else:
                model = load_offloaded(folder, Placement(experts_resident=f"{pct}%", prefetch=prefetch), torch.bfloat16)
            if routing == "synthetic":
                use_trace_routing(model, args.layers, 4 * args.tokens + 64)
            timed(model, prompt[:8], stream[:4], repeats=1)  # warm kernels and the page cache
            cold = folder if args.cold and pct is not None else None
            prefill, tps = timed(model, prompt, stream, cold=cold)
            st = offload_stats(model)
            base = base or (prefill, tps)
            rows.append((routing, name, prefill, prefill / base[0], tps, tps / base[1], st, args.tokens))
            if pct is not None:
                model.offload.close()
            del model
    cache = "cold page cache before each pass" if args.cold else "file pages warm in the page cache"
    print(f"\nMarco-Nano-shaped, {args.layers} layers, bf16, {E} experts/layer, torch threads {args.threads}, {cache}")
    print(f"prefill {args.prompt} tokens in one chunk; decode {args.tokens} tokens; best of 2 passes\n")
    print(
        "| routing | experts resident | prefill tok/s | vs resident | decode tok/s | vs resident | hit rate "
        "| MiB read/token | stall ms/token |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for routing, name, prefill, p_ratio, tps, ratio, st, n in rows:
        hit = f"{st.hit_rate:.0%}" if st else "-"
        mib = f"{st.bytes_moved / n / 2**20:.1f}" if st else "-"
        stall = f"{st.stall_s / n * 1000:.1f}" if st else "-"
        pf = st.prefetch_precision if st else None
        extra = f" (prefetch precision {pf:.0%}, recall {st.prefetch_recall:.0%})" if pf is not None else ""
        speeds = f"{prefill:.1f} | {p_ratio:.2f} | {tps:.2f} | {ratio:.2f}"
        print(f"| {routing} | {name}{extra} | {speeds} | {hit} | {mib} | {stall} |")


if __name__ == "__main__":
    main()
