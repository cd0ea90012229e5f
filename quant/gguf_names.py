"""Hugging Face tensor names -> GGUF tensor names for `qwen3moe`, and the tensor classes the reports group by.

The table is what llama.cpp's converter produces (convert_hf_to_gguf.py `Qwen3MoeModel` through gguf-py's
`tensor_mapping.py`; tests check it against `gguf.get_tensor_name_map(MODEL_ARCH.QWEN3MOE, ...)`). Per-layer names are
relative to `model.layers.N.`; the experts of a layer are one stacked tensor whose HF name is the per-expert name
without the expert index (`mlp.experts.gate_proj`), as the converter names it after stacking.

Invariant: names only. Which tensors a checkpoint has, their shapes and their GGML types are the writer's business.
Dense FFN names (`mlp.gate_proj` of a layer listed in `mlp_only_layers`) are in the table for completeness, but
llama.cpp's `qwen3moe` graph has no dense layers (src/models/qwen3moe.cpp), so the writer refuses such checkpoints.
"""

from __future__ import annotations

ARCH = "qwen3moe"

GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",  # only written when the embeddings are untied
}

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",  # the router
    "mlp.experts.gate_proj": "ffn_gate_exps.weight",  # stacked [E, I, H]
    "mlp.experts.up_proj": "ffn_up_exps.weight",  # stacked [E, I, H]
    "mlp.experts.down_proj": "ffn_down_exps.weight",  # stacked [E, H, I]
    "mlp.gate_proj.weight": "ffn_gate.weight",  # dense layers only
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

LAYER_PREFIX = "model.layers."


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; a KeyError for a name not in the table."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    if hf_name.startswith(LAYER_PREFIX):
        layer, _, rest = hf_name[len(LAYER_PREFIX) :].partition(".")
        if layer.isdecimal() and rest in LAYER_NAMES:
            return f"blk.{int(layer)}.{LAYER_NAMES[rest]}"
    raise KeyError(f"no GGUF name for tensor {hf_name!r}")


def tensor_class(name: str) -> str:
    """The report class of a GGUF tensor: embeddings, attention, router, experts, dense ffn or norms."""
    if name in ("token_embd.weight", "output.weight"):
        return "embeddings"
    if name.endswith("_norm.weight"):
        return "norms"
    if "ffn_gate_inp" in name:
        return "router"
    if "_exps" in name:
        return "experts"
    if ".attn_" in name:
        return "attention"
    if ".ffn_" in name:
        return "dense ffn"
    return "other"
