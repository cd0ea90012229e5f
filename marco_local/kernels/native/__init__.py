"""Native CPU kernels that compute on ggml blocks as they lie in a GGUF file (or an offload slot).

Why: torch's int4 kernel cannot read ggml's 5-, 6- and 8-bit blocks without repacking them into two nibbles, which
costs a private copy of the weights (RSS above the file size) and ~30% more bytes read per token. These kernels
quantize the activations to int8 blocks once per product (as llama.cpp does) and dot them with the weight blocks
directly, so GGUF weights stay zero-copy views of the memory-mapped file.

Files: ggml_dot.h (block and activation layouts), act_quant.c, dot_ref.c (plain-C reference dots), dot_legacy.c and
dot_kquants.c (vectorised dots, AVX2 and AVX-512), dot_plain.c (without AVX2: C that compilers vectorize), dot_neon.c
(ARM64), matmul.c (products, one token through a layer's experts), route.c (MoE routing), attention.c (one query over
a bf16 KV cache), decode.c (the other pieces of a decode step, for decode/native.py), dequant.c (rows dequantized to
float32, for embedding lookups), platform.h and parallel.c (symbol export, and the parallel-for every threaded kernel
goes through).

The C sources next to this file are compiled on first use with the system C compiler ($CC, else cc, gcc or clang)
into the cache (`~/.cache/marco-local/native/<hash>/`), keyed by the sources, flags, compiler and kernel tier; later
runs load the cached library. Kernel tiers (the C files pick their code paths from the compiler's ISA macros):

- `avx512`: -march=native on an x86-64 CPU with AVX-512 F/BW/VL (the VNNI dots where it has VNNI);
- `avx2`: -march=haswell (AVX2, FMA, F16C and nothing newer);
- `neon` (ARM64): NEON dots for Q8_0, Q4_K and Q6_K (dot_neon.c), plain C for the other types;
- `portable`: the plain-C paths, auto-vectorized for the baseline target (x86-64 without AVX; -mcpu=native on ARM64).

The best tier the CPU has is used; MARCO_NATIVE_ISA=avx512|avx2|neon|portable forces one (one this CPU lacks is an
error), and `use_tier` switches tiers inside one process (each tier is its own library file). `describe()` says which
runs and why. Threads: OpenMP where the compiler has it (Linux: the libgomp torch has loaded; macOS: torch's own
libomp, as a second OpenMP runtime in one process aborts it), else the kernels' own thread pool (parallel.c; always on
Windows, for the same reason); MARCO_NATIVE_OPENMP=0 forces the pool. Without a compiler, or with MARCO_NATIVE=0,
`library()` is None and callers keep torch's int4 path.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import NativeTierError, not_a_number
from ...paths import cache_home

if TYPE_CHECKING:  # torch is imported where tensors are made: `marco info` names the kernels without it
    import torch

HERE = Path(__file__).parent
# -fno-math-errno: lrintf/sqrtf become single instructions instead of libm calls
FLAGS = ["-O3", "-fno-math-errno", "-std=gnu11", "-shared"]
# ggml type ids the kernels read (GGUF numbering)
SUPPORTED_TYPES = frozenset({2, 3, 6, 7, 8, 12, 13, 14})  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K
TIERS = ("avx512", "avx2", "neon", "portable")  # best first
# CPU features (lower case, no underscores: Linux's avx512_vnni, macOS's AVX512VNNI) each x86 tier's code needs
_X86_NEEDS = {
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"},
    "avx2": {"avx2", "fma", "f16c"},
    "portable": set(),
}
# Compiler flags per x86 tier: explicit targets, so that each tier defines exactly its ISA macros whatever the CPU
_X86_FLAGS = {"avx512": ["-march=native"], "avx2": ["-march=haswell"], "portable": ["-march=x86-64", "-mtune=generic"]}
# ARM64: -mcpu=native where the compiler takes it (Apple clang before 15 and cross compilers may not)
_ARM64_FLAGS = {"neon": [["-mcpu=native", "-DMARCO_NEON"], ["-DMARCO_NEON"]], "portable": [["-mcpu=native"], []]}
NO_COMPILER = "no C compiler found: install gcc or clang for ~3x faster decode"


class _Built:
    """One tier's library, or why there is none."""

    def __init__(self, lib: ctypes.CDLL | None, reason: str | None) -> None:
        self.lib, self.reason = lib, reason
        self.info = lib.marco_build_info().decode() if lib is not None else ""


_built: dict[tuple[str, bool], _Built] = {}
_tier_override: list[tuple[str, bool | None]] = []  # use_tier's stack: (tier, openmp)


def _sources() -> list[Path]:
    return sorted(HERE.glob("*.c")) + sorted(HERE.glob("*.h"))


