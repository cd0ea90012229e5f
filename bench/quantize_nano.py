"""Time `marco quantize` on a Marco-Nano-shaped checkpoint (real layer shapes, random weights, fewer layers).

Builds the checkpoint in a temporary folder one layer per safetensors shard (hidden 1024, 232 experts x 384, 16/8
heads of 128, vocabulary 151936, tied embeddings; bf16; the offline demo tokenizer padded to the embedding rows),
never holding more than one layer in memory. Then runs `marco quantize` as a child process for each type and reports
wall time, the child's peak RSS (os.wait4 rusage) and the output size; finally loads the q4_k_m file with llama.cpp
(llama-cpp-python) and generates a few tokens.

Usage: python bench/quantize_nano.py [--layers 2] [--to q4_k_m,q8_0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NANO = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "moe_intermediate_size": 384,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_experts": 232,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "hidden_act": "silu",
    "vocab_size": 151936,
    "bos_token_id": 0,
    "eos_token_id": 2,
}


def build_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """Write the checkpoint shard by shard; returns the number of bytes written."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT))
    from marco_local.demo import build_tokenizer, write_tokenizer_files

    cfg = dict(NANO, num_hidden_layers=layers)
    g = torch.Generator().manual_seed(seed)
    D, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * (scale / shape[-1] ** 0.5)).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return (1.0 + 0.05 * torch.randn(n, generator=g)).to(torch.bfloat16)

    n_shards = layers + 1
    weight_map: dict[str, str] = {}

    def save(i: int, tensors: dict) -> None:
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    save(0, {"model.embed_tokens.weight": rnd(cfg["vocab_size"], D, scale=D**0.5), "model.norm.weight": ones(D)})
    for layer in range(layers):
        p = f"model.layers.{layer}."
        t = {
            p + "input_layernorm.weight": ones(D),
            p + "post_attention_layernorm.weight": ones(D),
            p + "self_attn.q_proj.weight": rnd(nq * hd, D),
            p + "self_attn.k_proj.weight": rnd(nkv * hd, D),
            p + "self_attn.v_proj.weight": rnd(nkv * hd, D),
            p + "self_attn.o_proj.weight": rnd(D, nq * hd),
            p + "self_attn.q_norm.weight": ones(hd),
            p + "self_attn.k_norm.weight": ones(hd),
            p + "mlp.gate.weight": rnd(E, D, scale=4.0),
        }
        for e in range(E):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(I, D)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(I, D)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(D, I)
        save(layer + 1, t)
        del t
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    tok = build_tokenizer()
    cfg.update(bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer_files(tok, folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_quantize(src: Path, out: Path, preset: str) -> dict:
    """Run `marco quantize` as a child and reap it with os.wait4, which gives that child's own peak RSS.

    Linux carries the parent's RSS at fork into the child's ru_maxrss, so this process stays small: the checkpoint
    is built in a separate process and nothing heavy (torch) is imported here.
    """
    cmd = [sys.executable, "-m", "marco_local", "quantize", str(src), "-o", str(out), "--to", preset, "--force"]
    with tempfile.TemporaryFile(mode="w+") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        stderr = log.read()
    if proc.returncode:
        raise SystemExit(f"marco quantize --to {preset} failed:\n{stderr}")
    return {
        "preset": preset,
        "seconds": seconds,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "bytes": out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
        "log": stderr,
    }


def run_llama(path: Path, n_tokens: int = 16) -> str:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(path), n_ctx=256, verbose=False, n_threads=2)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = llm.create_completion("The capital of France is", max_tokens=n_tokens, temperature=0.0)
    gen_s = time.perf_counter() - t0
    text = r["choices"][0]["text"]
    n = r["usage"]["completion_tokens"]
    return f"llama.cpp loaded {path.name} in {load_s:.1f} s; generated {n} tokens in {gen_s:.2f} s: {text!r}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--to", default="q4_k_m,q8_0")
    ap.add_argument("--keep", type=Path, help="build/keep the checkpoint and outputs in this folder")
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)  # internal: the builder child
    args = ap.parse_args()
    if args.build_only:
        print(build_checkpoint(args.build_only, args.layers))
        return
    base = args.keep or Path(tempfile.mkdtemp(prefix="marco-nano-bench-"))
    src = base / f"nano-{args.layers}l"
    if not (src / "config.json").is_file():
        src.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--layers", str(args.layers), "--build-only", str(src)]
        nbytes = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"built {src} ({nbytes / 2**30:.2f} GiB bf16, {args.layers} layers) in {time.perf_counter() - t0:.0f} s")
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    results = []
    for preset in args.to.split(","):
        suffix = "" if preset in ("nf4", "fp4", "int8") else ".gguf"  # bitsandbytes presets write a folder
        r = run_quantize(src, base / f"nano-{args.layers}l-{preset}{suffix}", preset)
        results.append(r)
        print(
            f"{preset:7s} {r['seconds']:7.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
            f"output {r['bytes'] / 2**20:8.1f} MiB  (source {src_bytes / 2**20:.0f} MiB)",
            flush=True,
        )
        print(r["log"], flush=True)
    if "q4_k_m" in args.to.split(","):
        print(run_llama(base / f"nano-{args.layers}l-q4_k_m.gguf"))
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
