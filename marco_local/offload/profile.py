"""Expert profiles: per-layer expert frequencies measured on the user's own text (`marco profile`).

A profile warms the expert cache (each layer starts with its most frequent experts resident) and defines the static
hot set. Marco's experts specialise by language family, so a profile per language is the natural use. The file is
JSON: {"format", "version", "model", "num_layers", "num_experts", "top_k", "tokens", "layers": {"L": [count per
expert]}}; counts are (token, expert) routings during prefill of the text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..layers.kv_cache import make_cache
from .trace import Trace, record_trace

FORMAT = "marco-expert-profile"


def counts_from_trace(trace: Trace) -> dict[int, list[int]]:
    counts: dict[int, list[int]] = {}
    for ev in trace.events:
        row = counts.setdefault(ev.layer, [0] * trace.num_experts)
        for token in ev.experts:
            for e in token:
                row[e] += 1
    return counts


@torch.inference_mode()
def record_profile(
    model: nn.Module,
    ids: Sequence[int],
    chunk: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[int, list[int]], Trace]:
    """Prefill `ids` through `model` in chunks (a fresh KV cache per chunk window) and count each layer's routings."""
    device = next(model.parameters()).device
    with record_trace(model) as trace:
        for start in range(0, len(ids), chunk):
            part = list(ids[start : start + chunk])
            model(torch.tensor([part], device=device), make_cache(model, len(part)), last_only=True)
            if progress:
                progress(min(start + chunk, len(ids)), len(ids))
    return counts_from_trace(trace), trace


def save_profile(path: str | Path, counts: dict[int, list[int]], model_name: str, cfg, tokens: int) -> None:
    data = {
        "format": FORMAT,
        "version": 1,
        "model": model_name,
        "num_layers": cfg.num_hidden_layers,
        "num_experts": cfg.num_experts,
        "top_k": cfg.num_experts_per_tok,
        "tokens": tokens,
        "layers": {str(k): v for k, v in sorted(counts.items())},
    }
    Path(path).write_text(json.dumps(data) + "\n", encoding="utf-8")
