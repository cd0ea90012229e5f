"""Eviction policies for one layer's expert slots: LRU (default), LFU with decay, and a static hot set from a profile.

A policy only ranks experts; it never moves data. `SlotTable` calls `access(experts)` once per layer call with the
experts that call used, `insert`/`remove` when an expert enters or leaves the fast tier, and `victim(protected)` to
pick the resident expert to evict, which must not be in `protected` (the experts the current call still needs). The
simulator drives the same objects, so its hit rates are the live cache's hit rates.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

POLICIES = ("lru", "lfu", "static")


class Policy:
    name = "base"

    def access(self, experts: Sequence[int]) -> None:
        raise NotImplementedError

    def insert(self, e: int) -> None:
        raise NotImplementedError

    def remove(self, e: int) -> None:
        raise NotImplementedError

    def victim(self, protected: set[int]) -> int:
        raise NotImplementedError

    def clear(self) -> None:
        """Forget every resident expert (the slots were emptied); what the policy learnt of use stays."""
        raise NotImplementedError


class LRU(Policy):
    """Evict the resident expert used least recently."""

    name = "lru"

    def __init__(self) -> None:
        self.order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def access(self, experts: Sequence[int]) -> None:
        for e in experts:
            if e in self.order:
                self.order.move_to_end(e)

    def insert(self, e: int) -> None:
        self.order[e] = None

    def remove(self, e: int) -> None:
        del self.order[e]

    def victim(self, protected: set[int]) -> int:
        return next(e for e in self.order if e not in protected)

    def clear(self) -> None:
        self.order.clear()


class LFU(Policy):
    """Evict the resident expert with the lowest decayed use count (ties: least recently used).

    Every layer call multiplies all counts by `decay` and adds 1 to each used expert, so the count is an exponential
    moving frequency with a memory of about 1 / (1 - decay) calls. The decay is kept lazily as a growing unit
    (`scale`) so a call costs O(used experts), not O(E); it is renormalised before it overflows.
    """

    name = "lfu"

    def __init__(self, num_experts: int, decay: float = 0.95, prior: Sequence[float] | None = None) -> None:
        self.decay = decay
        self.scale = 1.0  # a use now weighs `scale`; all counts are stored in these growing units
        self.score = [float(p) for p in prior] if prior is not None else [0.0] * num_experts
        self.last = [0] * num_experts
        self.clock = 0
        self.resident: set[int] = set()

    def access(self, experts: Sequence[int]) -> None:
        self.clock += 1
        self.scale /= self.decay
        if self.scale > 1e100:
            self.score = [s / self.scale for s in self.score]
            self.scale = 1.0
        for e in experts:
            self.score[e] += self.scale
            self.last[e] = self.clock

    def insert(self, e: int) -> None:
        self.resident.add(e)

    def remove(self, e: int) -> None:
        self.resident.discard(e)

    def victim(self, protected: set[int]) -> int:
        return min((e for e in self.resident if e not in protected), key=lambda e: (self.score[e], self.last[e]))

    def clear(self) -> None:
        self.resident.clear()


class StaticHotSet(Policy):
    """A fixed ranking from a profile: the most frequent experts stay, the rest share the remaining slots (LRU).

    With S slots and k experts needed per call, the top S - k profile experts are never evicted by a decode step.
    """

    name = "static"

    def __init__(self, frequencies: Sequence[float]) -> None:
        self.freq = list(frequencies)
        self.lru = LRU()

    def access(self, experts: Sequence[int]) -> None:
        self.lru.access(experts)

    def insert(self, e: int) -> None:
        self.lru.insert(e)

    def remove(self, e: int) -> None:
        self.lru.remove(e)

    def victim(self, protected: set[int]) -> int:
        rank = {e: i for i, e in enumerate(self.lru.order)}  # older first
        return min((e for e in self.lru.order if e not in protected), key=lambda e: (self.freq[e], rank[e]))

    def clear(self) -> None:
        self.lru.clear()


PolicyFactory = Callable[[int, int], Policy]  # (layer, num_experts) -> policy


def make_policy_factory(
    name: str = "lru", profile: dict[int, list[float]] | None = None, decay: float = 0.95
) -> PolicyFactory:
    """A factory of per-layer policies. `profile` maps layer -> per-expert frequencies (needed by `static`)."""
    from ..errors import MarcoError

    if name not in POLICIES:
        raise MarcoError(f"unknown expert cache policy {name!r}", hint=f"use one of {', '.join(POLICIES)}")
    if name == "static" and profile is None:
        raise MarcoError("the static expert policy needs a profile", hint="pass --profile FILE (see marco profile)")

    def make(layer: int, num_experts: int) -> Policy:
        freq = profile.get(layer) if profile else None
        if name == "lru":
            return LRU()
        if name == "lfu":
            return LFU(num_experts, decay, prior=_normalised(freq) if freq else None)
        return StaticHotSet(freq if freq else [0.0] * num_experts)

    return make


def _normalised(freq: Iterable[float]) -> list[float]:
    freq = list(freq)
    total = sum(freq) or 1.0
    return [f / total for f in freq]
