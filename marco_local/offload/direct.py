"""Missing experts read where they lie: the GPU gathers a token's experts from its slots or from pinned host RAM.

Why: copying a missing expert into a slot needs the host to know which experts a token uses, so the CUDA graphs are
cut at every offloaded layer, and each cut costs a device synchronization, bookkeeping and a graph launch (~80 us on
an H200, ~2.2 ms per Nano token: more than the copies themselves). Here one kernel per layer copies the token's
experts into a small buffer, each row from its fast slot when the expert is resident, else straight from the pinned
host rows over the bus (CUDA maps pinned memory into the device's address space), choosing per row on the device.
Nothing waits on the host, so the whole decode step is one graph whatever the budget. The fast slots hold a hot set
that the host refreshes between tokens from access counts the step keeps on the device (`OffloadedExperts.rebalance`).

On the CPU (tests) the same gather runs as torch ops over the store's rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_KERNEL = None


def hot_set_moves(
    slot_of: Sequence[int], free: int, score: Sequence[float], limit: int | None
) -> tuple[list[int], list[tuple[int, int]]]:
    """How the slots move toward the `score`-hottest experts: missing experts for the `free` empty slots (hottest
    first), then (leaving, entering) pairs, the coldest resident expert for the hottest missing one, while that
    raises the score, at most `limit` pairs (None: no limit). Pure bookkeeping, shared by the live cache
    (`OffloadedExperts.rebalance`) and the trace simulator (`trace.simulate_direct`)."""
    experts = range(len(slot_of))
    resident = sorted((e for e in experts if slot_of[e] >= 0), key=lambda e: score[e])
    missing = sorted((e for e in experts if slot_of[e] < 0), key=lambda e: -score[e])
    fills, missing = missing[:free], missing[free:]
    swaps = []
    for cold, hot in zip(resident, missing, strict=False):
        if score[hot] <= score[cold] or (limit is not None and len(swaps) >= limit):
            break
        swaps.append((cold, hot))
    return fills, swaps


def unavailable_reason(device: torch.device) -> str | None:
    """Why the direct reads cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return "reading missing experts in place needs a CUDA device (on the CPU the file already is read in place)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "reading missing experts in place needs triton (installed with torch's CUDA builds)"
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
