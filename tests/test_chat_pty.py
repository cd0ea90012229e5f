"""`marco chat` in a real terminal (tmux): streamed reply, stats footer, Ctrl+C stops a reply not the chat, /exit.

The demo model is copied with its end-of-turn token made unreachable (a plain template and an eos id outside the
vocabulary), so a reply runs until max_tokens and there is always something long enough to interrupt.
"""

from __future__ import annotations

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
    never = 10**6  # no such token: nothing ends a reply but max_tokens or Ctrl+C
    for name, update in (
        ("config.json", {"eos_token_id": never}),
        ("generation_config.json", {"eos_token_id": [never]}),
        ("tokenizer_config.json", {"eos_token": None, "chat_template": ENDLESS_TEMPLATE}),
    ):
        data = json.loads((folder / name).read_text())
        data.update(update)
        (folder / name).write_text(json.dumps(data))
    return folder


class Terminal:
    """A command running in a private tmux server (its own socket), 100x30."""

    def __init__(self, command: str) -> None:
        self.tmux = [TMUX, "-L", f"marco-test-{os.getpid()}", "-f", "/dev/null"]
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
    env = f"MARCO_HOME={tmp_path} TERM=xterm-256color"
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
        term.type("/stats")
        stats = term.wait_for(lambda s: "turn(s)" in s)
        assert "3 turn(s)" in stats
        term.type("/exit")
        term.wait_for(lambda s: "EXIT=" in s, timeout=20)
        assert "EXIT=0" in term.screen(history=True)
        history = (tmp_path / "history").read_text()
        assert "Hello there" in history and "/exit" in history  # the persistent prompt history
    finally:
        term.close()
