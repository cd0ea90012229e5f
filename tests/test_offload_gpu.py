"""Expert offloading on CUDA: slots in VRAM, the slow tier in pinned host RAM, copies on a side stream.

Skipped without a CUDA device. Checks the same tokens as the fully resident CUDA model (logits within kernel
rounding: cuBLAS may pick another algorithm for a slot view), that `--gpu-mem` holds as measured by
torch.cuda.max_memory_allocated, and that prefetch (copies queued early on the side stream) changes nothing.
"""

from __future__ import annotations

import pytest
import torch

from marco_local.decode import decode_step, forward, set_decode_step
from marco_local.errors import MarcoError
from marco_local.generate import PromptCache, generate_step
from marco_local.layers.kv_cache import make_cache
from marco_local.load.checkpoint import load_model
from marco_local.load.offloaded import load_offloaded
from marco_local.offload import Placement, install, offload_stats
from marco_local.sampling import make_sampler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PROMPT = [5, 17, 33, 2, 91, 120, 7, 64, 250, 3, 44, 19, 8, 77, 150, 31, 200, 11, 96, 42]


def greedy(model, steps: int = 12) -> list[int]:
    cache = PromptCache(make_cache(model, len(PROMPT) + steps))
    return list(generate_step(model, PROMPT, cache, make_sampler(0.0), max_tokens=steps, prefill_step_size=8))


@torch.inference_mode()
def logits(model) -> torch.Tensor:
    return model(torch.tensor([PROMPT], device="cuda"), make_cache(model, len(PROMPT))).float().cpu()


@pytest.fixture(scope="module")
def ref(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32, device="cuda")
    return folder, greedy(model), logits(model)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("slots", [1, 3, 8])
def test_cuda_offload_same_tokens(ref, slots, prefetch):
    folder, tokens, want = ref
    model = load_offloaded(folder, Placement(experts_resident=str(slots), prefetch=prefetch), torch.float32, "cuda")
    assert model.model.layers[0].mlp.experts.slots.is_cuda
    assert model.model.layers[0].mlp.experts.store.rows.is_pinned()
    full = slots == 8  # the slots hold every expert: all loaded at install (load_all), no miss after that
    assert (model.model.layers[0].mlp.experts.slot_map is not None) == full
    # auto reads misses in place on CUDA, unless --prefetch asks for copies (or nothing can miss)
    assert all(x.direct == (not prefetch and not full) for x in model.offload.layers)
    assert greedy(model) == tokens
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    assert (offload_stats(model).misses > 0) == (not full)
    model.offload.close()


@pytest.mark.parametrize("misses", ["auto", "direct"])
def test_cuda_gpu_mem_budget_holds(ref, misses):
    folder, tokens, _ = ref
    probe = load_offloaded(folder, Placement(experts_resident="8", misses=misses), torch.float32, "cuda")
    plan = probe.offload.plan
    budget = plan.fixed_bytes + plan.scratch_bytes + 4 * plan.expert_bytes * plan.moe_layers
    del probe
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = load_offloaded(folder, Placement(gpu_mem=str(budget), misses=misses), torch.float32, "cuda")
    assert model.offload.plan.slots == 4
    assert greedy(model) == tokens
    assert torch.cuda.max_memory_allocated() - start <= budget
    with pytest.raises(MarcoError, match="too small"):
        load_offloaded(folder, Placement(gpu_mem=str(plan.fixed_bytes)), torch.float32, "cuda")


