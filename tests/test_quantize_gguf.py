"""GGUF export (`quant/gguf_writer.py`, `quant/convert.py`, `marco quantize`): files re-read with gguf-py's reader,
llama.cpp's type rules, safety (no overwrite, no partial output), and llama.cpp itself running the result.

Fixtures: the default tiny checkpoint (hidden 64, 8 experts: rows too short for K-quants, so it exercises the
fallbacks and llama.cpp's 8-expert rules) and `kq`, a Nano-like one whose rows fit K-quant super-blocks (hidden 256,
experts 384 wide like Marco-Nano's ffn_down, 4 layers so the _M mixes have "more bits" layers).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from typer.testing import CliRunner

from marco_local.cli.main import app
from marco_local.config import load_config
from marco_local.errors import MarcoError
from marco_local.formats.checkpoint import Checkpoint
from quant import convert, gguf_writer
from quant.gguf_names import GLOBAL_NAMES, LAYER_NAMES, gguf_name
from quant.gguf_writer import GGUF_PRESETS, plan_gguf, read_vocab, tensor_type

KQ = dict(
    hidden_size=256,
    moe_intermediate_size=384,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=3,
    num_experts_per_tok=2,
    num_hidden_layers=4,
)

# relative RMSE (rmse / std of the source) a type must stay within on gaussian weights
REL_RMSE = {
    T.F32: 0.0,
    T.F16: 1e-3,
    T.BF16: 5e-3,
    T.Q8_0: 0.01,
    T.Q6_K: 0.03,
    T.Q5_K: 0.05,
    T.Q5_0: 0.06,
    T.Q5_1: 0.06,
    T.Q4_K: 0.1,
    T.Q4_0: 0.12,
}


@pytest.fixture(scope="module")
def kq(make_checkpoint):
    return make_checkpoint("gguf-kq", seed=3, **KQ)


def hf_tensor(folder: Path, gname: str, cfg) -> torch.Tensor:
    """The float32 source of GGUF tensor `gname` (experts stacked)."""
    ckpt = Checkpoint(folder)
    for hf, g in GLOBAL_NAMES.items():
        if g == gname:
            return ckpt.get(hf).float()
    layer, rel = int(gname.split(".")[1]), gname.split(".", 2)[2]
    hf_rel = next(k for k, v in LAYER_NAMES.items() if v == rel)
    if hf_rel.startswith("mlp.experts."):
        proj = hf_rel.rsplit(".", 1)[1]
        names = [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in range(cfg.num_experts)]
        return torch.stack([ckpt.get(n).float() for n in names])
    return ckpt.get(f"model.layers.{layer}.{hf_rel}").float()


def write(folder: Path, out: Path, preset: str, **kw) -> convert.QuantizeReport:
    return convert.quantize(folder, out, preset, **kw)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


# ---------------------------------------------------------------------------------------------------------------------
# Names and type rules


def test_name_table_matches_gguf_py():
    m = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, 4)
    for hf, g in GLOBAL_NAMES.items():
        assert m.get_name(hf.removesuffix(".weight")) == g.removesuffix(".weight")
    for rel, g in LAYER_NAMES.items():
        if rel.startswith("mlp.") and "experts" not in rel and rel != "mlp.gate.weight":
            continue  # dense FFN names: not part of gguf-py's qwen3moe tensor set (llama.cpp has no dense layers)
        assert m.get_name(f"model.layers.2.{rel.removesuffix('.weight')}") == f"blk.2.{g.removesuffix('.weight')}"
    assert gguf_name("model.layers.11.mlp.experts.down_proj") == "blk.11.ffn_down_exps.weight"
    with pytest.raises(KeyError):
        gguf_name("model.layers.0.mlp.shared_expert.gate_proj.weight")


def nano_tensors(n_layer: int = 28):
    L, D, E, I, V, hd = n_layer, 1024, 232, 384, 151936, 128
    yield "token_embd.weight", (V, D)
    for i in range(L):
        p = f"blk.{i}."
        yield from [
            (p + "attn_norm.weight", (D,)),
            (p + "attn_q.weight", (16 * hd, D)),
            (p + "attn_k.weight", (8 * hd, D)),
            (p + "attn_v.weight", (8 * hd, D)),
            (p + "attn_q_norm.weight", (hd,)),
            (p + "attn_k_norm.weight", (hd,)),
            (p + "attn_output.weight", (D, 16 * hd)),
            (p + "ffn_norm.weight", (D,)),
            (p + "ffn_gate_inp.weight", (E, D)),
            (p + "ffn_gate_exps.weight", (E, I, D)),
            (p + "ffn_up_exps.weight", (E, I, D)),
            (p + "ffn_down_exps.weight", (E, D, I)),
        ]
    yield "output_norm.weight", (D,)


def test_q4_k_m_types_for_marco_nano():
    """The mix llama-quantize produces for Marco-Nano (MODELS.md): its 28-layer Q4_K_M is 5117 MiB, 5.37 bpw."""
    types = {n: tensor_type("q4_k_m", n, s, 28, 232, tied=True) for n, s in nano_tensors()}
    assert types["token_embd.weight"] == T.Q6_K
    assert types["blk.0.ffn_gate_inp.weight"] == T.F32 and types["blk.0.attn_norm.weight"] == T.F32
    assert types["blk.0.ffn_gate_exps.weight"] == T.Q4_K and types["blk.0.attn_q.weight"] == T.Q4_K
    # use_more_bits layers (0-2, 5, 8, ..., 24-27): attn_v Q6_K, ffn_down Q6_K -> Q8_0 (rows of 384)
    assert types["blk.0.attn_v.weight"] == T.Q6_K and types["blk.4.attn_v.weight"] == T.Q4_K
    assert types["blk.5.attn_v.weight"] == T.Q6_K and types["blk.27.attn_v.weight"] == T.Q6_K
    assert types["blk.0.ffn_down_exps.weight"] == T.Q8_0 and types["blk.4.ffn_down_exps.weight"] == T.Q5_0
    shapes = dict(nano_tensors())
    nbytes = sum(np.prod(shapes[n][:-1]) * gguf_writer._row_bytes(t, shapes[n][-1]) for n, t in types.items())
    params = sum(np.prod(s) for s in shapes.values())
    assert round(nbytes / 2**20) == 5117
    assert abs(8 * nbytes / params - 5.37) < 0.005


def test_type_rules_other_presets():
    s_exp, s_down, s_emb = (232, 384, 1024), (232, 1024, 384), (151936, 1024)
    assert tensor_type("q8_0", "token_embd.weight", s_emb, 28, 232, True) == T.Q8_0
    assert tensor_type("q4_0", "token_embd.weight", s_emb, 28, 232, True) == T.Q6_K
    assert tensor_type("q4_0", "token_embd.weight", s_emb, 28, 232, False) == T.Q4_0  # untied: output gets Q6_K
    assert tensor_type("q4_0", "output.weight", s_emb, 28, 232, False) == T.Q6_K
    assert tensor_type("q5_k_m", "blk.3.ffn_down_exps.weight", s_down, 28, 232, True) == T.Q5_1
    assert tensor_type("q5_k_m", "blk.0.ffn_down_exps.weight", s_down, 28, 232, True) == T.Q8_0
    assert tensor_type("q6_k", "blk.3.ffn_up_exps.weight", s_exp, 28, 232, True) == T.Q6_K
    assert tensor_type("bf16", "blk.3.ffn_up_exps.weight", s_exp, 28, 232, True) == T.BF16
    assert tensor_type("bf16", "blk.3.ffn_gate_inp.weight", (232, 1024), 28, 232, True) == T.F32
    # llama.cpp's 8-expert special case (Mixtral-like): attn_k/attn_v Q8_0, attn_output Q5_K in Q4_K_M
    assert tensor_type("q4_k_m", "blk.3.attn_k.weight", (1024, 1024), 28, 8, True) == T.Q8_0
    assert tensor_type("q4_k_m", "blk.3.attn_output.weight", (1024, 1024), 28, 8, True) == T.Q5_K


# ---------------------------------------------------------------------------------------------------------------------
# Files re-read with gguf-py


def check_file(path: Path, folder: Path, preset: str) -> gguf.GGUFReader:
    cfg = load_config(folder)
    plan = plan_gguf(Checkpoint(folder), cfg, preset)
    r = gguf.GGUFReader(path)
    assert field(r, "general.architecture") == "qwen3moe"
    assert field(r, "general.file_type") == GGUF_PRESETS[preset].ftype
    assert field(r, "general.quantization_version") == 2
    expect = {
        "qwen3moe.block_count": cfg.num_hidden_layers,
        "qwen3moe.context_length": cfg.max_position_embeddings,
        "qwen3moe.embedding_length": cfg.hidden_size,
        "qwen3moe.feed_forward_length": cfg.intermediate_size,
        "qwen3moe.attention.head_count": cfg.num_attention_heads,
        "qwen3moe.attention.head_count_kv": cfg.num_key_value_heads,
        "qwen3moe.expert_count": cfg.num_experts,
        "qwen3moe.expert_used_count": cfg.num_experts_per_tok,
        "qwen3moe.attention.key_length": cfg.head_dim,
        "qwen3moe.attention.value_length": cfg.head_dim,
        "qwen3moe.expert_feed_forward_length": cfg.moe_intermediate_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.eos_token_id": cfg.eos_token_ids[0],
        "tokenizer.ggml.bos_token_id": cfg.bos_token_id,
        "tokenizer.ggml.padding_token_id": cfg.bos_token_id,  # <|endoftext|> in the fixtures
    }
    for key, value in expect.items():
        assert field(r, key) == value, key
    assert field(r, "qwen3moe.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field(r, "qwen3moe.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size and len(field(r, "tokenizer.ggml.token_type")) == cfg.vocab_size
    assert "<|im_end|>" in field(r, "tokenizer.chat_template")
    assert all(" " in m for m in field(r, "tokenizer.ggml.merges")[:20])
    # tensors: names and order, ggml shapes (reversed torch shapes), types
    assert [t.name for t in r.tensors] == [p.name for p in plan]
    for t, p in zip(r.tensors, plan, strict=True):
        assert t.tensor_type == p.ggml_type, t.name
        assert tuple(int(x) for x in t.shape) == tuple(reversed(p.shape)), t.name
    names = {t.name for t in r.tensors}
    assert ("output.weight" in names) == (not cfg.tie_word_embeddings)
    assert all(t.tensor_type == T.F32 for t in r.tensors if "norm" in t.name or "ffn_gate_inp" in t.name)
    return r


def check_values(r: gguf.GGUFReader, folder: Path) -> None:
    cfg = load_config(folder)
    for t in r.tensors:
        src = hf_tensor(folder, t.name, cfg).numpy()
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src.shape)
        rel = float(np.sqrt(np.mean((got - src) ** 2)) / (src.std() + 1e-12))
        assert rel <= REL_RMSE[t.tensor_type] + 1e-7, f"{t.name} {t.tensor_type.name}: relative RMSE {rel:.4f}"


@pytest.mark.parametrize("preset", ["f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k_m", "q5_k_m", "q6_k"])
def test_every_preset_kq(kq, tmp_path, preset):
    folder, _ = kq
    out = tmp_path / f"m-{preset}.gguf"
    report = write(folder, out, preset)
    r = check_file(out, folder, preset)
    check_values(r, folder)
    assert report.output_bytes == out.stat().st_size
    assert set(report.classes) == {"embeddings", "attention", "router", "experts", "norms"}
    assert report.classes["router"].bits_per_weight == 32 and report.classes["norms"].bits_per_weight == 32
    types = {t.name: t.tensor_type for t in r.tensors}
    if preset == "q4_k_m":  # 4 layers: use_more_bits = layers 2, 3
        assert types["token_embd.weight"] == T.Q6_K
        assert types["blk.0.ffn_gate_exps.weight"] == T.Q4_K
        assert types["blk.0.attn_v.weight"] == T.Q4_K and types["blk.2.attn_v.weight"] == T.Q6_K
        assert types["blk.1.ffn_down_exps.weight"] == T.Q5_0 and types["blk.3.ffn_down_exps.weight"] == T.Q8_0
        assert 4.5 < report.classes["experts"].bits_per_weight < 6.5
        assert any("ffn_down_exps" in w and "Q5_0" in w for w in report.warnings)


@pytest.mark.parametrize("preset", ["f32", "q8_0", "q4_k_m"])
def test_small_fixture_fallbacks(checkpoint, tmp_path, preset):
    """Rows of 32/64 weights: K-quants fall back to 32-blocks; 8 experts trigger llama.cpp's attn_k/attn_v rule."""
    folder, _ = checkpoint
    out = tmp_path / "small.gguf"
    write(folder, out, preset)
    r = check_file(out, folder, preset)
    check_values(r, folder)
    types = {t.name: t.tensor_type for t in r.tensors}
    if preset == "q4_k_m":
        assert types["token_embd.weight"] == T.Q8_0  # tied, rows of 64: Q8_0 instead of Q6_K
        assert types["blk.1.attn_k.weight"] == T.Q8_0 and types["blk.1.attn_v.weight"] == T.Q8_0
        assert types["blk.1.attn_output.weight"] == T.Q5_1  # Q5_K (8 experts) -> Q5_1
        assert types["blk.1.ffn_gate_exps.weight"] == T.Q5_0


