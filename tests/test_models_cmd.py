"""`marco list`, `marco pull`, `marco info`: a fake Hugging Face cache, no network, header-only checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from marco_local.cli.main import app
from marco_local.config import ModelConfig
from marco_local.demo import ensure_demo_model
from marco_local.errors import MarcoError
from marco_local.inventory import model_info
from marco_local.offload.budget import WORKING_RESERVE, cuda_scratch_bytes
from marco_local.offload.memory import param_counts

ENV = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("MARCO_DEBUG", None)
ENV.pop("HF_HUB_OFFLINE", None)

NANO = {
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_experts": 232,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 384,
    "intermediate_size": 3072,
    "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}
MINI = {**NANO, "num_experts": 256, "moe_intermediate_size": 768}


def cli(*args: str) -> tuple[int, str, str]:
    """In process (no interpreter start-up): exit code, stdout, stderr."""
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    if isinstance(r.exception, MarcoError):  # main() would render it; the test looks at it directly
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def marco(*args: str, env: dict | None = None, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "marco_local", *args], input=stdin, capture_output=True, env=env or ENV, timeout=120
    )


def fake_cache(root: Path, repo: str, source: Path) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/COMMIT/files), files copied from `source`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / "hub" / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    shutil.copytree(source, snap)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    return snap


def header_only_checkpoint(folder: Path, cfg: dict, dtype: str = "BF16") -> Path:
    """A Nano-shaped safetensors file whose data is a hole (sparse file): headers are all `info` reads."""
    folder.mkdir(parents=True)
    itemsize = 2 if dtype in ("BF16", "F16") else 4
    D, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    hd, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": [cfg["vocab_size"], D], "model.norm.weight": [D]}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        shapes.update(
            {
                p + "input_layernorm.weight": [D],
                p + "post_attention_layernorm.weight": [D],
                p + "self_attn.q_proj.weight": [nq * hd, D],
                p + "self_attn.k_proj.weight": [nkv * hd, D],
                p + "self_attn.v_proj.weight": [nkv * hd, D],
                p + "self_attn.o_proj.weight": [D, nq * hd],
                p + "self_attn.q_norm.weight": [hd],
                p + "self_attn.k_norm.weight": [hd],
                p + "mlp.gate.weight": [E, D],
            }
        )
        for e in range(E):
            for proj, shape in (("gate_proj", [I, D]), ("up_proj", [I, D]), ("down_proj", [D, I])):
                shapes[p + f"mlp.experts.{e}.{proj}.weight"] = shape
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_parameter_counts_match_the_published_figures():
    nano = param_counts(ModelConfig.from_dict(NANO))
    assert round(nano.total / 1e9, 1) == 8.0 and round(nano.active / 1e9, 2) == 0.60
    assert nano.per_expert == 3 * 1024 * 384 and nano.moe_layers == 28
    mini = param_counts(ModelConfig.from_dict(MINI))
    assert round(mini.total / 1e9, 1) == 17.3 and round(mini.active / 1e9, 2) == 0.87


def test_param_counts_equal_the_real_model_parameters(lm_demo):
    cfg = lm_demo.model.config
    assert param_counts(cfg).total == sum(p.numel() for p in lm_demo.model.parameters())


@pytest.fixture(scope="module")
def lm_demo():
    from marco_local.runtime import load

    return load("demo", device="cpu")


def test_info_on_a_nano_shaped_checkpoint_reads_headers_only(tmp_path):
    folder = header_only_checkpoint(tmp_path / "nano", NANO)
    mi = model_info(str(folder), ctx=4096, gpu_mem=4 << 30)
    assert mi.params.total == param_counts(ModelConfig.from_dict(NANO)).total
    assert [t.dtype for t in mi.tensor_types] == ["BF16"] and mi.bits_per_weight == pytest.approx(16.0)
    assert mi.one_expert_bytes == 3 * 1024 * 384 * 2  # ~2.4 MB per expert in bf16
    assert mi.kv_bytes == 2 * 28 * 8 * 128 * 4096 * 2
    gpu_all, budget, cpu = mi.placements
    assert gpu_all.fast_bytes == mi.weight_bytes + mi.kv_bytes + (256 << 20) and cpu.ram_bytes == gpu_all.fast_bytes
    # 4 GiB minus non-expert weights (~0.66 GB), KV cache, working reserve and CUDA scratch: ~50 of 232 experts
    slots = int(budget.note.split(" of ")[0])
    non_expert = mi.weight_bytes - mi.expert_bytes
    scratch = cuda_scratch_bytes(8, mi.one_expert_bytes, 1024, 384)
    expected = (budget.budget_bytes - non_expert - mi.kv_bytes - WORKING_RESERVE - scratch) // (
        mi.one_expert_bytes * 28
    )
    assert slots == expected and 40 < slots < 60
    assert budget.fast_bytes <= 4 << 30 and budget.ram_bytes == (232 - slots) * mi.one_expert_bytes * 28


@pytest.mark.parametrize("gpu_mem", [None, 40 << 20, 6 << 20])
def test_info_plans_a_gpu_budget_as_run_does(checkpoint, gpu_mem):
    """`info --gpu-mem` from the headers, `run --gpu-mem` from the loaded model (offload/install.py's inputs on CUDA:
    non-expert bytes, KV cache and working reserve, packed expert bytes, CUDA scratch): the same slots. The fixture
    is stored in float32, the precision info plans for."""
    import torch

    from marco_local.load.checkpoint import load_model
    from marco_local.offload.budget import plan_slots
    from marco_local.offload.install import fixed_bytes

    folder, _ = checkpoint
    row = next(pl for pl in model_info(str(folder), ctx=512, gpu_mem=gpu_mem).placements if pl.name == "GPU budget")
    model = load_model(folder, dtype=torch.float32)
    cfg = model.config
    one = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    fixed = fixed_bytes(model, 512, torch.float32, torch.device("cuda"))
    scratch = cuda_scratch_bytes(cfg.num_experts_per_tok, one, cfg.hidden_size, cfg.moe_intermediate_size)
    layers = cfg.num_hidden_layers
    try:
        plan = plan_slots(cfg.num_experts, layers, one, fixed, row.budget_bytes, None, scratch, what="--gpu-mem")
    except MarcoError as e:
        assert row.fast_bytes is None and e.hint.split("at least ")[1].split(",")[0] in row.note
    else:
        assert row.note.startswith(f"{plan.slots} of {cfg.num_experts} experts")
        # within the rotary inverse frequencies, made at load and not in the file
        assert abs(row.fast_bytes - (fixed + scratch + plan.slot_bytes)) <= 4 * cfg.head_dim
        assert row.fast_bytes <= row.budget_bytes
        if gpu_mem is None:  # the default budget holds half of each layer's experts
            assert plan.slots == (cfg.num_experts + 1) // 2


def test_info_on_a_gguf_counts_what_cuda_would_hold():
    """A dense GGUF on CUDA is dequantized whole (bf16): no row with quantized experts, no GPU-budget row."""
    from gguf_fixtures import smollm2_path

    path = smollm2_path()
    mi = model_info(str(path), ctx=1024)
    assert [pl.name for pl in mi.placements] == ["all on GPU", "CPU only"]
    gpu_all, cpu = mi.placements
    assert gpu_all.fast_bytes == mi.params.total * 2 + mi.kv_bytes + (256 << 20) and "dequantized" in gpu_all.note
    assert cpu.ram_bytes == mi.weight_bytes + mi.kv_bytes + (256 << 20) < gpu_all.fast_bytes


def test_info_on_a_moe_gguf_offers_quantized_experts_and_a_budget(q4_path):
    """A MoE GGUF on CUDA: dense (bf16), experts kept as the file's blocks, or those blocks offloaded under a budget
    (non-expert weights in bf16, slots of quantized experts)."""
    mi = model_info(str(q4_path), ctx=256)  # a budget that holds about half of the experts
    rest = (mi.params.total - mi.params.experts) * 2 + mi.kv_bytes
    names = [pl.name for pl in mi.placements]
    assert names == ["all on GPU", "all on GPU, experts quantized", "GPU budget", "CPU only"]
    dense, quant, budget, _ = mi.placements
    assert quant.fast_bytes == rest + mi.expert_bytes + (256 << 20) < dense.fast_bytes
    assert rest < budget.fast_bytes < quant.fast_bytes and "experts per layer resident" in budget.note


def test_info_on_a_gguf_says_the_cpu_kernels(q4_path, monkeypatch):
    """The kernel tier (and why) that a GGUF's products would run on, as `marco run -v` says it."""
    from marco_local.kernels import native

    def kernel_line(out: str) -> str:
        return next(line for line in out.splitlines() if line.startswith("CPU kernels ")).split(None, 2)[2]

    code, out, err = cli("info", str(q4_path))
    assert code == 0, err
    assert kernel_line(out) == native.describe()
    monkeypatch.setenv("MARCO_NATIVE", "0")
    assert kernel_line(cli("info", str(q4_path))[1]) == "torch (disabled by MARCO_NATIVE=0)"


