"""How the native kernels are built and chosen (marco_local/kernels/native/__init__.py): kernel tiers and their ISA
macros, the forced tier and its errors, the reason line the CLI prints, the build without OpenMP, and the fallbacks.

The kernels' numbers are tested per tier in tests/test_native*.py (the `native_tier` fixture); here, that each tier's
library really is compiled for its instruction set, and that the thread pool of no-OpenMP builds gives the OpenMP
build's results bit for bit.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from marco_local.errors import NativeTierError
from marco_local.kernels import native
from quant.ggml_codecs import codec_for

X86 = native._arch() == "x86_64"
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


def _run(code: str, **env: str | None) -> list[str]:
    full = {**os.environ}
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    done = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()


def _macros(flags: list[str]) -> set[str]:
    cc = native._compiler()
    out = subprocess.run([*cc, *flags, "-dM", "-E", "-"], input="", capture_output=True, text=True, check=True)
    return {line.split()[1] for line in out.stdout.splitlines() if line.startswith("#define ")}


def test_disabled_by_environment() -> None:
    code = (
        "from marco_local.kernels import native as n; print(n.available(), n.unavailable_reason()); print(n.describe())"
    )
    out = _run(code, MARCO_NATIVE="0")
    assert out == ["False disabled by MARCO_NATIVE=0", "torch (disabled by MARCO_NATIVE=0)"]


def test_a_failing_compiler_falls_back_with_a_reason(tmp_path) -> None:
    """No usable compiler: the kernels are unavailable, with the reason; nothing half-built is left in the cache."""
    code = "from marco_local.kernels import native; print(native.available()); print(native.unavailable_reason())"
    available, reason = _run(code, CC="false", MARCO_HOME=str(tmp_path), MARCO_NATIVE=None)
    assert available == "False" and reason.startswith("compiling the native kernels failed")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # no library, no temporary file


def test_no_compiler_is_said_with_what_to_install(tmp_path) -> None:
    code = "from marco_local.kernels import native; print(native.describe())"
    out = _run(code, CC=None, PATH=str(tmp_path), MARCO_HOME=str(tmp_path), MARCO_NATIVE=None)
    assert out == ["torch (no C compiler found: install gcc or clang for ~3x faster decode)"]


@pytest.mark.skipif(not X86 or native._compiler() is None, reason="x86-64 tiers, with a compiler")
def test_each_x86_tier_defines_exactly_its_isa() -> None:
    """The flags of each tier (as `cc -dM -E` sees them): avx2 has no AVX-512 macro, portable no AVX at all, so the
    C files compile the code paths the tier names."""
    avx512 = {m for m in _macros(native._X86_FLAGS["avx2"]) if m.startswith("__AVX512")}
    assert avx512 == set()
    avx2 = _macros(native._X86_FLAGS["avx2"])
    assert {"__AVX2__", "__FMA__", "__F16C__"} <= avx2 and "__AVXVNNI__" not in avx2
    portable = _macros(native._X86_FLAGS["portable"])
    assert not {m for m in portable if m.startswith(("__AVX", "__FMA", "__F16C"))}
    if "avx512" in native.supported_tiers():
        assert {"__AVX512F__", "__AVX512BW__", "__AVX512VL__"} <= _macros(native._X86_FLAGS["avx512"])


@needs_native
def test_each_tier_is_its_own_library() -> None:
    libs = {}
    for tier in native.supported_tiers():
        with native.use_tier(tier):
            assert native.build_info().startswith(tier + " ")
            assert native.describe() == f"native {tier} (chosen by use_tier)"
            libs[tier] = native.library()
    assert len({id(lib) for lib in libs.values()}) == len(libs)


def test_auto_choice_and_its_reason(monkeypatch) -> None:
    """The best tier the CPU has, said with why it is not a better one."""
    monkeypatch.delenv("MARCO_NATIVE_ISA", raising=False)
    monkeypatch.setattr(native, "_arch", lambda: "x86_64")
    cases = [
        ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"}, ("avx512", "")),
        ({"avx2", "fma", "f16c", "avx512f"}, ("avx2", "no avx512 on this CPU")),
        ({"avx", "sse4_2"}, ("portable", "no AVX2 on this CPU")),
    ]
    for features, want in cases:
        monkeypatch.setattr(native, "cpu_features", lambda f=features: frozenset(f))
        assert native._auto_tier() == want
    monkeypatch.setattr(native, "cpu_features", lambda: None)
    assert native._auto_tier() == ("portable", "this CPU's features could not be read")
    monkeypatch.setattr(native, "_arch", lambda: "arm64")
    assert native._auto_tier() == ("neon", "") and native.supported_tiers() == ["neon", "portable"]
    monkeypatch.setattr(native, "_arch", lambda: "riscv64")
    assert native._auto_tier()[0] == "portable" and native.supported_tiers() == ["portable"]


@needs_native
def test_describe_says_the_tier_and_why(monkeypatch) -> None:
    monkeypatch.delenv("MARCO_NATIVE_ISA", raising=False)
    best = native.supported_tiers()[0]
    assert native.describe() == f"native {best}" + {"avx512": "", "avx2": " (no avx512 on this CPU)"}.get(best, "")
    if X86:
        monkeypatch.setattr(native, "cpu_features", lambda: frozenset({"avx2", "fma", "f16c"}))
        assert native.describe() == "native avx2 (no avx512 on this CPU)"
        monkeypatch.setattr(native, "cpu_features", lambda: frozenset({"sse2"}))
        assert native.describe() == "native portable (no AVX2 on this CPU)"
    monkeypatch.undo()
    monkeypatch.setenv("MARCO_NATIVE_ISA", "portable")
    assert native.describe() == "native portable (forced by MARCO_NATIVE_ISA)"
    monkeypatch.setenv("MARCO_NATIVE_OPENMP", "0")
    assert native.describe() == "native portable (forced by MARCO_NATIVE_ISA; without OpenMP)"


def test_a_tier_this_cpu_lacks_or_an_unknown_one_is_refused(monkeypatch) -> None:
    monkeypatch.delenv("MARCO_NATIVE", raising=False)
    monkeypatch.setenv("MARCO_NATIVE_ISA", "sse9")
    with pytest.raises(NativeTierError, match="MARCO_NATIVE_ISA=sse9: 'sse9' is not a kernel tier") as e:
        native.library()
    assert e.value.hint == "use one of: avx512, avx2, neon, portable"
    monkeypatch.setattr(native, "_arch", lambda: "x86_64")
    monkeypatch.setattr(native, "cpu_features", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setenv("MARCO_NATIVE_ISA", "AVX512")
    with pytest.raises(NativeTierError, match="this CPU cannot run the avx512 kernels") as e:
        native.available()
    assert e.value.hint == "this CPU runs: avx2, portable"
    with pytest.raises(NativeTierError):
        with native.use_tier("avx512"):
            pass
    monkeypatch.setenv("MARCO_NATIVE", "0")  # disabled wins: nothing to refuse
    assert native.library() is None


def test_the_cli_says_a_refused_tier_in_one_line(q4_path, monkeypatch, marco_main) -> None:
    monkeypatch.setenv("MARCO_NATIVE_ISA", "avx1024")
    monkeypatch.delenv("MARCO_NATIVE", raising=False)
    code, err = marco_main("run", str(q4_path), "-n", "1", "hello")
    assert code == 1
    assert err[-2:] == [
        "Error: MARCO_NATIVE_ISA=avx1024: 'avx1024' is not a kernel tier",
        "Hint: use one of: avx512, avx2, neon, portable",
    ]


@pytest.mark.skipif(not X86 or native._compiler() is None, reason="x86-64, with a compiler")
def test_the_compiled_cpu_probe_agrees_with_proc_cpuinfo() -> None:
    """Where neither /proc/cpuinfo nor sysctl answers (Windows), a compiled probe reads the CPU's features."""
    probed = native._probe_features(native._compiler())
    assert probed is not None
    cpuinfo = native.cpu_features()
    for name in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"):
        assert (name in probed) == (name in cpuinfo), name