def test_untied_output(make_checkpoint, tmp_path):
    folder, _ = make_checkpoint("gguf-untied", seed=5, tie_word_embeddings=False)
    out = tmp_path / "untied.gguf"
    write(folder, out, "q4_0")
    r = check_file(out, folder, "q4_0")
    check_values(r, folder)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["output.weight"] == T.Q8_0 and types["token_embd.weight"] == T.Q4_0  # rows of 64: no Q6_K


def test_vocab_padding_and_types(kq):
    folder, _ = kq
    n = Checkpoint(folder).shape("model.embed_tokens.weight")[0]
    v = read_vocab(folder, n + 5)
    assert v.tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 5)]
    assert v.token_types[n:] == [gguf.TokenType.UNUSED] * 5
    assert v.token_types[v.tokens.index("<|im_end|>")] == gguf.TokenType.CONTROL
    assert v.token_types.count(gguf.TokenType.NORMAL) == n - 3


# ---------------------------------------------------------------------------------------------------------------------
# Safety


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_refuses_to_overwrite(checkpoint, tmp_path):
    folder, _ = checkpoint
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(MarcoError, match="already exists") as e:
        write(folder, out, "q8_0")
    assert "--force" in e.value.hint and out.read_bytes() == b"precious"
    result = CliRunner().invoke(app, ["quantize", str(folder), "-o", str(out), "--to", "q8_0"])
    assert result.exit_code == 1 and out.read_bytes() == b"precious"
    write(folder, out, "q8_0", force=True)
    assert gguf.GGUFReader(out).tensors and leftovers(tmp_path) == []


