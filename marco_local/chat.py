"""A chat conversation with one loaded model: messages, system prompt, sampling settings, save/load.

Each turn re-renders the whole conversation through the model's chat template and hands the token ids to
`stream_generate` with one long-lived `PromptCache`, so only the suffix that changed since the last turn is prefilled
(from the start of the forward it began in: /regen recomputes the prompt's last chunk, as the first turn did).
Invariants: the system prompt is never dropped; `messages` holds only user/assistant turns, alternating, starting
with a user turn; an interrupted reply stays in the conversation with `interrupted: True`. When a prompt no longer
fits the context window (minus room for the reply) the oldest turns are dropped until it fills at most half of it,
so the cost of re-prefilling after a drop is paid once, not every turn. No terminal code lives here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import MarcoError
from .generate import UNTIL_FULL, GenerationResponse, PromptCache, stream_generate
from .layers.kv_cache import make_cache
from .sampling import RANDOM_SEED, Sampler, make_logits_processors, make_sampler, new_seed, setting_error
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .offload.stats import OffloadStats

SAVE_FORMAT = "marco-chat"
SAVE_VERSION = 1


@dataclass
class ChatSettings:
    """Sampling settings a user can change mid-conversation with /set."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 1024
    seed: int | None = None
    repeat_penalty: float | None = None

    def set(self, name: str, value: str) -> None:
        """Parse and validate `value` for setting `name`; a bad name or value is a MarcoError."""
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            raise MarcoError(f"unknown setting {name!r}", hint=f"settings: {', '.join(names)}")
        if name in ("seed", "repeat_penalty") and value.lower() in ("none", "off", "random"):
            setattr(self, name, None)
            return
        kind = int if name in ("top_k", "max_tokens", "seed") else float
        try:
            parsed = kind(value)
        except ValueError:
            raise MarcoError(f"{name} needs {'an integer' if kind is int else 'a number'}, not {value!r}") from None
        if name == "max_tokens":
            error = None if parsed >= 1 or parsed == UNTIL_FULL else f"must be at least 1, or {UNTIL_FULL} (no limit)"
        else:
            error = setting_error(name, parsed)
        if error:
            raise MarcoError(f"{name} {error}, not {value}")
        if name == "seed" and parsed == RANDOM_SEED:
            parsed = None
        setattr(self, name, parsed)


class Reply:
    """One assistant turn being generated. Iterate it for `GenerationResponse` deltas.

    It records itself in the conversation exactly once: complete when the stream ends, marked interrupted when the
    consumer stops early (`close()`, an exception such as KeyboardInterrupt, or garbage collection); a reply stopped
    before any text is not recorded.
    """

    def __init__(self, session: ChatSession, ids: list[int], dropped: int) -> None:
        self.session = session
        self.prompt_tokens = len(ids)
        self.dropped = dropped  # oldest turns dropped so the prompt fits the context window
        self.text = ""
        self.response: GenerationResponse | None = None  # the last record (stats, finish reason)
        self.interrupted = False
        self.seed: int | None = None  # the sampler's seed (None: greedy), for -v and /stats
        self._recorded = False
        self._stream = self._generate(ids)

    def __iter__(self) -> Iterator[GenerationResponse]:
        return self._stream

    def _generate(self, ids: list[int]) -> Iterator[GenerationResponse]:
        s = self.session
        finished = False
        sampler = s.sampler()
        self.seed = s.seed if s.settings.temperature > 0 else None
        try:
            for r in stream_generate(
                s.model,
                s.tokenizer,
                ids,
                max_tokens=s.settings.max_tokens,
                sampler=sampler,
                logits_processors=make_logits_processors(s.settings.repeat_penalty),
                stop_strings=s.stop_strings,
                prompt_cache=s.prompt_cache,
                stats_fn=s.stats_fn,
            ):
                self.text += r.text
                self.response = r
                yield r
            finished = True
        finally:
            self._record(interrupted=not finished)

    def close(self) -> None:
        """Stop generating; the partial reply stays in the conversation, marked interrupted."""
        self._stream.close()
        self._record(interrupted=True)

    def _record(self, interrupted: bool) -> None:
        if self._recorded:
            return
        self._recorded = True
        self.interrupted = interrupted
        if interrupted and not self.text:  # stopped before its first token: no turn; the next send replaces the
            return  # user message left waiting, /regen answers it
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if interrupted:
            message["interrupted"] = True
        self.session.messages.append(message)
        self.session.last_reply = self


