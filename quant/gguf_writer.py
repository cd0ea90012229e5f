"""Write a Hugging Face qwen3_moe checkpoint as one llama.cpp-compatible GGUF file (`qwen3moe`), streaming.

What is in the file follows llama.cpp, the standard reader, so that llama.cpp, Ollama and LM Studio run it as is:
- metadata keys and tokenizer: convert_hf_to_gguf.py (`TextModel.set_gguf_parameters`, `Qwen2MoeModel`,
  `_set_vocab_gpt2`/`get_vocab_base`); special ids, merges, add_bos and the chat template come from gguf-py's own
  `SpecialVocab`, the class the converter uses;
- tensor names: `gguf_names.py`; the experts of a layer are stacked into one 3-D tensor (torch [E, I, H] for gate/up,
  [E, H, I] for down) as `Qwen2MoeModel.modify_tensors` does;
- per-tensor types: llama-quant.cpp (`llama_tensor_get_type_impl`, `tensor_type_fallback`) for the quantized presets,
  the converter's rules for f16/bf16; norms and the router (`ffn_gate_inp`) are F32 in every preset.

Invariants:
- Everything is checked (shapes, tokenizer, what llama.cpp can express) before the file is opened.
- Streaming: tensor infos are laid out first from the header shapes alone, then each tensor is read, quantized and
  written before the next is read; a layer's experts are quantized one expert at a time into that layer's output
  buffer, and the source shards are closed after each tensor so their mapped pages do not pile up. Peak memory is
  about one output tensor plus one source tensor, whatever the model size.
- Checkpoints llama.cpp's `qwen3moe` graph cannot express are refused (`MarcoError`), never written with a warning:
  it hard-wires all layers MoE and softmax routing with renormalised top-k (src/models/qwen3moe.cpp, `norm_w=true`),
  so a file for `norm_topk_prob: false` or dense layers would load and silently compute another model (or not load).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from marco_local.config import ModelConfig
from marco_local.demo import QWEN2_SPLIT
from marco_local.errors import MarcoError
from marco_local.formats.checkpoint import RECOMPUTED, Checkpoint

from .ggml_codecs import codec_for
from .gguf_names import ARCH, GLOBAL_NAMES, LAYER_NAMES, tensor_class

# gguf-py reports through `logging`; a library must not print, so give its loggers a handler that drops records
# (without one, Python's last-resort handler would print its warnings to stderr).
logging.getLogger("gguf").addHandler(logging.NullHandler())

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class GGUFPreset:
    ftype: F  # general.file_type (llama.h LLAMA_FTYPE_*)
    base: T  # the type of a tensor no rule moves


GGUF_PRESETS: dict[str, GGUFPreset] = {
    "f32": GGUFPreset(F.ALL_F32, T.F32),  # lossless; the reference the tests compare llama.cpp against
    "f16": GGUFPreset(F.MOSTLY_F16, T.F16),
    "bf16": GGUFPreset(F.MOSTLY_BF16, T.BF16),
    "q8_0": GGUFPreset(F.MOSTLY_Q8_0, T.Q8_0),
    "q4_0": GGUFPreset(F.MOSTLY_Q4_0, T.Q4_0),
    "q5_0": GGUFPreset(F.MOSTLY_Q5_0, T.Q5_0),
    "q4_k_m": GGUFPreset(F.MOSTLY_Q4_K_M, T.Q4_K),
    "q5_k_m": GGUFPreset(F.MOSTLY_Q5_K_M, T.Q5_K),
    "q6_k": GGUFPreset(F.MOSTLY_Q6_K, T.Q6_K),
}

# llama-quant.cpp tensor_type_fallback: a K-quant needs rows that are a multiple of 256 weights.
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def _block(t: T) -> int:
    return gguf.GGML_QUANT_SIZES[t][0]


def _row_bytes(t: T, ncols: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    return ncols // block * size


def _use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama-quant.cpp `use_more_bits`: the first and last eighth of the layers and every third one between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _fallback(t: T, ncols: int) -> T:
    if ncols % _block(t) == 0:
        return t
    t = _FALLBACK.get(t, t)
    return t if ncols % _block(t) == 0 else T.F16


def tensor_type(preset: str, name: str, shape: tuple[int, ...], n_layer: int, n_expert: int, tied: bool) -> T:
    """The GGML type llama.cpp gives GGUF tensor `name` (torch `shape`) in `preset`."""
    return _fallback(_mix_type(preset, name, shape, n_layer, n_expert, tied), shape[-1])


def _mix_type(preset: str, name: str, shape: tuple[int, ...], n_layer: int, n_expert: int, tied: bool) -> T:
    """The type before the row-length fallback.

    Mirrors llama_tensor_get_type_impl for the presets we offer: tied token_embd / output get Q6_K (Q8_0 stays Q8_0),
    attn_v and ffn_down get Q6_K on the `use_more_bits` layers of the _M mixes, llama.cpp's special case for
    8-expert models (attn_k/attn_v Q8_0, attn_output Q5_K in Q4_K_M), then the row-length fallback.
    llama.cpp visits attn_v tensors in layer order (weight_name_comparer), so its attn_v counter is the layer index.
    """
    p = GGUF_PRESETS[preset]
    if len(shape) < 2 or name.endswith("_norm.weight") or "ffn_gate_inp" in name:
        return T.F32
    if p.base in (T.F32, T.F16, T.BF16):  # convert_hf_to_gguf --outtype f32/f16/bf16: every other weight in that type
        return p.base
    ftype, t, ncols = p.ftype, p.base, shape[-1]
    mixes = (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M)
    more = name.startswith("blk.") and _use_more_bits(int(name.split(".")[1]), n_layer)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        t = T.Q8_0 if ncols % _block(t) else (t if t == T.Q8_0 else T.Q6_K)
    elif name == "token_embd.weight":
        pass
    elif ".attn_v." in name:
        if ftype in mixes and more:
            t = T.Q6_K
        if n_expert == 8:
            t = T.Q8_0
    elif ".attn_k." in name:
        if n_expert == 8:
            t = T.Q8_0
    elif ".ffn_down" in name:
        if ftype in mixes and more:
            t = T.Q6_K
    elif ".attn_output." in name:
        if n_expert == 8 and ftype == F.MOSTLY_Q4_K_M:
            t = T.Q5_K
    return t


@dataclass
class PlannedTensor:
    """One GGUF tensor: where its data comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]  # torch order; GGUF stores it reversed (ggml `ne`)
    ggml_type: T
    wanted: T  # the mix's type before the row-length fallback
    read: Callable[[], torch.Tensor] | None = None  # the whole tensor
    read_expert: Callable[[int], torch.Tensor] | None = None  # expert e of a stacked tensor
    sources: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1])) * _row_bytes(self.ggml_type, self.shape[-1])


