"""Load a bitsandbytes-quantized checkpoint folder (nf4, fp4, LLM.int8) into `Qwen3MoeForCausalLM`, kept quantized.

A folder is bnb-quantized when its config.json has `quantization_config.quant_method == "bitsandbytes"` (what
`quant/bnb_writer.py` and transformers' `save_pretrained` write). Each linear is recognised by what is stored under its
name, never by the config alone: `X.weight` + `X.weight.quant_state.bitsandbytes__{nf4,fp4}` (+ absmax, quant_map,
nested_*) is 4-bit, `X.weight` int8 + `X.SCB` is LLM.int8, a plain `X.weight` stays a float `nn.Linear`. So folders
where transformers 5 quantized only the attention (its fused experts stay float) load too.

Invariants: packed weights stay packed in memory (4-bit: half a byte per weight plus absmax; int8: one byte); nothing
dequantizes a whole layer. Per call:
- 4-bit on CPU, bf16 activations, AVX512-BF16 CPU: bitsandbytes' own CPU kernel (`bnb.matmul_4bit` on its CPU
  weight layout, repacked on a linear's first use, as `bnb.nn.Linear4bit` does). Measured on a Nano expert linear
  (384x1024, one token, one thread): ~22 us, against ~115 us for a bf16 `F.linear` and ~310 us for dequantize+linear.
  The repacking stores absmax de-nested in bf16 (0.4% rounding of block scales), so it is near-lossless, not exact.
- 4-bit otherwise (float32/float16 activations, other CPUs): `bitsandbytes.functional.dequantize_4bit` of that one
  linear (for experts: only the experts a token was routed to, through `Experts.expert_forward`), then `F.linear` in
  the activation dtype; the result equals a float model holding the dequantized weights. (torch's int4 kernels are
  uniform int4, which NF4/FP4 are not, so no lossless repacking to them exists.)
- int8 on CPU: `torch._weight_int8pack_mm` (per-output-channel int8 weight x activation, no activation quantization):
  LLM.int8's row-wise weight is exactly a per-channel int8 weight with scale SCB/127, so the mapping is lossless and
  several times faster than a bf16 matmul. (bitsandbytes' own int8 matmul also quantizes activations.)
- On CUDA: 4-bit layers are prepared for CUDA graphs at load (`prepare_for_cuda_graphs`: experts stacked and a
  token's experts dequantized in plain torch ops, bit-equal to bitsandbytes; attention dequantized into dense
  linears); LLM.int8 runs on bitsandbytes' kernels (`bnb.matmul` with an LLM.int8 `MatmulLtState` using the file's
  `llm_int8_threshold`), eagerly.
- Offloading (marco_local/offload) moves each expert's tensors into slots; `use_slots` stops the linears from keeping
  private copies (the CPU kernel's repacked layout, a cast scale) that would not follow the slot's contents.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import load_config
from ..errors import MarcoError
from ..formats.checkpoint import Checkpoint
from ..models.qwen3_moe import Experts, Qwen3MoeForCausalLM
from .checkpoint import _set_param, _stacked_expert_source, check_checkpoint
from .meta import meta_device

ProgressFn = Callable[[int, int], None]

_QS_PREFIX = "quant_state.bitsandbytes__"
_INT8_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes' int8_vectorwise_dequant writes it


# bitsandbytes logs a warning on import when its optional CPU kernel package is absent; a library must not print.
logging.getLogger("bitsandbytes").addHandler(logging.NullHandler())


def _bnb():
    """bitsandbytes, imported on first use: only bnb folders need it, and importing it costs seconds (torch.compile)."""
    import bitsandbytes

    return bitsandbytes


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


class Linear4bit(nn.Module):
    """A bnb 4-bit linear: packed codes `[out*in/2, 1]` uint8 and its `QuantState`.

    With `cpu_kernel` (a CPU with AVX512-BF16, bf16 activations) it runs bitsandbytes' CPU kernel: on first use the
    weight is repacked into bitsandbytes' CPU layout (`_convert_weight_packed_for_cpu`, what `bnb.nn.Linear4bit` does
    on such CPUs; same bytes, absmax de-nested to bf16), then `bnb.matmul_4bit` runs on it. Lazily, so that only the
    experts a prompt actually uses pay the repacking. Otherwise (float32/float16, other CPUs) it dequantizes per call.
    """

    def __init__(self, weight: torch.Tensor, quant_state, bias: torch.Tensor | None, cpu_kernel: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.quant_state = quant_state
        self.out_features, self.in_features = quant_state.shape
        # the kernel's layout: rows in tiles of 32, whole absmax blocks per row
        self.cpu_kernel = cpu_kernel and self.out_features % 32 == 0 and self.in_features % quant_state.blocksize == 0

    def dequantize(self) -> torch.Tensor:
        bnb = _bnb()
        if getattr(self.quant_state, "packing_format_for_cpu", False):  # repacked: undo it first (absmax now bf16)
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            weight, state = _convert_weight_packed_for_cpu_inverse(self.weight, copy.deepcopy(self.quant_state))
            return bnb.functional.dequantize_4bit(weight, state)
        return bnb.functional.dequantize_4bit(self.weight, self.quant_state)

    def use_slots(self) -> None:
        """Its data are about to become views of offload slots, rewritten under it: keep no layout of its own."""
        if getattr(self.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError("experts must be offloaded before their first forward")  # a caller's bug
        self.cpu_kernel = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.is_cuda:  # bitsandbytes' kernels (gemv_4bit for one token), as bnb.nn.Linear4bit.forward calls them
            return _bnb().matmul_4bit(x, self.weight.t(), bias=bias, quant_state=self.quant_state).to(x.dtype)
        if self.cpu_kernel and x.dtype == torch.bfloat16:
            if not getattr(self.quant_state, "packing_format_for_cpu", False):
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu

                self.weight, self.quant_state = _convert_weight_packed_for_cpu(self.weight, self.quant_state)
            return _bnb().matmul_4bit(x, self.weight, bias=bias, quant_state=self.quant_state)
        return F.linear(x, self.dequantize().to(x.dtype), bias)


class Linear8bit(nn.Module):
    """An LLM.int8 linear: int8 weight `[out, in]` and per-row absmax `SCB` (weight = int8 * SCB / 127)."""

    def __init__(self, weight: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("SCB", scb)
        self.register_buffer("bias", bias)
        self.register_buffer("scale", scb * _INT8_SCALE)  # float32 per-channel scale for the CPU kernel
        self.threshold = threshold
        self.out_features, self.in_features = weight.shape
        self._state = None
        self._scale_as: tuple[torch.dtype, torch.Tensor] | None = None  # scale in the activation dtype, made once
        self.cache_scale = True

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale[:, None]

    def use_slots(self) -> None:
        """Its data are about to become views of offload slots, rewritten under it: cast the scale per call."""
        self.cache_scale, self._scale_as, self._state = False, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.is_cuda:
            return self._cuda_forward(x, bias)
        if not self.cache_scale:
            scale = self.scale.to(x.dtype)
        else:
            if self._scale_as is None or self._scale_as[0] != x.dtype:
                self._scale_as = (x.dtype, self.scale.to(x.dtype))
            scale = self._scale_as[1]
        flat = x.reshape(-1, self.in_features).contiguous()
        out = torch._weight_int8pack_mm(flat, self.weight, scale)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if bias is None else out + bias

    def _cuda_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bnb = _bnb()
        if self._state is None:  # what bnb.nn.Linear8bitLt sets up for an inference-only int8 weight
            state = bnb.MatmulLtState()
            state.CB, state.SCB = self.weight, self.SCB
            state.threshold = self.threshold
            state.has_fp16_weights = False
            state.is_training = False
            state.use_pool = self.threshold > 0.0
            self._state = state
        return bnb.matmul(x, self.weight, bias=bias, state=self._state).to(x.dtype)


class QuantizedExperts(Experts):
    """A layer's experts as per-expert quantized linears (`Linear4bit` / `Linear8bit`); only routed experts run.

    Keeps `Experts.forward` (grouping tokens by expert) and replaces `expert_forward`.
    # E experts; gate_proj/up_proj: E x [I, D], down_proj: E x [D, I]
    """

    def __init__(self, gate: list[nn.Module], up: list[nn.Module], down: list[nn.Module]) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: it would allocate the float [E, out, in] stacks
        self.num_experts = len(gate)
        self.gate_proj, self.up_proj, self.down_proj = nn.ModuleList(gate), nn.ModuleList(up), nn.ModuleList(down)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj[e](F.silu(self.gate_proj[e](x)) * self.up_proj[e](x))

    def use_slots(self) -> None:
        """Before offloading (marco_local/offload): the per-expert linears' data become views of the slots."""
        for linear in (*self.gate_proj, *self.up_proj, *self.down_proj):
            if hasattr(linear, "use_slots"):
                linear.use_slots()


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """[256, 2] float32: the two 4-bit values a packed byte holds (high nibble first, as bitsandbytes packs them)."""
    byte = torch.arange(256, device=code.device)
    return torch.stack((code[byte >> 4], code[byte & 15]), dim=1).float()


