"""GGML block codecs: quantize/dequantize torch tensors to the exact byte layouts GGUF files store.

One small class per format, each with its ggml block constants (`block_size` weights per block, `type_size` bytes per
block). Codecs know tensors and bytes only, never models or files.

Invariants:
- Layout: a tensor `[..., n]` becomes uint8 `[..., n // block_size * type_size]`, each row the concatenation of its
  blocks, every block laid out byte for byte as ggml's `block_*` structs (ggml-common.h), little-endian. That is how
  GGUF stores tensor data, so the bytes can be written to / read from a GGUF file as they are.
- F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 quantize to bytes identical to gguf-py (`gguf.quants.quantize`), which
  follows ggml's `quantize_row_*_ref` (same float32 operations and rounding: truncation for Q4/Q5, half away from zero
  for Q8_0). gguf-py and ggml's C differ only in the sign of a zero d or m field (blocks whose extreme value is a
  signed zero).
- Q4_K, Q5_K, Q6_K reproduce llama.cpp's `quantize_row_q{4,5,6}_K_ref` (what `llama-quantize` runs without an
  importance matrix) operation for operation, sums included in the C loops' order, so the bytes are the ones llama.cpp
  writes (checked against llama-cpp-python 0.3.36: tests/test_ggml_codecs.py, bench/codec_rmse.py).
- Every dequantize is bit-exact with gguf-py's (`gguf.quants.dequantize`), hence with ggml's `dequantize_row_*`.
  The block functions (`_dequantize_blocks`) run on the input's device (CUDA: GGUF experts dequantized per token).
- Work is vectorised over blocks and done in bounded chunks (`CHUNK_ELEMS` weights at a time) on
  `torch.get_num_threads()` worker threads, so quantizing a large tensor needs about the output plus a few chunk-sized
  temporaries per worker. A contiguous input is never copied whole. Results do not depend on chunking or threads.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256  # weights per K-quant super-block
CHUNK_ELEMS = 1 << 18  # weights per vectorised step: temporaries stay cache-sized (about 1 MiB each)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: below this |max| a group counts as all zeros


def _rdiv(c: float, x: torch.Tensor) -> torch.Tensor:
    """Exactly-rounded c / x. (torch turns `c / x` into `reciprocal(x) * c`, which is off by one ulp at times.)"""
    return torch.div(torch.tensor(c, dtype=x.dtype), x)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [B] -> the little-endian bytes of its float16 rounding (round to nearest even, like numpy), [B, 2]."""
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _fp16_from(raw: torch.Tensor, at: int) -> torch.Tensor:
    """Read the ggml_half at byte offset `at` of each block: uint8 [B, type_size] -> float32 [B, 1]."""
    return raw[:, at : at + 2].contiguous().view(torch.float16).float()


def _pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two 4-bit value tensors -> one byte each, `lo` in the low nibble (how every ggml 4-bit field is packed)."""
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[B, 8, k] values in {0, 1} -> [B, k] bytes, bits[:, i] in bit i."""
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    return (bits.to(torch.uint8) << shifts).sum(dim=1, dtype=torch.uint8)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C `roundf`: halves go away from zero. Written as gguf-py's np_roundf so float32 edge cases agree bit for bit."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + (2 * (a - floored)).floor())


