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


class NativeTierError(MarcoError):
    """MARCO_NATIVE_ISA (or a test) asked for a kernel tier that does not exist or that this CPU cannot run."""
