"""Missing experts read where they lie: the GPU gathers a token's experts from its slots or from pinned host RAM.

Why: copying a missing expert into a slot needs the host to know which experts a token uses, so the CUDA graphs are
cut at every offloaded layer, and each cut costs a device synchronization, bookkeeping and a graph launch (~80 us on
an H200, ~2.2 ms per Nano token: more than the copies themselves). Here one kernel per layer copies the token's
experts into a small buffer, each row from its fast slot when the expert is resident, else straight from the pinned
host rows over the bus (CUDA maps pinned memory into the device's address space), choosing per row on the device.
Nothing waits on the host, so the whole decode step is one graph whatever the budget. The fast slots hold a hot set
that the host moves between tokens from access counts the step keeps on the device (`HotSets`).

On the CPU (tests) the same gather runs as torch ops over the store's rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

_KERNEL = None


def hot_set_moves(
    slot_of: Sequence[int], free: int, score: Sequence[float], limit: int | None
) -> tuple[list[int], list[tuple[int, int]]]:
    """How the slots move toward the `score`-hottest experts: missing experts for the `free` empty slots (hottest
    first), then (leaving, entering) pairs, the coldest resident expert for the hottest missing one, while that
    raises the score, at most `limit` pairs (None: no limit); ties go to the lower expert id. Pure bookkeeping,
    shared by the live cache (`HotSets`) and the trace simulator (`trace.simulate_direct`)."""
    where = np.asarray(slot_of)
    score = np.asarray(score, dtype=np.float64)
    resident, missing = np.flatnonzero(where >= 0), np.flatnonzero(where < 0)
    resident = resident[np.argsort(score[resident], kind="stable")]  # coldest first
    missing = missing[np.argsort(-score[missing], kind="stable")]  # hottest first
    fills, missing = missing[:free], missing[free:]
    n = min(len(resident), len(missing), len(resident) if limit is None else limit)
    better = score[missing[:n]] > score[resident[:n]]
    n = int(np.argmin(better)) if not better.all() else n  # stop at the first pair that does not raise the score
    return fills.tolist(), list(zip(resident[:n].tolist(), missing[:n].tolist(), strict=True))


class HotSets:
    """The direct-read layers of one model and their hot sets, moved together between tokens.

    The step keeps per-layer access counts on the device ([L, E]); between tokens the host reads all of them at
    once, decays them into scores, and only for the layers where a missing expert now outscores a resident one
    computes the moves (`hot_set_moves`) and copies the entering experts into the leaving ones' slots, on the compute
    stream. One copy of the [L, E] slot map then updates the device's. Hits are counted on the host: residency only
    changes at a move. A prompt streams through the slots (the layers' grouped path), so the layers it touched are
    restored before the next token."""

    def __init__(self, layers: list, top_k: int, every: int = 16, decay: float = 0.9, limit: int = 8) -> None:
        self.layers, self.every, self.decay, self.limit = layers, every, decay, limit
        L, E = len(layers), layers[0].num_experts
        device = layers[0].device
        self.access = torch.zeros(L, E, dtype=torch.float32, device=device)  # counts exact below 2**24
        self.window = np.zeros((L, E))  # counts read back since the last move
        self.hits = np.zeros(L, dtype=np.int64)  # residency only changes at a move, so hits = counts of residents
        # the slot map the device reads (an expert on its way in is not in it yet) and the host's plan (the tables)
        self.host_map = torch.tensor([x.table.slot_of for x in layers], dtype=torch.long)
        if device.type == "cuda":
            self.host_map = self.host_map.pin_memory()
        self.device_map = self.host_map.clone().to(device)  # its own tensor on the CPU too (as on CUDA)
        self.plan = self.host_map.numpy().copy()
        # CUDA: the entering experts are copied on a side stream while decode goes on, and shown to the device at
        # the next move (`arriving`: the layers concerned; `copied`: the event that ends their copies)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.defer = self.copy_stream is not None  # tests turn it on for the CPU (copies then synchronous)
        self.arriving: list[int] = []
        self.copied: torch.cuda.Event | None = None
        self.score = np.zeros((L, E))
        # a static profile ranks the experts for good: those rows' scores never change
        self.pinned = np.array([x.static_ranking() is not None for x in layers])
        for i, x in enumerate(layers):
            if self.pinned[i]:
                self.score[i] = x.static_ranking()
        self.stale = np.zeros(L, dtype=bool)
        self.tokens = 0
        width = max(x.layout.expert_bytes for x in layers)
        scratch = torch.zeros(top_k * width, dtype=torch.uint8, device=device)  # the layers run one after another
        for i, x in enumerate(layers):
            x.attach_hot_sets(self, i, scratch, top_k)

    def prompt_counts(self, row: int, experts: list[int], counts: list[int]) -> None:
        """A prompt is about to go through layer `row`, streamed through its slots by the slot table: count its
        experts, restore the layer before the next token. The table counts experts still being copied in as
        resident, so the prompt's work waits for those copies (on the device)."""
        if self.copied is not None:
            torch.cuda.current_stream(self.copy_stream.device).wait_event(self.copied)
        if not self.pinned[row]:
            self.score[row, experts] += counts
        self.stale[row] = True

    def before_token(self) -> None:
        if self.stale.any():
            self.rebalance(limit=None)

    def after_token(self) -> None:
        self.tokens += 1
        for x in self.layers:
            x.direct_tokens += 1
        if self.tokens % self.every == 0:
            self.rebalance(self.limit)

    def read_counts(self) -> None:
        """Move the device's access counts to the host (waiting for the steps that counted), and count the hits
        among them: the experts resident now were resident since the last move."""
        counts = self.access.to("cpu", torch.float64).numpy()
        self.access.zero_()
        self.window += counts
        self.hits += (counts * (self.host_map.numpy() >= 0)).sum(axis=1).astype(np.int64)

    def rebalance(self, limit: int | None) -> None:
        """Move the hot sets. After a prompt (stale layers) the moves are copied on the compute stream and shown at
        once: the next token needs them. Otherwise, on CUDA, a move first hides the leaving experts from the device
        (read in place from the next token on), copies the entering ones into their slots on a side stream behind
        the steps already queued, and shows them at the next move; decode never waits for these copies."""
        self.read_counts()  # waits for the steps queued so far
        live = ~self.pinned
        self.score[live] = self.score[live] * self.decay + self.window[live]
        self.window[:] = 0
        host_map = self.host_map.numpy()
        if self.copied is not None:  # the last move's copies: long done, normally
            self.copied.synchronize()
            self.copied = None
        for i in self.arriving:
            host_map[i] = self.plan[i]
        changed = bool(self.arriving)
        self.arriving = []
        for i in np.flatnonzero(self.stale):  # the prompt moved experts: the table knows where
            self.plan[i] = host_map[i] = self.layers[i].table.slot_of
        resident = self.plan >= 0
        coldest = np.where(resident, self.score, np.inf).min(axis=1)
        hottest = np.where(resident, -np.inf, self.score).max(axis=1)
        free = np.array([len(x.table.free) > 0 for x in self.layers])
        side = self.copy_stream is not None
        if side:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.copy_stream.device))
        for i in np.flatnonzero((hottest > coldest) | free | self.stale):
            x, deferred = self.layers[i], self.defer and not self.stale[i]
            fills, swaps = hot_set_moves(
                self.plan[i], len(x.table.free), self.score[i], None if self.stale[i] else limit
            )
            entering = fills + [e for _, e in swaps]
            if not entering:
                continue
            with torch.cuda.stream(self.copy_stream) if deferred and side else contextlib.nullcontext():
                x.move_in(fills, swaps)
            self.plan[i] = host_map[i] = x.table.slot_of
            if deferred:
                host_map[i, entering] = -1
                self.arriving.append(int(i))
            changed = True
        if self.arriving and side:
            self.copied = torch.cuda.Event()
            self.copied.record(self.copy_stream)
        if changed or self.stale.any():
            self.device_map.copy_(self.host_map, non_blocking=True)
        self.stale[:] = False


