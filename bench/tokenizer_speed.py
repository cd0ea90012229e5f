"""The GGUF tokenizer built by the `tokenizers` library against the native byte-level BPE (C tables, formats/
native_bpe.py and kernels/native/bpe.c, dropped by issue 20), on the same GGUF and the same text.

    python3 bench/tokenizer_speed.py [--models smollm2,nano] [--runs 3] [--native-rev REV]

Per model and backend, each run in a fresh process: the time to build the tokenizer from the opened GGUF's metadata,
the resident memory that building it adds, the time to encode ~10,000 words (first call, then the best of 5), to
decode the ids in one call (best of 5), and to stream them back through `StreamingDetokenizer` as a generation does.
Two texts: this repository's README and docs (prose with code and numbers), and a mix of scripts, digits, emoji and
whitespace. Printed: the median of the runs and native / tokenizers ratios, after checking that both backends give
the same ids and text.

The native backend runs from REV's sources (`git archive`, default: the last commit that has native_bpe.py) when this
checkout no longer has it; its C library is compiled there on first use, before anything is timed.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NANO = Path("/tmp/marco-bench-nano/nano-q4_k_m.gguf")  # bench/bench_vs_llamacpp.py build
WORDS = 10_000
NATIVE_MODULE = "marco_local/formats/native_bpe.py"
MIXED_POOLS = [
    "the quick brown fox jumps over lazy dogs while models answer questions about code".split(),
    ["Grüße", "ça", "Ünïcödé", "naïve", "Ærø", "ß"],
    ["Привет", "мир", "Москва", "ёж"],
    ["你好", "天气", "東京です", "서울", "ひらがな"],
    ["مرحبا", "القاهرة", "नमस्ते", "שלום"],
    ["😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷"],
    ["0", "7", "12345", "3.14", "1,000,000", "2024-11-26"],
    ["don't", "I'M", "we'll", "it's"],
    ["()", "{}", "[]", "->", "==", "!?", "...", "—", "«»", "#", "$"],
]


def texts() -> dict[str, str]:
    """~WORDS words each: the repository's documentation, and seeded random words of many scripts."""
    lines = (ROOT / "README.md").read_text().splitlines() + (ROOT / "docs" / "architecture.md").read_text().splitlines()
    prose, count, i = [], 0, 0
    while count < WORDS:
        line = lines[i % len(lines)]
        prose.append(line)
        count += len(line.split())
        i += 1
    rng = random.Random(0)
    mixed = []
    for _ in range(WORDS):
        mixed.append(rng.choice(rng.choice(MIXED_POOLS)))
        mixed.append(rng.choice(" \n") if rng.random() < 0.1 else " ")
    return {"prose": "\n".join(prose), "mixed": "".join(mixed)}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def child(backend: str, model: str) -> None:
    """In a fresh process whose sys.path starts with the sources to measure: one JSON line of figures."""
    from marco_local.formats import gguf_tokenizer
    from marco_local.formats.gguf import GGUFFile
    from marco_local.tokenizer import Tokenizer

    if backend == "native":
        from marco_local.kernels import native

        if native.library() is None:  # compiled (or loaded from the cache) before the clock and the RSS baseline
            raise SystemExit(f"native library unavailable: {native.unavailable_reason()}")
        build = gguf_tokenizer.build_native_backend
    else:
        build = gguf_tokenizer.build_backend
    g = GGUFFile(model)
    gc.collect()
    before = rss()
    start = time.perf_counter()
    tok = build(g)
    build_s = time.perf_counter() - start
    assert tok is not None and type(tok).__name__ == ("NativeBPE" if backend == "native" else "Tokenizer")
    gc.collect()
    out = {"build_s": build_s, "rss_build": rss() - before}
    wrapped = Tokenizer(tok)
    for name, text in texts().items():
        start = time.perf_counter()
        ids = tok.encode(text, add_special_tokens=False).ids
        first = time.perf_counter() - start
        encode = best(lambda text=text: tok.encode(text, add_special_tokens=False), 5)
        decoded = tok.decode(ids, skip_special_tokens=True)
        decode = best(lambda ids=ids: tok.decode(ids, skip_special_tokens=True), 5)

        def stream(ids=ids) -> None:
            d = wrapped.detokenizer()
            for i in ids:
                d.add(i)
            d.flush()

        digest = hashlib.sha256(json.dumps([ids, decoded]).encode()).hexdigest()[:16]
        out[name] = {
            "tokens": len(ids),
            "encode_first_s": first,
            "encode_s": encode,
            "decode_s": decode,
            "stream_s": best(stream, 2),
            "digest": digest,
        }
    gc.collect()
    out["rss_end"] = rss() - before
    print(json.dumps(out))


