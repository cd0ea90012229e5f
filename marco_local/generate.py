"""Text generation in three layers that share one record.

`generate_step` yields token ids (prefill in chunks, then one token per forward); `stream_generate` detokenizes,
applies stop strings and yields a `GenerationResponse` per text delta; `generate` collects the text. A `PromptCache`
keeps the KV cache and the token ids it holds between calls, so a chat only prefills what changed. The engine knows
nothing about terminals or chat templates.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import decode
from .cpu_share import CpuShare
from .layers.kv_cache import make_cache
from .models.kv_cache import KVCache
from .sampling import LogitsProcessor, Sampler, make_sampler
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .offload.stats import OffloadStats

ProgressFn = Callable[[int, int], None]


@dataclass
class PromptCache:
    """A KV cache plus the token ids whose keys/values it holds (the reusable prefix of the next prompt), and where
    each forward that wrote them began (`starts`).

    Reuse restarts at the beginning of a forward, so that the same context is computed by the same forwards: a
    prompt token computed alone instead of inside its prefill chunk takes other kernels and reduction orders (a
    one-token matmul and attention against a chunk's), its logits and keys differ in the last bits, and a greedy
    /regen drifted from the reply it regenerated at the first near-tie."""

    cache: KVCache
    tokens: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    def reuse(self, prompt: Sequence[int]) -> int:
        """Trim the cache to the longest prefix shared with `prompt` (leaving at least one token to compute), cut back
        to where the forward that computed the next position began."""
        common = 0
        limit = min(len(self.tokens), len(prompt) - 1)
        while common < limit and self.tokens[common] == prompt[common]:
            common += 1
        if common < len(self.tokens):  # position `common` is recomputed: so is the rest of the forward it was in
            common = max((s for s in self.starts if s <= common), default=common)
        self.cache.trim(self.cache.offset - common)
        del self.tokens[common:]
        self.starts = [s for s in self.starts if s < common]
        return common

    def add(self, tokens: Sequence[int]) -> None:
        """Record one forward's `tokens`, computed after those already held."""
        self.starts.append(len(self.tokens))
        self.tokens.extend(tokens)


@dataclass
class GenerationResponse:
    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    time_to_first_token: float
    peak_memory: int
    cached_prompt_tokens: int = 0
    finish_reason: str | None = None  # "stop", "length", or None while running
    stats: OffloadStats | None = None  # the expert cache of an offloaded model


UNTIL_FULL = -1  # max_tokens meaning "until the context window is full" (llama.cpp's -n -1)

# Prompt tokens per forward. On the CPU, chunks of 128 prefill about as fast as 512 (Nano Q4_K_M, 2 threads, routing
# made balanced: 278 against 280 tok/s; 256: 289) and hold a third of the activations (a 512-token Nano prompt: +10
# against +30 MiB of heap), which counts against the RSS budget. A GPU wants large batches.
PREFILL_CHUNK = {"cpu": 128}
PREFILL_CHUNK_DEFAULT = 512


def prefill_chunk(device: torch.device) -> int:
    """How many prompt tokens one forward takes on `device`."""
    return PREFILL_CHUNK.get(device.type, PREFILL_CHUNK_DEFAULT)


def prefill(model: nn.Module, tokens: torch.Tensor, cache: KVCache, chunk: int | None = None) -> torch.Tensor:
    """Run the prompt `tokens` [1, T] into `cache` in chunks; logits [1, 1, V] of its last token."""
    step = chunk or prefill_chunk(tokens.device)
    for start in range(0, tokens.shape[1], step):
        logits = decode.forward(model, tokens[:, start : start + step], cache, last_only=True)
    return logits


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak VRAM on CUDA, else the process's peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@torch.inference_mode()
def generate_step(
    model: nn.Module,
    prompt: Sequence[int],
    prompt_cache: PromptCache,
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    max_tokens: int = 256,
    prefill_step_size: int | None = None,
    progress: ProgressFn | None = None,
) -> Iterator[int]:
    """Yield up to `max_tokens` sampled ids. The cache always matches `prompt_cache.tokens`, even if interrupted."""
    device = next(model.parameters()).device
    step = prefill_step_size or prefill_chunk(device)
    reused = prompt_cache.reuse(prompt)
    history = list(prompt)
    todo = list(prompt[reused:])
    share = CpuShare() if device.type == "cpu" else None
    try:
        while True:
            chunk, todo = todo[:step], todo[step:]
            logits = decode.forward(model, torch.tensor([chunk], device=device), prompt_cache.cache, last_only=True)
            prompt_cache.add(chunk)
            if progress:
                progress(len(prompt) - len(todo), len(prompt))
            if not todo:
                break
            if share:
                share.tick()
        for i in range(max_tokens):
            scores = logits[0, -1].float()
            for process in logits_processors:
                scores = process(history, scores)
            token = sampler(scores)
            history.append(token)
            yield token
            if i == max_tokens - 1:  # the last token is never fed: nothing would read its logits
                break
            if share:
                share.tick()
            logits = decode.forward(model, torch.tensor([[token]], device=device), prompt_cache.cache)
            prompt_cache.add([token])
    finally:
        if share:
            share.restore()


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might start a stop string and must wait for more text."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    stop_strings: Sequence[str] = (),
    prompt_cache: PromptCache | None = None,
    max_context: int = 4096,
    progress: ProgressFn | None = None,
    stats_fn: Callable[[], OffloadStats | None] | None = None,
) -> Iterator[GenerationResponse]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if prompt_cache is None:
        wanted = max_context if max_tokens == UNTIL_FULL else len(ids) + max_tokens
        prompt_cache = PromptCache(make_cache(model, min(max_context, wanted)))
    room = prompt_cache.cache.max_len - len(ids)
    max_tokens = room if max_tokens == UNTIL_FULL else min(max_tokens, room)
    sampler = sampler or make_sampler()
    device = next(model.parameters()).device
    eos = set(tokenizer.eos_token_ids)
    detok = tokenizer.detokenizer()
    cached = prompt_cache.reuse(ids)
    start = time.perf_counter()
    prompt_time = first_token_time = 0.0
    pending = ""  # text held back because it may begin a stop string
    n = 0

    def record(text: str, token: int | None, finish: str | None) -> GenerationResponse:
        gen_time = time.perf_counter() - start - prompt_time
        return GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=len(ids),
            prompt_tps=(len(ids) - cached) / max(prompt_time, 1e-9),
            generation_tokens=n,
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            time_to_first_token=first_token_time,
            peak_memory=peak_memory_bytes(device),
            cached_prompt_tokens=cached,
            finish_reason=finish,
            stats=stats_fn() if stats_fn else None,
        )

    finish = "length"
    token: int | None = None
    steps = generate_step(model, ids, prompt_cache, sampler, logits_processors, max(max_tokens, 0), progress=progress)
    for token in steps:
        if n == 0:
            prompt_time = first_token_time = time.perf_counter() - start
        n += 1
        if token in eos:
            finish = "stop"
            break
        pending += detok.add(token)
        hit = min(((pending.find(s), s) for s in stop_strings if s in pending), default=None)
        if hit is not None:
            pending, finish = pending[: hit[0]], "stop"
            break
        keep = _held_back(pending, stop_strings)
        out, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if out:
            yield record(out, token, None)
    steps.close()
    if finish == "length" or token in eos:
        pending += detok.flush()
    yield record(pending, token, finish)


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))