def dequantize_4bit_rows(
    packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization in plain torch ops, for a batch of rows (one expert's matrix each):
    packed [..., n/2] uint8, absmax [..., n/blocksize] float32 -> [..., n] float32, each value its code times its
    block's absmax in float32, as bitsandbytes computes it. Plain ops, so a CUDA graph can hold them."""
    values = pairs[packed.long()]  # [..., n/2, 2]
    return (values.view(*packed.shape[:-1], -1, blocksize) * absmax.unsqueeze(-1)).view(*packed.shape[:-1], -1)


def _absmax(state) -> torch.Tensor:
    """A 4-bit state's block scales in float32, de-nested as bitsandbytes does before dequantizing."""
    if state.nested:
        return (_bnb().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


class StackedExperts4bit(Experts):
    """A layer's 4-bit experts stacked per expert: packed codes [E, n/2] and float32 block scales [E, n/blocksize]
    per projection, for CUDA. A decode token's experts are gathered by id and dequantized in plain torch ops
    (`dequantize_4bit_rows`), so the step has no host sync and a CUDA graph can hold it (cuda_graphs.py); offloading
    packs each expert's rows like any stacked experts. Values equal bitsandbytes' dequantization (the scales are
    de-nested once at load: 4 bytes per 64 weights instead of ~1)."""

    graph_safe = True
    shared_tensors = ("pairs",)  # [256, 2]: not per-expert, even in a 256-expert model (offload/store.py)
    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, gate: list[Linear4bit], up: list[Linear4bit], down: list[Linear4bit]) -> None:
        nn.Module.__init__(self)  # not Experts.__init__: it would allocate the float [E, out, in] stacks
        first = gate[0].quant_state
        self.num_experts, self.blocksize, self.dtype = len(gate), first.blocksize, first.dtype
        self.register_buffer("pairs", _pair_table(first.code))
        self.shapes = {}
        for name, linears in zip(self.PROJECTIONS, (gate, up, down), strict=True):
            self.shapes[name] = tuple(linears[0].quant_state.shape)
            self.register_buffer(f"{name}_packed", torch.stack([lin.weight.reshape(-1) for lin in linears]))
            self.register_buffer(f"{name}_absmax", torch.stack([_absmax(lin.quant_state) for lin in linears]))

    @staticmethod
    def convertible(gate: list[nn.Module], up: list[nn.Module], down: list[nn.Module]) -> bool:
        """Every linear 4-bit, with one block size, code table and shape per projection, whole blocks per matrix."""
        for linears in (gate, up, down):
            if not all(isinstance(lin, Linear4bit) for lin in linears):
                return False
            states = [lin.quant_state for lin in linears]
            first = states[0]
            if any(getattr(st, "packing_format_for_cpu", False) for st in states):
                return False
            if math.prod(first.shape) % first.blocksize:
                return False
            key = (first.blocksize, tuple(first.shape), first.quant_type)
            if any((st.blocksize, tuple(st.shape), st.quant_type) != key for st in states):
                return False
        codes = [lin.quant_state.code for lin in (gate[0], up[0], down[0])]
        return all(torch.equal(c.cpu(), codes[0].cpu()) for c in codes)

    @property
    def gathers(self) -> bool:
        return True

    def _dense(self, name: str, ids: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        packed, absmax = getattr(self, f"{name}_packed")[ids], getattr(self, f"{name}_absmax")[ids]
        # through the stored dtype, as bitsandbytes' dequantize returns it (Linear4bit computes on that)
        w = dequantize_4bit_rows(packed, absmax, self.pairs, self.blocksize).to(self.dtype).to(dtype)
        return w.view(*packed.shape[:-1], *self.shapes[name])

    def gathered_weights(self, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return tuple(self._dense(name, ids, dtype) for name in self.PROJECTIONS)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (self._dense(name, e, x.dtype) for name in self.PROJECTIONS)
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


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
            state = _bnb().functional.QuantState.from_dict(parts, device=self.device)
        except (ValueError, KeyError, AssertionError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MarcoError(
                f"{module}: unreadable bitsandbytes quant state in {self.ckpt.folder}: {e}",
                hint="the checkpoint is corrupt; quantize it again",
            ) from e
        if tuple(state.shape) != shape or weight.numel() * 2 < shape[0] * shape[1]:
            raise _shape_error(module, list(state.shape), shape)
        return Linear4bit(weight, state, bias, cpu_kernel=self.cpu_kernel)


def cpu_kernel_available() -> bool:
    """bitsandbytes' CPU 4-bit kernel needs AVX512-BF16 and its (private) weight repacking function."""
    bnb = _bnb()
    try:
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu  # noqa: F401
    except ImportError:
        return False
    return bool(getattr(bnb.functional, "has_avx512bf16", lambda: False)())


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
