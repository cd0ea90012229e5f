"""CUDA speed of a Marco-Nano-shaped model: fully resident, and with its experts offloaded under a VRAM budget.

Model: Marco-Nano's real shapes and all 28 layers (hidden 1024, 232 experts x 384, top-8, 16/8 heads of 128,
vocabulary 151936, tied embeddings), random bf16 weights drawn on the GPU (no checkpoint file: a 16 GB file would
cost more device time than the measurements). Random routers route almost uniformly; `synthetic` rows replace the
router for decode tokens by a trace with Qwen3-30B-A3B-like locality (bench/offload_speed.py's use_trace_routing;
use_trace_slots for the graphed decode).

Measures, in one process:
  ceiling    device-to-device copy bandwidth (bytes read + written) and pinned host-to-device bandwidth
  resident   prefill tok/s (512-token prompt) and decode tok/s (fixed random token ids fed one per step): eager with
             the gathered single-token experts (default on CUDA), eager with the grouped loop (one host sync per
             layer), and replayed from CUDA graphs (marco_local/decode/cuda_graphs.py, what `marco run` uses);
             the bandwidth bound = measured copy bandwidth / bytes a decode step must read (non-expert weights,
             8 experts per layer, the KV cache at the mean position); ratio = ours / bound
  offloaded  the same model under --gpu-mem budgets (8, 4, 2 GiB by default) and --experts-resident 50%: the slow
             tier is pinned host RAM. "copy" rows copy misses on a side stream (--expert-misses copy), decode replayed
             from CUDA graphs cut at each MoE layer, and eager; "direct" rows read missing experts in place from
             pinned RAM (--expert-misses direct, what `marco run` takes on CUDA: one graph, no cut); decode tok/s
             against the graphed resident model, hit rate, MiB moved per token, peak VRAM
             (torch.cuda.max_memory_allocated) against the budget
  cpu expert one expert's SwiGLU on the CPU for one token (what computing a miss where it lies would cost)
Prints a table; `--json FILE` writes every figure.

With `--format nf4` the attention and expert linears are bitsandbytes nf4 (quantized on the GPU as `marco quantize
--to nf4` would write them, then prepared as load_bnb_model does on CUDA: experts stacked, attention dequantized),
the q4 model of the issue's 8/4/2 GiB budgets.

With `--format gguf` the model is a Nano-shaped Q4_K_M GGUF (written once by our codecs: bench_vs_llamacpp.py's
write_marco_gguf) loaded as `marco run FILE --device cuda` loads it: every tensor dequantized to bf16 (`--gguf-experts
dense`, resident rows only), or the experts kept as the file's blocks (`quantized`, gguf_experts.py: resident and
offloaded rows, the experts' blocks in pinned host RAM).

Usage: python bench/cuda_speed.py [--layers 28] [--tokens 64] [--budgets 8GiB,4GiB,2GiB] [--format bf16|nf4|gguf]
       [--gguf-experts dense|quantized] [--modes graphs,eager] [--routings real,synthetic] [--no-extra]
       [--no-prefetch] [--no-cpu-misses] [--no-direct] [--no-budget-copies] [--json FILE]
Each offloaded row reports its peak VRAM minus its budget ("over MB"): a fresh process's, as cuBLAS's workspaces are
cleared between rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from offload_speed import use_trace_routing  # noqa: E402
from quantize_nano import NANO  # noqa: E402

from marco_local.config import ModelConfig  # noqa: E402
from marco_local.decode import decode_step, set_decode_step
from marco_local.decode.cuda_graphs import GraphedDecoder  # noqa: E402
from marco_local.generate import prefill  # noqa: E402
from marco_local.layers.kv_cache import make_cache  # noqa: E402
from marco_local.load.gguf import load_gguf  # noqa: E402
from marco_local.load.meta import meta_device  # noqa: E402
from marco_local.models import qwen3_moe  # noqa: E402
from marco_local.offload import Placement, install, offload_stats, synthetic_trace  # noqa: E402
from marco_local.offload.store import tensor_bytes  # noqa: E402

GIB = 1 << 30


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(layers: int, device: str = "cuda", seed: int = 0) -> qwen3_moe.Qwen3MoeForCausalLM:
    """Random bf16 weights drawn directly in VRAM, scaled by 1/sqrt(fan_in) like bench/quantize_nano.py's."""
    cfg = ModelConfig.from_dict(dict(NANO, num_hidden_layers=layers))
    with meta_device():
        model = qwen3_moe.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.to_empty(device=device)
    model.lm_head.weight = model.model.embed_tokens.weight
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0, generator=g)
            else:
                p.normal_(0.0, (4.0 if name.endswith("mlp.gate.weight") else 1.0) / p.shape[-1] ** 0.5, generator=g)
    return model.eval()


