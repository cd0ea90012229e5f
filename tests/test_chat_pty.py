"""`marco chat` in a real terminal (tmux): streamed reply, stats footer, Ctrl+C stops a reply not the chat, /exit.

The demo model is copied with its end-of-turn token made unreachable (a plain template and an eos id outside the
vocabulary), so a reply runs until max_tokens and there is always something long enough to interrupt.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marco_local.demo import ensure_demo_model

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")

ENDLESS_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def endless_demo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("endless") / "demo"
    shutil.copytree(ensure_demo_model(), folder)
    # no end-of-sequence token at all: nothing ends a reply but max_tokens or Ctrl+C (an id past the vocabulary, the
    # old way to say so, is now refused as a damaged file)
    for name, update in (
        ("config.json", {"eos_token_id": None}),
        ("generation_config.json", {"eos_token_id": []}),
        ("tokenizer_config.json", {"eos_token": None, "chat_template": ENDLESS_TEMPLATE}),
    ):
        data = json.loads((folder / name).read_text())
        data.update(update)
        (folder / name).write_text(json.dumps(data))
    return folder


class Terminal:
    """A command running in a private tmux server (its own socket, one per terminal: a server killed by the previous
    terminal may still hold the socket's name for a moment), 100x30."""

    opened = itertools.count()

    def __init__(self, command: str) -> None:
        self.tmux = [TMUX, "-L", f"marco-test-{os.getpid()}-{next(Terminal.opened)}", "-f", "/dev/null"]
        subprocess.run([*self.tmux, "new-session", "-d", "-s", "t", "-x", "100", "-y", "30", command], check=True)

    def send(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "t", *keys], check=True)

    def type(self, text: str) -> None:
        self.send("-l", text)  # literally, then Enter separately
        self.send("Enter")

    def screen(self, history: bool = False) -> str:
        args = ["-S", "-"] if history else []
        return subprocess.run(
            [*self.tmux, "capture-pane", "-p", "-t", "t", *args], capture_output=True, text=True, check=True
        ).stdout

    def wait_for(self, predicate, timeout: float = 30.0, history: bool = True) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen(history)
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; the terminal shows:\n{self.screen()}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def test_chat_in_a_real_terminal(endless_demo, tmp_path):
    # one torch thread: on a busy 2-core machine two spinning OpenMP threads make the tiny model crawl
    env = f"MARCO_HOME={tmp_path} TERM=xterm-256color OMP_NUM_THREADS=1"
    # `cd` first: `python -m marco_local` must import this checkout; the trailing sleep keeps the exit code visible
    command = (
        f"cd {Path(__file__).parent.parent} && env {env} {sys.executable} -m marco_local chat {endless_demo} "
        f"--temperature 0 -n 30; echo EXIT=$?; sleep 60"
    )
    term = Terminal(command)
    try:
        term.wait_for(lambda s: ">>> " in s, timeout=60)
        term.type("Hello there")
        first = term.wait_for(lambda s: s.count("decode ") >= 1)
        assert "decode 30 tok" in first and "tok/s" in first and "first token" in first  # the stats footer
        reply = first.split(">>> Hello there", 1)[1].split("prompt ", 1)[0]
        assert reply.strip()  # the reply itself, between the prompt and the footer

        term.type("/set max_tokens 100000")
        term.wait_for(lambda s: "Set max_tokens to 100000." in s)
        term.type("Tell me a very long story")
        # streaming: text keeps arriving while no footer has been printed
        asked = ">>> Tell me a very long story"
        a = term.wait_for(lambda s: asked in s and len(s.split(asked, 1)[1].strip()) > 40)
        time.sleep(1.0)
        b = term.screen(history=True)
        assert b.count("decode ") == 1
        assert len(b.split(asked, 1)[1]) > len(a.split(asked, 1)[1])
        term.send("C-c")
        stopped = term.wait_for(lambda s: "interrupted" in s and s.count("decode ") >= 2, timeout=20)
        assert "partial reply stays in the conversation" in stopped
        assert "finish" not in stopped

        term.type("/set max_tokens 5")
        term.type("Thanks, go on")
        term.wait_for(lambda s: s.count("decode ") >= 3)
        # bracketed paste (tmux paste-buffer -p): the pasted newline does not send; Enter does
        term.send("C-u")
        subprocess.run([*term.tmux, "set-buffer", "pasted line one\npasted line two"], check=True)
        subprocess.run([*term.tmux, "paste-buffer", "-p", "-t", "t"], check=True)
        term.wait_for(lambda s: "... pasted line two" in s)
        assert term.screen(history=True).count("decode ") == 3  # nothing was sent yet
        term.send("Enter")
        term.wait_for(lambda s: s.count("decode ") >= 4)
        saved = tmp_path / "conv.json"
        term.type(f"/save {saved}")
        term.wait_for(lambda s: "Saved 8 messages" in s)
        users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
        assert users == [
            "Hello there",
            "Tell me a very long story",
            "Thanks, go on",
            "pasted line one\npasted line two",
        ]
        assert json.loads(saved.read_text())["messages"][3]["interrupted"] is True

        term.send("Up")  # history recall: the last line typed comes back
        term.wait_for(lambda s: s.rstrip().endswith(f">>> /save {saved}"), history=False)
        term.send("C-c")  # clears the recalled line
        term.type("/stats")
        stats = term.wait_for(lambda s: "turn(s)" in s)
        assert "4 turn(s)" in stats
        term.type("/exit")
        term.wait_for(lambda s: "EXIT=" in s, timeout=20)
        assert "EXIT=0" in term.screen(history=True)
        history = (tmp_path / "history").read_text()
        assert "Hello there" in history and "/exit" in history  # the persistent prompt history
    finally:
        term.close()


def test_run_without_a_prompt_in_a_terminal_starts_a_chat(endless_demo, tmp_path):
    """As `ollama run MODEL`: no prompt and a terminal on stdin is a conversation (it once said "empty prompt"), with
    run's options (-n 4 here, not chat's default)."""
    env = f"MARCO_HOME={tmp_path} TERM=xterm-256color OMP_NUM_THREADS=1"
    command = (
        f"cd {Path(__file__).parent.parent} && env {env} {sys.executable} -m marco_local run {endless_demo} "
        f"--temperature 0 -n 4; echo EXIT=$?; sleep 60"
    )
    term = Terminal(command)
    try:
        term.wait_for(lambda s: ">>> " in s, timeout=60)
        term.type("Hello there")
        assert "decode 4 tok" in term.wait_for(lambda s: "decode " in s)
        term.type("/exit")
        term.wait_for(lambda s: "EXIT=" in s, timeout=20)
        screen = term.screen(history=True)
        assert "EXIT=0" in screen and "empty prompt" not in screen
    finally:
        term.close()
    # --raw has no meaning in a chat: said before anything loads
    term = Terminal(command.replace("-n 4", "--raw"))
    try:
        screen = term.wait_for(lambda s: "EXIT=" in s, timeout=60)
        assert "Error: --raw needs a prompt" in screen and "EXIT=1" in screen
    finally:
        term.close()
