"""Linear layers, experts and embeddings that keep GGUF weights quantized and compute on them, so that a model takes
the memory of its file, not of its float weights. The loader builds them with `make_linear`, `make_experts` and
`make_embedding` from zero-copy uint8 views `[rows, row_bytes]` of the memory-mapped file; no forward materialises a
float W.

Native kernels (`marco_local.kernels.native`, C compiled on first use), for every type they read (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q4_K, Q5_K, Q6_K): the blocks are used as they lie in the file (prefaulted at load, see `prefault`), the
activations are quantized to int8 blocks as llama.cpp does (so its numerics; tests/test_native.py bounds the error),
and a layer's routing and selected experts run in one call per token (`NativeMoeBlock`).

Without them (no C compiler, or MARCO_NATIVE=0), torch's `_weight_int4pack_mm_for_cpu`: the one torch CPU kernel
that both carries ggml's per-block scales (`_weight_int8pack_mm` has one scale per row) and beats a dense matmul; it
is vectorised for bf16 activations only (float32 ones are cast). Every quantized type is repacked once, at load,
into its group-wise asymmetric form `w = (n - 8) * S + Z` (n a 4-bit value, S and Z per group of `group` inputs):

- Q4_0, Q4_1, Q4_K are group-32 int4 as they are (Q4_K: S = d * sc_j, Z = 8 S - dmin * m_j).
- Q5_0, Q5_1, Q5_K, Q8_0 (blocks of 32) and Q6_K (sub-blocks of 16) split each stored value into nibbles,
  q = lo + 16 hi. The input is doubled (K' = 2 K): each run of `split` inputs is seen once as x (for lo) and once as
  16 x (for hi; a power of two, so exact in floating point), both halves in one group of `2 * split`. The high nibble
  is stored as hi + o (o centres its range on 8) and Z = (C + 8 S - 16 (o - 8) S) / 17 makes the group sum
  reproduce the block's additive constant C (Q5_0: -16 d, Q5_1: m, Q5_K: -dmin * m_j, Q6_K: -32 S, Q8_0: -128 d).
- F32, F16, BF16 stay zero-copy views of the file and run a plain matmul.

The kernel takes S and Z in bf16 and rounds its output to bf16, so each represented weight is within 2^-6.5 of its
block's largest |w| (tests/test_qlinear.py). The weights stay quantized (0.625 to 1.25 bytes per weight; the file's
pages are released after repacking, see `release_pages`), and on the one-token path `QExperts` makes a fixed number
of torch calls per layer, whatever the number of experts. CPU only: the packing is the CPU kernel's.

`exact=True` (the loader's float32 models): the blocks are dequantized with the codec on each call and multiplied in
float32, the reference path for checks (slow, allocates, touches the raw file pages).

Offloading (`make_experts(..., in_file="int4" | "raw")`): `QExperts` repacks nothing and touches no expert page at
load. With the native kernels its slots hold the raw blocks ("raw"), read straight from the file on a miss. Else its
per-expert tensors are shape-only placeholders that the offload runtime rebinds to its slots, and a miss fills a
slot through `fill_expert` (the load-time routine `_fill_int4`, so a slot's bytes equal the resident model's). The
kernel's padding rows of a slot are never written: they only feed output rows that are sliced off.

Speed: bench/bench_vs_llamacpp.py (whole model, against llama.cpp), bench/native_kernels_*.py (one kernel).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quant.ggml_codecs import Codec, codec_for
from quant.ggml_types import GGMLQuantizationType as GT

from ..kernels import native
from ..models.qwen3_moe import Experts, SparseMoeBlock

KERNEL_DTYPE = torch.bfloat16  # the only activation dtype the CPU int4 kernel vectorises
ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu refuses a row count that is not a multiple of 16
CHUNK_ROWS = 1024  # rows repacked per step: bounds load-time temporaries to a few MiB
_MM = torch.ops.aten._weight_int4pack_mm_for_cpu
_PACK = torch.ops.aten._convert_weight_to_int4pack_for_cpu
# With the OpenMP backend torch.set_num_threads is per OS thread, so load-time work can run in single-threaded workers
_PER_THREAD_NUM_THREADS = "parallel backend: OpenMP" in torch.__config__.parallel_info()


@dataclass(frozen=True)
class Layout:
    """How a ggml type maps onto the int4 kernel: `group` inputs per (S, Z) pair along the packed input K'."""

    group: int
    split: int = 0  # 0: K' = K. Else each run of `split` inputs appears twice (x, then 16 x): K' = 2 K
    hi_offset: int = 0  # o: the stored high nibble is hi + o


