"""GGUF in: reader, config and tokenizer from metadata, `runtime.load`, dense architectures, SmolLM2, malformed files.

The qwen3moe fixture GGUF is written by our quantizer (tests/gguf_fixtures.py; every tensor type is in
test_gguf_types.py); the dense llama/qwen3 fixtures are written here with gguf-py's GGUFWriter, Q/K permuted for
llama exactly as llama.cpp's convert_hf_to_gguf.py does. The real-weights check is the SmolLM2-135M-Instruct Q4_1
GGUF (llama.cpp's converter and quantizer wrote it), compared with llama.cpp itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_fixtures import ids_batch, kl, rel_err, smollm2_path, write_moe_f32
from offload_gguf_fixtures import q4_path  # noqa: F401
from tokenizers import Tokenizer as HFTokenizer

from marco_local.errors import MarcoError
from marco_local.formats.gguf import GGUFFile, model_config
from marco_local.formats.gguf_tokenizer import load_tokenizer
from marco_local.kernels import native
from marco_local.layers.kv_cache import make_cache
from marco_local.load.gguf import load_gguf
from quant.ggml_codecs import codec_for

F32_REL_TOL = 1e-4  # max |ours - ref| / max |ref| over all logits, float32 activations (the exact path)

MULTILINGUAL = [
    "The capital of France is Paris. Hello, world!",
    "Die Hauptstadt von Deutschland ist Berlin. Grüße, ça va? Ünïcödé",
    "法国的首都是巴黎。你好，今天天气怎么样？日本の首都は東京です。한국의 수도는 서울입니다.",
    "عاصمة مصر هي القاهرة. مرحبا، كيف حالك؟",
    "Столица России — Москва. Привет, как дела?",
    "emoji 😀🚀👍🏽 and digits 12345, don't I'LL\n\n  indented\tcode()",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def moe_f32(make_checkpoint, tmp_path_factory):
    return write_moe_f32(make_checkpoint, tmp_path_factory)


# ---------------------------------------------------------------------------------------------------------------------
# Reader and config


def test_reader_matches_gguf_py_and_is_zero_copy():
    path = smollm2_path()
    g = GGUFFile(path)
    r = gguf.GGUFReader(path)
    assert len(g.tensors) == len(r.tensors)
    for t in r.tensors:
        raw = g.raw(t.name)
        assert np.array_equal(raw.numpy().reshape(-1), np.asarray(t.data).reshape(-1).view(np.uint8)), t.name
    # the bytes are views of one file mapping, never copies
    a, b = g.raw("token_embd.weight"), g.raw("blk.0.ffn_down.weight")
    assert (
        b.data_ptr() - a.data_ptr() == g.tensors["blk.0.ffn_down.weight"].offset - g.tensors["token_embd.weight"].offset
    )
    assert g.get("tokenizer.ggml.tokens") == r.fields["tokenizer.ggml.tokens"].contents()


def test_config_from_metadata(moe_f32):
    folder, ref, path = moe_f32
    cfg = model_config(GGUFFile(path))
    hf = ref.config
    assert cfg.model_type == "qwen3_moe"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads,
    )
    assert (cfg.head_dim, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (
        hf.head_dim,
        hf.num_experts,
        hf.num_experts_per_tok,
        hf.moe_intermediate_size,
    )
    assert cfg.vocab_size == hf.vocab_size and cfg.tie_word_embeddings and cfg.norm_topk_prob
    assert cfg.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_from_gguf_matches_tokenizer_json(moe_f32):
    folder, _, path = moe_f32
    ours = load_tokenizer(GGUFFile(path))
    ref = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    for text in MULTILINGUAL:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    from marco_local.tokenizer import Tokenizer

    folder_tok = Tokenizer.from_folder(folder)
    messages = [{"role": "user", "content": "Bonjour 😀"}]
    assert ours.apply_chat_template(messages) == folder_tok.apply_chat_template(messages)
    assert set(folder_tok.eos_token_ids) <= set(ours.eos_token_ids)  # the GGUF adds llama.cpp's end tokens


def test_tokenizer_from_gguf_matches_tokenizer_json_on_random_text(moe_f32):
    """Scripts, whitespace runs, digits, contractions, emoji and the added tokens, mixed at random; random ids
    (special ones, lone UTF-8 bytes) decode alike too."""
    folder, _, path = moe_f32
    ours = load_tokenizer(GGUFFile(path))
    ref = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    words = [w for text in MULTILINGUAL for w in text.split(" ")] + [" ", "  ", "\t", "\n\n", "\r\n", "\x00", "\u00ad"]
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 30)))
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    n = ref.get_vocab_size()
    for _ in range(100):
        ids = [rng.randrange(n) for _ in range(rng.randint(0, 12))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


def llama_cpp_end_of_generation(path: Path) -> list[int]:
    llama_cpp = pytest.importorskip("llama_cpp")
    ref = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(ref.model)
    return [i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)]


def test_generation_ends_on_the_tokens_llama_cpp_ends_on(moe_f32, tmp_path):
    """A GGUF names one eos id; llama.cpp (so Ollama, LM Studio) also stops on end tokens found by their text, such as
    a Qwen model's <|endoftext|> next to its <|im_end|>, and on the fill-in-the-middle separators."""
    _, _, path = moe_f32
    assert load_tokenizer(GGUFFile(path)).eos_token_ids == llama_cpp_end_of_generation(path)
    assert load_tokenizer(GGUFFile(smollm2_path())).eos_token_ids == llama_cpp_end_of_generation(smollm2_path())


