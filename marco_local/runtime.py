"""Load a MODEL argument into a ready-to-generate bundle: model, tokenizer and where it lives.

This is the one seam between "what the user named" and "what runs": it picks the loader by format (Hugging Face
folder today; GGUF and quantized folders plug in here) and the device and dtype.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidModelError, MarcoError
from .load.bnb import is_bnb_folder, load_bnb_model  # imports bitsandbytes only when used
from .load.checkpoint import load_model
from .load.offloaded import load_offloaded
from .offload import Placement, install
from .registry import ResolvedModel, resolve
from .tokenizer import Tokenizer, read_json_object

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "f16": torch.float16,
    "float16": torch.float16,
    "f32": torch.float32,
    "float32": torch.float32,
}


SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": None}


@dataclass
class LoadedModel:
    source: ResolvedModel
    model: nn.Module
    tokenizer: Tokenizer
    device: torch.device
    generation_defaults: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what the loader decided on its own, for the CLI to say

    @property
    def context_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def sampling(self, **chosen: float | int | None) -> dict[str, Any]:
        """Sampling settings: what the user chose, else the model's generation_config.json, else our defaults."""
        resolved = {}
        for name, default in SAMPLING_DEFAULTS.items():
            value = chosen.get(name)
            resolved[name] = value if value is not None else self.generation_defaults.get(name, default)
        return resolved


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):  # torch.device takes mps, meta, ...: no path of ours runs there
        raise MarcoError(f"unknown device {name!r}", hint="use auto, cpu or cuda", exit_code=2)
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MarcoError("--device cuda was asked for, but no CUDA device is available", hint="use --device cpu")
    return torch.device(name)


def pick_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MarcoError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(DTYPES)}", exit_code=2)
    return DTYPES[name]


# generation_config.json sampling keys -> the range a value must lie in (a wrong one is the file's error, not a
# TypeError deep in the sampler)
_SAMPLING_RANGES = {
    "temperature": (0.0, 1e6),
    "top_p": (0.0, 1.0),
    "top_k": (0, 1 << 31),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (1e-6, 1e6),
}


def _generation_defaults(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    raw = read_json_object(path)
    out = {}
    for key, (lo, hi) in _SAMPLING_RANGES.items():
        value = raw.get(key)
        if value is None:
            continue
        integral = isinstance(lo, int)
        if not isinstance(value, int if integral else (int, float)) or isinstance(value, bool):
            raise InvalidModelError(path, key, value, "is not a number")
        if not (math.isfinite(value) and lo <= value <= hi):
            raise InvalidModelError(path, key, value, f"is outside {lo:g}..{hi:g}")
        out[key] = value
    return out


def load(
    spec: str,
    dtype: str = "bf16",
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    placement: Placement | None = None,
) -> LoadedModel:
    """`placement` (when active) keeps only some experts in fast memory: see marco_local/offload. On CUDA with no
    memory option, a MoE model too big for the free VRAM gets `--gpu-mem auto` (`fit_to_free_vram`)."""
    source = resolve(spec)
    dev = pick_device(device)
    notes = []
    if dev.type == "cuda" and placement is not None and not placement.active:
        placement, note = fit_to_free_vram(spec, placement, dev)
        notes += [note] if note else []
    offload = placement is not None and placement.active
    if placement is not None and not offload and (idle := placement.idle_options()):
        notes.append(
            f"{' and '.join(idle)}: no effect, every expert is resident "
            "(offloading starts with --ram-mem, --gpu-mem or --experts-resident)"
        )
    if source.format == "gguf":
        from .load.gguf import load_gguf  # imported here: only GGUF runs need the block codecs

        if device == "auto":
            dev = torch.device("cpu")  # the GGUF kernels are CPU kernels (marco_local/layers/gguf.py)
        on_cpu = dev.type == "cpu"
        # CUDA: experts dense when they fit, else kept quantized; offloaded, their blocks go to pinned host RAM
        cuda_experts = "host" if offload else "auto"
        model, tokenizer = load_gguf(
            source.path,
            dtype=pick_dtype(dtype),
            device=dev,
            progress=progress,
            experts_in_file=offload and on_cpu,
            cuda_experts=cuda_experts,
        )
        if offload and not has_experts(model):  # a dense model: nothing to offload, as llama.cpp's --n-cpu-moe
            given = placement.offload_options() + placement.idle_options()
            listed = ", ".join(given[:-1]) + " and " + given[-1] if len(given) > 1 else given[0]
            notes.append(f"{listed}: no effect, the model is dense (it has no experts to offload)")
        elif offload:
            install(model, placement, files=[source.path] if on_cpu else [])
        return LoadedModel(source, model, tokenizer, dev, {}, notes)
    if is_bnb_folder(source.path):  # quantization_config.quant_method == "bitsandbytes" in config.json
        model = load_bnb_model(source.path, dtype=pick_dtype(dtype), device=dev, progress=progress)
        if offload:
            install(model, placement)
    elif offload:  # experts stay in the checkpoint file (CPU) or pinned host RAM (CUDA)
        model = load_offloaded(source.path, placement, dtype=pick_dtype(dtype), device=dev, progress=progress)
    else:
        model = load_model(source.path, dtype=pick_dtype(dtype), device=dev, progress=progress)
    cfg = model.config
    tokenizer = Tokenizer.from_folder(source.path, config_eos=cfg.eos_token_ids, vocab_size=cfg.vocab_size)
    return LoadedModel(source, model, tokenizer, dev, _generation_defaults(source.path), notes)


def has_experts(model: nn.Module) -> bool:
    """Whether any layer of `model` is a MoE block (what offloading acts on)."""
    return any(hasattr(getattr(layer, "mlp", None), "experts") for layer in model.model.layers)


def fit_to_free_vram(spec: str, placement: Placement, device: torch.device) -> tuple[Placement, str | None]:
    """What Ollama does when a model is bigger than the card, for MoE models: keep only the hot experts on the GPU.
    The need is the smallest all-on-GPU placement the memory planner computes from the file's headers (weights as
    they load, KV cache, margin), as `marco info` shows it."""
    from .offload.memory import StoredModel, gpu_need

    source = resolve(spec)
    need = gpu_need(StoredModel.read(source.path, gguf=source.format == "gguf"), placement.ctx)
    if need is None:
        return placement, None
    return fit_placement(placement, need, torch.cuda.mem_get_info(device)[0])


def fit_placement(placement: Placement, need_bytes: int, free_bytes: int) -> tuple[Placement, str | None]:
    """`placement` unchanged when the model fits in `free_bytes` of VRAM (less `--gpu-mem auto`'s margin); else the
    same with `gpu_mem="auto"`, and a note saying why."""
    from .offload.budget import AUTO_GPU_MARGIN

    if placement.active or need_bytes + AUTO_GPU_MARGIN <= free_bytes:
        return placement, None
    note = (
        f"the model needs {need_bytes / 2**30:.1f} GiB of VRAM and {free_bytes / 2**30:.1f} GiB is free: "
        "only the hot experts stay on the GPU (--gpu-mem auto)"
    )
    return dataclasses.replace(placement, gpu_mem="auto"), note
