"""Byte-level BPE with its vocabulary and merges in native tables (native/bpe.c), for GGUF tokenizers.

Why: the tokenizers library's BPE model keeps the vocabulary twice as hash maps of Rust strings, ~30 MB for Qwen's
151,936 tokens; the native tables hold the same in ~9 MB. A GGUF run may use 300 MB of RSS above its file and KV
cache, and torch's import alone takes ~225 MB of that, so the tokenizer's share matters.

Only the vocabulary, the merges and decoding are native. The text is split exactly as before: added tokens first
(leftmost-longest, as the tokenizers library's AddedVocabulary matches them), then the rest through the tokenizers
library's own pre-tokenizer objects (the regex split and the byte-level mapping of the tokenizer.json the GGUF came
from). So `NativeBPE` encodes and decodes as `gguf_tokenizer.build_backend`'s tokenizer does; tests compare the two
on random text.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from itertools import accumulate

from tokenizers import pre_tokenizers

from ..kernels import native


@dataclass
class Encoding:
    ids: list[int]


class NativeBPE:
    """The part of `tokenizers.Tokenizer`'s interface that `tokenizer.Tokenizer` uses, over native tables."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        handle: int,
        n_tokens: int,
        pre_tokenizer: pre_tokenizers.PreTokenizer,
        ignore_merges: bool,
        added: list[str],
    ) -> None:
        """`added`: the texts matched whole before the rest is split (control and user-defined tokens)."""
        self._lib, self._handle, self._n = lib, handle, n_tokens
        self._pre, self._ignore_merges = pre_tokenizer, int(ignore_merges)
        # longest first, so that the leftmost match is also the longest one
        alternatives = sorted({t for t in added if t}, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    @classmethod
    def build(
        cls,
        tokens: list[str],
        merges: list[str],
        pre_tokenizer: pre_tokenizers.PreTokenizer,
        ignore_merges: bool,
        special: list[int],
        user_defined: list[int],
    ) -> NativeBPE | None:
        """The tokenizer, or None when the native library is unavailable or the metadata does not fit its tables
        (a token or merge holding a NUL, a merge of unknown tokens): the tokenizers library then decides, and
        reports what is wrong."""
        lib = native.library()
        if lib is None:
            return None
        try:
            token_blob = "\0".join(tokens).encode() + b"\0"
            merge_blob = "\0".join(merges).encode() + b"\0"
        except UnicodeEncodeError:
            return None
        error, bad_merge = ctypes.c_int32(), ctypes.c_int32()
        handle = lib.marco_bpe_new(
            token_blob,
            len(token_blob),
            len(tokens),
            merge_blob,
            len(merge_blob) if merges else 0,
            len(merges),
            ctypes.byref(error),
            ctypes.byref(bad_merge),
        )
        if not handle:
            return None
        for i in special:
            lib.marco_bpe_set_special(handle, i)
        added = [tokens[i] for i in [*special, *user_defined]]
        return cls(lib, handle, len(tokens), pre_tokenizer, ignore_merges, added)

    def __del__(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.marco_bpe_free(self._handle)
            self._handle = None

    def token_to_id(self, text: str) -> int | None:
        data = text.encode()
        i = self._lib.marco_bpe_lookup(self._handle, data, len(data))
        return i if i >= 0 else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self._n

    def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
        ids: list[int] = []
        start = 0
        for match in self._added_re.finditer(text) if self._added_re else ():
            self._encode_plain(text[start : match.start()], ids)
            ids.append(self.token_to_id(match.group()))
            start = match.end()
        self._encode_plain(text[start:], ids)
        return Encoding(ids)

    def _encode_plain(self, text: str, ids: list[int]) -> None:
        if not text:
            return
        pieces = [piece.encode() for piece, _ in self._pre.pre_tokenize_str(text)]
        data = b"".join(pieces)
        if not data:
            return
        ends = (ctypes.c_int64 * len(pieces))(*accumulate(map(len, pieces)))
        out = (ctypes.c_int32 * len(data))()  # at most one id per byte
        n = self._lib.marco_bpe_encode(self._handle, data, ends, len(pieces), self._ignore_merges, out)
        if n < 0:
            raise MemoryError("tokenizer: out of memory")
        ids.extend(out[:n])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        kept = [i for i in ids if 0 <= i < self._n]  # ctypes would wrap ids beyond int32 onto real ones
        arr = (ctypes.c_int32 * len(kept))(*kept)
        skip = int(skip_special_tokens)
        size = self._lib.marco_bpe_decode(self._handle, arr, len(kept), skip, None, 0)
        buf = ctypes.create_string_buffer(size)
        self._lib.marco_bpe_decode(self._handle, arr, len(kept), skip, buf, size)
        return buf.raw[:size].decode("utf-8", errors="replace")
