"""The memory planner: what a model needs in fast memory in each placement, and how many expert slots a budget
holds. `marco run` plans from the loaded model (offload/install.py), `marco info` and the runtime's VRAM fit from
the file's headers (`footprints`, `gpu_need`); all go through `fixed_bytes`, `expert_scratch` and `plan_slots`, so
the three agree. Torch-free: `marco info` imports it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..config import ModelConfig
from ..errors import MarcoError
from ..formats.headers import StoredTensor, stored_model
from .budget import WORKING_RESERVE, cuda_scratch_bytes, format_bytes, plan_slots

RUNTIME_MARGIN = 256 << 20  # activations, logits and allocator slack on top of weights + KV cache (an estimate)


def fixed_bytes(non_expert_bytes: int, kv_bytes: int) -> int:
    """The part of a budget counted before any expert: non-expert weights, KV cache and the working reserve."""
    return non_expert_bytes + kv_bytes + WORKING_RESERVE


def expert_scratch(cfg: ModelConfig, expert_bytes: int, cuda: bool, store_bytes: int = 0) -> int:
    """The experts' working buffers beside their slots: on CUDA the gathered experts and library workspaces
    (`cuda_scratch_bytes`), elsewhere the stores' own buffers (`store_bytes`)."""
    if cuda:
        return cuda_scratch_bytes(cfg.num_experts_per_tok, expert_bytes, cfg.hidden_size, cfg.moe_intermediate_size)
    return store_bytes


@dataclass
class ParamCounts:
    total: int
    active: int  # per token: embeddings, attention, norms, routers, top-k experts (tied embeddings counted once)
    experts: int  # all routed-expert parameters
    per_expert: int  # one expert of one layer (gate + up + down)
    moe_layers: int


def param_counts(cfg: ModelConfig) -> ParamCounts:
    D, hd = cfg.hidden_size, cfg.head_dim
    attn = D * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 2 * hd + 2 * D  # + q/k/layer norms
    if cfg.attention_bias:
        attn += hd * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + D
    per_expert = 3 * D * cfg.moe_intermediate_size
    embed = cfg.vocab_size * D * (1 if cfg.tie_word_embeddings else 2) + D  # + final norm
    total = active = embed
    experts = moe_layers = 0
    for layer in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(layer):
            moe_layers += 1
            router = cfg.num_experts * D
            experts += cfg.num_experts * per_expert
            total += attn + router + cfg.num_experts * per_expert
            active += attn + router + cfg.num_experts_per_tok * per_expert
        else:
            dense = 3 * D * cfg.intermediate_size
            total += attn + dense
            active += attn + dense
    return ParamCounts(total, active, experts, per_expert if moe_layers else 0, moe_layers)


@dataclass
class Footprint:
    """One way to place a model and the memory it needs there (a row of `marco info`'s table)."""

    name: str
    budget_bytes: int | None  # the GPU budget this row plans for, None for the fixed placements
    fast_bytes: int | None  # GPU memory (or process RAM when that is the fast tier); None: does not fit
    ram_bytes: int  # host RAM (or the memory-mapped file) for what is not in fast memory
    note: str = ""


def is_expert(name: str) -> bool:
    """A routed expert's tensor, by its Hugging Face or GGUF name."""
    return ".mlp.experts." in name or "_exps" in name


@dataclass
class StoredModel:
    """A model as its file stores it (headers only): what the planner needs to size it without loading it."""

    config: ModelConfig
    tensors: list[StoredTensor]
    gguf: bool

    @classmethod
    def read(cls, path: Path, gguf: bool) -> StoredModel:
        cfg, tensors = stored_model(path, gguf)
        return cls(cfg, tensors, gguf)

    @cached_property
    def params(self) -> ParamCounts:
        return param_counts(self.config)

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def expert_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors if is_expert(t.name))

    @property
    def kv_itemsize(self) -> int:
        """The GGUF runtime keeps its KV cache in 16 bits; a checkpoint, in its non-expert weights' precision."""
        if self.gguf:
            return 2
        return 4 if {t.dtype for t in self.tensors if not is_expert(t.name)} == {"F32"} else 2

    def plan_ctx(self, ctx: int) -> int:
        return min(ctx, self.config.max_position_embeddings)  # as run clamps --ctx

    def kv_bytes(self, ctx: int) -> int:
        cfg, tokens = self.config, self.plan_ctx(ctx)
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * tokens * self.kv_itemsize


