"""ChatSession: prefix reuse across turns, context overflow, interruption, /regen, settings, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from marco_local.chat import ChatSession, ChatSettings
from marco_local.errors import MarcoError
from marco_local.generate import generate
from marco_local.runtime import load
from marco_local.sampling import make_sampler


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast, and it does not collapse when other work shares the cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def lm():
    # float32: cached and uncached prefill then round the same way, so greedy replies can be compared exactly
    return load("demo", dtype="f32", device="cpu")


def greedy(max_tokens: int = 24) -> ChatSettings:
    return ChatSettings(temperature=0.0, max_tokens=max_tokens)


def consume(reply) -> str:
    for _ in reply:
        pass
    return reply.text


def count_forward_tokens(model) -> tuple[list[int], object]:
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen, handle


def test_second_turn_prefills_only_the_new_suffix_and_matches_the_uncached_reply(lm):
    s = ChatSession(lm.model, lm.tokenizer, greedy(), system="You are terse.", context_length=1024)
    first = s.send("Hello, how are you today?")
    consume(first)
    assert first.response.cached_prompt_tokens == 0
    assert not first.interrupted and s.messages[-1] == {"role": "assistant", "content": first.text}

    seen, handle = count_forward_tokens(lm.model)
    try:
        second = s.send("What is the capital of France?")
        consume(second)
    finally:
        handle.remove()
    cached = second.response.cached_prompt_tokens
    assert cached >= first.prompt_tokens  # the whole first prompt (and part of the reply) came from the cache
    assert seen[0] == second.prompt_tokens - cached  # the first forward of turn 2 prefilled only the new suffix
    assert sum(seen[1:]) == len(seen[1:])  # then one token per decode step
    assert s.prompt_cache.cache.offset == len(s.prompt_cache.tokens)

    ids = lm.tokenizer.encode(s.render(s.messages[:-1]))
    assert len(ids) == second.prompt_tokens
    expected = generate(lm.model, lm.tokenizer, ids, max_tokens=24, sampler=make_sampler(0.0), max_context=1024)
    assert second.text == expected


def test_an_interrupted_reply_stays_marked_and_the_next_turn_is_still_exact(lm):
    s = ChatSession(lm.model, lm.tokenizer, greedy(200), context_length=1024)
    reply = s.send("Tell me a long story about Paris.")
    it = iter(reply)
    partial = next(it).text + next(it).text
    reply.close()
    assert reply.interrupted and reply.text == partial
    assert s.messages[-1] == {"role": "assistant", "content": partial, "interrupted": True}

    nxt = s.send("Go on.")
    consume(nxt)
    assert nxt.response.cached_prompt_tokens > 0
    ids = lm.tokenizer.encode(s.render(s.messages[:-1]))
    expected = generate(lm.model, lm.tokenizer, ids, max_tokens=200, sampler=make_sampler(0.0), max_context=1024)
    assert nxt.text == expected


def test_keyboard_interrupt_inside_the_model_keeps_the_partial_reply(lm, monkeypatch):
    s = ChatSession(lm.model, lm.tokenizer, greedy(50), context_length=512)
    calls = []

    def boom(module, args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    handle = lm.model.register_forward_pre_hook(boom)
    try:
        reply = s.send("Hello")
        with pytest.raises(KeyboardInterrupt):
            consume(reply)
    finally:
        handle.remove()
    assert s.messages[-1]["interrupted"] is True and s.messages[-1]["content"] == reply.text
    consume(s.send("Hello again"))  # the cache is consistent: the next turn runs
    assert s.prompt_cache.cache.offset == len(s.prompt_cache.tokens)


def test_a_reply_stopped_before_its_first_token_leaves_no_empty_turn(lm):
    """Ctrl-C during the prefill (or an error there): no empty "interrupted" reply is kept; the next message replaces
    the one left waiting, and /regen answers it."""
    s = ChatSession(lm.model, lm.tokenizer, greedy(8), context_length=512)
    consume(s.send("Hi"))

    def stop(module, args):
        raise KeyboardInterrupt

    handle = lm.model.register_forward_pre_hook(stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            consume(s.send("a long paste"))
    finally:
        handle.remove()
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user"]
    consume(s.regenerate())
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["Hi", "a long paste"]
    assert s.messages[-1]["role"] == "assistant" and "interrupted" not in s.messages[-1]


def test_context_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt(lm):
    s = ChatSession(lm.model, lm.tokenizer, greedy(16), system="SYSTEM PROMPT KEPT", context_length=256)
    long_message = "The capital of France is Paris and the weather is sunny. " * 4
    dropped = []
    for i in range(8):
        reply = s.send(f"Turn {i}: {long_message}")
        consume(reply)
        dropped.append(reply.dropped)
        assert reply.prompt_tokens + min(16, 256 // 4) <= 256
    assert sum(dropped) > 0
    assert s.messages[0]["role"] == "user" and not s.messages[0]["content"].startswith("Turn 0:")
    assert s.messages[-2]["content"].startswith("Turn 7:")
    assert "SYSTEM PROMPT KEPT" in s.render()
    roles = [m["role"] for m in s.messages]
    assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_a_message_longer_than_the_context_is_refused_and_not_kept(lm):
    s = ChatSession(lm.model, lm.tokenizer, greedy(16), context_length=128)
    consume(s.send("Hi"))
    before = list(s.messages)
    with pytest.raises(MarcoError, match="too long"):
        s.send("Paris " * 400)
    assert s.messages == before  # the earlier turns too: they were dropped to make room, then the message refused


def test_regenerate_replaces_the_last_reply(lm):
    s = ChatSession(lm.model, lm.tokenizer, ChatSettings(temperature=1.0, max_tokens=20, seed=7), context_length=512)
    consume(s.send("Hello"))
    first = s.messages[-1]["content"]
    again = s.regenerate()
    consume(again)
    assert len(s.messages) == 2 and s.messages[0]["content"] == "Hello"
    assert s.messages[1]["content"] == again.text
    assert again.text != first  # the session's sampler moves on: a new reply, not a replay
    s.clear()
    with pytest.raises(MarcoError, match="nothing to regenerate"):
        s.regenerate()


@pytest.mark.parametrize("message", ["What is 2+2?", "hi " * 60])
def test_a_greedy_regen_gives_the_reply_it_regenerates(message):
    """bf16 (the CLI's default): /regen once recomputed the prompt's last token alone, not inside its prefill chunk,
    and the one-token kernels' last bits made the reply drift at a near-tie (these two messages did)."""
    lm = load("demo", dtype="bf16", device="cpu")
    s = ChatSession(lm.model, lm.tokenizer, greedy(24), context_length=1024)
    seen, handle = count_forward_tokens(lm.model)
    try:
        first = consume(s.send(message))
        before, seen[:] = list(seen), []
        assert consume(s.regenerate()) == first
    finally:
        handle.remove()
    assert seen == before[len(before) - len(seen) :]  # the first turn's last prefill chunk again, whole, and decode


def test_reuse_restarts_at_the_forward_that_computed_the_next_position():
    """A prefix ending inside a prefill chunk is cut back to the chunk's start; inside the decoded tokens (one forward
    each, as a chat's next turn finds them) nothing more is recomputed."""
    from marco_local.generate import PromptCache

    class Cache:
        offset = 0

        def trim(self, n):
            self.offset -= n

    pc = PromptCache(Cache())
    for forward in (list(range(0, 128)), list(range(128, 200)), [200], [201], [202]):
        pc.add(forward)
        pc.cache.offset += len(forward)
    assert pc.reuse(list(range(200))) == 128  # the same prompt (regen): its last chunk again, whole
    assert pc.tokens == list(range(128)) and pc.starts == [0] and pc.cache.offset == 128
    pc.add(list(range(128, 200)))
    pc.add([200])
    pc.add([201])
    pc.cache.offset = 202
    assert pc.reuse([*range(202), 999]) == 202 and pc.starts == [0, 128, 200, 201]


def test_settings_are_parsed_and_validated():
    st = ChatSettings()
    st.set("temperature", "0.2")
    st.set("top_k", "40")
    st.set("seed", "12")
    st.set("max_tokens", "64")
    assert (st.temperature, st.top_k, st.seed, st.max_tokens) == (0.2, 40, 12, 64)
    st.set("seed", "none")
    assert st.seed is None
    st.set("seed", "-1")  # llama.cpp's and Ollama's "random"
    assert st.seed is None
    st.set("max_tokens", "-1")  # until the context is full
    assert st.max_tokens == -1
    bad = [("temperature", "-1"), ("top_p", "1.5"), ("top_k", "x"), ("max_tokens", "0"), ("nope", "1")]
    # values the sampler would divide by or turn into NaN probabilities, and a seed torch cannot take
    bad += [("temperature", "inf"), ("temperature", "nan"), ("repeat_penalty", "0"), ("min_p", "2")]
    bad += [("top_p", "nan"), ("seed", str(2**64)), ("seed", "-2"), ("max_tokens", "-2")]
    for name, value in bad:
        with pytest.raises(MarcoError):
            st.set(name, value)


def test_save_and_load_round_trip(lm, tmp_path):
    s = ChatSession(lm.model, lm.tokenizer, greedy(12), system="Be brief.", context_length=512)
    s.set("temperature", "0")
    s.set("top_k", "5")
    consume(s.send("Bonjour, ça va ? 😀"))
    reply = s.send("Und auf Deutsch?")
    next(iter(reply))
    reply.close()
    path = s.save(tmp_path / "conv.json", model_name="demo")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "marco-chat" and data["model"] == "demo" and data["messages"][-1]["interrupted"]

    with pytest.raises(MarcoError, match="already exists"):
        s.save(path)
    s.save(path, model_name="demo", force=True)
    with pytest.raises(MarcoError, match="does not exist"):  # a typo creates no folders
        s.save(tmp_path / "no" / "such" / "conv.json")
    assert not (tmp_path / "no").exists()
    with pytest.raises(MarcoError, match="is a folder"):
        s.save(tmp_path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.json"]  # no temporary file left

    other = ChatSession(lm.model, lm.tokenizer, ChatSettings(), context_length=512)
    other.load(path)
    assert other.to_dict("demo") == s.to_dict("demo")
    assert other.render() == s.render()
    consume(other.send("Weiter."))  # a loaded conversation goes on

    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(MarcoError, match="not a saved marco conversation"):
        other.load(bad)
    with pytest.raises(MarcoError, match="no such file"):
        other.load(tmp_path / "missing.json")
    saved, before = json.loads(path.read_text(encoding="utf-8")), other.to_dict("demo")
    for change, said in [
        ({"settings": "x"}, "malformed settings or system prompt"),
        ({"system": 123}, "malformed settings or system prompt"),
        ({"settings": {"temperature": "hot"}}, "bad.json: temperature needs a number"),
        ({"messages": saved["messages"][1:]}, "turns out of order"),  # an assistant turn first
        ({"version": 99}, "a version of the format this marco does not know"),
    ]:
        bad.write_text(json.dumps(saved | change), encoding="utf-8")
        with pytest.raises(MarcoError, match=said):
            other.load(bad)
    assert other.to_dict("demo") == before  # the refused files changed nothing
