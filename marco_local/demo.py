"""The built-in `demo` model: a tiny random-weight Marco-architecture checkpoint built locally, deterministically.

It lets every command run with no download. The folder is a normal Hugging Face checkpoint (config.json in the 4.x
spelling, per-expert safetensors, tokenizer.json, tokenizer_config.json with a ChatML template), so it exercises the
same loading path as a real model. Its answers are random text: the weights are random. The byte-level BPE tokenizer
is trained offline on a small built-in multilingual corpus with Qwen's pre-tokenizer regex and special tokens; the
test suite builds its fixtures with the same function.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .paths import demo_dir
from .tokenizer import CHATML_TEMPLATE

# Qwen2's split regex (tokenizer.json pre_tokenizer of every Qwen2/Qwen3 model); llama.cpp calls it `qwen2`.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = """\
The capital of France is Paris. Marco is a mixture-of-experts language model that wakes up only a few of its experts
for each token. Hello! How are you today? I am fine, thank you. What is the weather like? It is sunny and warm.
def add(a, b):
    return a + b
for i in range(10): print(i * i)
La capitale de la France est Paris. Bonjour, comment allez-vous ? Je vais bien, merci.
Die Hauptstadt von Deutschland ist Berlin. Guten Tag! Wie geht es Ihnen?
La capital de España es Madrid. ¿Cómo estás? Muy bien, gracias.
A capital de Portugal é Lisboa. Olá, tudo bem?
Türkiye'nin başkenti Ankara'dır. Merhaba, nasılsın?
Столица России — Москва. Привет, как дела?
法国的首都是巴黎。你好，今天天气怎么样？
日本の首都は東京です。こんにちは、お元気ですか？
한국의 수도는 서울입니다. 안녕하세요!
عاصمة مصر هي القاهرة. مرحبا، كيف حالك؟
Ibu kota Indonesia adalah Jakarta. Apa kabar?
Thủ đô của Việt Nam là Hà Nội. Xin chào!
1 2 3 4 5 6 7 8 9 0 + - * / = ( ) [ ] { } < > , . ; : ! ? " ' 😀 🚀 ✓
"""

DEMO_CONFIG = {
    "model_type": "qwen3_moe",
    "architectures": ["Qwen3MoeForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 384,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,  # random tied embeddings make a random model repeat its input
    "attention_bias": False,
    "hidden_act": "silu",
}
DEMO_SEED = 1234


def build_tokenizer(vocab_size: int = 800, corpus: str = CORPUS) -> Tokenizer:
    """A byte-level BPE with Qwen's regex and special tokens, trained on `corpus` (deterministic for a given corpus)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return tok


def write_tokenizer_files(tok: Tokenizer, folder: Path, chat_template: str = CHATML_TEMPLATE) -> None:
    tok.save(str(folder / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": chat_template,
        "model_max_length": 4096,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False), encoding="utf-8")


def random_checkpoint_tensors(config: dict, seed: int, silent_tokens: list[int] = ()) -> dict[str, torch.Tensor]:
    """Per-expert HF-layout tensors with a scale that keeps activations sane through the layers.

    `silent_tokens` get zero lm_head rows (a logit of 0, far below the top ones): the demo uses it for lone bytes
    that are not whole UTF-8 characters, so that its random text is at least readable.
    """
    g = torch.Generator().manual_seed(seed)
    D, I, E = config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]
    hd, nq, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return (1.0 + 0.05 * torch.randn(n, generator=g)).to(torch.bfloat16)

    t = {"model.embed_tokens.weight": (torch.randn(config["vocab_size"], D, generator=g)).to(torch.bfloat16)}
    for L in range(config["num_hidden_layers"]):
        p = f"model.layers.{L}."
        t[p + "input_layernorm.weight"] = ones(D)
        t[p + "post_attention_layernorm.weight"] = ones(D)
        t[p + "self_attn.q_proj.weight"] = rnd(nq * hd, D)
        t[p + "self_attn.k_proj.weight"] = rnd(nkv * hd, D)
        t[p + "self_attn.v_proj.weight"] = rnd(nkv * hd, D)
        t[p + "self_attn.o_proj.weight"] = rnd(D, nq * hd)
        t[p + "self_attn.q_norm.weight"] = ones(hd)
        t[p + "self_attn.k_norm.weight"] = ones(hd)
        t[p + "mlp.gate.weight"] = rnd(E, D) * 4
        for e in range(E):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = rnd(I, D)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = rnd(I, D)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = rnd(D, I)
    t["model.norm.weight"] = ones(D)
    if not config.get("tie_word_embeddings", False):
        lm_head = torch.randn(config["vocab_size"], D, generator=g) * 0.15
        lm_head[list(silent_tokens)] = 0.0
        t["lm_head.weight"] = lm_head.to(torch.bfloat16)
    return t


def ensure_demo_model(folder: Path | None = None) -> Path:
    """Build the demo checkpoint on first use; later calls return the cached folder."""
    folder = folder or demo_dir()
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
    try:
        tok = build_tokenizer()
        config = dict(DEMO_CONFIG, vocab_size=tok.get_vocab_size())
        eos = tok.token_to_id("<|im_end|>")
        config.update(bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=eos)
        write_tokenizer_files(tok, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        gen = {"eos_token_id": [eos, tok.token_to_id("<|endoftext|>")], "temperature": 0.7, "top_p": 0.8, "top_k": 20}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        partial = [i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i])]
        save_file(
            random_checkpoint_tensors(config, DEMO_SEED, partial),
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