def test_info_cli_table_and_json(tmp_path):
    folder = header_only_checkpoint(tmp_path / "nano", NANO)
    code, out, err = cli("info", str(folder), "--gpu-mem", "4GiB")
    assert code == 0, err
    assert "qwen3_moe: 28 layers" in out and "232 experts x 384 wide, top 8" in out
    assert (
        "8.00B total, 602.70M active per token (7.5%)" in out
        and "BF16 x 19,742 (14.9 GiB)" in out
        and "16.00 bits per weight" in out
    )
    assert "GPU budget 4.0 GiB" in out and "of 232 experts per layer resident" in out and "CPU only" in out
    assert "\x1b" not in out and all(line == line.rstrip() for line in out.splitlines())
    data = json.loads(cli("info", str(folder), "--json", "--ctx", "1024")[1])
    assert data["params"]["total"] > 7.9e9 and data["ctx"] == 1024 and data["one_expert_bytes"] == 786432 * 3
    longest = NANO["max_position_embeddings"]
    assert json.loads(cli("info", str(folder), "--json", "--ctx", str(10 * longest))[1])["ctx"] == longest  # as run
    with pytest.raises(MarcoError, match="cannot read the size"):
        cli("info", str(folder), "--gpu-mem", "lots")


def test_list_shows_what_is_in_the_cache(tmp_path):
    demo = ensure_demo_model()
    fake_cache(tmp_path, "AIDC-AI/Marco-Nano-Instruct", demo)
    fake_cache(tmp_path, "someone/other-moe", demo)
    env = {**ENV, "HF_HOME": str(tmp_path)}
    r = marco("list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["nano"]["present"] and rows["nano"]["formats"] == ["safetensors"]
    assert rows["nano"]["size_bytes"] == sum(p.stat().st_size for p in demo.iterdir())
    assert not rows["mini"]["present"] and rows["mini"]["path"] is None
    assert rows["someone/other-moe"]["present"] and rows["demo"]["present"]
    r = marco("list", env=env)
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:5] == ["NAME", "REPO", "LOCAL", "SIZE", "FORMATS"]
    nano = next(line for line in lines if line.startswith("nano "))
    assert "AIDC-AI/Marco-Nano-Instruct" in nano and " yes " in nano and "MiB" in nano
    assert b"\x1b" not in r.stdout and r.stderr == b""