def test_other_systems_get_their_library_and_flags(monkeypatch) -> None:
    """macOS links torch's own libomp (a second OpenMP runtime aborts the process) or none; Windows uses the thread
    pool, a .dll, no -fPIC."""
    monkeypatch.setattr(native, "_system", lambda: "Windows")
    assert native._library_suffix() == ".dll" and native._platform_flags(["clang"]) == ([], [])
    assert native._platform_flags(["x86_64-w64-mingw32-gcc"]) == (["-static-libgcc"], [])
    assert native._openmp_flags(True) == [[]]
    monkeypatch.setattr(native, "_system", lambda: "Darwin")
    assert native._library_suffix() == ".dylib"
    alts = native._openmp_flags(True)
    assert alts[-1] == [] and all("-fopenmp" not in a or "-Xpreprocessor" in a for a in alts)
    monkeypatch.setattr(native, "_system", lambda: "Linux")
    assert native._openmp_flags(True) == [["-fopenmp"], []] and native._openmp_flags(False) == [[]]
    monkeypatch.setattr(native, "_arch", lambda: "arm64")
    assert native._tier_flags("portable") == [["-mcpu=native"], []]
    assert native._tier_flags("neon") == [["-mcpu=native", "-DMARCO_NEON"], ["-DMARCO_NEON"]]


