"""Native CPU kernels that compute on ggml blocks as they lie in a GGUF file (or an offload slot).

Why: torch's int4 kernel cannot read ggml's 5-, 6- and 8-bit blocks without repacking them into two nibbles, which
costs a private copy of the weights (RSS above the file size) and ~30% more bytes read per token. These kernels
quantize the activations to int8 blocks once per product (as llama.cpp does) and dot them with the weight blocks
directly, so GGUF weights stay zero-copy views of the memory-mapped file.

Files: ggml_dot.h (block and activation layouts), act_quant.c, dot_ref.c (plain-C reference dots), dot_legacy.c and
dot_kquants.c (vectorised dots), matmul.c (products, one token through a layer's experts), route.c (MoE routing),
attention.c (one query over a bf16 KV cache), decode.c (the other pieces of a decode step, for native_decode.py),
dequant.c (rows dequantized to float32, for embedding lookups), bpe.c (the byte-level BPE tokenizer of bpe.py).

The C sources next to this file are compiled on first use with the system C compiler (`cc`, or $CC) for this CPU
(-march=native), into the cache (`~/.cache/marco-local/native/<hash>/`), keyed by the sources, flags, compiler and
CPU flags; later runs load the cached library. Without a compiler, on a CPU without AVX2 (x86-64 only), or with
MARCO_NATIVE=0, `library()` is None and callers keep torch's int4 path. Threads: OpenMP in the libgomp torch has
loaded, sized by torch.get_num_threads().
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..errors import not_a_number
from ..paths import cache_home

HERE = Path(__file__).parent
# -fno-math-errno: lrintf/sqrtf become single instructions instead of libm calls (2.2 -> 0.8 us to quantize 1024
# activations)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-std=gnu11", "-shared", "-fPIC"]
# ggml type ids the kernels read (GGUF numbering)
SUPPORTED_TYPES = frozenset({2, 3, 6, 7, 8, 12, 13, 14})  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def _sources() -> list[Path]:
    return sorted(HERE.glob("*.c")) + sorted(HERE.glob("*.h"))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_key(cc: str) -> str:
    h = hashlib.sha256()
    for src in _sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    for part in (" ".join(FLAGS), version, platform.machine(), _cpu_flags()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) found")
    out_dir = cache_home() / "native" / _build_key(cc)
    lib_path = out_dir / "libmarco_ggml.so"
    if not lib_path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            c_files = [str(s) for s in _sources() if s.suffix == ".c"]
            done = subprocess.run([cc, *FLAGS, "-o", tmp, *c_files, "-lm"], capture_output=True, text=True, timeout=600)
            if done.returncode:
                raise RuntimeError(f"compiling the native kernels failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, lib_path)  # atomic: concurrent builders each install a complete library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return _bind(ctypes.CDLL(str(lib_path)))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.marco_row_bytes.argtypes, lib.marco_row_bytes.restype = [i, i], i64
    lib.marco_matmul.argtypes = [i, p, i64, i, i, p, i, p, i]
    lib.marco_matmul.restype = i
    lib.marco_moe.argtypes = [i, p, p, p, p, i, i, i, i, i, p, p, i]
    lib.marco_moe.restype = i
    lib.marco_moe_acc.argtypes, lib.marco_moe_acc.restype = lib.marco_moe.argtypes, i
    lib.marco_dot_ref.argtypes, lib.marco_dot_ref.restype = [i, p, i, p], f
    lib.marco_route.argtypes, lib.marco_route.restype = [p, p, i, i, i, i, i, p, p, i], i
    lib.marco_moe_routed.argtypes = [p, p, i, i, i, i, i64, i64, i64, i64, i64, i64, i, i, i, i, i, p, p, p, i]
    lib.marco_moe_routed.restype = i
    lib.marco_rms_norm.argtypes, lib.marco_rms_norm.restype = [p, p, i, f, p], None
    lib.marco_attn_decode.argtypes = [p, i, i, i, p, p, f, p, p, p, p, i64, i, p, i]
    lib.marco_attn_decode.restype = i
    lib.marco_matmul_multi.argtypes = [i, p, p, p, p, i, p, p, i]
    lib.marco_matmul_multi.restype = i
    lib.marco_attend_bf16.argtypes = [p, p, p, i64, i, i, i, i, f, p, i]
    lib.marco_attend_bf16.restype = i
    lib.marco_dequant_rows.argtypes, lib.marco_dequant_rows.restype = [i, p, i64, i64, p, i, i, p], i
    lib.marco_bpe_new.argtypes, lib.marco_bpe_new.restype = [p, i64, i, p, i64, i, p, p], p
    lib.marco_bpe_free.argtypes, lib.marco_bpe_free.restype = [p], None
    lib.marco_bpe_set_special.argtypes, lib.marco_bpe_set_special.restype = [p, i], None
    lib.marco_bpe_lookup.argtypes, lib.marco_bpe_lookup.restype = [p, p, i64], i
    lib.marco_bpe_encode.argtypes, lib.marco_bpe_encode.restype = [p, p, p, i64, i, p], i64
    lib.marco_bpe_decode.argtypes, lib.marco_bpe_decode.restype = [p, p, i64, i, p, i64], i64
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None when they cannot be had (see `unavailable_reason`)."""
    global _lib, _reason, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MARCO_NATIVE", "1") == "0":
            _reason = "disabled by MARCO_NATIVE=0"
        elif platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            _reason = f"not built for {platform.system()} {platform.machine()}"
        elif " avx2" not in _cpu_flags():  # the plain-C fallbacks are slower than torch's int4 kernel
            _reason = "this CPU has no AVX2"
        else:
            try:
                _lib = _build()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _reason = str(e)
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _reason


