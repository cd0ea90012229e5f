"""Bookkeeping of one layer's fast-tier expert slots: which expert sits in which slot, hits and misses.

Pure Python, no tensors: `OffloadedExperts` uses it to decide what to copy, and the trace simulator replays traces
through the very same class, so simulated and live hit rates agree exactly. Invariants: an expert occupies at most one
slot; `assign` never evicts a protected expert (its own group, and while streaming the group still computing); the
protected experts of a step never outnumber the slots.
"""

from __future__ import annotations

from collections.abc import Sequence

from .policy import Policy


class SlotTable:
    def __init__(self, num_experts: int, num_slots: int, policy: Policy) -> None:
        if not 1 <= num_slots <= num_experts:
            raise ValueError(f"slots must be in 1..{num_experts}, got {num_slots}")
        self.num_experts, self.num_slots, self.policy = num_experts, num_slots, policy
        self.slot_of = [-1] * num_experts  # expert -> slot, -1 when not resident
        self.expert_in = [-1] * num_slots  # slot -> expert, -1 when empty
        self.free = list(range(num_slots - 1, -1, -1))
        self.hits = self.misses = self.calls = 0

    def clear(self) -> None:
        """Every slot empty, the policy told so: for a table a stopped call may have left naming experts whose bytes
        never arrived (offload/experts.py). Rebuilt, not evicted one by one: the table may be half-updated."""
        self.slot_of = [-1] * self.num_experts
        self.expert_in = [-1] * self.num_slots
        self.free = list(range(self.num_slots - 1, -1, -1))
        self.policy.clear()

    @property
    def resident(self) -> int:
        return self.num_slots - len(self.free)

    def schedule(self, experts: Sequence[int]) -> list[tuple[Sequence[int], set[int]]]:
        """Split one call's sorted experts into (group, protected) steps that fit the slots.

        One step when they fit. Otherwise (a prefill chunk) the layer is streamed double-buffered: groups of S // 2,
        each loaded while the previous one computes, so a step protects its own group and the previous one (with a
        single slot: groups of one, nothing to overlap).
        """
        s = self.num_slots
        if len(experts) <= s:
            return [(experts, set(experts))]
        h = max(1, s // 2)
        groups = [experts[i : i + h] for i in range(0, len(experts), h)]
        return [(g, set(g) | (set(groups[k - 1]) if k and s >= 2 else set())) for k, g in enumerate(groups)]

    def _place(self, e: int, protected: set[int]) -> int:
        slot = self.free.pop() if self.free else self._evict(self.policy.victim(protected))
        self._occupy(e, slot)
        return slot

    def _evict(self, e: int) -> int:
        """Take resident expert `e` out; return the slot it leaves."""
        slot = self.slot_of[e]
        self.slot_of[e] = -1
        self.policy.remove(e)
        return slot

    def _occupy(self, e: int, slot: int) -> None:
        self.slot_of[e] = slot
        self.expert_in[slot] = e
        self.policy.insert(e)

    def assign(self, experts: Sequence[int], protected: set[int] | None = None) -> list[tuple[int, int]]:
        """Make `experts` (distinct, fitting with `protected`) resident, never evicting a protected expert (default:
        the group itself); return the (expert, slot) copies to perform."""
        protected = set(experts) if protected is None else protected
        loads = []
        for e in experts:
            if self.slot_of[e] >= 0:
                self.hits += 1
            else:
                self.misses += 1
                loads.append((e, self._place(e, protected)))
        self.calls += 1
        self.policy.access(experts)
        return loads

    def account(self, experts: Sequence[int]) -> list[int]:
        """Count one access of `experts` without placing those that are missing (they are computed where they lie,
        not copied); return the missing ones. The resident ones count as used for the eviction policy."""
        missing = [e for e in experts if self.slot_of[e] < 0]
        self.hits += len(experts) - len(missing)
        self.misses += len(missing)
        self.calls += 1
        self.policy.access([e for e in experts if self.slot_of[e] >= 0])
        return missing

    def preload(self, experts: Sequence[int]) -> list[tuple[int, int]]:
        """Bring in speculated or profile-hot experts (not counted as accesses); at most num_slots of them."""
        experts = list(experts)[: self.num_slots]
        protected = set(experts)
        return [(e, self._place(e, protected)) for e in experts if self.slot_of[e] < 0]
