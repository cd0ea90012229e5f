"""Fast one-token decode steps, used by the generator instead of the model's layer loop where they apply: the native
CPU decoder (`native`: a GGUF model on the C kernels) and CUDA graphs (`cuda_graphs`: a resident model on CUDA).

The model file knows nothing of them: the generator runs the model through `forward(model, tokens, cache)`, which
takes the model's fast step for a single token when there is one; that step is made once per model, on first use,
from what the model is then (`decode_step`)."""

from __future__ import annotations

import weakref
from typing import Protocol

import torch
from torch import nn

from ..models.kv_cache import KVCache


class DecodeStep(Protocol):
    """A fast path for one new token: called instead of the model's forward when it accepts the cache."""

    def accepts(self, cache: KVCache) -> bool: ...

    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor: ...


_STEPS: weakref.WeakKeyDictionary[nn.Module, DecodeStep | None] = weakref.WeakKeyDictionary()


def _make(model: nn.Module) -> DecodeStep | None:
    from .cuda_graphs import GraphedDecoder
    from .native import NativeDecoder

    if NativeDecoder.supports(model):
        return NativeDecoder(model)
    if GraphedDecoder.supports(model):
        return GraphedDecoder(model)
    return None


def decode_step(model: nn.Module) -> DecodeStep | None:
    """The model's fast step (made on the first call), or None: the model's own forward then."""
    if model not in _STEPS:
        _STEPS[model] = _make(model)
    return _STEPS[model]


def set_decode_step(model: nn.Module, step: DecodeStep | None) -> None:
    """Use `step` for the model's next tokens (None: its forward), e.g. a decoder built with other settings."""
    _STEPS[model] = step


def forward(model: nn.Module, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
    """The model's logits for `tokens` [B, T] at `cache.offset` (see the model's forward); one token [1, 1] goes
    through the model's fast step when it accepts the cache. Advances the cache."""
    fast = decode_step(model) if tokens.shape == (1, 1) else None
    if fast is not None and fast.accepts(cache):
        return fast(tokens, cache)
    return model(tokens, cache, last_only=last_only)
