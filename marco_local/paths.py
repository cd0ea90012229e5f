"""Where marco-local keeps its own files; importing this must stay cheap (no torch), `marco list` uses it."""

from __future__ import annotations

import os
from pathlib import Path

DEMO_VERSION = "3"  # bump when the demo recipe (marco_local/demo.py) changes, so old caches are rebuilt


def cache_home() -> Path:
    """$MARCO_HOME, else $XDG_CACHE_HOME/marco-local, else ~/.cache/marco-local."""
    base = os.environ.get("MARCO_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "marco-local"
    )
    return Path(base)


def demo_dir() -> Path:
    return cache_home() / f"demo-v{DEMO_VERSION}"
