"""config.json spellings, registry resolution and the deterministic demo model."""

from __future__ import annotations

import hashlib

import pytest

from marco_local.config import ModelConfig
from marco_local.demo import ensure_demo_model
from marco_local.errors import MarcoError
from marco_local.registry import known_models, resolve

V4 = {  # transformers 4.x spelling, as the published Marco checkpoints
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_experts": 232,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 384,
    "intermediate_size": 3072,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "norm_topk_prob": True,
    "tie_word_embeddings": True,
    "some_future_key": 1,
}


def v5_spelling(d: dict) -> dict:
    d = dict(d)
    d["num_local_experts"] = d.pop("num_experts")
    d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), "rope_type": "default"}
    d.pop("rope_scaling")
    return d


def test_both_spellings_give_the_same_config():
    a, b = ModelConfig.from_dict(V4), ModelConfig.from_dict(v5_spelling(V4))
    assert a == b
    assert a.num_experts == 232 and a.rope_theta == 1e6 and a.head_dim == 128


def test_sparse_layer_rule_matches_transformers():
    cfg = ModelConfig.from_dict({**V4, "mlp_only_layers": [0, 5], "decoder_sparse_step": 2, "num_hidden_layers": 8})
    assert [cfg.is_moe_layer(i) for i in range(8)] == [False, True, False, True, False, False, False, True]


def test_transformers_rule_agrees():
    from transformers import Qwen3MoeConfig

    ref = Qwen3MoeConfig(
        num_hidden_layers=8, mlp_only_layers=[0, 5], decoder_sparse_step=2, num_experts=4, num_experts_per_tok=2
    )
    ours = ModelConfig.from_dict(ref.to_dict())
    expected = [(i not in ref.mlp_only_layers) and (i + 1) % ref.decoder_sparse_step == 0 for i in range(8)]
    assert [ours.is_moe_layer(i) for i in range(8)] == expected
    assert ours.num_experts == 4 and ours.rope_theta == ref.rope_parameters["rope_theta"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "unsupported architecture"),
        ({"hidden_size": None}, "hidden_size"),
        ({"num_key_value_heads": 5}, "num_key_value_heads = 5 does not divide num_attention_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "rope_scaling.rope_type = 'yarn' is not supported"),
    ],
)
def test_bad_configs_are_clear_errors(change, message):
    with pytest.raises(MarcoError, match=message):
        ModelConfig.from_dict({**V4, **change})


def test_known_models_cover_the_family():
    models = known_models()
    repos = {m.repo for m in models.values() if m.repo}
    assert repos >= {f"AIDC-AI/Marco-{n}" for n in ("Nano-Base", "Nano-Instruct", "Mini-Base", "Mini-Instruct")}
    assert "AIDC-AI/Marco-Mini-Global-Base" in repos
    assert {"nano", "nano-base", "mini", "mini-base", "mini-global-base", "demo"} <= set(models)


def test_resolve_kinds(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert resolve(str(tmp_path)).format == "hf"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve(str(tmp_path / "m.gguf")).format == "gguf"
    with pytest.raises(MarcoError, match="not downloaded") as err:
        resolve("nano")
    assert err.value.hint == "run: marco pull nano"
    with pytest.raises(MarcoError, match="not in the local Hugging Face cache"):
        resolve("someone/some-model")
    for empty in ("", "  "):  # not the current folder
        with pytest.raises(MarcoError, match="no model given"):
            resolve(empty)


def digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_demo_model_is_deterministic(tmp_path):
    a = ensure_demo_model(tmp_path / "a")
    b = ensure_demo_model(tmp_path / "b")
    assert digest(a) == digest(b)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(digest(a))
