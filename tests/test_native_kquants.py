"""The vectorised native kernels for the K-quants (marco_local/kernels/native/dot_kquants.c) against exact sums.

The kernels quantize the activations to int8 blocks of 256 (act_quant.c: d = amax / 127, q = lrintf(x * (1 / d)),
bsums = sums of 16) and dot them with the Q4_K / Q5_K / Q6_K super-blocks in integers, one float scale per
super-block. The activation quantization is reproduced here exactly (float32 rounding of d, of 1 / d and of x * (1 / d);
round half to even), so the kernels' result can be checked against the float64 sum of dequantized weights times d * q.
"""

from __future__ import annotations

import pytest
import torch

from marco_local.kernels import native
from quant.ggml_codecs import codec_for

if not native.available():
    pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}", allow_module_level=True)
pytestmark = pytest.mark.usefixtures("native_tier")  # every test once per kernel tier this CPU runs

TYPES = ["Q4_K", "Q5_K", "Q6_K"]
ROWS = 12
TOKENS = 3


def quantize_act(x: torch.Tensor) -> torch.Tensor:
    """float32 [M, K] -> the activations the kernels see, d * q per element, float64 [M, K]."""
    blocks = x.float().reshape(x.shape[0], -1, 256)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    d = (amax.double() / 127.0).float()  # float32 amax / 127.0f, correctly rounded (float64 then float32 is exact)
    inv = torch.where(d != 0, (1.0 / d.double()).float(), torch.zeros_like(d))  # 1.0f / d
    q = torch.round(blocks * inv)  # float32 product, half to even like lrintf in the default rounding mode
    assert q.abs().max() <= 127
    return (d.double() * q.double()).reshape(x.shape)


def _k4_mins(scales: torch.Tensor) -> torch.Tensor:
    """Packed scales[12] of Q4_K / Q5_K blocks [..., 12] (uint8) -> the 8 six-bit mins [..., 8] (k4_scale_min)."""
    s = scales.long()
    lo = s[..., 4:8] & 63
    hi = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return torch.cat([lo, hi], dim=-1)


def error_scale(name: str, raw: torch.Tensor, wd: torch.Tensor, xa: torch.Tensor) -> torch.Tensor:
    """[M, N]: sum over i of the sizes of the terms the kernels add for weight i, times |a_i|.

    The kernels sum d * sc * q * a and the mins (dmin * m * a, Q4_K / Q5_K) or the -32 offset (32 * d * sc * a, Q6_K)
    separately, exactly in integers within a super-block, and round in float32 once per super-block and lane: a row
    whose terms cancel has a small result, so errors are measured relative to this, not to the result."""
    c = codec_for(name)
    n, k = wd.shape
    blocks = raw.reshape(n, -1, c.type_size)
    if name == "Q6_K":
        d = blocks[..., 208:210].contiguous().view(torch.float16).double()  # [n, nb, 1]
        sc = blocks[..., 192:208].contiguous().view(torch.int8).double()  # [n, nb, 16]
        mag = (d * sc).abs().repeat_interleave(16, dim=-1).reshape(n, k) * 95.0  # |d sc| (q6 + 32), q6 <= 63
    else:
        dmin = blocks[..., 2:4].contiguous().view(torch.float16).double()
        m = (dmin * _k4_mins(blocks[..., 4:16]).double()).repeat_interleave(32, dim=-1).reshape(n, k)
        mag = (wd + m).abs() + m.abs()  # |d sc q| + |dmin m|
    return xa.abs() @ mag.T + 1e-30


