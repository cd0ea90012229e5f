"""Speed benchmark of a loaded model: prompt processing and decode tokens per second, peak memory.

What is measured (the same protocol as llama-bench's pp/tg tests, so the figures compare): a prompt of `prompt_tokens`
random ids is processed from an empty cache, in the chunks `generate.prefill` uses on the device (as llama.cpp splits a
prompt into batches); then `decode_tokens` tokens are generated one at a time, each the greedy pick of the previous
logits, after a short prefill. Each repeat starts from an emptied cache; one warm-up round (a few tokens) runs first so
lazy initialisation is not timed. The KV cache is allocated once for all repeats. The library never prints: progress
goes to the optional callback.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import decode
from .cpu_share import CpuShare
from .generate import peak_memory_bytes, prefill, prefill_chunk
from .layers.kv_cache import make_cache

ProgressFn = Callable[[int, int], None]


@dataclass
class BenchResult:
    prompt_tokens: int
    decode_tokens: int
    prompt_tokens_per_s: list[float]  # one figure per repeat
    decode_tokens_per_s: list[float]
    peak_rss_bytes: int
    peak_vram_bytes: int | None
    settings: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def _summary(values: list[float]) -> dict[str, float]:
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    def to_json(self) -> dict[str, Any]:
        """The `marco bench --json` object: medians at the top level, min/median/max and raw figures below."""
        d = asdict(self)
        return {
            "prompt_tokens_per_s": statistics.median(self.prompt_tokens_per_s),
            "decode_tokens_per_s": statistics.median(self.decode_tokens_per_s),
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_vram_bytes": self.peak_vram_bytes,
            "prompt": self._summary(self.prompt_tokens_per_s),
            "decode": self._summary(self.decode_tokens_per_s),
            "runs": {"prompt_tokens_per_s": d["prompt_tokens_per_s"], "decode_tokens_per_s": d["decode_tokens_per_s"]},
            "settings": {"prompt_tokens": self.prompt_tokens, "decode_tokens": self.decode_tokens, **self.settings},
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_benchmark(
    model: nn.Module,
    prompt_tokens: int = 512,
    decode_tokens: int = 128,
    repeats: int = 3,
    seed: int = 0,
    progress: ProgressFn | None = None,
    settings: dict[str, Any] | None = None,
) -> BenchResult:
    """Time prefill of `prompt_tokens` and greedy decode of `decode_tokens`, `repeats` times each."""
    if prompt_tokens < 1 or decode_tokens < 1 or repeats < 1:
        raise ValueError("prompt_tokens, decode_tokens and repeats must be at least 1")
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, prompt_tokens), generator=g).to(device)
    cache = make_cache(model, max(prompt_tokens, decode_tokens + 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    share = CpuShare() if device.type == "cpu" else None  # threads follow the free cores, as in generation

    def timed_decode(n: int) -> float:
        cache.reset()
        logits = decode.forward(model, prompt[:, :1], cache)
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            # [1, 1], stays on the device (no host sync); float32 because bf16 argmax is 5x slower on CPU
            token = logits[:, -1].float().argmax(-1, keepdim=True)
            if share:
                share.tick()
            logits = decode.forward(model, token, cache)
        _sync(device)
        return n / (time.perf_counter() - start)

    def timed_prefill() -> float:
        cache.reset()
        _sync(device)
        start = time.perf_counter()
        prefill(model, prompt, cache)
        _sync(device)
        return prompt_tokens / (time.perf_counter() - start)

    timed_decode(min(4, decode_tokens))  # warm-up
    prompt_tps: list[float] = []
    decode_tps: list[float] = []
    try:
        for i in range(repeats):
            prompt_tps.append(timed_prefill())
            decode_tps.append(timed_decode(decode_tokens))
            if progress:
                progress(i + 1, repeats)
    finally:
        if share:
            share.restore()
    return BenchResult(
        prompt_tokens=prompt_tokens,
        decode_tokens=decode_tokens,
        prompt_tokens_per_s=prompt_tps,
        decode_tokens_per_s=decode_tps,
        peak_rss_bytes=peak_memory_bytes(None),
        peak_vram_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        settings={
            "threads": torch.get_num_threads(),
            "device": str(device),
            "prefill_chunk": prefill_chunk(device),
            **(settings or {}),
        },
    )