LAYOUTS: dict[GT, Layout] = {
    GT.Q4_0: Layout(32),
    GT.Q4_1: Layout(32),
    GT.Q4_K: Layout(32),
    GT.Q5_0: Layout(64, 32, 7),
    GT.Q5_1: Layout(64, 32, 7),
    GT.Q5_K: Layout(64, 32, 7),
    GT.Q8_0: Layout(64, 32, 0),
    GT.Q6_K: Layout(32, 16, 6),
}
DENSE: dict[GT, torch.dtype] = {GT.F32: torch.float32, GT.F16: torch.float16, GT.BF16: torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------------
# Block decoding (ggml-common.h layouts; the same reading as quant/ggml_codecs.py, but to integers, not floats)


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    """The ggml_half at byte `at` of each block [B, type_size] -> float32 [B, 1]."""
    return b[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """qs [B, 16] -> the 32 4-bit values of a legacy block (weight j in the low nibble of byte j, j + 16 high)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """qh [B, 4] (a little-endian uint32) -> its 32 bits [B, 32], bit j = fifth bit of weight j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device).view(1, 1, 8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(-1, 32)


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scales[12] of a Q4_K/Q5_K block -> 6-bit (scales, mins) as float32 [B, 8] (get_scale_min_k4)."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=-1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc.float(), mn.float()


def _k_low(qs: torch.Tensor) -> torch.Tensor:
    """qs [B, 128] of Q4_K/Q5_K -> low nibbles [B, 8, 32]: qs[32c + l] holds weight 64c + l low, 64c + 32 + l high."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def _direct(t: GT, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit types: blocks [B, type_size] -> (n uint8 [B, bs], S [B, groups], Z [B, groups]) for w = (n - 8) S + Z."""
    if t == GT.Q4_0:
        d = _half(b, 0)
        return _nibbles(b[:, 2:18]), d, torch.zeros_like(d)
    if t == GT.Q4_1:
        d, m = _half(b, 0), _half(b, 2)
        return _nibbles(b[:, 4:20]), d, m + 8 * d
    sc, mn = _k_scales(b[:, 4:16])  # Q4_K
    s = _half(b, 0) * sc
    return _k_low(b[:, 16:144]).reshape(-1, 256), s, 8 * s - _half(b, 2) * mn


def _split(t: GT, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """5/6/8-bit types: blocks -> (unsigned q [B, subs, split], S [B, subs], C [B, subs]) for w = S q + C."""
    if t in (GT.Q5_0, GT.Q5_1):
        at = 2 if t == GT.Q5_0 else 4
        q = _nibbles(b[:, at + 4 : at + 20]) | (_bits32(b[:, at : at + 4]) << 4)
        d = _half(b, 0)
        return q.unsqueeze(1), d, -16 * d if t == GT.Q5_0 else _half(b, 2)
    if t == GT.Q8_0:
        d = _half(b, 0)
        q = (b[:, 2:34].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return q.unsqueeze(1), d, -128 * d
    if t == GT.Q5_K:
        sc, mn = _k_scales(b[:, 4:16])
        shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
        high = (b[:, 16:48].unsqueeze(1) >> shifts) & 1  # bit k of qh[l] is the fifth bit of weight 32k + l
        return _k_low(b[:, 48:176]) | (high << 4), _half(b, 0) * sc, -_half(b, 2) * mn
    # Q6_K: ql[128] qh[64] int8 scales[16] d. In each 128-weight half h, weight 32k + l has its low nibble in
    # ql[64h + 32(k % 2) + l] (low nibble for k < 2) and its top two bits at bit 2k of qh[32h + l].
    ql = b[:, :128].reshape(-1, 2, 1, 64)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).view(-1, 2, 4, 32)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
    s = _half(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()
    return (low | (high << 4)).view(-1, 16, 16), s, -32 * s


def _int4_rows(raw: torch.Tensor, t: GT, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw [R, row_bytes] -> (n uint8 [R, K'], S float32 [R, K'/group], Z float32 [R, K'/group])."""
    codec, layout = codec_for(t), LAYOUTS[t]
    rows = raw.shape[0]
    b = raw.reshape(-1, codec.type_size)
    if not layout.split:
        n, s, z = _direct(t, b)
    else:
        q, s, c = _split(t, b)
        o = layout.hi_offset
        n = torch.cat([q & 0x0F, (q >> 4) + o], dim=-1)  # [B, subs, 2 * split]: lo run, then hi run
        z = (c + 8 * s - 16 * (o - 8) * s) / 17
    k2 = in_features * (2 if layout.split else 1)
    return n.reshape(rows, k2), s.reshape(rows, -1), z.reshape(rows, -1)


def _pack_rows(n: torch.Tensor) -> torch.Tensor:
    """n uint8 [N, K] (N a multiple of 16) -> the int4 kernel's packed form, made by torch's own conversion op.

    Why the op and never a hand-written copy of its output: the packed order is private to torch and differs with
    the kernel torch picks for this CPU (AVX-512, AVX2 or plain C), so a copied layout is right on one CPU only."""
    return _PACK(n.to(torch.int32), 1)


@functools.cache
def _packs_in_chunks(rows: int) -> bool:
    """Whether packing `rows` rows at a time gives the same bytes as packing the whole matrix, checked once on this
    CPU's kernel rather than assumed from its layout; if not, matrices are packed whole."""
    n = torch.randint(
        0, 16, (2 * rows + ROW_MULTIPLE, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    parts = [_pack_rows(n[i : i + rows]) for i in range(0, n.shape[0], rows)]
    return torch.equal(torch.cat(parts), _pack_rows(n))


def _parallel_map(fn: Callable, items: Iterable) -> list:
    """`[fn(i) for i in items]` on single-threaded workers, one per torch thread.

    Why: repacking is a chain of small kernels per expert; split over cores by OpenMP, each kernel ends in a barrier,
    and on shared cores those barriers stall (a Nano load took 12 minutes on this loaded 2-core machine). Independent
    workers never wait on each other.
    """
    items = list(items)
    workers = min(torch.get_num_threads(), len(items)) if _PER_THREAD_NUM_THREADS else 1
    if workers <= 1:
        return [fn(i) for i in items]
    inference = torch.is_inference_mode_enabled()

    def run(item):
        with torch.inference_mode(inference):
            return fn(item)

    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(run, items))


def _padded(rows: int) -> int:
    return -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE


def _fill_int4(
    raw: torch.Tensor,
    t: GT,
    out_features: int,
    in_features: int,
    packed: torch.Tensor,
    scales_zeros: torch.Tensor,
    parallel: bool = True,
) -> None:
    """Repack raw blocks [out_features, row_bytes] into existing kernel-form tensors (padding rows left as they are).
    The one repacking routine: at load (`Int4Weight`) and on an offloaded expert's miss (`QExperts.fill_expert`)."""
    layout = LAYOUTS[t]
    k2 = in_features * (2 if layout.split else 1)
    step = CHUNK_ROWS if _packs_in_chunks(CHUNK_ROWS) else out_features

    def fill(start: int) -> None:
        end = min(start + step, out_features)
        n, s, z = _int4_rows(raw[start:end], t, in_features)
        if (end - start) % ROW_MULTIPLE:
            n = torch.cat([n, n.new_zeros(_padded(end - start) - (end - start), k2)])
        packed[start : start + n.shape[0]] = _pack_rows(n)
        scales_zeros[:, start:end, 0] = s.t()
        scales_zeros[:, start:end, 1] = z.t()

    starts = range(0, out_features, step)
    if parallel:
        _parallel_map(fill, starts)
    else:
        for start in starts:
            fill(start)


def _int4_shapes(t: GT, out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Shapes of (packed, scales_zeros) for an [out_features, in_features] matrix of type t."""
    layout = LAYOUTS[t]
    k2 = in_features * (2 if layout.split else 1)
    rows = _padded(out_features)
    return (rows, k2 // 2), (k2 // layout.group, rows, 2)


_HI_MULT = torch.tensor([[1.0], [16.0]], dtype=KERNEL_DTYPE, device="cpu")


def _prep(layout: Layout, x: torch.Tensor) -> torch.Tensor:
    """bf16 x [M, K] -> the kernel's input [M, K'] (split layouts: each run of inputs as x, then 16 x)."""
    if not layout.split:
        return x
    g = layout.split
    return (x.reshape(x.shape[0], -1, 1, g) * _HI_MULT).reshape(x.shape[0], -1)


class Int4Weight:
    """One [N, K] matrix in the int4 kernel's form: packed [Np, K'/2] uint8, scales_zeros [K'/group, Np, 2] bf16.

    Rows are padded to a multiple of 16 with zero weights (the converter's precondition); outputs carry the padding.
    """

    def __init__(self, raw: torch.Tensor, t: GT, out_features: int, in_features: int, parallel: bool = True) -> None:
        self.layout = LAYOUTS[t]
        self.out_features, self.in_features = out_features, in_features
        packed_shape, sz_shape = _int4_shapes(t, out_features, in_features)
        self.packed = torch.zeros(packed_shape, dtype=torch.uint8, device="cpu")
        self.scales_zeros = torch.zeros(sz_shape, dtype=KERNEL_DTYPE, device="cpu")
        _fill_int4(raw, t, out_features, in_features, self.packed, self.scales_zeros, parallel)

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        return _prep(self.layout, x)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes


def _dense_view(raw: torch.Tensor, t: GT, in_features: int) -> torch.Tensor:
    """A zero-copy float view [..., in_features] of F32/F16/BF16 bytes."""
    return raw.view(DENSE[t]).reshape(*raw.shape[:-1], in_features)


def _dense_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T computed in the weight's dtype (a float32 weight keeps its precision), returned in x's dtype."""
    return F.linear(x.to(w.dtype), w).to(x.dtype)


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages; never discards data (unlike MADV_DONTNEED)


def release_pages(t: torch.Tensor) -> None:
    """Ask the kernel to reclaim the pages behind `t`, e.g. file pages read once to repack them, so that the
    process's resident memory holds the repacked copy only (a memory-mapped file's pages count as resident once
    touched). A hint: errors and other platforms are ignored, and the data stays readable (it is paged back in)."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or not t.is_contiguous() or not t.nbytes:
        return
    start, end = t.data_ptr(), t.data_ptr() + t.nbytes
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)


_MADV_POPULATE_READ = 22  # Linux >= 5.14: map the pages in now (reading the file where it is not cached)


def prefault(t: torch.Tensor) -> None:
    """Map the pages behind `t` (a view of a memory-mapped file) into the process now, at load, as llama.cpp does.

    Why: the native kernels read the file's pages in place, and each first touch of a page costs a page fault; left
    to decode, those faults land in whichever token first routes to an expert, a step several times slower than the
    others. Without MADV_POPULATE_READ (older kernels, other platforms) every page is touched by a strided read
    instead."""
    if t.device.type != "cpu" or not t.nbytes:
        return
    if sys.platform.startswith("linux") and t.is_contiguous():
        start, end = t.data_ptr(), t.data_ptr() + t.nbytes
        first = start // mmap.PAGESIZE * mmap.PAGESIZE
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), _MADV_POPULATE_READ) == 0:
            return
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)
    int(flat[:: mmap.PAGESIZE].sum())


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`). Repacking frees many MiB-sized temporaries on worker
    threads, whose malloc arenas would keep them as resident memory (GiBs on a Nano-sized load). A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _as_type(ggml_type: GT | int | str) -> GT:
    return codec_for(ggml_type).ggml_type


def _lookup(codec: Codec, raw: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of `raw` dequantized exactly to float32 [n, row length]: by the native kernels (bit-exact, one call
    instead of a dozen torch ops per lookup), else by the codec's block function (`Codec.dequantize` hands work to a
    thread pool, which costs more than a few rows take)."""
    if native.supports(codec.ggml_type):
        return native.dequant_rows(raw, codec.ggml_type, ids, raw.shape[1] // codec.type_size * codec.block_size)
    rows = raw[ids.reshape(-1).cpu()]
    return codec._dequantize_blocks(rows.reshape(-1, codec.type_size)).reshape(rows.shape[0], -1)


def dequantize_rows(raw: torch.Tensor, ggml_type: GT | int | str) -> torch.Tensor:
    """Every row of `raw` [rows, row_bytes] dequantized exactly to float32 [rows, row length]."""
    return _lookup(codec_for(_as_type(ggml_type)), raw, torch.arange(raw.shape[0]))


class QLinear(nn.Module):
    """`x @ W.T` with W kept quantized (int4 kernel) or as a zero-copy float view of the file (F32/F16/BF16)."""

    def __init__(
        self, raw: torch.Tensor, ggml_type: GT | int | str, out_features: int, in_features: int, exact: bool = False
    ) -> None:
        super().__init__()
        self.exact = exact  # the reference: dequantize and multiply in float32 on every call (slow)
        self.ggml_type = _as_type(ggml_type)
        self.codec: Codec = codec_for(self.ggml_type)
        self.out_features, self.in_features = out_features, in_features
        _check_raw(raw, self.codec, (out_features,), in_features)
        self.raw = raw  # the file's bytes: the exact float32 path and `rows` read them
        self.dense = self.ggml_type in DENSE
        self.native = not self.dense and native.supports(self.ggml_type)
        self.q = None if self.dense or self.native else Int4Weight(raw, self.ggml_type, out_features, in_features)
        self.weight_view = _dense_view(raw, self.ggml_type, in_features) if self.dense else None

    def extra_repr(self) -> str:
        kernel = ", native" if self.native else ""
        return f"{self.in_features} -> {self.out_features}, {self.ggml_type.name}{kernel}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.dense:
            w = self.weight_view
            y = F.linear(x2, w.float()) if x.dtype == torch.float32 else _dense_mm(x2, w)
        elif self.exact:
            y = F.linear(x2.float(), self.codec.dequantize(self.raw)).to(x.dtype)
        elif self.native:
            y = native.matmul(x2.float(), self.raw, self.ggml_type, self.in_features).to(x.dtype)
        else:
            q = self.q
            xb = x2 if x2.dtype == KERNEL_DTYPE else x2.to(KERNEL_DTYPE)
            y = _MM(q.prep(xb), q.packed, q.layout.group, q.scales_zeros)
            if y.shape[1] != self.out_features:  # rows padded to a multiple of ROW_MULTIPLE
                y = y[:, : self.out_features]
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows `W[ids]` in float32 (embedding lookups from a tied output matrix)."""
        return _lookup(self.codec, self.raw, ids).reshape(*ids.shape, self.in_features)


class QEmbedding(nn.Module):
    """Embedding lookup from quantized rows: only the looked-up rows are dequantized (exactly, by the codec)."""

    def __init__(self, raw: torch.Tensor, ggml_type: GT | int | str, num_embeddings: int, dim: int, dtype) -> None:
        super().__init__()
        self.codec = codec_for(ggml_type)
        _check_raw(raw, self.codec, (num_embeddings,), dim)
        self.raw, self.dim, self.dtype = raw, dim, dtype
        self.num_embeddings = num_embeddings

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = _lookup(self.codec, self.raw, ids)
        return rows.reshape(*ids.shape, self.dim).to(device=ids.device, dtype=self.dtype)


class _Int4Bank:
    """The same projection of all E experts, int4-packed: per-expert views kept in lists (indexing costs no op).

    With `repack=False` nothing is repacked: the lists hold shape-only (meta) placeholders, which an offload runtime
    rebinds to its slots and fills expert by expert (`QExperts.fill_expert`)."""

    def __init__(
        self, raws: list[torch.Tensor], t: GT, num_experts: int, in_features: int, repack: bool = True
    ) -> None:
        out = sum(r.shape[1] for r in raws)  # gate and up are fused by stacking their rows
        self.out_features, self.in_features, self.ggml_type = out, in_features, t
        self.layout = LAYOUTS[t]
        self.group = self.layout.group
        if not repack:
            packed_shape, sz_shape = _int4_shapes(t, out, in_features)
            with torch.device("meta"):
                self.packed = [torch.empty(packed_shape, dtype=torch.uint8) for _ in range(num_experts)]
                self.scales_zeros = [torch.empty(sz_shape, dtype=KERNEL_DTYPE) for _ in range(num_experts)]
            return

        def one(e: int) -> Int4Weight:
            rows = torch.cat([r[e] for r in raws]) if len(raws) > 1 else raws[0][e]
            return Int4Weight(rows, t, out, in_features, parallel=False)

        weights = _parallel_map(one, range(num_experts))
        self.packed = [w.packed for w in weights]
        self.scales_zeros = [w.scales_zeros for w in weights]

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        return _prep(self.layout, x)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.packed) + sum(s.nbytes for s in self.scales_zeros)


def _stacked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a; b] along rows: a zero-copy view when b directly follows a in one buffer, else a copy."""
    same = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    if same and a.is_contiguous() and b.is_contiguous() and b.data_ptr() == a.data_ptr() + a.nbytes:
        return a.as_strided((a.shape[0] + b.shape[0], *a.shape[1:]), a.stride())
    return torch.cat([a, b])


def _check_raw(raw: torch.Tensor, codec: Codec, lead: tuple[int, ...], in_features: int) -> None:
    if in_features % codec.block_size:
        raise ValueError(f"{codec.name}: {in_features} inputs is not a multiple of the block size {codec.block_size}")
    want = (*lead, in_features // codec.block_size * codec.type_size)
    if raw.dtype != torch.uint8 or tuple(raw.shape) != want:
        raise ValueError(f"{codec.name}: expected uint8 bytes of shape {want}, got {raw.dtype} {tuple(raw.shape)}")


class QExperts(Experts):
    """`Experts` whose projections stay quantized. Gate and up are fused into one [2I, D] matrix per expert when they
    share a type, so each selected expert costs two int4 matmuls.

    Routing: prefill keeps the parent's grouped-by-expert `forward` (one `expert_forward` per used expert); a single
    bf16 token takes `_decode`, which runs the A selected experts with batched elementwise work and applies the
    routing weights before the (linear) down projection.
    """

    def __init__(
        self,
        gate_raw: torch.Tensor,
        up_raw: torch.Tensor,
        down_raw: torch.Tensor,
        ggml_types: tuple,
        num_experts: int,
        hidden: int,
        intermediate: int,
        in_file: str | None = None,
        exact: bool = False,
    ) -> None:
        with torch.device("meta"):  # the parent's float parameters are never materialised
            super().__init__(num_experts, hidden, intermediate)
        for name in ("gate_proj", "up_proj", "down_proj"):
            delattr(self, name)
        self.hidden, self.intermediate = hidden, intermediate
        self.exact = exact  # the reference: each call dequantizes the expert and multiplies in float32
        self.types = tuple(_as_type(t) for t in ggml_types)
        self.codecs = tuple(codec_for(t) for t in self.types)
        _check_raw(gate_raw, self.codecs[0], (num_experts, intermediate), hidden)
        _check_raw(up_raw, self.codecs[1], (num_experts, intermediate), hidden)
        _check_raw(down_raw, self.codecs[2], (num_experts, hidden), intermediate)
        self.raws = (gate_raw, up_raw, down_raw)
        gt, ut, dt = self.types
        self.dense = any(t in DENSE for t in self.types)
        self.native = not self.dense and all(native.supports(t) for t in self.types)
        if self.native and in_file:  # the native kernels read raw blocks: an offload slot holds them as they are
            in_file = "raw"
        self.fused: _Int4Bank | None = None
        # in_file ("int4" or "raw"): nothing is repacked here. An offload runtime owns the per-expert data (its
        # slots) and fills a slot with `fill_expert` from the expert's raw blocks, read from the file on a miss.
        # "int4" slots hold only the kernel form (bf16/f16 models): the file's views move to a private name, which the
        # slot layout does not pick up. "raw" slots hold only the raw blocks (float32 models: the exact path; the
        # native kernels).
        self.in_file = None if self.dense else in_file
        self._file_raws = self.raws
        if self.in_file == "int4":
            self.raws = None
        if self.dense:  # float experts: zero-copy views, plain matmuls
            # per projection: a file may mix a float projection with quantized ones (None: dequantized per call)
            self.views = tuple(
                _dense_view(r, t, r.shape[-1] // codec_for(t).type_size * codec_for(t).block_size)
                if t in DENSE
                else None
                for r, t in zip(self.raws, self.types, strict=True)
            )
            return
        if self.in_file == "raw" or self.native:
            return
        repack = self.in_file is None
        if gt == ut:
            self.fused = _Int4Bank([gate_raw, up_raw], gt, num_experts, hidden, repack)
        else:
            self.gate_bank = _Int4Bank([gate_raw], gt, num_experts, hidden, repack)
            self.up_bank = _Int4Bank([up_raw], ut, num_experts, hidden, repack)
        self.down_bank = _Int4Bank([down_raw], dt, num_experts, intermediate, repack)

    @property
    def file_raws(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stacked raw expert tensors (gate, up, down) as zero-copy views of the file."""
        return self._file_raws

    def fill_expert(
        self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, dst: dict[str, torch.Tensor]
    ) -> None:
        """Repack one expert's raw blocks (gate/up [I, row_bytes], down [D, row_bytes]) into `dst`, one offload slot's
        per-expert tensors keyed by their attribute path ("fused.packed", "down_bank.scales_zeros", "raws.0", ...).
        Same routine and chunking as the load-time repack, so a slot holds exactly the bytes a fully resident model
        holds for that expert. When `up` directly follows `gate` in one buffer, gate/up are one [2I, row_bytes]
        matrix without a copy. "raw" slots get the blocks as they are."""
        if self.in_file == "raw":
            for i, src in enumerate((gate, up, down)):
                dst[f"raws.{i}"].copy_(src)
            return
        jobs = [("down_bank", down)]
        if self.fused is not None:
            jobs.append(("fused", _stacked(gate, up)))
        else:
            jobs += [("gate_bank", gate), ("up_bank", up)]
        for name, raw in jobs:
            b = getattr(self, name)
            packed, sz = dst[f"{name}.packed"], dst[f"{name}.scales_zeros"]
            _fill_int4(raw, b.ggml_type, b.out_features, b.in_features, packed, sz, parallel=False)

    def extra_repr(self) -> str:
        names = "/".join(t.name for t in self.types)
        return f"{self.num_experts} experts, {self.hidden} -> {self.intermediate}, {names}"

    def _gate_up(self, x: torch.Tensor, experts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 x [M, D] -> (gate, up) [len(experts) * M, I]: every listed expert applied to all of x."""
        I = self.intermediate
        if self.fused is not None:
            b = self.fused
            xp = b.prep(x)
            h = [_MM(xp, b.packed[e], b.group, b.scales_zeros[e]) for e in experts]
            h = h[0] if len(h) == 1 else torch.cat(h)
            return h[:, :I], h[:, I : 2 * I]
        outs = []
        for b in (self.gate_bank, self.up_bank):
            xp = b.prep(x)
            h = [_MM(xp, b.packed[e], b.group, b.scales_zeros[e]) for e in experts]
            outs.append((h[0] if len(h) == 1 else torch.cat(h))[:, :I])
        return outs[0], outs[1]

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            g, u, d = (c.dequantize(r[e]) for c, r in zip(self.codecs, self.raws, strict=True))
            xf = x.float()
            return F.linear(F.silu(F.linear(xf, g)) * F.linear(xf, u), d).to(x.dtype)
        if self.native:
            (g, u, d), (gt, ut, dt) = self.raws, self.types
            xf = x.float()
            h = native.matmul(xf, g[e], gt, self.hidden)
            h = F.silu(h) * native.matmul(xf, u[e], ut, self.hidden)
            return native.matmul(h, d[e], dt, self.intermediate).to(x.dtype)
        if self.dense:
            g, u, d = (
                v[e] if v is not None else c.dequantize(r[e])
                for v, c, r in zip(self.views, self.codecs, self.raws, strict=True)
            )
            return _dense_mm(F.silu(_dense_mm(x, g)) * _dense_mm(x, u), d)
        gate, up = self._gate_up(x.to(KERNEL_DTYPE), [e])
        b = self.down_bank
        y = _MM(b.prep(F.silu(gate) * up), b.packed[e], b.group, b.scales_zeros[e])
        return y[:, : self.hidden].to(x.dtype)

    def _decode(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token: x [1, D], idx/weights [1, A] -> [1, D]."""
        return self.sum_rows(self.decode_rows(x, idx, weights), x.dtype)

    def decode_rows(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token's output through each listed expert, routing weight applied: [A, D'] (int4 kernels). Each row is
        computed alone, so an offload cache with fewer slots than a token's experts computes them in groups and sums
        them once (`sum_rows`), bit-identical to `_decode`."""
        experts = idx[0].tolist()
        gate, up = self._gate_up(x.to(KERNEL_DTYPE), experts)  # [A, I] each
        a = F.silu(gate) * up * weights.reshape(-1, 1).to(KERNEL_DTYPE)  # routing weight folded in before down
        b = self.down_bank
        ap = b.prep(a)
        ys = [_MM(r, b.packed[e], b.group, b.scales_zeros[e]) for r, e in zip(ap.split(1), experts, strict=True)]
        return torch.cat(ys)

    def sum_rows(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return rows.sum(0, keepdim=True)[:, : self.hidden].to(dtype)

    def _decode_native(
        self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One token through the selected experts in one native call (the raws may be file views or slots); with
        `out` (float32 [D]) the result is added onto it, in the additions' order of a single call (see
        `native.moe`), and `out` is returned."""
        experts = idx.reshape(-1).tolist()
        ptrs = []
        for r in self.raws:
            base, stride = r.data_ptr(), r.stride(0)  # uint8: strides are bytes
            ptrs.append([base + e * stride for e in experts])
        w = weights.reshape(-1).float()
        y = native.moe(x.reshape(-1).float(), *ptrs, w, self.types, self.hidden, self.intermediate, out=out)
        return y if out is not None else y.view(1, -1).to(x.dtype)

    def decode_into(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
        """Add one token's output through the listed experts onto the float32 `out` [D] (native kernels only): an
        offload cache with fewer slots than a token's experts runs them in groups this way, bit-identical to one
        call over all of them."""
        self._decode_native(x, idx, weights, out)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and not self.dense and not self.exact:
            if self.native:
                return self._decode_native(x, idx, weights)
            return self._decode(x, idx, weights)
        return super().forward(x, idx, weights)


class NativeMoeBlock(SparseMoeBlock):
    """`SparseMoeBlock` whose one-token path runs in the native kernels: the routing (`native.route`: logits from
    the bf16 or float32 router accumulated in float32, softmax, top-k) always, and routing plus experts in one call
    (`native.moe_routed`) when the experts are native, resident and unobserved (a hook, e.g. a trace recorder, must
    see every experts call) and `route` is the block's own. Offloaded experts get the same routing through `route`,
    so their output stays bit-identical to the resident model's. Several tokens, float32 and f16 keep the parent's
    code."""

    def _native_route(self, x: torch.Tensor) -> bool:
        w = self.gate.weight
        dtypes = (torch.bfloat16, torch.float32)
        exact = getattr(self.experts, "exact", False)
        return x.dtype in dtypes and w.dtype in dtypes and not exact and native.available()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] == 1 and self._native_route(x):
            ids, weights = native.route(x.reshape(-1).float(), self.gate.weight, self.top_k, self.norm_topk_prob)
            return ids.view(1, -1), weights.view(1, -1).to(x.dtype)
        return super().route(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        ex = self.experts
        fused = isinstance(ex, QExperts) and ex.native and ex.raws is not None and not ex.in_file
        own_route = "route" not in vars(self)  # not replaced on the instance (a bench's synthetic trace)
        observed = ex._forward_hooks or ex._forward_pre_hooks
        if B * T == 1 and fused and own_route and self._native_route(x) and not observed:
            flat = x.reshape(D).float()
            y = native.moe_routed(
                flat, self.gate.weight, self.top_k, self.norm_topk_prob, ex.raws, ex.types, ex.intermediate,
                x.dtype == torch.bfloat16,
            )  # fmt: skip
            return y.view(B, T, D).to(x.dtype)
        return super().forward(x)


def make_linear(raw: torch.Tensor, ggml_type, out_features: int, in_features: int, exact: bool = False) -> QLinear:
    """A module computing `x @ W.T` for the GGUF tensor whose raw bytes are `raw` [out_features, row_bytes]; `exact`:
    the float32 reference (see QLinear)."""
    lin = QLinear(raw, ggml_type, out_features, in_features, exact)
    if lin.native:
        prefault(raw)
    if lin.q is not None:
        release_pages(raw)  # repacked: the file's pages are only read again by the float32 path and `rows`
        if out_features * in_features >= 1 << 24:
            trim_heap()
    return lin


def make_experts(
    gate_raw: torch.Tensor,
    up_raw: torch.Tensor,
    down_raw: torch.Tensor,
    ggml_types: tuple,
    num_experts: int,
    hidden: int,
    intermediate: int,
    in_file: str | None = None,
    exact: bool = False,
) -> QExperts:
    """The experts of one layer from `ffn_{gate,up,down}_exps` bytes: gate/up [E, I, bytes], down [E, D, bytes].
    `in_file` ("int4" / "raw", see `QExperts`): repack nothing and touch no expert page (the experts are offloaded)."""
    experts = QExperts(gate_raw, up_raw, down_raw, ggml_types, num_experts, hidden, intermediate, in_file, exact)
    if experts.native and not experts.in_file:
        for raw in (gate_raw, up_raw, down_raw):
            prefault(raw)
    if not experts.dense and not experts.in_file and not experts.native:
        for raw in (gate_raw, up_raw, down_raw):
            release_pages(raw)
        trim_heap()
    return experts


def make_embedding(raw: torch.Tensor, ggml_type, num_embeddings: int, dim: int, dtype=torch.bfloat16) -> QEmbedding:
    """An embedding over `token_embd` bytes [num_embeddings, row_bytes]; outputs `dtype` (the model's compute dtype)."""
    return QEmbedding(raw, ggml_type, num_embeddings, dim, dtype)


def kernel_summary(model: nn.Module) -> str | None:
    """Which kernels a GGUF model's quantized products run on, for the CLI's verbose output: `native.describe()`
    ("native avx2 (no avx512 on this CPU)"), or "torch int4 (why the native kernels are not used)"; None when the
    model has no GGUF modules."""
    modules = [m for m in model.modules() if isinstance(m, (QLinear, QExperts)) and not getattr(m, "dense", False)]
    if not modules:
        return None
    if any(m.native for m in modules):
        return native.describe()
    return f"torch int4 ({native.unavailable_reason() or 'types the native kernels do not read'})"