def _system() -> str:
    return platform.system()


def _arch() -> str:
    """The machine as the tiers name it: x86_64, arm64, or platform.machine() lower-cased."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)


def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"], posix=os.name != "nt")
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _normalize(names: str) -> set[str]:
    return {n.lower().replace("_", "").replace(".", "") for n in names.split()}


# cpuid and xgetbv (the OS must save the AVX / AVX-512 registers): gcc and clang on every OS, no runtime library
_PROBE = r"""
#include <cpuid.h>
#include <stdio.h>
int main(void) {
    unsigned a, b, c, d, lo = 0, hi = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int fma = c >> 12 & 1, osxsave = c >> 27 & 1, avx = c >> 28 & 1, f16c = c >> 29 & 1;
    if (osxsave) __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    int ymm = (lo & 0x6) == 0x6, zmm = (lo & 0xE6) == 0xE6;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (avx && ymm && (b >> 5 & 1)) printf("avx2 ");
    if (avx && ymm && fma) printf("fma ");
    if (avx && ymm && f16c) printf("f16c ");
    if (zmm && (b >> 16 & 1)) printf("avx512f ");
    if (zmm && (b >> 30 & 1)) printf("avx512bw ");
    if (zmm && (b >> 31 & 1)) printf("avx512vl ");
    if (zmm && (c >> 11 & 1)) printf("avx512vnni ");
    return 0;
}
"""


def _probe_features(cc: list[str]) -> set[str] | None:
    """x86 features from a compiled probe, for systems without /proc/cpuinfo or sysctl (Windows). None when the
    probe cannot be built or run."""
    with tempfile.TemporaryDirectory(prefix="marco-probe-") as tmp:
        src, exe = Path(tmp) / "probe.c", Path(tmp) / ("probe.exe" if os.name == "nt" else "probe")
        src.write_text(_PROBE)
        try:
            if subprocess.run([*cc, "-O1", "-o", str(exe), str(src)], capture_output=True, timeout=60).returncode:
                return None
            done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return _normalize(done.stdout) if done.returncode == 0 else None


@functools.cache
def cpu_features() -> frozenset[str] | None:
    """This x86 CPU's features that choose a tier (lower case, no underscores); None where they cannot be read."""
    if _system() == "Linux":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    return frozenset(_normalize(line.split(":", 1)[1]))
        except OSError:
            pass
    if _system() == "Darwin":
        try:
            keys = ["machdep.cpu.features", "machdep.cpu.leaf7_features"]
            done = subprocess.run(["sysctl", "-n", *keys], capture_output=True, text=True, timeout=30)
            if done.returncode == 0 and done.stdout.strip():
                return frozenset(_normalize(done.stdout))
        except (OSError, subprocess.SubprocessError):
            pass
    cc = _compiler()
    found = _probe_features(cc) if cc else None
    return frozenset(found) if found is not None else None


def supported_tiers() -> list[str]:
    """The tiers this CPU can run, best first."""
    if _arch() == "arm64":
        return ["neon", "portable"]  # NEON is part of ARMv8-A
    if _arch() != "x86_64":
        return ["portable"]
    features = cpu_features() or frozenset()
    return [t for t in TIERS if t in _X86_NEEDS and _X86_NEEDS[t] <= features]


def _auto_tier() -> tuple[str, str]:
    """(the best tier, why not a better one: "" for the best there is)."""
    tiers = supported_tiers()
    if _arch() == "arm64":
        return "neon", ""
    if _arch() != "x86_64":
        return "portable", f"no vector kernels for {platform.machine()} yet"
    if cpu_features() is None:
        return "portable", "this CPU's features could not be read"
    why = {"avx512": "", "avx2": "no avx512 on this CPU", "portable": "no AVX2 on this CPU"}
    return tiers[0], why[tiers[0]]


def _check_tier(tier: str, source: str) -> None:
    if tier not in TIERS:
        raise NativeTierError(f"{source}: {tier!r} is not a kernel tier", hint=f"use one of: {', '.join(TIERS)}")
    if tier not in supported_tiers():
        have = ", ".join(supported_tiers())
        raise NativeTierError(f"{source}: this CPU cannot run the {tier} kernels", hint=f"this CPU runs: {have}")


def _selected() -> tuple[str, bool, str] | None:
    """(tier, OpenMP allowed, why this tier) for the next `library()` call; None when native kernels are disabled."""
    if os.environ.get("MARCO_NATIVE", "1") == "0":
        return None
    openmp = os.environ.get("MARCO_NATIVE_OPENMP", "1") != "0"
    if _tier_override:
        tier, forced_openmp = _tier_override[-1]
        return tier, openmp if forced_openmp is None else forced_openmp, "chosen by use_tier"
    forced = os.environ.get("MARCO_NATIVE_ISA", "").strip().lower()
    if forced:
        _check_tier(forced, f"MARCO_NATIVE_ISA={forced}")
        return forced, openmp, "forced by MARCO_NATIVE_ISA"
    tier, why = _auto_tier()
    return tier, openmp, why


