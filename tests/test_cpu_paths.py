"""Every CPU path gives the same answers: torch's int4 kernel under each CPU capability torch can dispatch to on
this machine (AVX-512, AVX2, plain C: forced with ATEN_CPU_CAPABILITY), with the native kernels off, against the
default path and the exact float32 reference.

Why: the int4 kernel's packed weight order is private to torch and differs per capability; a layout that is right on
one CPU printed word salad on another. Each capability runs in a child process (torch reads the variable once)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf_fixtures import smollm2_path

from marco_local.layers.kv_cache import make_cache

ROOT = Path(__file__).resolve().parent.parent
CAPABILITIES = ("avx512", "avx2", "default")
# the torch int4 path's own tests: every quantized type against float references, chunked repacks, offload slots
# filled from the file (the int4 cases of the offload tests)
INT4_TESTS = ["tests/test_qlinear.py", "tests/test_offload_gguf_disk.py"]
INT4_SELECTION = "int4 or not offload"
LOGITS_REL_TOL = 0.06  # ||logits - exact|| / ||exact||: int8 activations (native) or bf16 scales (int4) on Q4_1


def _env(capability: str | None, native: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    env["MARCO_NATIVE"] = "1" if native else "0"
    return env


@functools.cache
def _dispatches_to(capability: str) -> bool:
    """Whether torch on this CPU really runs `capability` when asked (it falls back silently when the CPU lacks it)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], env=_env(capability, False), capture_output=True, text=True)
    return out.stdout.strip().lower() == capability


def _runnable(capability: str):
    return pytest.param(
        capability, marks=pytest.mark.skipif(not _dispatches_to(capability), reason=f"this CPU cannot run {capability}")
    )


@pytest.mark.parametrize("capability", [_runnable(c) for c in CAPABILITIES])
def test_torch_int4_path_tests_pass_under_each_capability(capability: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            *INT4_TESTS,
            "-k",
            "int4 or not offload",
        ],
        cwd=ROOT,
        env=_env(capability, False),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def _child(capability: str | None, native: bool) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.cpu_path_child", str(smollm2_path())],
        cwd=ROOT,
        env=_env(capability, native),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_path() -> dict:
    return _child(None, native=True)


@pytest.fixture(scope="module")
def exact_logits() -> torch.Tensor:
    """The file's exact model: weights dequantized, float32 throughout."""
    from cpu_path_child import PROMPTS

    from marco_local.load.gguf import load_gguf

    model, tokenizer = load_gguf(smollm2_path(), dtype=torch.float32)
    first = next(iter(PROMPTS))
    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": first}]))])
    with torch.inference_mode():
        return model(ids, make_cache(model, ids.shape[1] + 1))[0].float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("capability", [_runnable(c) for c in CAPABILITIES])
def test_torch_path_answers_like_the_default_path(capability, default_path, exact_logits) -> None:
    """MARCO_NATIVE=0 under each capability: the greedy answers the default path gives, logits near the exact."""
    from cpu_path_child import PROMPTS

    torch_path = _child(capability, native=False)
    assert torch_path["capability"].lower() == capability and not torch_path["native"]
    for answers in (torch_path["answers"], default_path["answers"]):
        for answer, word in zip(answers, PROMPTS.values(), strict=True):
            assert word in answer, (capability, answers)
    assert _rel(torch.tensor(torch_path["logits"]), exact_logits) < LOGITS_REL_TOL


def test_default_path_logits_near_the_exact_model(default_path, exact_logits) -> None:
    assert _rel(torch.tensor(default_path["logits"]), exact_logits) < LOGITS_REL_TOL