def footprints(model: StoredModel, ctx: int, gpu_mem: int | None = None) -> list[Footprint]:
    """The placements `marco info` lists for `ctx` tokens of KV cache: all on the GPU (for a GGUF: dequantized, or
    with the experts kept quantized), a GPU budget (`gpu_mem`, else one that holds half of each layer's experts),
    and the CPU alone."""
    cfg, params = model.config, model.params
    kv, weights, experts = model.kv_bytes(ctx), model.weight_bytes, model.expert_bytes
    non_experts_on_gpu = weights - experts  # weights besides the experts, on CUDA
    rows = [Footprint("all on GPU", None, weights + kv + RUNTIME_MARGIN, 0)]
    n_experts = params.moe_layers * cfg.num_experts
    if model.gguf:  # on CUDA: all but the experts dequantized to bf16 (gguf_loader); experts either way
        dense = params.total * 2 + kv + RUNTIME_MARGIN
        rows = [Footprint("all on GPU", None, dense, 0, "dequantized to bf16: GGUF kernels run on the CPU")]
        non_experts_on_gpu = (params.total - params.experts) * 2
        if n_experts:
            note = "experts kept as the file's blocks, dequantized per token"
            need = non_experts_on_gpu + kv + experts + RUNTIME_MARGIN
            rows.append(Footprint("all on GPU, experts quantized", None, need, 0, note))
    if n_experts:
        rows.append(_gpu_budget_row(model, fixed_bytes(non_experts_on_gpu, kv), gpu_mem))
    rows.append(Footprint("CPU only", None, None, weights + kv + RUNTIME_MARGIN, "everything in RAM"))
    return rows


def gpu_need(model: StoredModel, ctx: int) -> int | None:
    """The VRAM of the smallest placement that keeps everything on the GPU; None for a dense model (nothing to
    offload)."""
    if not model.params.moe_layers:
        return None
    rows = footprints(model, ctx)
    return min(r.fast_bytes for r in rows if r.budget_bytes is None and r.fast_bytes and not r.ram_bytes)


def _gpu_budget_row(model: StoredModel, fixed: int, gpu_mem: int | None) -> Footprint:
    """The `--gpu-mem` row as `marco run` plans it (offload/install.py): `fixed` (non-expert weights and KV cache on
    CUDA plus the working reserve), the CUDA scratch, and slots of the largest layer's expert size (a file may mix
    types). `gpu_mem` None: a budget that holds half of each layer's experts."""
    cfg, layers = model.config, model.params.moe_layers
    per_layer: dict[int, int] = {}
    for t in model.tensors:
        if is_expert(t.name) and (m := re.search(r"(?:^blk|\.layers)\.(\d+)\.", t.name)):
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + t.nbytes
    one = max(per_layer.values()) // cfg.num_experts
    scratch = expert_scratch(cfg, one, cuda=True)
    if gpu_mem is None:
        half = fixed + scratch + math.ceil(cfg.num_experts / 2) * one * layers
        step = 1 << 28 if half >= 1 << 30 else 1 << 10  # a round figure: 0.25 GiB (a small model: 1 KiB)
        gpu_mem = math.ceil(half / step) * step
    try:
        plan = plan_slots(cfg.num_experts, layers, one, fixed, gpu_mem, None, scratch, what="--gpu-mem")
    except MarcoError:
        note = f"too small: needs at least {format_bytes(fixed + scratch + one * layers, up=True)}"
        return Footprint("GPU budget", gpu_mem, None, sum(per_layer.values()), note)
    rest = (cfg.num_experts - plan.slots) * one * layers
    note = f"{plan.slots} of {cfg.num_experts} experts per layer resident ({plan.slots / cfg.num_experts:.0%})"
    return Footprint("GPU budget", gpu_mem, plan.fast_bytes, rest, note)