def make_weights(kind: str, k: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "normal":
        w = torch.randn(ROWS, k, generator=gen)
    else:  # heavy tails (student-t, 2 degrees of freedom), some positive-only rows
        z = torch.randn(ROWS, k, generator=gen)
        chi2 = torch.randn(ROWS, k, 2, generator=gen).square().sum(-1)
        w = z / (chi2 / 2).sqrt() * 0.02
        w[1::4] = w[1::4].abs() + 0.01
    w[0, k - 256 :] = 0.0  # an all-zero super-block
    w[2] = 0.0  # an all-zero row
    return w


def make_acts(kind: str, k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(TOKENS, k, generator=gen)
    if kind != "normal":
        x[0] = x[0].abs() * 0.1  # all positive: the mins / the -32 offset do not cancel
        x[1, :: max(1, k // 7)] *= 300.0  # outliers
    x[2, :256] = 0.0  # an all-zero activation block (d = 0, q = 0)
    return x


def check(name: str, raw: torch.Tensor, x: torch.Tensor, what: str) -> None:
    c = codec_for(name)
    n, k = raw.shape[0], x.shape[1]
    wd = c.dequantize(raw).reshape(n, k).double()
    got = native.matmul(x, raw, c.ggml_type, k).double()
    xa = quantize_act(x)
    scale = error_scale(name, raw, wd, xa)
    exact = xa @ wd.T
    # Seen (relative to error_scale): <= 1e-7 against the exact sum, <= 2e-7 against the plain-C kernel (which rounds
    # as much); norm over the output: <= 4e-7 against the exact sum.
    err = ((got - exact).abs() / scale).max().item()
    assert err < 1e-5, f"{what}: relative error {err:.2e} against the exact sum"
    if exact.norm() > 0:
        rel = ((got - exact).norm() / exact.norm()).item()
        assert rel < 1e-5, f"{what}: relative error {rel:.2e} (norm) against the exact sum"
    ref = torch.tensor([[native.dot_reference(raw[r], c.ggml_type, x[i]) for r in range(n)] for i in range(len(x))])
    err_ref = ((got - ref.double()).abs() / scale).max().item()
    assert err_ref < 1e-6, f"{what}: relative difference {err_ref:.2e} from the plain-C kernel"


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("k", [256, 1024, 2048])
def test_matches_exact_sum_and_reference(name: str, kind: str, k: int) -> None:
    gen = torch.Generator().manual_seed(TYPES.index(name) * 10000 + k * 2 + (kind == "heavy"))
    c = codec_for(name)
    raw = c.quantize(make_weights(kind, k, gen)).reshape(ROWS, -1)
    x = make_acts(kind, k, gen)
    check(name, raw, x, f"{name} {kind} k={k}")
    assert native.matmul(x, raw, c.ggml_type, k)[:, 2].eq(0).all()  # the all-zero row


def _random_blocks(name: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Random bytes in every field (all scale, min and quant bit patterns), sane float16 d / dmin."""
    c = codec_for(name)
    blocks = torch.randint(0, 256, (n, k // 256, c.type_size), generator=gen, dtype=torch.uint8)
    halves = (torch.rand(n, k // 256, 2, generator=gen) * 0.01 + 1e-4) * (
        torch.randint(0, 2, (n, k // 256, 2), generator=gen) * 2 - 1
    )
    hb = halves.to(torch.float16).view(torch.uint8).reshape(n, k // 256, 4)
    if name == "Q6_K":
        blocks[..., 208:210] = hb[..., :2]
    else:
        blocks[..., 0:4] = hb
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("name", TYPES)
def test_random_bit_patterns(name: str) -> None:
    gen = torch.Generator().manual_seed(100 + TYPES.index(name))
    k = 1024
    raw = _random_blocks(name, ROWS, k, gen)
    check(name, raw, make_acts("heavy", k, gen), f"{name} random bytes")


@pytest.mark.parametrize("name", TYPES)
def test_extreme_sums(name: str) -> None:
    """Every quant at its maximum, the largest scales, activations all +-127: the largest partial sums the kernels
    hold in 16 bits (4 * 63 * 127 for Q6_K) and the largest super-block sums."""
    c = codec_for(name)
    k = 512
    blocks = torch.full((4, k // 256, c.type_size), 0xFF, dtype=torch.uint8)
    one = torch.tensor([1.0, 0.5], dtype=torch.float16).view(torch.uint8)
    if name == "Q6_K":
        blocks[..., 208:210] = one[:2]
        blocks[1, :, 192:208] = 0x80  # scales -128
        blocks[2, :, 192:208] = 0x7F  # scales 127
    else:
        blocks[..., 0:4] = one
        blocks[1, :, 4:16] = 0x3F  # low scales 63, high ones 15 | (0 << 4)
    raw = blocks.reshape(4, -1)
    x = torch.ones(2, k)
    x[1] = -1.0
    x[1, ::2] = -0.5  # some +-64
    check(name, raw, x, f"{name} extremes")


@pytest.mark.parametrize("name", TYPES)
def test_strided_rows(name: str) -> None:
    """Rows `row_stride` bytes apart inside a wider buffer (a slice of a larger matrix)."""
    gen = torch.Generator().manual_seed(5)
    c = codec_for(name)
    k = 512
    raw = c.quantize(torch.randn(ROWS, k, generator=gen)).reshape(ROWS, -1)
    wide = torch.zeros(ROWS, raw.shape[1] + 7, dtype=torch.uint8)
    wide[:, 3 : 3 + raw.shape[1]] = raw
    x = torch.randn(2, k, generator=gen)
    got = native.matmul(x, wide[:, 3 : 3 + raw.shape[1]], c.ggml_type, k)
    assert torch.equal(got, native.matmul(x, raw, c.ggml_type, k))


def _assert_token_groups_match_single_tokens(raw: torch.Tensor, c, k: int, gen: torch.Generator) -> None:
    """M >= 4 runs tokens in groups of 4 (the type's x4 kernel, over tiles of rows), the rest one by one: every
    token's outputs must be bit-identical to a call with that token alone (the single-token kernel). Rows strided, as
    slices of a larger matrix are; zero activation blocks inside a group."""
    wide = torch.zeros(raw.shape[0], raw.shape[1] + 5, dtype=torch.uint8)
    wide[:, 2 : 2 + raw.shape[1]] = raw
    raw = wide[:, 2 : 2 + raw.shape[1]]
    for m in (1, 3, 4, 5, 9, 45):
        x = make_acts("heavy", k, gen).repeat(m // TOKENS + 1, 1)[:m] * (1 + torch.rand(m, k, generator=gen))
        x[m // 2, : k // 2] = 0.0
        got = native.matmul(x, raw, c.ggml_type, k)
        single = torch.cat([native.matmul(x[i : i + 1], raw, c.ggml_type, k) for i in range(m)])
        assert got.dtype == torch.float32 and torch.equal(got, single), f"M={m}"


ALL = slice(None)
# per type: a seed and (row, block, bytes, value) edits that put extreme values where the kernels decode them
TOKEN_GROUP_CASES = {
    "Q4_K": (
        7,
        [
            (3, 0, slice(4, 16), 0),  # zero scales and mins
            (4, -1, slice(4, 16), 0xFF),  # the largest scales and mins
            (5, ALL, slice(0, 4), 0),  # d = dmin = 0
        ],
    ),
    "Q5_K": (
        27,
        [
            (3, 0, slice(4, 16), 0),  # zero scales and mins
            (4, -1, slice(4, 16), 0xFF),  # the largest scales and mins
            (4, -1, slice(16, 176), 0xFF),  # every quant at its maximum (fifth bits set)
            (5, ALL, slice(0, 4), 0),  # d = dmin = 0
            (6, ALL, slice(16, 48), 0xFF),  # qh all ones
            (7, ALL, slice(16, 48), 0),  # qh all zeros
        ],
    ),
    "Q6_K": (
        17,
        [
            (3, 0, slice(192, 208), 0x80),  # scales -128
            (4, -1, slice(192, 208), 0x7F),  # scales 127
            (4, -1, slice(0, 192), 0xFF),  # every quant at its maximum
            (5, ALL, slice(208, 210), 0),  # d = 0
        ],
    ),
}


@pytest.mark.parametrize(
    "name,k", [("Q4_K", 256), ("Q4_K", 2048), ("Q5_K", 256), ("Q5_K", 2048), ("Q6_K", 256), ("Q6_K", 1024)]
)
def test_k_quant_token_groups_match_single_tokens(name: str, k: int) -> None:
    """With M >= 4 tokens in groups of 4 (the type's x4 kernel, over tiles of rows), the rest one by one: every
    token's outputs must be bit-identical to a call with that token alone (the single-token kernel)."""
    seed, edits = TOKEN_GROUP_CASES[name]
    gen = torch.Generator().manual_seed(seed + k)
    c = codec_for(name)
    n = 61  # several row tiles (~16 KB of weights each), the last one partial
    quantized = c.quantize(make_weights("heavy", k, gen)).reshape(ROWS, -1)
    large = c.quantize(torch.randn(8, k, generator=gen) * 30.0).reshape(8, -1)  # large d
    raw = torch.cat([_random_blocks(name, n - ROWS - 8, k, gen), quantized, large])
    blocks = raw.view(n, k // 256, c.type_size)
    for row, block, byte_range, value in edits:
        blocks[row, block, byte_range] = value
    _assert_token_groups_match_single_tokens(raw, c, k, gen)
