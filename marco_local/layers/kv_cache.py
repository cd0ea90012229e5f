"""The KV cache a model gets: on the CPU with the native kernels, one whose single-token attention runs in C over
the 16-bit cache as it lies (no float32 copy of the cache, none per step); else the plain cache of models/."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import native
from ..models.kv_cache import KVCache

NATIVE_KV = (torch.bfloat16, torch.float16)  # the cache dtypes `native.attend` reads


class NativeKVCache(KVCache):
    """A CPU cache whose one-token attention is `native.attend`; several tokens go through torch as usual."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        if q.shape[2] == 1 and q.shape[0] == 1 and k.dtype in NATIVE_KV:
            B, H, _, hd = q.shape
            out = native.attend(q.reshape(H, hd).float(), k[0], v[0], hd**-0.5)
            return out.view(B, H, 1, hd).to(q.dtype)
        return super().attend(q, k, v, start)


def _kind(dtype: torch.dtype, device: torch.device | str) -> tuple[bool, bool]:
    """(native attention, float32 scratch) for a cache of this dtype on this device."""
    cpu = torch.device(device).type == "cpu"
    uses_native = cpu and dtype in NATIVE_KV and native.available()
    return uses_native, cpu and dtype == torch.bfloat16 and not uses_native


def kv_cache_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device | str
) -> int:
    """What `make_cache` allocates for these arguments (batch 1), float32 scratch included: memory budgets use it."""
    per_layer = 2 * num_kv_heads * head_dim * max_len
    scratch = per_layer * 4 if _kind(dtype, device)[1] else 0
    return num_layers * per_layer * dtype.itemsize + scratch


def make_cache(model: nn.Module, max_len: int, batch_size: int = 1) -> KVCache:
    """A cache for `max_len` positions of `model`, in its cache dtype (`kv_dtype`, else its norms'), on its device."""
    cfg, p = model.config, model.model.norm.weight
    dtype = getattr(model, "kv_dtype", None) or p.dtype
    uses_native, scratch = _kind(dtype, p.device)
    shape = (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_len, batch_size, dtype, p.device)
    if uses_native:
        return NativeKVCache(*shape)
    return KVCache(*shape, float_scratch=scratch)
