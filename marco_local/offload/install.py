"""Put a model's experts under offloading: build the stores, size the slots from the budget, swap `mlp.experts`.

`install` wraps the experts of a model that is already loaded (in RAM, or as zero-copy views of a memory-mapped GGUF,
which become a file store; quantized GGUF experts loaded with `experts_in_file` become a file store too when their
slots hold raw blocks (native kernels, float32), else a `RepackStore` that repacks an expert's raw blocks into the
int4 form on a miss). The loader that builds a model with its experts left in a safetensors checkpoint
(load/offloaded.py) uses the same steps: `make_plan` before any expert byte is read, then `wrap`.
Both attach an `OffloadRuntime` as `model.offload`, which owns the prefetch thread and reports the stats
(`offload_stats(model)`).
Invariant: the plan is computed and checked against the budget before any expert byte is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..errors import MarcoError
from ..layers.kv_cache import kv_cache_bytes
from . import memory, misses
from .budget import (
    AUTO_GPU_MARGIN,
    Placement,
    Plan,
    format_bytes,
    parse_size,
    plan_slots,
)
from .experts import OffloadedExperts
from .policy import make_policy_factory
from .stats import OffloadStats
from .store import (
    ExpertLayout,
    ExpertStore,
    FileStore,
    MemoryStore,
    RepackStore,
    ThreadScratch,
    mapped_segments,
    raw_segments,
    raw_tensors,
    tensor_bytes,
)


class OffloadRuntime:
    """The offloaded layers of one model, their plan, and the prefetch thread."""

    def __init__(self, layers: list[OffloadedExperts], plan: Plan, executor: ThreadPoolExecutor | None) -> None:
        self.layers, self.plan, self.executor = layers, plan, executor
        self.miss_costs: tuple[float, float] | None = None  # (copy, CPU compute) seconds per expert, when measured

    @property
    def fast_bytes(self) -> int:
        """Bytes of the fast tier the experts use: slots plus the stores' in-process buffers (not the pinned tier)."""
        return sum(x.slot_bytes for x in self.layers) + self.plan.scratch_bytes

    def reset_stats(self) -> None:
        for x in self.layers:
            x.reset_stats()

    def stats(self) -> OffloadStats:
        costs = self.miss_costs
        return OffloadStats(
            layers=[x.stats() for x in self.layers],
            slots_per_layer=self.plan.slots,
            misses_on_cpu=any(x.misses_on_cpu for x in self.layers),
            misses_direct=any(x.direct for x in self.layers),
            miss_copy_s=None if costs is None else costs[0],
            miss_cpu_s=None if costs is None else costs[1],
            budget_bytes=self.plan.budget,
            fixed_bytes=self.plan.fixed_bytes,
            fast_bytes=self.fast_bytes,
        )

    def close(self) -> None:
        for x in self.layers:
            if x.pending is not None:
                x.pending.result()
                x.pending = None
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None
        for x in self.layers:
            x.store.close()


def offload_stats(model: nn.Module) -> OffloadStats | None:
    """The expert-cache stats of a model (None for a model that is not offloaded): feeds GenerationResponse.stats."""
    rt = getattr(model, "offload", None)
    return rt.stats() if isinstance(rt, OffloadRuntime) else None


class FastMemory(NamedTuple):
    """What an offloaded model keeps of its experts in fast memory."""

    experts_per_layer: int
    nbytes: int  # the slots and the stores' working buffers


def fast_memory(model: nn.Module) -> FastMemory | None:
    """The experts an offloaded model keeps in fast memory (what the chat's /info shows); None when not offloaded."""
    rt = getattr(model, "offload", None)
    return FastMemory(rt.plan.slots, rt.fast_bytes) if isinstance(rt, OffloadRuntime) else None


