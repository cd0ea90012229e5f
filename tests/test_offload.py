"""Expert offloading on CPU: identical output for every budget, policy and prefetch setting; the budget holds;
the simulator counts what the live cache counts; the CLI options and `marco profile`."""

from __future__ import annotations

import json

import pytest
import torch

from marco_local.errors import MarcoError
from marco_local.generate import PromptCache, generate_step
from marco_local.layers.kv_cache import make_cache
from marco_local.load.checkpoint import load_model
from marco_local.load.offloaded import load_offloaded
from marco_local.offload import (
    OffloadedExperts,
    Placement,
    install,
    offload_stats,
    parse_resident,
    parse_size,
    record_trace,
    simulate,
)
from marco_local.offload.profile import record_profile, save_profile
from marco_local.sampling import make_sampler

PROMPT = [5, 17, 33, 2, 91, 120, 7, 64, 250, 3, 44, 19, 8, 77, 150, 31, 200, 11, 96, 42]
STEPS = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread avoids OpenMP spin-waiting on a shared, oversubscribed CPU (100x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def greedy(model, prompt=PROMPT, steps=STEPS, chunk=8) -> list[int]:
    cache = PromptCache(make_cache(model, len(prompt) + steps))
    return list(generate_step(model, prompt, cache, make_sampler(0.0), max_tokens=steps, prefill_step_size=chunk))


@torch.inference_mode()
def prefill_logits(model) -> torch.Tensor:
    return model(torch.tensor([PROMPT]), make_cache(model, len(PROMPT)))


@pytest.fixture(scope="module")
def ref(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    return folder, model, greedy(model), prefill_logits(model)


@pytest.fixture(scope="module")
def profile_path(ref, tmp_path_factory):
    folder, model, _, _ = ref
    counts, _ = record_profile(model, PROMPT * 3, chunk=16)
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    save_profile(path, counts, str(folder), model.config, len(PROMPT) * 3)
    return path


def offloaded(folder, dtype=torch.float32, **kw):
    return load_offloaded(folder, Placement(**kw), dtype=dtype)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("policy", ["lru", "lfu", "static"])
@pytest.mark.parametrize("slots", [1, 3, 8])
def test_identical_output_for_every_budget_policy_and_prefetch(ref, profile_path, slots, policy, prefetch):
    """Same tokens and bit-identical logits; without prefetch the simulator replays the recorded trace to the live
    cache's exact hit and miss counts, per layer."""
    folder, _, tokens, logits = ref
    profile = str(profile_path) if policy == "static" else None
    model = offloaded(folder, experts_resident=str(slots), policy=policy, prefetch=prefetch, profile=profile)
    try:
        with record_trace(model) as trace:
            assert greedy(model) == tokens
        stats = offload_stats(model)
        assert stats.slots_per_layer == slots
        assert stats.resident_fraction == slots / 8
        assert 0.0 <= stats.hit_rate <= 1.0
        if prefetch:
            assert 0.0 <= stats.prefetch_precision <= 1.0 and 0.0 <= stats.prefetch_recall <= 1.0
        else:
            prof = json.loads(profile_path.read_text())["layers"] if profile else None
            sim = simulate(trace, policy, slots, profile={int(k): v for k, v in prof.items()} if prof else None)
            assert (sim.hits, sim.misses) == (stats.hits, stats.misses)
            assert {x.layer: (x.hits, x.misses) for x in stats.layers} == sim.per_layer
        assert torch.equal(prefill_logits(model), logits)  # bit-identical: same kernels, same summation order
    finally:
        model.offload.close()


def test_dtype_converted_at_read_matches_the_plain_loader(checkpoint):
    folder, _ = checkpoint  # float32 checkpoint, run in bfloat16: the file store converts each expert it reads
    plain = load_model(folder, dtype=torch.bfloat16)
    model = offloaded(folder, dtype=torch.bfloat16, experts_resident="3")
    assert greedy(model) == greedy(plain)
    assert torch.equal(prefill_logits(model), prefill_logits(plain))


def test_install_on_a_loaded_model_and_slots_are_allocated_once(ref):
    folder, _, tokens, logits = ref
    model = load_model(folder, dtype=torch.float32)
    rt = install(model, Placement(experts_resident="25%"))
    ptrs = [x.slots.data_ptr() for x in rt.layers]
    assert greedy(model) == tokens
    assert torch.equal(prefill_logits(model), logits)
    assert [x.slots.data_ptr() for x in rt.layers] == ptrs  # decode never reallocates the fast tier
    assert all(isinstance(layer.mlp.experts, OffloadedExperts) for layer in model.model.layers)


def test_budget_is_respected_and_too_small_is_refused(ref):
    folder, _, tokens, _ = ref
    model = offloaded(folder)  # everything resident: measures the pieces
    rt = model.offload
    fixed, expert = rt.plan.fixed_bytes, rt.plan.expert_bytes
    budget = fixed + rt.fast_bytes - 3 * 2 * expert - 1  # room for all but 2 experts per layer (3 layers)
    model = offloaded(folder, ram_mem=str(budget))
    rt = model.offload
    assert rt.plan.slots == 5
    # what is really allocated: slot tensors + scratch, plus every non-expert tensor and the KV cache
    slot_bytes = sum(x.slots.nbytes for x in rt.layers)
    assert slot_bytes == rt.plan.slot_bytes and fixed + rt.fast_bytes <= budget
    assert greedy(model) == tokens
    with pytest.raises(MarcoError, match="too small"):
        offloaded(folder, ram_mem=str(fixed + expert))
    with pytest.raises(MarcoError, match="experts-resident"):
        offloaded(folder, ram_mem=str(budget), experts_resident="8")


def test_each_budget_flag_belongs_to_its_device():
    from marco_local.offload.install import _budget

    with pytest.raises(MarcoError, match="--ram-mem bounds a CPU-only run") as e:
        _budget(Placement(ram_mem="1GiB"), torch.device("cuda"))
    assert "--gpu-mem" in e.value.hint
    with pytest.raises(MarcoError, match="--gpu-mem needs a CUDA device"):
        _budget(Placement(gpu_mem="1GiB"), torch.device("cpu"))
    assert _budget(Placement(gpu_mem="1GiB", ram_mem="2GiB"), torch.device("cuda")) == (1 << 30, "--gpu-mem")
    assert _budget(Placement(ram_mem="2GiB"), torch.device("cpu")) == (2 << 30, "--ram-mem")


def test_cuda_plan_sets_aside_gathered_experts_and_cublas_workspace(ref):
    """On CUDA a decode token's experts are gathered out of the slots (twice: in the graphs' pool and in an eager
    step; once more as stored, for direct reads, which `auto` takes wherever they work), and cuBLAS's workspaces and
    the graphs' pool come from the same allocator: the plan counts them before sizing the slots (H200 runs overshot
    the budget without them)."""
    from marco_local.offload.budget import CUDA_GRAPH_POOL_RESERVE, CUDA_LIBRARY_RESERVE
    from marco_local.offload.install import make_plan, moe_blocks
    from marco_local.offload.store import ExpertLayout

    model = load_model(ref[0], dtype=torch.float32)
    cfg, blocks = model.config, moe_blocks(model)
    layout = ExpertLayout(blocks[0][1].experts, cfg.num_experts)
    per_slot = layout.expert_bytes * len(blocks)
    dense = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4  # float32 temporaries of a gathered expert
    gathered = cfg.num_experts_per_tok * max(layout.expert_bytes, dense)
    direct = cfg.num_experts_per_tok * layout.expert_bytes
    scratch = 2 * gathered + direct + CUDA_LIBRARY_RESERVE + CUDA_GRAPH_POOL_RESERVE
    fixed, cuda = 1 << 20, torch.device("cuda")
    plan = make_plan(model, layout, 0, 0, Placement(gpu_mem=str(fixed + scratch + 3 * per_slot)), cuda, fixed)
    assert plan.scratch_bytes == scratch and plan.slots == 3
    with pytest.raises(MarcoError, match="too small"):
        make_plan(model, layout, 0, 0, Placement(gpu_mem=str(fixed + scratch + per_slot - 1)), cuda, fixed)


def decode_logits(model, tokens=(9, 100, 3, 77, 250, 1, 42, 8)) -> list[torch.Tensor]:
    """Logits of single-token steps after the prompt (fixed tokens: the comparison needs no sampling)."""
    cache = make_cache(model, len(PROMPT) + len(tokens))
    model(torch.tensor([PROMPT]), cache)
    return [model(torch.tensor([[t]]), cache) for t in tokens]


@torch.no_grad()
def test_load_all_when_the_slots_hold_every_expert(ref):
    """A budget that fits every expert: `load_all` (install does it on CUDA) loads them at once and decode maps ids to
    slots on the device, with no host step; the logits are the resident model's, and nothing misses. With fewer
    slots it does nothing."""
    want = decode_logits(load_model(ref[0], dtype=torch.float32))
    model = load_offloaded(ref[0], Placement(experts_resident="100%"), torch.float32, "cpu")
    for x in model.offload.layers:
        x.load_all()
        assert x.slot_map is not None and x.table.resident == x.num_experts and x.stats().hits == 0
    for got, ref_logits in zip(decode_logits(model), want, strict=True):
        torch.testing.assert_close(got, ref_logits, rtol=1e-5, atol=1e-5)
    stats = model.offload.stats()
    assert stats.misses == 0 and stats.hit_rate == 1.0
    model.offload.close()
    fewer = load_offloaded(ref[0], Placement(experts_resident="3"), torch.float32, "cpu")
    for x in fewer.offload.layers:
        x.load_all()
        assert x.slot_map is None and x.table.resident == 0
    fewer.offload.close()


@pytest.mark.parametrize("slots", ["1", "3"])
@torch.no_grad()
def test_misses_computed_on_the_cpu_where_they_lie(ref, slots):
    """`--expert-misses cpu`: a decode token's resident experts from their slots, the missing ones computed from the
    store (on the CPU here, where both tiers are RAM; on CUDA while the GPU computes the resident ones), nothing
    copied: the same logits as the resident model (float32, another summation order), and the decoder's segments
    (what CUDA graphs replay, split at each cut) agree with that forward."""
    from marco_local.decode.cuda_graphs import GraphedDecoder

    folder, _, tokens, _ = ref
    want = decode_logits(load_model(folder, dtype=torch.float32))
    model = load_model(folder, dtype=torch.float32)
    install(model, Placement(experts_resident=slots, misses="cpu"))
    assert all(x.misses_on_cpu for x in model.offload.layers)
    model.offload.reset_stats()
    for got, ref_logits in zip(decode_logits(model), want, strict=True):
        torch.testing.assert_close(got, ref_logits, rtol=1e-5, atol=1e-5)
    stats = model.offload.stats()
    assert stats.cpu_experts > 0 and stats.misses_on_cpu
    assert greedy(model) == tokens
    decoder = GraphedDecoder(model, min_window=8)
    assert all(decoder.split)
    eager, static = make_cache(model, 32), make_cache(model, 32)
    static.keys.zero_(), static.values.zero_()
    model(torch.tensor([PROMPT]), eager)
    model(torch.tensor([PROMPT]), static)
    for t in (9, 100, 3, 77, 250):
        step = torch.tensor([[t]])
        torch.testing.assert_close(decoder(step, static), model(step, eager), rtol=1e-5, atol=1e-5)


def test_miss_handling_choices(ref):
    folder, _, _, _ = ref
    model = load_model(folder, dtype=torch.float32)
    install(model, Placement(experts_resident="2"))  # auto on the CPU: copies (the cost model runs on CUDA)
    assert not any(x.misses_on_cpu for x in model.offload.layers) and model.offload.miss_costs is None
    from marco_local.offload.misses import miss_costs

    copy_s, cpu_s = miss_costs(model.offload.layers[0], model.config.hidden_size, torch.float32)
    assert copy_s > 0 and cpu_s > 0
    with pytest.raises(MarcoError, match="expert-misses cpu is for CUDA"):  # on the CPU every expert is computed there
        offloaded(folder, experts_resident="2", misses="cpu")
    with pytest.raises(MarcoError, match="unknown --expert-misses"):
        install(load_model(folder, dtype=torch.float32), Placement(experts_resident="2", misses="sometimes"))


def test_size_and_resident_parsing():
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("123") == 123
    assert parse_resident("25%", 232) == 58 and parse_resident("16", 232) == 16 and parse_resident("0.1%", 8) == 1
    for bad in ("lots", "4XB", ""):
        with pytest.raises(MarcoError):
            parse_size(bad)
    for bad in ("300", "inf%", "1e400%", "nan%"):
        with pytest.raises(MarcoError) as e:
            parse_resident(bad, 232)
        assert e.value.exit_code == 2  # a value the user typed: a usage error


def test_the_smallest_budget_named_in_the_refusal_runs(ref):
    """The hint's minimum is rounded up: "at least 17.0 MiB" for 17.03 MiB would be refused in its turn."""
    folder = ref[0]
    rt = offloaded(folder).offload
    needed = rt.plan.fixed_bytes + rt.plan.expert_bytes * rt.plan.moe_layers
    with pytest.raises(MarcoError) as e:
        offloaded(folder, ram_mem=str(needed - 1))
    named = e.value.hint.split("at least ")[1].split(",")[0]
    assert offloaded(folder, ram_mem=named.replace(" ", "")).offload.plan.slots >= 1
    given = e.value.message.split("--ram-mem ")[1].split(" is too small")[0]
    assert given != named  # not "21.0 MiB is too small ... at least 21.0 MiB"


def test_static_policy_needs_a_profile_and_profile_must_match(ref, tmp_path):
    folder = ref[0]
    with pytest.raises(MarcoError, match="profile"):
        offloaded(folder, experts_resident="2", policy="static")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"0": [1, 2, 3]}}))
    with pytest.raises(MarcoError, match="different number of experts"):
        offloaded(folder, experts_resident="2", profile=str(bad))


