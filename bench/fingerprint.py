"""Greedy token ids and a hash of every logit, per model and kernel path: the before/after check of a refactoring
that must not change a single output bit.

    python bench/fingerprint.py [--out FILE] [--compare FILE] [--cases demo,smollm2,...]

Each case runs in its own subprocess (the kernel path is chosen by environment variables at import): load the model
through `runtime.load`, prefill a fixed prompt in the generator's chunks, then feed 24 greedy tokens one at a time.
Printed per case: the token ids, and the sha256 of the float32 logits of the prompt's last position and of every
step. `--compare` exits 1 when any case differs from a file written earlier with `--out`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox jumps over the lazy dog. In the beginning, the models were small and the"
STEPS = 24
NANO = "/tmp/marco-bench-nano/nano-q4_k_m.gguf"  # bench/bench_vs_llamacpp.py build

# case -> (model spec, extra environment, runtime.load keyword arguments as JSON-able values)
CASES: dict[str, tuple[str, dict[str, str], dict]] = {
    "demo": ("demo", {}, {}),
    "demo-offload": ("demo", {}, {"experts_resident": "50%"}),
    "smollm2": ("smollm2", {}, {}),
    "smollm2-torch": ("smollm2", {"MARCO_NATIVE": "0"}, {}),
    "nano": (NANO, {}, {}),
    "nano-offload": (NANO, {}, {"ram_mem": "1.5GB"}),
}


def run_case(name: str) -> dict:
    """In this process: the case's token ids and logits hashes."""
    sys.path.insert(0, str(ROOT))
    import torch

    from marco_local import runtime
    from marco_local.decode import forward
    from marco_local.generate import prefill, prefill_chunk
    from marco_local.layers.kv_cache import make_cache

    spec, _, kwargs = CASES[name]
    if spec == "smollm2":
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_vs_llamacpp import smollm2_path

        spec = str(smollm2_path())
    placement = None
    if kwargs:
        from marco_local.offload import Placement

        placement = Placement(**kwargs)
    torch.manual_seed(0)
    loaded = runtime.load(spec, placement=placement)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok.encode(PROMPT)
    cache = make_cache(model, len(ids) + STEPS + 1)
    h = hashlib.sha256()
    tokens = []
    with torch.inference_mode():
        logits = prefill(model, torch.tensor([ids]), cache, prefill_chunk(loaded.device))
        for _ in range(STEPS):
            last = logits[0, -1].float().contiguous()
            h.update(last.numpy().tobytes())
            tokens.append(int(last.argmax()))
            logits = forward(model, torch.tensor([[tokens[-1]]]), cache)
    return {"tokens": tokens, "logits_sha256": h.hexdigest()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out")
    p.add_argument("--compare")
    p.add_argument("--case", help=argparse.SUPPRESS)  # the subprocess's own case
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    results = {}
    for name in args.cases.split(","):
        env = {**os.environ, **CASES[name][1]}
        done = subprocess.run(
            [sys.executable, __file__, "--case", name], env=env, capture_output=True, text=True, timeout=900
        )
        if done.returncode:
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:14s} {json.dumps(results[name])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = [n for n in results if before.get(n) != results[n]]
        print("identical" if not differ else f"DIFFERENT: {', '.join(differ)}")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
