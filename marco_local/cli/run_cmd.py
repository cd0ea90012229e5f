"""`marco run`: answer one prompt (argument and/or piped stdin) and exit; only the answer goes to stdout.
With no prompt at all and a terminal on stdin it starts `marco chat` with the same options, as `ollama run` does."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..errors import MarcoError
from . import ui
from .options import (
    Ctx,
    Device,
    Dtype,
    ExpertMisses,
    ExpertPolicy,
    ExpertProfile,
    ExpertsResident,
    GpuMem,
    MaxTokens,
    MinP,
    ModelArg,
    Prefetch,
    RamMem,
    RepeatPenalty,
    Seed,
    Stop,
    Temperature,
    TopK,
    TopP,
    TraceFile,
    check_replaceable,
    typed,
)

EPILOG = (
    "Examples:\n\n  marco run demo 'Hello'\n\n  echo 'Translate to French: cat' | marco run nano\n\n"
    "  marco run nano   (no prompt, in a terminal: a chat, as marco chat nano)"
)


def read_stdin_prompt() -> str:
    """Piped input, decoded strictly: non-UTF-8 bytes are an error, not mojibake."""
    if sys.stdin is None or sys.stdin.isatty():
        return ""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MarcoError(f"standard input is not valid UTF-8 (byte {e.start})", hint="convert it with iconv") from e


def run(
    context: typer.Context,
    model: ModelArg,
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt; piped stdin comes first when both are given.")
    ] = None,
    max_tokens: MaxTokens = 512,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None,
    seed: Seed = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    stop: Stop = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Timings and memory on stderr.")] = False,
    dtype: Dtype = "bf16",
    device: Device = "auto",
    ctx: Ctx = 4096,
    ram_mem: RamMem = None,
    gpu_mem: GpuMem = None,
    experts_resident: ExpertsResident = None,
    profile: ExpertProfile = None,
    expert_policy: ExpertPolicy = "lru",
    prefetch: Prefetch = False,
    expert_misses: ExpertMisses = "auto",
    trace: TraceFile = None,
) -> None:
    """Answer one prompt and exit. Only the answer goes to stdout. Without a prompt, in a terminal: a chat."""
    from ..generate import UNTIL_FULL, PromptCache, stream_generate
    from ..layers.kv_cache import make_cache
    from ..offload import Placement, TraceRecorder, offload_stats
    from ..offload.trace import FORMAT as TRACE_FORMAT
    from ..runtime import load
    from ..sampling import make_logits_processors, make_sampler, new_seed

    check_replaceable(trace, TRACE_FORMAT)  # a trace replaces an earlier trace only
    if prompt is None and sys.stdin is not None and sys.stdin.isatty():
        # no prompt, typed in a terminal: a conversation, as `ollama run MODEL` starts one
        if raw or trace is not None:
            given = "--raw" if raw else "--trace"
            raise MarcoError(f"{given} needs a prompt", hint="pass one as an argument, or pipe it into marco run")
        from .chat_cmd import chat

        return chat(
            context,
            model,
            max_tokens=max_tokens if typed(context, "max_tokens") else 1024,  # chat's own default
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            seed=seed,
            system=system,
            stop=stop,
            verbose=verbose,
            dtype=dtype,
            device=device,
            ctx=ctx,
            ram_mem=ram_mem,
            gpu_mem=gpu_mem,
            experts_resident=experts_resident,
            profile=profile,
            expert_policy=expert_policy,
            prefetch=prefetch,
            expert_misses=expert_misses,
        )
    text = "\n".join(p for p in (read_stdin_prompt(), prompt) if p)
    if not text.strip():
        raise MarcoError("empty prompt", hint="pass a prompt argument or pipe text into marco run")
    with ui.progress("loading") as cb:
        placement = Placement(ram_mem, gpu_mem, experts_resident, profile, expert_policy, prefetch, ctx, expert_misses)
        lm = load(model, dtype=dtype, device=device, progress=cb, placement=placement)
    ui.loaded(lm, ctx if typed(context, "ctx") else None)
    if raw:
        prompt_text = text
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt_text = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    chosen = lm.sampling(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repeat_penalty
    )
    repetition_penalty = chosen.pop("repetition_penalty")
    seed = seed if seed is not None else new_seed()  # drawn here, so that -v can say it
    sampler = make_sampler(**chosen, seed=seed)
    ids = lm.tokenizer.encode(prompt_text)
    if len(ids) >= min(ctx, lm.context_length):
        raise MarcoError(
            f"the prompt is {len(ids)} tokens, the context window {min(ctx, lm.context_length)}",
            hint="shorten it or raise --ctx" if ctx < lm.context_length else "shorten it: that is the model's longest",
        )
    ctx = min(ctx, lm.context_length)
    cache = PromptCache(make_cache(lm.model, ctx if max_tokens == UNTIL_FULL else min(ctx, len(ids) + max_tokens)))
    last = None
    ended_with_newline = True
    recorder = TraceRecorder(lm.model) if trace else None
    for r in stream_generate(
        lm.model,
        lm.tokenizer,
        ids,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=make_logits_processors(repetition_penalty),
        stop_strings=stop or (),
        prompt_cache=cache,
        stats_fn=lambda: offload_stats(lm.model),
    ):
        if r.text:
            sys.stdout.write(r.text)
            sys.stdout.flush()
            ended_with_newline = r.text.endswith("\n")
        last = r
    if recorder is not None:
        recorder.close().save(trace)
    if not ended_with_newline:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose and last is not None:
        from ..layers.gguf import kernel_summary

        kernels = kernel_summary(lm.model)
        extra = f" · kernels: {kernels}" if kernels else ""
        seeded = f" · seed {seed}" if chosen["temperature"] > 0 else " · greedy"  # --seed N repeats a sampled run
        ui.info(ui.stats_line(last, moves=True) + f" · finish: {last.finish_reason}{seeded}{extra}")
