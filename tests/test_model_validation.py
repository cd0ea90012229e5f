"""Malformed model files end in one clear line: each known way a GGUF or a checkpoint folder went wrong (a hang, a
crash in the catch-all, a silent misread) now ends in `Error: ...` naming the key and the value, exit code 1.

The files are the fuzzer's small base models (tests/model_fuzz.py), edited one field at a time.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import model_fuzz as mf
import pytest
import torch

from marco_local.errors import MarcoError
from marco_local.layers.kv_cache import make_cache

RUN = ("hi", "-n", "2", "--device", "cpu")


@pytest.fixture(scope="module")
def bases(fuzz_bases):
    """(F32 GGUF, Q8_0 GGUF, checkpoint folder, sharded checkpoint folder) of the fuzzer's tiny model."""
    ggufs, folders = fuzz_bases
    return (*ggufs, *folders)


def one_error(code: int, lines: list[str], *expected: str) -> str:
    assert code == 1, lines
    assert lines and lines[0].startswith("Error:") and "unexpected" not in lines[0], lines
    assert len(lines) <= 2 and all(line.startswith(("Error:", "Hint:")) for line in lines), lines
    for text in expected:
        assert text in lines[0], lines
    return lines[0]


def edit_gguf(src: Path, dst: Path, edit) -> Path:
    doc = mf.parse_gguf(src.read_bytes())
    edit(doc)
    dst.write_bytes(mf.serialize(doc))
    return dst


def set_kv(key: str, vtype: int, value, etype: int | None = None):
    def edit(doc: mf.GGUFDoc) -> None:
        doc.kv = [kv for kv in doc.kv if kv[0] != key] + [[key, vtype, value, etype]]

    return edit


def kv_value(doc: mf.GGUFDoc, key: str):
    return next(kv for kv in doc.kv if kv[0] == key)


def tensor(doc: mf.GGUFDoc, name: str) -> list:
    return next(t for t in doc.tensors if t[0] == name)


def _more_tokens(doc: mf.GGUFDoc) -> None:
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        kv = kv_value(doc, key)
        kv[2] = [*kv[2], "[extra]" if key.endswith("tokens") else 1]


def _overlap(doc: mf.GGUFDoc) -> None:
    tensor(doc, "blk.0.ffn_norm.weight")[3] = tensor(doc, "blk.0.attn_norm.weight")[3]


def _duplicate(doc: mf.GGUFDoc) -> None:
    tensor(doc, "blk.1.ffn_norm.weight")[0] = "blk.1.attn_norm.weight"


def _extra_tensor(name: str):
    def edit(doc: mf.GGUFDoc) -> None:
        base = tensor(doc, "blk.1.attn_norm.weight")
        pad = -len(doc.data) % doc.alignment
        offset = len(doc.data) + pad
        doc.data = doc.data + b"\0" * pad + b"\0" * (4 * base[1][0])
        doc.tensors.append([name, list(base[1]), base[2], offset])

    return edit


def _template(text: str):
    return set_kv("tokenizer.chat_template", mf.STR, text)