def check_expressible(cfg: ModelConfig) -> None:
    """Refuse what llama.cpp's qwen3moe graph cannot compute (see the module docstring)."""
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    hint = "use a bitsandbytes preset (--to nf4 / int8), which keeps the transformers layout"
    if dense:
        raise MarcoError(
            f"layers {dense} are dense (mlp_only_layers / decoder_sparse_step); "
            "llama.cpp's qwen3moe has MoE layers only",
            hint=hint,
        )
    if not cfg.norm_topk_prob:
        raise MarcoError(
            "norm_topk_prob is false; llama.cpp's qwen3moe always renormalises the top-k routing weights", hint=hint
        )
    if cfg.attention_bias:
        raise MarcoError("attention_bias is true; llama.cpp's qwen3moe has no attention biases", hint=hint)


def _expert_reader(ckpt: Checkpoint, prefix: str, proj: str, n_expert: int, shape: tuple[int, int]):
    """Read expert e of `proj` from per-expert tensors (what save_pretrained writes) or a fused 5.x tensor."""
    per_expert = [f"{prefix}mlp.experts.{e}.{proj}.weight" for e in range(n_expert)]
    if all(n in ckpt for n in per_expert):
        for n in per_expert:
            if tuple(ckpt.shape(n)) != shape:
                raise MarcoError(
                    f"tensor {n} has shape {list(ckpt.shape(n))} in {ckpt.folder}, the config implies {list(shape)}",
                    hint="config.json and the weights do not belong together",
                )
        return (lambda e: ckpt.get(per_expert[e])), per_expert
    fused_name = f"{prefix}mlp.experts.gate_up_proj" if proj != "down_proj" else f"{prefix}mlp.experts.down_proj"
    if fused_name in ckpt:
        rows = shape[0] * (2 if proj != "down_proj" else 1)
        want = (n_expert, rows, shape[1])
        if tuple(ckpt.shape(fused_name)) != want:
            raise MarcoError(
                f"tensor {fused_name} has shape {list(ckpt.shape(fused_name))} in {ckpt.folder}, expected {list(want)}"
            )
        cache: dict[str, torch.Tensor] = {}
        lo = shape[0] if proj == "up_proj" else 0

        def read(e: int) -> torch.Tensor:
            if "t" not in cache:  # read once per stacked tensor, dropped with the closure
                cache["t"] = ckpt.get(fused_name)
            return cache["t"][e, lo : lo + shape[0]]

        return read, [fused_name]
    missing = next(n for n in per_expert if n not in ckpt)
    raise MarcoError(f"tensor {missing} is missing from the checkpoint in {ckpt.folder}", hint="re-download the model")


