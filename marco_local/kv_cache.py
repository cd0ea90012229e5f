"""A preallocated key/value cache for all layers of a decoder.

Protocol: `update(layer, k, v)` writes the new keys/values at `offset` and returns views of everything cached so far
for that layer; the model calls `advance(T)` once per forward after all layers have written. `trim(n)` drops the last
n positions (a chat reusing a shared prefix), `reset()` empties it. The buffers are allocated once: decoding never
allocates cache memory.
"""

from __future__ import annotations

import torch

from .errors import MarcoError


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
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, H_kv, T, hd] for the new positions -> all cached [B, H_kv, offset + T, hd]."""
        end = self.offset + k.shape[2]
        if end > self.max_len:
            raise MarcoError(
                f"context window full ({end} > {self.max_len} tokens)", hint="start a new conversation or raise --ctx"
            )
        self.keys[layer, :, :, self.offset : end] = k
        self.values[layer, :, :, self.offset : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.offset += n

    def trim(self, n: int) -> None:
        """Forget the last n positions (their slots are simply overwritten later)."""
        self.offset = max(0, self.offset - n)

    def reset(self) -> None:
        self.offset = 0
