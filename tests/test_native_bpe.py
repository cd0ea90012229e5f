"""The native BPE tables (native_bpe.py) against the tokenizers library's BPE built from the same GGUF metadata.

Random text mixes scripts, whitespace, digits, contractions, emoji and the vocabulary's added tokens; ids must be
equal for every pre-tokenizer family the GGUF reader supports (qwen2, llama3 with ignore_merges, smollm, gpt-2), and
decoding random ids (special ones, lone UTF-8 bytes, ids past the vocabulary) must give the same text.
"""

from __future__ import annotations

import gc
import random

import pytest
from gguf_fixtures import smollm2_path, write_moe_f32

from marco_local.formats.gguf import GGUFFile
from marco_local.formats.gguf_tokenizer import (
    TOKEN_CONTROL,
    TOKEN_USER_DEFINED,
    build_backend,
    build_native_backend,
    load_tokenizer,
)
from marco_local.formats.native_bpe import NativeBPE
from marco_local.kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")

POOLS = [
    "the quick brown fox jumps over lazy dogs".split(),
    ["Grüße", "ça", "Ünïcödé", "naïve", "Ærø", "ß"],
    ["Привет", "мир", "Москва", "ёж"],
    ["你好", "天气", "東京です", "서울", "ひらがな"],
    ["مرحبا", "القاهرة", "नमस्ते", "שלום"],
    ["😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷"],
    ["0", "7", "12345", "3.14", "1,000,000", "2024-11-26"],
    ["'s", "'T", "'re", "'LL", "'d", "don't", "I'M"],
    [" ", "  ", "\t", "\n", "\n\n", "\r\n", " \n ", "   \t\n"],
    ["()", "{}", "[]", "->", "==", "!?", "...", "—", "«»", "#", "$", "\\", "\x00", "\x7f", "\u00ad", "\ue000"],
]


def random_text(rng: random.Random, added: list[str]) -> str:
    parts = []
    for _ in range(rng.randint(1, 40)):
        if added and rng.random() < 0.08:
            parts.append(rng.choice(added))
        else:
            parts.append(rng.choice(rng.choice(POOLS)))
        if rng.random() < 0.5:
            parts.append(" ")
    return "".join(parts)


def added_tokens(g: GGUFFile) -> list[str]:
    tokens, types = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.token_type") or []
    return [tokens[i] for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]


def assert_same(g: GGUFFile, seed: int, texts: int = 300) -> None:
    ours, ref = build_native_backend(g), build_backend(g)
    assert isinstance(ours, NativeBPE)
    rng = random.Random(seed)
    added = added_tokens(g)
    fixed = ["", "a" * 3000, " " * 2000, "ab" * 1500 + "\n" * 500, *added]
    for text in fixed + [random_text(rng, added) for _ in range(texts)]:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text, add_special_tokens=False).ids, repr(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    n = ref.get_vocab_size()
    assert ours.get_vocab_size() == n
    for _ in range(100):
        ids = [rng.randrange(n + 10) for _ in range(rng.randint(0, 12))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
    for token in g.get("tokenizer.ggml.tokens")[:: max(1, n // 500)] + ["not a token at all"]:
        assert ours.token_to_id(token) == ref.token_to_id(token)


@pytest.fixture(scope="module")
def moe_gguf(make_checkpoint, tmp_path_factory):
    return write_moe_f32(make_checkpoint, tmp_path_factory)[2]


@pytest.mark.parametrize("pre", ["qwen2", "llama3", "smollm", "gpt-2"])
def test_native_bpe_matches_tokenizers_on_the_fixture_vocabulary(moe_gguf, pre):
    g = GGUFFile(moe_gguf)
    g.metadata["tokenizer.ggml.pre"] = pre  # the same vocabulary through each pre-tokenizer family
    assert_same(g, seed=hash(pre) % 1000)


def test_native_bpe_matches_tokenizers_on_smollm2():
    assert_same(GGUFFile(smollm2_path()), seed=1, texts=200)


def test_characters_missing_from_the_vocabulary_are_dropped_alike(moe_gguf):
    """Without an unknown token BPE drops a character it has no token for; its neighbours then meet and may merge."""
    g = GGUFFile(moe_gguf)
    tokens = list(g.get("tokenizer.ggml.tokens"))
    for ch in ("z", "Ã", "Ġ"):  # `Ã` starts the byte-level form of é, ü, ç...; `Ġ` is the space
        tokens[tokens.index(ch)] = f"<removed {ord(ch)}>"
    vocab = set(tokens)
    merges = [m for m in g.get("tokenizer.ggml.merges") if {*m.split(" ", 1), m.replace(" ", "", 1)} <= vocab]
    g.metadata["tokenizer.ggml.tokens"], g.metadata["tokenizer.ggml.merges"] = tokens, merges
    assert_same(g, seed=7, texts=150)


def test_inconsistent_metadata_falls_back_to_the_tokenizers_error(moe_gguf):
    g = GGUFFile(moe_gguf)
    g.metadata["tokenizer.ggml.merges"] = ["zzzq yyyq", *g.get("tokenizer.ggml.merges")]
    assert build_native_backend(g) is None  # the tokenizers library then reports it (test_gguf_runtime)
    g = GGUFFile(moe_gguf)
    tokens = list(g.get("tokenizer.ggml.tokens"))
    tokens[5] = "with\0nul"
    g.metadata["tokenizer.ggml.tokens"] = tokens
    assert build_native_backend(g) is None  # a NUL cannot sit in the NUL-separated tables: the library's BPE is used
    assert load_tokenizer(g).backend.__class__.__name__ == "Tokenizer"


def test_load_tokenizer_uses_the_native_tables_and_frees_them(moe_gguf):
    tok = load_tokenizer(GGUFFile(moe_gguf))
    assert isinstance(tok.backend, NativeBPE)
    handle = tok.backend._handle
    assert handle
    del tok
    gc.collect()  # __del__ frees the native tables (a double free would crash the test process)