def use_trace_slots(model, layers: int, tokens: int, seed: int = 0) -> None:
    """The graphed decode's counterpart of use_trace_routing: each cut layer's host step places the experts of the
    next token of a synthetic trace (the computed weights stay the router's, which changes no timing)."""
    cfg = model.config
    trace = synthetic_trace(layers, cfg.num_experts, cfg.num_experts_per_tok, tokens, seed=seed)
    rows: dict[int, list[list[int]]] = {}
    for ev in trace.events:
        rows.setdefault(ev.layer, []).append(ev.experts[0])
    for x in model.offload.layers:
        step, place, split = iter(rows[x.layer]), x.slots_for_token, x.split_for_token
        x.slots_for_token = lambda row, h, guess=None, step=step, place=place: place(next(step), h, guess)
        x.split_for_token = lambda row, h, step=step, split=split: split(next(step), h)


def copy_bandwidth(nbytes: int = 2 * GIB) -> tuple[float, float]:
    """(device-to-device bytes/s counting read + write, pinned host-to-device bytes/s)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    host = torch.empty(nbytes // 4, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes // 4, dtype=torch.uint8, device="cuda")

    def timed(fn, reps: int = 10) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(reps):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    d2d = 2 * nbytes / timed(lambda: b.copy_(a))
    h2d = host.nbytes / timed(lambda: dev.copy_(host, non_blocking=True))
    return d2d, h2d  # the buffers go with this frame; main() empties the cache after the resident model


def to_nf4(model: qwen3_moe.Qwen3MoeForCausalLM) -> qwen3_moe.Qwen3MoeForCausalLM:
    """Every attention and expert linear quantized in place by bitsandbytes (nf4, blocks of 64, nested absmax: what
    `marco quantize --to nf4` writes), as the bnb loader holds them; embeddings, norms and routers stay bf16."""
    import bitsandbytes.functional as bnbF

    from marco_local.layers.bnb import Linear4bit, QuantizedExperts
    from marco_local.load.bnb import prepare_for_cuda_graphs

    def q(w: torch.Tensor) -> Linear4bit:
        packed, state = bnbF.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
        return Linear4bit(packed, state, None)

    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(attn, name, q(getattr(attn, name).weight))
            ex = layer.mlp.experts
            layer.mlp.experts = QuantizedExperts(*([q(w) for w in t] for t in (ex.gate_proj, ex.up_proj, ex.down_proj)))
    prepare_for_cuda_graphs(model)  # what load_bnb_model does on CUDA
    return model


def gguf_file(path: Path, layers: int) -> None:
    """The Marco-Nano-shaped Q4_K_M GGUF (bench_vs_llamacpp.py's random model, encoded by our codecs), written once."""
    if path.exists():
        return
    from bench_vs_llamacpp import write_marco_gguf

    t = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    write_marco_gguf(tmp, mix="q4_k_m", layers=layers)
    tmp.rename(path)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)


