"""What the expert cache did: per layer (`LayerStats`) and for the whole model (`OffloadStats`), counted since the
last `reset_stats`. Plain values, torch-free: the CLI's footers, `marco bench` and the bench scripts read them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerStats:
    """One offloaded MoE layer."""

    layer: int
    slots: int
    experts: int
    resident: int  # experts in the slots now
    hits: int
    misses: int
    bytes_moved: int  # copied into slots (misses, prefetch, streaming)
    bytes_read_in_place: int  # read by the device from host RAM (direct reads)
    prefetch_bytes: int
    stall_s: float  # host time spent waiting for experts
    cpu_experts: int  # missing experts computed on the CPU where they lie
    cpu_s: float
    guessed: int = 0  # experts the previous layer's prefetch guessed, and how many of them were routed
    guessed_right: int = 0
    routed: int = 0  # experts routed in the calls whose guesses were scored

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)

    @property
    def prefetch_precision(self) -> float | None:
        return self.guessed_right / self.guessed if self.guessed else None

    @property
    def prefetch_recall(self) -> float | None:
        return self.guessed_right / self.routed if self.routed else None


@dataclass(frozen=True)
class OffloadStats:
    """The model's offloaded layers together, with the plan they run under and how misses are handled."""

    layers: list[LayerStats] = field(default_factory=list)
    slots_per_layer: int = 0
    misses_on_cpu: bool = False  # missing experts computed on the CPU where they lie
    misses_direct: bool = False  # missing experts read in place by the device
    miss_copy_s: float | None = None  # a copy of one expert into a slot, when measured
    miss_cpu_s: float | None = None  # one expert for one token on the CPU, when measured
    budget_bytes: int | None = None
    fixed_bytes: int = 0  # non-expert weights, KV cache, working reserve
    fast_bytes: int = 0  # the experts' slots and working buffers

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.layers)

    @property
    def misses(self) -> int:
        return sum(s.misses for s in self.layers)

    @property
    def hit_rate(self) -> float | None:
        """Hits over accesses; None before any access."""
        hits, misses = self.hits, self.misses
        return hits / (hits + misses) if hits + misses else None

    @property
    def resident(self) -> int:
        return sum(s.resident for s in self.layers)

    @property
    def experts(self) -> int:
        return sum(s.experts for s in self.layers)

    @property
    def resident_fraction(self) -> float:
        """The share of all experts that the slots can hold."""
        return sum(s.slots for s in self.layers) / self.experts

    @property
    def bytes_moved(self) -> int:
        return sum(s.bytes_moved for s in self.layers)

    @property
    def bytes_read_in_place(self) -> int:
        return sum(s.bytes_read_in_place for s in self.layers)

    @property
    def stall_s(self) -> float:
        return sum(s.stall_s for s in self.layers)

    @property
    def cpu_experts(self) -> int:
        return sum(s.cpu_experts for s in self.layers)

    @property
    def cpu_s(self) -> float:
        return sum(s.cpu_s for s in self.layers)

    @property
    def prefetch_precision(self) -> float | None:
        guessed = sum(s.guessed for s in self.layers)
        return sum(s.guessed_right for s in self.layers) / guessed if guessed else None

    @property
    def prefetch_recall(self) -> float | None:
        routed = sum(s.routed for s in self.layers)
        return sum(s.guessed_right for s in self.layers) / routed if routed else None

    @property
    def miss_copy_us(self) -> float | None:
        return None if self.miss_copy_s is None else 1e6 * self.miss_copy_s

    @property
    def miss_cpu_us(self) -> float | None:
        return None if self.miss_cpu_s is None else 1e6 * self.miss_cpu_s
