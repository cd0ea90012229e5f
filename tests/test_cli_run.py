"""`marco run` end to end in a subprocess: exact text against transformers, stdout hygiene, one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ENV = {**os.environ, "NO_COLOR": "1"}
ENV.pop("MARCO_DEBUG", None)


def marco(*args: str, stdin: bytes | None = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "marco_local", *args], input=stdin, capture_output=True, env=env or ENV, timeout=120
    )


def hf_greedy_text(folder, prompt: str, n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=n)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_piped_raw_greedy_prints_exactly_the_transformers_text(checkpoint):
    folder, _ = checkpoint
    prompt = "The capital of France is"
    expected = hf_greedy_text(folder, prompt, 40)
    r = marco("run", str(folder), "--raw", "--temperature", "0", "-n", "40", "--dtype", "f32", stdin=prompt.encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == expected + ("" if expected.endswith("\n") else "\n")
    assert r.stderr == b""  # not a terminal: no progress bar, no chatter


def test_stdin_comes_before_the_argument(checkpoint):
    folder, _ = checkpoint
    expected = hf_greedy_text(folder, "Hello\nworld", 8)
    r = marco("run", str(folder), "world", "--raw", "--temperature", "0", "-n", "8", "--dtype", "f32", stdin=b"Hello")
    assert r.stdout.decode().rstrip("\n") == expected.rstrip("\n")


def test_chat_template_and_verbose_stats(checkpoint):
    folder, _ = checkpoint
    r = marco("run", str(folder), "Hi", "-n", "5", "--seed", "1", "--verbose", "--system", "Be brief.")
    assert r.returncode == 0, r.stderr
    assert b"tok/s" in r.stderr and b"tok/s" not in r.stdout
    assert b"\x1b[" not in r.stdout + r.stderr


def test_verbose_says_the_seed_that_repeats_a_sampled_run(checkpoint):
    """`--seed -1` (the default) draws a seed; -v says it, and --seed N with it gives the same text again."""
    folder, _ = checkpoint
    args = ("run", str(folder), "Hi", "-n", "12", "--temperature", "1.5", "-v")
    first = marco(*args, "--seed", "-1")
    assert first.returncode == 0, first.stderr
    seed = re.search(r" · seed (\d+)", first.stderr.decode()).group(1)
    again = marco(*args, "--seed", seed)
    assert again.stdout == first.stdout and f" · seed {seed}" in again.stderr.decode()
    greedy = marco(*args, "--temperature", "0")
    assert " · greedy" in greedy.stderr.decode() and " · seed" not in greedy.stderr.decode()


def test_demo_model_runs():
    r = marco("run", "demo", "-n", "8", stdin=b"Hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def one_line_error(r: subprocess.CompletedProcess, needle: str, code: int = 1) -> None:
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert err.startswith("Error: ") and needle in err.splitlines()[0], err
    assert "Traceback" not in err and r.stdout == b""


def test_unknown_model_and_missing_folder():
    one_line_error(marco("run", "no-such-model", "hi"), "unknown model")
    one_line_error(marco("run", "./does/not/exist", "hi"), "no such file or folder")


def test_wrong_architecture(checkpoint, tmp_path):
    folder, _ = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (bad / "config.json").write_text(json.dumps(cfg))
    one_line_error(marco("run", str(bad), "hi"), "unsupported architecture")


def test_truncated_safetensors(checkpoint, tmp_path):
    folder, _ = checkpoint
    bad = tmp_path / "trunc"
    shutil.copytree(folder, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    one_line_error(marco("run", str(bad), "hi"), "truncated")


def test_missing_shard_and_wrong_shape(make_checkpoint, checkpoint, tmp_path):
    folder, _ = make_checkpoint("sharded", seed=len("sharded"), max_shard_size="60KB")
    bad = tmp_path / "shard"
    shutil.copytree(folder, bad)
    victim = sorted(bad.glob("model-*.safetensors"))[0]
    victim.unlink()
    one_line_error(marco("run", str(bad), "hi"), victim.name)

    good, _ = checkpoint
    bad2 = tmp_path / "shape"
    shutil.copytree(good, bad2)
    cfg = json.loads((bad2 / "config.json").read_text())
    cfg["moe_intermediate_size"] += 8
    (bad2 / "config.json").write_text(json.dumps(cfg))
    one_line_error(marco("run", str(bad2), "hi"), "has shape")


def test_empty_prompt_and_non_utf8_input(checkpoint):
    folder, _ = checkpoint
    one_line_error(marco("run", str(folder), stdin=b"  \n"), "empty prompt")
    one_line_error(marco("run", str(folder), stdin=b"\xff\xfehello"), "not valid UTF-8")


def test_usage_error_exit_code_2():
    r = marco("run", "demo", "--no-such-flag")
    assert r.returncode == 2 and r.stderr.decode().startswith("Error: ")


def test_debug_shows_traceback():
    r = marco("run", "no-such-model", "hi", env={**ENV, "MARCO_DEBUG": "1"})
    assert r.returncode != 0 and b"Traceback" in r.stderr


def test_cuda_out_of_memory_is_a_clear_error_not_a_bug(monkeypatch, capsys):
    """A model that does not fit the GPU: one line saying so, and how to fit it (not "unexpected ... report it")."""
    from marco_local.cli import main as cli_main

    def oom(**_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1.5 GiB free.")

    monkeypatch.setattr(cli_main, "app", oom)
    monkeypatch.delenv("MARCO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        cli_main.main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("Error: out of GPU memory (CUDA out of memory)")
    assert "--gpu-mem auto" in err and "report it" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("raised", "code", "said"),
    [(KeyboardInterrupt(), 130, "interrupted"), (BrokenPipeError(32, "Broken pipe"), 0, "")],
)
def test_ctrl_c_exits_130_and_a_closed_pipe_exits_0(monkeypatch, marco_main, raised, code, said):
    """Through typer's own handling, which turns both into exit codes of its own (130 returned, not raised; 1)."""
    from marco_local import runtime

    def stopped(*_, **__):
        raise raised

    monkeypatch.setattr(runtime, "load", stopped)
    got, err = marco_main("run", "demo", "hi")
    assert got == code and said in "\n".join(err) and not any("Error" in line for line in err), err


