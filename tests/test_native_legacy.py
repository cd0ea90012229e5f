"""The vectorised native kernels for the 32-weight ggml types (kernels/native/dot_legacy.c) against exact sums.

The kernels quantize the activations to int8 blocks of 32 (act_quant.c) and dot them with the weight blocks. The
activation quantization is reproduced here in float32 torch ops (d = amax / 127, q = round-half-to-even(x * (1 / d)),
as lrintf does), so the kernel's result can be checked against the float64 sum of dequantized weights times d * q.
"""

from __future__ import annotations

import pytest
import torch

from marco_local.kernels import native
from quant.ggml_codecs import codec_for

if not native.available():
    pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}", allow_module_level=True)
pytestmark = pytest.mark.usefixtures("native_tier")  # every test once per kernel tier this CPU runs

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
ROWS = 24
# weight = d * u + c with u the block's unsigned integer and c = -OFFSET * d (Q4_0, Q5_0; Q8_0 as the VNNI kernel
# reads it, u = q + 128) or the block's m (Q4_1, Q5_1)
OFFSET = {"Q4_0": 8.0, "Q5_0": 16.0, "Q8_0": 128.0}


def quantize_act(x: torch.Tensor) -> torch.Tensor:
    """float32 [M, K] -> the activations the kernels see, d * q per element, float64 [M, K]."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv)  # half to even, like lrintf in the default rounding mode
    assert q.abs().max() <= 127
    return (d.double() * q.double()).reshape(x.shape)


def error_scale(name: str, raw: torch.Tensor, wd: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """[M, N]: sum over i of (|w_i| + |c_i|) * |a_i|, the size of the terms the kernels add in float32.

    Float32 sums of K products round at ~1e-7 of the magnitudes they add, and the kernels add d * u * a and c * a
    separately (the constants go through the activation block's d * sum(q)): a row whose terms cancel has a small
    result, so errors are measured relative to this, not to the result."""
    c = codec_for(name)
    blocks = raw.reshape(raw.shape[0], -1, c.type_size)
    halves = blocks[..., :4].contiguous().view(torch.float16).double()  # d, and m for Q4_1 / Q5_1
    const = halves[..., 1] if name not in OFFSET else halves[..., 0] * OFFSET[name]
    mag = wd.abs() + const.abs().repeat_interleave(32, dim=1)  # >= |d * u|, |c|
    return xa.abs() @ mag.T + 1e-30


def make_weights(kind: str, k: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        w = torch.randn(ROWS, k, generator=gen)
    else:  # heavy tails (student-t, 2 degrees of freedom) and some positive-only rows
        z = torch.randn(ROWS, k, generator=gen)
        chi2 = torch.randn(ROWS, k, 2, generator=gen).square().sum(-1)
        w = z / (chi2 / 2).sqrt() * 0.02
        w[1::4] = w[1::4].abs() + 0.01
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    w[2] = 0.0  # an all-zero row
    return w


def make_acts(kind: str, k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(3, k, generator=gen)
    if kind != "normal":
        x[0] = x[0].abs() * 0.1  # all positive: the blocks' additive constants do not cancel
        x[1, :: max(1, k // 7)] *= 300.0  # outliers
    x[2, 32:64] = 0.0  # an all-zero activation block (d = 0, q = 0)
    return x


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("k", [32, 384, 1024])
def test_matches_exact_sum_and_reference(name: str, kind: str, k: int) -> None:
    gen = torch.Generator().manual_seed(TYPES.index(name) * 10000 + k * 2 + (kind == "heavy"))
    c = codec_for(name)
    raw = c.quantize(make_weights(kind, k, gen)).reshape(ROWS, -1)
    wd = c.dequantize(raw).reshape(ROWS, k).double()
    x = make_acts(kind, k, gen)
    got = native.matmul(x, raw, c.ggml_type, k).double()
    xa = quantize_act(x)
    exact = xa @ wd.T
    # Seen (relative to error_scale): <= 2e-7 against the exact sum, <= 2e-7 against the plain-C kernel.
    scale = error_scale(name, raw, wd, xa)
    err = ((got - exact).abs() / scale).max().item()
    assert err < 1e-5, f"{name} {kind} k={k}: relative error {err:.2e} against the exact sum"
    ref = torch.tensor([[native.dot_reference(raw[r], c.ggml_type, x[i]) for r in range(ROWS)] for i in range(3)])
    err_ref = ((got - ref.double()).abs() / scale).max().item()
    assert err_ref < 1e-6, f"{name} {kind} k={k}: relative difference {err_ref:.2e} from the plain-C kernel"
    assert got[:, 2].eq(0).all()  # the all-zero row


def test_strided_rows_and_odd_block_counts() -> None:
    """Rows `row_stride` apart inside a wider buffer, and block counts that are not a multiple of the 4-block step."""
    gen = torch.Generator().manual_seed(3)
    for name in TYPES:
        c = codec_for(name)
        for k in (64, 96, 224):
            raw = c.quantize(torch.randn(ROWS, k, generator=gen)).reshape(ROWS, -1)
            wide = torch.zeros(ROWS, raw.shape[1] + 13, dtype=torch.uint8)
            wide[:, 5 : 5 + raw.shape[1]] = raw
            view = wide[:, 5 : 5 + raw.shape[1]]
            x = torch.randn(2, k, generator=gen)
            got = native.matmul(x, view, c.ggml_type, k).double()
            xa, wd = quantize_act(x), c.dequantize(raw).reshape(ROWS, k).double()
            scale = error_scale(name, raw, wd, xa)
            assert ((got - xa @ wd.T).abs() / scale).max().item() < 1e-5, (name, k)


def _random_blocks(name: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random bytes in every field (all quant and fifth-bit patterns), sane float16 d (and m for Q4_1 / Q5_1)."""
    c = codec_for(name)
    nh = 1 if name in OFFSET else 2  # halves at the block's start
    blocks = torch.randint(0, 256, (n, k // 32, c.type_size), generator=gen, dtype=torch.uint8)
    halves = (torch.rand(n, k // 32, nh, generator=gen) * 0.01 + 1e-4) * (
        torch.randint(0, 2, (n, k // 32, nh), generator=gen) * 2 - 1
    )
    blocks[..., 0 : 2 * nh] = halves.to(torch.float16).view(torch.uint8).reshape(n, k // 32, 2 * nh)
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("k", [1024, 224])
def test_token_groups_match_single_tokens(name: str, k: int) -> None:
    """With M >= 4 tokens run in groups of 4 (dot_q8_0_x4 etc., over tiles of rows, on activations packed by
    pack_act32x4), the rest one by one: every token's outputs must be bit-identical to a call with that token alone (the
    single-token kernel). k = 224: 7 blocks, so the kernels' 4-block steps leave a tail of 3 blocks."""
    gen = torch.Generator().manual_seed(11 + k + TYPES.index(name))
    c = codec_for(name)
    nh = 1 if name in OFFSET else 2
    n = 61  # several row tiles (~16 KB of weights each), the last one partial
    quantized = c.quantize(make_weights("heavy", k, gen)).reshape(ROWS, -1)
    large = c.quantize(torch.randn(8, k, generator=gen) * 3000.0).reshape(8, -1)  # large d
    raw = torch.cat([_random_blocks(name, n - ROWS - 8, k, gen), quantized, large])
    blocks = raw.view(n, k // 32, c.type_size)
    blocks[3, :, 0:2] = 0  # d = 0 (random quants)
    blocks[4, 1, 0:2] = torch.tensor([65504.0], dtype=torch.float16).view(torch.uint8)  # the largest half
    blocks[5, -1, 2 * nh :] = 0xFF  # every quant bit set
    wide = torch.zeros(n, raw.shape[1] + 5, dtype=torch.uint8)  # rows strided, as slices of a larger matrix are
    wide[:, 2 : 2 + raw.shape[1]] = raw
    raw = wide[:, 2 : 2 + raw.shape[1]]
    for m in (1, 3, 4, 5, 9, 45):
        x = make_acts("heavy", k, gen).repeat(m // 3 + 1, 1)[:m] * (1 + torch.rand(m, k, generator=gen))
        x[m // 2, : k // 2] = 0.0  # zero activation blocks inside a group
        got = native.matmul(x, raw, c.ggml_type, k)
        single = torch.cat([native.matmul(x[i : i + 1], raw, c.ggml_type, k) for i in range(m)])
        assert got.dtype == torch.float32 and torch.equal(got, single), f"{name} k={k} M={m}"
