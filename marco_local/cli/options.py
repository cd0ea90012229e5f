"""Option types shared by the commands that load and run a model (run, chat, bench), so they stay identical."""

from __future__ import annotations

from typing import Annotated

import typer

ModelArg = Annotated[
    str, typer.Argument(help="Short name (demo, nano, mini...), Hugging Face repo id, folder or .gguf")
]
MaxTokens = Annotated[int, typer.Option("--max-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[
    float | None, typer.Option(help="0 = greedy. Default: the model's generation_config, else 0.7.")
]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.")]
TopK = Annotated[int | None, typer.Option("--top-k", help="Sample among the k most likely tokens (0 = off).")]
MinP = Annotated[float | None, typer.Option("--min-p", help="Drop tokens below min_p x the top probability.")]
RepeatPenalty = Annotated[float | None, typer.Option("--repeat-penalty", help="Penalise recent tokens (1.0 = off).")]
Seed = Annotated[int | None, typer.Option(help="Random seed: the same seed gives the same text.")]
Dtype = Annotated[str, typer.Option(help="Weights dtype for unquantized checkpoints: bf16, f16 or f32.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Ctx = Annotated[int, typer.Option("--ctx", help="Context window (tokens) to allocate the KV cache for.")]

# Expert placement (marco_local/offload): one budget knob per memory tier, plus overrides.
RamMem = Annotated[
    str | None,
    typer.Option("--ram-mem", help="CPU-only: RAM budget for the model (e.g. 6GiB); experts beyond it stay on disk."),
]
GpuMem = Annotated[
    str | None,
    typer.Option("--gpu-mem", help="CUDA: VRAM budget (e.g. 4GiB, or auto); the other experts wait in host RAM."),
]
ExpertsResident = Annotated[
    str | None,
    typer.Option("--experts-resident", help="Experts kept in fast memory per layer: a count (16) or a share (25%)."),
]
ExpertProfile = Annotated[
    str | None,
    typer.Option("--profile", help="Expert profile (marco profile): warms the cache; the static policy's hot set."),
]
ExpertPolicy = Annotated[str, typer.Option("--expert-policy", help="Expert cache eviction: lru, lfu or static.")]
ExpertMisses = Annotated[
    str,
    typer.Option(
        "--expert-misses",
        help="A missing expert: copy it into fast memory, compute it on the cpu where it lies (CUDA: while the GPU "
        "computes the resident ones), direct (CUDA: the GPU reads it from host RAM where it lies; no host step per "
        "layer), or auto (measured at load).",
    ),
]
Prefetch = Annotated[
    bool,
    typer.Option(
        "--prefetch/--no-prefetch",
        help="Speculate the next layer's experts and load them early (for CUDA: on a CPU with few cores the extra "
        "reads slow decode).",
    ),
]