def supports(ggml_type: int) -> bool:
    """Whether the native kernels read this ggml type (and are available)."""
    return int(ggml_type) in SUPPORTED_TYPES and available()


def _check(code: int) -> None:
    if code == -1:
        raise ValueError("native kernel: unsupported type or shape")
    if code == -3:
        raise not_a_number()
    if code:
        raise MemoryError("native kernel: out of scratch memory")


def matmul(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, in_features: int) -> torch.Tensor:
    """float32 x [M, K] @ W.T -> float32 [M, N], W = the ggml rows `raw` [N, row_bytes] (rows may be strided)."""
    lib = library()
    x = x.contiguous()
    n, m = raw.shape[0], x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    stride = raw.stride(0) if n > 1 else raw.shape[1]
    code = lib.marco_matmul(
        int(ggml_type), raw.data_ptr(), stride, n, in_features, x.data_ptr(), m, y.data_ptr(), torch.get_num_threads()
    )
    _check(code)
    return y


def moe(
    x: torch.Tensor,
    gate_ptrs: list[int],
    up_ptrs: list[int],
    down_ptrs: list[int],
    route_weights: torch.Tensor,
    types: tuple[int, int, int],
    hidden: int,
    inter: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token (float32 x [hidden]) through the selected experts, whose matrices start at the given addresses;
    route_weights float32 [A]. Returns float32 [hidden]: sum_e w_e * down_e(silu(gate_e x) * up_e x), added onto
    `out` (float32 [hidden]) when given, in the same order of additions as one call over all the experts."""
    lib = library()
    a = len(gate_ptrs)
    arr = ctypes.c_int64 * a
    y = torch.empty(hidden, dtype=torch.float32) if out is None else out
    rw = route_weights.contiguous()
    code = (lib.marco_moe if out is None else lib.marco_moe_acc)(
        a,
        arr(*gate_ptrs),
        arr(*up_ptrs),
        arr(*down_ptrs),
        rw.data_ptr(),
        int(types[0]),
        int(types[1]),
        int(types[2]),
        hidden,
        inter,
        x.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    _check(code)
    return y


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One token's routing: float32 x [D], router [E, D] (bf16 or float32) -> (expert ids int64 [top_k], weights
    float32 [top_k], bf16-valued). Same semantics as `SparseMoeBlock.route` (logits accumulated in float32)."""
    ids = torch.empty(top_k, dtype=torch.int32)
    weights = torch.empty(top_k, dtype=torch.float32)
    E, D = router.shape
    code = library().marco_route(
        x.data_ptr(), router.data_ptr(), int(router.dtype == torch.float32), E, D, top_k, int(norm_topk),
        ids.data_ptr(), weights.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(code)
    return ids.long(), weights


def moe_routed(
    x: torch.Tensor,
    router: torch.Tensor,
    top_k: int,
    norm_topk: bool,
    raws: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    types: tuple[int, int, int],
    inter: int,
) -> torch.Tensor:
    """`route` and `moe` in one call, for experts stacked as raws (gate/up [E, I, bytes], down [E, D, bytes])."""
    E, D = router.shape
    y = torch.empty(D, dtype=torch.float32)
    ids = torch.empty(top_k, dtype=torch.int32)
    weights = torch.empty(top_k, dtype=torch.float32)
    g, u, d = raws
    code = library().marco_moe_routed(
        x.data_ptr(),
        router.data_ptr(),
        int(router.dtype == torch.float32),
        E,
        top_k,
        int(norm_topk),
        g.data_ptr(),
        g.stride(0),
        u.data_ptr(),
        u.stride(0),
        d.data_ptr(),
        d.stride(0),
        int(types[0]),
        int(types[1]),
        int(types[2]),
        D,
        inter,
        y.data_ptr(),
        ids.data_ptr(),
        weights.data_ptr(),
        torch.get_num_threads(),
    )
    _check(code)
    return y


def attend_bf16(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token over a bf16 cache: q float32 [H, hd]; keys/values bf16 [H_kv, n, hd] views whose positions
    are contiguous rows (a KV cache's layer slice). Returns float32 [H, hd]."""
    lib = library()
    n_heads, hd = q.shape
    n_kv, n_pos, _ = keys.shape
    if keys.stride() != values.stride() or keys.stride(1) != hd or keys.stride(2) != 1:
        raise ValueError("native attention: keys and values must be [H_kv, n, hd] slices with contiguous positions")
    q = q.contiguous()
    out = torch.empty(n_heads, hd, dtype=torch.float32)
    code = lib.marco_attend_bf16(
        q.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        keys.stride(0),
        n_pos,
        n_heads,
        n_kv,
        hd,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    _check(code)
    return out


def dequant_rows(raw: torch.Tensor, ggml_type: int, ids: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows `ids` of the ggml matrix `raw` [N, row_bytes] dequantized to float32 [len(ids), in_features], bit-exact
    with ggml (an embedding lookup)."""
    ids = ids.reshape(-1).to(device="cpu", dtype=torch.int64).contiguous()
    out = torch.empty(ids.numel(), in_features, dtype=torch.float32)
    stride = raw.stride(0) if raw.shape[0] > 1 else raw.shape[1]
    code = library().marco_dequant_rows(
        int(ggml_type), raw.data_ptr(), stride, raw.shape[0], ids.data_ptr(), ids.numel(), in_features, out.data_ptr()
    )
    if code == -2:
        raise IndexError(f"token id out of range for {raw.shape[0]} rows")
    _check(code)
    return out


def row_bytes(ggml_type: int, k: int) -> int:
    return int(library().marco_row_bytes(int(ggml_type), k))


def dot_reference(raw_row: torch.Tensor, ggml_type: int, x: torch.Tensor) -> float:
    """The plain-C kernel's dot of one ggml row with float32 x (tests compare the vectorised kernels with it)."""
    raw_row, x = raw_row.contiguous(), x.contiguous().float()
    return float(library().marco_dot_ref(int(ggml_type), raw_row.data_ptr(), x.numel(), x.data_ptr()))