def _same_with_and_without_openmp(tier: str) -> None:
    g = torch.Generator().manual_seed(3)
    k, n = 512, 96
    raws = {t: codec_for(t).quantize(torch.randn(n, k, generator=g) * 0.05).reshape(n, -1) for t in ("Q4_K", "Q8_0")}
    x = torch.randn(7, k, generator=g)
    router = (torch.randn(16, k, generator=g) * 0.1).bfloat16()
    keys, values = torch.randn(2, 33, 64, generator=g).bfloat16(), torch.randn(2, 33, 64, generator=g).bfloat16()
    q = torch.randn(8, 64, generator=g)
    results = []
    for openmp in (True, False):
        with native.use_tier(tier, openmp=openmp):
            assert native.build_info().endswith(" openmp" if openmp else " threads")
            assert native.library().marco_threads_used(2) == 2 and native.library().marco_threads_used(5) == 5
            out = []
            for name, raw in raws.items():
                t = codec_for(name).ggml_type
                out += [native.matmul(x[:1], raw, t, k), native.matmul(x, raw, t, k)]  # one token, and the x4 tiles
            gate_up, down = [raws["Q4_K"].data_ptr()] * 2, [raws["Q8_0"].data_ptr()] * 2
            out.append(native.moe(x[0], gate_up, gate_up, down, torch.tensor([0.3, 0.7]), (12, 12, 8), k, n))
            out.append(native.route(x[0], router, 4, True)[1])
            out.append(native.attend(q, keys, values, 0.125))
            out.append(native.attend(q, keys.half(), values.half(), 0.125))
            results.append(out)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_thread_pool_build_equals_the_openmp_build(threads: int) -> None:
    """Built without OpenMP (MARCO_NATIVE_OPENMP=0, and where the compiler has none), the kernels run on their own
    thread pool, on several threads, with the OpenMP build's results bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _same_with_and_without_openmp(native.supported_tiers()[0])
    finally:
        torch.set_num_threads(before)


@needs_native
def test_the_thread_pool_survives_concurrent_callers() -> None:
    """Two Python threads in the kernels at once (ctypes drops the GIL): the second runs its loop alone, same result."""
    import threading

    g = torch.Generator().manual_seed(4)
    raw = codec_for("Q4_K").quantize(torch.randn(256, 1024, generator=g)).reshape(256, -1)
    x = torch.randn(3, 1024, generator=g)
    with native.use_tier(native.supported_tiers()[0], openmp=False):
        want = native.matmul(x, raw, 12, 1024)
        bad = []

        def work() -> None:
            for _ in range(200):
                if not torch.equal(native.matmul(x, raw, 12, 1024), want):
                    bad.append(1)

        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not bad


@pytest.mark.skipif(shutil.which("cc") is None, reason="a C compiler")
def test_build_in_a_fresh_cache_without_openmp(tmp_path) -> None:
    """A cold build without OpenMP in a new process (as on a compiler without it) loads and reports itself."""
    code = "from marco_local.kernels import native as n; print(n.describe()); print(n.library().marco_threads_used(2))"
    out = _run(code, MARCO_HOME=str(tmp_path), MARCO_NATIVE_OPENMP="0", MARCO_NATIVE_ISA="portable", MARCO_NATIVE=None)
    assert out == ["native portable (forced by MARCO_NATIVE_ISA; without OpenMP)", "2"]


def _sources() -> list[str]:
    return [str(p) for p in native._sources() if p.suffix == ".c"]


@pytest.mark.skipif(
    not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
    reason="an aarch64 cross compiler and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)",
)
@pytest.mark.parametrize("openmp", [True, False])
@pytest.mark.parametrize("tier,extra", [("neon", []), ("neon", ["-march=armv8.2-a+dotprod"]), ("portable", [])])
def test_the_arm64_tiers_build_and_run(tmp_path, tier: str, extra: list[str], openmp: bool) -> None:
    """The ARM64 builds (neon: NEON dots, with and without SDOT; portable: plain C), with OpenMP and with the thread
    pool, run the self-test (tests/native_selftest.c: every type, 1 and 6 tokens, 1-3 threads, bit-identical to
    dot_ref.c) under qemu."""
    exe = tmp_path / "selftest"
    threads = ["-fopenmp"] if openmp else []
    target = native._ARM64_FLAGS[tier][-1]  # a cross compiler has no -mcpu=native
    selftest = str(native.HERE.parents[2] / "tests" / "native_selftest.c")
    flags = [f for f in native.FLAGS if f != "-shared"]
    cmd = ["aarch64-linux-gnu-gcc", *flags, *target, *extra, *threads, "-pthread", "-static", "-o", str(exe)]
    subprocess.run([*cmd, *_sources(), selftest, "-lm"], check=True, capture_output=True)
    done = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    assert done.stdout.strip() == f"{tier} {'openmp' if openmp else 'threads'}: 0 mismatches"


@pytest.mark.skipif(native._arch() != "x86_64" or native._compiler() is None, reason="an x86-64 machine, a compiler")
@pytest.mark.parametrize("openmp", [True, False])
def test_the_portable_x86_build_is_bit_identical_to_the_reference(tmp_path, openmp: bool) -> None:
    """The portable tier's kernels (dot_plain.c, SSE2 only) compute the reference's operations: the self-test program
    finds no result that differs from dot_ref.c's in a single bit, for every type, 1 and 6 tokens, 1-3 threads."""
    exe = tmp_path / "selftest"
    threads = ["-fopenmp"] if openmp else []
    selftest = str(native.HERE.parents[2] / "tests" / "native_selftest.c")
    flags = [f for f in native.FLAGS if f != "-shared"]
    cmd = [*native._compiler(), *flags, *native._X86_FLAGS["portable"], *threads, "-pthread", "-o", str(exe)]
    subprocess.run([*cmd, *_sources(), selftest, "-lm"], check=True, capture_output=True)
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout
    assert done.stdout.strip() == f"portable {'openmp' if openmp else 'threads'}: 0 mismatches"