SHORT_WRITE = OSError("14155776 requested and 3404128 written")  # numpy's tofile on a full disk: no errno


@pytest.mark.parametrize(
    "exc", [RuntimeError("injected"), KeyboardInterrupt(), OSError(28, "No space left on device"), SHORT_WRITE]
)
def test_failure_mid_write_leaves_nothing(checkpoint, tmp_path, monkeypatch, exc):
    folder, _ = checkpoint
    if exc is SHORT_WRITE:  # the disk is full once the write fails
        monkeypatch.setattr(convert, "_nearly_full", lambda folder: True)
    real = gguf_writer._encode
    calls = {"n": 0}

    def failing(t, advance):
        calls["n"] += 1
        if calls["n"] == 20:  # halfway through the tensors
            raise exc
        return real(t, advance)

    monkeypatch.setattr(gguf_writer, "_encode", failing)
    out = tmp_path / "m.gguf"
    with pytest.raises((type(exc), MarcoError)) as e:
        write(folder, out, "q4_0")
    if isinstance(exc, OSError):
        assert isinstance(e.value, MarcoError) and "disk filled up" in e.value.message
    assert calls["n"] == 20 and not out.exists() and leftovers(tmp_path) == []
    # with --force, a failed run keeps the old output
    out.write_bytes(b"old")
    calls["n"] = 0
    with pytest.raises((type(exc), MarcoError)):
        write(folder, out, "q4_0", force=True)
    assert out.read_bytes() == b"old" and leftovers(tmp_path) == []


