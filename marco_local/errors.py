"""The one exception type the CLI turns into a one-line `Error:` message.

Library code raises `MarcoError` for every problem a user can cause or fix (bad path, wrong architecture, corrupt
file); anything else is a bug and keeps its traceback under MARCO_DEBUG=1.
"""

from __future__ import annotations


class MarcoError(Exception):
    """A user-facing error: `message` says what went wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


def not_a_number() -> MarcoError:
    """NaN out of a forward pass: finite weights and inputs never make one, so the file is damaged (a flipped byte in
    a block scale is enough). Said where it is found (the router, the sampler) instead of as an internal error."""
    return MarcoError(
        "the model computed NaN (not-a-number) values: its weights are probably damaged",
        hint="download or quantize the model again",
    )


class InvalidModelError(MarcoError):
    """A model file's metadata or layout is malformed or inconsistent: `key` names what was read (a GGUF key, a
    config.json key, a tensor) and `value` what it held, so one line says exactly what to look at."""

    def __init__(self, source: object, key: str, value: object, problem: str, hint: str | None = None) -> None:
        self.source, self.key, self.value, self.problem = source, key, value, problem
        super().__init__(
            f"{source}: {key} = {short_repr(value)} {problem}",
            hint or "the model file is damaged or was written wrongly: download or convert it again",
        )

    def renamed(self, source: object, key: str) -> InvalidModelError:
        """The same error said in another file's terms (a GGUF key for a config field)."""
        return InvalidModelError(source, key, self.value, self.problem, self.hint)


def short_repr(value: object, limit: int = 60) -> str:
    """repr() cut to one short line: a corrupt value may be a megabyte of text."""
    try:
        text = repr(value)
    except Exception:  # a hostile object's __repr__; never mask the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class NativeTierError(MarcoError):
    """MARCO_NATIVE_ISA (or a test) asked for a kernel tier that does not exist or that this CPU cannot run."""
