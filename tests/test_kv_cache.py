"""KVCache protocol: update/advance/trim, the cache `make_cache` picks (native attention, or the float32 scratch of a
bf16 CPU cache without the native kernels), and its byte count."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from marco_local.layers.kv_cache import NativeKVCache, kv_cache_bytes, make_cache
from marco_local.models.kv_cache import KVCache, attend


def test_update_returns_everything_cached_and_trim_forgets():
    cache = KVCache(2, 2, 4, 8, dtype=torch.float32)
    a = torch.randn(1, 2, 3, 4)
    k, v = cache.update(1, a, -a)
    cache.advance(3)
    assert torch.equal(k, a) and torch.equal(v, -a)
    b = torch.randn(1, 2, 1, 4)
    k, _ = cache.update(1, b, b)
    assert torch.equal(k, torch.cat([a, b], dim=2))
    cache.trim(2)
    assert cache.offset == 1


def _model(dtype: torch.dtype) -> SimpleNamespace:
    """What `make_cache` reads of a model: its config's cache shape and its norms' dtype and device."""
    cfg = SimpleNamespace(num_hidden_layers=3, num_key_value_heads=2, head_dim=4)
    return SimpleNamespace(config=cfg, model=SimpleNamespace(norm=SimpleNamespace(weight=torch.ones(4, dtype=dtype))))


def test_bf16_cpu_cache_attends_through_a_float32_scratch(monkeypatch):
    """Without the native kernels (with them, there is no scratch: see the next test)."""
    from marco_local.kernels import native

    monkeypatch.setattr(native, "available", lambda: False)
    cache = make_cache(_model(torch.bfloat16), 16)
    assert type(cache) is KVCache
    x = torch.randn(1, 2, 5, 4).bfloat16()
    k, v = cache.update(2, x, x * 2)
    assert k.dtype == v.dtype == torch.float32 and k.shape == (1, 2, 5, 4)
    assert torch.equal(k, x.float()) and torch.equal(v, (x * 2).float())
    assert cache.keys.dtype == torch.bfloat16  # the cache itself stays bf16
    assert cache.nbytes == kv_cache_bytes(3, 2, 4, 16, torch.bfloat16, "cpu")
    f32 = make_cache(_model(torch.float32), 16)
    assert f32.float_keys is None and f32.nbytes == kv_cache_bytes(3, 2, 4, 16, torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_cpu_cache_with_native_kernels_has_no_scratch_and_attends_natively(dtype):
    from marco_local.kernels import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    cache = make_cache(_model(dtype), 16)
    assert isinstance(cache, NativeKVCache)
    x = torch.randn(1, 2, 5, 4).to(dtype)
    k, v = cache.update(2, x, x * 2)
    assert cache.float_keys is None and k.dtype == dtype and torch.equal(k, x) and torch.equal(v, x * 2)
    assert cache.nbytes == kv_cache_bytes(3, 2, 4, 16, dtype, "cpu") == 2 * 3 * 2 * 16 * 4 * 2
    q = torch.randn(1, 4, 1, 4)  # 4 query heads over 2 kv heads, one new token
    want = attend(q, k.float(), v.float(), 4)
    assert torch.allclose(cache.attend(q, k, v, 4), want, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_long_cache_takes_memory_only_for_the_positions_written():
    """A Nano-shaped bf16 cache for 4096 positions is 448 MiB; a chat that has used 100 of them should hold ~12 MiB of
    it (one 4 KiB page per 16 positions of each layer's 2 x 8 head rows), not all of it from the start."""

    def rss_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    before = rss_mib()
    cache = KVCache(28, 8, 128, 4096, dtype=torch.bfloat16)
    assert cache.keys.nbytes + cache.values.nbytes == 448 * 2**20  # (+ a float32 scratch without native kernels)
    allocated = rss_mib() - before
    k = torch.randn(1, 8, 100, 128).bfloat16()
    for layer in range(28):
        keys, values = cache.update(layer, k, -k)
        assert torch.equal(keys[0, :, -100:], k[0]) and torch.equal(values[0, :, -100:], -k[0])
    cache.advance(100)
    used = rss_mib() - before
    assert allocated < 16 and used < 48, (allocated, used)