def copy_checkpoint(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def test_truncated_shard_is_a_clear_error(checkpoint, tmp_path):
    folder = copy_checkpoint(checkpoint[0], tmp_path / "src")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(MarcoError, match="truncated"):
        write(folder, out, "q8_0")
    assert list(out.parent.iterdir()) == []
    result = CliRunner().invoke(app, ["quantize", str(folder), "-o", str(out), "--to", "q8_0"])
    assert result.exit_code == 1 and list(out.parent.iterdir()) == []


def test_missing_tensor_and_wrong_shape(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(checkpoint[0], tmp_path / "src")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MarcoError, match="experts.3.up_proj.weight is missing"):
        write(folder, tmp_path / "m.gguf", "q8_0")
    tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(5, 5)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MarcoError, match="shape"):
        write(folder, tmp_path / "m.gguf", "q8_0")
    assert leftovers(tmp_path) == [] and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("preset", ["q8_0", "nf4"])
def test_refuses_weights_it_would_drop_or_misread(checkpoint, tmp_path, preset):
    """A tensor the GGUF has no place for (a shared expert) was left out silently, so the file computed another
    model; integer codes were quantized as if they were weights."""
    from safetensors.torch import load_file, save_file

    if preset == "nf4":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / ("m.gguf" if preset == "q8_0" else "m")
    folder = copy_checkpoint(checkpoint[0], tmp_path / "src")
    tensors = load_file(folder / "model.safetensors")
    extra = dict(tensors, **{"model.layers.0.mlp.shared_expert.weight": torch.zeros(4, 4)})
    save_file(extra, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MarcoError, match="unexpected tensor model.layers.0.mlp.shared_expert.weight"):
        write(folder, out, preset)
    name = "model.layers.1.self_attn.q_proj.weight"
    codes = dict(tensors, **{name: tensors[name].to(torch.int8)})
    save_file(codes, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MarcoError, match=f"tensor {name} in .* is stored as I8"):
        write(folder, out, preset)
    assert leftovers(tmp_path) == [] and not out.exists()


