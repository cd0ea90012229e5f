"""Build a `Qwen3MoeForCausalLM` from a Hugging Face checkpoint folder.

The model is created on the meta device and each parameter is filled from the checkpoint one tensor at a time (the
experts of a layer are stacked into one `[E, out, in]` tensor as they are read), so peak memory is the model once
plus one tensor. The checkpoint quirks live here (`source_names`): per-expert tensors to stack, transformers 5's
fused `gate_up_proj`, tied embeddings. Shapes are checked against the config before anything is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig, load_config
from ..errors import InvalidModelError, MarcoError
from ..formats.checkpoint import Checkpoint
from ..models.qwen3_moe import Qwen3MoeForCausalLM
from .meta import meta_device

ProgressFn = Callable[[int, int], None]

_EXPERT_PARAMS = (".mlp.experts.gate_proj", ".mlp.experts.up_proj", ".mlp.experts.down_proj")


def _stacked_expert_source(ckpt: Checkpoint, name: str, num_experts: int) -> Callable[[], torch.Tensor]:
    """A stacked expert parameter is read from per-expert tensors (4.x layout) or a fused tensor (5.x in memory)."""
    prefix, proj = name.rsplit(".", 1)  # model.layers.L.mlp.experts, gate_proj
    per_expert = [f"{prefix}.{e}.{proj}.weight" for e in range(num_experts)]
    if all(n in ckpt for n in per_expert):
        return lambda: torch.stack([ckpt.get(n) for n in per_expert])
    fused = f"{prefix}.gate_up_proj"
    if proj in ("gate_proj", "up_proj") and fused in ckpt:
        half = 0 if proj == "gate_proj" else 1
        return lambda: ckpt.get(fused).chunk(2, dim=1)[half]
    if proj == "down_proj" and name in ckpt:
        return lambda: ckpt.get(name)
    missing = next(n for n in per_expert if n not in ckpt)
    raise MarcoError(f"tensor {missing} is missing from the checkpoint in {ckpt.folder}")


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def check_checkpoint(cfg: ModelConfig, ckpt: Checkpoint) -> None:
    """What the config promises against what the checkpoint holds, before a module is built from it: the layers
    (num_hidden_layers = 2^32 would build layers for minutes; fewer than present would drop some silently) and the
    embedding (vocab_size and hidden_size set every other shape)."""
    found = {int(m.group(1)) for name in ckpt.names() if (m := _LAYER.match(name))}
    if len(found) != cfg.num_hidden_layers or found != set(range(cfg.num_hidden_layers)):
        have = f"layers 0 to {max(found)}" if found and len(found) == max(found) + 1 else f"{len(found)} layers"
        raise InvalidModelError(
            ckpt.folder / "config.json",
            "num_hidden_layers",
            cfg.num_hidden_layers,
            f"does not match the checkpoint's {have}",
            hint="config.json and the weights do not belong together",
        )
    name = "model.embed_tokens.weight"
    if name in ckpt:
        shape = ckpt.shape(name)
        if tuple(shape) != (cfg.vocab_size, cfg.hidden_size):
            raise MarcoError(
                f"tensor {name} has shape {list(shape)} in {ckpt.folder}, "
                f"config.json implies {[cfg.vocab_size, cfg.hidden_size]} (vocab_size, hidden_size)",
                hint="config.json and the weights do not belong together",
            )


def _expected_shape(ckpt: Checkpoint, name: str, num_experts: int) -> tuple[int, ...]:
    prefix, proj = name.rsplit(".", 1)
    first = f"{prefix}.0.{proj}.weight"
    if first in ckpt:
        shape = ckpt.shape(first)
        for e in range(1, num_experts):  # every expert: one reshaped tensor must not slip through torch.stack
            other = f"{prefix}.{e}.{proj}.weight"
            if other in ckpt and ckpt.shape(other) != shape:
                raise MarcoError(
                    f"tensor {other} has shape {list(ckpt.shape(other))} in {ckpt.folder}, expert 0's is {list(shape)}",
                    hint="the checkpoint is damaged: re-download it",
                )
        return (num_experts, *shape)
    if f"{prefix}.gate_up_proj" in ckpt and proj != "down_proj":
        e, two_i, d = ckpt.shape(f"{prefix}.gate_up_proj")
        return (e, two_i // 2, d)
    return ckpt.shape(name)


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, attr = name.rsplit(".", 1)
    owner = model.get_submodule(owner_name)
    owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_model(
    folder: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> Qwen3MoeForCausalLM:
    cfg = load_config(folder)
    ckpt = Checkpoint(folder)
    check_checkpoint(cfg, ckpt)
    with meta_device():
        model = Qwen3MoeForCausalLM(cfg)
    params = dict(model.named_parameters())  # tied lm_head appears once, as the embedding
    sources: dict[str, Callable[[], torch.Tensor]] = {}
    for name, p in params.items():
        if name.endswith(_EXPERT_PARAMS):
            sources[name] = _stacked_expert_source(ckpt, name, cfg.num_experts)
            found = _expected_shape(ckpt, name, cfg.num_experts)
        else:
            if name not in ckpt:
                raise MarcoError(f"tensor {name} is missing from the checkpoint in {ckpt.folder}")
            sources[name] = (lambda n: lambda: ckpt.get(n))(name)
            found = ckpt.shape(name)
        if tuple(found) != tuple(p.shape):
            raise MarcoError(
                f"tensor {name} has shape {list(found)} in {ckpt.folder}, the config implies {list(p.shape)}",
                hint="config.json and the weights do not belong together",
            )
    for i, (name, read) in enumerate(sources.items()):
        _set_param(model, name, read().to(device=device, dtype=dtype))
        if progress:
            progress(i + 1, len(sources))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
