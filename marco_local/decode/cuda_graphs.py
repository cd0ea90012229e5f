"""One new token on CUDA, replayed from captured CUDA graphs: the CUDA decode fast path.

Why: eager decode on CUDA is bound by the host, not the GPU: each kernel costs ~12 us of Python and dispatch. Replayed
from a graph, a kernel node still costs a few microseconds however small, so the step is written for few kernels
(~25 per layer: fused RMSNorm, one q/k/v projection whose q and k heads are normed and rotated together with a
sign-folded RoPE, one attention call, one gate/up stack; `bench/decode_ops.py` counts them). On an H200, a
Marco-Nano-shaped bf16 step at ~30 kernels per layer: 53 tok/s eager, 258 tok/s replayed (bench/cuda_speed.py).

A graph fixes shapes and addresses, so the captured step is built from the layers' `forward_at`, which differs from
`forward` in three ways: the position is a device tensor (rotary rows and the cache write are indexed by it), the
attention reads a fixed window of the cache under a mask (the next power of two above the position, at least
`min_window`; one set of graphs per window), and every value that crosses a graph boundary lives in a static buffer.
The experts take the gathered single-token path of `Experts`, which never reads back to the host.

Offloaded experts (`--gpu-mem`, `--experts-resident`) are chosen on the host (the slot table), so the step is cut
at each offloaded MoE layer: a segment runs up to that layer's router and leaves the expert ids in a buffer; the host
reads them, makes the experts resident (`OffloadedExperts.slots_for_token`: the copies, stats and prefetch of its
forward) and writes their slot ids to a buffer; the next segment computes the experts from their slots and runs on
to the next router. A layer whose slots hold every expert (`OffloadedExperts.load_all`: the budget fits them all)
maps ids to slots on the device and is not cut, nor is one that reads its missing experts in place from host RAM
(`--expert-misses direct`, offload/direct.py): its cache lives on the device. A resident model is one segment.
Where missing experts are computed on the CPU (`OffloadedExperts.misses_on_cpu`), the cut's resident experts get a
graph of their own, replayed before the CPU computes the missing ones, so both run at once; the next segment adds
the CPU's sum.

A window's first step runs eagerly on a side stream (the warm-up capture needs), then its segments are captured;
the step after replays them. On the CPU the segments always run eagerly (what the tests check against `forward`).
A failed capture turns the decoder off: the model then decodes eagerly. Steps with observed experts (a trace
recorder's hooks) run eagerly too.

Eligible on CUDA (`GraphedDecoder.supports`): a qwen3_moe model built from the model file's own modules and plain
torch layers (not bitsandbytes, not GGUF), whose offloaded experts (if any) are stacked and have a slot for each of a
token's experts. MARCO_CUDA_GRAPHS=0 turns it off. Graphs are keyed by the cache buffers they write: a new cache is
captured anew. Invariant: the window never reaches past `cache.max_len`, and beyond the position the cache holds
zeros or older keys (KVCache zero-fills on CUDA), so masked positions are finite.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import MarcoError
from ..models import qwen3_moe
from ..models.kv_cache import KVCache
from ..models.qwen3_moe import Qwen3MoeForCausalLM
from ..offload.experts import OffloadedExperts

MIN_WINDOW = 256
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream every decoder on `device` warms up and captures on. One, not one per capture: cuBLAS keeps a
    workspace per stream it ran on (32 MiB on Hopper) for the life of the process, inside the VRAM budget."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def window_for(position: int, max_len: int, min_window: int = MIN_WINDOW) -> int:
    """Cache positions the step at `position` attends over: a power of two > position, capped at max_len."""
    return min(max(min_window, 1 << position.bit_length()), max_len)


class GraphedDecoder:
    def __init__(self, model: Qwen3MoeForCausalLM, min_window: int = MIN_WINDOW) -> None:
        self.model, self.min_window = model, min_window
        cfg, p = model.config, model.model.norm.weight
        self.device, dtype = p.device, p.dtype
        layers = model.model.layers
        for layer in layers:  # fewer kernels per step: one projection for q, k and v, one stack for gate and up
            layer.self_attn.fuse_qkv()
            if type(getattr(layer.mlp, "experts", None)) is qwen3_moe.Experts:
                layer.mlp.experts.fuse_gate_up()
        offloaded = [getattr(layer.mlp, "experts", None) for layer in layers]
        offloaded = [ex if isinstance(ex, OffloadedExperts) else None for ex in offloaded]
        # a layer whose slots hold every expert (`load_all`) maps ids to slots on the device, one that reads its
        # misses in place (`direct`) decides per expert on the device: no cut at either
        self.cuts = [i for i, ex in enumerate(offloaded) if ex is not None and ex.slot_map is None and not ex.direct]
        self.full = [ex for ex in offloaded if ex is not None and ex.slot_map is not None]
        self.direct = [ex for ex in offloaded if ex is not None and ex.slot_map is None and ex.direct]
        self.cut_experts: list[OffloadedExperts] = [layers[i].mlp.experts for i in self.cuts]
        n, D, A, dev = len(self.cuts), cfg.hidden_size, cfg.num_experts_per_tok, self.device
        self.top_k = A
        # static buffers: what crosses a segment boundary, per cut
        self.token = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.h = torch.zeros(n, 1, 1, D, dtype=dtype, device=dev)  # the residual after the cut layer's attention
        self.m = torch.zeros(n, 1, D, dtype=dtype, device=dev)  # the cut layer's MoE input
        self.w = torch.zeros(n, 1, A, dtype=dtype, device=dev)
        self.slot_ids = torch.zeros(n, 1, A, dtype=torch.long, device=dev)
        # Host-side buffers (pinned on CUDA), written and read through numpy views: a segment ends by copying its
        # routing (and, with prefetch, the next layer's guessed experts) into them, and the next segment starts by
        # copying the slot ids the host wrote, both copies inside the graphs. At a cut the host waits once, then
        # makes no call into CUDA besides the expert copies.
        pin = dev.type == "cuda"
        self.host_idx = torch.zeros(n, 1, A, dtype=torch.long, pin_memory=pin)
        self.host_slots = torch.zeros(n, 1, A, dtype=torch.long, pin_memory=pin)
        self.speculates = [ex.speculates for ex in self.cut_experts]
        guessed = max([ex.next_top_k for ex in self.cut_experts if ex.speculates], default=1)
        self.host_guess = torch.zeros(n, 1, guessed, dtype=torch.long, pin_memory=pin)
        self.idx_np, self.slots_np = self.host_idx.numpy(), self.host_slots.numpy()
        self.guess_np = self.host_guess.numpy()
        # cuts whose misses are computed on the CPU: a hits graph of their own (`y`, masked routing weights), the
        # CPU's sum of the missing experts in `cpu`, added by the next segment
        self.split = [ex.misses_on_cpu for ex in self.cut_experts]
        self.mask = torch.ones(n, 1, A, dtype=dtype, device=dev)
        self.host_mask = torch.ones(n, 1, A, dtype=dtype, pin_memory=pin)
        self.y = torch.zeros(n, 1, D, dtype=dtype, device=dev)
        self.cpu = torch.zeros(n, 1, D, dtype=dtype, device=dev)
        self.host_cpu = torch.zeros(n, 1, D, dtype=dtype, pin_memory=pin)
        self.logits = torch.zeros(1, 1, cfg.vocab_size, dtype=dtype, device=dev)
        self.cos_row = torch.zeros(1, cfg.head_dim, dtype=dtype, device=dev)
        self.sin_row = torch.zeros(1, cfg.head_dim, dtype=dtype, device=dev)
        self.masks: dict[int, torch.Tensor] = {}
        self.cos = self.sin = torch.empty(0)
        self.pool = None  # the first graph's memory pool, shared by the later ones (they never run concurrently)
        # window -> (one graph per segment, {cut: its hits graph} for split cuts)
        self.graphs: dict[int, tuple[list[torch.cuda.CUDAGraph], dict[int, torch.cuda.CUDAGraph]]] = {}
        self.cache_key: tuple | None = None
        self.failed = False
        self.captures = 0

    @staticmethod
    def supports(model: nn.Module) -> bool:
        if os.environ.get("MARCO_CUDA_GRAPHS", "1") == "0" or not isinstance(model, Qwen3MoeForCausalLM):
            return False
        return model.model.norm.weight.device.type == "cuda" and GraphedDecoder.capturable(model)

    @staticmethod
    def capturable(model: Qwen3MoeForCausalLM) -> bool:
        """Whether the step holds no host-side path, whatever the device: the model file's own modules, plain torch
        layers and modules that declare `graph_safe` (bnb_loader's StackedExperts4bit) only (bitsandbytes linears,
        QExperts, ... read back to the host); offloaded experts stacked, with a slot for each of a token's experts."""
        plain = (nn.Linear, nn.Embedding, nn.ModuleList)
        for m in model.modules():
            if isinstance(m, OffloadedExperts):
                fits = m.table.num_slots >= model.config.num_experts_per_tok or m.misses_on_cpu or m.direct
                if not getattr(m.inner, "gathers", False) or not fits:  # on CUDA: `gather_decode`
                    return False
            elif (
                type(m) not in plain
                and type(m).__module__ != qwen3_moe.__name__
                and not getattr(m, "graph_safe", False)
            ):
                return False
        return True

    def accepts(self, cache: KVCache) -> bool:
        if self.failed or cache.keys.device != self.device or cache.keys.shape[1] != 1:
            return False
        observed = [layer.mlp.experts for layer in self.model.model.layers if hasattr(layer.mlp, "experts")]
        return not any(e._forward_hooks or e._forward_pre_hooks for e in observed)

    def _bind(self, cache: KVCache) -> None:
        """Graphs write this cache's buffers: another cache means new graphs (and rotary tables of its length)."""
        key = (cache.keys.data_ptr(), cache.values.data_ptr(), tuple(cache.keys.shape), cache.keys.dtype)
        if key == self.cache_key:
            return
        self.graphs.clear()
        self.pool = None  # a pool whose graphs are all gone cannot take new captures
        self.cache_key = key
        self.cos, sin = self.model.rotary(0, cache.max_len, self.cos_row.dtype, self.device)
        self.sin = qwen3_moe.signed_sin(sin)  # forward_at's RoPE takes rotate_half's sign in the table

    def _segment(self, k: int, cache: KVCache, window: int) -> None:
        """Segment k of a step. k = 0 starts from the token; k > 0 finishes cut k-1's experts from their slots. Then
        layers up to cut k's router (its expert ids left in `idx[k]`), or to the logits after the last layer."""
        model, layers = self.model, self.model.model.layers
        mask = self.masks[window]
        if k == 0:
            x = model.model.embed_tokens(self.token)
            self.cos_row.copy_(self.cos.index_select(0, self.pos))
            self.sin_row.copy_(self.sin.index_select(0, self.pos))
            visible = torch.arange(window, device=self.device) <= self.pos
            mask.copy_(torch.where(visible, 0.0, float("-inf")).view(1, 1, 1, window))
            first = 0
        else:
            j = k - 1
            if self.split[j]:  # the resident experts' sum came from the hits graph, the missing ones' from the CPU
                x = self.h[j] + (self.y[j] + self.cpu[j]).view(self.h[j].shape)
            else:
                self.slot_ids[j].copy_(self.host_slots[j], non_blocking=True)
                y = self.cut_experts[j].inner.forward_gathered(self.m[j], self.slot_ids[j], self.w[j])
                x = self.h[j] + y.view(self.h[j].shape)
            first = self.cuts[j] + 1
        cos, sin = self.cos_row, self.sin_row
        for i in range(first, len(layers)):
            layer = layers[i]
            if k < len(self.cuts) and i == self.cuts[k]:
                h = x + layer.self_attn.forward_at(layer.input_layernorm(x), cos, sin, cache, self.pos, mask)
                m = layer.post_attention_layernorm(h).view(self.m[k].shape)
                idx, w = layer.mlp.route(m)
                self.h[k].copy_(h)
                self.m[k].copy_(m)
                self.w[k].copy_(w)
                self.host_idx[k].copy_(idx, non_blocking=True)
                if self.speculates[k]:
                    guess = self.cut_experts[k].guess_next(m)
                    self.host_guess[k, :, : guess.shape[-1]].copy_(guess, non_blocking=True)
                return
            x = layer.forward_at(x, cos, sin, cache, self.pos, mask)
        self.logits.copy_(model.lm_head(model.model.norm(x)))

    def _hits(self, k: int) -> None:
        """A split cut's resident experts from their slots (the missing ones weigh 0 here)."""
        inner = self.cut_experts[k].inner
        self.y[k].copy_(inner.forward_gathered(self.m[k], self.slot_ids[k], self.w[k] * self.mask[k]))

    def _place(self, k: int, hits: torch.cuda.CUDAGraph | None) -> None:
        """The host's part at cut k: read the token's expert ids, make those experts resident, hand their slots on.
        At a split cut: the resident experts are queued on the device (`hits`, or eagerly), then the missing ones
        are computed on the CPU meanwhile and handed on too."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the segment that routed, its copies included
        row = self.idx_np[k, 0].tolist()
        experts = self.cut_experts[k]
        if not self.split[k]:
            guess = self.guess_np[k, 0, : experts.next_top_k].tolist() if self.speculates[k] else None
            self.slots_np[k, 0] = experts.slots_for_token(row, self.m[k], guess)
            return
        slots, resident, missing = experts.split_for_token(row, self.m[k])
        m_host, w_host = (self.m[k].to("cpu"), self.w[k, 0].tolist()) if missing else (None, None)  # before the hits
        self.host_slots[k, 0] = torch.tensor(slots)
        self.host_mask[k, 0] = torch.tensor(resident)
        self.slot_ids[k].copy_(self.host_slots[k], non_blocking=True)
        self.mask[k].copy_(self.host_mask[k], non_blocking=True)
        if hits is None:
            self._hits(k)
        else:
            hits.replay()
        part = experts.cpu_part(missing, row, w_host, m_host) if missing else torch.zeros(1, self.cpu.shape[-1])
        self.host_cpu[k].copy_(part)
        self.cpu[k].copy_(self.host_cpu[k], non_blocking=True)

    def _step(self, cache: KVCache, window: int, graphs: tuple | None) -> None:
        segments, hits = graphs if graphs is not None else (None, {})
        for k in range(len(self.cuts) + 1):
            if k:
                self._place(k - 1, hits.get(k - 1))
            if segments is None:
                self._segment(k, cache, window)
            else:
                segments[k].replay()
        if segments is not None:  # replayed: the full layers' forward (which counts the token) did not run
            for experts in self.full:
                experts.count_resident_token(self.top_k)

    def _warm_up_and_capture(self, cache: KVCache, window: int) -> None:
        """This step, eagerly on a side stream (the warm-up capture needs), then its segments captured."""
        side = side_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._step(cache, window, None)
        torch.cuda.current_stream(self.device).wait_stream(side)

        def capture(fn) -> torch.cuda.CUDAGraph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=side):
                fn()
            if self.pool is None:
                self.pool = graph.pool()
            return graph

        try:
            segments = [capture(lambda k=k: self._segment(k, cache, window)) for k in range(len(self.cuts) + 1)]
            hits = {k: capture(lambda k=k: self._hits(k)) for k, split in enumerate(self.split) if split}
        except RuntimeError:  # this step's result is the eager one; the next steps run eagerly
            self.failed = True
            return
        self.graphs[window] = (segments, hits)
        self.captures += 1

    @torch.inference_mode()  # always: its buffers may be first made under either mode (generate uses inference mode)
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
        if window not in self.masks:
            self.masks[window] = torch.zeros(1, 1, 1, window, dtype=self.logits.dtype, device=self.device)
        graphs = self.graphs.get(window)
        if graphs is not None:
            self._step(cache, window, graphs)
        elif self.device.type == "cuda":
            self._warm_up_and_capture(cache, window)
        else:
            self._step(cache, window, None)
        cache.advance(1)
        return self.logits.clone()  # the static buffer is overwritten by the next step
