"""All terminal presentation: the stderr console, error lines, progress bars and stats footers.

stdout carries only model output; everything here goes to stderr. rich drops colours and animation by itself when
stderr is not a terminal or NO_COLOR is set; `progress` shows nothing at all on a non-terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from ..offload.stats import OffloadStats

console = Console(stderr=True, highlight=False, no_color=bool(os.environ.get("NO_COLOR")) or None)


def error(message: str, hint: str | None = None) -> None:
    console.print(f"[bold red]Error:[/] {message}", markup=True, soft_wrap=True, highlight=False)
    if hint:
        console.print(f"[yellow]Hint:[/] {hint}", markup=True, soft_wrap=True, highlight=False)


def unexpected(e: Exception, kept: str = "") -> None:
    """An exception no code path expected: a bug, said in one line (the traceback is MARCO_DEBUG=1's), except torch's
    CUDA out-of-memory error, which is not a bug: the model (or its context) does not fit the GPU. `kept`: what
    survives the error (the chat goes on)."""
    if is_out_of_gpu_memory(e):
        error(f"out of GPU memory ({str(e).split('.')[0]}){kept}", OUT_OF_GPU_MEMORY_HINT)
    else:
        error(f"unexpected {type(e).__name__}: {e}{kept}", "rerun with MARCO_DEBUG=1 for a traceback, and report it")


OUT_OF_GPU_MEMORY_HINT = (
    "keep only the hot experts on the GPU with --gpu-mem auto (or a size such as 4GiB), use a smaller --ctx, "
    "or run on the CPU with --device cpu"
)


def is_out_of_gpu_memory(e: BaseException) -> bool:
    """torch's CUDA out-of-memory error, recognised without importing torch (commands like `list` never load it)."""
    return type(e).__name__ == "OutOfMemoryError" and type(e).__module__.split(".")[0] == "torch"


def loaded(lm, ctx: int | None = None) -> None:
    """What the loader decided on its own (a model too big for the GPU), and a --ctx typed that the model cannot hold
    (`ctx`; it is clamped to the model's context)."""
    for note in lm.notes:
        info(note)
    if ctx is not None and ctx > lm.context_length:
        info(f"--ctx {ctx:,}: the model's context is {lm.context_length:,} tokens, so that is used")


def warn(message: str) -> None:
    console.print(f"[yellow]Warning:[/] {message}", soft_wrap=True)


def info(message: str) -> None:
    console.print(message, soft_wrap=True, markup=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@contextmanager
def progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress callback `(done, total)`, drawn as a bar on a terminal and silent elsewhere."""
    if not sys.stderr.isatty():
        yield lambda done, total: None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def stats_line(r, moves: bool = False) -> str:
    """One line after a reply: speeds, time to first token, memory, and for an offloaded model the share of experts
    in fast memory (as `ollama ps` gives the GPU's share) and the cache's hit rate; `moves`: also the bytes its
    misses moved and the time decode stalled on them (`run --verbose`; the chat has /stats for them)."""
    parts = [
        f"prompt {r.prompt_tokens} tok @ {r.prompt_tps:.1f} tok/s",
        f"decode {r.generation_tokens} tok @ {r.generation_tps:.1f} tok/s",
        f"first token {r.time_to_first_token * 1000:.0f} ms",
        f"peak mem {human_bytes(r.peak_memory)}",
    ]
    if r.cached_prompt_tokens:
        parts.insert(1, f"{r.cached_prompt_tokens} cached")
    if r.stats is not None:
        parts.append(f"{r.stats.resident_fraction:.0%} of experts resident")
    hit = r.stats.hit_rate if r.stats is not None else None
    if hit is not None:
        parts.append(f"expert hits {hit:.0%}")
    if moves and hit is not None:
        parts.append(expert_traffic(r.stats))
    return " · ".join(parts)


def expert_traffic(stats: OffloadStats) -> str:
    """What the expert cache's misses cost: bytes copied into slots, bytes the GPU read in place from host RAM (direct
    reads, `auto`'s choice on CUDA: without them a run that missed would seem to move nothing), time stalled."""
    in_place = stats.bytes_read_in_place
    return (
        f"{human_bytes(stats.bytes_moved)} moved"
        + (f", {human_bytes(in_place)} read in place" if in_place else "")
        + f", stalled {stats.stall_s:.2f} s"
    )
