"""`marco chat` transcripts: prompt_toolkit pipe input for the interactive loop, CliRunner and a subprocess for
the non-terminal path (only the answer on stdout, no escape codes anywhere)."""

from __future__ import annotations

import functools
import io
import os
import re
import subprocess
import sys

import pytest
import torch
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from rich.markdown import Markdown
from typer.testing import CliRunner

from marco_local.chat import ChatSession, ChatSettings
from marco_local.cli.chat_ui import ChatUI, MarkdownStream, SlashCompleter, data_dir, make_prompt_session, printable
from marco_local.cli.main import app
from marco_local.runtime import load

ENV = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("MARCO_DEBUG", None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast, and it does not collapse when other work shares the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def lm():
    return load("demo", dtype="f32", device="cpu")


def run_transcript(lm, keys: str, session: ChatSession | None = None) -> ChatUI:
    """Type `keys` into a chat on the demo model (Enter is \\r, Ctrl+D is \\x04) until it leaves."""
    session = session or ChatSession(lm.model, lm.tokenizer, ChatSettings(temperature=0.0, max_tokens=8), None, 512)
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        chat = ChatUI(
            session,
            lm=lm,
            model_name="demo",
            plain=True,
            prompt_session=make_prompt_session(InMemoryHistory(), input=pipe, output=DummyOutput()),
        )
        chat.run()
    return chat


def test_slash_commands_settings_save_load_and_unknown_command(lm, tmp_path, capsys):
    saved = tmp_path / "conv.json"
    keys = (
        "/help\r"
        "/set temperature 0\r"
        "/set top_k 5\r"
        "/set max_tokens 6\r"
        "/set top_k lots\r"
        "/set seed -1\r"
        "/system off\r"
        "/frobnicate now\r"
        "hello\r"
        "/system Be brief.\r"
        f"/save {saved}\r"
        f"/save {saved}\r"
        "/clear\r"
        "/stats\r"
        f"/load {saved}\r"
        "/show\r"
        "/regen\r"
        "/stats\r"
        "/bye\r"
        "never sent\r"
    )
    chat = run_transcript(lm, keys)
    out, err = capsys.readouterr()
    s = chat.session
    assert (s.settings.temperature, s.settings.top_k, s.settings.max_tokens) == (0.0, 5, 6)
    assert "top_k needs an integer" in err and "Set seed to random." in err and "No system prompt to remove." in err
    assert "Error: unknown command /frobnicate" in err and "Hint: type /help" in err
    assert "/regen" in err and "/save FILE" in err  # the help text
    assert "Saved 2 messages" in err and "already exists" in err
    assert "New conversation." in err and "0 turn(s), 0 of 512 context tokens in use" in err  # not the cached ones
    assert "Loaded 2 messages" in err
    assert "temperature     0.0" in err and "Model      demo" in err  # /show
    from marco_local.offload.memory import param_counts

    assert f"Weights    {param_counts(lm.model.config).total / 1e6:,.1f}M parameters, " in err
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[0]["content"] == "hello"
    assert s.system == "Be brief."
    assert all(m["content"] != "never sent" and "frobnicate" not in m["content"] for m in s.messages)
    assert err.count("prompt ") >= 3  # a stats footer after each of the two replies, and /stats
    assert "Error" not in out and "prompt " not in out  # stdout carries replies only
    assert out.strip()


def test_stats_of_an_offloaded_model_count_its_experts(capsys):
    """/stats on a model with a quarter of its experts resident: the cache's hits, misses and what they cost."""
    from marco_local.offload import Placement, offload_stats

    offloaded = load("demo", dtype="f32", device="cpu", placement=Placement(experts_resident="25%"))
    settings = ChatSettings(temperature=0.0, max_tokens=8)
    stats = functools.partial(offload_stats, offloaded.model)  # as `marco chat` wires it
    session = ChatSession(offloaded.model, offloaded.tokenizer, settings, None, 512, stats_fn=stats)
    run_transcript(offloaded, "hello\r/stats\r/bye\r", session)
    err = capsys.readouterr().err
    assert "experts: 16 of 64 resident, " in err and " misses, " in err and " moved, stalled " in err


def test_the_footer_says_when_the_token_limit_cut_a_reply(lm, capsys):
    settings = ChatSettings(temperature=0.0, max_tokens=3)
    session = ChatSession(lm.model, lm.tokenizer, settings, None, 512)
    run_transcript(lm, "hello\r/bye\r", session)
    err = capsys.readouterr().err
    assert session.last_reply.response.finish_reason == "length"  # the random demo model says no end in 3 tokens
    footer = next(line for line in err.splitlines() if "decode 3 tok" in line)
    assert footer.endswith(" · cut at max_tokens 3 (/set max_tokens N for longer replies)"), footer
    session = ChatSession(lm.model, lm.tokenizer, ChatSettings(temperature=0.0, max_tokens=-1), None, 48)
    run_transcript(lm, "hello\r/bye\r", session)
    err = capsys.readouterr().err
    assert session.last_reply.response.finish_reason == "length"
    assert "decode " in err and " · cut: the context window (48 tokens) is full" in err, err


def test_verbose_footer_and_stats_say_the_seed_that_repeats_a_session(lm, capsys):
    """A session given no seed draws one; -v's footers and /stats say it, and --seed N repeats the replies."""

    def chat(seed):
        settings = ChatSettings(temperature=1.5, max_tokens=6, seed=seed)
        session = ChatSession(lm.model, lm.tokenizer, settings, None, 512)
        with create_pipe_input() as pipe:
            pipe.send_text("hello\rand more\r/stats\r/bye\r")
            prompt = make_prompt_session(InMemoryHistory(), input=pipe, output=DummyOutput())
            ChatUI(session, lm=lm, model_name="demo", plain=True, prompt_session=prompt, verbose=True).run()
        return session, capsys.readouterr().err

    first, err = chat(None)
    seeds = re.findall(r" · seed (\d+)", err)
    assert len(seeds) == 3 and len(set(seeds)) == 1, err  # two footers and /stats, one seed for the session
    assert "finish: " in err
    again, err = chat(int(seeds[0]))
    assert [m["content"] for m in again.messages] == [m["content"] for m in first.messages]
    assert f" · seed {seeds[0]}" in err


def test_set_and_show_say_unset_values_in_words(lm, capsys):
    """An unset seed or repeat penalty is "random" and "off" in /set, /set alone and /show, never Python's None."""
    run_transcript(lm, "/set seed random\r/set repeat_penalty off\r/set max_tokens -1\r/set\r/show\r/bye\r")
    err = capsys.readouterr().err
    assert "None" not in err, err
    assert "Set seed to random." in err and "Set repeat_penalty to off." in err
    assert err.count("seed            random") == 2 and err.count("repeat_penalty  off") == 2  # /set alone, /show
    assert err.count("max_tokens      -1 (until the context is full)") == 2


def test_show_says_when_the_chat_template_supplies_a_system_prompt(lm, capsys):
    """SmolLM2's template adds "You are a helpful AI assistant named SmolLM..." when no system prompt is given: /show
    says so rather than "(none)"; the demo's template adds none."""
    from gguf_fixtures import smollm2_path

    smol = load(str(smollm2_path()), dtype="f32", device="cpu")
    session = ChatSession(smol.model, smol.tokenizer, ChatSettings(temperature=0.0, max_tokens=4), None, 512)
    assert session.template_system() == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    run_transcript(smol, "/show\r/system\r/system Be brief.\r/show\r/bye\r", session)
    err = capsys.readouterr().err
    assert "No system prompt given; the chat template adds: You are a helpful AI assistant named SmolLM" in err
    assert "System     (none given; the chat template adds: You are a helpful AI assistant named SmolLM" in err
    assert "System     Be brief." in err
    demo = ChatSession(lm.model, lm.tokenizer, ChatSettings(temperature=0.0, max_tokens=4), None, 512)
    assert demo.template_system() is None
    run_transcript(lm, "/show\r/bye\r", demo)
    assert "System     (none)" in capsys.readouterr().err


def test_multiline_block_alt_enter_and_escaped_slash(lm, capsys):
    keys = '"""\rline one\r\rline two\r"""\rfirst\x1b\rsecond\r//etc/hosts is a file\r"""/help\rme"""\r\x04'
    chat = run_transcript(lm, keys)
    users = [m["content"] for m in chat.session.messages if m["role"] == "user"]
    assert users == ["line one\n\nline two", "first\nsecond", "/etc/hosts is a file", "/help\nme"]


def test_ctrl_c_clears_a_line_and_twice_at_an_empty_prompt_leaves(lm, capsys):
    chat = run_transcript(lm, "typed but abandoned\x03\x03\x03")
    _, err = capsys.readouterr()
    assert chat.session.messages == []
    assert err.count("press Ctrl+C again or Ctrl+D to leave") == 1


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (KeyboardInterrupt(), "interrupted: the partial reply stays in the conversation"),
        (RuntimeError("something broke"), "Error: unexpected RuntimeError: something broke (the conversation is kept)"),
    ],
)
def test_a_reply_stopped_by_ctrl_c_or_an_error_stays_and_the_chat_goes_on(lm, capsys, monkeypatch, raised, said):
    """Ctrl-C, or an exception nobody expected (here from the model), during a reply: the partial reply stays in the
    conversation, marked interrupted, and the chat goes on (an error used to end it and lose the conversation)."""
    monkeypatch.delenv("MARCO_DEBUG", raising=False)
    s = ChatSession(lm.model, lm.tokenizer, ChatSettings(temperature=0.0, max_tokens=50), None, 512)
    chat = ChatUI(s, lm=lm, model_name="demo", plain=True, prompt_session=object())
    calls = []

    def stop_on_the_fifth_forward(module, args):
        calls.append(1)
        if len(calls) == 5:
            raise raised

    handle = lm.model.register_forward_pre_hook(stop_on_the_fifth_forward)
    try:
        chat.handle("tell me everything")
    finally:
        handle.remove()
    out, err = capsys.readouterr()
    assert said in err
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[-1]["interrupted"] is True
    assert s.messages[-1]["content"] and s.messages[-1]["content"] in out
    chat.handle("and then?")
    assert len(s.messages) == 4 and s.messages[-1].get("interrupted") is None