@pytest.mark.parametrize(
    "change, message",
    [({"norm_topk_prob": False}, "norm_topk_prob"), ({"mlp_only_layers": [1]}, "dense")],
)
def test_refuses_what_llama_cpp_cannot_express(checkpoint, tmp_path, change, message):
    folder = copy_checkpoint(checkpoint[0], tmp_path / "src")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MarcoError, match=message):
        write(folder, tmp_path / "m.gguf", "q8_0")
    assert not (tmp_path / "m.gguf").exists()


def test_fallback_notes_name_global_tensors_whole(make_checkpoint, tmp_path):
    """Layer tensors are named without `blk.N.` (one note for all layers); global ones keep their whole name."""
    folder, _ = make_checkpoint("gguf-untied-128", hidden_size=128, head_dim=32, tie_word_embeddings=False)
    notes = write(folder, tmp_path / "m.gguf", "q4_k_m").warnings
    names = {note.split(":")[0] for note in notes}
    assert "token_embd.weight" in names and "attn_q.weight" in names, notes
    assert not any(name.startswith("blk.") or name == "weight" for name in names), notes


def test_cli_summary(checkpoint, tmp_path):
    folder, _ = checkpoint
    out = tmp_path / "cli.gguf"
    result = CliRunner().invoke(app, ["quantize", str(folder), "-o", str(out), "--to", "q4_k_m"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and leftovers(tmp_path) == []
    for word in ("experts", "router", "embeddings", "bits/weight", "Q5_0", "stored as"):
        assert word in result.output


# --force replaces only what a quantize run could have written; everything else is refused before any work, intact.


def user_folder(folder: Path) -> Path:
    """A folder of a user's own files, one in a subfolder."""
    (folder / "photos").mkdir(parents=True)
    (folder / "notes.txt").write_bytes(b"mine")
    (folder / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 a cat")
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal before and after means nothing was lost or added."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_force_gguf_replaces_a_file_or_a_link_never_a_folder(checkpoint, tmp_path, marco_main):
    folder, _ = checkpoint
    old = tmp_path / "old.gguf"
    write(folder, old, "q4_0")
    write(folder, old, "q8_0", force=True)  # a previous GGUF file is replaced
    assert field(gguf.GGUFReader(old), "general.file_type") == GGUF_PRESETS["q8_0"].ftype
    target = tmp_path / "keep.gguf"
    target.write_bytes(b"precious")
    link = tmp_path / "link.gguf"
    link.symlink_to(target)
    write(folder, link, "q8_0", force=True)  # the link is replaced, not followed
    assert not link.is_symlink() and gguf.GGUFReader(link).tensors and target.read_bytes() == b"precious"

    data = user_folder(tmp_path / "mydata.gguf")
    before = tree(tmp_path)
    for force in (True, False):
        with pytest.raises(MarcoError, match="is a folder; --to q8_0 writes one .gguf file") as e:
            write(folder, data, "q8_0", force=force)
        assert e.value.exit_code == 2 and "-o" in e.value.hint
    code, err = marco_main("quantize", str(folder), "-o", str(data), "--to", "q8_0", "--force")
    assert code == 2 and err[0] == f"Error: {data} is a folder; --to q8_0 writes one .gguf file", err
    assert len(err) == 2 and err[1].startswith(f"Hint: name the file, e.g. -o {data}/"), err
    assert tree(tmp_path) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "preset, out, message",
    [
        ("q8_0", ".", "is a folder; --to q8_0 writes one .gguf file"),
        ("q8_0", "..", "is a folder; --to q8_0 writes one .gguf file"),
        ("nf4", ".", "is the current folder"),
        ("int8", "..", "is a folder above the current one"),
        ("nf4", "../..", "is your home folder"),
        ("nf4", "~", "is your home folder"),
        ("nf4", "HERE", "is the current folder"),
        ("nf4", "sub/..", "is the current folder"),
    ],
)
def test_force_never_replaces_the_current_folder_or_one_above(
    checkpoint, tmp_path, monkeypatch, marco_main, preset, out, message
):
    """`-o . --force` once emptied the folder it ran in, then failed renaming onto '.'; `-o ..` wiped the parent."""
    folder, _ = checkpoint
    home = user_folder(tmp_path / "home")
    here = user_folder(home / "work" / "here")
    user_folder(home / "work")
    (here / "sub").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    out = str(here) if out == "HERE" else out
    before = tree(tmp_path)
    with pytest.raises(MarcoError, match=message) as e:
        write(folder, out, preset, force=True)
    assert e.value.exit_code == 2 and "-o" in e.value.hint
    code, err = marco_main("quantize", str(folder), "-o", out, "--to", preset, "--force")
    assert code == 2 and err[0].startswith(f"Error: {Path(out).expanduser()} ") and message in err[0], err
    assert len(err) == 2 and err[1].startswith("Hint: "), err
    assert tree(tmp_path) == before and leftovers(here) == leftovers(here.parent) == []


def test_force_replaces_only_a_previous_bnb_output(checkpoint, tmp_path, marco_main):
    """A bnb output folder is replaced only when it holds exactly what write_bnb writes (config.json recording a
    bitsandbytes quantization_config, shards, index, tokenizer files); one file more, and it is the user's."""
    pytest.importorskip("bitsandbytes")
    folder, _ = checkpoint
    out = tmp_path / "m-nf4"
    write(folder, out, "nf4")
    others = {
        "a user's file added": lambda d: (d / "notes.txt").write_bytes(b"mine"),
        "a subfolder": lambda d: (d / "runs").mkdir(),
        "a link": lambda d: (d / "vocab.json").symlink_to(d / "tokenizer.json"),
    }
    for what, change in others.items():
        change(out)
        before = tree(tmp_path)
        with pytest.raises(MarcoError, match="is a folder that marco quantize did not write") as e:
            write(folder, out, "int8", force=True)
        assert e.value.exit_code == 2 and "-o" in e.value.hint, what
        assert tree(tmp_path) == before and leftovers(tmp_path) == [], what
    shutil.rmtree(out / "runs")
    (out / "notes.txt").unlink()
    (out / "vocab.json").unlink()

    data = user_folder(tmp_path / "data")
    (data / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))  # a checkpoint, not a bnb output
    before = tree(data)
    code, err = marco_main("quantize", str(folder), "-o", str(data), "--to", "nf4", "--force")
    assert (
        code == 2 and err[0] == f"Error: {data} is a folder that marco quantize did not write; refusing to replace it"
    ), err
    assert len(err) == 2 and err[1].startswith("Hint: choose a new name with -o"), err
    code, err = marco_main("quantize", str(folder), "-o", str(data), "--to", "nf4")  # no --force: not offered it
    assert code == 2 and "did not write" in err[0] and "--force" not in err[0], err
    assert tree(data) == before

    write(folder, out, "int8", force=True)  # what a previous run wrote is replaced
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"] is True
    assert leftovers(tmp_path) == [] and tree(data) == before


def test_force_never_replaces_a_file_of_the_source(checkpoint, tmp_path):
    """A bnb output is a folder: `-o SRC/config.json --to nf4 --force` would have replaced the source's config."""
    folder = copy_checkpoint(checkpoint[0], tmp_path / "src")
    before = tree(folder)
    with pytest.raises(MarcoError, match="is a file of the source checkpoint") as e:
        write(folder, folder / "config.json", "nf4", force=True)
    assert e.value.exit_code == 2
    with pytest.raises(MarcoError, match="holds the source checkpoint"):
        write(folder, folder, "nf4", force=True)
    assert tree(folder) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("preset", ["q8_0", "nf4"])
def test_failed_final_rename_keeps_the_previous_output(checkpoint, tmp_path, monkeypatch, preset):
    """The old output is moved aside, not deleted, until the new one is renamed into place; if that fails, it is
    moved back (the old code deleted it first, so a failing rename lost it)."""
    if preset == "nf4":
        pytest.importorskip("bitsandbytes")
    folder, _ = checkpoint
    out = tmp_path / ("m.gguf" if preset == "q8_0" else "m-nf4")
    write(folder, out, preset)
    before = tree(tmp_path)
    real, failed = os.replace, []

    def failing(a, b):
        if str(a).endswith(".partial") and not failed:  # the finished output being renamed to OUT
            failed.append(a)
            raise OSError(errno.EIO, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(convert.os, "replace", failing)
    with pytest.raises(MarcoError, match="old one is kept"):
        write(folder, out, preset, force=True)
    assert failed and tree(tmp_path) == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------------
# llama.cpp runs the files


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    # f32 KV cache: llama.cpp's default f16 cache alone costs ~1e-3 of logit accuracy
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, verbose=False, logits_all=True, n_threads=1, type_k=0, type_v=0
    )
    assert llm.tokenize(b"Hello world, how are you?", add_bos=False, special=False) == ids
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def dequantized_model(model, path: Path):
    """A copy of the transformers model whose weights are the GGUF file's, dequantized."""
    import copy

    m = copy.deepcopy(model)
    cfg = m.config
    params = dict(m.named_parameters())
    for t in gguf.GGUFReader(path).tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        if t.name in ("token_embd.weight", "output.weight", "output_norm.weight"):
            hf = next(k for k, v in GLOBAL_NAMES.items() if v == t.name)
            params[hf].data.copy_(w.reshape(params[hf].shape))
            continue
        layer, rel = int(t.name.split(".")[1]), t.name.split(".", 2)[2]
        hf_rel = next(k for k, v in LAYER_NAMES.items() if v == rel)
        if hf_rel.startswith("mlp.experts."):
            proj = hf_rel.rsplit(".", 1)[1]
            experts = m.model.layers[layer].mlp.experts
            w = w.reshape(cfg.num_experts, *w.shape[-2:])
            if hasattr(experts, "gate_up_proj"):  # transformers 5: fused [E, 2I, D] and [E, D, I]
                inter = cfg.moe_intermediate_size
                if proj == "down_proj":
                    experts.down_proj.data.copy_(w)
                else:
                    experts.gate_up_proj.data[:, (0 if proj == "gate_proj" else inter) :][:, :inter].copy_(w)
            else:
                for e in range(cfg.num_experts):
                    getattr(experts[e], proj).weight.data.copy_(w[e])
        else:
            p = params[f"model.layers.{layer}.{hf_rel}"]
            p.data.copy_(w.reshape(p.shape))
    return m


# Measured here: f32 0 / 0; q8_0 0.023 / 0.036; q4_k_m 0.028 / 0.32 (the tiny random model amplifies weight error:
# transformers on the dequantized weights is just as far from the float32 logits).
@pytest.mark.parametrize(
    "preset, tol_self, tol_float", [("f32", 1e-5, 1e-5), ("q8_0", 0.05, 0.06), ("q4_k_m", 0.05, 0.45)]
)
def test_llama_cpp_runs_the_file(kq, tokenizer_obj, tmp_path, preset, tol_self, tol_float):
    """llama.cpp loads our file, tokenizes like the source tokenizer, and its logits match transformers'.

    tol_self bounds the relative RMS logit error against transformers running the file's own (dequantized) weights:
    what remains is llama.cpp quantizing activations for its matmuls. tol_float bounds it against the float32 source.
    """
    folder, model = kq
    out = tmp_path / f"{preset}.gguf"
    write(folder, out, preset)
    ids = tokenizer_obj.encode("Hello world, how are you?").ids
    got = llama_logits(out, ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
        ref_q = dequantized_model(model, out)(torch.tensor([ids])).logits[0].numpy()

    def rel(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)) / b.std())

    assert rel(got, ref_q) < tol_self, f"vs dequantized weights: {rel(got, ref_q):.4f}"
    assert rel(got, ref) < tol_float, f"vs float32 source: {rel(got, ref):.4f}"


