"""Load a bitsandbytes-quantized checkpoint folder (nf4, fp4, LLM.int8) into `Qwen3MoeForCausalLM`, kept quantized.

A folder is bnb-quantized when its config.json has `quantization_config.quant_method == "bitsandbytes"` (what
`quant/bnb_writer.py` and transformers' `save_pretrained` write). Each linear is recognised by what is stored under its
name, never by the config alone: `X.weight` + `X.weight.quant_state.bitsandbytes__{nf4,fp4}` (+ absmax, quant_map,
nested_*) is 4-bit, `X.weight` int8 + `X.SCB` is LLM.int8, a plain `X.weight` stays a float `nn.Linear`. So folders
where transformers 5 quantized only the attention (its fused experts stay float) load too.

The quantized linears become the modules of layers/bnb.py, their weights packed as stored. On CUDA the model is then
prepared for CUDA graphs (`prepare_for_cuda_graphs`); LLM.int8 layers there decode eagerly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import load_config
from ..errors import MarcoError
from ..formats.checkpoint import Checkpoint
from ..layers.bnb import (
    Linear4bit,
    Linear8bit,
    QuantizedExperts,
    StackedExperts4bit,
    cpu_kernel_available,
    import_bnb,
)
from ..models.qwen3_moe import Experts, Qwen3MoeForCausalLM
from .checkpoint import _set_param, _stacked_expert_source, check_checkpoint
from .meta import meta_device

ProgressFn = Callable[[int, int], None]

_QS_PREFIX = "quant_state.bitsandbytes__"


def quantization_config(folder: str | Path) -> dict[str, Any] | None:
    """The folder's `quantization_config` if it is a bitsandbytes one, else None."""
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None  # load_config reports a bad config.json properly
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes":
        return qc
    return None


def is_bnb_folder(folder: str | Path) -> bool:
    return Path(folder).is_dir() and quantization_config(folder) is not None


def prepare_for_cuda_graphs(model: Qwen3MoeForCausalLM) -> None:
    """Make a bnb model's one-token step graph-capturable on CUDA: 4-bit experts stacked (`StackedExperts4bit`), every
    other 4-bit linear (attention, a dense FFN) dequantized into a bf16/fp16 `nn.Linear` (bitsandbytes' matmul is not
    known to be capturable; attention is ~7% of Marco-Nano's weights: +264 MB in bf16). LLM.int8 layers stay as they
    are (not capturable: the model then decodes eagerly)."""
    dtype = model.model.norm.weight.dtype
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if isinstance(experts, QuantizedExperts):
            lists = (list(experts.gate_proj), list(experts.up_proj), list(experts.down_proj))
            if StackedExperts4bit.convertible(*lists):
                layer.mlp.experts = StackedExperts4bit(*lists)
        # experts that could not be stacked stay with bitsandbytes (eager decode), every linear inside them included
        unstacked = {id(m) for e in layer.modules() if isinstance(e, QuantizedExperts) for m in e.modules()}
        for parent in list(layer.modules()):
            if id(parent) in unstacked:
                continue
            for name, lin in list(parent.named_children()):
                if isinstance(lin, Linear4bit):
                    setattr(parent, name, _dense_linear(lin, dtype))


def _dense_linear(lin: Linear4bit, dtype: torch.dtype) -> nn.Linear:
    dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
    dense.weight = nn.Parameter(lin.dequantize().to(dtype), requires_grad=False)
    if lin.bias is not None:
        dense.bias = nn.Parameter(lin.bias.to(dtype), requires_grad=False)
    return dense


