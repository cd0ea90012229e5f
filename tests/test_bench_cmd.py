"""`marco bench`: the library result and the CLI's JSON and table output, on the demo model (tiny runs)."""

from __future__ import annotations

import json
import os

import torch
from typer.testing import CliRunner

from marco_local.benchmark import run_benchmark
from marco_local.cli.main import app
from marco_local.runtime import load


def test_run_benchmark_reports_per_repeat_figures() -> None:
    lm = load("demo", dtype="f32", device="cpu")
    r = run_benchmark(lm.model, prompt_tokens=8, decode_tokens=3, repeats=2, settings={"x": 1})
    assert len(r.prompt_tokens_per_s) == len(r.decode_tokens_per_s) == 2
    assert all(v > 0 for v in r.prompt_tokens_per_s + r.decode_tokens_per_s)
    d = r.to_json()
    assert d["prompt"]["min"] <= d["prompt_tokens_per_s"] <= d["prompt"]["max"]
    assert d["peak_rss_bytes"] > 0 and d["peak_vram_bytes"] is None
    assert d["settings"]["x"] == 1 and d["settings"]["prompt_tokens"] == 8


def test_cli_json_is_one_object_on_stdout() -> None:
    res = CliRunner().invoke(app, ["bench", "demo", "-p", "8", "-n", "2", "-r", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.strip())
    for key in ("prompt_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes", "settings"):
        assert key in data
    assert data["settings"]["threads"] >= 1 and data["settings"]["decode_tokens"] == 2


def test_cli_table_goes_to_stdout() -> None:
    """The results are the command's output (`marco bench x > file` once wrote an empty file); notes stay on stderr."""
    res = CliRunner().invoke(app, ["bench", "demo", "-p", "4", "-n", "2", "-r", "1"])
    assert res.exit_code == 0
    assert "decode 2" in res.stdout and "peak RSS" in res.stdout and "\x1b[" not in res.stdout
    assert "decode 2" not in res.stderr and "peak RSS" not in res.stderr


def test_bad_counts_name_their_option_and_too_many_threads_or_tokens_are_said(marco_main) -> None:
    for option in ("--prompt-tokens", "--decode-tokens", "--repeats", "--threads"):
        code, err = marco_main("bench", "demo", option, "0")
        assert code == 2 and option in err[0] and "at least 1, not 0" in err[0], err
    many, saved = (os.cpu_count() or 1) + 1, torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["bench", "demo", "-p", "4100", "-n", "2", "-r", "1", "-t", str(many)])
    finally:
        torch.set_num_threads(saved)  # bench sets it for the process: the later tests keep theirs
    assert res.exit_code == 0, res.output
    assert f"--threads {many} is more than this machine's" in res.stderr
    assert "tokens are more than the model's context window" in res.stderr


def test_cli_takes_the_placement_options() -> None:
    """`marco bench` takes the offload options of `marco run` and reports the expert cache."""
    res = CliRunner().invoke(
        app, ["bench", "demo", "-p", "8", "-n", "4", "-r", "1", "--experts-resident", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout.strip())
    off = data["offload"]
    assert off["expert_slots_per_layer"] == 2 and 0 < off["experts_resident_fraction"] < 1
    assert 0 <= off["expert_hit_rate"] <= 1 and off["expert_bytes_moved"] > 0
    table = CliRunner().invoke(app, ["bench", "demo", "-p", "4", "-n", "2", "-r", "1", "--experts-resident", "50%"])
    assert table.exit_code == 0 and "resident" in table.stdout and "hit rate" in table.stdout
