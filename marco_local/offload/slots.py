"""Bookkeeping of one layer's fast-tier expert slots: which expert sits in which slot, hits and misses.

Pure Python, no tensors: `OffloadedExperts` uses it to decide what to copy, and the trace simulator replays traces
through the very same class, so simulated and live hit rates agree exactly. Invariants: an expert occupies at most one
slot; `assign` never evicts an expert of the group it is placing; a group never holds more experts than slots.
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

    @property
    def resident(self) -> int:
        return self.num_slots - len(self.free)

    def groups(self, experts: Sequence[int]) -> list[Sequence[int]]:
        """Split one call's sorted experts into runs that fit the slots (prefill streams the layer in groups)."""
        s = self.num_slots
        return [experts] if len(experts) <= s else [experts[i : i + s] for i in range(0, len(experts), s)]

    def _place(self, e: int, protected: set[int]) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            old = self.policy.victim(protected)
            slot = self.slot_of[old]
            self.slot_of[old] = -1
            self.policy.remove(old)
        self.slot_of[e] = slot
        self.expert_in[slot] = e
        self.policy.insert(e)
        return slot

    def assign(self, experts: Sequence[int]) -> list[tuple[int, int]]:
        """Make `experts` (at most num_slots, distinct) resident; return the (expert, slot) copies to perform."""
        protected = set(experts)
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

    def preload(self, experts: Sequence[int]) -> list[tuple[int, int]]:
        """Bring in speculated or profile-hot experts (not counted as accesses); at most num_slots of them."""
        experts = list(experts)[: self.num_slots]
        protected = set(experts)
        return [(e, self._place(e, protected)) for e in experts if self.slot_of[e] < 0]