def plan_gguf(ckpt: Checkpoint, cfg: ModelConfig, preset: str) -> list[PlannedTensor]:
    """Every tensor of the output, in file order, checked against the config (reads headers only)."""
    if preset not in GGUF_PRESETS:
        raise MarcoError(f"unknown GGUF preset {preset!r}", hint=f"one of: {', '.join(GGUF_PRESETS)}")
    check_expressible(cfg)
    D, L, E, I = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_experts, cfg.moe_intermediate_size
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    tied = cfg.tie_word_embeddings
    plan: list[PlannedTensor] = []

    def single(hf: str, gname: str, shape: tuple[int, ...]) -> None:
        if hf not in ckpt:
            raise MarcoError(f"tensor {hf} is missing from the checkpoint in {ckpt.folder}", hint="re-download it")
        found = tuple(ckpt.shape(hf))
        if found != shape:
            raise MarcoError(
                f"tensor {hf} has shape {list(found)} in {ckpt.folder}, the config implies {list(shape)}",
                hint="config.json and the weights do not belong together",
            )
        want = _mix_type(preset, gname, shape, L, E, tied)
        t = _fallback(want, shape[-1])
        plan.append(PlannedTensor(gname, shape, t, want, read=lambda: ckpt.get(hf), sources=[hf]))

    single("model.embed_tokens.weight", GLOBAL_NAMES["model.embed_tokens.weight"], (cfg.vocab_size, D))
    layer_shapes = {
        "input_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (nq * hd, D),
        "self_attn.k_proj.weight": (nkv * hd, D),
        "self_attn.v_proj.weight": (nkv * hd, D),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "self_attn.o_proj.weight": (D, nq * hd),
        "post_attention_layernorm.weight": (D,),
        "mlp.gate.weight": (E, D),
    }
    expert_shapes = {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}
    for layer in range(L):
        prefix = f"model.layers.{layer}."
        for rel, shape in layer_shapes.items():
            single(prefix + rel, f"blk.{layer}.{LAYER_NAMES[rel]}", shape)
        for proj, shape in expert_shapes.items():
            gname = f"blk.{layer}.{LAYER_NAMES['mlp.experts.' + proj]}"
            read_expert, sources = _expert_reader(ckpt, prefix, proj, E, shape)
            want = _mix_type(preset, gname, (E, *shape), L, E, tied)
            t = _fallback(want, shape[-1])
            plan.append(PlannedTensor(gname, (E, *shape), t, want, read_expert=read_expert, sources=sources))
    single("model.norm.weight", GLOBAL_NAMES["model.norm.weight"], (D,))
    if not tied:
        single("lm_head.weight", GLOBAL_NAMES["lm_head.weight"], (cfg.vocab_size, D))
    # a tensor left out would make the file compute another model (a shared expert, experts past num_experts, ...)
    used = {name for t in plan for name in t.sources}
    unknown = [n for n in ckpt.names() if n not in used and not RECOMPUTED.fullmatch(n)]
    unknown = [n for n in unknown if not (tied and n == "lm_head.weight")]  # a copy of the embeddings
    if unknown:
        raise MarcoError(
            f"unexpected tensor {unknown[0]} in {ckpt.folder} ({len(unknown)} unknown)",
            hint="the checkpoint holds weights a qwen3_moe GGUF has no place for",
        )
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer (convert_hf_to_gguf.py get_vocab_base + _set_vocab_gpt2, without transformers)


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py `does_token_look_special`."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _split_regexes(pre: dict | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [r for p in pre.get("pretokenizers", []) for r in _split_regexes(p)]
    if pre.get("type") == "Split":
        return [pre.get("pattern", {}).get("Regex", "")]
    return []


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    pre: str
    special: gguf.SpecialVocab