def test_llama_cpp_tokenizes_like_the_source(checkpoint, tokenizer_obj, tmp_path):
    """The qwen2 pre-tokenizer, the merges and the special tokens in the file reproduce the source tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "tok.gguf"
    write(checkpoint[0], out, "q8_0")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, n_threads=1)
    texts = [
        "The capital of France is Paris. I'll say it's 2024!",
        "法国的首都是巴黎。你好 🚀  spaces\n\nnewlines\t tab",
        "<|im_start|>user\nHola, ¿cómo estás?<|im_end|>\n",
        "Türkiye'nin başkenti Ankara'dır 12345 x=y+1",
    ]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer_obj.encode(text).ids, text
    im_end = tokenizer_obj.token_to_id("<|im_end|>")
    assert llm.token_eos() == im_end
    assert llm.detokenize(tokenizer_obj.encode(texts[1]).ids).decode() == texts[1]


def test_sigterm_mid_write_leaves_nothing(checkpoint, tmp_path):
    """`kill` during `marco quantize`: exit 143, no output, no temporary file."""
    import signal
    import subprocess
    import sys
    import time

    folder, _ = checkpoint
    out = tmp_path / "m.gguf"
    child = f"""
import sys, time
from quant import gguf_writer
real = gguf_writer._encode
def slow(t, advance):
    time.sleep(0.2)
    return real(t, advance)
