"""Expert offloading: keep only the hot experts of each layer in fast memory, under a byte budget.

The seam: the runtime swaps expert slots inside the `Experts` module (`OffloadedExperts` wraps it); the MoE block,
router and attention are untouched. Slow tier: the model file (CPU-only) or pinned host RAM (CUDA).
"""

from .budget import Placement, Plan, parse_resident, parse_size, plan_slots
from .experts import OffloadedExperts
from .install import OffloadRuntime, install, load_offloaded, load_profile, offload_stats
from .policy import LFU, LRU, POLICIES, StaticHotSet, make_policy_factory
from .slots import SlotTable
from .store import ExpertLayout, ExpertStore, FileStore, MemoryStore, RepackStore
from .trace import Event, Trace, TraceRecorder, locality, record_trace, simulate, synthetic_trace

__all__ = [
    "LFU",
    "LRU",
    "POLICIES",
    "Event",
    "ExpertLayout",
    "ExpertStore",
    "FileStore",
    "MemoryStore",
    "OffloadRuntime",
    "OffloadedExperts",
    "Placement",
    "Plan",
    "RepackStore",
    "SlotTable",
    "StaticHotSet",
    "Trace",
    "TraceRecorder",
    "install",
    "load_offloaded",
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
