"""The terminal side of `marco chat`: prompt, slash commands, streamed replies.

A prompt_toolkit prompt (persistent history, `\"\"\"` blocks, Alt+Enter newline, bracketed paste, Tab completion of
slash commands), replies streamed to stdout (markdown through a rich Live region by default, raw with --plain or when
stdout is not a terminal), and a stats line on stderr after each reply. Slash commands never reach the model. Ctrl+C
stops a reply, not the session; Ctrl+D or /exit leaves. Only `marco chat` imports this module: prompt_toolkit and
rich's markdown cost 9 MiB of RSS and ~60 ms that `marco run` and `marco bench` need not pay.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.application import get_app
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.output import create_output
from prompt_toolkit.styles import Style
from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment

from ..errors import MarcoError
from ..generate import UNTIL_FULL
from . import ui

COMMANDS = {
    "/help": "show this help",
    "/clear": "start a new conversation (keeps the system prompt and settings)",
    "/system": "/system TEXT sets the system prompt; /system alone shows it; /system off removes it",
    "/set": "/set NAME VALUE: temperature, top_p, top_k, min_p, max_tokens, seed, repeat_penalty",
    "/show": "model, settings and memory placement",
    "/stats": "speed and memory of the last reply, context use",
    "/regen": "regenerate the last reply",
    "/save": "/save FILE [--force]: write the conversation as JSON",
    "/load": "/load FILE: continue a saved conversation",
    "/exit": "leave (also /bye, Ctrl+D)",
    "/bye": "leave",
}
SETTINGS = ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "repeat_penalty")
MULTILINE = '"""'
# Control characters a (random or confused) model may emit, other than tab and newline: printing ESC, CR or BEL
# would let model output drive the terminal. The conversation keeps them; only the display drops them.
_CONTROL = dict.fromkeys([*range(0x09), *range(0x0B, 0x20), 0x7F, *range(0x80, 0xA0)])


def printable(text: str) -> str:
    return text.translate(_CONTROL)