GGUF_CASES = [
    # hangs: layers built before any tensor was checked
    ("block_count_2_32", set_kv("qwen3moe.block_count", mf.U32, 2**32 - 1), ["qwen3moe.block_count = 4294967295"]),
    ("block_count_2_64", set_kv("qwen3moe.block_count", mf.U64, 2**64 - 1), ["qwen3moe.block_count = 18446744073709"]),
    # uncaught before
    ("used_gt_count", set_kv("qwen3moe.expert_used_count", mf.U32, 5), ["qwen3moe.expert_used_count = 5", "1..num"]),
    ("used_zero", set_kv("qwen3moe.expert_used_count", mf.U32, 0), ["qwen3moe.expert_used_count = 0"]),
    ("kv_heads_zero", set_kv("qwen3moe.attention.head_count_kv", mf.U32, 0), ["attention.head_count_kv = 0"]),
    ("block_count_str", set_kv("qwen3moe.block_count", mf.STR, "2"), ["qwen3moe.block_count = '2'"]),
    ("head_count_inf", set_kv("qwen3moe.attention.head_count", mf.F32, math.inf), ["attention.head_count = inf"]),
    ("nested_array", set_kv("qwen3moe.block_count", mf.ARR, [[2], [2]], mf.ARR), ["block_count = [[2], [2]]"]),
    ("negative_size", set_kv("qwen3moe.embedding_length", mf.I32, -1), ["qwen3moe.embedding_length = -1"]),
    ("negative_ffn", set_kv("qwen3moe.expert_feed_forward_length", mf.I32, -32), ["expert_feed_forward_length = -32"]),
    ("token_ints", set_kv("tokenizer.ggml.tokens", mf.ARR, list(range(400)), mf.U32), ["tokenizer.ggml.tokens = 0"]),
    ("merge_ints", set_kv("tokenizer.ggml.merges", mf.ARR, [1, 2], mf.U32), ["tokenizer.ggml.merges = 1"]),
    ("more_tokens_than_rows", _more_tokens, ["tokenizer.ggml.tokens = 401", "400 rows"]),
    ("add_bos_int", set_kv("tokenizer.ggml.add_bos_token", mf.I32, -1), ["add_bos_token = -1 is not true or false"]),
    ("template_int", set_kv("tokenizer.chat_template", mf.U32, 7), ["tokenizer.chat_template = 7 is not a string"]),
    ("eos_past_vocab", set_kv("tokenizer.ggml.eos_token_id", mf.U32, 400), ["tokenizer.ggml.eos_token_id = 400"]),
    ("bos_past_vocab", set_kv("tokenizer.ggml.bos_token_id", mf.U32, 2**32 - 1), ["bos_token_id = 4294967295"]),
    ("eos_string", set_kv("tokenizer.ggml.eos_token_id", mf.STR, "2"), ["tokenizer.ggml.eos_token_id = '2'"]),
    ("rope_base", set_kv("qwen3moe.rope.freq_base", mf.F32, 1e30), ["qwen3moe.rope.freq_base = 1.00"]),
    ("rope_base_nan", set_kv("qwen3moe.rope.freq_base", mf.F32, math.nan), ["qwen3moe.rope.freq_base = nan"]),
    ("norm_eps", set_kv("qwen3moe.attention.layer_norm_rms_epsilon", mf.F32, 1e10), ["rms_epsilon = 1000"]),
    ("norm_eps_zero", set_kv("qwen3moe.attention.layer_norm_rms_epsilon", mf.F32, 0.0), ["rms_epsilon = 0.0"]),
    ("context", set_kv("qwen3moe.context_length", mf.U64, 2**64 - 1), ["qwen3moe.context_length = 1844"]),
    (
        "linear_factor",
        lambda d: [
            set_kv("qwen3moe.rope.scaling.type", mf.STR, "linear")(d),
            set_kv("qwen3moe.rope.scaling.factor", mf.F32, 0.0)(d),
        ],
        ["qwen3moe.rope.scaling.factor = 0.0"],
    ),
    # ran on corrupt data before
    ("overlap", _overlap, ["blk.0.", "overlap"]),
    ("duplicate_tensor", _duplicate, ["tensor blk.1.attn_norm.weight appears twice"]),
    ("duplicate_key", lambda d: d.kv.append(list(kv_value(d, "qwen3moe.block_count"))), ["block_count appears twice"]),
    ("block_count_small", set_kv("qwen3moe.block_count", mf.U32, 1), ["block_count = 1", "blk.0 to blk.1"]),
    ("extra_blk_99", _extra_tensor("blk.99.attn_norm.weight"), ["block_count = 2", "blk.0, blk.1, blk.99"]),
    ("extra_tensor", _extra_tensor("made_up.weight"), ["tensor made_up.weight is not part of the model"]),
    # templates
    ("template_zero_div", _template("{{ 1 / 0 }}"), ["chat template failed: ZeroDivisionError"]),
    ("template_type", _template("{{ messages + 1 }}"), ["chat template failed: TypeError"]),
    ("template_recursion", _template("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"), ["RecursionError"]),
    ("template_memory", _template("{{ 'x' * 10000000000 }}"), ["a value of 10,000,000,000 items"]),
    ("template_power", _template("{{ 7 ** 100000000 }}"), ["computes 7 ** 100000000"]),
    (
        "template_ranges",
        _template("{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"),
        ["loops over more than 200,000 range() items"],
    ),
    ("template_output", _template("{% for i in range(99999) %}{{ 'y' * 99 }}{% endfor %}"), ["renders more than"]),
    ("template_empty", _template("{% if false %}x{% endif %}  "), ["the chat template rendered an empty prompt"]),
    ("template_raise", _template("{{ raise_exception('no system role') }}"), ["template failed: no system role"]),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in GGUF_CASES], ids=[c[0] for c in GGUF_CASES])
