"""The dense `llama` decoder (SmolLM2, Llama) in plain PyTorch, with the qwen3_moe file's building blocks.

Numerics follow transformers' modeling_llama.py: RMSNorm in float32, rotate-half RoPE, no q/k norm, a SwiGLU FFN in
every layer (the dense FFN is what a MoE layer would be with one expert that every token uses with weight 1). Module
and parameter names are the Hugging Face names. llama.cpp's GGUF files store Q/K rows permuted for its interleaved
RoPE; the GGUF loader undoes that permutation, so this module sees the Hugging Face layout. No file I/O here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .kv_cache import KVCache
from .qwen3_moe import MLP, RMSNorm, RotaryEmbedding, rotate_half


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def project_qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, T, H, hd], k [B, T, H_kv, hd], before RoPE (qwen3 adds its q/k norms here)."""
        B, T, _ = x.shape
        return self.q_proj(x).view(B, T, self.n_heads, self.head_dim), self.k_proj(x).view(
            B, T, self.n_kv, self.head_dim
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape  # B batch, T new tokens
        q, k = self.project_qk(x)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        start = cache.offset
        k, v = cache.update(self.layer, k, v)  # [B, H_kv, start + T, hd]
        out = cache.attend(q, k, v, start)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class DecoderLayer(nn.Module):
    attention_cls: type[nn.Module] = Attention

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """What the checkpoint calls `model.*`: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, layer_cls: type[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    layer_cls: type[nn.Module] = DecoderLayer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg, self.layer_cls)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        # the KV cache's dtype where it is not the norms' (a GGUF on the CPU: float32 norms, a bf16 cache)
        self.kv_dtype: torch.dtype | None = None

    def forward(self, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """tokens [B, T] (positions cache.offset ...) -> logits [B, T, V], or [B, 1, V] with last_only."""
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary(cache.offset, tokens.shape[1], x.dtype, x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)
        cache.advance(tokens.shape[1])
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))