def test_cuda_install_on_a_loaded_model(ref):
    folder, tokens, want = ref
    model = load_model(folder, dtype=torch.float32, device="cuda")
    install(model, Placement(experts_resident="2", prefetch=True))
    assert greedy(model) == tokens
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_misses_computed_on_the_cpu(ref, graphs):
    """`--expert-misses cpu` on CUDA: resident experts on the GPU, the missing ones on the CPU from pinned RAM
    meanwhile; same tokens as the resident model, eager and from CUDA graphs (split at each MoE layer)."""
    from marco_local.decode.cuda_graphs import GraphedDecoder

    folder, tokens, _ = ref
    model = load_offloaded(folder, Placement(experts_resident="1", misses="cpu"), torch.float32, "cuda")
    assert all(x.misses_on_cpu for x in model.offload.layers)
    if graphs:
        assert GraphedDecoder.supports(model)
        set_decode_step(model, GraphedDecoder(model, min_window=16))
    assert greedy(model) == tokens
    assert offload_stats(model).cpu_experts > 0
    if graphs:
        assert decode_step(model).captures >= 1 and not decode_step(model).failed
    model.offload.close()


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("slots", [1, 3])
def test_cuda_direct_reads(ref, slots, graphs):
    """`--expert-misses direct`: a token's missing experts gathered by the GPU from pinned host RAM and kept in the
    least recently used slot by the device itself (offload/direct.py); the graphed step has no cut. Same tokens and
    logits as the resident model; the device's cache stays consistent."""
    from marco_local.decode.cuda_graphs import GraphedDecoder

    folder, tokens, want = ref
    model = load_offloaded(folder, Placement(experts_resident=str(slots), misses="direct"), torch.float32, "cuda")
    assert all(x.direct for x in model.offload.layers)
    if graphs:
        assert GraphedDecoder.supports(model)
        set_decode_step(model, GraphedDecoder(model, min_window=16))
        assert decode_step(model).cuts == []
    assert greedy(model) == tokens
    torch.testing.assert_close(logits(model), want, rtol=1e-5, atol=1e-5)
    st = offload_stats(model)
    assert st.misses > 0 and st.hits > 0
    if graphs:
        assert decode_step(model).captures >= 1 and not decode_step(model).failed
    for x in model.offload.layers:  # the slots hold the experts the device's map says
        for e, s in enumerate(x.lru.dmap.tolist()):
            if s >= 0:
                assert torch.equal(x.slots[s].cpu(), x.store.rows[e]) and x.lru.owner[s] == e
    model.offload.close()


def test_cuda_miss_cost_model_measures(ref):
    """`auto` where direct reads are not taken (--prefetch, or --expert-policy lfu) measures a copy against the CPU."""
    folder, _, _ = ref
    lfu = load_offloaded(folder, Placement(experts_resident="2", policy="lfu"), torch.float32, "cuda")
    assert not any(x.direct for x in lfu.offload.layers) and offload_stats(lfu).miss_copy_us > 0
    lfu.offload.close()
    model = load_offloaded(folder, Placement(experts_resident="2", prefetch=True), torch.float32, "cuda")
    copy_us, cpu_us = offload_stats(model).miss_copy_us, offload_stats(model).miss_cpu_us
    assert copy_us > 0 and cpu_us > 0
    assert all(x.misses_on_cpu == (cpu_us < 0.8 * copy_us) for x in model.offload.layers)
    model.offload.close()


@pytest.mark.parametrize("misses", ["copy", "direct"])
def test_cuda_step_stopped_midway_leaves_no_stale_slot(ref, misses, monkeypatch):
    """Ctrl-C after the cache names an expert's new slot and before its bytes are queued (a copy, or the direct
    gather): the step run again, and the steps after it, give the resident model's logits (tests/
    test_offload_interrupt.py on the CPU)."""
    from marco_local.offload import misses as offloaded

    folder, _, _ = ref
    feed = [11, 140, 23, 7, 300, 19, 88, 2]

    @torch.inference_mode()
    def teacher_forced(model, armed: list | None = None) -> tuple[torch.Tensor, int]:
        cache = make_cache(model, len(PROMPT) + len(feed))
        model(torch.tensor([PROMPT], device="cuda"), cache)
        if armed is not None:  # the first expert copy (or fill) of the decode steps stops
            armed.append(True)
        out, stopped = [], 0
        for t in feed:
            tok = torch.tensor([[t]], device="cuda")
            try:
                out.append(forward(model, tok, cache)[0, -1].float().cpu())
            except KeyboardInterrupt:
                stopped += 1
                out.append(forward(model, tok, cache)[0, -1].float().cpu())
        return torch.stack(out), stopped

    want, _ = teacher_forced(load_model(folder, dtype=torch.float32, device="cuda"))
    model = load_offloaded(folder, Placement(experts_resident="2", misses=misses), torch.float32, "cuda")
    armed = []
    if misses == "direct":
        real = offloaded.gather_rows

        def gather_or_stop(out, slots, host_rows, src, ids, dst):
            if armed and bool((dst >= 0).any()):
                armed.clear()
                raise KeyboardInterrupt
            real(out, slots, host_rows, src, ids, dst)

        monkeypatch.setattr(offloaded, "gather_rows", gather_or_stop)
    else:
        for x in model.offload.layers:
            real_read = x.store.read_into

            def read_or_stop(e, dst, real_read=real_read):
                if armed:
                    armed.clear()
                    raise KeyboardInterrupt
                real_read(e, dst)

            x.store.read_into = read_or_stop
    got, stopped = teacher_forced(model, armed)
    assert stopped == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.offload.close()
