"""Tokenizer, chat template and streaming detokenizer, without transformers.

`tokenizer.json` is read by the `tokenizers` library; the chat template comes from `chat_template.jinja` (what
transformers 5 writes) or `tokenizer_config.json` and is rendered with jinja2 the way transformers renders it
(sandboxed, `trim_blocks`/`lstrip_blocks`, `raise_exception`, `tojson`), falling back to ChatML. End-of-sequence ids
are the union of the config's, generation_config.json's, the tokenizer's eos token and the template's end-of-turn.
"""

from __future__ import annotations

import ctypes
import json
import operator
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from tokenizers import Tokenizer as HFTokenizer

from .errors import InvalidModelError, MarcoError, short_repr

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
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_json_object(path: Path) -> dict[str, Any]:
    """A model folder's JSON side file ({} when absent); anything but a readable JSON object is a `MarcoError`."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MarcoError(f"{path} is not valid JSON: {str(e) or 'nested too deeply'}") from e
    except OSError as e:
        raise MarcoError(f"cannot read {path}: {e.strerror or e}") from e
    if not isinstance(data, dict):
        raise MarcoError(f"{path} does not hold a JSON object", hint="the model folder is damaged")
    return data


# A chat template is code from the model file. The sandbox stops it reaching Python; these bound what it may cost:
# loop items over all range() calls of one rendering, the rendered text (beyond the messages it quotes), seconds and
# memory growth (a watchdog thread stops loops that no hook sees, e.g. nested loops over literals).
TEMPLATE_MAX_LOOP_ITEMS = 200_000
TEMPLATE_MAX_CHARS = 1 << 20
TEMPLATE_TIME_LIMIT_S = 10.0
TEMPLATE_MAX_MEMORY_GROWTH = 512 << 20


_HUGE_WIDTH = re.compile(r"%[-+ #0]*(\d{7,})")  # a printf width of a million characters or more


class TemplateLimitError(jinja2.exceptions.TemplateError):
    """A chat template exceeded one of the limits above."""


class _TemplateStopped(BaseException):
    """Raised into the rendering thread by the watchdog: a BaseException, so no `except Exception` in a template's
    Python helpers swallows it."""


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus a budget for range() items and size checks on `*`, `**` and `%`, the operators that make a
    huge value from small ones ("x" * 10**9, 10**10**10)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.loop_items_left = TEMPLATE_MAX_LOOP_ITEMS
        self.globals["range"] = self._range

    def _range(self, *args: int) -> range:
        r = safe_range(*args)
        self.loop_items_left -= len(r)
        if self.loop_items_left < 0:
            raise TemplateLimitError(f"loops over more than {TEMPLATE_MAX_LOOP_ITEMS:,} range() items")
        return r

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                    raise TemplateLimitError(f"builds a value of {len(seq) * n:,} items")
        elif op == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(abs(left), 2).bit_length() * right > 1 << 16:
                raise TemplateLimitError(f"computes {short_repr(left)} ** {short_repr(right)}")
        elif op == "%" and isinstance(left, str) and _HUGE_WIDTH.search(left):  # "%0999999999d" % 1
            raise TemplateLimitError(f"formats with a width of {_HUGE_WIDTH.search(left).group(1)}")
        return {"*": operator.mul, "**": operator.pow, "%": operator.mod}[op](left, right)


def _rss() -> int:
    """This process's resident memory in bytes (0 where /proc is missing: the memory limit is then off)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def render_bounded(chunks: Callable[[], Iterator[str]], max_chars: int) -> str:
    """Join what `chunks()` yields, stopping it with `TemplateLimitError` past `max_chars` characters, past
    TEMPLATE_TIME_LIMIT_S seconds or past TEMPLATE_MAX_MEMORY_GROWTH bytes of new resident memory. The last two are
    a watchdog thread's: it raises into this thread (checked between bytecodes), which reaches pure-Python loops
    that no sandbox hook sees."""
    tid, done, lock, fired = threading.get_ident(), threading.Event(), threading.Lock(), []
    start_rss, deadline = _rss(), time.monotonic() + TEMPLATE_TIME_LIMIT_S

    def watch() -> None:
        while not done.wait(0.005):
            if time.monotonic() > deadline:
                why = f"ran longer than {TEMPLATE_TIME_LIMIT_S:g} s"
            elif start_rss and _rss() - start_rss > TEMPLATE_MAX_MEMORY_GROWTH:
                why = f"used more than {TEMPLATE_MAX_MEMORY_GROWTH >> 20} MiB"
            else:
                continue
            with lock:
                if not done.is_set():
                    fired.append(why)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_TemplateStopped))
            return

    watchdog = threading.Thread(target=watch, name="template-watchdog", daemon=True)
    try:
        try:
            watchdog.start()
            parts, size = [], 0
            for part in chunks():
                size += len(part)
                if size > max_chars:
                    raise TemplateLimitError(f"renders more than {max_chars:,} characters")
                parts.append(part)
            return "".join(parts)
        finally:
            with lock:
                done.set()
                if fired:  # raised but perhaps not yet delivered: withdraw it
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
            watchdog.join()
    except _TemplateStopped:
        raise TemplateLimitError(fired[0] if fired else "was stopped") from None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class Tokenizer:
    def __init__(
        self,
        backend: HFTokenizer,
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
            with tokenizer_errors("the tokenizer failed to look up a token"):
                tid = backend.token_to_id(text) if text else None
            if tid is not None and (text == eos_token or text in self.chat_template):
                ids.append(tid)
        self.eos_token_ids = sorted(set(ids))
        env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self._env = env
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.chat_template)
        except (jinja2.TemplateError, RecursionError, MemoryError) as e:  # a deeply nested template overflows too
            raise MarcoError(f"the model's chat template does not parse: {_why(e)}") from e

    @classmethod
    def from_folder(
        cls, folder: str | Path, config_eos: list[int] | None = None, vocab_size: int | None = None
    ) -> Tokenizer:
        """`vocab_size` (the model's embedding rows): every id the tokenizer can produce, and every eos id, must be
        below it, or a prompt would index past the embedding."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MarcoError(f"no tokenizer.json in {folder}", hint="the checkpoint folder is incomplete")
        with tokenizer_errors(f"cannot read {path}"):  # the tokenizers library raises a bare Exception on bad files
            backend = HFTokenizer.from_file(str(path))
        tok_cfg = read_json_object(folder / "tokenizer_config.json")
        gen_path = folder / "generation_config.json"
        gen_cfg = read_json_object(gen_path)
        template_path = folder / "chat_template.jinja"
        if template_path.is_file():
            try:
                template = template_path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError) as e:
                raise MarcoError(f"cannot read {template_path}: {e}") from e
        else:
            template = tok_cfg.get("chat_template") or read_json_object(folder / "chat_template.json").get(
                "chat_template"
            )
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is not None and not isinstance(template, str):
            raise InvalidModelError(folder / "tokenizer_config.json", "chat_template", template, "is not a string")
        gen_eos = gen_cfg.get("eos_token_id")
        gen_eos = [] if gen_eos is None else gen_eos if isinstance(gen_eos, list) else [gen_eos]
        limit = vocab_size if vocab_size is not None else 1 << 31
        for i in gen_eos:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < limit:
                raise InvalidModelError(gen_path, "eos_token_id", i, f"is not a token id below {limit}")
        if vocab_size is not None:
            with tokenizer_errors(f"cannot list the vocabulary of {path}"):
                top = max(backend.get_vocab(with_added_tokens=True).values(), default=-1)
            if top >= vocab_size:
                raise InvalidModelError(path, "the largest token id", top, f"is past the model's {vocab_size} rows")
        return cls(
            backend,
            chat_template=template,
            eos_token_ids=[*(config_eos or []), *gen_eos],
            bos_token=_token_text(tok_cfg.get("bos_token")),
            eos_token=_token_text(tok_cfg.get("eos_token")),
            add_bos=bool(tok_cfg.get("add_bos_token", False)),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Special tokens written in the text (from a chat template) are recognised, as transformers does."""
        with tokenizer_errors("the tokenizer failed to encode the prompt"):
            ids = self.backend.encode(text, add_special_tokens=False).ids
            if self.add_bos and self.bos_token:
                bos = self.backend.token_to_id(self.bos_token)
                if bos is not None and (not ids or ids[0] != bos):
                    ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        with tokenizer_errors("the tokenizer failed to decode"):
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt the model's template makes of `messages`. The template comes from the model file: whatever it
        raises, or a limit it passes (time, memory, loop items, output size), is one `MarcoError`; so is a template
        that renders nothing (the model would have no prompt)."""
        quoted = sum(len(str(m.get("content", ""))) for m in messages)
        self._env.loop_items_left = TEMPLATE_MAX_LOOP_ITEMS
        try:
            text = render_bounded(
                lambda: self._template.generate(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                    tools=None,
                ),
                max_chars=TEMPLATE_MAX_CHARS + 4 * quoted,
            )
        except Exception as e:  # the template's code, not ours: ZeroDivisionError, RecursionError, MemoryError, ...
            raise MarcoError(f"the chat template failed: {_why(e)}", hint=_TEMPLATE_HINT) from e
        if not text.strip():
            raise MarcoError("the chat template rendered an empty prompt", hint=_TEMPLATE_HINT)
        return text

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


_TEMPLATE_HINT = "the model's chat template is broken; --raw sends the prompt without it"


def _why(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, jinja2.TemplateError):  # the template's own words (raise_exception) or a limit's
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def is_rust_panic(e: BaseException) -> bool:
    """The `tokenizers` library turns a Rust panic into `pyo3_runtime.PanicException`, a BaseException (so that
    `except Exception` does not swallow it): caught by name, because pyo3_runtime is not importable."""
    return type(e).__name__ == "PanicException"


@contextmanager
def tokenizer_errors(what: str) -> Iterator[None]:
    """Turns what the tokenizer backend raises on data from a model file (a bare Exception, or a Rust panic) into a
    `MarcoError`; KeyboardInterrupt and SystemExit pass."""
    try:
        yield
    except MarcoError:
        raise
    except Exception as e:
        raise MarcoError(f"{what}: {_why(e)}", hint=_TOKENIZER_HINT) from e
    except BaseException as e:
        if not is_rust_panic(e):
            raise
        raise MarcoError(f"{what}: {_why(e)}", hint=_TOKENIZER_HINT) from e


_TOKENIZER_HINT = "the model's tokenizer data is damaged: download or convert the model again"


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