def load_profile(path: str | Path) -> dict[int, list[float]]:
    """layer -> per-expert frequency from a `marco profile` JSON file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        layers = {int(k): [float(c) for c in v] for k, v in data["layers"].items()}
    except FileNotFoundError:
        raise MarcoError(f"profile {path} not found", hint="create one with marco profile MODEL --text FILE") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise MarcoError(f"{path} is not an expert profile: {e}", hint="create one with marco profile") from e
    except OSError as e:  # a folder, no permission
        raise MarcoError(f"cannot read the profile {path}: {e.strerror}") from e
    if any(not 0 <= c < math.inf for counts in layers.values() for c in counts):  # NaN fails both comparisons
        raise MarcoError(f"{path} is not an expert profile: frequencies must be finite and not negative")
    return layers


def _check_profile(profile: dict[int, list[float]], path: str, cfg, moe_layers: list[int]) -> None:
    """A profile is of this model's MoE layers and experts: one recorded elsewhere would warm the wrong experts (or
    none: a static policy would then hold nothing) without a word."""
    hint = "record a profile for this model with marco profile"
    if any(len(v) != cfg.num_experts for v in profile.values()):
        raise MarcoError(f"the profile {path} was recorded on a model with a different number of experts", hint=hint)
    if sorted(profile) != moe_layers:
        recorded = f"records layers {_spans(sorted(profile))}" if profile else "records no layers"
        raise MarcoError(f"the profile {path} {recorded}, this model's MoE layers are {_spans(moe_layers)}", hint=hint)


def _spans(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def non_expert_bytes(model: nn.Module) -> int:
    """Everything but the experts: weights (however a quantized module keeps them), norms, rotary tables."""
    return tensor_bytes(model, skip={id(b.experts) for _, b in moe_blocks(model)})


def file_mappings(paths: list[Path]) -> list[tuple[Path, int, int]]:
    """(path, address of file offset 0, mapped length) for each mapping of `paths` in this process (Linux)."""
    wanted = {str(Path(p).resolve()): Path(p) for p in paths}
    found = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] in wanted:
            start, end = (int(a, 16) for a in parts[0].split("-"))
            offset = int(parts[2], 16)
            found.append((wanted[parts[5]], start - offset, end - start + offset))
    return found


def fixed_bytes(model: nn.Module, ctx: int, dtype: torch.dtype, device: torch.device) -> int:
    """The budget's fixed part for this model (the planner's `fixed_bytes`): its non-expert tensors, the KV cache
    for `ctx` tokens in the activation dtype, and the working reserve."""
    cfg = model.config
    kv = kv_cache_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, ctx, dtype, device)
    return memory.fixed_bytes(non_expert_bytes(model), kv)


def _budget(placement: Placement, device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        if placement.gpu_mem is None and placement.ram_mem is not None:
            raise MarcoError(
                "--ram-mem bounds a CPU-only run, and this one runs on CUDA", hint="use --gpu-mem, or --device cpu"
            )
        if placement.gpu_mem is None:
            return None, "--gpu-mem"
        if placement.gpu_mem == "auto":
            free, _ = torch.cuda.mem_get_info(device)
            return free + torch.cuda.memory_allocated(device) - AUTO_GPU_MARGIN, "--gpu-mem"
        return parse_size(placement.gpu_mem), "--gpu-mem"
    if placement.gpu_mem is not None and placement.ram_mem is None:
        raise MarcoError("--gpu-mem needs a CUDA device", hint="on a CPU-only machine use --ram-mem")
    return (parse_size(placement.ram_mem) if placement.ram_mem else None), "--ram-mem"


def make_plan(
    model: nn.Module,
    layout: ExpertLayout,
    in_ram: int,
    scratch: int,
    placement: Placement,
    device: torch.device,
    fixed: int,
) -> Plan:
    """Slots per layer for `placement` (the planner's `plan_slots`), refused before any expert byte is read when the
    budget cannot hold `fixed` bytes and one expert per layer. `scratch`: the stores' own buffers (CPU)."""
    cfg = model.config
    blocks = moe_blocks(model)
    if not blocks:
        raise MarcoError("this model has no MoE layers to offload")
    budget, what = _budget(placement, device)
    if budget is not None and device.type == "cpu" and in_ram:
        raise MarcoError(
            f"{what} cannot be kept with this model: its experts are held in RAM once loaded "
            f"({format_bytes(in_ram)}), and a RAM budget needs experts that can stay in their file",
            hint="bound the fast slots with --experts-resident, or use a bf16 checkpoint folder or a GGUF file",
        )
    scratch = memory.expert_scratch(cfg, layout.expert_bytes, device.type == "cuda", scratch)
    resident = placement.experts_resident
    return plan_slots(cfg.num_experts, len(blocks), layout.expert_bytes, fixed, budget, resident, scratch, what)


def wrap(
    model: nn.Module,
    layouts: dict[int, ExpertLayout],
    make_store: Callable[[int, ExpertLayout], ExpertStore],
    plan: Plan,
    placement: Placement,
    device: torch.device,
) -> OffloadRuntime:
    """Per layer, build its store and swap in the OffloadedExperts (so a store that copies the experts into RAM frees
    the layer's original tensors before the next layer is copied); then prefetch links and profile warm-up."""
    cfg = model.config
    blocks = moe_blocks(model)
    profile = load_profile(placement.profile) if placement.profile else None
    if profile is not None:
        _check_profile(profile, placement.profile, cfg, [i for i, _ in blocks])
    factory = make_policy_factory(placement.policy, profile)
    layers = []
    for i, block in blocks:
        store = make_store(i, layouts[i])
        x = OffloadedExperts(block.experts, store, plan.slots, factory(i, cfg.num_experts), device, layer=i)
        block.experts = x
        layers.append(x)
    # CPU: one loader thread reads the next streaming group (and, with prefetch, the next layer's guesses) while
    # torch computes; positional reads release the GIL. CUDA overlaps through its copy stream instead.
    executor = ThreadPoolExecutor(1, thread_name_prefix="marco-experts") if device.type == "cpu" else None
    for x in layers:
        x.executor = executor
    if placement.prefetch:
        for (_, _), (_, nxt_block), x in zip(blocks, blocks[1:], layers, strict=False):
            x.link(nxt_block.experts, nxt_block.gate, nxt_block.top_k)
    if profile:  # warm the cache with each layer's most frequent experts
        for x in layers:
            freq = profile.get(x.layer)
            if freq:
                hot = sorted(range(len(freq)), key=lambda e: -freq[e])[: plan.slots]
                x.preload(hot)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        for x in layers:
            x.reset_stats()
    rt = OffloadRuntime(layers, plan, executor)
    rt.miss_costs = misses.choose(layers, placement, cfg, model.model.norm.weight.dtype)
    if device.type == "cuda":  # a budget that holds every expert: load them now, decode then needs no host step
        for x in layers:
            x.load_all()
    model.offload = rt
    return rt


def install(model: nn.Module, placement: Placement, files: list[Path] = ()) -> OffloadRuntime:
    """Offload the experts of a loaded model. On a CPU model, experts that are zero-copy views of a memory-mapped
    file in `files` (a GGUF) are read from that file with positional reads; others are packed into host RAM
    (pinned when the model is on CUDA), one layer at a time. Call it before the first forward."""
    device = next(iter(model.model.norm.parameters())).device
    maps = file_mappings(list(files)) if files and device.type == "cpu" else []
    cfg = model.config
    layouts: dict[int, ExpertLayout] = {}
    segments: dict[int, list | None] = {}
    raws: dict[int, list] = {}  # GGUF experts loaded with experts_in_file: repacked from the file on a miss
    for i, block in moe_blocks(model):
        if hasattr(block.experts, "use_slots"):  # per-expert modules that would keep private copies (bitsandbytes)
            block.experts.use_slots()
        layouts[i] = ExpertLayout(block.experts, cfg.num_experts)
        in_file = getattr(block.experts, "in_file", None)
        if in_file:
            if not maps:
                raise MarcoError("these experts were left in their GGUF file, but the file is not mapped here")
            tensors = raw_tensors(list(block.experts.file_raws), maps)
            if in_file == "raw":  # slots hold the raw blocks: read straight into them
                segments[i] = raw_segments(layouts[i], tensors, cfg.num_experts)
            else:
                raws[i], segments[i] = tensors, None
            continue
        try:
            segments[i] = mapped_segments(block.experts, layouts[i], maps) if maps else None
        except MarcoError:
            segments[i] = None
    in_ram = sum(layouts[i].expert_bytes * cfg.num_experts for i in layouts if segments[i] is None and i not in raws)
    stores: dict[int, ExpertStore] = {i: FileStore(layouts[i], seg) for i, seg in segments.items() if seg is not None}
    scratch = sum(st.resident_bytes for st in stores.values())
    if raws:  # one raw-block buffer per reading thread, shared by the layers, plus the repack temporaries
        shared = ThreadScratch(max(RepackStore.raw_bytes(r) for r in raws.values()))
        work = max(RepackStore.work_bytes(layouts[i]) for i in raws)
        scratch += ThreadScratch.THREADS * (shared.nbytes + work)
        blocks = dict(moe_blocks(model))
        stores |= {i: RepackStore(layouts[i], blocks[i].experts, r, shared) for i, r in raws.items()}
    blocks = dict(moe_blocks(model))

    def make_store(i: int, layout: ExpertLayout) -> ExpertStore:
        if i in stores:
            return stores[i]
        store = MemoryStore.from_module(blocks[i].experts, layout, pin=device.type == "cuda")
        release = getattr(blocks[i].experts, "release_file_pages", None)  # copied from a mapped file (a GGUF)
        if release is not None:
            release()
        return store

    dtype = model.model.norm.weight.dtype  # the activation dtype: the KV cache is allocated in it
    fixed = fixed_bytes(model, placement.ctx, dtype, device)
    largest = max(layouts.values(), key=lambda lay: lay.expert_bytes)  # layers may mix types (Q4_K_M: Q4_K/Q6_K)
    plan = make_plan(model, largest, in_ram if device.type == "cpu" else 0, scratch, placement, device, fixed)
    return wrap(model, layouts, make_store, plan, placement, device)
