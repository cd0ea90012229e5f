"""What the user asked for (`Placement`: --ram-mem / --gpu-mem / --experts-resident / --profile / policy) and the
arithmetic that turns a byte budget into a number of expert slots per layer.

The budget is a promise about the model's memory: non-expert weights, the KV cache, a working reserve for activations,
the expert slots and the stores' scratch buffers. The fixed part (non-expert weights, KV cache, reserve) is counted
first; experts fill what is left, the same number of slots in every MoE layer. The Python/torch runtime itself is
outside the budget. Too small a budget is a `MarcoError` that says how much the fixed part needs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import MarcoError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
AUTO_GPU_MARGIN = 512 << 20  # `--gpu-mem auto` leaves this much VRAM free for the CUDA context and activations
# Working memory counted with the fixed part: activations of a prefill chunk, the allocator's slack, per-shape kernel
# buffers. Measured at ~8 MiB on a 256-wide test model (tests/test_offload_disk.py); doubled for wider models.
WORKING_RESERVE = 16 << 20
# On CUDA the budget also holds what the allocator hands to libraries and to CUDA graphs:
# - cuBLAS's workspaces, one per stream it runs on (32 MiB each on Hopper): the compute stream and the graphs' side
#   stream (cuda_graphs.side_stream);
# - the captured decode step's memory pool (its intermediates other than the gathered experts).
# History: with 16 MiB of working reserve alone the Nano-shaped bench (bench/cuda_speed.py, H200) peaked 50-86 MB over
# its 8, 4 and 2 GiB budgets (eager decode). With 64 MiB here and one gathered token counted, decoding from CUDA
# graphs peaked 80-187 MB over; that process had made a new side stream (and workspace) for each capture, which the
# side stream fixed, and the graphs' pool and the eager warm-up each hold a token's gathered experts.
CUDA_LIBRARY_RESERVE = 64 << 20
CUDA_GRAPH_POOL_RESERVE = 32 << 20


def cuda_scratch_bytes(top_k: int, expert_bytes: int, hidden: int, intermediate: int) -> int:
    """VRAM an offloaded CUDA model needs beyond weights, slots, KV cache and WORKING_RESERVE: a token's experts
    gathered (as stored, or dequantized with float32 temporaries: 4-bit experts) twice (the graphs' pool keeps one,
    an eager step or the warm-up makes another), the buffer direct reads gather a token's experts into as stored
    (set aside whatever the miss handling: `auto` takes direct reads wherever they work, and `marco info` cannot
    know), the library workspaces and the rest of the graphs' pool."""
    gathered = top_k * max(expert_bytes, 3 * hidden * intermediate * 4)
    return 2 * gathered + top_k * expert_bytes + CUDA_LIBRARY_RESERVE + CUDA_GRAPH_POOL_RESERVE


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '1.5GB', '3000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise MarcoError(
            f"cannot read the size {text!r}", hint="write it like 4GiB, 512MiB, 8GB or a byte count", exit_code=2
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def read_resident(text: str) -> tuple[float, bool]:
    """'N' or 'P%' -> (N or P, whether a share): the checks that need no model (a count of at least 1, a share
    above 0% and at most 100%), so a typo is a usage error before anything loads."""
    t = text.strip()
    share = t.endswith("%")
    hint = "give a count per layer (16) or a percentage (25%)"
    try:
        value = float(t[:-1]) if share else int(t)
    except (ValueError, OverflowError):
        raise MarcoError(f"cannot read {text!r} as experts per layer", hint=hint, exit_code=2) from None
    if not (0 < value <= 100 if share else value >= 1):  # NaN fails both comparisons
        wrong = f"{text} of the experts: a share is above 0% and at most 100%" if share else f"{text} experts: too few"
        raise MarcoError(wrong, hint=hint, exit_code=2)
    return value, share


def parse_resident(text: str, num_experts: int) -> int:
    """'N' experts per layer or 'P%' of each layer's experts -> slots per layer (at least 1, at most E)."""
    value, share = read_resident(text)
    n = max(1, round(value / 100 * num_experts)) if share else int(value)
    if n > num_experts:
        raise MarcoError(
            f"--experts-resident {text} gives {n} experts per layer; the model has {num_experts}",
            hint=f"use 1..{num_experts} or a percentage",
            exit_code=2,
        )
    return n


