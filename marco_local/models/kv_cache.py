"""A preallocated key/value cache for all layers of a decoder.

Protocol: `update(layer, k, v)` writes the new keys/values at `offset` and returns views of everything cached so far
for that layer; the model calls `advance(T)` once per forward after all layers have written. `trim(n)` drops the last
n positions (a chat reusing a shared prefix), `reset()` empties it. The buffers are allocated once: decoding never
allocates cache memory.
"""

from __future__ import annotations

import torch

from ..errors import MarcoError
from ..kernels import native


def kv_cache_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device | str
) -> int:
    """What `KVCache` allocates for these arguments (batch 1), float32 scratch included: memory budgets use it."""
    per_layer = 2 * num_kv_heads * head_dim * max_len
    cpu_bf16 = torch.device(device).type == "cpu" and dtype == torch.bfloat16
    scratch = per_layer * 4 if cpu_bf16 and not native.available() else 0
    return num_layers * per_layer * dtype.itemsize + scratch


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
        # torch's CPU attention is fast only in float32. Casting a bf16 cache afresh each step allocates per layer,
        # and past ~2500 positions those allocations page-fault: Nano-shaped q4_k_m, 2 threads, 46 ms/token at
        # position 2048 but 205 ms at 3000. So a bf16 CPU cache is cast into one preallocated float32 scratch pair,
        # shared by the layers (they attend one after another).
        # With the native kernels there is no scratch: one new token reads the 16-bit cache directly (`update`
        # returns its views; `models.qwen3_moe.attend` hands them to `native.attend`), and a multi-token chunk
        # attends with torch's flash kernel (bf16, or float32 queries over a float16 cache: a GGUF on the kernels).
        self.float_keys = self.float_values = None
        cpu16 = torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)
        self.native_decode = cpu16 and native.available()
        if torch.device(device).type == "cpu" and dtype == torch.bfloat16 and not self.native_decode:
            scratch = (batch_size, num_kv_heads, max_len, head_dim)
            self.float_keys = torch.empty(scratch, dtype=torch.float32, device=device)
            self.float_values = torch.empty(scratch, dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        scratch = 0 if self.float_keys is None else self.float_keys.nbytes + self.float_values.nbytes
        return self.keys.nbytes + self.values.nbytes + scratch

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, H_kv, T, hd] for the new positions -> all cached [B, H_kv, offset + T, hd].

        On a bf16 CPU cache without the native kernels the returned views are the float32 scratch copies."""
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

    def advance(self, n: int) -> None:
        self.offset += n

    def trim(self, n: int) -> None:
        """Forget the last n positions (their slots are simply overwritten later)."""
        self.offset = max(0, self.offset - n)

    def reset(self) -> None:
        self.offset = 0
