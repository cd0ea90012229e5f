"""`OffloadedExperts`: an `Experts` module whose experts live in a slow tier and are copied into a few fast slots.

It wraps any `Experts` (bf16 or quantized): every per-expert tensor of the inner module is rebound to a typed view of
one `[S, expert_bytes]` buffer allocated once in the fast tier (the slots), so `inner.expert_forward(slot, x)` computes
an expert that sits in that slot. `forward` keeps `Experts.forward`'s routing loop exactly (pairs grouped by expert
id, ascending), so the output is bit-identical to the non-offloaded module for every number of slots; when one call
needs more experts than slots (a prefill chunk), it streams the layer double-buffered: groups of S // 2 experts, the
next group loading (CPU loader thread, or CUDA copy stream) while the current one computes. A single token
through an inner module with its own `forward` (a quantized decode kernel that walks idx in routing order), or
through stacked experts on CUDA (gathered by slot id), goes to that forward with slot ids instead.

What a miss does is the layer's `misses` (offload/misses.py, chosen once at install): a copy into a slot; or, for a
single token, a computation on the CPU from the store's rows through `twin()` (the inner module bound to the store,
no copy) while the device computes the resident experts (`misses_on_cpu`); or a read in place by the device, which
keeps the slot map itself (`direct`, offload/direct.py). A prompt always streams through the host's table.

Invariants: owns the fast-tier slots and never allocates them again (decode allocates no slot memory); never evicts
an expert the current group needs; a speculative prefetch for this layer finishes (CPU thread) or is ordered before
use (CUDA copy stream) before the slots are read. On CUDA, copies run on a side stream from pinned host memory, and a
copy into a slot is ordered after the compute-stream work that may still read it; at a cut of the CUDA graphs, where
the host has synchronized the device, a token's own copies go on the compute stream instead (no events to record).
`stall_s` is host time spent waiting for experts (on CUDA the waits are device-side, so it stays near zero there).
A call that stops midway (Ctrl-C raises KeyboardInterrupt between any two bytecodes, e.g. after the table names an
expert's new slot and before its bytes arrive) leaves `busy` set; the next call empties the cache before it starts
(the slots refill on demand), so a chat that goes on after an interrupted reply computes with the right weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future

import torch
import torch.nn.functional as F
from torch import nn

from ..models.qwen3_moe import Experts
from .direct import DeviceLRU
from .misses import COPY, CopyMisses, DirectMisses
from .policy import Policy
from .slots import SlotTable
from .stats import LayerStats
from .store import ExpertLayout, ExpertStore, MemoryStore


class OffloadedExperts(nn.Module):
    def __init__(
        self,
        inner: nn.Module,
        store: ExpertStore,
        num_slots: int,
        policy: Policy,
        device: torch.device | str = "cpu",
        layer: int = 0,
    ) -> None:
        super().__init__()
        self.inner, self.store, self.layer = inner, store, layer
        self.num_experts = inner.num_experts
        self.layout: ExpertLayout = store.layout
        self.table = SlotTable(self.num_experts, num_slots, policy)
        self.device = torch.device(device)
        # zero-filled, not just reserved: the pages are committed here, so a miss during decode never takes page
        # faults on a fresh slot (Nano GGUF, 50% resident, synthetic trace: 15.5 -> 21.0 tok/s); the budget counts
        # these bytes anyway
        self.slots = torch.zeros(num_slots, self.layout.expert_bytes, dtype=torch.uint8, device=self.device)
        self.slot_rows = list(self.slots)  # one view per slot, made once: a copy into a slot indexes nothing
        self.layout.bind(inner, self.slots)
        # an inner `forward` of its own (QExperts' decode kernel) is used for single tokens; the base routing loop,
        # replayed here in expert-id order, keeps everything else bit-identical to the unwrapped module
        self.own_forward = type(inner).forward is not Experts.forward
        self.exact = getattr(inner, "exact", False)  # a reference module: computes each expert alone, routed in torch
        # stacked experts on CUDA: a single token's experts are gathered from the slots by slot id (no host sync
        # after the routing has been read)
        self.gather_decode = self.device.type == "cuda" and getattr(inner, "gathers", False)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.copies_in_flight = False  # copies queued on copy_stream that the compute stream has not waited for
        # what a missing expert costs (offload/misses.py, chosen at install): a copy into a slot, a computation on the
        # CPU from the store (`cpu_twin`: the inner module on the store), or a read in place by the device
        self.misses: CopyMisses = COPY
        self.cpu_twin: nn.Module | None = None
        # expert id -> slot on the device, once `load_all` has made every expert resident for good
        self.slot_map: torch.Tensor | None = None
        # speculation: the next layer's router and cache, set by `link`
        self.next: OffloadedExperts | None = None
        self.next_gate: nn.Module | None = None
        self.next_top_k = 0
        self.executor: Executor | None = None  # CPU: the runtime's loader thread (prefetch, streaming groups)
        self.pending: Future | None = None
        self.predicted: set[int] | None = None
        self.busy = False  # a call that may place experts has started and not returned
        self.reset_stats()

    def reset_stats(self) -> None:
        self.bytes_moved = self.prefetch_bytes = 0
        self.stall_s = 0.0
        self.cpu_experts, self.cpu_s = 0, 0.0
        self.pred_total = self.pred_hit = self.actual_total = 0
        self.table.hits = self.table.misses = self.table.calls = 0
        self.misses.reset_stats()

    @property
    def slot_bytes(self) -> int:
        return self.slots.nbytes

    def link(self, nxt: OffloadedExperts, gate: nn.Module, top_k: int) -> None:
        """Enable prefetch: speculate `nxt`'s experts with its router `gate` (CPU: on the executor's thread)."""
        self.next, self.next_gate, self.next_top_k = nxt, gate, top_k

    # -- moving experts -------------------------------------------------------------------------------------------
    def _copy(self, loads: Sequence[tuple[int, int]]) -> None:
        if self.copy_stream is None:
            for e, s in loads:
                self.store.read_into(e, self.slot_rows[s])
            return
        # the slot may still be read by kernels queued on the compute stream: the copy waits for them first
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for e, s in loads:
                self.store.read_into(e, self.slot_rows[s])
        self.copies_in_flight = True

    def _wait_copies(self) -> None:
        """Order the compute stream after this layer's queued copies (CUDA; nothing to do when none are pending)."""
        if self.copies_in_flight:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self.copies_in_flight = False

    def _fetch(self, loads: Sequence[tuple[int, int]], device_idle: bool = False) -> None:
        """Copy `loads` into their slots before the next compute. `device_idle`: the caller has synchronized the
        compute stream (a cut of the CUDA graphs), so the copies go on that stream itself: ordered before the next
        segment and after nothing, with no cross-stream events (each costs host time while the GPU waits)."""
        if not loads:
            return
        t0 = time.perf_counter()
        if device_idle:
            for e, s in loads:
                self.store.read_into(e, self.slot_rows[s])
        else:
            self._copy(loads)
            if self.copy_stream is not None:
                self._wait_copies()
        self.stall_s += time.perf_counter() - t0
        self.bytes_moved += len(loads) * self.layout.expert_bytes

    def _assign_and_copy(self, experts: Sequence[int], protected: set[int]) -> None:
        loads = self.table.assign(experts, protected)
        self._copy(loads)
        self.bytes_moved += len(loads) * self.layout.expert_bytes

    def _load_async(self, experts: Sequence[int], protected: set[int]) -> Future | None:
        """Start loading the next streaming group while the current one computes (CPU thread / CUDA copy stream)."""
        if self.executor is not None:
            return self.executor.submit(self._assign_and_copy, experts, protected)
        t0 = time.perf_counter()
        self._assign_and_copy(experts, protected)  # CUDA: only queued; CPU without a thread: synchronous
        self.stall_s += time.perf_counter() - t0
        return None

    def _load_wait(self, pending: Future | None) -> None:
        t0 = time.perf_counter()
        if pending is not None:
            pending.result()
        if self.copy_stream is not None:
            self._wait_copies()
        self.stall_s += time.perf_counter() - t0

    def preload(self, experts: Sequence[int]) -> None:
        """Bring experts in without counting an access (prefetch, profile warm-up)."""
        loads = self.table.preload(experts)
        self._copy(loads)
        n = len(loads) * self.layout.expert_bytes
        self.bytes_moved += n
        self.prefetch_bytes += n

    def load_all(self) -> None:
        """When the slots hold every expert (the budget fits them all), load them all now. Nothing is evicted after
        that, so a decode token's experts map to their slots on the device (`slot_map`) with no host step: the CUDA
        graphs need no cut at this layer. Statistics start afresh."""
        if self.table.num_slots < self.num_experts:
            return
        self.preload(range(self.num_experts))
        self._load_wait(None)
        self.slot_map = torch.tensor(self.table.slot_of, device=self.device)
        if self.misses.direct:  # nothing can miss: direct reads have nothing to do, the host's table stays the truth
            self.misses = COPY
        self.reset_stats()

    def _settle(self, experts: list[int]) -> None:
        """Wait for this layer's prefetch and score the speculation against what the router chose."""
        if self.pending is not None:
            t0 = time.perf_counter()
            self.pending.result()
            self.stall_s += time.perf_counter() - t0
            self.pending = None
        if self.copy_stream is not None:  # a prefetch's copies (or none: then there is nothing to wait for)
            self._wait_copies()
        if self.predicted is not None:
            self.pred_total += len(self.predicted)
            self.pred_hit += len(self.predicted.intersection(experts))
            self.actual_total += len(experts)
            self.predicted = None

    @property
    def speculates(self) -> bool:
        """Prefetch is on and the next layer can miss (a full layer, `load_all`, never does)."""
        return self.next is not None and self.next.slot_map is None

    def guess_next(self, x: torch.Tensor) -> torch.Tensor:
        """The next layer's likely experts for the MoE input `x` [1, D]: its router applied here, top-k ids [1, k] on
        the device (no host read: cuda_graphs.py captures this and reads it with the routing)."""
        w = self.next_gate.weight
        return torch.topk(F.linear(x.to(w.dtype), w), self.next_top_k, dim=-1).indices

    def _speculate(self, x: torch.Tensor) -> None:
        """Apply the next layer's router to this layer's input and start loading its likely experts."""
        if self.speculates and x.shape[0] == 1:  # decode only: a prefill chunk streams layers anyway
            self._prefetch_next(self.guess_next(x).reshape(-1).tolist())

    def _prefetch_next(self, guess: list[int]) -> None:
        nxt = self.next
        nxt.predicted = set(guess)
        if nxt.executor is not None:
            nxt.pending = nxt.executor.submit(nxt.preload, guess)
        else:  # CUDA: only queues copies on the side stream, but on this thread: a Ctrl-C may stop it midway
            nxt._enter()
            nxt.preload(guess)
            nxt.busy = False

    # -- calls that stop midway -------------------------------------------------------------------------------------
    def _enter(self) -> None:
        """Start a call that may place experts, after emptying the cache if the previous one never returned."""
        if self.busy:
            self._empty()
        self.busy = True

    def _empty(self) -> None:
        """Every slot empty (a static profile's pinned experts loaded again, for direct reads): the table may name
        experts whose copies never ran. Work already queued finishes first: the loader thread's (one thread, so one
        empty task waits for all before it), the device's."""
        if self.executor is not None:
            self.executor.submit(lambda: None).result()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.copies_in_flight = False
        self.pending = self.predicted = None
        if self.slot_map is not None:  # every expert loaded at install and nothing placed since: intact
            return
        self.table.clear()
        self.misses.emptied(self)

    # -- the routing loop ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self._enter()
        y = self._forward(x, idx, weights)
        self.busy = False
        return y

    def _forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.slot_map is not None and x.shape[0] == 1 and getattr(self.inner, "gathers", False):
            self.count_resident_token(idx.numel())  # every expert resident: ids map to slots on the device
            return self.inner.forward_gathered(x, self.slot_map[idx], weights)
        return self.misses.forward(self, x, idx, weights)

    def _forward_on_host(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The host decides what is resident (the slot table), copies, then computes."""
        A = idx.shape[1]  # x [T, D], idx/weights [T, A]; same loop as Experts.forward, experts -> slots
        flat = idx.reshape(-1)  # [T*A]
        order = torch.argsort(flat, stable=True)
        experts_t, counts_t = torch.unique_consecutive(flat[order], return_counts=True)
        experts, counts = experts_t.tolist(), counts_t.tolist()
        self._settle(experts)
        self._speculate(x)
        y = self.misses.single_token(self, x, idx, weights, experts)
        if y is not None:
            return y
        if (self.own_forward or self.gather_decode) and x.shape[0] == 1 and len(experts) <= self.table.num_slots:
            # a quantized module's batched decode kernel, or the gathered CUDA decode: they walk idx in routing
            # order, so slot ids change nothing
            self._fetch(self.table.assign(experts))
            slot_of = self.table.slot_of
            slots = torch.tensor([[slot_of[e] for e in row] for row in idx.tolist()], device=idx.device)
            return self.inner(x, slots, weights)
        if x.shape[0] == 1 and self.own_forward and not self.exact and hasattr(self.inner, "decode_rows"):
            if self.inner.native or not self.inner.dense:  # the inner single-token path, in groups that fit
                return self._decode_in_groups(x, idx, weights)
        flat_weights = weights.reshape(-1, 1)
        out = torch.zeros_like(x)
        start = i = 0
        slot_of = self.table.slot_of
        steps = self.table.schedule(experts)
        self._fetch(self.table.assign(*steps[0]))
        for k, (group, _) in enumerate(steps):
            nxt = steps[k + 1] if k + 1 < len(steps) else None
            # double buffer: load the next group while this one computes, when the next step protects this group
            overlap = nxt is not None and set(group) <= nxt[1]
            pending = self._load_async(*nxt) if overlap else None
            for e in group:
                pairs = order[start : start + counts[i]]
                tokens = pairs // A
                y = self.inner.expert_forward(slot_of[e], x[tokens]) * flat_weights[pairs]
                out.index_add_(0, tokens, y.to(out.dtype))
                start += counts[i]
                i += 1
            if overlap:
                self._load_wait(pending)
            elif nxt is not None:  # a single slot: nothing to overlap, the next group replaces this one
                self._fetch(self.table.assign(*nxt))
        return out

    # -- how misses are handled (offload/misses.py) ---------------------------------------------------------------
    @property
    def misses_on_cpu(self) -> bool:
        """A single token's missing experts are computed on the CPU where they lie."""
        return self.misses.on_cpu

    @property
    def direct(self) -> bool:
        """The device reads missing experts in place and keeps the slot map (`lru`)."""
        return self.misses.direct

    @property
    def lru(self) -> DeviceLRU | None:
        return self.misses.lru

    def enable_direct(self, scratch: torch.Tensor, top_k: int, pinned_experts: Sequence[int] = ()) -> None:
        """Read a token's missing experts from the store where they lie (`DirectMisses`)."""
        self.misses = DirectMisses(self, scratch, top_k, pinned_experts)

    def _bound_copy(self, rows: torch.Tensor) -> nn.Module:
        """A shallow copy of the inner module whose per-expert tensors are views of `rows` (no copy of weights)."""
        twin = copy.copy(self.inner)
        twin._parameters, twin._buffers = dict(self.inner._parameters), dict(self.inner._buffers)
        self.layout.bind(twin, rows)
        return twin

    # -- misses computed where they lie ------------------------------------------------------------------------------
    def can_compute_on_cpu(self) -> bool:
        """The store holds every expert in host RAM, as plain registered tensors of an inner module that computes
        experts gathered by slot id (the resident part of a split token)."""
        kinds = {f.kind for f in self.layout.fields}
        gathers = getattr(self.inner, "gathers", False)
        return isinstance(self.store, MemoryStore) and kinds <= {"param", "buffer"} and gathers

    def twin(self) -> nn.Module:
        """The inner module's twin on the CPU, its experts views of the store's rows (built once, no copy)."""
        if self.cpu_twin is None:
            twin = self._bound_copy(self.store.rows)
            for name, t in twin._buffers.items():  # what every expert shares (StackedExperts4bit's code table)
                if t is not None and t.device.type != "cpu":
                    twin._buffers[name] = t.cpu()
            self.cpu_twin = twin
        return self.cpu_twin

    def cpu_part(self, missing: list[int], row: list[int], weights: list[float], x: torch.Tensor) -> torch.Tensor:
        """The weighted sum of the `missing` experts of one token (`row`: its experts in routing order, `weights`
        theirs) for the MoE input `x` (on the host), computed on the CPU from the store: [1, D] float32."""
        t0 = time.perf_counter()
        twin, x = self.twin(), x.reshape(1, -1)
        out = torch.zeros(1, x.shape[1])
        for e in missing:
            w = sum(wt for ex, wt in zip(row, weights, strict=True) if ex == e)
            out += w * twin.expert_forward(e, x).float()
        self.cpu_experts += len(missing)
        self.cpu_s += time.perf_counter() - t0
        return out

    def split_for_token(self, row: list[int], x: torch.Tensor) -> tuple[list[int], list[float], list[int]]:
        """One token, misses computed on the CPU: (slot per expert in routing order, 1/0 whether it is resident, the
        missing experts). What `forward` does first (prefetch scoring and speculation, the access count); nothing is
        copied. A missing expert gets slot 0 with weight 0."""
        experts = sorted(set(row))
        self._settle(experts)
        self._speculate(x)
        missing = self.table.account(experts)
        slot_of = self.table.slot_of
        return [max(slot_of[e], 0) for e in row], [float(slot_of[e] >= 0) for e in row], missing

    def _decode_split(
        self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: list[int]
    ) -> torch.Tensor:
        """One token: the resident experts from their slots (queued on the device), the missing ones on the CPU from
        the store meanwhile; the sum of both."""
        missing = self.table.account(experts)
        row, slot_of = idx[0].tolist(), self.table.slot_of
        x_host, w_host = x.to("cpu"), weights[0].tolist()  # read before the device work is queued
        slots = torch.tensor([[max(slot_of[e], 0) for e in row]], device=idx.device)
        mask = torch.tensor([[float(slot_of[e] >= 0) for e in row]], dtype=weights.dtype, device=weights.device)
        y = self.inner.forward_gathered(x, slots, weights * mask)
        if missing:
            y = y + self.cpu_part(missing, row, w_host, x_host).to(device=y.device, dtype=y.dtype)
        return y

    def slots_for_token(self, row: list[int], x: torch.Tensor, guess: list[int] | None = None) -> list[int]:
        """One token's experts `row` (routing order) made resident, for a caller that computes them itself from the
        slots (cuda_graphs.py): what `forward` does before its gathered single-token path (prefetch scoring, copies,
        stats, and speculation from the MoE input `x` [1, D], or from the next layer's `guess` when the caller has
        it: `guess_next`); their slot ids in routing order. The token's own copies are queued before the guesses'.
        The caller has synchronized the device (the segment that routed): the token's copies go on the compute stream
        (`_fetch(device_idle=True)`), after any prefetch into this layer's slots (`_settle` orders that first)."""
        self._enter()
        experts = sorted(set(row))
        self._settle(experts)
        self._fetch(self.table.assign(experts), device_idle=True)
        if guess is not None:
            self._prefetch_next(guess)
        else:
            self._speculate(x)
        self.busy = False
        return [self.table.slot_of[e] for e in row]

    def _decode_in_groups(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token whose experts outnumber the slots (QExperts): groups that fit, in routing order, computed as the
        single-token path computes them, so the result equals the single-call (resident) one. The native kernel adds
        each group onto one float32 output; the int4 kernels' rows are kept and summed once."""
        order = idx[0].tolist()
        native = self.inner.native
        acc = torch.zeros(x.shape[1], dtype=torch.float32)
        rows = []
        for group, protected in self.table.schedule(order):
            self._fetch(self.table.assign(group, protected))
            at = [order.index(e) for e in group]
            slots = torch.tensor([[self.table.slot_of[e] for e in group]])
            if native:
                self.inner.decode_into(x, slots, weights[:, at], acc)
            else:
                rows.append(self.inner.decode_rows(x, slots, weights[:, at]))
        return acc.view(1, -1).to(x.dtype) if native else self.inner.sum_rows(torch.cat(rows), x.dtype)

    def count_resident_token(self, experts: int) -> None:
        """Statistics of a token whose `experts` (distinct: top-k) were all resident, without reading which."""
        self.table.hits += experts
        self.table.calls += 1

    def stats(self) -> LayerStats:
        t = self.table
        hits, misses, read_in_place = self.misses.counts(self)
        hits, misses = t.hits + hits, t.misses + misses
        return LayerStats(
            layer=self.layer,
            slots=t.num_slots,
            experts=t.num_experts,
            resident=t.resident,
            hits=hits,
            misses=misses,
            bytes_moved=self.bytes_moved,
            bytes_read_in_place=read_in_place,
            prefetch_bytes=self.prefetch_bytes,
            stall_s=self.stall_s,
            cpu_experts=self.cpu_experts,
            cpu_s=self.cpu_s,
            guessed=self.pred_total,
            guessed_right=self.pred_hit,
            routed=self.actual_total,
        )

    def extra_repr(self) -> str:
        return f"layer={self.layer}, slots={self.table.num_slots}/{self.num_experts}"
