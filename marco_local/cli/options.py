"""Option types shared by the commands that load and run a model (run, chat, bench), so they stay identical.

Values are checked as they are parsed (typer callbacks): a bad one is a usage error (exit code 2) before anything is
loaded, not a failure in the middle of a generation (offload options: their syntax, and a --profile file's content,
through the offload package's own parsers). The sampling ranges are `sampling.setting_error`'s, which the chat's /set
uses too; torch is imported only when a sampling or offload option is given (`marco list` and `info` stay quick).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer._click.core import ParameterSource  # typer vendors click

from ..errors import MarcoError


def typed(context: typer.Context, name: str) -> bool:
    """Whether option `name` was given on the command line (not left at its default)."""
    return context.get_parameter_source(name) == ParameterSource.COMMANDLINE


def _sampling(name: str) -> Callable[[Any], Any]:
    def check(value: float | None) -> float | None:
        if value is not None:
            from ..sampling import setting_error

            if error := setting_error(name, value):
                raise typer.BadParameter(f"{error}, not {value}")
        return value

    return check


def _seed(value: int | None) -> int | None:
    """-1 is a new seed each run (None), as in llama.cpp and Ollama."""
    _sampling("seed")(value)
    return None if value == -1 else value


def _max_tokens(value: int) -> int:
    if value < -1:
        raise typer.BadParameter(f"must be at least 0, or -1 to generate until the context is full; not {value}")
    return value


def _ctx(value: int) -> int:
    if value < 2:
        raise typer.BadParameter(f"must be at least 2 tokens (a prompt token and a reply token), not {value}")
    return value


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r} is not one of auto, cpu, cuda (or cuda:N)")
    return value


# the values the library takes (runtime.DTYPES, offload POLICIES and MISS_HANDLING; a test keeps them equal), here
# without importing torch
DTYPES = ("bf16", "bfloat16", "f16", "float16", "f32", "float32")
EXPERT_POLICIES = ("lru", "lfu", "static")
MISS_HANDLING = ("auto", "copy", "cpu", "direct")


def _choice(*names: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in names:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(names)}")
        return value

    return check


def _not_empty(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise typer.BadParameter("is empty")
    return value


def _usage(check: Callable[[str], object]) -> Callable[[str | None], str | None]:
    """An offload option checked with the library's own parser (imported only when the option is given): the
    MarcoError it raises becomes a usage error, before the model loads."""

    def callback(value: str | None) -> str | None:
        _not_empty(value)
        if value is not None:
            try:
                check(value)
            except MarcoError as e:
                raise typer.BadParameter(f"{e.message}; {e.hint}" if e.hint else e.message) from None
        return value

    return callback


def _size(value: str) -> None:
    from ..offload.budget import parse_size

    parse_size(value)


def _gpu_size(value: str) -> None:
    if value != "auto":
        _size(value)


def _resident(value: str) -> None:
    from ..offload.budget import read_resident

    read_resident(value)


def _profile(value: str) -> None:
    from ..offload.install import load_profile

    load_profile(value)


def output_file(value: Path | None) -> Path | None:
    """A file the command will write: caught here, not after a long run that then cannot save its result."""
    if value is None:
        return None
    if value.is_dir():
        raise typer.BadParameter(f"{value} is a folder; name a file")
    if not value.parent.is_dir():
        raise typer.BadParameter(f"the folder {value.parent} does not exist")
    return value


def input_file(value: Path | None) -> Path | None:
    """A file the command reads after loading the model: a typo is said before the load, not after it."""
    if value is not None and not value.is_file():
        raise typer.BadParameter(f"{value} {'is a folder' if value.is_dir() else 'does not exist'}")
    return value


def check_replaceable(path: Path | None, kind: str, force: bool = True) -> None:
    """An existing output file is replaced only when it is an earlier output of the same kind (`kind`: the "format"
    of its first JSON line, as trace and profile files start): never the model being run, its profile, or a text the
    user wrote (`marco run --trace victim.gguf` once overwrote the model). `force`: whether replacing was asked."""
    if path is None or not path.exists():
        return
    try:
        with open(path, "rb") as f:
            head = json.loads(f.readline(4096))
    except (OSError, ValueError):  # not JSON, not UTF-8, a partial line
        head = None
    if not isinstance(head, dict) or head.get("format") != kind:
        raise MarcoError(f"{path} exists and is not a {kind} file; refusing to overwrite it", hint="name a new file")
    if not force:
        raise MarcoError(f"{path} already exists", hint="choose another name or pass --force")


def at_least_one(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be at least 1, not {value}")
    return value


def _stops(values: list[str] | None) -> list[str] | None:
    if values and not all(values):
        raise typer.BadParameter("an empty stop text would end every reply before it starts")
    return values


ModelArg = Annotated[
    str, typer.Argument(help="Short name (demo, nano, mini...), Hugging Face repo id, folder or .gguf")
]
MaxTokens = Annotated[
    int,
    typer.Option(
        "--max-tokens", "-n", callback=_max_tokens, help="Most tokens to generate (-1: until the context is full)."
    ),
]
Temperature = Annotated[
    float | None,
    typer.Option(
        callback=_sampling("temperature"), help="0 = greedy. Default: the model's generation_config, else 0.7."
    ),
]
TopP = Annotated[float | None, typer.Option("--top-p", callback=_sampling("top_p"), help="Nucleus sampling mass.")]
TopK = Annotated[
    int | None,
    typer.Option("--top-k", callback=_sampling("top_k"), help="Sample among the k most likely tokens (0 = off)."),
]
MinP = Annotated[
    float | None,
    typer.Option("--min-p", callback=_sampling("min_p"), help="Drop tokens below min_p x the top probability."),
]
RepeatPenalty = Annotated[
    float | None,
    typer.Option("--repeat-penalty", callback=_sampling("repeat_penalty"), help="Penalise recent tokens (1.0 = off)."),
]
Seed = Annotated[
    int | None, typer.Option(callback=_seed, help="Random seed: the same seed gives the same text (-1: a new one).")
]
Dtype = Annotated[
    str,
    typer.Option(callback=_choice(*DTYPES), help="Weights dtype for unquantized checkpoints: bf16, f16 or f32."),
]
Device = Annotated[str, typer.Option(callback=_device, help="auto, cpu or cuda.")]
Ctx = Annotated[int, typer.Option("--ctx", callback=_ctx, help="Context window (tokens) to allocate the KV cache for.")]
Stop = Annotated[list[str] | None, typer.Option(callback=_stops, help="Stop when this text appears (repeatable).")]

# Expert placement (marco_local/offload): one budget knob per memory tier, plus overrides.
RamMem = Annotated[
    str | None,
    typer.Option(
        "--ram-mem",
        callback=_usage(_size),
        help="CPU-only: RAM budget for the model (e.g. 6GiB); experts beyond it stay on disk.",
    ),
]
GpuMem = Annotated[
    str | None,
    typer.Option(
        "--gpu-mem",
        callback=_usage(_gpu_size),
        help="CUDA: VRAM budget (e.g. 4GiB, or auto); the other experts wait in host RAM.",
    ),
]
ExpertsResident = Annotated[
    str | None,
    typer.Option(
        "--experts-resident",
        callback=_usage(_resident),
        help="Experts kept in fast memory per layer: a count (16) or a share (25%).",
    ),
]
ExpertProfile = Annotated[
    str | None,
    typer.Option(
        "--profile",
        callback=_usage(_profile),
        help="Expert profile (marco profile): warms the cache; the static policy's hot set.",
    ),
]
ExpertPolicy = Annotated[
    str,
    typer.Option(
        "--expert-policy", callback=_choice(*EXPERT_POLICIES), help="Expert cache eviction: lru, lfu or static."
    ),
]
ExpertMisses = Annotated[
    str,
    typer.Option(
        "--expert-misses",
        callback=_choice(*MISS_HANDLING),
        help="A missing expert: copy it into fast memory, compute it on the cpu where it lies (CUDA only: while the "
        "GPU computes the resident ones), direct (CUDA only: the GPU reads it from host RAM where it lies; no host "
        "step per layer), or auto (direct on CUDA where it works and --prefetch is off, else copy or cpu, measured "
        "at load).",
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
TraceFile = Annotated[
    Path | None, typer.Option(callback=output_file, help="Write the expert routing trace (JSON lines) to this file.")
]
