"""Modules that compute on bitsandbytes weights (nf4, fp4, LLM.int8) kept packed: half a byte per 4-bit weight plus its
block scales, one byte per int8 weight; nothing dequantizes a whole layer.

- `Linear4bit`: on CUDA, bitsandbytes' kernels. On a CPU with AVX512-BF16 and bf16 activations, bitsandbytes' CPU
  kernel on its own weight layout, repacked on a linear's first use (as `bnb.nn.Linear4bit` does; the block scales
  become bf16, so near-lossless, not exact): several times faster than a bf16 matmul. Otherwise that one linear is
  dequantized per call, which equals a float model holding the dequantized weights (NF4/FP4 are not uniform int4,
  so torch's int4 kernels cannot take them losslessly).
- `Linear8bit`: on CPU `torch._weight_int8pack_mm`, because LLM.int8's row-wise weight is exactly a per-channel int8
  weight with scale SCB/127 (lossless; bitsandbytes' own int8 matmul also quantizes the activations). On CUDA,
  bitsandbytes' LLM.int8 matmul with the file's outlier threshold.
- `QuantizedExperts` runs only the routed experts' linears; `StackedExperts4bit` stacks 4-bit experts so that a CUDA
  graph can hold a decode step (a token's experts dequantized in plain torch ops, bit-equal to bitsandbytes).
- `use_slots`: offloading turns the tensors into views of slots rewritten under the module, so it keeps no private
  copy (the repacked layout, a cast scale) that would not follow them.
"""

from __future__ import annotations

import copy
import logging
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ..models.qwen3_moe import Experts

_INT8_SCALE = 7.874015718698502e-3  # 1/127 as bitsandbytes' int8_vectorwise_dequant writes it


# bitsandbytes logs a warning on import when its optional CPU kernel package is absent; a library must not print.
logging.getLogger("bitsandbytes").addHandler(logging.NullHandler())


def import_bnb() -> ModuleType:
    """bitsandbytes, imported on first use: only bnb folders need it, and importing it costs seconds (torch.compile)."""
    import bitsandbytes

    return bitsandbytes


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
        bnb = import_bnb()
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
            return import_bnb().matmul_4bit(x, self.weight.t(), bias=bias, quant_state=self.quant_state).to(x.dtype)
        if self.cpu_kernel and x.dtype == torch.bfloat16:
            if not getattr(self.quant_state, "packing_format_for_cpu", False):
                from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu

                self.weight, self.quant_state = _convert_weight_packed_for_cpu(self.weight, self.quant_state)
            return import_bnb().matmul_4bit(x, self.weight, bias=bias, quant_state=self.quant_state)
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
        bnb = import_bnb()
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
        return (import_bnb().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
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


def cpu_kernel_available() -> bool:
    """bitsandbytes' CPU 4-bit kernel needs AVX512-BF16 and its (private) weight repacking function."""
    bnb = import_bnb()
    try:
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu  # noqa: F401
    except ImportError:
        return False
    return bool(getattr(bnb.functional, "has_avx512bf16", lambda: False)())