class _Store:
    """The checkpoint plus which linears are stored quantized, and how."""

    def __init__(self, ckpt: Checkpoint, device: torch.device, threshold: float, cpu_kernel: bool) -> None:
        self.ckpt, self.device, self.threshold, self.cpu_kernel = ckpt, device, threshold, cpu_kernel
        self.qs_keys: dict[str, list[str]] = {}  # module -> its "weight.<quant state part>" tensor names
        for name in ckpt.names():
            if ".weight." in name:
                self.qs_keys.setdefault(name.split(".weight.", 1)[0], []).append(name)

    def kind(self, module: str) -> str:
        if any(_QS_PREFIX in k for k in self.qs_keys.get(module, ())):
            return "4bit"
        if f"{module}.SCB" in self.ckpt:
            return "int8"
        return "float"

    def linear(self, module: str, shape: tuple[int, int], dtype: torch.dtype) -> nn.Module:
        """The quantized linear stored under `module` ([out, in] = shape), on the target device."""
        bias_name = f"{module}.bias"
        bias = self.ckpt.get(bias_name).to(self.device, dtype) if bias_name in self.ckpt else None
        # An owned copy: tensors from safetensors may be views of the memory-mapped file, and torch's int8 CPU kernel
        # reads past the end of its operand (a segfault when that is the end of the mapping).
        weight = self.ckpt.get(f"{module}.weight").to(self.device, copy=True)
        if self.kind(module) == "int8":
            if tuple(weight.shape) != shape or weight.dtype != torch.int8:
                raise _shape_error(module, list(weight.shape), shape)
            scb = self.ckpt.get(f"{module}.SCB").to(self.device, torch.float32)
            return Linear8bit(weight, scb, bias, self.threshold)
        prefix = f"{module}.weight."
        parts = {k[len(prefix) :]: self.ckpt.get(k) for k in self.qs_keys[module]}
        try:
            state = import_bnb().functional.QuantState.from_dict(parts, device=self.device)
        except (ValueError, KeyError, AssertionError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MarcoError(
                f"{module}: unreadable bitsandbytes quant state in {self.ckpt.folder}: {e}",
                hint="the checkpoint is corrupt; quantize it again",
            ) from e
        if tuple(state.shape) != shape or weight.numel() * 2 < shape[0] * shape[1]:
            raise _shape_error(module, list(state.shape), shape)
        return Linear4bit(weight, state, bias, cpu_kernel=self.cpu_kernel)


def _shape_error(module: str, found: list[int], expected: tuple[int, ...]) -> MarcoError:
    return MarcoError(
        f"quantized weight {module} has shape {found}, the config implies {list(expected)}",
        hint="config.json and the weights do not belong together",
    )


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(owner), attr, module)


def load_bnb_model(
    folder: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
) -> Qwen3MoeForCausalLM:
    """Build the model from a bnb folder: quantized linears stay quantized, everything else in `dtype`."""
    folder, device = Path(folder), torch.device(device)
    qc = quantization_config(folder)
    if qc is None:
        raise MarcoError(f"{folder} is not a bitsandbytes-quantized checkpoint (no quantization_config)")
    cfg = load_config(folder)
    ckpt = Checkpoint(folder)
    check_checkpoint(cfg, ckpt)
    cpu_kernel = device.type == "cpu" and dtype == torch.bfloat16 and cpu_kernel_available()
    store = _Store(ckpt, device, float(qc.get("llm_int8_threshold", 6.0)), cpu_kernel)
    with meta_device():
        model = Qwen3MoeForCausalLM(cfg)
    # lm_head is never a bnb linear (transformers skips the output head); the router is a float linear if stored so
    linears = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head" and store.kind(n) != "float"
    ]
    experts = [
        (n, m) for n, m in model.named_modules() if isinstance(m, Experts) and store.kind(f"{n}.0.gate_proj") != "float"
    ]
    replaced = {n for n, _ in linears} | {n for n, _ in experts}
    floats = [(n, p) for n, p in model.named_parameters() if n.rsplit(".", 1)[0] not in replaced]
    total, done = len(linears) + len(experts) + len(floats), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    for name, lin in linears:
        _replace(model, name, store.linear(name, (lin.out_features, lin.in_features), dtype))
        step()
    for name, mod in experts:
        _, inter, hidden = mod.gate_proj.shape
        projs = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        built = {
            p: [store.linear(f"{name}.{e}.{p}", shape, dtype) for e in range(mod.num_experts)]
            for p, shape in projs.items()
        }
        _replace(model, name, QuantizedExperts(built["gate_proj"], built["up_proj"], built["down_proj"]))
        step()
    for name, p in floats:
        if name.endswith((".mlp.experts.gate_proj", ".mlp.experts.up_proj", ".mlp.experts.down_proj")):
            value = _stacked_expert_source(ckpt, name, cfg.num_experts)()
        else:
            value = ckpt.get(name)
        if tuple(value.shape) != tuple(p.shape):
            raise _shape_error(name, list(value.shape), tuple(p.shape))
        _set_param(model, name, value.to(device=device, dtype=dtype))
        step()
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if device.type == "cuda":
        prepare_for_cuda_graphs(model)
    return model.eval()