def native_root(rev: str | None, scratch: Path) -> Path:
    """Sources that still have the native BPE: this checkout, or REV's marco_local and quant unpacked in scratch."""
    if rev is None and (ROOT / NATIVE_MODULE).exists():
        return ROOT
    if rev is None:
        deleted = subprocess.run(
            ["git", "log", "-n1", "--diff-filter=D", "--format=%H", "--", NATIVE_MODULE],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not deleted:
            raise SystemExit(f"{NATIVE_MODULE} is neither here nor deleted in this history: pass --native-rev")
        rev = deleted + "^"
    archive = scratch / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev, "marco_local", "quant"], cwd=ROOT, stdout=f, check=True)
    with tarfile.open(archive) as t:
        t.extractall(scratch / "src", filter="data")
    return scratch / "src"


def run_child(root: Path, backend: str, model: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(ROOT / "bench")])}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", backend, str(model)], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"{backend} on {model} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def smollm2() -> Path:
    from bench_vs_llamacpp import smollm2_path  # this folder is on sys.path when the script runs

    return smollm2_path()


def report(model: str, runs: dict[str, list[dict]]) -> None:
    def med(backend: str, *keys: str) -> float:
        values = []
        for r in runs[backend]:
            for k in keys[:-1]:
                r = r[k]
            values.append(r[keys[-1]])
        return statistics.median(values)

    print(f"\n{model}: median of {len(runs['tokenizers'])} runs")
    print(f"{'':28} {'tokenizers':>12} {'native':>12} {'native/tok':>11}")
    rows = [("build from GGUF (ms)", ("build_s",), 1e3), ("RSS added by build (MiB)", ("rss_build",), 2**-20)]
    for text in ("prose", "mixed"):
        tokens = runs["tokenizers"][0][text]["tokens"]
        rows += [
            (f"{text}: encode, 1st (ms)", (text, "encode_first_s"), 1e3),
            (f"{text}: encode (ms)", (text, "encode_s"), 1e3),
            (f"{text}: decode (ms)", (text, "decode_s"), 1e3),
            (f"{text}: stream {tokens} (ms)", (text, "stream_s"), 1e3),
        ]
    rows.append(("RSS added at the end (MiB)", ("rss_end",), 2**-20))
    for label, keys, scale in rows:
        t, n = med("tokenizers", *keys) * scale, med("native", *keys) * scale
        print(f"{label:28} {t:12.1f} {n:12.1f} {n / t if t else float('nan'):11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,nano", help="smollm2, nano, or GGUF paths, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--native-rev", help="git revision whose sources hold the native BPE")
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    models = {"smollm2": smollm2(), "nano": NANO}
    with tempfile.TemporaryDirectory() as scratch:
        roots = {"tokenizers": ROOT, "native": native_root(args.native_rev, Path(scratch))}
        words = {name: len(text.split()) for name, text in texts().items()}
        print(f"texts: {', '.join(f'{k} {v:,} words' for k, v in words.items())}; one process per run")
        for name in args.models.split(","):
            model = models.get(name, Path(name))
            if not model.exists():
                print(f"\n{name}: {model} not found, skipped")
                continue
            runs: dict[str, list[dict]] = {"tokenizers": [], "native": []}
            for _ in range(args.runs):  # alternated: the machine's speed drifts
                for backend, root in roots.items():
                    runs[backend].append(run_child(root, backend, model))
            for text in ("prose", "mixed"):
                digests = {r[text]["digest"] for rs in runs.values() for r in rs}
                if len(digests) != 1:
                    raise SystemExit(f"{name}: the backends disagree on the {text} text's ids or decoded text")
            report(name, runs)


if __name__ == "__main__":
    main()