@pytest.mark.parametrize(
    "bad",
    [
        ["--temperature", "nan"],
        ["--temperature", "-1"],
        ["--top-p", "-1"],
        ["--min-p", "2"],
        ["--repeat-penalty", "0"],
        ["--top-k", "-5"],
        ["--seed", str(2**64)],
        ["-n", "-2"],
        ["--ctx", "0"],
        ["--device", "mps"],
        ["--dtype", "f8"],
        ["--stop", ""],
        ["--expert-policy", "mru"],
        ["--expert-misses", "gpu"],
        ["--ram-mem", ""],
        ["--ram-mem", "6XB"],
        ["--gpu-mem", "lots"],
        ["--experts-resident", "abc"],
        ["--experts-resident", "0"],
        ["--experts-resident", "150%"],
        ["--experts-resident", "nan%"],
        ["--profile", "no-such-profile.json"],
        ["--profile", __file__],  # not a profile
    ],
)
def test_bad_option_values_are_usage_errors_before_loading(monkeypatch, marco_main, bad):
    """Checked as they are parsed: exit 2 and one line naming the option, before any model is loaded (the sampler
    would otherwise fail mid-generation with an internal error)."""
    from marco_local import runtime

    def never(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runtime, "load", never)
    code, err = marco_main("run", "demo", "hi", *bad)
    assert code == 2, err
    assert err[0].startswith("Error: Invalid value for") and bad[0] in err[0] and len(err) == 2, err


@pytest.mark.parametrize("command", ["chat", "bench"])
def test_offload_option_values_are_checked_before_loading_in_chat_and_bench(monkeypatch, marco_main, command):
    from marco_local import runtime

    def never(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runtime, "load", never)
    for bad in (["--experts-resident", "abc"], ["--ram-mem", "lots"], ["--profile", "no-such-profile.json"]):
        code, err = marco_main(command, "demo", *bad)
        assert code == 2 and err[0].startswith("Error: Invalid value for") and bad[0] in err[0], err


def test_minus_one_tokens_generates_until_the_context_is_full(marco_main, checkpoint):
    """llama.cpp's -n -1: no limit but the context window, which ends the answer without an error."""
    folder, _ = checkpoint
    code, lines = marco_main("run", str(folder), "a b c", "--raw", "-n", "-1", "--ctx", "24", "--seed", "3", "-v")
    err = "\n".join(lines)
    assert code == 0, err
    prompt, generated = (int(re.search(rf"{part} (\d+) tok", err).group(1)) for part in ("prompt", "decode"))
    assert "finish: stop" in err or ("finish: length" in err and prompt + generated == 24), err


def test_option_choices_are_the_librarys():
    from marco_local import runtime
    from marco_local.cli import options
    from marco_local.offload import POLICIES
    from marco_local.offload.misses import MISS_HANDLING

    assert options.DTYPES == tuple(runtime.DTYPES)
    assert options.EXPERT_POLICIES == POLICIES and options.MISS_HANDLING == MISS_HANDLING