def test_gguf_errors_name_the_key(bases, tmp_path, marco_main, edit, expected):
    path = edit_gguf(bases[0], tmp_path / "bad.gguf", edit)
    one_error(*marco_main("run", str(path), *RUN), *expected)


def test_template_loop_without_hooks_is_stopped_by_time(bases, tmp_path, marco_main, monkeypatch):
    """Nested loops over literals touch no sandbox hook; the watchdog's time limit stops them."""
    from marco_local import tokenizer

    monkeypatch.setattr(tokenizer, "TEMPLATE_TIME_LIMIT_S", 0.5)
    loops = "".join(f"{{% for v{i} in 'xxxxxxxxxx' %}}" for i in range(9)) + "{% endfor %}" * 9 + "x"
    path = edit_gguf(bases[0], tmp_path / "bomb.gguf", _template(loops))
    one_error(*marco_main("run", str(path), *RUN), "the chat template failed: ran longer than 0.5 s")


def test_base_files_run(bases, marco_main, capsys):
    for model in (bases[0], bases[1], bases[2], bases[3]):
        code, lines = marco_main("run", str(model), *RUN)
        assert code == 0, lines


def test_tokenizer_panic_is_one_error():
    """pyo3's PanicException derives from BaseException: caught by name, while KeyboardInterrupt passes."""
    from marco_local.tokenizer import tokenizer_errors

    PanicException = type("PanicException", (BaseException,), {})  # what pyo3_runtime raises
    with pytest.raises(MarcoError, match="the tokenizer failed to encode: PanicException: index out of bounds"):
        with tokenizer_errors("the tokenizer failed to encode"):
            raise PanicException("index out of bounds")
    with pytest.raises(KeyboardInterrupt):
        with tokenizer_errors("the tokenizer failed to encode"):
            raise KeyboardInterrupt


def test_real_rust_bpe_panic_is_one_error():
    """These merges make the tokenizers library's BPE builder panic (found by hand): the real PanicException, caught
    by the guard that wraps every backend call on model data (gguf_tokenizer.build_backend's among them)."""
    from tokenizers import models

    from marco_local.tokenizer import tokenizer_errors

    vocab = {"l": 0, "o": 1, "lo": 2, "ol": 3}
    with pytest.raises(MarcoError, match="inconsistent: PanicException: range end index"):
        with tokenizer_errors("the tokenizer metadata is inconsistent"):
            models.BPE(vocab=vocab, merges=[("l", "o"), ("o", "l"), ("lo", "l")], fuse_unk=False)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint folders


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(name: str, change):
    def edit(folder: Path) -> None:
        path = folder / name
        data = json.loads(path.read_text())
        path.write_text(json.dumps(change(data)))

    return edit


def set_config(**values):
    return edit_json("config.json", lambda d: {**d, **values})


