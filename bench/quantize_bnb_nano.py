"""Time, peak RSS and output size of `write_bnb` on a Marco-Nano-shaped checkpoint (random weights).

Builds, in a child process and one layer per safetensors shard (never the whole model in memory), a bf16 checkpoint
with Marco-Nano's real shapes: hidden 1024, 232 experts x 384 (top 8), 16 query / 8 KV heads of 128, vocabulary
151,936, tied embeddings, transformers 4.x per-expert tensor names; `--layers` of them (Nano has 28). Then quantizes
it in this process with `quant.bnb_writer.write_bnb` and prints the wall time, the peak RSS of this process
(`resource.getrusage`, which counts the memory-mapped source pages it touched) and its RSS before, the output size and
bits per weight per tensor class. Per-layer figures scale to 28 layers linearly (the embedding is written once).

Usage: python bench/quantize_bnb_nano.py [--layers 4] [--preset nf4] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NANO = dict(
    model_type="qwen3_moe",
    architectures=["Qwen3MoeForCausalLM"],
    hidden_size=1024,
    intermediate_size=3072,
    moe_intermediate_size=384,
    num_experts=232,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=32768,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    hidden_act="silu",
    bos_token_id=151643,
    eos_token_id=151645,
    torch_dtype="bfloat16",
)


def build(folder: str, layers: int) -> None:
    """Write the random checkpoint shard by shard (runs in a child process, so its memory is not ours)."""
    from safetensors.torch import save_file

    folder_p = Path(folder)
    cfg = {**NANO, "num_hidden_layers": layers}
    (folder_p / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(0)
    D, I, E, hd = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    weight_map = {}
    n_files = layers + 1

    def save(tensors: dict[str, torch.Tensor], i: int) -> None:
        name = f"model-{i:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(folder_p / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    save(
        {
            "model.embed_tokens.weight": rnd(cfg["vocab_size"], D),
            "model.norm.weight": torch.ones(D, dtype=torch.bfloat16),
        },
        1,
    )
    for layer in range(layers):
        p = f"model.layers.{layer}"
        t = {
            f"{p}.self_attn.q_proj.weight": rnd(nq * hd, D),
            f"{p}.self_attn.k_proj.weight": rnd(nkv * hd, D),
            f"{p}.self_attn.v_proj.weight": rnd(nkv * hd, D),
            f"{p}.self_attn.o_proj.weight": rnd(D, nq * hd),
            f"{p}.self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            f"{p}.self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
            f"{p}.input_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(D, dtype=torch.bfloat16),
            f"{p}.mlp.gate.weight": rnd(E, D),
        }
        for e in range(E):
            t[f"{p}.mlp.experts.{e}.gate_proj.weight"] = rnd(I, D)
            t[f"{p}.mlp.experts.{e}.up_proj.weight"] = rnd(I, D)
            t[f"{p}.mlp.experts.{e}.down_proj.weight"] = rnd(D, I)
        save(t, layer + 2)
        del t
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder_p / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--preset", default="nf4", choices=["nf4", "fp4", "int8"])
    ap.add_argument("--keep", type=Path, help="build the source checkpoint here and keep it (reused if present)")
    ap.add_argument("--threads", type=int, help="torch threads for quantizing (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from marco_local.config import load_config
    from marco_local.formats.checkpoint import Checkpoint
    from quant.bnb_writer import write_bnb

    with tempfile.TemporaryDirectory(prefix="nano-bnb-") as tmp:
        src = args.keep or Path(tmp) / "src"
        if not (src / "config.json").is_file():
            src.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            child = multiprocessing.get_context("spawn").Process(target=build, args=(str(src), args.layers))
            child.start()
            child.join()
            if child.exitcode:
                raise SystemExit(f"building the checkpoint failed ({child.exitcode})")
            print(
                f"built {args.layers}-layer Nano-shaped checkpoint in {time.perf_counter() - t0:.1f} s", file=sys.stderr
            )
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        out = Path(tmp) / "out"
        out.mkdir()
        before = rss_mib()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if now - last[0] > 5 or done == total:
                last[0] = now
                print(f"  {done / total:6.1%}  peak RSS {rss_mib():.0f} MiB", file=sys.stderr)

        t0 = time.perf_counter()
        stats = write_bnb(Checkpoint(src), load_config(src), src, out, args.preset, progress=progress)
        elapsed = time.perf_counter() - t0
        out_bytes = sum(f.stat().st_size for f in out.iterdir())
        print(
            f"preset {args.preset}, {args.layers} Nano-shaped layers (source {src_bytes / 2**20:.0f} MiB bf16), "
            f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} at the end"
        )
        print(f"time {elapsed:.1f} s ({elapsed / args.layers:.1f} s per layer incl. embedding share)")
        print(f"peak RSS {rss_mib():.0f} MiB (before write_bnb: {before:.0f} MiB)")
        print(f"output {out_bytes / 2**20:.0f} MiB in {len(list(out.glob('*.safetensors')))} shard(s)")
        for cls, s in stats.items():
            print(
                f"  {cls:<11} {s['params'] / 1e6:9.2f} M params  {s['bytes'] / 2**20:8.1f} MiB  "
                f"{8 * s['bytes'] / max(1, s['params']):5.2f} bits/weight"
            )


if __name__ == "__main__":
    main()