def test_a_profile_of_other_layers_or_bad_counts_is_refused(ref, profile_path, tmp_path):
    """A profile of the same expert count but other layers (another model) would warm nothing and leave a static
    policy with no hot set, silently; NaN or negative counts would rank experts at random."""
    folder = ref[0]
    good = json.loads(profile_path.read_text())
    layers = good["layers"]
    cases = {
        "shifted": ({str(int(k) + 10): v for k, v in layers.items()}, "records layers 10-12, this model's MoE"),
        "empty": ({}, "records no layers"),
        "nan": ({k: [float("nan")] * len(v) for k, v in layers.items()}, "finite and not negative"),
        "negative": ({k: [-1] * len(v) for k, v in layers.items()}, "finite and not negative"),
    }
    for name, (bad_layers, message) in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps({**good, "layers": bad_layers}))
        with pytest.raises(MarcoError, match=message):
            offloaded(folder, experts_resident="2", policy="static", profile=str(bad))
    with pytest.raises(MarcoError, match="cannot read the profile"):
        offloaded(folder, experts_resident="2", profile=str(tmp_path))  # a folder


def test_cli_run_and_profile(ref, tmp_path):
    from typer.testing import CliRunner

    from marco_local.cli.main import app

    folder = str(ref[0])
    runner = CliRunner()
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. Hello! How are you today?\n" * 3, encoding="utf-8")
    out = tmp_path / "p.json"
    r = runner.invoke(app, ["profile", folder, "--text", str(text), "-o", str(out), "--dtype", "f32"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["num_experts"] == 8
    r = runner.invoke(app, ["profile", folder, "--text", str(text), "-o", str(out)])
    assert isinstance(r.exception, MarcoError) and "already exists" in r.exception.message
    trace = tmp_path / "t.jsonl"
    args = ["run", folder, "Hello", "-n", "6", "--temperature", "0", "--dtype", "f32", "-v", "--device", "cpu"]
    r = runner.invoke(app, [*args, "--experts-resident", "25%", "--profile", str(out), "--trace", str(trace)])
    assert r.exit_code == 0, r.output
    assert "25% of experts resident · expert hits" in r.output and " moved, stalled " in r.output
    assert trace.read_text().startswith('{"format": "marco-expert-trace"')
    r = runner.invoke(app, [*args, "--ram-mem", "1KiB"])
    assert isinstance(r.exception, MarcoError) and "too small" in r.exception.message
    # options that act only on offloaded experts, given without offloading: said, not silently dropped
    r = runner.invoke(app, [*args, "--expert-policy", "lfu", "--prefetch"])
    assert r.exit_code == 0 and "--expert-policy and --prefetch: no effect, every expert is resident" in r.output
    r = runner.invoke(app, [*args, "--experts-resident", "50%", "--expert-policy", "lfu"])
    assert r.exit_code == 0 and "no effect" not in r.output


def test_tensor_bytes_counts_each_byte_once():
    """The budget's byte count: overlapping views once (a fused q/k/v weight and its slices; gate and up as strided
    halves of one stack), a slice of a big buffer as its own bytes, a lone strided view as its elements."""
    from torch import nn

    from marco_local.models.qwen3_moe import Experts
    from marco_local.offload.store import tensor_bytes

    experts = Experts(4, 8, 6)
    before = tensor_bytes(experts)
    assert before == 3 * 4 * 8 * 6 * 4 and experts.fuse_gate_up() and tensor_bytes(experts) == before
    big = torch.zeros(100)
    overlapping, lone = nn.Module(), nn.Module()
    overlapping.a, overlapping.b = big[:10], big[5:20]
    lone.t = big.view(10, 10)[:, :3]
    assert tensor_bytes(overlapping) == 20 * 4 and tensor_bytes(lone) == 30 * 4


@torch.no_grad()
def test_fusing_for_cuda_graphs_adds_only_the_norm_tables(checkpoint):
    from marco_local.decode.cuda_graphs import GraphedDecoder
    from marco_local.offload.store import tensor_bytes

    model = load_model(checkpoint[0], dtype=torch.float32)
    before = tensor_bytes(model)
    GraphedDecoder(model)  # fuses q/k/v and gate/up
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_weight is not None and layer.mlp.experts.gate_up is not None
    tables = sum(layer.self_attn.qk_norm_weight.nbytes for layer in model.model.layers)  # [H + H_kv, hd] each
    assert tensor_bytes(model) == before + tables


def test_verbose_stats_count_experts_read_in_place():
    """Direct reads (`auto` on CUDA) move nothing into slots: `run --verbose` and chat's /stats say what the GPU read
    in place, else a run that missed on every layer would report "0 B moved"."""
    from types import SimpleNamespace

    from marco_local.cli.ui import stats_line
    from marco_local.offload import LayerStats, OffloadStats

    def stats(moved: int, in_place: int, stall_s: float) -> OffloadStats:
        layer = LayerStats(0, 4, 8, 4, 9, 1, moved, in_place, 0, stall_s, 0, 0.0)
        return OffloadStats([layer], slots_per_layer=4)

    reply = SimpleNamespace(
        prompt_tokens=4, prompt_tps=10.0, generation_tokens=8, generation_tps=5.0, time_to_first_token=0.1,
        peak_memory=1 << 20, cached_prompt_tokens=0, stats=stats(0, 3 << 20, 0.0),
    )  # fmt: skip
    line = stats_line(reply, moves=True)
    assert "50% of experts resident · expert hits 90% · 0 B moved, 3.0 MiB read in place, stalled 0.00 s" in line
    reply.stats = stats(2 << 20, 0, 0.25)
    line = stats_line(reply, moves=True)
    assert "2.0 MiB moved, stalled 0.25 s" in line and "in place" not in line
