"""Matrix-vector products over a token's experts read straight from a GGUF's quantized blocks (triton kernels).

Why: a decode token uses 8 experts per layer, and dequantizing their whole matrices with torch ops before the products
(`StackedGGUFExperts.gathered_weights`) writes and reads back float weights ~10x the size of the blocks, in ~15
kernels per matrix. Here one kernel reads each expert's blocks once and dequantizes them in registers, as llama.cpp's
mat-vec kernels do (ggml-cuda/mmvq.cu); a second variant computes gate and up together and returns silu(gate) * up.

Invariants:
- The bytes are the file's: expert e's row n starts at `raw[e]`'s byte n * row_bytes, each row its blocks in order,
  every block laid out as ggml's `block_*` structs (ggml-common.h). The dequantization is quant/ggml_codecs.py's
  `_dequantize_blocks` operation for operation in float32 (the specification the tests check against), so a product
  equals dequantize-then-multiply up to the order of float32 sums.
- No host sync and no host-to-device copy: launches can be captured in a CUDA graph (cuda_graphs.py).
- Any row stride over experts: offload/direct.py's gather buffer holds each projection as a strided view.
Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (what llama.cpp falls back to for rows that are not multiples of 256, Nano's
down_proj) and Q4_K, Q5_K, Q6_K.
"""

from __future__ import annotations

import os

import torch

from quant.ggml_codecs import Codec
from quant.ggml_types import GGMLQuantizationType as T

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the callers keep their torch path
    triton = None

K_QUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)
LEGACY = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
BLOCK_N = 16  # output rows per program (8 and 32 were slower with 8 warps: 23.7, 23.4 us)
NUM_WARPS = 8  # H200, bench/gguf_matvec.py --sweep: 21.9 us per Nano layer (16 rows, 8 warps) against 34.4 with 4 warps


