"""`marco profile`: measure which experts each layer uses on the user's own text, for `--profile` (warm cache,
static hot set). Writes JSON (never over an existing file without --force); can also write the routing trace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import MarcoError
from . import ui
from .options import Device, Dtype, ModelArg, at_least_one, check_replaceable, output_file

EPILOG = "Examples:\n\n  marco profile nano --text turkish.txt -o tr.json\n\n  marco chat nano --profile tr.json"


def profile(
    model: ModelArg,
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text file in the language/domain you will use.")],
    output: Annotated[Path, typer.Option("--output", "-o", callback=output_file, help="Profile JSON to write.")],
    trace: Annotated[
        Path | None, typer.Option(callback=output_file, help="Also write the routing trace (JSON lines) here.")
    ] = None,
    chunk: Annotated[int, typer.Option(callback=at_least_one, help="Tokens per forward pass.")] = 512,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")] = False,
    dtype: Dtype = "bf16",
    device: Device = "auto",
) -> None:
    """Record per-layer expert frequencies on your own text."""
    from ..offload.profile import FORMAT as PROFILE_FORMAT
    from ..offload.profile import record_profile, save_profile
    from ..offload.trace import FORMAT as TRACE_FORMAT
    from ..runtime import load

    if trace is not None and trace.resolve() == output.resolve():
        raise MarcoError("--trace and -o name the same file", hint="give the trace its own name", exit_code=2)
    check_replaceable(output, PROFILE_FORMAT, force)  # --force replaces an earlier profile or trace only
    check_replaceable(trace, TRACE_FORMAT, force)
    try:
        content = text.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MarcoError(f"{text} not found") from None
    except UnicodeDecodeError as e:
        raise MarcoError(f"{text} is not valid UTF-8 (byte {e.start})", hint="convert it with iconv") from e
    except OSError as e:  # a folder, no permission, ...
        raise MarcoError(f"cannot read {text}: {e.strerror}") from e
    with ui.progress("loading") as cb:
        lm = load(model, dtype=dtype, device=device, progress=cb)
    if not getattr(lm.model.config, "num_experts", 0):
        raise MarcoError(f"{model} is a dense model: it has no experts to profile")
    ids = lm.tokenizer.encode(content)
    if not ids:
        raise MarcoError(f"{text} is empty")
    with ui.progress("profiling") as cb:
        counts, recorded = record_profile(lm.model, ids, chunk=min(chunk, lm.context_length), progress=cb)
    save_profile(output, counts, model, lm.model.config, len(ids))
    if trace is not None:
        recorded.save(trace)
    ui.info(f"profiled {len(ids)} tokens over {len(counts)} MoE layers -> {output}")