def read_vocab(src_folder: Path, n_vocab: int) -> GGUFVocab:
    """Tokens padded to the embedding rows, token types, pre-tokenizer name and special tokens of a Qwen BPE."""
    from tokenizers import Tokenizer

    path = Path(src_folder) / "tokenizer.json"
    if not path.is_file():
        raise MarcoError(f"no tokenizer.json in {src_folder}", hint="the GGUF file carries the tokenizer; re-download")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        backend = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise MarcoError(f"cannot read {path}: {e}") from e
    if raw.get("model", {}).get("type") != "BPE":
        raise MarcoError(f"{path} is not a BPE tokenizer; GGUF `gpt2` vocabularies are byte-level BPE")
    # The converter identifies the pre-tokenizer by hashing the tokenization of a test string, which only works for
    # the published vocabularies; the split regex itself is what llama.cpp's `qwen2` pre-type implements.
    if QWEN2_SPLIT not in _split_regexes(raw.get("pre_tokenizer")):
        raise MarcoError(
            "the tokenizer's pre-tokenizer is not Qwen2's split regex; llama.cpp would split text differently",
            hint="GGUF export supports Qwen-tokenizer models (Marco-Nano, Marco-Mini)",
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    if vocab and max(vocab.values()) >= n_vocab:
        raise MarcoError(f"the tokenizer has ids up to {max(vocab.values())}, the embedding only {n_vocab} rows")
    added = {a["content"]: a for a in raw.get("added_tokens", [])}
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        a = added.get(token)
        if a is None:
            types.append(gguf.TokenType.NORMAL)
        else:
            if not a.get("normalized", not a.get("special", False)):
                # llama.cpp expects added tokens pre-normalised; the converter round-trips them through the tokenizer
                token = backend.decode(backend.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if a.get("special") or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        tokens.append(token)
    special = gguf.SpecialVocab(src_folder, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise MarcoError(f"{path} has no BPE merges", hint="the tokenizer file is incomplete")
    return GGUFVocab(tokens, types, "qwen2", special)


def _model_name(src_folder: Path) -> str:
    """The repo name for a Hugging Face cache snapshot (models--org--name/snapshots/<hash>), else the folder name."""
    p = Path(src_folder).resolve()
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.split("--")[-1]
    return p.name


def _add_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, src_folder: Path, preset: str, vocab: GGUFVocab) -> None:
    """The keys convert_hf_to_gguf.py writes for Qwen3MoeForCausalLM, in its order."""
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_model_name(src_folder))
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size or cfg.moe_intermediate_size * cfg.num_experts_per_tok)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear" and scaling.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_file_type(GGUF_PRESETS[preset].ftype)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    vocab.special.add_to_gguf(w, quiet=True)
    if "bos" not in vocab.special.add_special_token:
        w.add_add_bos_token(False)  # Qwen tokenizers add no BOS (transformers' Qwen2Tokenizer)


def _encode(t: PlannedTensor, advance: Callable[[int], None]) -> torch.Tensor:
    codec = codec_for(t.ggml_type)
    if t.read_expert is None:
        out = codec.quantize(t.read())
        advance(t.n_params)
        return out
    n_expert = t.shape[0]
    out = torch.empty((n_expert, *t.shape[1:-1], _row_bytes(t.ggml_type, t.shape[-1])), dtype=torch.uint8)
    for e in range(n_expert):
        out[e] = codec.quantize(t.read_expert(e))
        advance(t.n_params // n_expert)
    return out


def _without_layer(name: str) -> str:
    """`blk.3.attn_k.weight` -> `attn_k.weight`, so one note covers every layer; `token_embd.weight` stays whole."""
    return re.sub(r"^blk\.\d+\.", "", name)


def write_gguf(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    src_folder: str | Path,
    out_path: str | Path,
    preset: str,
    progress: ProgressFn | None = None,
    tensor_progress: ProgressFn | None = None,
) -> dict:
    """Write `out_path` (the caller makes it atomic): `progress(weights done, total)`, `tensor_progress(i, n)`.

    Returns {"format": "gguf", "file_type": int, "tensors": [{name, class, type, n_params, n_bytes}], "warnings": []}.
    """
    plan = plan_gguf(ckpt, cfg, preset)
    vocab = read_vocab(Path(src_folder), cfg.vocab_size)
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    _add_metadata(writer, cfg, Path(src_folder), preset, vocab)
    for t in plan:
        # element shape + raw_dtype: gguf-py stores the shape as given and the type as raw_dtype
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.ggml_type)
    total = sum(t.n_params for t in plan)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    try:
        writer.write_header_to_file(path=Path(out_path))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(plan):
            data = _encode(t, advance)
            writer.write_tensor_data(data.numpy())
            del data
            t.read = t.read_expert = None  # drops a fused expert tensor cached by its reader
            # Pages of the memory-mapped shards that were read stay resident (and count as our RSS) while a shard is
            # open; releasing the maps after each tensor bounds them by one tensor instead of the whole model.
            ckpt.release()
            if tensor_progress:
                tensor_progress(i + 1, len(plan))
        writer.flush()
    finally:
        writer.close()
    warnings = []
    moved = [t for t in plan if t.wanted != t.ggml_type]
    fallbacks = sorted({(_without_layer(t.name), t.shape[-1], t.wanted.name, t.ggml_type.name) for t in moved})
    for name, ncols, wanted, got in fallbacks:
        warnings.append(f"{name}: rows of {ncols} do not fit {wanted} blocks, stored as {got} (as llama.cpp does)")
    return {
        "format": "gguf",
        "file_type": int(GGUF_PRESETS[preset].ftype),
        "tensors": [
            {
                "name": t.name,
                "class": tensor_class(t.name),
                "type": t.ggml_type.name,
                "n_params": t.n_params,
                "n_bytes": t.nbytes,
            }
            for t in plan
        ],
        "warnings": warnings,
    }
