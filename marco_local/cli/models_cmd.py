"""`marco list`, `marco pull`, `marco info`: the everyday commands around models.

Their answer (the table, the JSON) goes to stdout; progress and messages go to stderr. On a non-terminal stdout the
table is plain text, one row per line, never wrapped.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import ui
from .options import Ctx, ModelArg

LIST_EPILOG = "Examples:\n\n  marco list\n\n  marco list --json | jq '.[] | select(.present) | .name'"
PULL_EPILOG = (
    "Examples:\n\n  marco pull nano\n\n  marco pull AIDC-AI/Marco-Mini-Instruct\n\n"
    "  HF_HUB_OFFLINE=1 marco pull nano   (only checks the local cache)"
)
INFO_EPILOG = (
    "Examples:\n\n  marco info nano\n\n  marco info mini --gpu-mem 6GiB --ctx 8192\n\n  marco info model.gguf --json"
)


def _print(*renderables) -> None:
    """Print to stdout without the padding rich adds after a table's last column."""
    tty = sys.stdout.isatty()
    console = Console(
        highlight=False,
        no_color=bool(os.environ.get("NO_COLOR")) or None,
        width=None if tty else 10_000,  # piped: one line per row, never wrapped
    )
    with console.capture() as captured:
        for r in renderables:
            console.print(r)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def list_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON array instead of the table.")] = False,
) -> None:
    """List the known models and what is present locally (size on disk, formats)."""
    from ..inventory import list_models, listing_dict

    rows = list_models()
    if as_json:
        sys.stdout.write(json.dumps([listing_dict(r) for r in rows], indent=2) + "\n")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "REPO", "LOCAL", "SIZE", "FORMATS", "DESCRIPTION"):
        table.add_column(column, no_wrap=column != "DESCRIPTION", overflow="ellipsis")
    for r in rows:
        table.add_row(
            r.name,
            r.repo or (r.source or "").split(":")[0] or "-",
            "yes" if r.present else "no",
            ui.human_bytes(r.size_bytes) if r.present else "-",
            ", ".join(r.formats) or "-",
            r.description,
        )
    _print(table)


def pull(
    model: Annotated[str, typer.Argument(help="Short name (nano, mini...) or Hugging Face repo id.")],
    offline: Annotated[
        bool,
        typer.Option("--offline", help="Do not use the network: only check the local cache (as HF_HUB_OFFLINE=1)."),
    ] = False,
) -> None:
    """Download a model into the standard Hugging Face cache (resumes; already-complete files are skipped)."""
    from ..inventory import disk_size
    from ..inventory import pull as pull_model

    with ui.progress(f"pulling {model}") as cb:
        folder = pull_model(model, offline=offline, progress=cb)
    ui.info(f"{model}: {ui.human_bytes(disk_size(folder))} at {folder}")


def info(
    model: ModelArg,
    gpu_mem: Annotated[
        str | None,
        typer.Option("--gpu-mem", help="GPU budget to plan for, e.g. 4GiB (default: one that holds half the experts)."),
    ] = None,
    ctx: Ctx = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Architecture, parameters (total/active), tensor types, bits per weight, expert size, and memory per placement."""
    from ..inventory import model_info
    from ..offload.budget import parse_size
    from ..offload.memory import RUNTIME_MARGIN

    mi = model_info(model, ctx=ctx, gpu_mem=parse_size(gpu_mem) if gpu_mem else None)
    if as_json:
        sys.stdout.write(json.dumps(mi.to_dict(), indent=2) + "\n")
        return
    c, p, gib = mi.config, mi.params, ui.human_bytes
    moe = f"{c['num_experts']} experts x {c['expert_width']} wide, top {c['experts_per_token']}"
    lines = [
        ("model", mi.name if mi.path == mi.name else f"{mi.name}  ({mi.path})"),
        ("format", mi.format),
        (
            "architecture",
            f"{mi.architecture}: {c['layers']} layers, hidden {c['hidden_size']}, "
            f"{c['attention_heads']} query / {c['kv_heads']} KV heads of {c['head_dim']}",
        ),
        ("experts", moe if c["num_experts"] else "none (dense)"),
        ("vocabulary", f"{c['vocab_size']:,}" + (" (tied embeddings)" if c["tied_embeddings"] else "")),
        ("context", f"{c['context_length']:,} tokens (planning for --ctx {mi.ctx:,})"),
        ("parameters", f"{_count(p.total)} total, {_count(p.active)} active per token ({p.active / p.total:.1%})"),
        ("tensor types", ", ".join(f"{t.dtype} x {t.count:,} ({gib(t.nbytes)})" for t in mi.tensor_types)),
        ("weights", f"{gib(mi.weight_bytes)}, {mi.bits_per_weight:.2f} bits per weight"),
    ]
    if c["num_experts"]:
        lines.append(
            (
                "expert bytes",
                f"{gib(mi.one_expert_bytes)} each, {gib(mi.expert_bytes)} all "
                f"({mi.expert_bytes / mi.weight_bytes:.0%} of the weights)",
            )
        )
    lines.append(("KV cache", f"{gib(mi.kv_bytes)} at {mi.ctx:,} tokens"))
    if mi.format == "gguf":  # its quantized products run on the native kernels where they can be had
        from ..kernels import native

        lines.append(("CPU kernels", native.describe()))
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in lines:
        table.add_row(key, value)
    mem = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
    for column in ("PLACEMENT", "GPU", "RAM", ""):
        mem.add_column(column, no_wrap=column != "")
    for pl in mi.placements:
        gpu = gib(pl.fast_bytes) if pl.fast_bytes is not None else "-"
        name = f"{pl.name} {gib(pl.budget_bytes)}" if pl.budget_bytes is not None else pl.name
        mem.add_row(name, gpu, gib(pl.ram_bytes) if pl.ram_bytes else "-", pl.note)
    _print(
        table,
        "",
        mem,
        f"[dim]memory = weights + KV cache + {gib(RUNTIME_MARGIN)} working margin (an estimate); a GPU budget row is "
        "planned as marco run plans it, with the CUDA working memory inside the budget[/]",
    )


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
