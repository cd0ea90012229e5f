"""bitsandbytes side of `marco quantize` and of running quantized folders: writer layout, codec error, logits, CLI.

Bounds: per quantized linear, relative RMSE of the dequantized weight against the original (Gaussian fixture weights)
below 0.11 nf4, 0.14 fp4, 0.01 int8 (the codecs' known ~0.09 / ~0.12 / ~0.005); logits of our quantized model equal
a float32 model holding the dequantized weights to 1e-4 (relative to the largest logit); KL to the unquantized model
bounded per preset (LOGIT_KL). The writer is bit-identical to bitsandbytes' own quantize functions, and (when
accelerate is installed) to the attention tensors transformers + bitsandbytes write.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import bitsandbytes.functional as bnbF
import pytest
import torch

from marco_local.config import load_config
from marco_local.decode import forward, set_decode_step
from marco_local.errors import MarcoError
from marco_local.formats.checkpoint import Checkpoint
from marco_local.generate import generate
from marco_local.layers.bnb import Linear4bit, Linear8bit, QuantizedExperts, cpu_kernel_available
from marco_local.layers.kv_cache import make_cache
from marco_local.load.bnb import is_bnb_folder, load_bnb_model
from marco_local.models.qwen3_moe import Qwen3MoeForCausalLM
from marco_local.sampling import make_sampler
from marco_local.tokenizer import Tokenizer
from quant.bnb_writer import quantization_config, quantize_linears, write_bnb

WEIGHT_RMSE = {"nf4": 0.11, "fp4": 0.14, "int8": 0.01}  # per-linear relative RMSE bound (see module docstring)
# KL(original || quantized) of next-token distributions, mean over positions, fixture model in float32. Measured
# 0.096 nf4, 0.21 fp4, 0.0026 int8: a random 3-layer model with 128-wide hidden states amplifies weight noise and
# flips routing, so these are far above what a trained model shows; the bound catches a broken codec, not drift.
LOGIT_KL = {"nf4": 0.2, "fp4": 0.35, "int8": 0.01}
TIGHT = 1e-4  # max |ours - reference| / max |reference|, float32, against a float model holding the dequantized weights

# hidden 128 x expert width 128 = 16384 weights per expert: the writer's batched double-quant path is exercised;
# layer 1 is a dense MLP layer (quantized as "mlp").
FIXTURE = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=192, head_dim=32, mlp_only_layers=[1])
PRESETS = ("nf4", "fp4", "int8")


@pytest.fixture(scope="module")
def source(make_checkpoint):
    return make_checkpoint("bnb", seed=7, **FIXTURE)


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    """preset -> (folder, stats); int8 is written in small shards to exercise the index."""
    folder, _ = source
    out = {}
    for preset in PRESETS:
        dst = tmp_path_factory.mktemp(f"bnb-{preset}")
        shard = 300_000 if preset == "int8" else 2 * 1000**3
        calls = []
        stats = write_bnb(
            Checkpoint(folder),
            load_config(folder),
            folder,
            dst,
            preset,
            progress=lambda d, t, calls=calls: calls.append((d, t)),
            max_shard_bytes=shard,
        )
        assert calls and calls[-1][0] == calls[-1][1]
        out[preset] = (dst, stats)
    return out


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt()).item()


def median_position_rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """bf16 rounding can flip a near-tie in a random model's routing at a position or two (the overall error then
    reaches ~0.09), so bf16 comparisons bound the median position's error instead."""
    errs = sorted(rel_rmse(a[i, t], b[i, t]) for i in range(a.shape[0]) for t in range(a.shape[1]))
    return errs[len(errs) // 2]


def dequantize(ckpt: Checkpoint, module: str) -> torch.Tensor:
    """Dequantize one stored linear with bitsandbytes, from what the file holds."""
    if f"{module}.SCB" in ckpt:
        return bnbF.int8_vectorwise_dequant(ckpt.get(f"{module}.weight"), ckpt.get(f"{module}.SCB"))
    prefix = f"{module}.weight."
    parts = {n[len(prefix) :]: ckpt.get(n) for n in ckpt.names() if n.startswith(prefix)}
    state = bnbF.QuantState.from_dict(parts, device=torch.device("cpu"))
    return bnbF.dequantize_4bit(ckpt.get(f"{module}.weight"), state)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("double_quant", [True, False])
def test_batched_quantization_is_bit_identical_to_bitsandbytes(preset, double_quant):
    g = torch.Generator().manual_seed(0)
    for shape in ((5, 128, 128), (3, 32, 64)):  # batched path; fallback (2048 weights, not a multiple of 16384)
        ws = torch.randn(shape, generator=g)
        got = quantize_linears(ws, preset, double_quant)
        for w, entry in zip(ws, got, strict=True):
            if preset == "int8":
                cb, scb, _ = bnbF.int8_vectorwise_quant(w.to(torch.bfloat16).to(torch.float16))
                ref = {"weight": cb, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}
            else:
                packed, state = bnbF.quantize_4bit(
                    w.to(torch.bfloat16), blocksize=64, compress_statistics=double_quant, quant_type=preset
                )
                ref = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
            assert set(entry) == set(ref)
            for k in ref:
                assert entry[k].dtype == ref[k].dtype and torch.equal(entry[k], ref[k]), k


@pytest.mark.parametrize("preset", PRESETS)
def test_folder_layout_and_config(written, source, preset):
    folder, stats = written[preset]
    src, _ = source
    cfg = load_config(src)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["quantization_config"] == quantization_config(preset, True)
    assert raw["quantization_config"]["llm_int8_skip_modules"] == ["lm_head", "mlp.gate"]
    assert is_bnb_folder(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / f).read_bytes() == (src / f).read_bytes()
    assert (folder / "model.safetensors.index.json").is_file() == (preset == "int8")
    ckpt = Checkpoint(folder)
    names = set(ckpt.names())
    four = preset != "int8"
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        linears = [f"{p}.self_attn.{x}_proj" for x in "qkvo"]
        if cfg.is_moe_layer(layer):
            linears += [f"{p}.mlp.experts.{e}.{x}_proj" for e in range(cfg.num_experts) for x in ("gate", "up", "down")]
            assert ckpt.get(f"{p}.mlp.gate.weight").dtype == torch.bfloat16  # router
        else:
            linears += [f"{p}.mlp.{x}_proj" for x in ("gate", "up", "down")]
        for m in linears:
            if four:
                assert ckpt.get(f"{m}.weight").dtype == torch.uint8
                assert f"{m}.weight.quant_state.bitsandbytes__{preset}" in names
                assert {
                    f"{m}.weight.{k}" for k in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
                } <= names
            else:
                assert ckpt.get(f"{m}.weight").dtype == torch.int8
                assert ckpt.get(f"{m}.SCB").dtype == torch.float32 and f"{m}.weight_format" in names
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            assert ckpt.get(f"{p}.{n}.weight").dtype == torch.bfloat16
    assert ckpt.get("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in names  # tied
    assert set(stats) == {"attention", "router", "experts", "mlp", "embeddings", "norms"}
    n_experts = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) * cfg.num_experts
    assert stats["experts"]["params"] == n_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    bits = 8 * stats["experts"]["bytes"] / stats["experts"]["params"]
    # 16384-weight experts carry ~1.4 KB of quant state each (a Nano expert, 24x larger, ~4.3 bits per weight)
    assert (4.0 < bits < 6.0) if four else (8.0 < bits < 8.5)
    assert stats["embeddings"]["bytes"] == 2 * stats["embeddings"]["params"]
    written_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert sum(s["bytes"] for s in stats.values()) <= written_bytes  # plus headers


@pytest.mark.parametrize("preset", PRESETS)
def test_dequantized_weights_within_format_error(written, source, preset):
    """Re-read tensor by tensor; every quantized linear's error is within the format's bound; the rest is exact bf16."""
    folder, _ = written[preset]
    src = Checkpoint(source[0])
    out = Checkpoint(folder)
    errors = []
    for name in src.names():
        module = name.removesuffix(".weight")
        original = src.get(name)
        if f"{module}.SCB" in out or f"{module}.weight.absmax" in out:
            w = dequantize(out, module)
            assert w.shape == original.shape
            errors.append(rel_rmse(w, original))
        elif name in out:
            assert torch.equal(out.get(name), original.to(torch.bfloat16)), name
        else:
            assert name == "lm_head.weight"
    cfg = load_config(source[0])
    moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    n_linears = cfg.num_hidden_layers * 4 + moe * cfg.num_experts * 3 + (cfg.num_hidden_layers - moe) * 3
    assert len(errors) == n_linears  # every attention, expert and dense-MLP linear is quantized
    assert max(errors) < WEIGHT_RMSE[preset], (preset, max(errors), sum(errors) / len(errors))


@pytest.mark.parametrize("preset", ["nf4", "fp4"])
def test_quant_state_round_trips_through_bitsandbytes(written, preset):
    """transformers 5 cannot load per-expert quantized experts (it fuses them), so check bnb's own deserializer."""
    ckpt = Checkpoint(written[preset][0])
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.experts.7.down_proj"):
        prefix = f"{module}.weight."
        stored = {n[len(prefix) :]: ckpt.get(n) for n in ckpt.names() if n.startswith(prefix)}
        state = bnbF.QuantState.from_dict(dict(stored), device=torch.device("cpu"))
        assert state.quant_type == preset and state.blocksize == 64 and state.nested
        assert state.dtype == torch.bfloat16 and ckpt.shape(f"{module}.weight")[0] * 2 == state.shape.numel()
        again = state.as_dict(packed=True)
        assert set(again) == set(stored)
        for k, v in again.items():
            assert torch.equal(v, stored[k]), k


def test_attention_bytes_equal_what_transformers_writes(source, written, tmp_path):
    """transformers + bitsandbytes quantize the attention linears of a qwen3_moe (not its fused experts): same bytes."""
    pytest.importorskip("accelerate")  # transformers needs it for bitsandbytes quantization
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder, _ = source
    configs = {
        "nf4": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
    }
    for preset, qc in configs.items():
        # on the CPU, like our quantizer: bitsandbytes' CUDA blockwise quantizer rounds a few nested absmax codes
        # differently (an H200 run: one byte 174 where the CPU gives 175)
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=qc, dtype=torch.bfloat16, device_map="cpu"
        )
        model.save_pretrained(tmp_path / preset)
        theirs, ours = Checkpoint(tmp_path / preset), Checkpoint(written[preset][0])
        keys = [k for k in theirs.names() if ".self_attn." in k and "_norm" not in k]
        assert len(keys) >= 12
        for k in keys:
            assert torch.equal(theirs.get(k), ours.get(k)), k


