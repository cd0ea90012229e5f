"""The model-file fuzzer in the suite: seeded mutants of small GGUFs and checkpoint folders (tests/model_fuzz.py), each
through `marco run MODEL hi -n 2` in a memory-limited worker with a per-case timeout. Every mutant must end in one
clean `Error:` line (exit 1) or a run; the CLI's "unexpected" catch-all, a hang or a crash fails the test.

The quick slice runs in the normal suite; `-m slow` (or bench/fuzz_models.py --count N --seed S) runs thousands.
"""

from __future__ import annotations

import os

import model_fuzz as mf
import pytest


def fuzz(fuzz_bases, work, count: int, seed: int) -> mf.Report:
    ggufs, folders = fuzz_bases
    cases = [(f"base {p.name}", str(p)) for p in [*ggufs, *folders]]
    cases += mf.make_cases(ggufs, folders, work, count, seed)
    report = mf.run_mutants(cases, workers=min(2, os.cpu_count() or 1))
    assert report.counts["ran"] >= len(ggufs) + len(folders), report.line()  # the bases themselves run
    others = "\n".join(f"{what} ({path}): {detail}" for what, path, detail in report.others[:20])
    assert not report.others, f"{report.line()}\n{others}"
    return report


def test_fuzz_quick_slice(fuzz_bases, tmp_path):
    report = fuzz(fuzz_bases, tmp_path, count=int(os.environ.get("MARCO_FUZZ_COUNT", 300)), seed=20261207)
    assert report.counts["error"] > report.counts["ran"]  # most mutants are refused, in one line


@pytest.mark.slow
def test_fuzz_long(fuzz_bases, tmp_path):
    fuzz(fuzz_bases, tmp_path, count=5000, seed=int(os.environ.get("MARCO_FUZZ_SEED", 1)))
