"""The dense `qwen3` decoder (Qwen3-0.6B and family): llama plus a per-head q/k RMSNorm before RoPE.

Numerics follow transformers' modeling_qwen3.py (which is modular on modeling_llama.py, as this file is on llama.py):
the q/k norms act on each head's vector before rotate-half RoPE, head_dim may differ from hidden / heads, and every
layer has a dense SwiGLU FFN. Qwen3 GGUFs are not Q/K-permuted. Module names are the Hugging Face names.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from . import llama
from .qwen3_moe import RMSNorm


class Attention(llama.Attention):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__(cfg, layer)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project_qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = super().project_qk(x)
        return self.q_norm(q), self.k_norm(k)


class DecoderLayer(llama.DecoderLayer):
    attention_cls = Attention


class Qwen3ForCausalLM(llama.LlamaForCausalLM):
    layer_cls = DecoderLayer
