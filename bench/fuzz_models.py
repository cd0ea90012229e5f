"""Fuzz the model-file readers: `python3 bench/fuzz_models.py --count 5000 --seed 1`.

Builds the small base models of tests/model_fuzz.py, writes `--count` seeded mutants (GGUF files and checkpoint
folders), runs each through `marco run MODEL hi -n 2` in a worker pool (memory-limited, per-case timeout) and prints
the counts: mutants tried, clean `Error:` lines, runs, anything else (which must be 0), and what the others were.
Exit status 1 when anything else happened.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import model_fuzz as mf  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=mf.CASE_TIMEOUT_S, help="seconds per mutant")
    parser.add_argument("--show-ran", action="store_true", help="list the mutations that ran")
    parser.add_argument("--keep", type=Path, help="write the mutants here and keep them (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="marco-fuzz-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        ggufs, folders = mf.build_bases(work)
        cases = [(f"base {p.name}", str(p)) for p in [*ggufs, *folders]]
        cases += mf.make_cases(ggufs, folders, work, args.count, args.seed)
        built = time.monotonic()
        report = mf.run_mutants(cases, workers=args.workers, timeout_s=args.timeout)
        ran = time.monotonic() - built
    print(f"seed {args.seed}: {report.line()}")
    print(f"built in {built - start:.0f} s, ran in {ran:.0f} s ({ran / max(len(cases), 1) * 1000:.0f} ms a mutant)")
    for what in report.ran if args.show_ran else ():
        print(f"  ran: {what}")
    for what, path, detail in report.others:
        print(f"  OTHER {what} ({path}): {detail}")
    return 1 if report.others else 0


if __name__ == "__main__":
    sys.exit(main())
