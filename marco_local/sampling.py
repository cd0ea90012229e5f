"""Samplers and logits processors, built once per generation.

`make_sampler` returns a function from float32 logits [V] to a token id. Temperature 0 is greedy (argmax). The filters
follow the usual order (top-k, top-p, min-p, then temperature) on probabilities; an explicit `torch.Generator` seeded
from `seed` makes a run reproducible; `new_seed` draws the seed of a run given none, so that it can be told (`-v`) and
given again.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Sequence

import torch

from .errors import not_a_number

Sampler = Callable[[torch.Tensor], int]
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]

# The values each setting may take, (low, high, low excluded): outside them the sampler would divide by zero or make
# NaN probabilities, which torch reports as an internal error mid-generation. One table for the command-line options,
# the chat's /set and a loaded conversation's settings.
SETTING_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "temperature": (0.0, None, False),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, None, False),
    "min_p": (0.0, 1.0, False),
    "repeat_penalty": (0.0, None, True),
}
RANDOM_SEED = -1  # llama.cpp's and Ollama's spelling of "a new seed each run"
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit seed


def new_seed() -> int:
    """A fresh seed for a run that was given none (`--seed -1`): small enough to retype, as llama.cpp's 32-bit ones."""
    return secrets.randbelow(2**32)


def setting_error(name: str, value: float) -> str | None:
    """Why `value` cannot be sampling setting `name` (None when it can)."""
    if name == "seed":
        return None if value == RANDOM_SEED or 0 <= value <= MAX_SEED else f"must be {RANDOM_SEED} or 0..{MAX_SEED}"
    low, high, low_excluded = SETTING_RANGES[name]
    bounds = f"{'above' if low_excluded else 'at least'} {low}" if high is None else f"between {low} and {high}"
    if not math.isfinite(value):
        return f"must be a finite number {bounds}"
    too_low = value <= low if low_excluded else value < low
    if too_low or (high is not None and value > high):
        return f"must be {bounds}"
    return None


def make_sampler(
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or a temperature float32 cannot hold: greedy

        def greedy(logits: torch.Tensor) -> int:
            best = int(torch.argmax(logits))
            if math.isnan(logits[best]):  # argmax takes a NaN for the largest: one look, not a scan (70 us here)
                raise not_a_number()
            return best

        return greedy
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else new_seed())

    def sample(logits: torch.Tensor) -> int:
        logits = logits.float().cpu()
        if top_k > 0 and top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        # shifted first: a tiny temperature (1e-320) then sends all but the top to -inf instead of overflowing to NaN
        probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > top_p  # keep the smallest set whose mass reaches top_p
            probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
        if min_p > 0.0:
            probs = probs.masked_fill(probs < min_p * probs.max(), 0.0)
        try:
            return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
        except RuntimeError:  # NaN probabilities: said as what they are, not as torch's internal error
            if torch.isnan(logits).any():
                raise not_a_number() from None
            raise

    return sample


def make_repetition_penalty(penalty: float, context_size: int = 64) -> LogitsProcessor:
    """The CTRL/transformers rule: divide positive logits of recent tokens by `penalty`, multiply negative ones."""

    def process(tokens: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        recent = list(tokens[-context_size:])
        if not recent:
            return logits
        ids = torch.tensor(recent, device=logits.device)
        chosen = logits[ids]
        logits = logits.clone()
        big = torch.finfo(logits.dtype).max  # a tiny penalty overflows to inf, and inf - inf is NaN in the sampler
        logits[ids] = torch.where(chosen > 0, chosen / penalty, chosen * penalty).clamp(-big, big)
        return logits

    return process


def make_logits_processors(repetition_penalty: float | None = None, context_size: int = 64) -> list[LogitsProcessor]:
    if repetition_penalty is None or repetition_penalty == 1.0:
        return []
    return [make_repetition_penalty(repetition_penalty, context_size)]
