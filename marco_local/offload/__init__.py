"""Expert offloading: keep only the hot experts of each layer in fast memory, under a byte budget.

The seam: the runtime swaps expert slots inside the `Experts` module (`OffloadedExperts` wraps it); the MoE block,
router and attention are untouched. Slow tier: the model file (CPU-only) or pinned host RAM (CUDA).
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors; at run time `__getattr__` imports on use
    from .budget import Placement, Plan, parse_resident, parse_size, plan_slots
    from .experts import OffloadedExperts
    from .install import FastMemory, OffloadRuntime, fast_memory, install, load_profile, offload_stats
    from .policy import LFU, LRU, POLICIES, StaticHotSet, make_policy_factory
    from .slots import SlotTable
    from .stats import LayerStats, OffloadStats
    from .store import ExpertLayout, ExpertStore, FileStore, MemoryStore, RepackStore
    from .trace import Event, Trace, TraceRecorder, locality, record_trace, simulate, synthetic_trace

_EXPORTS = {  # name -> submodule: imported on first use, so that `marco info` can read the budget arithmetic
    # (offload.budget) without importing torch
    "Placement": "budget",
    "Plan": "budget",
    "parse_resident": "budget",
    "parse_size": "budget",
    "plan_slots": "budget",
    "OffloadedExperts": "experts",
    "FastMemory": "install",
    "OffloadRuntime": "install",
    "fast_memory": "install",
    "install": "install",
    "load_profile": "install",
    "offload_stats": "install",
    "LFU": "policy",
    "LRU": "policy",
    "POLICIES": "policy",
    "StaticHotSet": "policy",
    "make_policy_factory": "policy",
    "SlotTable": "slots",
    "LayerStats": "stats",
    "OffloadStats": "stats",
    "ExpertLayout": "store",
    "ExpertStore": "store",
    "FileStore": "store",
    "MemoryStore": "store",
    "RepackStore": "store",
    "Event": "trace",
    "Trace": "trace",
    "TraceRecorder": "trace",
    "locality": "trace",
    "record_trace": "trace",
    "simulate": "trace",
    "synthetic_trace": "trace",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """`marco_local.offload.install` is the function, as it was with eager imports: the import system sets a package
    attribute for each submodule it loads, and the submodule `install` would otherwise shadow the function."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "LFU",
    "LRU",
    "POLICIES",
    "Event",
    "ExpertLayout",
    "ExpertStore",
    "FastMemory",
    "FileStore",
    "LayerStats",
    "MemoryStore",
    "OffloadStats",
    "OffloadRuntime",
    "OffloadedExperts",
    "Placement",
    "Plan",
    "RepackStore",
    "SlotTable",
    "StaticHotSet",
    "Trace",
    "TraceRecorder",
    "fast_memory",
    "install",
    "load_profile",
    "locality",
    "make_policy_factory",
    "offload_stats",
    "parse_resident",
    "parse_size",
    "plan_slots",
    "record_trace",
    "simulate",
    "synthetic_trace",
]