@dataclass
class Placement:
    """Where experts live. Inactive (all None) means: load everything into the fast tier as before."""

    ram_mem: str | None = None  # CPU-only budget, e.g. "6GiB"
    gpu_mem: str | None = None  # VRAM budget, or "auto"
    experts_resident: str | None = None  # "N" or "P%" per layer
    profile: str | None = None  # JSON from `marco profile`: warms the cache, defines the static hot set
    policy: str = "lru"
    prefetch: bool = False
    ctx: int = 4096  # tokens the KV cache is sized for (counted in the budget)
    misses: str = "auto"  # a missing expert: "copy" into a slot, compute on the "cpu" where it lies, read it
    # "direct" from host RAM on the GPU (offload/direct.py), or "auto" (direct on CUDA where it works, else copy or
    # cpu, measured)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.ram_mem, self.gpu_mem, self.experts_resident, self.profile))

    def offload_options(self) -> list[str]:
        """The options given that offload experts (what makes the placement active)."""
        given = (
            ("--ram-mem", self.ram_mem),
            ("--gpu-mem", self.gpu_mem),
            ("--experts-resident", self.experts_resident),
            ("--profile", self.profile),
        )
        return [name for name, value in given if value is not None]

    def idle_options(self) -> list[str]:
        """The options given that only act on offloaded experts: the user is told when nothing is offloaded."""
        return [
            name
            for name, given in (
                ("--expert-policy", self.policy != "lru"),
                ("--prefetch", self.prefetch),
                ("--expert-misses", self.misses != "auto"),
            )
            if given
        ]


@dataclass
class Plan:
    budget: int | None  # bytes, None when only --experts-resident was given
    fixed_bytes: int  # non-expert weights + KV cache + working reserve
    expert_bytes: int  # one expert, packed
    moe_layers: int
    slots: int  # per MoE layer
    scratch_bytes: int = 0

    @property
    def slot_bytes(self) -> int:
        return self.slots * self.expert_bytes * self.moe_layers

    @property
    def fast_bytes(self) -> int:
        """What the plan holds in fast memory: the fixed part, the slots and the working buffers."""
        return self.fixed_bytes + self.slot_bytes + self.scratch_bytes


def plan_slots(
    num_experts: int,
    moe_layers: int,
    expert_bytes: int,
    fixed_bytes: int,
    budget: int | None,
    resident: str | None,
    scratch_bytes: int = 0,
    what: str = "--ram-mem",
) -> Plan:
    """Slots per MoE layer from a byte budget and/or an explicit --experts-resident; refuse what cannot fit."""
    wanted = parse_resident(resident, num_experts) if resident is not None else None
    if budget is None:
        return Plan(None, fixed_bytes, expert_bytes, moe_layers, wanted or num_experts, scratch_bytes)
    left = budget - fixed_bytes - scratch_bytes
    one_each = expert_bytes * moe_layers
    minimum = fixed_bytes + one_each + scratch_bytes
    if left < one_each:
        given = format_bytes(budget)
        if given == format_bytes(minimum, up=True):  # "21.0 MiB is too small ... at least 21.0 MiB": say the bytes
            given = f"{budget:,} bytes"
        per_layer = "one expert per layer" + (" and its working buffers" if scratch_bytes else "")
        raise MarcoError(
            f"{what} {given} is too small: the non-expert weights, KV cache and working memory need "
            f"{format_bytes(fixed_bytes)}, plus {format_bytes(one_each + scratch_bytes)} for {per_layer}",
            hint=f"raise {what} to at least {format_bytes(minimum, up=True)}, or lower --ctx",
        )
    fit = min(num_experts, left // one_each)
    if wanted is not None and wanted > fit:
        raise MarcoError(
            f"--experts-resident {resident} needs {format_bytes(fixed_bytes + wanted * one_each + scratch_bytes)}, "
            f"more than {what} {format_bytes(budget)}",
            hint=f"at most {fit} experts per layer fit; lower --experts-resident or raise {what}",
        )
    return Plan(budget, fixed_bytes, expert_bytes, moe_layers, wanted or fit, scratch_bytes)


def format_bytes(n: float, up: bool = False) -> str:
    """Bytes for a message; `up` rounds up, for a minimum the user is told to give (17.03 MiB is "17.1 MiB": "17.0"
    would be refused again)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            if unit == "B":
                return f"{n:.0f} B"
            return f"{(math.ceil(n * 10) / 10 if up else n):.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
