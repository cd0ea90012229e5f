"""Rebuild the tokenizer (our `Tokenizer`) from a GGUF's `tokenizer.ggml.*` metadata.

Only gpt2-style byte-level BPE (`tokenizer.ggml.model = gpt2`) is supported; that is what Qwen, SmolLM2 and Llama 3
GGUFs carry. The tokens are already in byte-level form (`Ġ` for a space), the merges are "left right" strings, and
the pre-tokenizer is named by `tokenizer.ggml.pre`: `PRE_TOKENIZERS` maps each supported name to the split that
the original tokenizer.json had, following llama.cpp's llama-vocab.cpp (which name means which regex) and the
tokenizer.json files those names were recognised from (convert_hf_to_gguf_update.py). An unknown name is an error,
not a silent fallback: a wrong split changes the token ids a model sees.

Token types (gguf.TokenType): CONTROL tokens become special added tokens (skipped when decoding), USER_DEFINED tokens
non-special added tokens (matched whole in the input, kept when decoding), as transformers does with the added tokens
the converter read them from. UNUSED tokens (`[PAD151669]`, the padding up to the embedding size) stay plain vocabulary
entries that no merge produces.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import InvalidModelError, MarcoError
from ..tokenizer import Tokenizer, tokenizer_errors
from .gguf import GGUFFile

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# The split regexes exactly as the Hugging Face tokenizer.json files spell them (llama.cpp rewrites the `(?i:...)`
# group as explicit case pairs because its regex engine lacks the flag; the meaning is the same).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")  # Llama 3 groups digits by three, Qwen splits each


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    """Qwen2 / Llama 3 style: one isolating regex split, then byte-level mapping without GPT-2's own regex."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    """StarCoder / SmolLM style: every digit on its own, then GPT-2's regex (llama.cpp: `\\p{N}`, then gpt2's)."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# tokenizer.ggml.pre -> (pre-tokenizer factory, BPE ignore_merges). llama.cpp sets ignore_merges for the llama3 family
# (Llama 3's tokenizer.json has "ignore_merges": true: a whole word found in the vocabulary is taken as one token).
PRE_TOKENIZERS: dict[str, tuple[Any, bool]] = {
    **{name: (lambda: _split_then_bytes(QWEN2_SPLIT), False) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
    **{name: (lambda: _split_then_bytes(LLAMA3_SPLIT), True) for name in ("llama3", "llama-v3", "llama-bpe")},
    **{name: (_digits_then_gpt2, False) for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: (_gpt2, False) for name in ("gpt-2", "phi-2", "mpt", "olmo")},
}


def _list(g: GGUFFile, key: str, required: bool = True) -> list:
    value = g.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise MarcoError(f"{g.path}: {key} is missing or not an array", hint="the GGUF has no usable tokenizer")
    return value


def _vocabulary(g: GGUFFile) -> tuple[list[str], list[int], list[str], str]:
    """The GGUF's tokens, token types, merges and pre-tokenizer name, checked."""
    kind = g.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MarcoError(
            f"{g.path}: tokenizer model {kind!r} is not supported",
            hint="marco-local reads byte-level BPE (tokenizer.ggml.model = gpt2) tokenizers",
        )
    pre = g.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise MarcoError(
            f"{g.path}: pre-tokenizer {pre!r} is not supported",
            hint=f"supported tokenizer.ggml.pre values: {', '.join(PRE_TOKENIZERS)}",
        )
    tokens = _list(g, "tokenizer.ggml.tokens")
    types = _list(g, "tokenizer.ggml.token_type", required=False) or [TOKEN_NORMAL] * len(tokens)
    merges = _list(g, "tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise MarcoError(f"{g.path}: {len(tokens)} tokens but {len(types)} token types", hint="the GGUF is corrupt")
    for key, values, kind in (
        ("tokenizer.ggml.tokens", tokens, str),
        ("tokenizer.ggml.merges", merges, str),
        ("tokenizer.ggml.token_type", types, int),
    ):
        bad = next((v for v in values if not isinstance(v, kind) or isinstance(v, bool)), None)
        if bad is not None:
            raise InvalidModelError(
                g.path, f"an element of {key}", bad, f"is not {'a string' if kind is str else 'an integer'}"
            )
    rows = g.info("token_embd.weight").shape[0]
    if len(tokens) != rows:  # llama.cpp's rule too: every id the tokenizer makes must have an embedding row
        raise InvalidModelError(
            g.path, "the length of tokenizer.ggml.tokens", len(tokens), f"differs from token_embd's {rows} rows"
        )
    return tokens, types, merges, pre


def build_backend(g: GGUFFile) -> HFTokenizer:
    """The `tokenizers.Tokenizer` that the GGUF's tokenizer metadata describes."""
    tokens, types, merges, pre = _vocabulary(g)
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")  # byte-level tokens never contain a real space (it is `Ġ`)
        if not sep:
            raise MarcoError(f"{g.path}: malformed merge {m!r}", hint="the GGUF is corrupt")
        pairs.append((left, right))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    factory, ignore_merges = PRE_TOKENIZERS[pre]
    # tokenizers raises a bare Exception (a merge of tokens not in the vocabulary) or panics on such metadata
    with tokenizer_errors(f"{g.path}: the tokenizer metadata is inconsistent"):
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = factory()
        tok.decoder = decoders.ByteLevel()
        # the tokens already sit in the vocabulary, so adding them keeps their ids
        control = [
            AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == TOKEN_CONTROL
        ]
        user = [AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
        tok.add_special_tokens(control)
        tok.add_tokens(user)
    return tok


# Tokens that end a generation by their text whatever the metadata says, as llama.cpp decides (llama-vocab.cpp; its
# model-specific exceptions left out): converters write one eos id, yet a Qwen3 GGUF names <|im_end|> and the model may
# end with <|endoftext|>. The same rule keeps marco, llama.cpp, Ollama and LM Studio stopping on the same tokens.
END_OF_GENERATION_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    # fill-in-the-middle padding, repository and file separators: a completion ends there too
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
)


def load_tokenizer(g: GGUFFile) -> Tokenizer:
    """Our Tokenizer for a GGUF: the rebuilt backend, `tokenizer.chat_template`, eos/bos from metadata, and the
    end-of-generation tokens llama.cpp recognises by their text."""
    backend = build_backend(g)
    tokens = g.get("tokenizer.ggml.tokens")

    def text(key: str) -> str | None:
        i = g.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    eos_ids = [
        g.get(k)
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if isinstance(g.get(k), int)
    ]
    with tokenizer_errors(f"{g.path}: the tokenizer metadata is inconsistent"):
        eos_ids += [i for i in map(backend.token_to_id, END_OF_GENERATION_TEXTS) if i is not None]
    template = g.get("tokenizer.chat_template")
    add_bos = g.get("tokenizer.ggml.add_bos_token", False)
    if not isinstance(add_bos, bool):
        raise InvalidModelError(g.path, "tokenizer.ggml.add_bos_token", add_bos, "is not true or false")
    if template is not None and not isinstance(template, str):
        raise InvalidModelError(g.path, "tokenizer.chat_template", template, "is not a string")
    return Tokenizer(
        backend,
        chat_template=template,
        eos_token_ids=eos_ids,
        bos_token=text("tokenizer.ggml.bos_token_id"),
        eos_token=text("tokenizer.ggml.eos_token_id"),
        add_bos=add_bos,
    )
