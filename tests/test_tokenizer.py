"""Tokenizer, chat template and streaming detokenizer against transformers' tokenizer on the same files."""

from __future__ import annotations

import json

import pytest

from marco_local.demo import write_tokenizer_files
from marco_local.errors import MarcoError
from marco_local.tokenizer import CHATML_TEMPLATE, Tokenizer

SAMPLES = [
    "Hello world",
    "Bonjour à tous — ça va ?",
    "你好，世界",
    "مرحبا بالعالم",
    "Привет, мир",
    "emoji 🚀😀 ok",
    "a\n\n  b\t",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Türkiye'nin başkenti?"},
]

# A Qwen-style template with the constructs HF templates use: loop.first, raise_exception, trim/lstrip blocks.
QWEN_LIKE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('bad role') }}
    {%- elif message['role'] != 'system' %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer_obj):
    out = {}
    for name, template in (("chatml", CHATML_TEMPLATE), ("qwen", QWEN_LIKE)):
        folder = tmp_path_factory.mktemp(f"tok-{name}")
        write_tokenizer_files(tokenizer_obj, folder, chat_template=template)
        out[name] = folder
    return out


@pytest.mark.parametrize("name", ["chatml", "qwen"])
def test_chat_template_renders_like_transformers(folders, name):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folders[name])
    ours = Tokenizer.from_folder(folders[name])
    for gen in (True, False):
        expected = ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == expected
    text = ours.apply_chat_template(MESSAGES)
    assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"]


def test_encode_decode_match_transformers(folders):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folders["chatml"])
    ours = Tokenizer.from_folder(folders["chatml"])
    for s in SAMPLES:
        ids = ours.encode(s)
        assert ids == ref(s, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == s


def test_template_errors_are_marco_errors(folders):
    ours = Tokenizer.from_folder(folders["qwen"])
    with pytest.raises(MarcoError, match="bad role"):
        ours.apply_chat_template([{"role": "wizard", "content": "x"}])


def test_missing_template_falls_back_to_chatml(tmp_path, tokenizer_obj):
    write_tokenizer_files(tokenizer_obj, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = Tokenizer.from_folder(tmp_path)
    assert not ours.has_own_template
    assert (
        ours.apply_chat_template([{"role": "user", "content": "x"}])
        == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )


def test_eos_ids_include_generation_config_and_end_of_turn(tmp_path, tokenizer_obj):
    write_tokenizer_files(tokenizer_obj, tmp_path)
    endoftext = tokenizer_obj.token_to_id("<|endoftext|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [endoftext]}))
    ours = Tokenizer.from_folder(tmp_path, config_eos=[])
    assert set(ours.eos_token_ids) == {endoftext, tokenizer_obj.token_to_id("<|im_end|>")}


def test_streaming_detokenizer_never_splits_characters(folders):
    ours = Tokenizer.from_folder(folders["chatml"])
    text = "".join(SAMPLES)
    ids = ours.encode(text)
    # Byte-level tokens: feed one by one; multi-byte characters span several tokens.
    detok = ours.detokenizer()
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # something was held back at least once


def test_streaming_detokenizer_single_bytes(folders):
    """Split a 4-byte emoji into its byte tokens explicitly: nothing comes out until the character is whole."""
    ours = Tokenizer.from_folder(folders["chatml"])
    byte_ids = [ours.backend.token_to_id(c) for c in "ðŁļĢ"]  # byte-level spelling of U+1F680 🚀
    assert None not in byte_ids
    detok = ours.detokenizer()
    assert [detok.add(t) for t in byte_ids] == ["", "", "", "🚀"]