def unavailable_reason(device: torch.device) -> str | None:
    """Why the direct reads cannot run on `device`, or None when they can: on CUDA, one small gather from pinned
    memory is run and checked (a driver or triton that cannot map host memory fails here, not mid-generation)."""
    if device.type != "cuda":
        return "reading missing experts in place needs a CUDA device (on the CPU the file already is read in place)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "reading missing experts in place needs triton (installed with torch's CUDA builds)"
    try:
        host = torch.arange(128, dtype=torch.uint8).view(2, 64).pin_memory()
        slots = torch.full((1, 64), 7, dtype=torch.uint8, device=device)
        out = torch.empty(2, 64, dtype=torch.uint8, device=device)
        ids = torch.tensor([1, 0], device=device)
        gather_rows(out, slots, host, torch.tensor([-1, 0], device=device), ids)
        if not (torch.equal(out[0].cpu(), host[1]) and torch.equal(out[1].cpu(), slots[0].cpu())):
            return "reading missing experts in place gave wrong bytes on this GPU"
    except Exception as e:  # triton or the driver refusing host memory: the reason, in one line
        first = (str(e).splitlines() or [""])[0]
        return f"reading missing experts in place failed on this GPU: {type(e).__name__}: {first}"
    return None


def gather_rows(
    out: torch.Tensor, slots: torch.Tensor, host_rows: torch.Tensor, slot_ids: torch.Tensor, expert_ids: torch.Tensor
) -> None:
    """out[k] = slots[slot_ids[k]] where slot_ids[k] >= 0, else host_rows[expert_ids[k]]: uint8 rows of one size;
    `out` and `slots` on the device, `host_rows` pinned host memory (or the CPU for tests), ids int64 [K]."""
    if out.device.type != "cuda":
        resident = (slot_ids >= 0).view(-1, 1)
        out.copy_(torch.where(resident, slots[slot_ids.clamp(min=0)], host_rows[expert_ids]))
        return
    words = out.shape[1] // 4  # rows are 64-byte aligned (ExpertLayout), so they copy as int32 words
    _launch(out.view(torch.int32), slots.view(torch.int32), host_rows.view(torch.int32), slot_ids, expert_ids, words)


def _launch(out, slots, host_rows, slot_ids, expert_ids, words: int) -> None:
    global _KERNEL
    import triton

    if _KERNEL is None:
        _KERNEL = _build_kernel()
    block = 1024
    grid = (out.shape[0], triton.cdiv(words, block))
    _KERNEL[grid](out, slots, host_rows, slot_ids, expert_ids, words, BLOCK=block)


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gather(out_ptr, slots_ptr, host_ptr, slot_ids_ptr, expert_ids_ptr, words, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < words
        slot = tl.load(slot_ids_ptr + row)
        expert = tl.load(expert_ids_ptr + row)
        if slot >= 0:
            values = tl.load(slots_ptr + slot * words + offs, mask=mask)
        else:  # a read across the bus from pinned host memory
            values = tl.load(host_ptr + expert * words + offs, mask=mask)
        tl.store(out_ptr + row.to(tl.int64) * words + offs, values, mask=mask)

    return gather