def test_pull_without_network_is_one_clear_error(tmp_path):
    env = {**ENV, "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    r = marco("pull", "nano", env=env)
    assert r.returncode == 1 and r.stdout == b""
    err = r.stderr.decode().splitlines()
    assert err[0] == "Error: cannot reach the Hugging Face Hub to download AIDC-AI/Marco-Nano-Instruct (no network?)"
    assert err[1].startswith("Hint: ") and len(err) == 2 and "Traceback" not in r.stderr.decode()


def test_pull_offline_uses_only_the_cache(tmp_path):
    env = {**ENV, "HF_HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    for args, extra in ((["--offline"], {}), ([], {"HF_HUB_OFFLINE": "1"})):
        r = marco("pull", "nano", *args, env={**env, **extra})
        assert r.returncode == 1 and "offline mode is on" in r.stderr.decode()
    snap = fake_cache(tmp_path, "AIDC-AI/Marco-Nano-Instruct", ensure_demo_model())
    r = marco("pull", "nano", "--offline", env=env)
    assert r.returncode == 0, r.stderr
    assert str(snap) in r.stderr.decode() and r.stdout == b""
    with pytest.raises(MarcoError, match="unknown model 'not-a-model'"):
        cli("pull", "not-a-model")


def test_help_has_examples():
    for command in ("list", "pull", "info", "chat"):
        code, out, _ = cli(command, "--help")
        assert code == 0 and "Examples" in out, command


def test_download_progress_reports_written_bytes_through_huggingface_hubs_bar_protocol():
    from huggingface_hub._snapshot_download import _create_progress_bar, _finish_transfer_bar, _update_transfer_bar

    from marco_local.inventory import _progress_class

    seen = []
    cls = _progress_class(lambda done, total: seen.append((done, total)))
    # what snapshot_download does: a transfer bar, a bytes-written bar, and a files bar around the thread pool
    transfer = _create_progress_bar(cls=cls, log_level=30, desc="Downloading bytes", total=0, unit="B")
    written = _create_progress_bar(
        cls=cls, log_level=30, desc="Reconstructing (incomplete total...)", total=0, unit="B"
    )
    with cls(desc="Fetching 2 files", total=2) as files:
        written.total = 300
        _update_transfer_bar(transfer, 120)
        written.update(100)
        written.update(200)
        files.update(1)
        written.set_postfix_str("1 MB/s")
        written.refresh()
    _finish_transfer_bar(transfer)
    written.set_description("Reconstruction complete")
    assert seen == [(100, 300), (300, 300)]


SLOW_IMPORTS = ("torch", "huggingface_hub.hf_api", "marco_local.demo")


@pytest.mark.parametrize("args", [["list"], ["info", "demo"], ["info", "smollm2"]])
def test_list_and_info_do_not_import_torch(tmp_path, args):
    """`marco list` and `info` read files and headers: importing torch (2-3 s) or huggingface_hub's API client
    (0.5 s) made them slow; each is imported only when a command needs it."""
    from gguf_fixtures import smollm2_path

    smollm2_path()  # skips without the SmolLM2 package
    ensure_demo_model()
    probe = (
        "import sys\nfrom marco_local.cli.main import main\nsys.argv = ['marco', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        f"sys.stderr.write('IMPORTED=' + ','.join(m for m in {SLOW_IMPORTS!r} if m in sys.modules) + f' CODE={{code}}')"
    )
    env = {**ENV, "HF_HOME": str(tmp_path)}  # an empty Hugging Face cache
    r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, env=env, timeout=120)
    assert r.stderr.decode().endswith("IMPORTED= CODE=0"), r.stderr.decode()
    assert r.stdout.strip()