def dequantized_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 model of our own plain architecture holding the bnb model's weights, dequantized."""
    ref = Qwen3MoeForCausalLM(model.config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            owner_name, attr = name.rsplit(".", 1)
            owner = model.get_submodule(owner_name)
            if isinstance(owner, QuantizedExperts):
                p.copy_(torch.stack([m.dequantize() for m in getattr(owner, attr)]))
            elif isinstance(owner, Linear4bit | Linear8bit):
                p.copy_(owner.dequantize() if attr == "weight" else owner.bias)
            else:
                p.copy_(getattr(owner, attr))
    return ref


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_logits_match_dequantized_reference_and_stay_near_original(written, source, preset):
    folder, _ = written[preset]
    _, original = source
    ours = load_bnb_model(folder, dtype=torch.float32)
    layer0 = ours.model.layers[0]
    assert isinstance(layer0.mlp.experts, QuantizedExperts)
    assert isinstance(layer0.self_attn.q_proj, Linear8bit if preset == "int8" else Linear4bit)
    assert isinstance(ours.model.layers[1].mlp.gate_proj, Linear8bit if preset == "int8" else Linear4bit)
    assert isinstance(layer0.mlp.gate, torch.nn.Linear)  # router stays float
    ids = torch.randint(0, ours.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    got = ours(ids, make_cache(ours, 16, batch_size=2))
    ref = dequantized_reference(ours)
    expected = ref(ids, make_cache(ref, 16, batch_size=2))
    assert ((got - expected).abs().max() / expected.abs().max()).item() < TIGHT
    logp = torch.log_softmax(got, -1)
    logq = torch.log_softmax(original(ids).logits, -1)
    kl = (logq.exp() * (logq - logp)).sum(-1).mean().item()
    assert kl < LOGIT_KL[preset], (preset, kl)
    # decoding token by token through the cache gives the same logits as the full forward
    cache = make_cache(ours, 16, batch_size=2)
    steps = torch.cat([ours(ids[:, :5], cache)] + [ours(ids[:, t : t + 1], cache) for t in range(5, 13)], dim=1)
    assert ((steps - got).abs().max() / got.abs().max()).item() < TIGHT


@torch.no_grad()
def test_bf16_runs_close_to_float32(written):
    folder, _ = written["int8"]
    f32 = load_bnb_model(folder, dtype=torch.float32)
    bf16 = load_bnb_model(folder)  # the default dtype; int8 runs torch's int8 x bf16 kernel
    ids = torch.randint(0, f32.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    a, b = f32(ids, make_cache(f32, 16)), bf16(ids, make_cache(bf16, 16)).float()
    assert median_position_rel_rmse(b, a) < 0.05


@pytest.mark.skipif(not cpu_kernel_available(), reason="bitsandbytes' CPU 4-bit kernel needs AVX512-BF16")
@pytest.mark.parametrize("preset", ["nf4", "fp4"])
@torch.no_grad()
def test_bf16_cpu_kernel_close_to_dequantized_reference(written, preset):
    """bnb's CPU kernel repacks absmax to bf16 and computes in bf16: near, not equal to, the float32 reference.

    Measured relative RMSE of the logits ~0.013 (the plain bf16 dequantize path: ~0.010)."""
    folder, _ = written[preset]
    f32 = load_bnb_model(folder, dtype=torch.float32)
    ref = dequantized_reference(f32)
    ours = load_bnb_model(folder)  # bf16 on the CPU
    assert all(m.cpu_kernel for m in ours.modules() if isinstance(m, Linear4bit))
    ids = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(6))
    expected = ref(ids, make_cache(ref, 16, batch_size=2))
    got = ours(ids, make_cache(ours, 16, batch_size=2)).float()
    assert median_position_rel_rmse(got, expected) < 0.04
    q = ours.model.layers[0].self_attn.q_proj
    assert q.quant_state.packing_format_for_cpu  # repacked on first use
    assert rel_rmse(q.dequantize(), f32.model.layers[0].self_attn.q_proj.dequantize()) < 0.01


@torch.no_grad()
def test_without_double_quant(source, tmp_path):
    folder, _ = source
    write_bnb(Checkpoint(folder), load_config(folder), folder, tmp_path, "fp4", double_quant=False)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_use_double_quant"] is False and qc["bnb_4bit_quant_type"] == "fp4"
    names = Checkpoint(tmp_path).names()
    assert not any("nested" in n for n in names)
    assert Checkpoint(tmp_path).get("model.layers.0.self_attn.q_proj.weight.absmax").dtype == torch.float32
    ours = load_bnb_model(tmp_path, dtype=torch.float32)
    ref = dequantized_reference(ours)
    ids = torch.randint(0, ours.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(8))
    got, expected = ours(ids, make_cache(ours, 8)), ref(ids, make_cache(ref, 8))
    assert ((got - expected).abs().max() / expected.abs().max()).item() < TIGHT


@torch.no_grad()
def test_loads_attention_only_folder_like_transformers_5_writes(source, tmp_path):
    """transformers 5 + bnb quantizes only the attention; experts stay float. Such folders load and run too."""
    from safetensors.torch import load_file, save_file

    from quant.bnb_writer import quantize_linear

    folder, _ = source
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if ".self_attn." in n and n.endswith("_proj.weight")]:
        module = name.removesuffix(".weight")
        tensors.update({f"{module}.{k}": v for k, v in quantize_linear(tensors.pop(name), "nf4").items()})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = quantization_config("nf4") | {"llm_int8_skip_modules": None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = load_bnb_model(tmp_path, dtype=torch.float32)
    layer0 = ours.model.layers[0]
    assert isinstance(layer0.self_attn.o_proj, Linear4bit)
    assert type(layer0.mlp.experts) is not QuantizedExperts and layer0.mlp.experts.gate_proj.dtype == torch.float32
    assert isinstance(ours.model.layers[1].mlp.gate_proj, torch.nn.Linear)  # dense layer left float
    ref = dequantized_reference(ours)
    ids = torch.randint(0, ours.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(9))
    got, expected = ours(ids, make_cache(ours, 8)), ref(ids, make_cache(ref, 8))
    assert ((got - expected).abs().max() / expected.abs().max()).item() < TIGHT


def test_writer_refusals(source, written, tmp_path):
    folder, _ = source
    with pytest.raises(MarcoError, match="unknown bitsandbytes preset"):
        write_bnb(Checkpoint(folder), load_config(folder), folder, tmp_path, "q4_k")
    bnb_folder = written["nf4"][0]
    with pytest.raises(MarcoError, match="already quantized"):
        write_bnb(Checkpoint(bnb_folder), load_config(folder), bnb_folder, tmp_path, "nf4")


@pytest.mark.parametrize("src_preset, preset", [("nf4", "q8_0"), ("nf4", "nf4"), ("int8", "q4_k_m")])
def test_quantize_refuses_an_already_quantized_source(checkpoint, tmp_path, marco_main, src_preset, preset):
    """Refused up front. A 4-bit source used to fail GGUF planning with "tensor ... has shape [2048, 1] ..., the config
    implies [64, 64]" (as if config.json and weights did not belong together); an int8 one, whose weights have the
    float shapes, was silently written to a GGUF of int8 codes taken as weights."""
    from quant.convert import quantize

    folder, _ = checkpoint
    src = tmp_path / f"src-{src_preset}"
    src.mkdir()
    write_bnb(Checkpoint(folder), load_config(folder), folder, src, src_preset)
    out = tmp_path / ("m-nf4" if preset == "nf4" else "m.gguf")
    message = f"{src} is already quantized (bitsandbytes {src_preset})"
    with pytest.raises(MarcoError, match=re.escape(message)) as e:
        quantize(src, out, preset)
    assert e.value.hint == "quantize from the original bf16 checkpoint"
    code, err = marco_main("quantize", str(src), "-o", str(out), "--to", preset)
    assert code == 1 and err == [f"Error: {message}", f"Hint: {e.value.hint}"], err
    assert list(tmp_path.iterdir()) == [src]


def test_loader_rejects_corrupt_quant_state(written, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(written["nf4"][0], bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    tensors[key] = torch.frombuffer(bytearray(b'{"quant_type": "nf4", "blocksize": 64'), dtype=torch.uint8)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MarcoError, match="q_proj"):
        load_bnb_model(bad)


def test_marco_run_end_to_end(written):
    folder, _ = written["nf4"]
    prompt = "The capital of France is"
    model = load_bnb_model(folder, dtype=torch.float32)
    expected = generate(model, Tokenizer.from_folder(folder), prompt, max_tokens=12, sampler=make_sampler(0.0))
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("MARCO_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "marco_local", "run", str(folder), "--raw", "--temperature", "0", "-n", "12"]
        + ["--dtype", "f32"],
        input=prompt.encode(),
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""  # bitsandbytes' import-time warnings must not leak
    assert r.stdout.decode().rstrip("\n") == expected.rstrip("\n")


def steps(model, ids: torch.Tensor, n: int = 6) -> list[torch.Tensor]:
    """Logits of a prefill of `ids`, then of n tokens fed one at a time (fixed ids: no sampling in the comparison)."""
    device = model.model.norm.weight.device
    cache = make_cache(model, ids.shape[1] + n)
    out = [model(ids.to(device), cache)]
    out += [
        forward(model, torch.tensor([[(7 * k + 3) % model.config.vocab_size]], device=device), cache) for k in range(n)
    ]
    return [t.float().cpu() for t in out]


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_offloaded_experts_compute_what_resident_ones_do(written, preset):
    """bitsandbytes experts (per-expert quantized linears) under offloading: each slot's linear computes whatever
    expert was copied into it. float32 activations take the same dequantize path resident or not: equal logits for 2
    slots (every call streams or evicts) and 5, prefill and decode. In bf16 the resident model runs bitsandbytes' CPU
    kernel (where the CPU has one) and the offloaded one dequantizes: close, not equal."""
    from marco_local.offload import Placement, install, offload_stats

    folder, _ = written[preset]
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(3))
    want = steps(load_bnb_model(folder, dtype=torch.float32), ids)
    for slots in ("2", "5"):
        model = load_bnb_model(folder, dtype=torch.float32)
        install(model, Placement(experts_resident=slots))
        for got, ref in zip(steps(model, ids), want, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert offload_stats(model).misses > 0
        model.offload.close()
    resident = steps(load_bnb_model(folder, dtype=torch.bfloat16), ids)
    model = load_bnb_model(folder, dtype=torch.bfloat16)
    install(model, Placement(experts_resident="2"))
    for got, ref in zip(steps(model, ids), resident, strict=True):
        assert rel_rmse(got, ref) < 0.03


@pytest.mark.parametrize("preset", ["nf4", "fp4"])
@torch.no_grad()
def test_stacked_4bit_experts_dequantize_as_bitsandbytes_does(written, preset):
    """StackedExperts4bit (CUDA's graph-capturable experts) dequantizes in plain torch: bit-equal to bitsandbytes'
    own dequantization of each expert linear; its gathered, padded and grouped paths agree (float32)."""
    from marco_local.layers.bnb import QuantizedExperts, StackedExperts4bit

    model = load_bnb_model(written[preset][0], dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantizedExperts)
    lists = (list(experts.gate_proj), list(experts.up_proj), list(experts.down_proj))
    assert StackedExperts4bit.convertible(*lists)
    stacked = StackedExperts4bit(*lists)
    for name, linears in zip(StackedExperts4bit.PROJECTIONS, lists, strict=True):
        for e in (0, 5):
            assert torch.equal(stacked._dense(name, e, torch.float32), linears[e].dequantize().float())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, stacked.shapes["gate_proj"][1], generator=g)
    idx = torch.stack([torch.randperm(stacked.num_experts, generator=g)[:2] for _ in range(3)])
    weights = torch.rand(3, 2, generator=g)
    want = experts(x, idx, weights)
    torch.testing.assert_close(stacked.forward_grouped(x, idx, weights), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stacked.forward_gathered(x, idx, weights), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked.forward_padded_gathered(x, idx, weights), want, rtol=1e-5, atol=1e-5)
    from test_offload_direct import check_direct_layer

    check_direct_layer(stacked, 2)  # `--expert-misses direct` on 4-bit stacks: strided views of the gather buffer


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
@torch.no_grad()
def test_stacked_4bit_from_any_bitsandbytes_state(quant_type, nested, blocksize):
    """States bitsandbytes itself makes (as transformers writes them: double quantization on or off, other block
    sizes): the stacked dequantization equals bitsandbytes' for every expert. (Rows a whole number of blocks long, as
    in the Marco models: where a block spans rows, bitsandbytes 0.50's CPU kernel disagrees with its own reference
    implementation and round-trips 3x worse; ours equals the reference there.)"""
    from marco_local.layers.bnb import Linear4bit, StackedExperts4bit

    g = torch.Generator().manual_seed(blocksize + nested)

    def linear(out_features: int, in_features: int) -> Linear4bit:
        w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(torch.bfloat16)
        packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        return Linear4bit(packed, state, None)

    gate, up, down = ([linear(*shape) for _ in range(3)] for shape in ((64, 256), (64, 256), (256, 128)))
    assert StackedExperts4bit.convertible(gate, up, down)
    stacked = StackedExperts4bit(gate, up, down)
    for name, linears in zip(StackedExperts4bit.PROJECTIONS, (gate, up, down), strict=True):
        for e, lin in enumerate(linears):
            assert torch.equal(stacked._dense(name, e, torch.float32), lin.dequantize().float()), (name, e)
    odd = linear(64, 256)
    odd.quant_state.blocksize *= 2  # one expert of another block size: not stackable
    assert not StackedExperts4bit.convertible([*gate[:2], odd], up, down)


@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_cuda_preparation_keeps_the_numbers(written, preset):
    """What load_bnb_model does on CUDA (4-bit experts stacked, 4-bit attention dequantized into nn.Linear), run on
    the CPU: same logits as the loaded model; the decoder's fixed-shape segments (what CUDA graphs replay) agree with
    the forward, resident and offloaded (misses copied, or computed from the store). int8 layers are left alone."""
    from marco_local.decode.cuda_graphs import GraphedDecoder
    from marco_local.layers.bnb import StackedExperts4bit
    from marco_local.load.bnb import prepare_for_cuda_graphs
    from marco_local.offload import Placement, install

    folder, _ = written[preset]
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(3))
    want = steps(load_bnb_model(folder, dtype=torch.float32), ids)
    model = load_bnb_model(folder, dtype=torch.float32)
    prepare_for_cuda_graphs(model)
    four_bit = preset != "int8"
    assert isinstance(model.model.layers[0].mlp.experts, StackedExperts4bit) == four_bit
    assert (type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear) == four_bit
    assert (type(model.model.layers[1].mlp.gate_proj) is torch.nn.Linear) == four_bit  # the dense FFN layer
    assert GraphedDecoder.capturable(model) == four_bit  # what supports() asks on CUDA
    for got, ref in zip(steps(model, ids), want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if not four_bit:
        return
    for placement in (None, Placement(experts_resident="2"), Placement(experts_resident="2", misses="cpu")):
        model = load_bnb_model(folder, dtype=torch.float32)
        prepare_for_cuda_graphs(model)
        if placement:
            install(model, placement)
        assert GraphedDecoder.capturable(model)
        decoder = GraphedDecoder(model, min_window=8)  # on the CPU its segments run eagerly
        eager, static = make_cache(model, 24), make_cache(model, 24)
        static.keys.zero_(), static.values.zero_()
        model(ids, eager)
        model(ids, static)
        for token in (5, 77, 130, 9):
            t = torch.tensor([[token]])
            torch.testing.assert_close(decoder(t, static), model(t, eager), rtol=1e-5, atol=1e-5)


def test_experts_that_cannot_be_stacked_stay_quantized(written):
    """A layer whose 4-bit experts cannot be stacked keeps them as bitsandbytes linears (dequantizing them all would
    cost the dense size); the rest of the model is still prepared, and the model is then not graph-capturable."""
    from marco_local.decode.cuda_graphs import GraphedDecoder
    from marco_local.layers.bnb import QuantizedExperts, StackedExperts4bit
    from marco_local.load.bnb import prepare_for_cuda_graphs

    model = load_bnb_model(written["nf4"][0], dtype=torch.float32)
    odd = model.model.layers[0].mlp.experts
    odd.gate_proj[1].quant_state.blocksize *= 2  # one expert of another block size
    prepare_for_cuda_graphs(model)
    assert model.model.layers[0].mlp.experts is odd and isinstance(odd, QuantizedExperts)
    assert all(isinstance(lin, Linear4bit) for lin in [*odd.gate_proj, *odd.up_proj, *odd.down_proj])
    assert isinstance(model.model.layers[2].mlp.experts, StackedExperts4bit)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not GraphedDecoder.capturable(model)


def test_a_bnb_folder_runs_offloaded_through_the_runtime(written):
    from marco_local.offload import Placement
    from marco_local.runtime import load

    folder = str(written["nf4"][0])
    texts = []
    for placement in (None, Placement(experts_resident="25%")):
        loaded = load(folder, dtype="f32", device="cpu", placement=placement)
        texts.append(generate(loaded.model, loaded.tokenizer, "Hello there", max_tokens=12, sampler=make_sampler(0.0)))
    assert loaded.model.offload.plan.slots == 2 and loaded.model.offload.stats().misses > 0
    assert texts[1] == texts[0] and len(texts[0]) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_offloaded_experts_on_cuda(written, preset):
    """Slots in VRAM, the experts in pinned host RAM: the CUDA paths (stacked 4-bit experts, LLM.int8 kernels) compute
    on the slot views what the resident model computes."""
    from marco_local.offload import Placement, install

    folder, _ = written[preset]
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(3))
    want = steps(load_bnb_model(folder, dtype=torch.bfloat16, device="cuda"), ids)
    model = load_bnb_model(folder, dtype=torch.bfloat16, device="cuda")
    install(model, Placement(experts_resident="2"))
    experts = model.model.layers[0].mlp.experts
    assert experts.slots.is_cuda and experts.store.rows.is_pinned()
    for got, ref in zip(steps(model, ids), want, strict=True):
        assert rel_rmse(got, ref) < 1e-3
    model.offload.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["nf4", "fp4"])
@pytest.mark.parametrize("slots", [None, "2"])
@torch.no_grad()
def test_4bit_decode_from_cuda_graphs(written, preset, slots):
    """On CUDA, 4-bit folders load graph-capturable (stacked experts, dense attention): the graphed decode gives the
    eager decode's greedy tokens, resident and offloaded."""
    from marco_local.decode.cuda_graphs import GraphedDecoder
    from marco_local.generate import PromptCache, generate_step
    from marco_local.layers.bnb import StackedExperts4bit
    from marco_local.offload import Placement, install

    model = load_bnb_model(written[preset][0], dtype=torch.float32, device="cuda")
    assert isinstance(model.model.layers[0].mlp.experts, StackedExperts4bit)
    if slots:
        install(model, Placement(experts_resident=slots))
    assert GraphedDecoder.supports(model)

    def greedy() -> list[int]:
        cache = PromptCache(make_cache(model, 40))
        return list(generate_step(model, list(range(5, 17)), cache, make_sampler(0.0), max_tokens=24))

    want = greedy()
    decoder = GraphedDecoder(model, min_window=16)
    set_decode_step(model, decoder)
    assert greedy() == want and decoder.captures >= 2 and not decoder.failed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", PRESETS)
@torch.no_grad()
def test_cuda_kernels_match_cpu(written, preset):
    """The CUDA paths against the CPU path: 4-bit as load_bnb_model prepares it for CUDA graphs (stacked experts
    dequantized in torch ops, dense attention), int8 on bitsandbytes' LLM.int8 kernels (activation quantization)."""
    folder, _ = written[preset]
    cpu = load_bnb_model(folder, dtype=torch.float32)
    gpu = load_bnb_model(folder, dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(0, cpu.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(5))
    a = cpu(ids, make_cache(cpu, 16))
    b = gpu(ids.cuda(), make_cache(gpu, 16)).float().cpu()
    assert rel_rmse(b, a) < (0.1 if preset == "int8" else 0.05)
    one = gpu(ids[:, :1].cuda(), make_cache(gpu, 4)).float().cpu()  # single token: gathered experts (4-bit)
    assert rel_rmse(one, a[:, :1]) < (0.1 if preset == "int8" else 0.05)