def release() -> None:
    """Free what the last model left: its tensors, the allocator's cache and cuBLAS's per-stream workspaces (kept
    for the life of a process otherwise), so each row's peak VRAM is that of a fresh process."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
        torch.cuda.empty_cache()


def decode_bytes(model, position: int) -> int:
    """Bytes one decode step must read: every non-expert tensor once (tied embeddings counted once, as lm_head),
    top-k experts per layer (however they are stored), the KV cache up to `position`."""
    cfg = model.config
    experts = [layer.mlp.experts for layer in model.model.layers]
    fixed = tensor_bytes(model, skip={id(e) for e in experts})
    per_expert = sum(tensor_bytes(e) for e in experts) / (len(experts) * cfg.num_experts)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * position
    return int(fixed + cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert + kv)


@torch.inference_mode()
def timed_run(model, prompt: list[int], stream: list[int], repeats: int = 2) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s), best of `repeats`; the stream is fed one token per forward."""
    best_p = best_d = 0.0
    device = model.model.norm.weight.device
    for _ in range(repeats):
        cache = make_cache(model, len(prompt) + len(stream))
        sync()
        t0 = time.perf_counter()
        prefill(model, torch.tensor([prompt], device=device), cache)
        sync()
        best_p = max(best_p, len(prompt) / (time.perf_counter() - t0))
        rt = getattr(model, "offload", None)
        if rt is not None:
            rt.reset_stats()
        tokens = torch.tensor(stream, device=device).view(-1, 1, 1)
        sync()
        t0 = time.perf_counter()
        for t in tokens:
            model(t, cache)
        sync()
        best_d = max(best_d, len(stream) / (time.perf_counter() - t0))
    return best_p, best_d


