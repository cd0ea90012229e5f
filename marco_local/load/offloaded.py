"""A safetensors checkpoint loaded with its experts left where they lie: in the file (CPU, read with positional reads
on a miss) or copied once into pinned host RAM (CUDA). The non-expert weights are read as usual; the experts are
never materialised as modules. The offloading itself (plan, stores, slots) is offload/install.py's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import load_config
from ..errors import MarcoError
from ..formats.checkpoint import Checkpoint
from ..models.qwen3_moe import Qwen3MoeForCausalLM
from ..offload.budget import Placement
from ..offload.install import fixed_bytes, make_plan, moe_blocks, wrap
from ..offload.store import ExpertLayout, ExpertStore, FileStore, MemoryStore, safetensors_segments
from .checkpoint import check_checkpoint
from .meta import meta_device

ProgressFn = Callable[[int, int], None]


def load_offloaded(
    folder: str | Path,
    placement: Placement,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> Qwen3MoeForCausalLM:
    """A Hugging Face checkpoint with its experts left in the file (CPU) or in pinned host RAM (CUDA)."""
    device = torch.device(device)
    cfg = load_config(folder)
    ckpt = Checkpoint(folder)
    check_checkpoint(cfg, ckpt)
    with meta_device():
        model = Qwen3MoeForCausalLM(cfg).to(dtype)
    blocks = moe_blocks(model)
    expert_params = {id(p) for _, b in blocks for p in b.experts.parameters()}
    params = [(n, p) for n, p in model.named_parameters() if id(p) not in expert_params]
    stores: dict[int, ExpertStore] = {}
    for i, block in blocks:  # headers only: fail on a bad checkpoint before reading weights
        layout = ExpertLayout(block.experts, cfg.num_experts)
        stores[i] = FileStore(layout, safetensors_segments(ckpt.file_of, f"model.layers.{i}.mlp.experts", layout))
    fixed = fixed_bytes(model, placement.ctx, dtype, device)
    scratch = sum(st.resident_bytes for st in stores.values())
    plan = make_plan(model, stores[blocks[0][0]].layout, 0, scratch, placement, device, fixed)  # before any read
    total = len(params)
    for k, (name, p) in enumerate(params):
        if name not in ckpt:
            raise MarcoError(f"tensor {name} is missing from the checkpoint in {ckpt.folder}")
        found = list(ckpt.shape(name))
        if found != list(p.shape):
            raise MarcoError(
                f"tensor {name} has shape {found} in {ckpt.folder}, the config implies {list(p.shape)}",
                hint="config.json and the weights do not belong together",
            )
        owner_name, attr = name.rsplit(".", 1)
        value = ckpt.get(name).to(device=device, dtype=dtype)
        model.get_submodule(owner_name)._parameters[attr] = nn.Parameter(value, requires_grad=False)
        if progress:
            progress(k + 1, total)
    del ckpt  # drop the safetensors mappings: their touched pages would otherwise count toward RSS
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight

    def make_store(i: int, layout: ExpertLayout) -> ExpertStore:
        if device.type != "cuda":
            return stores[i]
        pinned = MemoryStore.from_store(stores[i], pin=True)  # slow tier = pinned host RAM, filled once from the file
        stores[i].close()
        return pinned

    wrap(model, {i: st.layout for i, st in stores.items()}, make_store, plan, placement, device)
    return model.eval()
