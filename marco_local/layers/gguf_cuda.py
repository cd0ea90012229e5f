"""A GGUF's experts on CUDA kept as the file's quantized blocks, dequantized for the experts a token uses.

Why: the GGUF kernels (kernels/native, layers/gguf.py) are CPU kernels, so on CUDA a GGUF was dequantized whole, and a
4-bit Marco-Nano file (5 GB) took 16 GB of VRAM. Experts are ~93% of its weights but a token uses 8 of 232 per layer:
kept quantized, the model fits a consumer card, and its experts can be offloaded with 3.5x more of them per byte of
VRAM budget than in bf16. Attention, embeddings and norms stay dense (they run on every token).

`StackedGGUFExperts` holds each projection's raw blocks stacked per expert ([E, bytes per expert], the file's layout)
and dequantizes the gathered experts with the codecs' block functions (quant/ggml_codecs.py), which are plain torch ops
on any device: a decode step has no host sync and CUDA graphs can hold it (decode/cuda_graphs.py), and offloading packs
each expert's rows like any stacked experts (offload/store.py). Numbers: the weights equal the dense path's
(`load.gguf._dense_modules`: the same float32 dequantization, then the same cast), so the logits match a dense load up
to the order of floating-point sums. A prompt on CUDA takes the padded batch with the experts dequantized a group at a
time (`Experts.forward_padded_gathered`). A decode token on CUDA, where triton is installed, dequantizes no matrix:
triton kernels (kernels/triton_gguf.py) multiply straight from the blocks (gate and up in one kernel) with float32
weights and sums, not the model dtype's, so a bf16 model's token differs from the dense path's by that rounding
(MARCO_GGUF_TRITON=0 keeps the dequantizing path, to compare).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.ggml_codecs import Codec, codec_for

from ..kernels import triton_gguf
from ..models.qwen3_moe import Experts

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class StackedGGUFExperts(Experts):
    graph_safe = True  # cuda_graphs.GraphedDecoder.capturable: no host-side path

    def __init__(
        self,
        raws: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        ggml_types: tuple[int, int, int],
        hidden: int,
        intermediate: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """`raws`: gate, up, down as uint8 [E, rows, row bytes] (views of the file); copied to `device` (on the CPU
        they stay views: an offload runtime packs them into its store)."""
        nn.Module.__init__(self)  # not Experts.__init__: it would allocate the float [E, out, in] stacks
        self.num_experts, self.dtype = raws[0].shape[0], dtype
        self.shapes = {"gate_proj": (intermediate, hidden), "up_proj": (intermediate, hidden)}
        self.shapes["down_proj"] = (hidden, intermediate)
        self.codecs: dict[str, Codec] = {}
        for name, raw, ggml_type in zip(PROJECTIONS, raws, ggml_types, strict=True):
            self.codecs[name] = codec_for(ggml_type)
            self.register_buffer(f"{name}_raw", raw.reshape(raw.shape[0], -1).to(device))

    @property
    def gathers(self) -> bool:
        return True

    def release_file_pages(self) -> None:
        """Once an offload store holds a copy of the experts (`offload.install`), hand the file pages they were read
        from back to the kernel: touched pages of a memory-mapped file count as resident, so RAM would otherwise hold
        the experts twice (Nano Q4_K_M: 4.8 GB) until the file is unmapped."""
        from .gguf import release_pages

        for name in PROJECTIONS:
            release_pages(getattr(self, f"{name}_raw"))

    def _dense(self, name: str, ids: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        """Experts `ids` (a tensor [N], or one id) of projection `name` as `dtype` [N, out, in] (or [out, in])."""
        raw, codec = getattr(self, f"{name}_raw")[ids], self.codecs[name]
        w = codec._dequantize_blocks(raw.reshape(-1, codec.type_size)).to(self.dtype).to(dtype)
        return w.view(*raw.shape[:-1], *self.shapes[name])

    def gathered_weights(self, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        return tuple(self._dense(name, ids, dtype) for name in PROJECTIONS)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (self._dense(name, e, x.dtype) for name in PROJECTIONS)
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def _one_token(self, x: torch.Tensor, ids: torch.Tensor | slice, weights: torch.Tensor) -> torch.Tensor:
        """x [1, D] through the experts `ids` [A] (or a slice of the stack: offload/direct.py's gather buffer),
        weighted [1, A]: with the kernels, the blocks are read where they lie (the raw buffers are looked up per call,
        so an offload runtime's rebound views are the ones read)."""
        if not (triton_gguf.runs_on(x.device) and all(triton_gguf.supports(c) for c in self.codecs.values())):
            return super()._one_token(x, ids, weights)
        gate_raw, up_raw, down_raw = (getattr(self, f"{name}_raw") for name in PROJECTIONS)
        if isinstance(ids, slice):  # the stack's rows in order: no id tensor (none to build inside a graph)
            gate_raw, up_raw, down_raw = gate_raw[ids], up_raw[ids], down_raw[ids]
            ids = None
        (I, D), gate, up = self.shapes["gate_proj"], self.codecs["gate_proj"], self.codecs["up_proj"]
        if gate.ggml_type == up.ggml_type:  # one kernel: silu(gate) * up
            h = triton_gguf.expert_matvec(gate_raw, gate, ids, x, I, D, up=up_raw)  # [A, I] float32
        else:
            g = triton_gguf.expert_matvec(gate_raw, gate, ids, x, I, D)
            h = F.silu(g) * triton_gguf.expert_matvec(up_raw, up, ids, x, I, D)
        y = triton_gguf.expert_matvec(down_raw, self.codecs["down_proj"], ids, h, D, I)  # [A, D], row a from h[a]
        return torch.mm(weights.to(y.dtype), y).to(x.dtype)  # the routing-weighted sum [1, D]

    def extra_repr(self) -> str:
        types = "/".join(self.codecs[name].name for name in PROJECTIONS)
        return f"experts={self.num_experts}, {types}, on {self.gate_proj_raw.device}"
