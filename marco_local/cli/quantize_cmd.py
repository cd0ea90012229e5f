"""`marco quantize SRC -o OUT --to TYPE`: a progress bar and a summary table on stderr around `quant.convert.quantize`.

stdout stays empty (nothing here is model output); the bar is drawn only when stderr is a terminal.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..errors import MarcoError
from . import ui

# every type quant.convert.PRESETS takes (a test keeps them equal), written out: importing quant costs torch's import
EPILOG = (
    "Types: GGUF f32, f16, bf16, q8_0, q4_0, q5_0, q4_k_m, q5_k_m, q6_k (one .gguf file for llama.cpp, Ollama, "
    "LM Studio); bitsandbytes nf4, fp4, int8 (a checkpoint folder for marco and transformers 4.x; transformers 5, "
    "which fuses experts, does not load it).\n\n"
    "Examples:\n\n  marco quantize nano -o marco-nano-q4_k_m.gguf --to q4_k_m\n\n"
    "  marco quantize ./Marco-Mini-Instruct -o ./marco-mini-nf4 --to nf4"
)

Callback = Callable[[int, int], None]


@contextmanager
def _bars(description: str) -> Iterator[tuple[Callback, Callback]]:
    """(bytes callback, tensors callback) drawing one bar: bytes done/total, tensors, ETA. It fits 80 columns (with
    the elapsed time too, the byte count wrapped onto a second line there at each refresh)."""
    if not sys.stderr.isatty():
        yield (lambda done, total: None), (lambda done, total: None)
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=None),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TextColumn("{task.fields[tensors]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=ui.console,
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=None, tensors="")

        def on_bytes(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        def on_tensors(done: int, total: int) -> None:
            bar.update(task, tensors=f"{done}/{total} tensors")

        yield on_bytes, on_tensors


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """`kill` (SIGTERM) unwinds like Ctrl-C, so the library's cleanup removes the partial output."""

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:,.2f}{unit}"
    return str(n)


def _summary(report) -> Table:
    table = Table(title=f"{report.out} ({report.preset})", title_justify="left", show_edge=False)
    table.add_column("tensors")
    table.add_column("weights", justify="right")
    table.add_column("size", justify="right")
    table.add_column("bits/weight", justify="right")
    for name, c in report.classes.items():
        table.add_row(name, _count(c.params), ui.human_bytes(c.bytes), f"{c.bits_per_weight:.2f}")
    table.add_row(
        "total",
        _count(report.params),
        ui.human_bytes(sum(c.bytes for c in report.classes.values())),
        f"{report.bits_per_weight:.2f}",
        style="bold",
    )
    return table


def quantize(
    src: Annotated[str, typer.Argument(help="Short name (nano, mini...), Hugging Face repo id or checkpoint folder.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Output: a .gguf file, or a folder for nf4/fp4/int8.")],
    to: Annotated[str, typer.Option("--to", help="Quantization type (see below).")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUT if it is a previous output: a file, or an nf4/fp4/int8 folder.")
    ] = False,
) -> None:
    """Quantize a checkpoint to GGUF (llama.cpp) or bitsandbytes 4/8-bit, streaming tensor by tensor."""
    from quant.convert import quantize as run_quantize

    from ..registry import resolve

    resolved = resolve(src)
    if resolved.format != "hf":
        raise MarcoError(f"{src} is already a GGUF file", hint="quantize from the original Hugging Face checkpoint")
    with _sigterm_as_exit(), _bars(f"quantizing to {to.lower()}") as (on_bytes, on_tensors):
        report = run_quantize(resolved.path, out, to, force=force, progress=on_bytes, tensor_progress=on_tensors)
    for note in report.warnings:  # expected type fallbacks, said once per tensor kind
        ui.info(f"note: {note}")
    ui.console.print(_summary(report))
    types = ", ".join(f"{t} x{n}" for t, n in report.types.items())
    ui.info(
        f"wrote {report.out}: {ui.human_bytes(report.output_bytes)} in {report.seconds:.1f} s"
        + (f" · tensor types: {types}" if types else "")
    )
