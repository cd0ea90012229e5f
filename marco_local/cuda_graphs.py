"""One new token on CUDA, replayed from a captured CUDA graph: the CUDA decode fast path.

Why: eager decode on CUDA is bound by the host, not the GPU. A Marco-Nano-shaped step is ~2,200 small kernels, each
costing ~12 us of Python and dispatch; on an H200 that gave 35 tok/s, 1.1% of the memory-bandwidth bound
(bench/cuda_speed.py). A graph replays the same kernels with one host call.

A graph fixes shapes and addresses, so the captured step is `Qwen3MoeForCausalLM.forward_at`, which differs from
`forward` in three ways: the position is a device tensor (rotary rows and the cache write are indexed by it), the
attention reads a fixed window of the cache under a mask (the next power of two above the position, at least
`min_window`; one graph per window), and the token and logits live in static buffers. Weights and modules are the
model's own; the experts take the gathered single-token path of `Experts`, which never reads back to the host.

Eligible (`GraphedDecoder.supports`): a resident qwen3_moe model on CUDA whose projections are `nn.Linear` and whose
experts are stacked (not offloaded, not bitsandbytes). MARCO_CUDA_GRAPHS=0 turns it off. Graphs are keyed by the
cache buffers they write: a new cache is captured anew. Invariant: the window never reaches past `cache.max_len`,
and the cache holds zeros or old keys beyond the position (KVCache zero-fills on CUDA), so masked positions are
finite.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .errors import MarcoError
from .kv_cache import KVCache
from .models import qwen3_moe
from .models.qwen3_moe import Qwen3MoeForCausalLM

MIN_WINDOW = 256


def window_for(position: int, max_len: int, min_window: int = MIN_WINDOW) -> int:
    """Cache positions the graph for `position` attends over: a power of two > position, capped at max_len."""
    return min(max(min_window, 1 << position.bit_length()), max_len)


class GraphedDecoder:
    def __init__(self, model: Qwen3MoeForCausalLM, min_window: int = MIN_WINDOW) -> None:
        self.model, self.min_window = model, min_window
        device = model.model.norm.weight.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.pool = None  # the first graph's memory pool, shared by the later ones (they never run concurrently)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # window -> (graph, logits)
        self.cache_key: tuple | None = None
        self.cos = self.sin = torch.empty(0)
        self.captures = 0

    @staticmethod
    def supports(model: nn.Module) -> bool:
        if os.environ.get("MARCO_CUDA_GRAPHS", "1") == "0" or not isinstance(model, Qwen3MoeForCausalLM):
            return False
        if model.model.norm.weight.device.type != "cuda" or getattr(model, "offload", None) is not None:
            return False
        # the model file's own modules and plain torch layers only: quantized, offloaded or native replacements
        # (bitsandbytes linears, QExperts, OffloadedExperts, ...) have host-side code paths a graph cannot hold
        plain = (nn.Linear, nn.Embedding, nn.ModuleList)
        return all(type(m) in plain or type(m).__module__ == qwen3_moe.__name__ for m in model.modules())

    def accepts(self, cache: KVCache) -> bool:
        return cache.keys.is_cuda and cache.keys.shape[1] == 1

    def _bind(self, cache: KVCache) -> None:
        """Graphs write this cache's buffers: another cache means new graphs (and rotary tables of its length)."""
        key = (cache.keys.data_ptr(), cache.values.data_ptr(), tuple(cache.keys.shape), cache.keys.dtype)
        if key == self.cache_key:
            return
        self.graphs.clear()
        self.pool = None  # a pool whose graphs are all gone cannot take new captures
        self.cache_key = key
        p = self.model.model.norm.weight
        self.cos, self.sin = self.model.rotary(0, cache.max_len, p.dtype, p.device)

    def _run(self, cache: KVCache, window: int) -> torch.Tensor:
        return self.model.forward_at(self.token, self.pos, self.cos, self.sin, cache, window)

    def _capture(self, cache: KVCache, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # warm-up on a side stream (cuBLAS workspaces, lazy inits), as capture requires; it computes the very step
        # about to be replayed, so what it writes into the cache is what the replay writes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(cache, window)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._run(cache, window)
        if self.pool is None:
            self.pool = graph.pool()
        self.captures += 1
        self.graphs[window] = (graph, logits)
        return graph, logits

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if cache.offset + 1 > cache.max_len:
            raise MarcoError(
                f"context window full ({cache.offset + 1} > {cache.max_len} tokens)",
                hint="start a new conversation or raise --ctx",
            )
        self._bind(cache)
        self.token.copy_(tokens.view(1, 1))
        self.pos.fill_(cache.offset)
        window = window_for(cache.offset, cache.max_len, self.min_window)
        graph, logits = self.graphs.get(window) or self._capture(cache, window)
        graph.replay()
        cache.advance(1)
        return logits.clone()  # the static buffer is overwritten by the next replay


def enable_cuda_graphs(model: nn.Module) -> bool:
    """Attach a `GraphedDecoder` as the model's decode step when it qualifies; True when attached."""
    if not GraphedDecoder.supports(model):
        return False
    model.decode_step = GraphedDecoder(model)
    return True
