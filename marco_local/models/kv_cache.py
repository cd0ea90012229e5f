"""A preallocated key/value cache for all layers of a decoder, and the attention over it.

Protocol: `update(layer, k, v)` writes the new keys/values at `offset` and returns views of everything cached so far
for that layer; `attend(q, k, v, start)` is the attention over those views; the model calls `advance(T)` once per
forward after all layers have written. `trim(n)` drops the last n positions (a chat reusing a shared prefix),
`reset()` empties it. The buffers are allocated once: decoding never allocates cache memory. A cache that reads its
keys with another kernel overrides `attend` (layers/kv_cache.py); the model only calls these methods.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MarcoError


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of T new queries at positions start.. over all cached keys [B, H_kv, start + T, hd] (GQA).

    On the CPU one bf16 query runs in float32: torch's bf16 attention for one query is several times slower. Several
    bf16 tokens stay bf16: torch's CPU flash kernel (float32 accumulation) is as fast as on float32 copies and needs
    no float32 copy of the cache per layer."""
    T = q.shape[2]
    if k.dtype != q.dtype and (T > 1 or q.dtype == torch.float32):
        k, v = k.to(q.dtype), v.to(q.dtype)  # e.g. float32 queries over a 16-bit cache (a GGUF on the native kernels)
    if T == 1:
        mask, causal = None, False
    elif start == 0:
        mask, causal = None, True
    else:  # new tokens after a cached prefix: token i sees the prefix and new tokens up to i
        rows = torch.arange(start, start + T, device=q.device)[:, None]
        mask, causal = torch.arange(start + T, device=q.device)[None, :] <= rows, False
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and (T == 1 or k.dtype == torch.float32):
        # one query, or a cache that hands out its float32 scratch
        out = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal, enable_gqa=True
        )
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        float_scratch: bool = False,
    ) -> None:
        # Uninitialised: attention reads positions below `offset` only, all written first. A large buffer then comes
        # from fresh mmap pages that take RAM when first written, so a chat with --ctx 4096 holds the memory of the
        # positions it used, not 448 MiB (Nano) from its first message.
        # On CUDA the buffers are zeroed: a captured decode step (cuda_graphs.py) attends over a fixed window under a
        # mask, and garbage there could be NaN, which a zero attention weight does not cancel.
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        alloc = torch.zeros if torch.device(device).type == "cuda" else torch.empty
        self.keys = alloc(shape, dtype=dtype, device=device)
        self.values = alloc(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.offset = 0
        # float_scratch (a bf16 CPU cache attended by torch): torch's CPU attention is fast only in float32, and
        # casting the cache afresh each step allocates per layer, allocations that page-fault past ~2500 positions.
        # So the cache is cast into one preallocated float32 scratch pair, shared by the layers (they attend one
        # after another).
        self.float_keys = self.float_values = None
        if float_scratch:
            scratch = (batch_size, num_kv_heads, max_len, head_dim)
            self.float_keys = torch.empty(scratch, dtype=torch.float32, device=device)
            self.float_values = torch.empty(scratch, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        scratch = 0 if self.float_keys is None else self.float_keys.nbytes + self.float_values.nbytes
        return self.keys.nbytes + self.values.nbytes + scratch

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, H_kv, T, hd] for the new positions -> all cached [B, H_kv, offset + T, hd].

        With float_scratch the returned views are the float32 scratch copies."""
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise MarcoError(
                f"context window full ({end} > {self.max_len} tokens)", hint="start a new conversation or raise --ctx"
            )
        self.keys[layer, :, :, self.offset : end] = k
        self.values[layer, :, :, self.offset : end] = v
        keys, values = self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        if self.float_keys is None:
            return keys, values
        return self.float_keys[:, :, :end].copy_(keys), self.float_values[:, :, :end].copy_(values)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """The new queries q [B, H, T, hd] over what `update` returned (see `attend`)."""
        return attend(q, k, v, start)

    def advance(self, n: int) -> None:
        self.offset += n

    def trim(self, n: int) -> None:
        """Forget the last n positions (their slots are simply overwritten later)."""
        self.offset = max(0, self.offset - n)

    def reset(self) -> None:
        self.offset = 0