@contextlib.contextmanager
def use_tier(tier: str, openmp: bool | None = None) -> Iterator[None]:
    """Run the kernels of `tier` inside the block (tests pin each tier this way); openmp=False builds it with the
    kernels' own thread pool instead of OpenMP. MARCO_NATIVE=0 still wins."""
    _check_tier(tier, "use_tier")
    _tier_override.append((tier, openmp))
    try:
        yield
    finally:
        _tier_override.pop()


def _tier_flags(tier: str) -> list[list[str]]:
    """Alternatives for the tier's target flags, best first."""
    if _arch() == "x86_64":
        return [_X86_FLAGS[tier]]
    if _arch() == "arm64":
        return _ARM64_FLAGS[tier]
    return [[]]


def _openmp_flags(openmp: bool) -> list[list[str]]:
    """Alternatives for threading, best first; [] is the kernels' own thread pool."""
    alts: list[list[str]] = []
    if openmp and _system() == "Darwin":
        import torch

        # Apple clang takes OpenMP only through the preprocessor; the runtime must be torch's own libomp
        torch_lib = Path(torch.__file__).parent / "lib"
        if (torch_lib / "libomp.dylib").exists():
            alts.append(["-Xpreprocessor", "-fopenmp", f"-L{torch_lib}", "-lomp", f"-Wl,-rpath,{torch_lib}"])
    elif openmp and _system() != "Windows":
        alts.append(["-fopenmp"])
    return [*alts, []]


def _library_suffix() -> str:
    return {"Windows": ".dll", "Darwin": ".dylib"}.get(_system(), ".so")