class Codec:
    """A GGML tensor type: quantize float rows to its block bytes and back.

    Subclasses set `ggml_type` and implement `_quantize_blocks` (float32 [B, block_size] -> uint8 [B, type_size]) and
    `_dequantize_blocks` (the inverse); this base class does the reshaping and chunking.
    """

    name: str
    ggml_type: GGMLQuantizationType
    block_size: int
    type_size: int

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.ggml_type.name
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.ggml_type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size}, type_size={self.type_size})"

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Float tensor [..., n] (n a multiple of `block_size`) -> uint8 [..., n // block_size * type_size]."""
        n = w.shape[-1]
        if n % self.block_size:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of the block size {self.block_size}")
        blocks = w.detach().reshape(-1, self.block_size)
        out = torch.empty(blocks.shape[0], self.type_size, dtype=torch.uint8)
        step = max(1, CHUNK_ELEMS // self.block_size)

        def work(start: int) -> None:
            chunk = blocks[start : start + step].to(device="cpu", dtype=torch.float32)
            out[start : start + step] = self._quantize_blocks(chunk)

        _for_each_chunk(work, range(0, blocks.shape[0], step))
        return out.reshape(*w.shape[:-1], n // self.block_size * self.type_size)

    def dequantize(self, raw: torch.Tensor) -> torch.Tensor:
        """uint8 [..., nbytes] (nbytes a multiple of `type_size`) -> float32 [..., nbytes // type_size * block_size]."""
        if raw.dtype != torch.uint8:
            raise TypeError(f"{self.name}: expected uint8 bytes, got {raw.dtype}")
        nbytes = raw.shape[-1]
        if nbytes % self.type_size:
            raise ValueError(f"{self.name}: {nbytes} bytes per row is not a multiple of {self.type_size}")
        blocks = raw.reshape(-1, self.type_size)
        out = torch.empty(blocks.shape[0], self.block_size, dtype=torch.float32)
        step = max(1, CHUNK_ELEMS // self.block_size)

        def work(start: int) -> None:
            out[start : start + step] = self._dequantize_blocks(blocks[start : start + step].cpu())

        _for_each_chunk(work, range(0, blocks.shape[0], step))
        return out.reshape(*raw.shape[:-1], nbytes // self.type_size * self.block_size)


# With the OpenMP backend torch.set_num_threads only affects the calling OS thread; with another backend it would
# change the whole process, so chunks then run in the caller's thread instead.
_PER_THREAD_NUM_THREADS = "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)


def _for_each_chunk(work: Callable[[int], None], starts: range) -> None:
    """Run work(start) for every chunk, one chunk per worker thread, each worker single-threaded inside torch.

    Why not let torch split each kernel over the cores: a chunk is a long chain of small kernels (hundreds per chunk
    for the K-quant searches), and OpenMP puts a barrier after each; when the cores are shared with anything else,
    those barriers collapse (25x slower measured on a loaded 2-core machine). Here workers never wait on each other.
    torch.set_num_threads is per OS thread with OpenMP, and kernels release the GIL, so the workers run in parallel.
    """
    if not _PER_THREAD_NUM_THREADS:
        with torch.no_grad():
            for start in starts:
                work(start)
        return
    workers = max(1, min(torch.get_num_threads(), len(starts)))
    inference = torch.is_inference_mode_enabled()

    def run(start: int) -> None:
        # grad and inference modes are per thread: a caller's inference_mode must hold in the workers too, or they
        # may not write into the (inference) output tensor it allocated
        with torch.inference_mode(inference), torch.no_grad():
            work(start)

    with ThreadPoolExecutor(workers, initializer=_single_threaded_worker) as pool:
        list(pool.map(run, starts))  # list() re-raises a worker's exception here


# ---------------------------------------------------------------------------------------------------------------------
# Plain float types: the "blocks" are single values, the bytes their little-endian encoding.


class F32(Codec):
    ggml_type = GGMLQuantizationType.F32

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.contiguous().view(torch.uint8)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.contiguous().view(torch.float32)


class F16(Codec):
    ggml_type = GGMLQuantizationType.F16

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.to(torch.float16).view(torch.uint8)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.contiguous().view(torch.float16).float()


class BF16(Codec):
    ggml_type = GGMLQuantizationType.BF16

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """A bf16 source is already rounded: its bits are the output's (NaN made quiet, as the float32 path makes
        it), with no trip through float32 (3.5x faster on a bf16 checkpoint)."""
        if w.dtype != torch.bfloat16:
            return super().quantize(w)
        u = w.detach().contiguous().view(torch.int16)
        u = torch.where((u & 0x7FFF) > 0x7F80, u | 0x0040, u)
        return u.view(torch.uint8).reshape(*w.shape[:-1], w.shape[-1] * 2)

    def _quantize_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        # ggml_compute_fp32_to_bf16 (ggml-impl.h), as gguf-py writes it: NaN forced quiet keeping its sign and high
        # payload bits, everything else rounded to nearest even on the upper 16 bits.
        u = blocks.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        nan = (u & 0x7FFFFFFF) > 0x7F800000
        u = torch.where(nan, (u & 0xFFFF0000) | (64 << 16), u)
        u = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        u = u & 0xFFFF
        return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16).view(torch.uint8)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.contiguous().view(torch.bfloat16).float()


# ---------------------------------------------------------------------------------------------------------------------
# Legacy 32-weight blocks (ggml-common.h block_q8_0 / q4_0 / q4_1 / q5_0 / q5_1). Formulas follow gguf-py's
# quants.py / ggml-quants.c quantize_row_*_ref operation for operation, all in float32.


def _absmax_signed(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The value of largest magnitude along `dim`, keeping its sign (the first one on ties, like the C loops)."""
    return x.gather(dim, x.abs().argmax(dim=dim, keepdim=True))


def _inv(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1.0f/d : 0.0f`."""
    return torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))


def _trunc_u8(v: torch.Tensor, top: int) -> torch.Tensor:
    """`MIN(top, (int8_t)v)` for the non-negative v these codecs produce (gguf-py: trunc, to uint8, clip)."""
    return v.trunc().clamp(0, top).to(torch.uint8)


def _qh_bits(q: torch.Tensor) -> torch.Tensor:
    """Fifth bits of 32 5-bit values -> the 4-byte little-endian uint32 `qh` (bit j = q[j] >> 4)."""
    return _pack_bits(((q >> 4) & 1).view(-1, 4, 8).transpose(1, 2))


class Q8_0(Codec):
    ggml_type = GGMLQuantizationType.Q8_0  # block: ggml_half d; int8 qs[32]

    def _quantize_blocks(self, x: torch.Tensor) -> torch.Tensor:
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        qs = _round_half_away(x * _inv(d)).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), qs], dim=-1)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        return _fp16_from(raw, 0) * raw[:, 2:].view(torch.int8).float()


