"""`marco chat`: an interactive conversation in the terminal, or one answer when stdin is not a terminal.

The command loads the model and builds the `marco_local.chat.ChatSession`; `chat_ui` (imported only here, on use) is
the terminal side: prompt, slash commands, streamed replies.
"""

from __future__ import annotations

import sys
from pathlib import Path
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
    input_file,
    typed,
)
from .run_cmd import read_stdin_prompt

EPILOG = (
    "Examples:\n\n"
    "  marco chat demo\n\n"
    "  marco chat nano --system 'Answer in French.' --temperature 0.3\n\n"
    "  marco chat nano --load trip.json\n\n"
    "  echo 'Summarise: ...' | marco chat nano   (no terminal: one answer on stdout, then exit)\n\n"
    'In the chat: /help lists the commands; """ starts and ends a multi-line message; Alt+Enter adds a newline; '
    "Ctrl+C stops a reply; Ctrl+D or /exit leaves."
)


def chat(
    context: typer.Context,
    model: ModelArg,
    max_tokens: MaxTokens = 1024,
    temperature: Temperature = None,
    top_p: TopP = None,
    top_k: TopK = None,
    min_p: MinP = None,
    repeat_penalty: RepeatPenalty = None,
    seed: Seed = None,
    system: Annotated[str | None, typer.Option(help="System prompt (also /system in the chat).")] = None,
    stop: Stop = None,
    plain: Annotated[bool, typer.Option("--plain", help="Print replies as raw text instead of markdown.")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Each reply's footer also gives its finish reason and seed.")
    ] = False,
    load_file: Annotated[
        Path | None, typer.Option("--load", callback=input_file, help="Continue a conversation saved with /save.")
    ] = None,
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
) -> None:
    """Chat with a model in the terminal. Without a terminal on stdin: answer the piped message and exit."""
    from ..chat import ChatSession, ChatSettings
    from ..offload import Placement, offload_stats
    from ..runtime import load
    from .chat_ui import ChatUI, PlainStream, seed_text

    interactive = sys.stdin is not None and sys.stdin.isatty()
    text = "" if interactive else read_stdin_prompt()
    if not interactive and not text.strip():
        raise MarcoError("no input on stdin", hint="run marco chat in a terminal, or pipe a message into it")
    placement = Placement(ram_mem, gpu_mem, experts_resident, profile, expert_policy, prefetch, ctx, expert_misses)
    with ui.progress("loading") as cb:
        lm = load(model, dtype=dtype, device=device, progress=cb, placement=placement)
    ui.loaded(lm, ctx if typed(context, "ctx") else None)
    chosen = lm.sampling(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repeat_penalty
    )
    settings = ChatSettings(
        temperature=chosen["temperature"],
        top_p=chosen["top_p"],
        top_k=chosen["top_k"],
        min_p=chosen["min_p"],
        max_tokens=max_tokens,
        seed=seed,
        repeat_penalty=chosen["repetition_penalty"],
    )
    session = ChatSession(
        lm.model,
        lm.tokenizer,
        settings,
        system=system,
        context_length=min(ctx, lm.context_length),
        stop_strings=tuple(stop or ()),
        stats_fn=lambda: offload_stats(lm.model),
    )
    if load_file is not None:
        session.load(load_file)
        if system:
            session.set_system(system)
        # what was typed on the command line wins over the saved settings
        given = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty)
        given |= dict(seed=seed, max_tokens=max_tokens if typed(context, "max_tokens") else None)
        for name, value in given.items():
            if value is not None:
                setattr(session.settings, name, value)
    if not interactive:  # like marco run: the answer alone on stdout
        out = PlainStream()
        reply = session.send(text)
        for r in reply:
            out.add(r.text)
        out.finish()
        if verbose and reply.response is not None:
            ui.info(ui.stats_line(reply.response) + f" · finish: {reply.response.finish_reason} · {seed_text(reply)}")
        return
    ChatUI(session, lm=lm, model_name=model, plain=plain, verbose=verbose).run()