def test_smollm2_tokenizer_matches_llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp")
    path = smollm2_path()
    ours = load_tokenizer(GGUFFile(path))
    ref = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in MULTILINGUAL:
        ids = ours.encode(text)
        assert ids == ref.tokenize(text.encode(), add_bos=False, special=True), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert [ours.decode([i]) for i in ours.encode("The capital of France is Paris")] == [
        "The",
        " capital",
        " of",
        " France",
        " is",
        " Paris",
    ]
    assert ours.encode("2024") == [ours.backend.token_to_id(d) for d in "2024"]  # smollm: one token per digit
    assert 2 in ours.eos_token_ids and not ours.add_bos  # <|im_end|>


def test_runtime_load_runs_a_gguf(moe_f32):
    from marco_local.generate import PromptCache, generate_step
    from marco_local.runtime import load
    from marco_local.sampling import make_sampler

    folder, ref, path = moe_f32
    loaded = load(str(path), dtype="f32", device="cpu")
    assert loaded.source.format == "gguf" and loaded.context_length == ref.config.max_position_embeddings
    model = loaded.model
    prompt = loaded.tokenizer.encode("The capital of France is")
    out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    steps = generate_step(model, prompt, PromptCache(make_cache(model, 64)), make_sampler(0.0), max_tokens=12)
    assert list(steps) == out[0, len(prompt) :].tolist()  # f32 GGUF: the same greedy tokens as transformers


@pytest.mark.parametrize("kernels", [*native.supported_tiers(), "torch"])
def test_a_damaged_file_that_computes_nan_is_said_in_one_line(moe_f32, tmp_path, monkeypatch, marco_main, kernels):
    """A router weight turned NaN (a flipped byte does it) once surfaced as "native kernel: unsupported type or
    shape" or torch.multinomial's internal error, both reported as bugs. Each native tier, and torch."""

    _, _, path = moe_f32
    damaged = tmp_path / "damaged.gguf"
    shutil.copy(path, damaged)
    router = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_gate_inp.weight")
    assert router.tensor_type == T.F32
    with open(damaged, "r+b") as f:
        f.seek(router.data_offset)
        f.write(np.full(router.n_elements, np.nan, dtype=np.float32).tobytes())
    tier = contextlib.nullcontext()
    if kernels == "torch":
        monkeypatch.setattr(native, "available", lambda: False)
    elif not native.available() or kernels not in native.supported_tiers():
        pytest.skip(f"no native {kernels} kernels here")
    else:
        tier = native.use_tier(kernels)
    with tier:
        for temperature in (0.0, 0.7):  # greedy (argmax would pick the NaN) and sampling
            code, err = marco_main("run", str(damaged), "hi", "-n", "3", "--temperature", str(temperature))
            assert code == 1 and err[0].startswith("Error: the model computed NaN") and len(err) == 2, err