gguf_writer._encode = slow
sys.argv = ["marco", "quantize", {str(folder)!r}, "-o", {str(out)!r}, "--to", "q8_0"]
from marco_local.cli.main import main
main()
"""
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=Path(__file__).parents[1], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".m.gguf.*.partial")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".m.gguf.*.partial")), "the child never started writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, proc.stderr.read().decode()
    assert not out.exists() and leftovers(tmp_path) == []


def test_fused_expert_layout_gives_the_same_file(checkpoint, tmp_path):
    """transformers 5's in-memory layout (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj` [E, D, I])."""
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(checkpoint[0], tmp_path / "src")
    cfg = load_config(folder)
    tensors = load_file(folder / "model.safetensors")
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        per = {
            proj: [tensors.pop(f"{p}{e}.{proj}.weight") for e in range(cfg.num_experts)]
            for proj in ("gate_proj", "up_proj", "down_proj")
        }
        tensors[p + "gate_up_proj"] = torch.cat([torch.stack(per["gate_proj"]), torch.stack(per["up_proj"])], dim=1)
        tensors[p + "down_proj"] = torch.stack(per["down_proj"])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    write(checkpoint[0], tmp_path / "a.gguf", "q8_0")
    write(folder, tmp_path / "b.gguf", "q8_0")
    a, b = gguf.GGUFReader(tmp_path / "a.gguf"), gguf.GGUFReader(tmp_path / "b.gguf")
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert ta.name == tb.name and np.array_equal(ta.data, tb.data), ta.name