def _st_header(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = json.dumps(change(json.loads(raw[8 : 8 + n]))).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _reshape_expert(header: dict) -> dict:
    entry = header["model.layers.1.mlp.experts.3.up_proj.weight"]
    entry["shape"] = entry["shape"][::-1] if entry["shape"][0] != entry["shape"][1] else [16, 64]
    return header


def _added_token_past_vocab(d: dict) -> dict:
    d["added_tokens"].append({**d["added_tokens"][0], "id": 400, "content": "<|new|>"})
    return d


FOLDER_CASES = [
    ("layers_2_32", set_config(num_hidden_layers=2**32), ["num_hidden_layers = 4294967296"]),
    ("layers_small", set_config(num_hidden_layers=1), ["num_hidden_layers = 1 does not match", "layers 0 to 1"]),
    ("kv_heads_zero", set_config(num_key_value_heads=0), ["num_key_value_heads = 0"]),
    ("sparse_step_zero", set_config(decoder_sparse_step=0), ["decoder_sparse_step = 0"]),
    ("per_tok_gt_experts", set_config(num_experts_per_tok=5), ["num_experts_per_tok = 5", "num_experts (4)"]),
    ("rope_string", set_config(rope_scaling="linear"), ["rope_scaling = 'linear' is not an object"]),
    ("linear_factor_zero", set_config(rope_scaling={"rope_type": "linear", "factor": 0}), ["rope_scaling.factor = 0"]),
    ("rope_no_factor", set_config(rope_scaling={"rope_type": "linear"}), ["rope_scaling.factor = None"]),
    ("eos_string", set_config(eos_token_id="x"), ["eos_token_id = 'x'"]),
    ("eos_past_vocab", set_config(eos_token_id=[1, 400]), ["eos_token_id = [1, 400]"]),
    ("hidden_string", set_config(hidden_size="32"), ["hidden_size = '32' is not an integer"]),
    ("theta_inf", set_config(rope_theta=math.inf), ["rope_theta = inf"]),
    ("eps_huge", set_config(rms_norm_eps=1e300), ["rms_norm_eps = 1e+300"]),
    ("deep_json", lambda f: (f / "config.json").write_text("[" * 100000 + "]" * 100000), ["not valid JSON"]),
    ("config_list", lambda f: (f / "config.json").write_text("[]"), ["does not hold a JSON object"]),
    ("st_header_list", lambda f: _st_header(f, lambda h: []), ["the safetensors header = [] is not an object"]),
    ("st_entry_str", lambda f: _st_header(f, lambda h: {**h, "model.norm.weight": "x"}), ["model.norm.weight"]),
    (
        "st_offsets",
        lambda f: _st_header(
            f, lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "data_offsets": ["0", 4]}}
        ),
        ["data_offsets = ['0', 4]"],
    ),
    ("expert_reshaped", lambda f: _st_header(f, _reshape_expert), ["experts.3.up_proj.weight has shape", "expert 0"]),
    ("added_token", edit_json("tokenizer.json", _added_token_past_vocab), ["largest token id = 400"]),
    ("gen_not_object", lambda f: (f / "generation_config.json").write_text("3"), ["does not hold a JSON object"]),
    (
        "gen_eos_past_vocab",
        edit_json("generation_config.json", lambda d: {**d, "eos_token_id": 1000}),
        ["eos_token_id = 1000"],
    ),
    (
        "gen_temperature",
        edit_json("generation_config.json", lambda d: {**d, "temperature": "hot"}),
        ["temperature = 'hot' is not a number"],
    ),
    (
        "template_not_str",
        edit_json("tokenizer_config.json", lambda d: {**d, "chat_template": 5}),
        ["chat_template = 5 is not a string"],
    ),
    (
        "template_div",
        edit_json("tokenizer_config.json", lambda d: {**d, "chat_template": "{{ 1 // 0 }}"}),
        ["ZeroDivisionError"],
    ),
]