class ChatSession:
    """A conversation with one model; `send`/`regenerate` return a `Reply` to iterate."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        settings: ChatSettings | None = None,
        system: str | None = None,
        context_length: int = 4096,
        stop_strings: tuple[str, ...] = (),
        stats_fn: Callable[[], OffloadStats | None] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or ChatSettings()
        self.system = system or None
        self.context_length = context_length
        self.stop_strings = stop_strings
        self.stats_fn = stats_fn
        self.messages: list[dict[str, Any]] = []
        self.last_reply: Reply | None = None
        # Allocated once for the whole context window: every turn reuses it (KVCache never grows).
        self.prompt_cache = PromptCache(make_cache(model, context_length))
        self._sampler: Sampler | None = None
        self._sampler_key: tuple | None = None
        self.seed: int | None = None  # the sampler's seed: the one set, else one drawn for it (to repeat a session)

    # -- settings -------------------------------------------------------------------------------------------------

    def set(self, name: str, value: str) -> None:
        self.settings.set(name, value)

    def sampler(self) -> Sampler:
        """One sampler per settings value: a seeded session is reproducible, yet /regen gives a new reply."""
        key = dataclasses.astuple(self.settings)
        if self._sampler is None or key != self._sampler_key:
            st = self.settings
            self.seed = st.seed if st.seed is not None else new_seed()
            self._sampler = make_sampler(st.temperature, st.top_p, st.top_k, st.min_p, self.seed)
            self._sampler_key = key
        return self._sampler

    # -- conversation ---------------------------------------------------------------------------------------------

    def clear(self) -> None:
        """A new conversation; the system prompt and settings stay."""
        self.messages.clear()
        self.last_reply = None

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def render(self, messages: list[dict[str, Any]] | None = None) -> str:
        """The prompt text for the conversation (the chat template sees only role and content)."""
        turns = self.messages if messages is None else messages
        full = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": m["role"], "content": m["content"]} for m in turns
        ]
        return self.tokenizer.apply_chat_template(full, add_generation_prompt=True)

    def template_system(self) -> str | None:
        """The system prompt the chat template adds by itself when the conversation has none (SmolLM2's and Qwen2.5's
        templates do), else None. Found by rendering one user turn with a marker system prompt and without one: the
        text that stands where the marker stood is the template's own."""
        marker, user = "\x00system\x00", [{"role": "user", "content": "\x00user\x00"}]
        try:
            given = self.tokenizer.apply_chat_template([{"role": "system", "content": marker}, *user])
            plain = self.tokenizer.apply_chat_template(user)
        except Exception:  # a template that refuses a system message (or any other): nothing to tell
            return None
        before, found, after = given.partition(marker)
        if not found or not plain.startswith(before):
            return None
        end = plain.find(after, len(before))  # the rest of the prompt, as after the marker
        default = plain[len(before) : end] if end >= 0 else ""
        return default or None

    def send(self, text: str) -> Reply:
        """Add a user message and start the reply. An empty message is refused."""
        if not text.strip():
            raise MarcoError("empty message")
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()  # a previous send whose reply never started (it failed): replace it
        self.messages.append({"role": "user", "content": text})
        try:
            return self._start()
        except MarcoError:
            self.messages.pop()
            raise

    def regenerate(self) -> Reply:
        """Drop the last reply and generate a new one for the same user message."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            raise MarcoError("nothing to regenerate yet", hint="send a message first")
        return self._start()

    def _start(self) -> Reply:
        ids, dropped = self._fit()
        return Reply(self, ids, dropped)

    def _fit(self) -> tuple[list[int], int]:
        """Token ids of the prompt, after dropping the oldest turns if it does not leave room for a reply. The turns
        are dropped only once the prompt fits: a message refused as too long leaves the conversation as it was."""
        wanted = self.settings.max_tokens
        reserve = self.context_length // 4 if wanted == UNTIL_FULL else min(wanted, self.context_length // 4)
        kept = self.messages
        ids = self.tokenizer.encode(self.render(kept))
        if len(ids) + reserve <= self.context_length:
            return ids, 0
        dropped = 0
        while True:
            starts = [i for i, m in enumerate(kept) if m["role"] == "user"]
            if len(starts) <= 1:
                break
            kept = kept[starts[1] :]  # without the oldest user turn and the reply to it
            dropped += 1
            ids = self.tokenizer.encode(self.render(kept))
            if len(ids) <= self.context_length // 2:
                break
        if len(ids) + reserve > self.context_length:
            raise MarcoError(
                f"the message is too long: the prompt is {len(ids)} tokens, and {reserve} more are kept for the "
                f"reply, in a context window of {self.context_length}",
                hint="shorten it or the system prompt, lower the reply's room (/set max_tokens N), or raise --ctx",
            )
        self.messages[:] = kept
        return ids, dropped

    @property
    def context_tokens(self) -> int:
        """Tokens of the conversation (system prompt and turns) in the context window: not the KV cache's count,
        which keeps a cleared conversation's tokens for reuse until the next reply."""
        if not self.messages:
            return 0
        return len(self.tokenizer.encode(self.render()))

    # -- save / load ----------------------------------------------------------------------------------------------

    def to_dict(self, model_name: str | None = None) -> dict[str, Any]:
        return {
            "format": SAVE_FORMAT,
            "version": SAVE_VERSION,
            "model": model_name,
            "system": self.system,
            "settings": dataclasses.asdict(self.settings),
            "messages": [dict(m) for m in self.messages],
        }

    def save(self, path: str | Path, model_name: str | None = None, force: bool = False) -> Path:
        path = Path(path).expanduser()
        if path.is_dir():
            raise MarcoError(f"{path} is a folder", hint="name a file")
        if path.exists() and not force:
            raise MarcoError(f"{path} already exists", hint="choose another name, or add --force to overwrite it")
        if not path.parent.is_dir():  # a typo must not create folders
            raise MarcoError(f"the folder {path.parent} does not exist", hint="create it first")
        text = json.dumps(self.to_dict(model_name), indent=2, ensure_ascii=False) + "\n"
        tmp = path.with_name(f".{path.name}.partial")
        try:  # through a temporary file: a failed write leaves an earlier save whole
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise MarcoError(f"cannot write {path}: {e.strerror or e}") from e
        return path

    def load(self, path: str | Path) -> dict[str, Any]:
        """Replace the conversation, system prompt and settings with a saved one; returns the saved record."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MarcoError(f"no such file: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MarcoError(f"cannot read {path}: {e}", hint="it must be a conversation written by /save") from e
        if not isinstance(data, dict) or data.get("format") != SAVE_FORMAT:
            raise MarcoError(f"{path} is not a saved marco conversation", hint="it must be a file written by /save")
        messages = data.get("messages") or []
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise MarcoError(f"{path} has malformed messages", hint="each needs a role (user/assistant) and content")
        if any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(messages)):
            raise MarcoError(f"{path} has turns out of order", hint="user and assistant turns alternate, user first")
        if not isinstance(data.get("version"), int) or data["version"] > SAVE_VERSION:
            raise MarcoError(f"{path} is a version of the format this marco does not know", hint="update marco-local")
        saved, system = data.get("settings") or {}, data.get("system")
        if not isinstance(saved, dict) or not isinstance(system, str | None):
            raise MarcoError(f"{path} has malformed settings or system prompt", hint="it must be written by /save")
        settings = ChatSettings()
        for name, value in saved.items():
            try:
                if name in {f.name for f in dataclasses.fields(settings)} and value is not None:
                    settings.set(name, str(value))
                elif name in ("seed", "repeat_penalty"):
                    setattr(settings, name, None)
            except MarcoError as e:
                raise MarcoError(f"{path}: {e.message}", hint=e.hint) from None
        self.settings = settings
        self.system = system or None
        self.messages = [dict(m) for m in messages]
        self.last_reply = None
        return data