def test_bnb_presets_are_dispatched_atomically(checkpoint, tmp_path, monkeypatch):
    """nf4/int8 go to quant.bnb_writer into a temporary folder that is renamed, or removed on failure."""
    pytest.importorskip("bitsandbytes")
    from quant import bnb_writer

    folder, _ = checkpoint
    out = tmp_path / "m-nf4"
    report = write(folder, out, "nf4")
    assert report.format == "bnb" and (out / "config.json").is_file() and leftovers(tmp_path) == []
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    assert report.output_bytes > 0 and "experts" in report.classes
    with pytest.raises(MarcoError, match="already exists"):
        write(folder, out, "int8")

    def broken(*args, **kwargs):
        (Path(args[3]) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("injected")

    monkeypatch.setattr(bnb_writer, "write_bnb", broken)
    with pytest.raises(RuntimeError, match="injected"):
        write(folder, out, "int8", force=True)
    assert (out / "config.json").is_file() and leftovers(tmp_path) == []  # the old output is untouched
    with pytest.raises(MarcoError, match="folder"):
        write(folder, tmp_path / "x.gguf", "nf4")


def test_quantize_help_lists_every_type():
    """`--to f32` was accepted but missing from `marco quantize --help`."""
    from quant.convert import PRESETS

    result = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"})
    listed = set(re.findall(r"\b[a-z0-9_]+\b", result.output.split("Types:", 1)[1].split("Examples:", 1)[0]))
    assert result.exit_code == 0 and set(PRESETS) <= listed, (set(PRESETS) - listed, result.output)