@pytest.mark.parametrize("edit, expected", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_checkpoint_errors_name_the_key(bases, tmp_path, marco_main, edit, expected):
    folder = copy_folder(bases[2], tmp_path / "model")
    edit(folder)
    one_error(*marco_main("run", str(folder), *RUN), *expected)


def _index_entry(folder: Path, value) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = value
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shard_paths_stay_inside_the_folder(bases, tmp_path, marco_main, how):
    folder = copy_folder(bases[3], tmp_path / "model")
    shard = sorted(folder.glob("*.safetensors"))[-1]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(shard, outside)
    if how == "dotdot":
        _index_entry(folder, "../outside.safetensors")
        expected = "'../outside.safetensors' points outside the model folder"
    elif how == "absolute":
        _index_entry(folder, str(outside))
        expected = "points outside the model folder"
    else:
        (folder / "link.safetensors").symlink_to(outside)
        _index_entry(folder, "link.safetensors")
        expected = "'link.safetensors' links outside the model folder"
    one_error(*marco_main("run", str(folder), *RUN), expected)


def test_hf_cache_snapshot_links_are_inside(tmp_path):
    """A Hugging Face cache snapshot's files link to ../../blobs: that is the model's own store, not an escape."""
    from marco_local.formats.checkpoint import Checkpoint

    snap = tmp_path / "models--a--b" / "snapshots" / "rev"
    blobs = tmp_path / "models--a--b" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    assert Checkpoint.__new__(Checkpoint) is not None
    ckpt = Checkpoint.__new__(Checkpoint)
    ckpt.folder = snap
    (blobs / "abc").write_bytes(b"")
    (snap / "model-1.safetensors").symlink_to(Path("../../blobs/abc"))
    assert ckpt._shard(snap / "model.safetensors.index.json", "model-1.safetensors") == snap / "model-1.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# Mixed expert types


def _mixed_file(src: Path, dst: Path, types: dict[str, str], reference: bool = False) -> Path:
    """`src` (F32) with the expert projections named in `types` re-encoded (e.g. {"ffn_up_exps": "F16"}); with
    `reference`, the same values decoded back to F32 (the float reference of the mixed file)."""
    import gguf
    import numpy as np

    from quant.ggml_codecs import codec_for

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        data = torch.from_numpy(np.array(t.data, dtype=np.float32))
        kind = t.name.split(".")[-2]
        if kind in types:
            codec = codec_for(getattr(gguf.GGMLQuantizationType, types[kind]))
            blocks = codec.quantize(data)
            if reference:
                w.add_tensor(t.name, codec.dequantize(blocks).reshape(data.shape).numpy())
            else:
                w.add_tensor(t.name, blocks.numpy(), raw_dtype=codec.ggml_type)
        else:
            w.add_tensor(t.name, data.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


MIXES = [
    {"ffn_up_exps": "F16", "ffn_gate_exps": "Q5_0", "ffn_down_exps": "Q8_0"},  # the reported file
    {"ffn_gate_exps": "BF16", "ffn_up_exps": "Q4_0", "ffn_down_exps": "Q4_1"},
    {"ffn_down_exps": "F32", "ffn_gate_exps": "Q8_0", "ffn_up_exps": "Q8_0"},
    {"ffn_gate_exps": "Q4_0", "ffn_up_exps": "Q5_1", "ffn_down_exps": "Q8_0"},  # quantized, a type each
]


@pytest.mark.parametrize("mix", MIXES, ids=["/".join(m.values()) for m in MIXES])
def test_mixed_expert_types_match_a_float_reference(bases, tmp_path, mix):
    from marco_local.formats.gguf import GGUFFile
    from marco_local.load.gguf import build_model

    mixed = _mixed_file(bases[0], tmp_path / "mixed.gguf", mix)
    ref_path = _mixed_file(bases[0], tmp_path / "ref.gguf", mix, reference=True)
    ids = torch.tensor([[5, 17, 33, 2, 91, 120, 7, 64]])
    with torch.inference_mode():
        ref_model = build_model(GGUFFile(ref_path), dtype=torch.float32)
        ref = ref_model(ids, make_cache(ref_model, 16))
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.05)):
            model = build_model(GGUFFile(mixed), dtype=dtype)
            ours = model(ids, make_cache(model, 16)).float()
            err = ((ours - ref).abs().max() / ref.abs().max()).item()
            assert err < tol, (dtype, err)
            one = model(ids[:, :1], make_cache(model, 4)).float()  # the single-token (decode) path too
            ref_one = ref_model(ids[:, :1], make_cache(ref_model, 4))
            assert ((one - ref_one).abs().max() / ref_one.abs().max()).item() < tol