def cpu_expert_seconds(cfg: ModelConfig, threads: int) -> float:
    """One token through one bf16 expert on the CPU (median of 50)."""
    torch.set_num_threads(threads)
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    gate, up, down = torch.randn(I, D).bfloat16(), torch.randn(I, D).bfloat16(), torch.randn(D, I).bfloat16()
    x = torch.randn(1, D).bfloat16()
    times = []
    for _ in range(55):
        t0 = time.perf_counter()
        F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        times.append(time.perf_counter() - t0)
    return sorted(times[5:])[25]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--budgets", default="8GiB,4GiB,2GiB", help="'' for none")
    ap.add_argument("--extra", action=argparse.BooleanOptionalAction, default=True, help="a 50%% resident row")
    ap.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True, help="a 25%% + prefetch row")
    ap.add_argument("--cpu-misses", action=argparse.BooleanOptionalAction, default=True, help="--expert-misses cpu")
    ap.add_argument(
        "--direct",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--expert-misses direct rows (50%% resident, and each budget; real routing only)",
    )
    ap.add_argument(
        "--budget-copies",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the budgets' --expert-misses copy rows (off: their direct rows only)",
    )
    ap.add_argument("--routings", default="real,synthetic", help="the offloaded rows' routings")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    ap.add_argument("--format", choices=("bf16", "nf4", "gguf"), default="bf16", help="nf4: bitsandbytes 4-bit linears")
    ap.add_argument("--gguf", type=Path, default=Path("/tmp/marco-nano-q4_k_m-ours.gguf"), help="--format gguf's file")
    ap.add_argument("--modes", default="graphs,eager", help="the offloaded rows' decode steps")
    ap.add_argument(
        "--gguf-experts",
        choices=("dense", "quantized"),
        default="dense",
        help="--format gguf: experts dequantized, or kept as the file's blocks (then offloaded rows too)",
    )
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    out: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    out["layers"] = args.layers
    d2d, h2d = copy_bandwidth() if cuda else (50e9, 50e9)
    if cuda:
        torch.cuda.empty_cache()
    out.update(d2d_bytes_per_s=d2d, h2d_bytes_per_s=h2d)
    print(f"{out['device']}: copy {d2d / 1e12:.2f} TB/s (read+write), pinned H2D {h2d / 1e9:.1f} GB/s", flush=True)

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 150000, (args.prompt,), generator=g).tolist()
    stream = torch.randint(3, 150000, (args.tokens,), generator=g).tolist()

    if args.format == "gguf":
        gguf_file(args.gguf, args.layers)
        out["gguf_bytes"] = args.gguf.stat().st_size

    def make(offloaded: bool = False) -> qwen3_moe.Qwen3MoeForCausalLM:
        if args.format == "gguf":  # what `marco run FILE.gguf --device cuda` builds (gguf_loader.load_gguf)
            kept = "host" if offloaded else args.gguf_experts
            return load_gguf(args.gguf, dtype=torch.bfloat16, device=torch.device(args.device), cuda_experts=kept)[0]
        model = build(args.layers, args.device)
        return to_nf4(model) if args.format == "nf4" else model

    def graphable(model) -> bool:  # on the CPU (a dry run) the decoder's segments run eagerly
        return GraphedDecoder.supports(model) if cuda else True

    model = make()
    cfg = model.config
    timed_run(model, prompt[:32], stream[:4], repeats=1)  # warm-up: kernels, cuBLAS handles
    rows = []
    p_tps, d_tps = timed_run(model, prompt, stream)
    need = decode_bytes(model, args.prompt + args.tokens // 2)
    bound = d2d / need
    rows.append({"config": f"resident {args.format}, eager", "prefill_tps": p_tps, "decode_tps": d_tps})
    if args.format == "bf16":  # the grouped-loop baseline row: bf16 only
        orig = qwen3_moe.Experts.stacked
        qwen3_moe.Experts.stacked = property(lambda self: False)  # force the grouped loop (host sync per layer)
        p2, d2 = timed_run(model, prompt, stream)
        qwen3_moe.Experts.stacked = orig
        rows.append({"config": "resident, grouped loop", "prefill_tps": p2, "decode_tps": d2})
    decoder = GraphedDecoder(model) if graphable(model) else None
    set_decode_step(model, decoder)
    try:
        p3, d_tps = timed_run(model, prompt, stream)
        graphed = decoder is not None and not decoder.failed
        config = "resident, CUDA graphs" if graphed else "resident, not graphed (eager)"
        rows.append({"config": config, "prefill_tps": p3, "decode_tps": d_tps})
    except Exception as e:  # an error in the graphed step must not cost the other measurements
        print(f"CUDA graphs failed: {type(e).__name__}: {e}", flush=True)
    set_decode_step(model, None)
    del decoder  # it holds the model: the offloaded rows' VRAM must not count this one
    resident_tps = d_tps
    out.update(decode_bytes=need, bandwidth_bound_tps=bound, resident_decode_tps=d_tps, resident_prefill_tps=p_tps)
    print(json.dumps(rows), flush=True)
    print(
        f"decode reads {need / 1e6:.0f} MB/token -> bound {bound:.0f} tok/s; ours {d_tps:.1f} tok/s "
        f"= {d_tps / bound:.3f} of the bound",
        flush=True,
    )
    del model
    release()

    ctx = args.prompt + args.tokens
    # on the CPU (a dry run) an in-RAM model takes no --ram-mem: percentages stand in for the budgets
    budgets = [b for b in args.budgets.split(",") if b] if cuda else ["50%", "25%"]
    if args.format == "gguf" and (args.gguf_experts == "dense" or not cuda):  # offloaded: quantized experts only
        budgets, args.extra, args.prefetch = [], False, False
    key = "gpu_mem" if cuda else "experts_resident"
    copy_budgets = budgets if args.budget_copies else []
    placements = [(f"{b} copy", Placement(**{key: b}, misses="copy", ctx=ctx)) for b in copy_budgets]
    # the middle budget with misses computed on the CPU from pinned RAM instead of copied (--expert-misses cpu)
    if budgets and args.cpu_misses:
        middle = budgets[len(budgets) // 2]
        placements.append((f"{middle} cpu misses", Placement(**{key: middle}, misses="cpu", ctx=ctx)))
    if args.extra:
        placements.append(("50% resident copy", Placement(experts_resident="50%", misses="copy", ctx=ctx)))
    if args.direct and cuda:  # the GPU reads missing experts from pinned RAM in place: no cut (offload/direct.py)
        placements.append(("50% resident direct", Placement(experts_resident="50%", misses="direct", ctx=ctx)))
        placements += [(f"{b} direct", Placement(**{key: b}, misses="direct", ctx=ctx)) for b in budgets]
    if args.prefetch:
        placements.append(("prefetch", Placement(experts_resident="25%", prefetch=True, ctx=ctx)))

    def offloaded_rows(label: str, placement: Placement, routing: str) -> list[dict]:
        """The rows of one offloaded configuration, one per decode mode."""
        found = []
        model = make(offloaded=True)
        install(model, placement)
        gc.collect()
        torch.cuda.empty_cache()
        # the decode step `marco run` takes (CUDA graphs, cut at each MoE layer), then the eager one
        for mode in args.modes.split(","):  # on the CPU (a dry run) the decoder's segments run eagerly
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            set_decode_step(model, None)
            if mode == "graphs":
                if not graphable(model):
                    print(f"{label}: not graphed (bnb linears, or fewer slots than experts per token)", flush=True)
                    continue
                set_decode_step(model, GraphedDecoder(model))
                if routing == "synthetic":
                    use_trace_slots(model, args.layers, 4 * (args.tokens + 8))
            elif routing == "synthetic":
                use_trace_routing(model, args.layers, 4 * (args.tokens + 8))
            p_tps, d_tps = timed_run(model, prompt, stream)
            if mode == "graphs" and decode_step(model).failed:
                mode = "graphs FAILED (eager)"
            st = offload_stats(model)
            plan = model.offload.plan
            row = {
                "config": f"{label}, {routing}, {mode}",
                "prefill_tps": p_tps,
                "decode_tps": d_tps,
                "vs_resident": d_tps / resident_tps,
                "resident_pct": 100.0 * plan.slots / cfg.num_experts,
                "hit_rate": st.hit_rate,
                "mib_per_token": st.bytes_moved / args.tokens / 2**20,
                "mib_read_in_place_per_token": st.bytes_read_in_place / args.tokens / 2**20,
                "stall_ms_per_token": 1e3 * st.stall_s / args.tokens,
                "prefetch_precision": st.prefetch_precision,
                "cpu_experts_per_token": st.cpu_experts / args.tokens,
                "miss_copy_us": st.miss_copy_us,
                "miss_cpu_us": st.miss_cpu_us,
                "prefetch_recall": st.prefetch_recall,
                "fast_bytes": st.fast_bytes,
                "peak_vram": torch.cuda.max_memory_allocated() if cuda else 0,
                "allocated_after_install": base,
                "budget": plan.budget,
                "over_budget": torch.cuda.max_memory_allocated() - plan.budget if cuda and plan.budget else None,
            }
            found.append(row)
            print(json.dumps(row), flush=True)
        model.offload.close()
        del model
        release()
        return found

    for label, placement in placements:
        for routing in args.routings.split(","):
            if placement.misses == "direct" and routing != "real":  # a synthetic trace replaces a cut's routing
                continue
            try:  # one failing row (a new miss mode on a new GPU) must not cost the rows after it
                rows.extend(offloaded_rows(label, placement, routing))
            except Exception as e:
                print(f"{label}, {routing}: FAILED: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", flush=True)
            release()  # after the handler: a failed row's model is freed with its traceback
    out["cpu_expert_s"] = {n: cpu_expert_seconds(cfg, n) for n in (1, 4, 16)}
    out["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    head = ["prefill", "decode", "x res", "res%", "hit", "MiB/t", "VRAM GiB", "over MB"]
    widths = (9, 8, 6, 5, 5, 6, 9, 8)
    print(f"\n{'config':32} " + " ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)))
    for r in rows:
        print(
            f"{r['config']:32} {r['prefill_tps']:9.0f} {r['decode_tps']:8.1f} {r.get('vs_resident', 1.0):6.2f} "
            f"{r.get('resident_pct', 100.0):5.0f} {r.get('hit_rate', 1.0):5.2f} {r.get('mib_per_token', 0.0):6.1f} "
            f"{r.get('peak_vram', 0) / GIB:9.2f} "
            + (f"{r['over_budget'] / 1e6:8.0f}" if r.get("over_budget") is not None else f"{'':8}")
        )
    print(f"bandwidth bound {bound:.0f} tok/s; resident decode / bound = {resident_tps / bound:.3f}")
    print("one expert, one token on the CPU (bf16):", {k: f"{v * 1e6:.0f} us" for k, v in out["cpu_expert_s"].items()})


if __name__ == "__main__":
    main()
