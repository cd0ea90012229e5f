"""Fixtures: small random qwen3_moe checkpoints written by transformers, with an offline-trained tokenizer.

Each checkpoint is a real Hugging Face folder (`save_pretrained`), so the loader is tested on what transformers
writes, and the transformers model is returned alongside as the numeric reference.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MARCO_HOME", str(Path(__file__).parent / ".cache-marco"))

from offload_gguf_fixtures import q4_path  # noqa: E402, F401 (a tiny q4_k_m MoE GGUF, for any test module)

from marco_local.demo import build_tokenizer, write_tokenizer_files  # noqa: E402

BASE_CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    tie_word_embeddings=True,
    max_position_embeddings=512,
    rope_theta=10000.0,
)


def _tiers_here() -> list[str]:
    from marco_local.kernels import native

    return native.supported_tiers()


@pytest.fixture(params=_tiers_here())
def native_tier(request):
    """Run the test once per native kernel tier (kernels.native) this CPU can execute: every tier's code paths
    against the same references. Tiers the CPU lacks are skipped; so is everything under MARCO_NATIVE=0."""
    from marco_local.kernels import native

    tier = request.param
    if tier not in native.supported_tiers():
        pytest.skip(f"this CPU cannot run the {tier} kernels")
    with native.use_tier(tier):
        if not native.available():
            pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
        yield tier


@pytest.fixture(scope="session")
def tokenizer_obj():
    return build_tokenizer(vocab_size=400)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers' init (std 0.02) gives an almost uniform router whose top-k ties are arbitrary; widen it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(
                    torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * (3.0 if "gate.weight" in name else 1.0)
                )


def build_checkpoint(folder: Path, tok, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Write a random qwen3_moe checkpoint + tokenizer to `folder`; return the float32 transformers model."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    eos = tok.token_to_id("<|im_end|>")
    cfg = Qwen3MoeConfig(
        **{**BASE_CONFIG, **overrides},
        vocab_size=tok.get_vocab_size(),
        eos_token_id=eos,
        bos_token_id=tok.token_to_id("<|endoftext|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).eval()
    randomize(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    write_tokenizer_files(tok, folder)
    return model


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_obj):
    cache: dict[str, tuple[Path, object]] = {}

    def make(name: str = "base", seed: int = 0, **overrides):
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"ckpt-{name}")
            cache[name] = (folder, build_checkpoint(folder, tokenizer_obj, seed=seed, **overrides))
        return cache[name]

    return make


@pytest.fixture(scope="session")
def checkpoint(make_checkpoint):
    """The default fixture model: (folder, transformers reference model)."""
    return make_checkpoint()


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.fixture
def marco_main(monkeypatch, capsys):
    """Run `marco ARGS...` in-process as the console script does (`main` renders a MarcoError as `Error:`/`Hint:`
    lines, exit code from the error; CliRunner on `app` would only see the exception), with nothing piped in.
    Returns (exit code, stderr lines)."""
    from marco_local.cli import main as cli_main

    def run(*args: str) -> tuple[int, list[str]]:
        monkeypatch.setattr(sys, "argv", ["marco", *args])
        monkeypatch.setattr(sys, "stdin", None)
        monkeypatch.delenv("MARCO_DEBUG", raising=False)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            cli_main.main()
        return e.value.code, capsys.readouterr().err.strip().splitlines()

    return run


@pytest.fixture(scope="session")
def fuzz_bases(make_checkpoint, tmp_path_factory):
    """The fuzzer's base models, built by the session's checkpoint fixture (test_model_fuzz, test_model_validation)."""
    from model_fuzz import TINY

    from marco_local.config import load_config
    from marco_local.formats.checkpoint import Checkpoint
    from quant.gguf_writer import write_gguf

    folder, _ = make_checkpoint("fuzz-tiny", seed=1, **TINY)
    sharded, _ = make_checkpoint("fuzz-sharded", seed=1, max_shard_size="60KB", **TINY)
    out = tmp_path_factory.mktemp("fuzz-bases")
    ggufs = []
    for preset in ("f32", "q8_0"):
        path = out / f"tiny-{preset}.gguf"
        write_gguf(Checkpoint(folder), load_config(folder), folder, path, preset)
        ggufs.append(path)
    return ggufs, [folder, sharded]