def supports(codec: Codec) -> bool:
    return codec.ggml_type in K_QUANTS + LEGACY


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run for tensors on `device`: on CUDA, and under triton's CPU interpreter (TRITON_INTERPRET=1,
    tests); never with MARCO_GGUF_TRITON=0 (the torch path, to compare the two)."""
    if triton is None or os.environ.get("MARCO_GGUF_TRITON", "1") == "0":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def expert_matvec(
    raw: torch.Tensor,
    codec: Codec,
    ids: torch.Tensor | None,
    x: torch.Tensor,
    N: int,
    K: int,
    up: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[a, n] = sum_k W[ids[a]][n, k] * x[a, k] as float32 [A, N], W's rows read from `raw` uint8 [E, >= N * row
    bytes] (any stride over E, bytes contiguous). `ids`: int64 [A] on the device, or None for experts 0..A-1 in order;
    `x`: [A, K] or [1, K] (shared by every expert), any float dtype. With `up` (same type and shape as `raw`): the
    experts' silu(W x) * (U x), gate and up in one kernel."""
    if raw.stride(-1) != 1 or (up is not None and up.stride(-1) != 1):
        raise ValueError("expert_matvec: each expert's bytes must be contiguous")
    if K % codec.block_size:
        raise ValueError(f"expert_matvec: {codec.name} needs rows of a multiple of {codec.block_size}, got {K}")
    A = ids.shape[0] if ids is not None else raw.shape[0]
    nb = K // codec.block_size
    row_bytes = nb * codec.type_size
    if raw.shape[-1] < N * row_bytes:
        raise ValueError(f"expert_matvec: {raw.shape[-1]} bytes per expert, {N} rows need {N * row_bytes}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(A, N, dtype=torch.float32, device=raw.device)
    up_raw = raw if up is None else up
    # legacy blocks: BB blocks of 32 per step, the largest power of two dividing the row (no masks along K)
    bb = 1 if codec.ggml_type in K_QUANTS else next(b for b in (8, 4, 2, 1) if nb % b == 0)
    _expert_matvec[(A, triton.cdiv(N, BLOCK_N))](
        raw, up_raw, ids if ids is not None else raw, x, out, N, nb, raw.stride(0), up_raw.stride(0), row_bytes,
        x.stride(0) if x.shape[0] > 1 else 0,
        QTYPE=int(codec.ggml_type), TS=codec.type_size, HAS_IDS=ids is not None, GLU=up is not None,
        BLOCK_N=BLOCK_N, BB=bb, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _half(p, m):
        """The ggml_half at byte pointers `p` as float32, read as two bytes (blocks are only 2-byte aligned)."""
        lo = tl.load(p, mask=m, other=0).to(tl.uint16)
        hi = tl.load(p + 1, mask=m, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _bytes(p, m):
        return tl.load(p, mask=m, other=0).to(tl.int32)

    @triton.jit
    def _scale_min_k4(blk, s, m):
        """get_scale_min_k4 (ggml-quants.c, the codecs' `_unpack_scales_mins`): sub-block s's 6-bit scale and min."""
        j = s % 4
        a = _bytes(blk + 4 + j, m)
        b = _bytes(blk + 8 + j, m)
        c = _bytes(blk + 12 + j, m)
        sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 6) << 4))
        mn = tl.where(s < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
        return sc.to(tl.float32), mn.to(tl.float32)

    @triton.jit
    def _dot_q45_k(blk, xp, m, QTYPE: tl.constexpr):
        """One Q4_K / Q5_K super-block per row (blk [BN, 1, 1]) against x's 256 values at xp: [BN].
        qs[32c + l] holds weight 64c + l (sub-block 2c) low and 64c + 32 + l (sub-block 2c + 1) high."""
        c = tl.arange(0, 4)[None, :, None]
        l = tl.arange(0, 32)[None, None, :]
        d = _half(blk, m)
        dmin = _half(blk + 2, m)
        sc_lo, mn_lo = _scale_min_k4(blk, 2 * c, m)
        sc_hi, mn_hi = _scale_min_k4(blk, 2 * c + 1, m)
        if QTYPE == 13:  # Q5_K: qh[32] before qs; bit s of qh[l] is the fifth bit of sub-block s's weight l
            q = _bytes(blk + 48 + 32 * c + l, m)
            qh = _bytes(blk + 16 + l, m)
            q_lo = (q & 15) | (((qh >> (2 * c)) & 1) << 4)
            q_hi = (q >> 4) | (((qh >> (2 * c + 1)) & 1) << 4)
        else:
            q = _bytes(blk + 16 + 32 * c + l, m)
            q_lo = q & 15
            q_hi = q >> 4
        x_lo = tl.load(xp + 64 * c + l).to(tl.float32)
        x_hi = tl.load(xp + 64 * c + 32 + l).to(tl.float32)
        w_lo = (d * sc_lo) * q_lo.to(tl.float32) - dmin * mn_lo
        w_hi = (d * sc_hi) * q_hi.to(tl.float32) - dmin * mn_hi
        return tl.sum(tl.sum(w_lo * x_lo + w_hi * x_hi, axis=2), axis=1)

    @triton.jit
    def _dot_q6_k(blk, xp, m):
        """One Q6_K super-block per row: [BN]. Byte 16i + r of ql (i = 4h + 2j + i%2) holds, in half h, weight
        32j + l (l = 16(i%2) + r) low and 32(j + 2) + l high; their top bits are bits 2j and 2j + 4 of qh[32h + l];
        each 16 weights share an int8 scale; values are stored +32."""
        i = tl.arange(0, 8)[None, :, None]
        r = tl.arange(0, 16)[None, None, :]
        h = i // 4
        j = (i // 2) % 2
        ql = _bytes(blk + 16 * i + r, m)
        qh = _bytes(blk + 128 + 32 * h + 16 * (i % 2) + r, m)
        q_lo = ((ql & 15) | (((qh >> (2 * j)) & 3) << 4)) - 32
        q_hi = ((ql >> 4) | (((qh >> (2 * j + 4)) & 3) << 4)) - 32
        sc_lo = tl.load(blk + 192 + i + 4 * h, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        sc_hi = tl.load(blk + 196 + i + 4 * h, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        d = _half(blk + 208, m)
        at = 16 * i + 64 * h + r
        x_lo = tl.load(xp + at).to(tl.float32)
        x_hi = tl.load(xp + at + 64).to(tl.float32)
        w_lo = (d * sc_lo) * q_lo.to(tl.float32)
        w_hi = (d * sc_hi) * q_hi.to(tl.float32)
        return tl.sum(tl.sum(w_lo * x_lo + w_hi * x_hi, axis=2), axis=1)

    @triton.jit
    def _dot_legacy(blk, xp, m, QTYPE: tl.constexpr, BB: tl.constexpr):
        """BB 32-weight blocks per row (blk [BN, BB, 1], xp their x [1, BB, 1]): [BN]. Nibble types hold weight r
        low and r + 16 high in qs[r]; Q5's fifth bits are bit r of the little-endian uint32 qh."""
        if QTYPE == 8:  # Q8_0: ggml_half d; int8 qs[32]
            r = tl.arange(0, 32)[None, None, :]
            q = tl.load(blk + 2 + r, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            w = _half(blk, m) * q
            return tl.sum(tl.sum(w * tl.load(xp + r).to(tl.float32), axis=2), axis=1)
        else:
            r = tl.arange(0, 16)[None, None, :]
            d = _half(blk, m)
            if QTYPE == 2:  # Q4_0: d; qs[16]
                q = _bytes(blk + 2 + r, m)
                w_lo = d * ((q & 15) - 8).to(tl.float32)
                w_hi = d * ((q >> 4) - 8).to(tl.float32)
            elif QTYPE == 3:  # Q4_1: d, m; qs[16]
                q = _bytes(blk + 4 + r, m)
                dm = _half(blk + 2, m)
                w_lo = d * (q & 15).to(tl.float32) + dm
                w_hi = d * (q >> 4).to(tl.float32) + dm
            elif QTYPE == 6:  # Q5_0: d; qh[4]; qs[16]
                q = _bytes(blk + 6 + r, m)
                h_lo = (_bytes(blk + 2 + r // 8, m) >> (r % 8)) & 1
                h_hi = (_bytes(blk + 4 + r // 8, m) >> (r % 8)) & 1
                w_lo = d * (((q & 15) | (h_lo << 4)) - 16).to(tl.float32)
                w_hi = d * (((q >> 4) | (h_hi << 4)) - 16).to(tl.float32)
            else:  # Q5_1: d, m; qh[4]; qs[16]
                q = _bytes(blk + 8 + r, m)
                dm = _half(blk + 2, m)
                h_lo = (_bytes(blk + 4 + r // 8, m) >> (r % 8)) & 1
                h_hi = (_bytes(blk + 6 + r // 8, m) >> (r % 8)) & 1
                w_lo = d * ((q & 15) | (h_lo << 4)).to(tl.float32) + dm
                w_hi = d * ((q >> 4) | (h_hi << 4)).to(tl.float32) + dm
            x_lo = tl.load(xp + r).to(tl.float32)
            x_hi = tl.load(xp + 16 + r).to(tl.float32)
            return tl.sum(tl.sum(w_lo * x_lo + w_hi * x_hi, axis=2), axis=1)

    @triton.jit
    def _row_dots(rows, xa, m, nb, QTYPE: tl.constexpr, TS: tl.constexpr, BLOCK_N: tl.constexpr, BB: tl.constexpr):
        """Rows `rows` ([BN] byte pointers) dotted with the vector at xa: float32 [BN]."""
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        rows3 = rows[:, None, None]
        m3 = m[:, None, None]
        if QTYPE == 12 or QTYPE == 13 or QTYPE == 14:
            for sb in range(0, nb):
                if QTYPE == 14:
                    acc += _dot_q6_k(rows3 + sb * TS, xa + sb * 256, m3)
                else:
                    acc += _dot_q45_k(rows3 + sb * TS, xa + sb * 256, m3, QTYPE)
        else:
            bb = tl.arange(0, BB)[None, :, None]
            for b0 in range(0, nb, BB):
                acc += _dot_legacy(rows3 + (b0 + bb) * TS, xa + (b0 + bb) * 32, m3, QTYPE, BB)
        return acc

    @triton.jit
    def _expert_matvec(
        raw_ptr, up_ptr, ids_ptr, x_ptr, out_ptr, N, nb, stride_e, stride_up, row_bytes, stride_xa,
        QTYPE: tl.constexpr, TS: tl.constexpr, HAS_IDS: tl.constexpr, GLU: tl.constexpr,
        BLOCK_N: tl.constexpr, BB: tl.constexpr,
    ):  # fmt: skip
        a = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = n < N
        if HAS_IDS:
            e = tl.load(ids_ptr + a).to(tl.int64)
        else:
            e = a.to(tl.int64)
        at = n.to(tl.int64) * row_bytes
        xa = x_ptr + a.to(tl.int64) * stride_xa
        acc = _row_dots(raw_ptr + e * stride_e + at, xa, m, nb, QTYPE, TS, BLOCK_N, BB)
        if GLU:  # silu(gate) * up, torch's silu written out
            up = _row_dots(up_ptr + e * stride_up + at, xa, m, nb, QTYPE, TS, BLOCK_N, BB)
            acc = acc / (1.0 + tl.exp(-acc)) * up
        tl.store(out_ptr + a.to(tl.int64) * N + n, acc, mask=m)