@pytest.mark.skipif(shutil.which("x86_64-w64-mingw32-gcc") is None, reason="mingw-w64 (gcc-mingw-w64-x86-64)")
def test_the_windows_build_compiles_and_exports_what_python_binds(tmp_path, monkeypatch) -> None:
    """A Windows DLL from mingw with the flags `_build` would pass there (thread pool on Win32 threads, no -fPIC),
    exporting every function `_bind` binds."""
    monkeypatch.setattr(native, "_system", lambda: "Windows")
    cc = ["x86_64-w64-mingw32-gcc"]
    flags, libs = native._platform_flags(cc)
    dll = tmp_path / f"libmarco_ggml{native._library_suffix()}"
    for target in (native._X86_FLAGS["avx2"], native._X86_FLAGS["portable"]):
        cmd = [*cc, *native.FLAGS, *target, *native._openmp_flags(True)[0], *flags, "-o", str(dll), *_sources(), *libs]
        subprocess.run(cmd, check=True, capture_output=True)
        dump = subprocess.run(["x86_64-w64-mingw32-objdump", "-p", str(dll)], capture_output=True, text=True).stdout
        bound = set(re.findall(r"lib\.(marco_\w+)\.", inspect.getsource(native._bind)))
        assert bound and all(f"] {name}\n" in dump for name in bound), bound
        assert "libgcc_s" not in dump and "libgomp" not in dump