@pytest.mark.usefixtures("native_tier")
def test_nan_through_quantized_layers_reaches_the_logits_and_is_said(q4_path, tmp_path, marco_main):
    """Every f16 scale of one attention weight NaN (bytes 0x7E7E): the native kernels quantize the NaN activations
    that follow; their block scale must stay NaN, or the logits come out finite and greedy decoding ends at once on
    token 0 with exit code 0, saying nothing. Each tier quantizes in its own code."""
    damaged = tmp_path / "damaged.gguf"
    shutil.copy(q4_path, damaged)
    target = next(t for t in gguf.GGUFReader(q4_path).tensors if t.name == "blk.0.attn_output.weight")
    with open(damaged, "r+b") as f:
        f.seek(target.data_offset)
        f.write(b"\x7e" * target.n_bytes)
    code, err = marco_main("run", str(damaged), "hi", "-n", "3", "--temperature", "0")
    assert code == 1 and err[0].startswith("Error: the model computed NaN"), err


def test_marco_run_on_a_gguf_leaves_heavy_modules_unimported(moe_f32):
    """Each costs RSS in every run (gguf-py 2.6 MiB with PyYAML, prompt_toolkit and rich's markdown 9 MiB): reading
    a GGUF has its own tables (quant/ggml_types.py) and only `marco chat` needs the terminal UI."""
    _, _, path = moe_f32
    code = (
        "import sys; from marco_local.cli.main import main\n"
        f"sys.argv = ['marco', 'run', {str(path)!r}, '--raw', '-n', '3', 'Hello']\n"
        "try:\n    main()\nfinally:\n"
        "    print(sorted({m.split('.')[0] for m in sys.modules} & {'gguf', 'yaml', 'prompt_toolkit', 'markdown_it'}),"
        " file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "no text generated"
    assert r.stderr.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------------------------------------------------------
# Dense architectures: llama (Q/K permuted in the file) and qwen3


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_dense_gguf(path: Path, arch: str, model: torch.nn.Module, tok_folder: Path, ggml_type: str) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tok = HFTokenizer.from_file(str(tok_folder / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    merges = json.loads((tok_folder / "tokenizer.json").read_text())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_eos_token_id(vocab["<|im_end|>"])
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    codec = codec_for(ggml_type)
    for name, p in model.state_dict().items():
        if name in names:
            gname = names[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{layer}.{layer_names[rest.removesuffix('.weight')]}.weight"
        p = p.detach().float()
        if arch == "llama" and name.endswith("q_proj.weight"):
            p = llama_permute(p, cfg.num_attention_heads)
        if arch == "llama" and name.endswith("k_proj.weight"):
            p = llama_permute(p, cfg.num_key_value_heads)
        if p.dim() == 2:
            w.add_tensor(gname, codec.quantize(p).numpy(), raw_dtype=codec.ggml_type)
        else:
            w.add_tensor(gname, p.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dense_reference(arch: str, folder: Path, **shape) -> torch.nn.Module:
    """A random-weight transformers `llama` / `qwen3` model (2 layers, GQA 4/2) over the fixture tokenizer's
    vocabulary; `shape` sets hidden_size, intermediate_size, head_dim, tie_word_embeddings."""
    import transformers
    from conftest import randomize

    cls, cfg_cls = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
    }[arch]
    vocab = HFTokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    cfg = cfg_cls(
        vocab_size=vocab,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        **shape,
    )
    torch.manual_seed(0)
    ref = cls(cfg).eval()
    randomize(ref, seed=3)
    return ref


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_dense_architectures_against_transformers(arch, checkpoint, tmp_path):
    folder, _ = checkpoint  # for its tokenizer
    shape = dict(hidden_size=64, intermediate_size=96, head_dim=16, tie_word_embeddings=False)
    ref = dense_reference(arch, folder, **shape)
    vocab = ref.config.vocab_size
    path = tmp_path / f"{arch}.gguf"
    write_dense_gguf(path, arch, ref, folder, "F32")
    model, tok = load_gguf(path, dtype=torch.float32)
    assert model.config.model_type == arch and not model.config.tie_word_embeddings
    ids = ids_batch(vocab, seed=5, shape=(2, 17))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(ids, make_cache(model, 32, batch_size=2))
    assert rel_err(got, expected) < F32_REL_TOL


# ---------------------------------------------------------------------------------------------------------------------
# SmolLM2: real weights (llama architecture, Q4_1 + Q8_0 embeddings, tied)


@pytest.fixture(scope="module")
def smollm2():
    return load_gguf(smollm2_path(), dtype=torch.bfloat16)


def greedy(model, tok, prompt_ids: list[int], n: int) -> str:
    from marco_local.generate import PromptCache, generate_step
    from marco_local.sampling import make_sampler

    cache = PromptCache(make_cache(model, len(prompt_ids) + n + 1))
    out = []
    for t in generate_step(model, prompt_ids, cache, make_sampler(0.0), max_tokens=n):
        if t in tok.eos_token_ids:
            break
        out.append(t)
    return tok.decode(out)


def test_smollm2_continuation_is_sensible(smollm2):
    model, tok = smollm2
    text = greedy(model, tok, tok.encode("The capital of France is"), 12)
    assert "Paris" in text


@torch.no_grad()
def test_smollm2_dense_as_on_cuda(smollm2):
    """The llama path of the dense build (what CUDA runs): Q/K rows unpermuted, the output tied to the embedding;
    logits equal the float32 exact path of the quantized runtime (1e-4), and it still knows Paris."""
    from marco_local.load.gguf import build_model

    _, tok = smollm2
    g = GGUFFile(smollm2_path())
    dense = build_model(g, dtype=torch.float32, dense=True)
    exact, _ = load_gguf(smollm2_path(), dtype=torch.float32)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    ids = torch.tensor([tok.encode(PROMPT)])
    got, want = dense(ids, make_cache(dense, 32)), exact(ids, make_cache(exact, 32))
    assert rel_err(got, want) < F32_REL_TOL
    assert "Paris" in greedy(dense, tok, tok.encode("The capital of France is"), 8)


def test_smollm2_chat_answers(smollm2):
    model, tok = smollm2
    # A 135M model answers the bare "What is the capital of France?" with "L'Étoile, la Cité, ..." (llama.cpp too);
    # asked for the city name, it, llama.cpp and our bf16 and float32 paths all answer "The capital of France is Paris."
    question = "What is the capital of France? Answer with the city name."
    prompt = tok.apply_chat_template([{"role": "user", "content": question}])
    text = greedy(model, tok, tok.encode(prompt), 40)
    assert "Paris" in text and "<|im" not in text


# llama.cpp quantizes activations to Q8_1 for its Q4_1 dot products; we run bf16 activations on int4 kernels.
# Measured on this prompt (13 tokens): max |diff| / max |ref| 0.059, KL 4.6e-3, argmax agreement 12/13 (our float32
# exact path: 0.054, 4.0e-3, 13/13). On the same weights dequantized to an F32 file, where llama.cpp does no
# activation quantization, the two agree to 1.8e-6 (test_smollm2_f32_matches_llama_cpp), as on the qwen3moe fixture.
LLAMA_CPP_REL_TOL = 0.1
LLAMA_CPP_KL = 0.02
PROMPT = "The capital of France is Paris, and the capital of Germany is"


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    # type_k/type_v 0: an F32 KV cache (llama.cpp's default f16 cache alone costs ~1e-3 of the logits)
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)


def test_smollm2_logits_match_llama_cpp(smollm2):
    model, tok = smollm2
    ids = tok.encode(PROMPT)
    expected = llama_cpp_logits(smollm2_path(), ids)
    with torch.no_grad():
        got = model(torch.tensor([ids]), make_cache(model, 64))[0].float()
    assert rel_err(got, expected) < LLAMA_CPP_REL_TOL
    assert kl(expected, got) < LLAMA_CPP_KL
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow  # writes a 540 MB file
def test_smollm2_f32_matches_llama_cpp(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path / "smollm2-f32.gguf"
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread, params.allow_requantize = 0, True, 2, True  # 0: ALL_F32
    assert llama_cpp.llama_model_quantize(str(smollm2_path()).encode(), str(path).encode(), ctypes.byref(params)) == 0
    model, tok = load_gguf(path, dtype=torch.float32)
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        got = model(torch.tensor([ids]), make_cache(model, 64))[0]
    assert rel_err(got, llama_cpp_logits(path, ids)) < F32_REL_TOL


def test_moe_fixture_matches_llama_cpp(moe_f32):
    """Our reading of a qwen3moe GGUF (expert layout, routing, rope) is llama.cpp's: F32 fixture, float32 both sides
    (measured 1.5e-6)."""
    _, _, path = moe_f32
    model, tok = load_gguf(path, dtype=torch.float32)
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        got = model(torch.tensor([ids]), make_cache(model, 64))[0]
    assert rel_err(got, llama_cpp_logits(path, ids)) < F32_REL_TOL


# ---------------------------------------------------------------------------------------------------------------------
# Malformed files: one-line MarcoError, never a crash or a hang


def tiny_gguf(path: Path, arch: str = "qwen3moe") -> Path:
    w = gguf.GGUFWriter(path, arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expect_error(path: Path, *words: str) -> MarcoError:
    with pytest.raises(MarcoError) as e:
        load_gguf(path)
    msg = e.value.message
    assert "\n" not in msg and all(w in msg for w in words), msg
    return e.value


def test_bad_magic(tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    data[:4] = b"GGML"
    path.write_bytes(data)
    expect_error(path, "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", "not a GGUF file")


def test_truncated_tensor_data(tmp_path):
    path = tiny_gguf(tmp_path / "t.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    expect_error(path, "truncated", "token_embd.weight")


def test_truncated_header(tmp_path):
    path = tiny_gguf(tmp_path / "h.gguf")
    for cut in (30, 60, 120):
        short = tmp_path / f"h{cut}.gguf"
        short.write_bytes(path.read_bytes()[:cut])
        expect_error(short, "truncated")


def test_absurd_counts_do_not_hang(tmp_path):
    path = tiny_gguf(tmp_path / "c.gguf")
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack("<Q", 1 << 60)  # metadata count
    path.write_bytes(data)
    expect_error(path, "truncated")


def test_unknown_tensor_type(tmp_path):
    path = tiny_gguf(tmp_path / "u.gguf")
    data = bytearray(path.read_bytes())
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 2 * 8  # after n_dims and two dims
    assert struct.unpack_from("<I", data, at)[0] == T.F32
    data[at : at + 4] = struct.pack("<I", 250)
    path.write_bytes(data)
    expect_error(path, "unknown GGML type 250", "token_embd.weight")


def test_type_without_codec(tmp_path):
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(path, arch="llama")
    for key, value in dict(block_count=1, embedding_length=256, feed_forward_length=256, head_count=4).items():
        getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((8, 66), dtype=np.uint8), raw_dtype=T.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    g = GGUFFile(path)
    assert g.tensors["token_embd.weight"].type_name == "IQ2_XXS"
    from marco_local.load.gguf import build_model

    with pytest.raises(MarcoError, match="IQ2_XXS"):
        build_model(g)


def test_unsupported_architecture(tmp_path):
    err = expect_error(tiny_gguf(tmp_path / "a.gguf", arch="gpt2"), "unsupported architecture 'gpt2'")
    assert "qwen3moe" in err.hint


def test_cli_one_line_error(tmp_path):
    path = tiny_gguf(tmp_path / "cli.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("MARCO_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "marco_local", "run", str(path), "hi"], capture_output=True, timeout=60, env=env
    )
    assert r.returncode == 1 and r.stdout == b""
    lines = r.stderr.decode().strip().splitlines()
    assert lines[0].startswith("Error:") and "truncated" in lines[0] and len(lines) <= 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gguf_on_cuda_without_a_gpu_is_refused_with_a_hint():
    from marco_local.load.gguf import build_model

    with pytest.raises(MarcoError, match="no CUDA device") as e:
        build_model(GGUFFile(smollm2_path()), device="cuda")
    assert "--device cpu" in e.value.hint


def test_gguf_experts_stay_in_the_file_only_on_the_cpu(moe_f32):
    """Off the CPU an offloaded GGUF's experts go to a memory store (gguf_experts.py), never read from the file."""
    from marco_local.load.gguf import build_model

    with pytest.raises(MarcoError, match="stay in the file only on the CPU"):
        build_model(GGUFFile(moe_f32[2]), dense=True, experts_in_file=True)


def test_inconsistent_or_unknown_tokenizer_metadata():
    from marco_local.formats.gguf_tokenizer import build_backend

    g = GGUFFile(smollm2_path())
    merges = g.metadata["tokenizer.ggml.merges"]
    g.metadata["tokenizer.ggml.merges"] = ["zzzq yyyq", *merges]  # a merge of tokens that are not in the vocabulary
    with pytest.raises(MarcoError, match="inconsistent"):
        build_backend(g)
    g.metadata["tokenizer.ggml.merges"] = merges
    g.metadata["tokenizer.ggml.pre"] = "made-up"
    with pytest.raises(MarcoError, match="pre-tokenizer 'made-up'"):
        build_backend(g)
