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