class Q4_0(Codec):
    ggml_type = GGMLQuantizationType.Q4_0  # block: ggml_half d; uint8 qs[16] (weight j low nibble, j+16 high)

    def _quantize_blocks(self, x: torch.Tensor) -> torch.Tensor:
        d = _absmax_signed(x) / -8
        q = _trunc_u8(x * _inv(d) + 8.5, 15)
        return torch.cat([_fp16_bytes(d), _pack_nibbles(q[:, :16], q[:, 16:])], dim=-1)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        qs = raw[:, 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float() - 8
        return _fp16_from(raw, 0) * q


class Q4_1(Codec):
    ggml_type = GGMLQuantizationType.Q4_1  # block: ggml_half d, m; uint8 qs[16]

    def _quantize_blocks(self, x: torch.Tensor) -> torch.Tensor:
        mn = x.amin(dim=-1, keepdim=True)
        d = (x.amax(dim=-1, keepdim=True) - mn) / 15
        q = _trunc_u8((x - mn) * _inv(d) + 0.5, 15)
        return torch.cat([_fp16_bytes(d), _fp16_bytes(mn), _pack_nibbles(q[:, :16], q[:, 16:])], dim=-1)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        qs = raw[:, 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
        return _fp16_from(raw, 0) * q + _fp16_from(raw, 2)


class Q5_0(Codec):
    ggml_type = GGMLQuantizationType.Q5_0  # block: ggml_half d; uint8 qh[4] (fifth bits); uint8 qs[16]

    def _quantize_blocks(self, x: torch.Tensor) -> torch.Tensor:
        d = _absmax_signed(x) / -16
        q = _trunc_u8(x * _inv(d) + 16.5, 31)
        return torch.cat([_fp16_bytes(d), _qh_bits(q), _pack_nibbles(q[:, :16], q[:, 16:])], dim=-1)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        return _fp16_from(raw, 0) * (_unpack5(raw[:, 2:6], raw[:, 6:]) - 16)


class Q5_1(Codec):
    ggml_type = GGMLQuantizationType.Q5_1  # block: ggml_half d, m; uint8 qh[4]; uint8 qs[16]

    def _quantize_blocks(self, x: torch.Tensor) -> torch.Tensor:
        mn = x.amin(dim=-1, keepdim=True)
        d = (x.amax(dim=-1, keepdim=True) - mn) / 31
        q = _trunc_u8((x - mn) * _inv(d) + 0.5, 31)
        qs = _pack_nibbles(q[:, :16], q[:, 16:])
        return torch.cat([_fp16_bytes(d), _fp16_bytes(mn), _qh_bits(q), qs], dim=-1)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        return _fp16_from(raw, 0) * _unpack5(raw[:, 4:8], raw[:, 8:]) + _fp16_from(raw, 2)


def _unpack5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """qh [B, 4] + qs [B, 16] -> the 32 unsigned 5-bit values as float32 [B, 32]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).view(1, 1, 8)
    high = ((qh.unsqueeze(-1) >> shifts) & 1).reshape(-1, 32)
    return (torch.cat([qs & 0x0F, qs >> 4], dim=-1) | (high << 4)).float()


# ---------------------------------------------------------------------------------------------------------------------
# K-quants: 256-weight super-blocks (ggml-common.h block_q4_K / q5_K / q6_K).


# The K-quant searches work on groups laid out as columns, x [n, G] (n weights per group), so that every sum can be
# taken one element at a time in the C loops' order (`_seqsum`). Float addition is not associative: summing in another
# order flips near-ties between candidate grids and the bytes stop matching llama.cpp's.


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim -2 left to right in float32, like `for (i...) s += t[i]`: [..., n, G] -> [..., 1, G].

    Stack several sums as [k, n, G] to take them in one pass: the loop is a chain of small kernels, fewer is faster.
    """
    acc = t[..., 0, :].clone()
    for i in range(1, t.shape[-2]):
        acc += t[..., i, :]
    return acc.unsqueeze(-2)


def _make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml-quants.c make_qkx2_quants (use_mad=false) on the columns of x [n, G] with weights w [n, G].

    Fits x ~ scale * L - the_min with L in [0, nmax] per group: start from the min/max grid, then try nstep+1
    stretched grids, solve the weighted least-squares scale/min for each and keep the lowest weighted squared error.
    Returns (scale [1, G], the_min [1, G], L [n, G] as float).
    """
    xmin = x.amin(dim=0, keepdim=True).clamp(max=0)  # the min is never above 0, so the_min >= 0
    xmax = x.amax(dim=0, keepdim=True)
    sum_w, sum_x = _seqsum(torch.stack([w, w * x]))
    flat = xmax == xmin  # the reference returns early for these: fixed up at the end
    one = torch.ones_like(xmax)

    def grid(iscale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
        return torch.round(iscale * (x - mn)).clamp_(0, nmax)

    iscale = _rdiv(float(nmax), torch.where(flat, one, xmax - xmin))
    scale = torch.reciprocal(iscale)
    (best,) = _seqsum(w * (scale * grid(iscale, xmin) + xmin - x).square())
    mn = xmin
    best_grid = (iscale, xmin)  # the winning L is rebuilt from its grid at the end rather than copied every step
    terms = x.new_empty(3, *x.shape)
    for step in range(nstep + 1):
        # `rmin + rdelta*is + nmax` evaluated in float32, as the C code does. The grid is laid from the best min so
        # far, not the data min: the C loop reuses its `min` variable, so the search is path dependent.
        top = float(np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
        iscale = _rdiv(top, torch.where(flat, one, xmax - mn))
        laux = grid(iscale, mn)
        wl = torch.mul(w, laux, out=terms[0])
        torch.mul(wl, laux, out=terms[1])
        torch.mul(wl, x, out=terms[2])
        sum_l, sum_l2, sum_xl = _seqsum(terms)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = this_min > 0  # a positive min is not representable: refit the scale alone with min = 0
        this_scale = torch.where(clipped, sum_xl / sum_l2, this_scale)
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        diff = torch.mul(laux, this_scale, out=terms[0]).add_(this_min).sub_(x)
        (err,) = _seqsum(diff.square_().mul_(w))
        better = (det > 0) & (err < best) & ~flat
        best_grid = (torch.where(better, iscale, best_grid[0]), torch.where(better, mn, best_grid[1]))
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat, 0.0, grid(*best_grid))
    return scale, -mn, L


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml-quants.c make_qx_quants with rmse_type=1 and no importance weights (weights x*x) on the columns of x [n, G].

    Symmetric fit x ~ scale * l, l in [-nmax, nmax-1]: tries 19 grids around -nmax/max and keeps the one maximising
    (sum w x l)^2 / sum w l^2 (least weighted squared error). Returns (scale [1, G], L = l + nmax [n, G] as float).
    """
    mx = _absmax_signed(x, dim=0)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    wx = w * x
    terms = x.new_empty(2, *x.shape)

    def grid(iscale: torch.Tensor) -> torch.Tensor:
        return torch.round(iscale * x).clamp_(-nmax, nmax - 1)

    def fit(top: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        iscale = _rdiv(top, mx)
        lv = grid(iscale)
        torch.mul(wx, lv, out=terms[0])
        torch.mul(w, lv, out=terms[1]).mul_(lv)
        sumlx, suml2 = _seqsum(terms)
        return iscale, sumlx, suml2

    best_iscale, sumlx, suml2 = fit(float(-nmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for i in [*range(-9, 0), *range(1, 10)]:
        iscale, slx, sl2 = fit(float(-(np.float32(nmax) + np.float32(0.1) * np.float32(i))))
        better = (sl2 > 0) & (slx * slx > best * sl2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, torch.where(zero, 0.0, grid(best_iscale) + nmax)


def _nearest_u8(v: torch.Tensor) -> torch.Tensor:
    """`uint8_t l = nearest_int(v)`: round half to even, then wrap to 8 bits as the C assignment does."""
    return torch.round(v).to(torch.int64) & 0xFF


def _positive_or_zero(v: torch.Tensor) -> torch.Tensor:
    """v where v > 0, else +0.0 (clamp(min=0) would keep -0.0)."""
    return torch.where(v > 0, v, torch.zeros_like(v))


def _columns(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, 256] super-blocks -> [n, B * 256 / n]: one column per n-weight sub-block."""
    return x.reshape(-1, n).t().contiguous()


def _kquant_scales_mins(
    x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared body of quantize_row_q4_K_ref / q5_K_ref for x [B, 256].

    Returns (the 16 header bytes d, dmin, scales[12] as uint8 [B, 16]; L as uint8 [B, 256] in [0, nmax]).
    """
    xc = _columns(x, 32)
    # weights favour large values: av_x + |x|, with av_x the sub-block RMS. The square root is taken in float64:
    # torch's float32 sqrt is off by an ulp at times, while sqrtf (and float64-then-round) is exact.
    w = torch.sqrt((_seqsum(xc * xc) / 32).double()).float() + xc.abs()
    scales, mins, L = _make_qkx2_quants(xc, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.view(-1, 8), mins.view(-1, 8)

    # 6-bit sub-block scales/mins relative to the largest of each, with fp16 super-block factors d, dmin. The C loops
    # find the largest starting from +0: a -0.0 maximum (all mins are -0.0 for non-negative data) must become +0.
    max_scale = _positive_or_zero(scales.amax(dim=-1, keepdim=True))
    max_min = _positive_or_zero(mins.amax(dim=-1, keepdim=True))
    inv_scale = torch.where(max_scale > 0, _rdiv(63.0, max_scale), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _rdiv(63.0, max_min), torch.zeros_like(max_min))
    ls = _nearest_u8(inv_scale * scales).clamp_(max=63).to(torch.uint8)
    lm = _nearest_u8(inv_min * mins).clamp_(max=63).to(torch.uint8)
    d16 = (max_scale / 63).to(torch.float16)
    dmin16 = (max_min / 63).to(torch.float16)

    # requantize against the scales as stored; sub-blocks whose stored scale is 0 keep the search's L
    d_sub = (d16.float() * ls.float()).view(1, -1)
    dm_sub = (dmin16.float() * lm.float()).view(1, -1)
    Lq = torch.round((xc + dm_sub) / d_sub).clamp_(0, nmax)
    L = torch.where(d_sub != 0, Lq, L).to(torch.uint8).t().reshape(-1, QK_K)

    # scales[12] packing, get_scale_min_k4 in ggml-quants.c: bytes 0-3 scale j (6 bits) + top 2 bits of scale j+4,
    # bytes 4-7 min j + top 2 bits of min j+4, bytes 8-11 low nibbles of scale j+4 | min j+4
    packed = torch.cat(
        [ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6), _pack_nibbles(ls[:, 4:], lm[:, 4:])],
        dim=-1,
    )
    header = torch.cat([d16.view(torch.uint8), dmin16.view(torch.uint8), packed], dim=-1)
    return header, L


def _unpack_scales_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scales[12] [B, 12] -> (6-bit scales, 6-bit mins) each float32 [B, 8, 1] (get_scale_min_k4)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=-1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc.float().unsqueeze(-1), mn.float().unsqueeze(-1)


class Q4_K(Codec):
    # block: ggml_half d, dmin; uint8 scales[12]; uint8 qs[128]. qs[32c + l] holds weight 64c + l in its low nibble
    # and weight 64c + 32 + l in its high nibble.
    ggml_type = GGMLQuantizationType.Q4_K

    def _quantize_blocks(self, x: torch.Tensor) -> torch.Tensor:
        header, L = _kquant_scales_mins(x, 15, -1.0, 0.1, 20)
        L = L.view(-1, 4, 2, 32)
        return torch.cat([header, _pack_nibbles(L[:, :, 0], L[:, :, 1]).reshape(-1, 128)], dim=-1)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        sc, mn = _unpack_scales_mins(raw[:, 4:16])
        qs = raw[:, 16:].reshape(-1, 4, 1, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).float()
        return ((_fp16_from(raw, 0).unsqueeze(-1) * sc) * q - _fp16_from(raw, 2).unsqueeze(-1) * mn).view(-1, QK_K)


class Q5_K(Codec):
    # block: ggml_half d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]. Low nibbles as in Q4_K; the fifth bit
    # of weight 32k + l (k = 0..7) is bit k of qh[l].
    ggml_type = GGMLQuantizationType.Q5_K

    def _quantize_blocks(self, x: torch.Tensor) -> torch.Tensor:
        header, L = _kquant_scales_mins(x, 31, -0.5, 0.1, 15)
        L = L.view(-1, 8, 32)
        qh = _pack_bits(L >> 4)
        qs = _pack_nibbles(L[:, 0::2], L[:, 1::2]).reshape(-1, 128)
        return torch.cat([header, qh, qs], dim=-1)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        sc, mn = _unpack_scales_mins(raw[:, 4:16])
        shifts = torch.arange(8, dtype=torch.uint8, device=raw.device).view(1, 8, 1)
        high = (raw[:, 16:48].unsqueeze(1) >> shifts) & 1
        qs = raw[:, 48:].reshape(-1, 4, 1, 32)
        low = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
        q = (low | (high << 4)).float()
        return ((_fp16_from(raw, 0).unsqueeze(-1) * sc) * q - _fp16_from(raw, 2).unsqueeze(-1) * mn).view(-1, QK_K)


class Q6_K(Codec):
    # block: uint8 ql[128]; uint8 qh[64]; int8 scales[16]; ggml_half d. In each 128-weight half h, weight 32k + l
    # (k = 0..3) has its low nibble in ql[64h + 32(k % 2) + l] (low nibble for k < 2, high for k >= 2) and its top
    # two bits at bit 2k of qh[32h + l]; values are stored +32.
    ggml_type = GGMLQuantizationType.Q6_K

    def _quantize_blocks(self, x: torch.Tensor) -> torch.Tensor:
        xc = _columns(x, 16)
        scales, L = _make_qx_quants(xc, 32)
        scales = scales.view(-1, 16)

        # int8 sub-block scales against the one of largest magnitude, which maps to -128
        max_scale = _absmax_signed(scales)
        zero = max_scale.abs() < GROUP_MAX_EPS
        iscale = _rdiv(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
        d16 = torch.reciprocal(iscale).to(torch.float16)
        q_sc = torch.round(iscale * scales).clamp_(max=127)
        d_sub = (d16.float() * q_sc).view(1, -1)
        Lq = torch.round(xc / d_sub).clamp_(-32, 31) + 32
        L = torch.where(d_sub != 0, Lq, L).to(torch.uint8).t().reshape(-1, 2, 4, 32)

        ql = torch.cat([_pack_nibbles(L[:, :, 0], L[:, :, 2]), _pack_nibbles(L[:, :, 1], L[:, :, 3])], dim=2)
        qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
        out = torch.cat(
            [ql.reshape(-1, 128), qh.reshape(-1, 64), q_sc.to(torch.int8).view(torch.uint8), d16.view(torch.uint8)],
            dim=-1,
        )
        # an all-zero super-block is stored as all-zero bytes (the reference memsets it)
        return torch.where(zero, torch.zeros_like(out), out)

    def _dequantize_blocks(self, raw: torch.Tensor) -> torch.Tensor:
        ql = raw[:, :128].reshape(-1, 2, 1, 64)
        low = torch.cat([ql & 0x0F, ql >> 4], dim=2).view(-1, 2, 4, 32)
        qh = raw[:, 128:192].reshape(-1, 2, 1, 32)
        # shifts 0, 2, 4, 6 made on the device: a tensor built from a list is a host copy, which a CUDA graph refuses
        high = (qh >> torch.arange(0, 8, 2, dtype=torch.uint8, device=raw.device).view(1, 1, 4, 1)) & 3
        q = ((low | (high << 4)).float() - 32).view(-1, 16, 16)
        sc = raw[:, 192:208].contiguous().view(torch.int8).float().unsqueeze(-1)
        return ((_fp16_from(raw, 208).unsqueeze(-1) * sc) * q).view(-1, QK_K)


CODECS: dict[str, Codec] = {
    c.name: c for c in (F32(), F16(), BF16(), Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1(), Q4_K(), Q5_K(), Q6_K())
}
_BY_TYPE: dict[GGMLQuantizationType, Codec] = {c.ggml_type: c for c in CODECS.values()}


def codec_for(ggml_type: GGMLQuantizationType | int | str) -> Codec:
    """The codec for a GGML type, given as the enum, its integer value or its name ("Q4_K")."""
    try:
        if isinstance(ggml_type, str):
            return CODECS[ggml_type.upper()]
        return _BY_TYPE[GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError):
        raise NotImplementedError(f"no codec for GGML type {ggml_type!r}; have {', '.join(CODECS)}") from None
