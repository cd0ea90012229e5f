"""The qwen3_moe decoder (Marco-Nano, Marco-Mini) in plain PyTorch.

Numerics follow transformers' modeling_qwen3_moe.py: RMSNorm in float32, per-head q/k RMSNorm before rotate-half
RoPE, softmax router in float32 then top-k (renormalised when `norm_topk_prob`), SwiGLU experts. Module and parameter
names are the Hugging Face checkpoint names, except that the experts of a layer are stacked into `[E, out, in]`
tensors (see `Experts`). No file I/O, no quantization imports: loaders build this module and fill its weights, and
quantized or offloaded variants replace `nn.Linear`s and `Experts` with modules of the same call signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.weight.dtype == x.dtype:  # one fused kernel there, not eight (the decode step counts
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # kernels); rounds once, not twice
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotate-half (NEOX) RoPE, computed in float32 like transformers and grown on demand."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        arange = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu")  # real even when built on "meta"
        self.inv_freq = 1.0 / (theta ** (arange / head_dim))
        self.position_scale = 1.0
        if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
            self.position_scale = 1.0 / float(scaling["factor"])
        self._cos = self._sin = torch.empty(0, device="cpu")

    def forward(self, start: int, length: int, dtype: torch.dtype, device: torch.device):
        end = start + length
        if self._cos.shape[0] < end or self._cos.device != device:
            size = max(256, 1 << (end - 1).bit_length())
            positions = torch.arange(size, dtype=torch.float, device=device) * self.position_scale
            freqs = positions[:, None] * self.inv_freq.to(device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos[start:end].to(dtype), self._sin[start:end].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sin table with its first half negated: rotate_half's negation folded in, for `rope_signed`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in three kernels instead of five (rotate_half is a roll by half a head and a
    negation, the negation being in the table): the decode step is bound by its kernel count. The same products; the
    sum may round once instead of twice (addcmul can fuse the multiply-add)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        # set by fuse_qkv: plain tensors, not parameters (q/k/v_proj's parameters are views of them: counted once)
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None
        self.qk_norm_weight: torch.Tensor | None = None  # [H + H_kv, hd]: q_norm's weight per q head, then k_norm's

    def fuse_qkv(self) -> bool:
        """One projection for q, k and v (the decode step is bound by its kernel count): q/k/v_proj's weights become
        views of one tensor that holds the three (no extra memory once the old ones are freed, but for the per-head
        norm table `qk_norm_weight`). Only plain dense linears of one dtype and device fuse; True when fused."""
        linears = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv_weight is not None:
            return True
        if any(type(m) is not nn.Linear for m in linears):
            return False
        if len({(m.weight.dtype, m.weight.device) for m in linears}) > 1:
            return False
        self.qkv_weight = torch.cat([m.weight.detach() for m in linears])
        norms = (self.q_norm.weight.detach(), self.k_norm.weight.detach())
        self.qk_norm_weight = torch.cat([norms[0].expand(self.n_heads, -1), norms[1].expand(self.n_kv, -1)])
        if self.q_proj.bias is not None:
            self.qkv_bias = torch.cat([m.bias.detach() for m in linears])
        start = 0
        for m in linears:
            rows = slice(start, start + m.out_features)
            m.weight = nn.Parameter(self.qkv_weight[rows], requires_grad=False)
            if self.qkv_bias is not None:
                m.bias = nn.Parameter(self.qkv_bias[rows], requires_grad=False)
            start += m.out_features
        return True

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, D] -> q [B, H, T, hd], k and v [B, H_kv, T, hd]; q and k normed, not yet rotated."""
        B, T, _ = x.shape  # B batch, T new tokens
        if self.qkv_weight is not None:
            sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).split(sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        return q, k, v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, D] -> q [B, H, T, hd], k and v [B, H_kv, T, hd]; q and k normed and rotated."""
        q, k, v = self.project_qkv(x)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        start = cache.offset
        k, v = cache.update(self.layer, k, v)  # [B, H_kv, start + T, hd]
        out = cache.attend(q, k, v, start)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def forward_at(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        cache: KVCache,
        pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """One token (x [1, 1, D]) at the position held in the device tensor `pos` [1]: its key and value are
        written there, and it attends over the first W cache positions under the additive `mask` [1, 1, 1, W] (0 at
        positions <= pos, -inf beyond). Shapes are fixed by W and nothing is read back to the host: the form a CUDA
        graph captures (marco_local/decode/cuda_graphs.py). RoPE takes the sign-folded sin table (`rope_signed`). The
        G = H / H_kv query heads of a key head are attention's G queries over that head's keys, so the step is one
        plain attention call (no GQA expansion, which would copy the window). Same numbers as `forward` up to kernel
        rounding; `cache.offset` is the caller's to advance."""
        B, T, _ = x.shape
        H, H_kv = self.n_heads, self.n_kv
        if self.qkv_weight is not None and self.q_norm.eps == self.k_norm.eps:
            # fused (fuse_qkv): q and k heads are adjacent, so they are normed and rotated together (the per-head
            # norm weights applied after the norm, as RMSNorm does on the CPU): 5 kernels instead of 8
            heads = F.linear(x, self.qkv_weight, self.qkv_bias).view(B, T, H + 2 * H_kv, self.head_dim)
            qk = F.rms_norm(heads[:, :, : H + H_kv], (self.head_dim,), eps=self.q_norm.eps) * self.qk_norm_weight
            qk = rope_signed(qk, cos, sin_signed)  # T = 1: cos/sin [1, hd] broadcast over the heads
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            v = heads[:, :, H + H_kv :].transpose(1, 2)
        else:
            q, k, v = self.project_qkv(x)
            q, k = rope_signed(q, cos, sin_signed), rope_signed(k, cos, sin_signed)
        keys, values = cache.keys[self.layer], cache.values[self.layer]  # [B, H_kv, max_len, hd]
        keys.index_copy_(2, pos, k)
        values.index_copy_(2, pos, v)
        W = mask.shape[-1]
        q = q.reshape(B, self.n_kv, self.n_heads // self.n_kv * T, self.head_dim)  # T = 1: heads as queries
        out = F.scaled_dot_product_attention(q, keys[:, :, :W], values[:, :, :W], attn_mask=mask)
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """Dense SwiGLU feed-forward, for layers listed in `mlp_only_layers`."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


PADDED_LIMIT = 4  # Experts.forward_padded: at most this many padded rows per real (token, expert) pair
PADDED_GROUP = 16  # forward_padded_gathered: experts dequantized at once (Nano: ~75 MB of float32 temporaries)


class Experts(nn.Module):
    """All experts of one layer, stacked: gate/up [E, I, D], down [E, D, I].

    `forward` groups the routed (token, expert) pairs by expert and runs each used expert once on its tokens, so the
    Python loop is over used experts, never over all E. Subclasses (quantized, offloaded) override `expert_forward`
    and keep the routing. # T tokens, E experts, A active per token, D hidden, I expert width
    """

    gate_up: torch.Tensor | None = None  # set by fuse_gate_up: [E, 2I, D], gate_proj and up_proj its views

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def fuse_gate_up(self) -> bool:
        """One stack for gate and up (the decode step is bound by its kernel count: one gather and one product for
        both): gate_proj and up_proj become views of it, so no memory is added once the old stacks are freed. Plain
        resident experts only (not subclasses, not offloaded slots); True when fused."""
        if self.gate_up is not None:
            return True
        if type(self) is not Experts:
            return False
        I = self.gate_proj.shape[1]
        self.gate_up = torch.cat([self.gate_proj.detach(), self.up_proj.detach()], dim=1)
        self.gate_proj = nn.Parameter(self.gate_up[:, :I], requires_grad=False)
        self.up_proj = nn.Parameter(self.gate_up[:, I:], requires_grad=False)
        return True

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x [n, D] -> [n, D] through expert e."""
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":  # the grouped loop is host-bound on a GPU
            if x.shape[0] == 1 and self.gathers:
                return self.forward_gathered(x, idx, weights)
            if x.shape[0] > 1 and self.stacked:
                return self.forward_padded(x, idx, weights)
            if x.shape[0] > 1 and self.gathers:
                return self.forward_padded_gathered(x, idx, weights)
        return self.forward_grouped(x, idx, weights)

    def forward_grouped(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        A = idx.shape[1]  # x [T, D], idx/weights [T, A]
        flat = idx.reshape(-1)  # [T*A]
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        flat_weights = weights.reshape(-1, 1)
        out = torch.zeros_like(x)
        start = 0
        for e, n in zip(experts.tolist(), counts.tolist(), strict=True):
            pairs = order[start : start + n]
            tokens = pairs // A
            y = self.expert_forward(e, x[tokens]) * flat_weights[pairs]
            out.index_add_(0, tokens, y.to(out.dtype))
            start += n
        return out

    @property
    def stacked(self) -> bool:
        """True while the experts are the [E, out, in] stacks (a subclass that replaces expert_forward is not)."""
        return type(self).expert_forward is Experts.expert_forward

    @property
    def gathers(self) -> bool:
        """True when `gathered_weights` can fetch experts by a device tensor of ids (forward_gathered works)."""
        return self.stacked

    def gathered_weights(self, ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """gate, up [N, I, D] and down [N, D, I] of the experts `ids` [N], in `dtype`."""
        return self.gate_proj[ids].to(dtype), self.up_proj[ids].to(dtype), self.down_proj[ids].to(dtype)

    def forward_gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' weights gathered by id and applied as batched products: no host sync (the grouped
        loop reads the routing back to the host once per layer), so a CUDA decode step queues without waiting and
        can be captured in a CUDA graph. It copies T*A experts' weights, so it suits a token or a few, not a
        prefill."""
        T, A = idx.shape
        flat = idx.reshape(-1)  # [T*A]
        if T == 1:  # decode: fewest kernels (the step is bound by their count), no copy of x per expert
            return self._one_token(x, flat, weights)
        gate_w, up_w, down_w = self.gathered_weights(flat, x.dtype)
        xs = x.unsqueeze(1).expand(T, A, x.shape[1]).reshape(T * A, -1, 1)  # [T*A, D, 1]
        gate = torch.bmm(gate_w, xs)  # [T*A, I, 1]
        up = torch.bmm(up_w, xs)
        y = torch.bmm(down_w, F.silu(gate) * up).view(T, A, -1)  # [T, A, D]
        return (y * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1).to(x.dtype)

    def forward_all(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token through every expert of this module in order, weighted by `weights` [1, N]: for a module whose
        stacks hold exactly a token's experts (offload/direct.py's gather buffer), with no gather to copy them again."""
        return self._one_token(x, slice(None), weights)

    def _one_token(self, x: torch.Tensor, ids: torch.Tensor | slice, weights: torch.Tensor) -> torch.Tensor:
        """x [1, D] through the experts `ids` (a tensor [A], or a slice: views, no copy), weighted [1, A]."""
        A = weights.shape[-1]
        if self.gate_up is not None:  # fused: one gather and one product for gate and up
            I = self.gate_proj.shape[1]
            gate_up = torch.matmul(self.gate_up[ids].to(x.dtype), x.view(-1, 1))  # [A, 2I, 1]
            h = F.silu(gate_up[:, :I]) * gate_up[:, I:]
            down_w = self.down_proj[ids].to(x.dtype)
        else:
            gate_w, up_w, down_w = self.gathered_weights(ids, x.dtype)
            gate = torch.matmul(gate_w, x.view(-1, 1))  # [A, I, 1]: one matrix-vector product over A*I rows
            h = F.silu(gate) * torch.matmul(up_w, x.view(-1, 1))
        y = torch.bmm(down_w, h).view(A, -1)  # [A, D]
        return torch.mm(weights.to(y.dtype), y).to(x.dtype)  # the routing-weighted sum [1, D]

    def forward_padded(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Several tokens: each expert's tokens gathered into a row of an [E, C, D] batch (C = the most tokens any
        expert got, the rest zero padding), all experts in three batched products, results added back per token.
        One host read per layer (C) where the grouped loop launches ~10 kernels per used expert; every expert's
        weights are read once, as a prefill chunk uses nearly all of them anyway. A routing so skewed that the
        batch would exceed PADDED_LIMIT times the real (token, expert) pairs takes the grouped loop instead."""

        def experts(batch: torch.Tensor) -> torch.Tensor:  # [E, C, D] -> [E, C, D]
            h = F.silu(torch.bmm(batch, self.gate_proj.transpose(1, 2))) * torch.bmm(
                batch, self.up_proj.transpose(1, 2)
            )
            return torch.bmm(h, self.down_proj.transpose(1, 2))

        return self._padded(x, idx, weights, experts)

    def forward_padded_gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`forward_padded` for experts that are gathered, not stacked (quantized ones: a gather dequantizes): the
        batch's rows go through PADDED_GROUP experts at a time, each group's weights gathered once. Bounded
        temporaries (the dequantized group), a few dozen kernels per group where the grouped loop takes ~50 per
        expert."""

        def experts(batch: torch.Tensor) -> torch.Tensor:  # [E, C, D] -> [E, C, D]
            y = torch.empty_like(batch)
            for start in range(0, self.num_experts, PADDED_GROUP):
                ids = torch.arange(start, min(start + PADDED_GROUP, self.num_experts), device=batch.device)
                gate_w, up_w, down_w = self.gathered_weights(ids, batch.dtype)
                rows = batch[start : start + PADDED_GROUP]
                h = F.silu(torch.bmm(rows, gate_w.transpose(1, 2))) * torch.bmm(rows, up_w.transpose(1, 2))
                y[start : start + PADDED_GROUP] = torch.bmm(h, down_w.transpose(1, 2))
            return y

        return self._padded(x, idx, weights, experts)

    def _padded(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts) -> torch.Tensor:
        """The padded batch of the routed (token, expert) pairs, `experts` applied to it, results added per token."""
        T, A = idx.shape
        E, D = self.num_experts, x.shape[1]
        flat = idx.reshape(-1)  # [T*A]
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        expert_of = flat[order]
        counts = torch.bincount(flat, minlength=E)
        C = int(counts.max())
        if E * C > PADDED_LIMIT * T * A:  # a skewed routing: the padding would outweigh the work (and memory)
            return self.forward_grouped(x, idx, weights)
        rank = torch.arange(T * A, device=x.device) - (torch.cumsum(counts, 0) - counts)[expert_of]  # within group
        tokens = order // A
        batch = x.new_zeros(E, C, D)
        batch[expert_of, rank] = x[tokens]
        y = experts(batch)[expert_of, rank]  # [T*A, D], pairs in `order`
        out = torch.zeros_like(x)
        out.index_add_(0, tokens, (y * weights.reshape(-1, 1)[order]).to(out.dtype))
        return out


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router, kept in high precision
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, A], weights [T, A] in x's dtype)."""
        gate = self.gate.weight  # may be float32 in a bf16 model (a GGUF's router): computed in its dtype
        logits = F.linear(x.to(gate.dtype), gate)  # [T, E]
        if self.norm_topk_prob:  # softmax, top-k, renormalise = top-k of the logits, softmax over those k
            top, idx = torch.topk(logits, self.top_k, dim=-1)  # [T, A] (three kernels fewer per decode step)
            return idx, F.softmax(top, dim=-1, dtype=torch.float).to(x.dtype)
        weights, idx = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
        return idx, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        idx, weights = self.route(flat)
        return self.experts(flat, idx, weights).reshape(B, T, D)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = SparseMoeBlock(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_at(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        cache: KVCache,
        pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """One token at a device-side position (Attention.forward_at), then the layer's FFN."""
        x = x + self.self_attn.forward_at(self.input_layernorm(x), cos, sin_signed, cache, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    """What the checkpoint calls `model.*`: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderBody(cfg)
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
