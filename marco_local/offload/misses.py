"""How an offloaded layer handles an expert that is not in its slots, chosen once at install (`choose`):

- `CopyMisses`: copy it into a slot (evicting by the policy), then compute it there; the default.
- `CpuMisses`: a single token's missing experts are computed on the CPU from the store's rows (pinned host RAM) while
  the device computes the resident ones; nothing is copied and the cache does not change.
- `DirectMisses`: the device reads a single token's experts where they lie, from its slots or from host RAM, and keeps
  the slot map itself (offload/direct.py), so the host takes no part in a decode step.

Each layer holds one (`OffloadedExperts.misses`); the layer asks it at the few points where the handling differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import MarcoError
from .direct import DeviceLRU, gather_rows
from .direct import unavailable_reason as direct_unavailable
from .policy import LFU, StaticHotSet
from .store import MemoryStore

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .budget import Placement
    from .experts import OffloadedExperts

MISS_HANDLING = ("auto", "copy", "cpu", "direct")
CPU_MISS_MARGIN = 0.8  # auto computes misses on the CPU only when that is clearly cheaper than a copy


class CopyMisses:
    """A missing expert is copied into a slot before it is computed."""

    on_cpu = False
    direct = False
    lru: DeviceLRU | None = None

    def forward(self, layer: OffloadedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return layer._forward_on_host(x, idx, w)

    def single_token(
        self, layer: OffloadedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, experts: list[int]
    ) -> torch.Tensor | None:
        """One token's output computed by this handling (after the host's prefetch scoring), or None: the slots'."""
        return None

    def reset_stats(self) -> None:
        pass

    def emptied(self, layer: OffloadedExperts) -> None:
        """The layer's cache was emptied after an interrupted call."""

    def counts(self, layer: OffloadedExperts) -> tuple[int, int, int]:
        """Hits, misses and bytes read in place that the host's table did not count."""
        return 0, 0, 0


class CpuMisses(CopyMisses):
    """A single token's missing experts are computed on the CPU where they lie (`OffloadedExperts._decode_split`)."""

    on_cpu = True

    def single_token(
        self, layer: OffloadedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, experts: list[int]
    ) -> torch.Tensor | None:
        if x.shape[0] == 1 and getattr(layer.inner, "gathers", False):
            return layer._decode_split(x, idx, w, experts)
        return None


