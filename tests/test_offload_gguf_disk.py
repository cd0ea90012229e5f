"""Disk tier for GGUF models (CPU-only): experts left in the .gguf file, read as raw ggml blocks on a miss, kept as they
are in the slot (native kernels) or repacked into the slot's int4 form (repack on read, without them).

Checks: loading with `experts_in_file` repacks and reads no expert; output equals the fully resident GGUF model (same
tokens, bit-identical logits: a slot holds exactly the bytes the load-time repack makes) for one slot to all, every
policy, with and without prefetch, bf16 (int4 kernels) and f32 (exact path, raw-block slots); `--ram-mem` is honoured
and RSS stays within the budget plus MARGIN, measured in a fresh subprocess as tests/test_offload_disk.py does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from offload_gguf_fixtures import (  # noqa: F401
    PROMPT,
    greedy,
    int4_kernels,
    native_or_skip,
    one_thread,
    prefill_logits,
    q4_path,
)
from test_offload_disk import CONFIG, write_random_checkpoint

from marco_local.offload import Placement, install, offload_stats

BUDGET = 32 << 20
MARGIN = 2 << 20


def test_experts_in_file_are_not_repacked_at_load(q4_path, int4_kernels):
    from marco_local.load.gguf import load_gguf

    model, _ = load_gguf(q4_path, dtype=torch.bfloat16, experts_in_file=True)
    experts = model.model.layers[0].mlp.experts
    assert experts.in_file == "int4" and experts.raws is None
    assert all(t.is_meta for t in experts.fused.packed + experts.down_bank.scales_zeros)


def test_native_experts_in_file_keep_raw_blocks(q4_path):
    native_or_skip()
    from marco_local.load.gguf import load_gguf

    model, _ = load_gguf(q4_path, dtype=torch.bfloat16, experts_in_file=True)
    experts = model.model.layers[0].mlp.experts
    assert experts.native and experts.in_file == "raw" and experts.fused is None
    assert all(r.data_ptr() == f.data_ptr() for r, f in zip(experts.raws, experts.file_raws, strict=True))
    install(model, Placement(experts_resident="2"), files=[q4_path])
    x = model.model.layers[1].mlp.experts
    for e in (0, 5):
        x.preload([e])
        s = x.table.slot_of[e]
        for slot_raw, file_raw in zip(x.inner.raws, x.inner.file_raws, strict=True):
            assert torch.equal(slot_raw[s], file_raw[e])  # a slot holds the file's blocks, nothing else
    assert x.layout.expert_bytes < 1.1 * sum(r[0].nbytes for r in x.inner.file_raws)
    model.offload.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_repack_on_read_matches_the_resident_model(q4_path, dtype, tmp_path):
    from marco_local.load.gguf import load_gguf

    plain, _ = load_gguf(q4_path, dtype=dtype)
    want, logits = greedy(plain), prefill_logits(plain)
    E, L = plain.config.num_experts, plain.config.num_hidden_layers
    profile = tmp_path / "profile.json"  # a static hot set (and a warm-up preload) from made-up frequencies
    profile.write_text(json.dumps({"layers": {str(i): [float((e * 7 + i) % E) for e in range(E)] for i in range(L)}}))
    cases = [("1", "lru", False), ("3", "lru", True), ("3", "lfu", False), ("50%", "lru", True), (str(E), "lru", False)]
    cases += [("3", "static", False), ("2", "static", True)]
    for resident, policy, prefetch in cases:
        model, _ = load_gguf(q4_path, dtype=dtype, experts_in_file=True)
        prof = str(profile) if policy == "static" else None
        placement = Placement(experts_resident=resident, policy=policy, prefetch=prefetch, profile=prof)
        install(model, placement, files=[q4_path])
        assert greedy(model) == want, (resident, policy, prefetch)
        assert torch.equal(prefill_logits(model), logits), (resident, policy, prefetch)
        st = offload_stats(model)
        assert st.misses > 0
        model.offload.close()


def test_slot_bytes_equal_the_load_time_repack(q4_path, int4_kernels):
    from marco_local.load.gguf import load_gguf

    plain, _ = load_gguf(q4_path, dtype=torch.bfloat16)
    model, _ = load_gguf(q4_path, dtype=torch.bfloat16, experts_in_file=True)
    install(model, Placement(experts_resident="2"), files=[q4_path])
    x = model.model.layers[1].mlp.experts
    ref = plain.model.layers[1].mlp.experts
    for e in (0, 5):
        x.preload([e])
        s = x.table.slot_of[e]
        assert torch.equal(x.inner.fused.packed[s], ref.fused.packed[e])
        assert torch.equal(x.inner.fused.scales_zeros[s], ref.fused.scales_zeros[e])
        assert torch.equal(x.inner.down_bank.packed[s], ref.down_bank.packed[e])
        assert torch.equal(x.inner.down_bank.scales_zeros[s], ref.down_bank.scales_zeros[e])
    # a miss moves the kernel form only, not the raw file bytes as well
    assert (
        x.layout.expert_bytes
        < 1.2 * sum(t.nbytes for t in (ref.fused.packed[0], ref.fused.scales_zeros[0], ref.down_bank.packed[0]))
        + ref.down_bank.scales_zeros[0].nbytes
    )
    model.offload.close()


MEASURE = textwrap.dedent(
    """
    import gc, json, sys, torch
    torch.set_num_threads(1)
    from marco_local.generate import PromptCache, generate_step
    from marco_local.layers.kv_cache import make_cache
    from marco_local.load.gguf import load_gguf
    from marco_local.offload import Placement, install, offload_stats
    from marco_local.layers.gguf import trim_heap
    from marco_local.sampling import make_sampler

    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    def greedy(model):
        cache = PromptCache(make_cache(model, len(prompt) + steps))
        return list(generate_step(model, prompt, cache, make_sampler(0.0), max_tokens=steps, prefill_step_size=16))

    path, budget, prompt, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    def run():
        model, _ = load_gguf(path, dtype=torch.bfloat16, experts_in_file=True)
        install(model, Placement(ram_mem=budget, ctx=128), files=[path])
        tokens = greedy(model)
        st = offload_stats(model)
        model.offload.close()
        return tokens, {"fixed": st.fixed_bytes, "fast": st.fast_bytes, "resident": st.resident_fraction,
                        "misses": st.misses, "slots": st.slots_per_layer}
    # warm the runtime with one run first (torch's lazily loaded kernels, oneDNN/OpenMP buffers: paid once per process)
    run()
    gc.collect()
    trim_heap()
    base = rss("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    tokens, stats = run()
    print(json.dumps({"base": base, "peak": rss("VmHWM:"), "tokens": tokens, "stats": stats}))
    """
)


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory, tokenizer_obj):
    from marco_local.config import load_config
    from marco_local.formats.checkpoint import Checkpoint
    from quant.gguf_writer import write_gguf

    folder = tmp_path_factory.mktemp("offload-gguf-disk")
    write_random_checkpoint(folder, tokenizer_obj, CONFIG)
    path = folder / "big-q4_k_m.gguf"
    write_gguf(Checkpoint(folder), load_config(folder), folder, path, "q4_k_m")
    return path


@pytest.mark.parametrize("kernels", ["native", "int4"])
def test_ram_budget_holds_with_experts_in_the_gguf(big_gguf, kernels, monkeypatch):
    from marco_local.kernels import native
    from marco_local.load.gguf import load_gguf

    if kernels == "native":
        native_or_skip()
    else:
        monkeypatch.setattr(native, "supports", lambda ggml_type: False)
    env = {**os.environ, "MARCO_NATIVE": "1" if kernels == "native" else "0"}
    prompt, steps = list(range(3, 40)), 12
    plain, _ = load_gguf(big_gguf, dtype=torch.bfloat16)
    want = greedy(plain, prompt, steps)
    expert_bytes = sum(r.nbytes for layer in plain.model.layers for r in layer.mlp.experts.file_raws)
    assert expert_bytes > 1.5 * BUDGET  # the file's expert blocks
    del plain
    args = [sys.executable, "-c", MEASURE, str(big_gguf), str(BUDGET), json.dumps(prompt), str(steps)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["tokens"] == want
    stats = got["stats"]
    assert stats["fixed"] + stats["fast"] <= BUDGET
    assert stats["resident"] < 0.5 and stats["misses"] > 0
    grown = got["peak"] - got["base"]
    fast = (stats["fixed"] + stats["fast"]) / 2**20
    slots = stats["slots"]
    print(f"RSS: +{grown / 2**20:.1f} MiB peak, planned {fast:.1f} of {BUDGET >> 20} MiB, {slots} slots/layer")
    assert grown <= BUDGET + MARGIN, f"RSS grew {grown / 2**20:.1f} MiB, budget {BUDGET >> 20} MiB + margin"