def _platform_flags(cc: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(compile flags, libraries) for this OS."""
    if _system() == "Windows":  # mingw: libgcc linked in, or the DLL needs libgcc_s_seh-1.dll on PATH
        return (["-static-libgcc"] if cc and "gcc" in Path(cc[0]).name else []), []
    return ["-fPIC", "-pthread"], ["-lm"]


def _build_key(cc: list[str], flags: list[str]) -> str:
    h = hashlib.sha256()
    for src in _sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [" ".join(flags), version, platform.system(), platform.machine()]
    if any("native" in f for f in flags):  # the library depends on this CPU
        parts.append(" ".join(sorted(cpu_features() or ())) + platform.processor())
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _compile(cc: list[str], flags: list[str], libs: list[str]) -> Path:
    out_dir = cache_home() / "native" / _build_key(cc, flags)
    lib_path = out_dir / f"libmarco_ggml{_library_suffix()}"
    if lib_path.exists():
        return lib_path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=_library_suffix(), dir=out_dir)
    os.close(fd)
    try:
        c_files = [str(s) for s in _sources() if s.suffix == ".c"]
        done = subprocess.run([*cc, *flags, "-o", tmp, *c_files, *libs], capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"compiling the native kernels failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, lib_path)  # atomic: concurrent builders each install a complete library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib_path


def _build(tier: str, openmp: bool) -> ctypes.CDLL:
    """Compile (or find in the cache) and load the tier's library, trying the flag alternatives in order: the first
    that compiles and loads wins."""
    cc = _compiler()
    if not cc:
        raise RuntimeError(NO_COMPILER)
    platform_flags, libs = _platform_flags(cc)
    first_error: Exception | None = None
    for target in _tier_flags(tier):
        for threads in _openmp_flags(openmp):
            flags = [*FLAGS, *target, *threads, *platform_flags]
            try:
                return _bind(ctypes.CDLL(str(_compile(cc, flags, libs))))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                first_error = first_error or e
    assert first_error is not None
    raise first_error


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.marco_row_bytes.argtypes, lib.marco_row_bytes.restype = [i, i], i64
    lib.marco_matmul.argtypes = [i, p, i64, i, i, p, i, p, i]
    lib.marco_matmul.restype = i
    lib.marco_moe.argtypes = [i, p, p, p, p, i, i, i, i, i, p, p, i]
    lib.marco_moe.restype = i
    lib.marco_moe_acc.argtypes, lib.marco_moe_acc.restype = lib.marco_moe.argtypes, i
    lib.marco_dot_ref.argtypes, lib.marco_dot_ref.restype = [i, p, i, p], f
    lib.marco_route.argtypes, lib.marco_route.restype = [p, p, i, i, i, i, i, i, p, p, i], i
    lib.marco_moe_routed.argtypes = [p, p, i, i, i, i, i, i64, i64, i64, i64, i64, i64, i, i, i, i, i, p, p, p, i]
    lib.marco_moe_routed.restype = i
    lib.marco_rms_norm.argtypes, lib.marco_rms_norm.restype = [p, p, i, f, p], None
    lib.marco_attn_decode.argtypes = [p, i, i, i, p, p, f, p, p, p, p, i64, i, i, p, i]
    lib.marco_attn_decode.restype = i
    lib.marco_matmul_multi.argtypes = [i, p, p, p, p, i, p, p, i]
    lib.marco_matmul_multi.restype = i
    lib.marco_attend.argtypes, lib.marco_attend.restype = [p, p, p, i64, i, i, i, i, f, i, p, i], i
    lib.marco_dequant_rows.argtypes, lib.marco_dequant_rows.restype = [i, p, i64, i64, p, i, i, p], i
    lib.marco_build_info.argtypes, lib.marco_build_info.restype = [], ctypes.c_char_p
    lib.marco_threads_used.argtypes, lib.marco_threads_used.restype = [i], i
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels of the selected tier, built on first call; None when they cannot be had (see
    `unavailable_reason`). Raises NativeTierError when MARCO_NATIVE_ISA names a tier this CPU cannot run."""
    return _current().lib


def _current() -> _Built:
    sel = _selected()
    if sel is None:
        return _DISABLED
    tier, openmp, _ = sel
    built = _built.get((tier, openmp))
    if built is None:
        try:
            built = _Built(_build(tier, openmp), None)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            built = _Built(None, str(e))
        _built[(tier, openmp)] = built
    return built


_DISABLED = _Built(None, "disabled by MARCO_NATIVE=0")


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    return _current().reason


def describe() -> str:
    """One line for the CLI: which kernels run and why, e.g. "native avx2 (no avx512 on this CPU)" or "torch (no C
    compiler found: ...)"."""
    built = _current()
    if built.lib is None:
        return f"torch ({built.reason})"
    tier = next(t for t in TIERS if built.info.startswith(t))
    why = (_selected() or ("", True, ""))[2]
    notes = [why] if why else []
    if built.info.endswith(" threads"):
        notes.append("without OpenMP")
    return f"native {tier}" + (f" ({'; '.join(notes)})" if notes else "")


def build_info() -> str:
    """What the loaded library was compiled for: "<tier> [vnni] openmp|threads" (tests check each tier's build)."""
    return _current().info


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
    import torch

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
    import torch

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
    float32 [top_k]). Same semantics as `SparseMoeBlock.route` (logits accumulated in float32) before the weights
    are cast to the activations' dtype."""
    import torch

    ids = torch.empty(top_k, dtype=torch.int32)
    weights = torch.empty(top_k, dtype=torch.float32)
    E, D = router.shape
    code = library().marco_route(
        x.data_ptr(), router.data_ptr(), int(router.dtype == torch.float32), E, D, top_k, int(norm_topk), 0,
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
    round_bf16: bool,
) -> torch.Tensor:
    """`route` and `moe` in one call, for experts stacked as raws (gate/up [E, I, bytes], down [E, D, bytes]);
    round_bf16: the routing weights rounded to bf16 first, as a bf16 model's torch path has them."""
    import torch

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
        int(round_bf16),
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


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token over a 16-bit cache: q float32 [H, hd]; keys/values bf16 or float16 [H_kv, n, hd] views whose
    positions are contiguous rows (a KV cache's layer slice). Returns float32 [H, hd]."""
    import torch

    if keys.dtype not in (torch.bfloat16, torch.float16) or values.dtype != keys.dtype:
        raise ValueError(f"native attention reads bf16 or float16 caches, not {keys.dtype}")
    lib = library()
    n_heads, hd = q.shape
    n_kv, n_pos, _ = keys.shape
    if keys.stride() != values.stride() or keys.stride(1) != hd or keys.stride(2) != 1:
        raise ValueError("native attention: keys and values must be [H_kv, n, hd] slices with contiguous positions")
    q = q.contiguous()
    out = torch.empty(n_heads, hd, dtype=torch.float32)
    code = lib.marco_attend(
        q.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        keys.stride(0),
        n_pos,
        n_heads,
        n_kv,
        hd,
        scale,
        int(keys.dtype == torch.float16),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    _check(code)
    return out


def dequant_rows(raw: torch.Tensor, ggml_type: int, ids: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows `ids` of the ggml matrix `raw` [N, row_bytes] dequantized to float32 [len(ids), in_features], bit-exact
    with ggml (an embedding lookup)."""
    import torch

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
