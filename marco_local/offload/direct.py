"""Missing experts read where they lie: the GPU takes a token's experts from its slots or from pinned host RAM, and
keeps what it read in the least recently used slot, with no host step.

Why: copying a missing expert into a slot needs the host to know which experts a token uses, so the CUDA graphs are
cut at every offloaded layer, and each cut costs a device synchronization, bookkeeping and a graph launch (~80 us on
an H200, ~2.2 ms per Nano token: more than the copies themselves). Here two kernels per layer do the cache's work on
the device, so the whole decode step is one graph whatever the budget:
1. `route`: one program looks the token's experts up in the layer's slot map, stamps the slots it hits, and gives
   each missing expert the least recently used slot that this token does not use (stamps: a per-layer token clock),
   updating the map; `src[r]` is row r's slot or -1, `dst[r]` the slot a missing row goes to, or -1 when every slot
   is taken by this token's own experts. Pinned slots (a static profile's hot set) are never given away.
2. `gather_rows`: each row of the token's gather buffer is copied from its slot, or for a miss straight from the
   pinned host rows over the bus (CUDA maps pinned memory into the device's address space) and also into its new
   slot. The bytes cross the bus once, as a copy-on-miss would move them.
The cache is thus LRU with the current token's experts protected, the same policy as the host's `SlotTable`. A
prompt (many tokens) still streams through the host's table: it is synchronized from the device before and back
after (`DeviceLRU.to_table` / `from_table`).

On the CPU (tests) both steps run in Python and torch ops (`route_reference`, the torch branch of `gather_rows`),
which define what the kernels must do; tests run the kernels against them under triton's interpreter.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence

import torch

NEVER = 2**62  # the stamp of a slot no token may take: pinned, or used by the token being routed
EMPTY = -(2**62)  # the stamp of an empty slot: taken first
_KERNELS: dict[str, object] = {}


def route_reference(
    dmap: list[int], owner: list[int], stamp: list[int], pinned: list[bool], state: list[int], ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    """The route step in plain Python (the CPU path, and the specification the CUDA kernel is tested against).
    dmap: expert -> slot or -1; owner: slot -> expert or -1; stamp: slot -> last use; state: [clock, hits]; all
    updated in place. Returns (src, dst) per row of `ids` (distinct experts)."""
    clock = state[0] = state[0] + 1
    src = [dmap[e] for e in ids]
    for slot in src:
        if slot >= 0 and not pinned[slot]:
            stamp[slot] = clock
    state[1] += sum(slot >= 0 for slot in src)
    used = {slot for slot in src if slot >= 0}
    dst = [-1] * len(ids)
    for r, e in enumerate(ids):
        if src[r] >= 0:
            continue
        age, v = min((NEVER if pinned[v] or v in used else stamp[v], v) for v in range(len(owner)))
        if age >= clock:  # every slot is pinned or used by this token: read in place only
            continue
        used.add(v)
        stamp[v] = clock
        if owner[v] >= 0:
            dmap[owner[v]] = -1
        dmap[e], owner[v], dst[r] = v, e, v
    return src, dst


class DeviceLRU:
    """One layer's slot map and LRU stamps on the device, and the route step over them."""

    def __init__(self, num_experts: int, num_slots: int, top_k: int, device: torch.device) -> None:
        self.device, self.top_k = device, top_k
        self.dmap = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        self.owner = torch.full((num_slots,), -1, dtype=torch.long, device=device)
        self.stamp = torch.full((num_slots,), EMPTY, dtype=torch.long, device=device)
        self.pinned = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.state = torch.zeros(2, dtype=torch.long, device=device)  # [clock (tokens routed), hits]
        self.src = torch.full((top_k,), -1, dtype=torch.long, device=device)
        self.dst = torch.full((top_k,), -1, dtype=torch.long, device=device)

    def from_table(self, table, pinned_experts: Sequence[int] = ()) -> None:
        """Take the host table's placement: slots in its eviction order get rising stamps below the clock (the
        least recently used first; any other policy's residents in slot order), `pinned_experts` keep theirs."""
        clock = int(self.state[0])
        order = _lru_order(table.policy)
        slots = [table.slot_of[e] for e in (order or ()) if table.slot_of[e] >= 0]
        ranked = set(slots)
        slots += [s for s, e in enumerate(table.expert_in) if e >= 0 and s not in ranked]
        stamp = [EMPTY] * len(table.expert_in)
        for rank, s in enumerate(slots):
            stamp[s] = clock - len(slots) + rank
        pinned = [0] * len(table.expert_in)
        for e in pinned_experts:
            if table.slot_of[e] >= 0:
                pinned[table.slot_of[e]] = 1
        self.dmap.copy_(torch.tensor(table.slot_of))
        self.owner.copy_(torch.tensor(table.expert_in))
        self.stamp.copy_(torch.tensor(stamp))
        self.pinned.copy_(torch.tensor(pinned, dtype=torch.int32))

    def to_table(self, table) -> None:
        """Give the host table the device's placement (before a prompt streams through it), its LRU order from the
        stamps."""
        owner, stamp = self.owner.tolist(), self.stamp.tolist()
        table.slot_of = [-1] * table.num_experts
        for s, e in enumerate(owner):
            if e >= 0:
                table.slot_of[e] = s
        table.expert_in = owner
        table.free = [s for s in range(len(owner) - 1, -1, -1) if owner[s] < 0]
        resident = sorted((stamp[s], s) for s, e in enumerate(owner) if e >= 0)
        order = _lru_order(table.policy)
        if order is not None:
            order.clear()
            order.update(OrderedDict((owner[s], None) for _, s in resident))

    def counts(self) -> tuple[int, int]:
        """(tokens routed, hits among their experts) since the state was made."""
        clock, hits = self.state.tolist()
        return clock, hits

    def route(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's expert ids [K] -> (src, dst) [K] on the device (see the module docstring)."""
        if _kernels(self.device):
            # one warp: the kernel's ~30 reductions over the slots are then warp shuffles, with no shared memory
            _route_kernel()[(1,)](
                ids, self.dmap, self.owner, self.stamp, self.pinned, self.state, self.src, self.dst,
                ids.numel(), self.owner.numel(),
                BK=_pow2(ids.numel()), BS=_pow2(self.owner.numel()), num_warps=1,
            )  # fmt: skip
            return self.src, self.dst
        dmap, owner, stamp, state = self.dmap.tolist(), self.owner.tolist(), self.stamp.tolist(), self.state.tolist()
        src, dst = route_reference(dmap, owner, stamp, [p != 0 for p in self.pinned.tolist()], state, ids.tolist())
        for t, values in ((self.dmap, dmap), (self.owner, owner), (self.stamp, stamp), (self.state, state)):
            t.copy_(torch.tensor(values))
        self.src.copy_(torch.tensor(src))
        self.dst.copy_(torch.tensor(dst))
        return self.src, self.dst


def gather_rows(
    out: torch.Tensor,
    slots: torch.Tensor,
    host_rows: torch.Tensor,
    src: torch.Tensor,
    expert_ids: torch.Tensor,
    dst: torch.Tensor,
) -> None:
    """out[r] = slots[src[r]] where src[r] >= 0, else host_rows[expert_ids[r]], which also goes to slots[dst[r]]
    when dst[r] >= 0: uint8 rows of one size; `out` and `slots` on the device, `host_rows` pinned host memory (or
    the CPU for tests), ids int64 [K]."""
    if not _kernels(out.device):
        for r, (s, e, d) in enumerate(zip(src.tolist(), expert_ids.tolist(), dst.tolist(), strict=True)):
            out[r].copy_(slots[s] if s >= 0 else host_rows[e])
            if s < 0 and d >= 0:
                slots[d].copy_(out[r])
        return
    words = out.shape[1] // 4  # rows are 64-byte aligned (ExpertLayout), so they copy as int32 words
    block = 1024
    grid = (out.shape[0], -(-words // block))
    _gather_kernel()[grid](
        out.view(torch.int32), slots.view(torch.int32), host_rows.view(torch.int32), src, expert_ids, dst, words,
        BLOCK=block,
    )  # fmt: skip


def unavailable_reason(device: torch.device) -> str | None:
    """Why the direct reads cannot run on `device`, or None when they can: on CUDA, one small route and gather from
    pinned memory are run and checked (a driver or triton that cannot map host memory fails here, not
    mid-generation)."""
    if device.type != "cuda":
        return "reading missing experts in place needs a CUDA device (on the CPU the file already is read in place)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "reading missing experts in place needs triton (installed with torch's CUDA builds)"
    try:
        host = torch.arange(192, dtype=torch.uint8).view(3, 64).pin_memory()
        lru = DeviceLRU(3, 1, 2, device)
        slots = torch.zeros(1, 64, dtype=torch.uint8, device=device)
        out = torch.empty(2, 64, dtype=torch.uint8, device=device)
        ids = torch.tensor([2, 1], device=device)
        src, dst = lru.route(ids)
        gather_rows(out, slots, host, src, ids, dst)
        expected = (out.cpu(), slots[0].cpu(), src.tolist(), dst.tolist())
        if not (torch.equal(expected[0], host[[2, 1]]) and torch.equal(expected[1], host[2])):
            return "reading missing experts in place gave wrong bytes on this GPU"
        if expected[2:] != ([-1, -1], [0, -1]):
            return "the on-device expert cache misplaced an expert on this GPU"
    except Exception as e:  # triton or the driver refusing host memory: the reason, in one line
        first = (str(e).splitlines() or [""])[0]
        return f"reading missing experts in place failed on this GPU: {type(e).__name__}: {first}"
    return None


def _lru_order(policy) -> OrderedDict | None:
    """The recency order (oldest first) of an LRU policy, or of a static policy's LRU part; None for others."""
    lru = policy if hasattr(policy, "order") else getattr(policy, "lru", None)
    return getattr(lru, "order", None)


def _kernels(device: torch.device) -> bool:
    """Whether the triton kernels run: on CUDA, and under triton's CPU interpreter (TRITON_INTERPRET=1, tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _route_kernel():
    if "route" not in _KERNELS:
        import triton
        import triton.language as tl

        @triton.jit
        def route(
            ids_ptr, dmap_ptr, owner_ptr, stamp_ptr, pinned_ptr, state_ptr, src_ptr, dst_ptr, K, S,
            BK: tl.constexpr, BS: tl.constexpr,
        ):  # fmt: skip
            rows = tl.arange(0, BK)
            in_k = rows < K
            slot_ids = tl.arange(0, BS)
            in_s = slot_ids < S
            ids = tl.load(ids_ptr + rows, mask=in_k, other=0)
            src = tl.load(dmap_ptr + ids, mask=in_k, other=-1)
            hit = (src >= 0) & in_k
            clock = tl.load(state_ptr) + 1
            tl.store(state_ptr, clock)
            tl.store(state_ptr + 1, tl.load(state_ptr + 1) + tl.sum(hit.to(tl.int64), axis=0))
            pinned = tl.load(pinned_ptr + slot_ids, mask=in_s, other=1) != 0
            stamps = tl.load(stamp_ptr + slot_ids, mask=in_s, other=0)
            used = tl.sum(((slot_ids[:, None] == src[None, :]) & hit[None, :]).to(tl.int32), axis=1) > 0
            stamps = tl.where(used & ~pinned, clock, stamps)
            age = tl.where(used | pinned | ~in_s, 2**62, stamps)  # what the missing rows may take
            dst = tl.full([BK], -1, tl.int64)
            for r in tl.static_range(BK):
                row = rows == r
                missing = tl.sum((row & in_k & (src < 0)).to(tl.int32), axis=0) > 0
                expert = tl.sum(tl.where(row, ids, 0), axis=0)
                oldest = tl.min(age, axis=0)
                victim = tl.argmin(age, axis=0)  # the lowest slot among equals, as route_reference
                take = missing & (oldest < clock)
                old = tl.load(owner_ptr + victim, mask=take, other=-1)
                tl.store(dmap_ptr + old, -1, mask=take & (old >= 0))
                tl.store(dmap_ptr + expert, victim.to(tl.int64), mask=take)
                tl.store(owner_ptr + victim, expert, mask=take)
                chosen = (slot_ids == victim) & take
                stamps = tl.where(chosen, clock, stamps)
                age = tl.where(chosen, 2**62, age)
                dst = tl.where(row & take, victim.to(tl.int64), dst)
            tl.store(stamp_ptr + slot_ids, stamps, mask=in_s)
            tl.store(src_ptr + rows, src, mask=in_k)
            tl.store(dst_ptr + rows, dst, mask=in_k)

        _KERNELS["route"] = route
    return _KERNELS["route"]


def _gather_kernel():
    if "gather" not in _KERNELS:
        import triton
        import triton.language as tl

        @triton.jit
        def gather(out_ptr, slots_ptr, host_ptr, src_ptr, ids_ptr, dst_ptr, words, BLOCK: tl.constexpr):
            row = tl.program_id(0)
            offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < words
            slot = tl.load(src_ptr + row)
            if slot >= 0:
                values = tl.load(slots_ptr + slot * words + offs, mask=mask)
            else:  # a read across the bus from pinned host memory, kept in the slot it was given
                values = tl.load(host_ptr + tl.load(ids_ptr + row) * words + offs, mask=mask)
                fill = tl.load(dst_ptr + row)
                if fill >= 0:
                    tl.store(slots_ptr + fill * words + offs, values, mask=mask)
            tl.store(out_ptr + row.to(tl.int64) * words + offs, values, mask=mask)

        _KERNELS["gather"] = gather
    return _KERNELS["gather"]