class DirectMisses(CopyMisses):
    """The device reads a single token's missing experts from host RAM, keeping its own slot map (`DeviceLRU`).
    `scratch`: a device buffer of at least top_k * expert_bytes bytes, shared by the layers (they run one after
    another); `pinned` (a static profile's hot set) are never evicted. Needs stacked experts and the store in host RAM
    (pinned on CUDA)."""

    direct = True

    def __init__(self, layer: OffloadedExperts, scratch: torch.Tensor, top_k: int, pinned: Sequence[int] = ()) -> None:
        if not isinstance(layer.store, MemoryStore) or not getattr(layer.inner, "gathers", False):
            raise ValueError("direct reads need stacked experts and a store in host RAM")
        self.top_k, self.pinned = top_k, list(pinned)
        self.gathered = scratch[: top_k * layer.layout.expert_bytes].view(top_k, -1)
        self.scratch_inner = layer._bound_copy(self.gathered)
        self.lru = DeviceLRU(layer.num_experts, layer.table.num_slots, top_k, layer.device)
        self.lru.from_table(layer.table, self.pinned)
        self.base = self.lru.counts()

    def forward(self, layer: OffloadedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.forward_token(layer, x, idx, w)
        self.lru.to_table(layer.table)  # a prompt streams through the host's table: give it the device's state
        try:
            return layer._forward_on_host(x, idx, w)
        finally:  # a static profile's hot set comes back (the stream may have passed over it), then the device
            self.restore(layer)

    def forward_token(
        self, layer: OffloadedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        """One token, nothing decided on the host: its experts routed through the device's cache, gathered from
        their slots or from host RAM, then computed as a resident layer computes them."""
        ids = idx.reshape(-1)
        src, dst = self.lru.route(ids)
        gather_rows(self.gathered, layer.slots, layer.store.rows, src, ids, dst)
        return self.scratch_inner.forward_all(x, w)

    def restore(self, layer: OffloadedExperts) -> None:
        """The pinned experts loaded again, and the device's map made from the host's table."""
        layer._fetch(layer.table.preload(self.pinned))
        self.lru.from_table(layer.table, self.pinned)

    def reset_stats(self) -> None:
        self.base = self.lru.counts()  # (tokens, hits) so far: the statistics count from here

    def emptied(self, layer: OffloadedExperts) -> None:
        self.restore(layer)

    def counts(self, layer: OffloadedExperts) -> tuple[int, int, int]:
        """The device counted its tokens and hits; each miss read an expert across the bus."""
        (tokens, hits), (tokens0, hits0) = self.lru.counts(), self.base
        hits -= hits0
        misses = (tokens - tokens0) * self.top_k - hits
        return hits, misses, misses * layer.layout.expert_bytes


COPY = CopyMisses()
CPU = CpuMisses()


def miss_costs(x: OffloadedExperts, hidden: int, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds (medians of 5) to copy one expert into a slot, and to compute one expert for one token on the CPU."""
    cuda = x.device.type == "cuda"

    def median_time(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(5):
            if cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - t0)
        return sorted(times)[2]

    twin, token, row = x.twin(), torch.randn(1, hidden).to(dtype), torch.empty_like(x.slots[0])
    copy_s = median_time(lambda: x.store.read_into(0, row))  # into a row of its own: the slots keep their experts
    cpu_s = median_time(lambda: twin.expert_forward(0, token))
    return copy_s, cpu_s


def _lfu_refusal() -> MarcoError:
    return MarcoError(
        "--expert-misses direct evicts the least recently used expert", hint="use --expert-policy lru or static with it"
    )


def _direct_refusal(layers: list[OffloadedExperts]) -> MarcoError | None:
    """Why missing experts cannot be read in place here (offload/direct.py), or None when they can."""
    device = layers[0].device
    if device.type == "cuda":
        if not all(isinstance(x.store, MemoryStore) and getattr(x.inner, "gathers", False) for x in layers):
            return MarcoError("reading missing experts in place needs stacked experts in host RAM")
        if isinstance(layers[0].table.policy, LFU):
            return _lfu_refusal()
    reason = direct_unavailable(device)
    return MarcoError(reason, hint="use --expert-misses copy") if reason else None


def choose(
    layers: list[OffloadedExperts], placement: Placement, cfg: ModelConfig, dtype: torch.dtype
) -> tuple[float, float] | None:
    """Give every layer its miss handling for `placement.misses`; returns the measured (copy, CPU) seconds when
    `auto` measured them. `auto` on CUDA reads in place wherever that works and no --prefetch was asked for: the
    decode step then stays one CUDA graph, where a copy cuts it at every layer. Else it measures a copy against the
    CPU and takes the CPU when that is clearly cheaper."""
    if placement.misses not in MISS_HANDLING:
        raise MarcoError(f"unknown --expert-misses {placement.misses!r}", hint="use auto, copy, cpu or direct")
    on_cuda = layers[0].device.type == "cuda"
    if placement.misses == "direct" or (placement.misses == "auto" and on_cuda and not placement.prefetch):
        refusal = _direct_refusal(layers)
        if refusal is None:
            enable_direct(layers, cfg.num_experts_per_tok)
            return None
        if placement.misses == "direct":
            raise refusal
    able = all(x.can_compute_on_cpu() for x in layers)
    on_cpu, costs = False, None
    if placement.misses == "cpu":
        if not able and layers[0].device.type == "cpu":
            raise MarcoError(
                "--expert-misses cpu is for CUDA (the CPU computes the missing experts while the GPU computes the "
                "others); on a CPU-only run every expert is computed on the CPU already",
                hint="leave --expert-misses out",
            )
        if not able:
            raise MarcoError(
                "--expert-misses cpu needs the experts in host RAM as plain tensors (a checkpoint folder on CUDA)",
                hint="use --expert-misses copy",
            )
        on_cpu = True
    elif placement.misses == "auto" and able and on_cuda:
        costs = miss_costs(layers[0], cfg.hidden_size, dtype)
        on_cpu = costs[1] < CPU_MISS_MARGIN * costs[0]
    for x in layers:
        x.misses = CPU if on_cpu else COPY
    return costs


def enable_direct(layers: list[OffloadedExperts], top_k: int) -> None:
    """Every layer reads its missing experts where they lie and keeps its slot map on the device
    (offload/direct.py), through one gather buffer the layers share (they run one after another on one stream).
    LRU eviction; a static profile's top experts (all but top_k of the slots) are pinned."""
    first = layers[0]
    if isinstance(first.table.policy, LFU):
        raise _lfu_refusal()
    width = max(x.layout.expert_bytes for x in layers)
    scratch = torch.zeros(top_k * width, dtype=torch.uint8, device=first.device)
    for x in layers:
        policy, keep = x.table.policy, max(0, x.table.num_slots - top_k)
        static = isinstance(policy, StaticHotSet) and keep
        pinned = sorted(range(x.num_experts), key=lambda e: -policy.freq[e])[:keep] if static else []
        x.enable_direct(scratch, top_k, pinned)
