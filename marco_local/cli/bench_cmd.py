"""`marco bench MODEL`: prompt and decode speed, peak memory: the results (a table, or one JSON object) on stdout, so
`marco bench x > file` keeps them; progress, notes and warnings on stderr."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import ui
from .options import (
    Device,
    Dtype,
    ExpertMisses,
    ExpertPolicy,
    ExpertProfile,
    ExpertsResident,
    GpuMem,
    ModelArg,
    Prefetch,
    RamMem,
    at_least_one,
)

EPILOG = (
    "Measures a 512-token prompt processed in one batch and 128 greedily decoded tokens (random token ids), "
    "--repeats times each, as llama-bench's pp512/tg128.\n\n"
    "Examples:\n\n  marco bench nano\n\n  marco bench marco-nano-q4_k_m.gguf --threads 2 --json\n\n"
    "  marco bench marco-nano-q4_k_m.gguf --ram-mem 3GiB"
)


def bench(
    model: ModelArg,
    prompt_tokens: Annotated[
        int, typer.Option("--prompt-tokens", "-p", callback=at_least_one, help="Prompt length to time.")
    ] = 512,
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", "-n", callback=at_least_one, help="Tokens to decode.")
    ] = 128,
    repeats: Annotated[
        int, typer.Option("--repeats", "-r", callback=at_least_one, help="Timed runs of each test.")
    ] = 3,
    threads: Annotated[
        int | None, typer.Option("--threads", "-t", callback=at_least_one, help="CPU threads (default: torch's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of the table.")] = False,
    dtype: Dtype = "bf16",
    device: Device = "auto",
    ram_mem: RamMem = None,
    gpu_mem: GpuMem = None,
    experts_resident: ExpertsResident = None,
    profile: ExpertProfile = None,
    expert_policy: ExpertPolicy = "lru",
    prefetch: Prefetch = False,
    expert_misses: ExpertMisses = "auto",
) -> None:
    """Measure prompt processing and decode speed (tokens/s) and peak memory."""
    import torch

    from ..benchmark import run_benchmark
    from ..layers.gguf import kernel_summary
    from ..offload import Placement, offload_stats
    from ..runtime import load

    if threads and threads > (os.cpu_count() or threads):
        ui.warn(f"--threads {threads} is more than this machine's {os.cpu_count()} CPU cores: expect slower runs")
    if threads:
        torch.set_num_threads(threads)
    ctx = max(prompt_tokens, decode_tokens + 1)  # what run_benchmark's cache holds: the budget counts it
    placement = Placement(ram_mem, gpu_mem, experts_resident, profile, expert_policy, prefetch, ctx, expert_misses)
    with ui.progress("loading") as cb:
        lm = load(model, dtype=dtype, device=device, progress=cb, placement=placement)
    ui.loaded(lm)
    if ctx > lm.context_length:
        ui.warn(f"the benchmark's {ctx} tokens are more than the model's context window ({lm.context_length})")
    with ui.progress("benchmarking") as cb:
        result = run_benchmark(
            lm.model,
            prompt_tokens,
            decode_tokens,
            repeats,
            progress=cb,
            settings={
                "model": str(lm.source.path),
                "format": lm.source.format,
                "dtype": dtype,
                "kernels": kernel_summary(lm.model),
            },
        )
    data = result.to_json()
    stats = offload_stats(lm.model)
    if stats is not None:
        data["offload"] = {
            "experts_resident_fraction": stats.resident_fraction,
            "expert_hit_rate": stats.hit_rate,
            "expert_bytes_moved": stats.bytes_moved,
            "expert_bytes_read_in_place": stats.bytes_read_in_place,
            "expert_stall_s": stats.stall_s,
            "expert_slots_per_layer": stats.slots_per_layer,
        }
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    table = Table(title=f"{lm.source.path.name} · {data['settings']['device']} · {data['settings']['threads']} threads")
    for col in ("test", "tok/s median", "min", "max"):
        table.add_column(col, justify="left" if col == "test" else "right")
    for key, label in (("prompt", f"prompt {prompt_tokens}"), ("decode", f"decode {decode_tokens}")):
        s = data[key]
        table.add_row(label, f"{s['median']:.1f}", f"{s['min']:.1f}", f"{s['max']:.1f}")
    out = Console(highlight=False, no_color=bool(os.environ.get("NO_COLOR")) or None)  # stdout: the results
    out.print(table)
    mem = f"peak RSS {ui.human_bytes(data['peak_rss_bytes'])}"
    if data["peak_vram_bytes"] is not None:
        mem += f" · peak VRAM {ui.human_bytes(data['peak_vram_bytes'])}"
    out.print(mem, soft_wrap=True, markup=False)
    if stats is not None:
        hit, in_place = stats.hit_rate, stats.bytes_read_in_place
        out.print(
            f"experts: {stats.resident_fraction:.0%} resident"
            + (f" · hit rate {hit:.0%}" if hit is not None else "")
            + f" · {ui.human_bytes(stats.bytes_moved)} read · stalled {stats.stall_s:.2f} s"
            + (f" · {ui.human_bytes(in_place)} read in place" if in_place else ""),
            soft_wrap=True,
            markup=False,
        )
