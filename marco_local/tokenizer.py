"""Tokenizer, chat template and streaming detokenizer, without transformers.

`tokenizer.json` is read by the `tokenizers` library; the chat template comes from `chat_template.jinja` (what
transformers 5 writes) or `tokenizer_config.json` and is rendered with jinja2 the way transformers renders it
(sandboxed, `trim_blocks`/`lstrip_blocks`, `raise_exception`, `tojson`), falling back to ChatML. End-of-sequence ids
are the union of the config's, generation_config.json's, the tokenizer's eos token and the template's end-of-turn.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .errors import MarcoError

if TYPE_CHECKING:
    from .native_bpe import NativeBPE

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MarcoError(f"{path} is not valid JSON: {e}") from e
    return data if isinstance(data, dict) else {}


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer | NativeBPE,
        chat_template: str | None = None,
        eos_token_ids: list[int] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.has_own_template = chat_template is not None
        self.bos_token, self.eos_token, self.add_bos = bos_token, eos_token, add_bos
        ids = list(eos_token_ids or [])
        for text in (eos_token, *END_OF_TURN_TOKENS):
            tid = backend.token_to_id(text) if text else None
            if tid is not None and (text == eos_token or text in self.chat_template):
                ids.append(tid)
        self.eos_token_ids = sorted(set(ids))
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise MarcoError(f"the model's chat template does not parse: {e}") from e

    @classmethod
    def from_folder(cls, folder: str | Path, config_eos: list[int] | None = None) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MarcoError(f"no tokenizer.json in {folder}", hint="the checkpoint folder is incomplete")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad files
            raise MarcoError(f"cannot read {path}: {e}") from e
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        else:
            template = tok_cfg.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        eos = list(config_eos or [])
        gen_eos = gen_cfg.get("eos_token_id")
        eos += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        return cls(
            backend,
            chat_template=template,
            eos_token_ids=eos,
            bos_token=_token_text(tok_cfg.get("bos_token")),
            eos_token=_token_text(tok_cfg.get("eos_token")),
            add_bos=bool(tok_cfg.get("add_bos_token", False)),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Special tokens written in the text (from a chat template) are recognised, as transformers does."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token:
            bos = self.backend.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                tools=None,
            )
        except jinja2.TemplateError as e:
            raise MarcoError(f"the chat template failed: {e}") from e

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns a stream of token ids into text deltas that never end in half a UTF-8 character.

    Decodes a short window of recent tokens and emits only what extends past the previous window; a window whose text
    ends in U+FFFD (an incomplete byte sequence) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        decode = self.tokenizer.decode
        prefix_text = decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = decode(self.tokens[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        decode = self.tokenizer.decode
        prefix_text = decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return new_text[len(prefix_text) :]