def test_options_typed_on_the_command_line_win_over_a_loaded_conversation(lm, tmp_path):
    saved = tmp_path / "conv.json"
    s = ChatSession(lm.model, lm.tokenizer, ChatSettings(temperature=0.0, max_tokens=3000, top_k=7), None, 512)
    s.save(saved)
    runner = CliRunner()
    r = runner.invoke(app, ["chat", "demo", "--load", str(saved), "-n", "3", "--temperature", "0"], input="hi")
    assert r.exit_code == 0, r.output
    assert 0 < len(r.stdout.strip()) < 100, r.stdout  # three tokens (-n 3), not the saved 3000


def test_markdown_stream_commits_blocks_outside_code_fences():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=60, color_system=None)
    stream = MarkdownStream(console)
    text = "# Title\n\nSome **bold** text.\n\n```python\nx = 1\n\ny = 2\n```\n\n- one\n- two\n"
    for i in range(0, len(text), 3):
        stream.add(text[i : i + 3])
    stream.finish()
    shown = buf.getvalue()
    assert "Title" in shown and "bold" in shown and "**" not in shown and "```" not in shown
    assert "x = 1" in shown and "y = 2" in shown and "• one" in shown


def test_markdown_stream_keeps_tilde_fences_and_longer_fences_whole():
    """A blank line inside ~~~ (or inside a ```` fence holding ```) is code, not the end of a block: cut there, the
    rest lost its indentation and code style."""
    text = "~~~python\ndef f():\n\n    return 1\n~~~\n\n````md\n```\n\n    inner\n```\n````\n\nafter\n"
    whole = io.StringIO()
    Console(file=whole, width=60, color_system=None).print(Markdown(text))
    buf = io.StringIO()
    stream = MarkdownStream(Console(file=buf, force_terminal=True, width=60, color_system=None))
    for i in range(0, len(text), 2):
        stream.add(text[i : i + 2])
    stream.finish()
    streamed = {line.rstrip() for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", buf.getvalue()).splitlines()}
    for code in ("return 1", "inner"):  # indented as code, as the whole text renders it
        line = next(line.rstrip() for line in whole.getvalue().splitlines() if code in line)
        assert line.startswith("     ") and line in streamed, (line, streamed)
    assert "~~~" not in buf.getvalue() and "after" in streamed


def test_markdown_stream_keeps_the_models_line_breaks():
    """A four-line poem shows as four lines, as in --plain and /save (markdown alone joins them into one paragraph);
    lists, headers and code still render as markdown."""
    poem = "Roses are red,\nViolets are blue,\n**Sugar** is sweet,\nAnd so are you."
    text = f"{poem}\n\n# Title\n- one\n- two\n\n```\nx = 1\n```\n"
    buf = io.StringIO()
    stream = MarkdownStream(Console(file=buf, force_terminal=True, width=60, color_system=None))
    for i in range(0, len(text), 3):
        stream.add(text[i : i + 3])
    stream.finish()
    shown = [line.strip() for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", buf.getvalue()).splitlines()]
    assert shown[:4] == ["Roses are red,", "Violets are blue,", "Sugar is sweet,", "And so are you."], shown
    assert "Title" in shown and "• one" in shown and "• two" in shown and "x = 1" in shown and "```" not in shown


def test_helpers():
    assert printable("a\x1b[31mb\x07c\r\n\td") == "a[31mbc\n\td"
    completions = lambda text: [  # noqa: E731
        c.text for c in SlashCompleter().get_completions(type("D", (), {"text_before_cursor": text})(), None)
    ]
    assert completions("/s") == ["/system", "/set", "/show", "/stats", "/save"]
    assert completions("/set te") == ["temperature"]
    assert completions("hello /s") == []


def test_data_dir_honours_marco_home_and_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("MARCO_HOME", str(tmp_path / "mh"))
    assert data_dir() == tmp_path / "mh"
    monkeypatch.delenv("MARCO_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "marco-local"


def test_cli_runner_piped_message_and_help():
    runner = CliRunner()
    r = runner.invoke(app, ["chat", "demo", "-n", "12", "--temperature", "0"], input="hi")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and "\x1b" not in r.stdout and ">>>" not in r.stdout
    r = runner.invoke(app, ["chat", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Examples" in r.stdout and "marco chat demo" in r.stdout


def test_piped_stdin_prints_the_answer_alone_with_no_escape_codes():
    cmd = [sys.executable, "-m", "marco_local", "chat", "demo", "-n", "40"]
    env = {k: v for k, v in ENV.items() if k != "NO_COLOR"}  # even with colours allowed: not a terminal
    r = subprocess.run(cmd, input=b"hi", capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""
    assert r.stdout.strip() and r.stdout.endswith(b"\n")
    assert b"\x1b" not in r.stdout and b">>>" not in r.stdout and b"prompt " not in r.stdout
    r = subprocess.run(cmd, input=b"", capture_output=True, env=ENV, timeout=120)
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode().startswith("Error: no input on stdin") and b"\x1b" not in r.stderr


def test_a_missing_conversation_file_is_said_before_the_model_loads(monkeypatch, marco_main, tmp_path):
    from marco_local import runtime

    def never(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runtime, "load", never)
    for path, said in [(tmp_path / "nothere.json", "does not exist"), (tmp_path, "is a folder")]:
        code, err = marco_main("chat", "demo", "--load", str(path))
        assert code == 2 and said in err[0], err