def data_dir() -> Path:
    """Where user data lives: $MARCO_HOME, else $XDG_DATA_HOME/marco-local, else ~/.local/share/marco-local."""
    if os.environ.get("MARCO_HOME"):
        return Path(os.environ["MARCO_HOME"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "marco-local"


def open_history() -> History:
    path = data_dir() / "history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
    except OSError as e:
        ui.warn(f"cannot write the chat history at {path} ({e.strerror}); history is kept for this session only")
        return InMemoryHistory()
    return FileHistory(str(path))


class SlashCompleter(Completer):
    """Tab completes slash commands, and setting names after /set; ordinary text gets no suggestions."""

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        parts = text.split(" ")
        if len(parts) == 1:
            for name, help_text in COMMANDS.items():
                if name.startswith(text):
                    yield Completion(name, start_position=-len(text), display_meta=help_text.split(":")[0])
        elif len(parts) == 2 and parts[0] == "/set":
            for name in SETTINGS:
                if name.startswith(parts[1]):
                    yield Completion(name, start_position=-len(parts[1]))


def _block_open(text: str) -> bool:
    """True while a \"\"\" block has been opened and not yet closed, so Enter adds a line instead of sending."""
    t = text.strip()
    return t.startswith(MULTILINE) and (len(t) < 2 * len(MULTILINE) or not t.endswith(MULTILINE))


def unwrap_block(text: str) -> str:
    t = text.strip()
    if t.startswith(MULTILINE):
        t = t[len(MULTILINE) :]
        if t.endswith(MULTILINE):
            t = t[: -len(MULTILINE)]
        t = t.strip("\n")
    return t


def key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    def _enter(event) -> None:
        b = event.current_buffer
        if b.complete_state and b.complete_state.current_completion:
            b.apply_completion(b.complete_state.current_completion)
        elif _block_open(b.text):
            b.insert_text("\n")
        else:
            b.validate_and_handle()

    @kb.add("escape", "enter")  # Alt+Enter (terminals send Escape then Enter)
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    @kb.add("c-c")
    def _interrupt(event) -> None:
        # Ctrl+C on a typed line clears it; on an empty prompt it is the first step towards leaving.
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    return kb


def make_prompt_session(history: History | None = None, input=None, output=None) -> PromptSession:
    return PromptSession(
        history=history or InMemoryHistory(),
        multiline=True,
        key_bindings=key_bindings(),
        completer=SlashCompleter(),
        complete_while_typing=False,
        prompt_continuation=lambda width, line, wrap: "... ".rjust(width),
        # Shown only while editing: a finished prompt line in the scrollback should not keep the hint.
        placeholder=lambda: [] if get_app().is_done else [("class:placeholder", "Send a message (/help for commands)")],
        style=Style.from_dict({"placeholder": "#808080"}),
        enable_history_search=False,
        input=input,
        output=output,
    )


class _Lines:
    """Already rendered lines, printed as they are."""

    def __init__(self, lines: list[list[Segment]]) -> None:
        self.lines = lines

    def __rich_console__(self, console, options):
        for line in self.lines:
            yield from line
            yield Segment.line()


class KeptBreaksMarkdown(Markdown):
    """rich's Markdown with the model's line breaks kept: a single newline inside a paragraph is a line break, not a
    space (markdown-it's `breaks` option, as GitHub comments and Ollama show a reply), so a poem keeps its lines.
    Block syntax (lists, headers, code fences, tables) is parsed as before; only the soft breaks change."""

    def __init__(self, markup: str, **kwargs) -> None:
        super().__init__(markup, **kwargs)
        for token in self.parsed:
            for child in token.children or ():
                if child.type == "softbreak":
                    child.type = "hardbreak"


def _markdown_lines(console: Console, text: str, width: int, gap: bool) -> list[list[Segment]]:
    """`text` as markdown lines without rich's blank lines at either end (a list starts with one); `gap` puts one
    blank line on top, the separation between two blocks."""
    lines = console.render_lines(KeptBreaksMarkdown(text), console.options.update_width(width), pad=False)

    def blank(line: list[Segment]) -> bool:
        return not "".join(s.text for s in line).strip()

    while lines and blank(lines[0]):
        lines.pop(0)
    while lines and blank(lines[-1]):
        lines.pop()
    return [[], *lines] if gap and lines else lines


class _Tail:
    """Markdown of the streaming block, cropped to its last lines so a Live region never outgrows the screen.

    Taller-than-screen Live regions cannot be redrawn in place and leave copies in the scrollback.
    """

    def __init__(self, stream: MarkdownStream) -> None:
        self.stream = stream

    def __rich_console__(self, console, options):
        # two spare columns: where rich and the terminal disagree on a character's width (combining marks, some
        # emoji), a line that the terminal wraps would throw off the cursor moves that redraw the region
        width = max(10, options.max_width - 2)
        lines = _markdown_lines(console, self.stream.pending, width, self.stream.blocks > 0)
        yield _Lines(lines[-max(1, console.size.height - 2) :])


class MarkdownStream:
    """Renders a reply as markdown while it streams: finished blocks are printed for good, the last one stays live.

    A block ends at a blank line outside a code fence, so re-rendering costs one block, not the whole reply.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.pending = ""
        self.blocks = 0  # blocks printed for good so far
        self.live = Live(_Tail(self), console=console, refresh_per_second=8, transient=True)
        self.live.start()

    def add(self, text: str) -> None:
        self.pending += printable(text)
        cut = self._last_block_end()
        if cut > 0:
            done, self.pending = self.pending[:cut], self.pending[cut:].lstrip("\n")
            self._print(done)

    def _print(self, text: str) -> None:
        lines = _markdown_lines(self.console, text, self.console.width, self.blocks > 0)
        if lines:
            self.live.console.print(_Lines(lines))
            self.blocks += 1

    def _last_block_end(self) -> int:
        """Where the last complete block ends: after a blank line outside a code fence (``` or ~~~, closed by a run
        of the same character at least as long, as CommonMark has it)."""
        end, fence, pos = -1, "", 0
        for line in self.pending.splitlines(keepends=True):
            mark = re.match(r"(`{3,}|~{3,})", line.lstrip())
            if mark and not fence:
                fence = mark.group(1)
            elif mark and mark.group(1)[0] == fence[0] and len(mark.group(1)) >= len(fence) and not line.strip(" \n`~"):
                fence = ""
            pos += len(line)
            if line.strip() == "" and not fence and pos < len(self.pending):
                end = pos
        return end

    def finish(self) -> None:
        self.live.stop()
        if self.pending.strip():
            self._print(self.pending)


class PlainStream:
    """Raw text, written as it comes."""

    def __init__(self) -> None:
        self.last = "\n"

    def add(self, text: str) -> None:
        text = printable(text)
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.last = text

    def finish(self) -> None:
        if not self.last.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()


@contextmanager
def typeahead_hidden() -> Iterator[None]:
    """While a reply streams, keys typed ahead are not echoed: an echoed line would move the cursor under the live
    region and leave stale copies of it. The keys stay in the terminal's input queue for the next prompt."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, AttributeError, OSError, ValueError):  # not a terminal (pipes, tests): nothing to hide
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag; ISIG stays on, so Ctrl+C still interrupts the reply
    termios.tcsetattr(fd, termios.TCSANOW, quiet)  # TCSANOW: keep what was typed
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def setting_text(name: str, value) -> str:
    """A setting's value in words: what an unset seed or repeat penalty means, not Python's None."""
    if value is None:
        return {"seed": "random", "repeat_penalty": "off"}.get(name, "default")
    if name == "max_tokens" and value == UNTIL_FULL:
        return f"{value} (until the context is full)"
    return str(value)


def seed_text(reply) -> str:
    """The seed that repeats a sampled reply's session (`--seed N`), or that none is needed."""
    return "greedy" if reply.seed is None else f"seed {reply.seed}"


class ChatUI:
    """The interactive loop: read a line, run a slash command or send it, stream the reply."""

    def __init__(
        self, session, lm=None, model_name: str = "", plain: bool = False, prompt_session=None, verbose: bool = False
    ) -> None:
        self.session = session
        self.verbose = verbose  # each footer also says how the reply ended and the seed that repeats it
        self.lm = lm
        self.model_name = model_name
        self.plain = plain or not sys.stdout.isatty()
        self.out = Console(highlight=False, no_color=bool(os.environ.get("NO_COLOR")) or None)
        # With stdout redirected, the prompt and its editing go to the terminal on stderr, never into the answer
        output = None if sys.stdout.isatty() or not sys.stderr.isatty() else create_output(stdout=sys.stderr)
        self.prompt = prompt_session or make_prompt_session(open_history(), output=output)
        self.leave = False

    def run(self) -> None:
        ui.info(f"Chatting with {self.model_name}. /help for commands, Ctrl+D or /exit to leave.")
        armed = False  # Ctrl+C at an empty prompt once: the next one leaves
        while not self.leave:
            try:
                line = self.prompt.prompt(">>> ")
            except KeyboardInterrupt:
                if armed:
                    break
                ui.info("(press Ctrl+C again or Ctrl+D to leave)")
                armed = True
                continue
            except EOFError:
                break
            armed = False
            self.handle(line)

    def handle(self, line: str) -> None:
        """One input: a slash command, or a message for the model. User errors are reported, not raised."""
        block = line.strip().startswith(MULTILINE)  # a """ block is always a message, whatever it starts with
        text = unwrap_block(line)
        if not text.strip():
            return
        try:
            if text.startswith("//") and not block:  # an escaped slash: the message itself starts with "/"
                self.reply(self.session.send(text[1:]))
            elif text.startswith("/") and not block:
                self.command(text)
            else:
                self.reply(self.session.send(text))
        except MarcoError as e:
            ui.error(e.message, e.hint)
        except KeyboardInterrupt:  # during a command or before the reply started: back to the prompt
            ui.console.print("[dim]⏹ interrupted[/]")
        except Exception as e:  # a bug, or the GPU out of memory: said in one line; the conversation goes on
            if os.environ.get("MARCO_DEBUG") == "1":
                raise
            ui.unexpected(e, kept=" (the conversation is kept)")

    def command(self, text: str) -> None:
        name, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/exit", "/bye", "/quit"):
            self.leave = True
        elif name in ("/help", "/?"):
            width = max(map(len, COMMANDS))
            for cmd, help_text in COMMANDS.items():
                ui.info(f"  {cmd.ljust(width)}  {help_text}")
            ui.info(
                f"  {MULTILINE}".ljust(width + 2) + "  start and end a multi-line message; Alt+Enter adds a newline"
            )
            ui.info("  //text".ljust(width + 2) + "  send a message that starts with /")
        elif name == "/clear":
            s.clear()
            ui.info("New conversation.")
        elif name == "/system":
            if not arg:
                default = None if s.system else s.template_system()
                said = f"No system prompt given; the chat template adds: {default}" if default else "No system prompt."
                ui.info(f"System prompt: {s.system}" if s.system else said)
            else:
                had = s.system
                s.set_system(None if arg == "off" else arg)
                if arg != "off":
                    ui.info("System prompt set.")
                else:
                    ui.info("System prompt removed." if had else "No system prompt to remove.")
        elif name == "/set":
            parts = arg.split()
            if not parts:
                self.show_settings()
            elif len(parts) != 2:
                raise MarcoError("usage: /set NAME VALUE", hint=f"names: {', '.join(SETTINGS)}")
            else:
                s.set(parts[0], parts[1])
                ui.info(f"Set {parts[0]} to {setting_text(parts[0], getattr(s.settings, parts[0]))}.")
        elif name == "/show":
            self.show()
        elif name == "/stats":
            self.stats()
        elif name == "/regen":
            self.reply(s.regenerate())
        elif name in ("/save", "/load"):
            try:
                words = shlex.split(arg)
            except ValueError as e:
                raise MarcoError(f"{name}: {e}") from None
            force = "--force" in words
            paths = [w for w in words if w != "--force"]
            if len(paths) != 1:
                raise MarcoError(f"usage: {name} FILE" + (" [--force]" if name == "/save" else ""))
            if name == "/save":
                path = s.save(paths[0], model_name=self.model_name, force=force)
                ui.info(f"Saved {len(s.messages)} messages to {path}.")
            else:
                data = s.load(paths[0])
                ui.info(f"Loaded {len(s.messages)} messages from {paths[0]}.")
                if data.get("model") and data["model"] != self.model_name:
                    ui.warn(f"the conversation was saved with model {data['model']}, this is {self.model_name}")
        else:
            raise MarcoError(f"unknown command {name}", hint="type /help for the commands; start with // to send /")

    def reply(self, reply) -> None:
        if reply.dropped:
            ui.warn(
                f"the conversation outgrew the context window ({self.session.context_length} tokens): dropped the "
                f"oldest {reply.dropped} turn(s), kept the system prompt"
            )
        with typeahead_hidden():
            stream = PlainStream() if self.plain else MarkdownStream(self.out)
            try:
                for r in reply:
                    stream.add(r.text)
            except KeyboardInterrupt:
                reply.close()
                stream.finish()
                if reply.text:
                    ui.console.print("[dim]⏹ interrupted: the partial reply stays in the conversation[/]")
                else:
                    ui.console.print("[dim]⏹ interrupted before the reply started[/]")
            except Exception:  # `handle` reports it; the partial reply stays, marked interrupted
                reply.close()
                stream.finish()
                raise
            else:
                stream.finish()
        if reply.response is not None:
            footer = ui.stats_line(reply.response) + self.cut_note(reply.response)
            if self.verbose:
                footer += f" · finish: {reply.response.finish_reason or 'interrupted'} · {seed_text(reply)}"
            ui.console.print(footer, style="dim", markup=False, highlight=False, soft_wrap=True)

    def cut_note(self, r) -> str:
        """Where a reply ended at a limit, not at the model's own end: say which limit, and how to lift it."""
        if r.finish_reason != "length":
            return ""
        wanted = self.session.settings.max_tokens
        if wanted != UNTIL_FULL and r.generation_tokens >= wanted:
            return f" · cut at max_tokens {wanted} (/set max_tokens N for longer replies)"
        return f" · cut: the context window ({self.session.context_length} tokens) is full"

    def show_settings(self) -> None:
        for name in SETTINGS:
            ui.info(f"  {name:<15} {setting_text(name, getattr(self.session.settings, name))}")

    def show(self) -> None:
        s = self.session
        ui.info(f"Model      {self.model_name}")
        if self.lm is not None:
            from ..offload import fast_memory
            from ..offload.memory import param_counts
            from ..offload.store import tensor_bytes

            p = next(self.lm.model.parameters())
            # from the config and from every tensor kept: a GGUF's weights are quantized blocks in buffers
            n, nbytes = param_counts(self.lm.model.config).total, tensor_bytes(self.lm.model)
            ui.info(f"Path       {self.lm.source.path} ({self.lm.source.format})")
            where = f"{self.lm.device}, computing in {str(p.dtype).removeprefix('torch.')}"
            fast = fast_memory(self.lm.model)
            if fast is not None:
                ui.info(
                    f"Placement  non-expert weights on {where}; {fast.experts_per_layer} experts per layer in fast "
                    f"memory ({ui.human_bytes(fast.nbytes)}), the rest offloaded"
                )
            else:
                ui.info(f"Placement  all weights on {where}")
            ui.info(f"Weights    {n / 1e6:,.1f}M parameters, {ui.human_bytes(nbytes)} in memory")
        kv = s.prompt_cache.cache
        ui.info(f"Context    {s.context_tokens} of {s.context_length} tokens (KV cache {ui.human_bytes(kv.nbytes)})")
        default = None if s.system else s.template_system()
        none = f"(none given; the chat template adds: {default})" if default else "(none)"
        ui.info(f"System     {s.system or none}")
        ui.info("Settings")
        self.show_settings()

    def stats(self) -> None:
        s = self.session
        turns = sum(m["role"] == "user" for m in s.messages)
        ui.info(f"{turns} turn(s), {s.context_tokens} of {s.context_length} context tokens in use")
        last = s.last_reply
        if last is None or last.response is None:
            ui.info("No reply yet.")
            return
        finish = last.response.finish_reason or "interrupted"
        ui.info(ui.stats_line(last.response) + f" · finish: {finish} · {seed_text(last)}")
        st = last.response.stats
        if st is not None and st.experts:
            ui.info(
                f"experts: {st.resident} of {st.experts} resident, "
                f"{st.hits} hits / {st.misses} misses, {ui.expert_traffic(st)}"
            )