def test_output_files_are_checked_before_any_work(monkeypatch, marco_main, tmp_path):
    """A trace or profile that cannot be written is said at once, not after the run (which then lost its result)."""
    from marco_local import runtime

    def never(*_, **__):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runtime, "load", never)
    text = tmp_path / "text.txt"
    text.write_text("some text", encoding="utf-8")
    missing = str(tmp_path / "no" / "t.jsonl")
    profile = ["profile", "demo", "--text", str(text), "-o"]
    for args, said in [
        (["run", "demo", "hi", "--trace", missing], "does not exist"),
        (["run", "demo", "hi", "--trace", str(tmp_path)], "is a folder"),
        ([*profile, missing], "does not exist"),
        ([*profile, str(tmp_path / "p.json"), "--trace", str(tmp_path / "p.json")], "the same file"),
        ([*profile, str(tmp_path / "p.json"), "--chunk", "0"], "at least 1"),
    ]:
        code, err = marco_main(*args)
        assert code == 2 and said in err[0] and len(err) <= 2, (args, err)
    code, err = marco_main("profile", "demo", "--text", str(tmp_path), "-o", str(tmp_path / "p.json"))
    assert code == 1 and err[0].startswith("Error: cannot read") and "Is a directory" in err[0], err


def test_profile_of_a_dense_model_is_refused(marco_main, tmp_path):
    from gguf_fixtures import smollm2_path

    text = tmp_path / "text.txt"
    text.write_text("some text", encoding="utf-8")
    code, err = marco_main("profile", str(smollm2_path()), "--text", str(text), "-o", str(tmp_path / "p.json"))
    assert code == 1 and "dense model: it has no experts to profile" in err[0], err
    assert not (tmp_path / "p.json").exists()


def test_a_trace_or_profile_replaces_only_an_earlier_one(marco_main, tmp_path, checkpoint):
    """`marco run --trace victim.gguf` once overwrote the model it ran (run has no --force: a trace is a log that a
    next run replaces); `profile -o --force` the text it read."""
    folder, _ = checkpoint
    victim = tmp_path / "victim.gguf"
    victim.write_bytes(b"GGUF\x03\x00\x00\x00 not a trace")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes", encoding="utf-8")
    run = ["run", str(folder), "hi", "-n", "2", "--temperature", "0"]
    for target in (victim, notes):
        code, err = marco_main(*run, "--trace", str(target))
        assert code == 1 and "is not a marco-expert-trace file; refusing to overwrite it" in err[0], err
    assert victim.read_bytes().startswith(b"GGUF") and notes.read_text() == "my notes"
    trace = tmp_path / "t.jsonl"
    for _ in range(2):  # an earlier trace is replaced
        code, err = marco_main(*run, "--trace", str(trace), "--experts-resident", "2")
        assert code == 0, err
    profile = ["profile", str(folder), "--text", str(notes), "--force"]
    code, err = marco_main(*profile, "-o", str(notes))
    assert code == 1 and "not a marco-expert-profile file" in err[0] and notes.read_text() == "my notes", err
    code, err = marco_main(*profile, "-o", str(tmp_path / "p.json"), "--trace", str(victim))
    assert code == 1 and "not a marco-expert-trace file" in err[0] and not (tmp_path / "p.json").exists(), err
    for _ in range(2):  # an earlier profile and trace are replaced with --force
        code, err = marco_main(*profile, "-o", str(tmp_path / "p.json"), "--trace", str(trace))
        assert code == 0, err


def test_a_ctx_beyond_the_model_is_clamped_and_said(marco_main, checkpoint):
    folder, ref = checkpoint
    longest = ref.config.max_position_embeddings
    code, err = marco_main("run", str(folder), "hi", "-n", "1", "--ctx", str(longest * 2))
    assert code == 0 and f"the model's context is {longest:,} tokens, so that is used" in "\n".join(err), err


def test_expert_options_on_a_dense_model_are_ignored_with_a_note(marco_main, tmp_path):
    """As llama.cpp ignores --n-cpu-moe on a dense model: the run goes on, and one line says the options did nothing
    (they once failed inside the offload planner: `unexpected ValueError: max() arg is an empty sequence`)."""
    from gguf_fixtures import smollm2_path

    model = str(smollm2_path())
    profile = tmp_path / "p.json"
    profile.write_text('{"format": "marco-expert-profile", "layers": {}}', encoding="utf-8")
    dense = "no effect, the model is dense (it has no experts to offload)"
    for opts, said in [
        (["--ram-mem", "6GiB"], "--ram-mem: "),
        (["--experts-resident", "50%", "--prefetch"], "--experts-resident and --prefetch: "),
        (["--profile", str(profile)], "--profile: "),
    ]:
        code, err = marco_main("run", model, "hi", "-n", "2", "--temperature", "0", *opts)
        assert code == 0 and err == [said + dense], (opts, err)
    code, err = marco_main("bench", model, "--ram-mem", "6GiB", "-p", "4", "-n", "2", "-r", "1")
    assert code == 0 and err[0] == "--ram-mem: " + dense, err
    r = marco("chat", model, "-n", "2", "--temperature", "0", "--experts-resident", "2", stdin=b"hi")
    assert r.returncode == 0 and r.stderr.decode().splitlines() == ["--experts-resident: " + dense], r.stderr
    assert r.stdout.strip()
