"""Build a model from a GGUF file with its weights left quantized, plus the tokenizer the file carries.

The model (qwen3_moe, qwen3 or llama, chosen by `general.architecture`) is created on the meta device; then every
projection is replaced by a module that runs on the file's own bytes: `gguf_layers.make_linear` for linears (attention,
dense FFN, lm_head) and `gguf_layers.make_experts` for a layer's stacked experts, both handed zero-copy views of the
memory-mapped file. Norms, q/k norms and the router are small and F32 in every llama.cpp file: they become ordinary
parameters. The token embedding stays quantized too: a lookup dequantizes only the rows it reads, and a tied lm_head
runs on the same bytes through `make_linear`.

Interface with `marco_local/layers/gguf.py` (the fast kernels):
    make_linear(raw, ggml_type, out_features, in_features) -> nn.Module computing x @ W.T
    make_experts(gate_raw, up_raw, down_raw, ggml_types, num_experts, hidden, intermediate) -> Experts subclass
    make_embedding(raw, ggml_type, num_embeddings, dim, dtype) -> nn.Module mapping ids to `dtype` rows
`raw` is uint8 [rows, row_bytes] for a matrix and [E, rows, row_bytes] for stacked experts, GGML block layout.

File quirks handled here and nowhere else (the `sanitize` step): llama.cpp stores llama's Q/K rows permuted for its
interleaved RoPE (convert_hf_to_gguf.py, `LlamaModel.permute`); we undo it by reordering whole rows, which is exact
for every block format because GGML quantizes each row on its own. qwen3/qwen3moe files are not permuted.
"""

from __future__ import annotations

import functools
import gc
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quant.ggml_codecs import codec_for

from ..config import ModelConfig
from ..errors import MarcoError
from ..formats.gguf import GGUFFile, TensorInfo, model_config
from ..formats.gguf_tokenizer import load_tokenizer
from ..models.llama import LlamaForCausalLM
from ..models.qwen3 import Qwen3ForCausalLM
from ..models.qwen3_moe import Experts, Qwen3MoeForCausalLM, SparseMoeBlock
from ..tokenizer import Tokenizer
from .meta import meta_device

ProgressFn = Callable[[int, int], None]

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "qwen3_moe": Qwen3MoeForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "llama": LlamaForCausalLM,
}

# Hugging Face module name (inside model.layers.N) -> GGUF tensor name (inside blk.N), as gguf-py's tensor_mapping.py
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.experts.gate_proj": "ffn_gate_exps",
    "mlp.experts.up_proj": "ffn_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps",
}
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(module_name: str) -> str:
    """HF module name -> GGUF tensor name prefix (add `.weight`): model.layers.3.mlp.gate -> blk.3.ffn_gate_inp."""
    if module_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[module_name]
    _, _, layer, rest = module_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def _kernels(exact: bool) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module], Callable[..., nn.Module]]:
    """layers/gguf.py's make_linear, make_experts and make_embedding. `exact`: its modules are the float32 reference
    (dequantize on every call)."""
    from ..layers import gguf as gguf_layers

    make_linear = functools.partial(gguf_layers.make_linear, exact=exact)
    return make_linear, functools.partial(gguf_layers.make_experts, exact=exact), gguf_layers.make_embedding


def _dense_modules(
    dtype: torch.dtype, device: torch.device, quantized_experts: torch.device | None = None
) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module], Callable[..., nn.Module]]:
    """make_linear, make_experts and make_embedding that dequantize once, exactly, into plain modules on `device` in
    `dtype`: a GGUF on CUDA, where the GGUF kernels (CPU kernels) do not run. Costs the dense size in memory (a 4-bit
    file takes 4x its size in bf16); in return the model is the plain one, so CUDA graphs apply. With
    `quantized_experts`, experts stay the file's blocks on that device instead (layers/gguf_cuda.py)."""
    from ..layers.gguf import dequantize_rows

    def param(raw: torch.Tensor, ggml_type: int) -> nn.Parameter:
        return nn.Parameter(dequantize_rows(raw, ggml_type).to(device=device, dtype=dtype), requires_grad=False)

    def make_linear(raw: torch.Tensor, ggml_type: int, out_features: int, in_features: int) -> nn.Module:
        with meta_device():
            linear = nn.Linear(in_features, out_features, bias=False)
        linear.weight = param(raw, ggml_type)
        return linear

    def make_experts(gate_raw, up_raw, down_raw, ggml_types, num_experts: int, hidden: int, intermediate: int):
        if quantized_experts is not None:
            from ..layers.gguf_cuda import StackedGGUFExperts

            raws = (gate_raw, up_raw, down_raw)
            return StackedGGUFExperts(raws, ggml_types, hidden, intermediate, dtype, quantized_experts)
        with meta_device():
            experts = Experts(num_experts, hidden, intermediate)
        raws = (gate_raw, up_raw, down_raw)
        for name, raw, ggml_type in zip(("gate_proj", "up_proj", "down_proj"), raws, ggml_types, strict=True):
            shape = getattr(experts, name).shape
            stacked = torch.empty(shape, dtype=dtype, device=device)
            for e in range(num_experts):  # one expert's float32 copy at a time on the host
                stacked[e] = dequantize_rows(raw[e], ggml_type)
            experts._parameters[name] = nn.Parameter(stacked, requires_grad=False)
        return experts

    def make_embedding(raw: torch.Tensor, ggml_type: int, num_embeddings: int, dim: int, dtype: torch.dtype):
        with meta_device():
            embedding = nn.Embedding(num_embeddings, dim)
        embedding.weight = param(raw, ggml_type)
        return embedding

    return make_linear, make_experts, make_embedding


def _unpermute_rows(raw: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: per head, GGUF row 2j+s holds HF row s*hd/2+j (s = which half)."""
    head_dim = raw.shape[0] // n_heads
    idx = torch.arange(raw.shape[0]).view(n_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)
    return raw[idx]


def _native_available() -> bool:
    try:
        from ..kernels import native
    except ImportError:
        return False
    return native.available()


def _use_native_moe_blocks(model: nn.Module, cfg: ModelConfig) -> None:
    """Swap each (still meta) `SparseMoeBlock` for qlinear's `NativeMoeBlock` when the native kernels are there."""
    try:
        from ..kernels import native
        from ..layers.gguf import NativeMoeBlock
    except ImportError:
        return
    if not native.available():
        return
    blocks = [name for name, m in model.named_modules() if isinstance(m, SparseMoeBlock)]
    for name in blocks:
        with meta_device():
            _replace(model, name, NativeMoeBlock(cfg))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    model.get_submodule(parent)._modules[attr] = module


def _check_shape(g: GGUFFile, info: TensorInfo, expected: tuple[int, ...]) -> None:
    if tuple(info.shape) != tuple(expected):
        raise MarcoError(
            f"{g.path}: tensor {info.name} has shape {list(info.shape)}, the metadata implies {list(expected)}",
            hint="the file's metadata and tensors do not belong together",
        )


def _float_param(
    g: GGUFFile, info: TensorInfo, dtype: torch.dtype, device: torch.device, keep_f32: bool = False
) -> nn.Parameter:
    """A small float tensor as `dtype`; with keep_f32 an F32 tensor on the CPU stays a zero-copy float32 view of the
    file (a router: more precise, and no private copy: 13 MiB for Nano)."""
    if keep_f32 and info.type_name == "F32" and device.type == "cpu":
        return nn.Parameter(g.raw(info.name).view(torch.float32).reshape(info.shape), requires_grad=False)
    try:
        codec = codec_for(info.ggml_type)
    except NotImplementedError:
        raise _unsupported_type(g, info) from None
    value = codec.dequantize(g.raw(info.name)).reshape(info.shape)
    return nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)


def _unsupported_type(g: GGUFFile, info: TensorInfo) -> MarcoError:
    return MarcoError(
        f"{g.path}: tensor {info.name} is {info.type_name}, a type marco-local cannot run",
        hint="use a file quantized to F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K",
    )


def _check_type(g: GGUFFile, info: TensorInfo) -> int:
    try:
        codec_for(info.ggml_type)
    except NotImplementedError:
        raise _unsupported_type(g, info) from None
    return int(info.ggml_type)


def build_model(
    g: GGUFFile,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    experts_in_file: bool = False,
    dense: bool | None = None,
    quantized_experts: torch.device | None = None,
) -> nn.Module:
    """The model the GGUF describes, projections on the file's quantized bytes, the rest as `dtype` parameters.
    `experts_in_file`: the quantized experts are neither repacked nor read (their pages stay untouched), for an
    offload runtime (`marco_local.offload.install`) that reads them from the file on demand. `dense` (the default off
    the CPU): every weight dequantized into plain modules (`_dense_modules`); `quantized_experts` (dense models): the
    experts kept as the file's blocks on that device (`layers.gguf_cuda.StackedGGUFExperts`)."""
    for info in g.tensors.values():  # a type without a codec is the clearest thing to say about such a file
        _check_type(g, info)
    cfg = model_config(g)
    if f"blk.0.{_LAYER_NAMES['self_attn.q_proj']}.bias" in g:
        raise MarcoError(f"{g.path}: attention biases are not supported for {g.architecture}")
    device = torch.device(device)
    dense = device.type != "cpu" if dense is None else dense
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MarcoError("a GGUF model was asked for on CUDA, but no CUDA device is available", hint="use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise MarcoError(f"GGUF models run on the CPU or on CUDA, not on {device}", hint="use --device cpu")
    if dense and experts_in_file:
        raise MarcoError("a GGUF's experts can stay in the file only on the CPU", hint="use --device cpu")
    with meta_device():
        model = MODEL_CLASSES[cfg.model_type](cfg)
    if quantized_experts is not None and not dense:
        raise ValueError("quantized_experts applies to dense models (the CPU kernels keep every weight quantized)")
    makers = _dense_modules(dtype, device, quantized_experts) if dense else _kernels(exact=dtype == torch.float32)
    # Activations and norms in float32 where the native kernels run (they take float32 inputs): a prompt then keeps
    # the precision of llama.cpp, which keeps both in F32; the KV cache is then float16 like llama.cpp's default
    # (`kv_dtype` below: the size of bf16, 3 more bits of mantissa).
    act_dtype = torch.float32 if not dense and _native_available() else dtype
    norm_dtype = act_dtype
    make_linear, make_experts, make_embedding = makers
    unpermute = cfg.model_type == "llama"
    if not dense:
        _use_native_moe_blocks(model, cfg)

    used: set[str] = set()

    def info_of(tensor: str) -> TensorInfo:
        used.add(tensor)
        return g.info(tensor)

    jobs: list[Callable[[], None]] = []
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            infos = [info_of(f"{gguf_name(f'{name}.{p}')}.weight") for p in ("gate_proj", "up_proj", "down_proj")]
            E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
            for info, shape in zip(infos, ((E, I, D), (E, I, D), (E, D, I)), strict=True):
                _check_shape(g, info, shape)
            types = tuple(_check_type(g, i) for i in infos)

            lazy = {"in_file": "raw" if dtype == torch.float32 else "int4"} if experts_in_file else {}

            def job(name=name, infos=infos, types=types, E=E, D=D, I=I, lazy=lazy) -> None:
                _replace(model, name, make_experts(*(g.raw(i.name) for i in infos), types, E, D, I, **lazy))

            jobs.append(job)
        elif isinstance(module, nn.Linear) and not name.endswith("mlp.gate"):
            if name == "lm_head" and cfg.tie_word_embeddings and dense:
                continue  # tied to the embedding below
            if name == "lm_head" and cfg.tie_word_embeddings:
                info = info_of("token_embd.weight")
            else:
                info = info_of(f"{gguf_name(name)}.weight")
            _check_shape(g, info, (module.out_features, module.in_features))
            ggml_type = _check_type(g, info)
            heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
            n_heads = next((h for suffix, h in heads.items() if name.endswith(suffix)), 0) if unpermute else 0

            def job(name=name, info=info, t=ggml_type, out=module.out_features, inp=module.in_features, h=n_heads):
                data = _unpermute_rows(g.raw(info.name), h) if h else g.raw(info.name)
                _replace(model, name, make_linear(data, t, out, inp))

            jobs.append(job)
        elif isinstance(module, nn.Embedding):
            info = info_of(f"{gguf_name(name)}.weight")
            _check_shape(g, info, (cfg.vocab_size, cfg.hidden_size))
            t = _check_type(g, info)

            def job(name=name, info=info, t=t) -> None:
                _replace(model, name, make_embedding(g.raw(info.name), t, cfg.vocab_size, cfg.hidden_size, act_dtype))

            jobs.append(job)
    # norms, q/k norms, the router: small float parameters
    for name, p in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        if owner.endswith(("mlp.experts", "embed_tokens")) or owner in ("lm_head",):
            continue
        module = model.get_submodule(owner)
        if isinstance(module, nn.Linear) and not owner.endswith("mlp.gate"):
            continue
        info = info_of(f"{gguf_name(owner)}.{attr}")
        _check_shape(g, info, tuple(p.shape))

        router = owner.endswith("mlp.gate")

        def job(module=module, attr=attr, info=info, router=router) -> None:
            module._parameters[attr] = _float_param(g, info, norm_dtype, device, keep_f32=router)

        jobs.append(job)
    unused = sorted(set(g.tensors) - used - {"token_embd.weight"})
    if unused:  # llama.cpp refuses these too ("wrong number of tensors"): the file is not what its metadata says
        raise MarcoError(
            f"{g.path}: tensor {unused[0]} is not part of the model its metadata describes"
            + (f" ({len(unused) - 1} more)" if len(unused) > 1 else ""),
            hint="the file's metadata and tensors do not belong together",
        )
    for i, job in enumerate(jobs):
        job()
        if progress:
            progress(i + 1, len(jobs))
    if dense and cfg.tie_word_embeddings:  # one matrix, not two dense copies of token_embd
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a bug, not a user error: every meta tensor must have been replaced above
        raise RuntimeError(f"GGUF loader left meta tensors: {left[:5]}")
    model.kv_dtype = torch.float16 if act_dtype == torch.float32 and dtype != torch.float32 else dtype
    return model.eval()


CUDA_EXPERTS = ("auto", "dense", "quantized", "host")


def load_gguf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: ProgressFn | None = None,
    experts_in_file: bool = False,
    cuda_experts: str = "auto",
) -> tuple[nn.Module, Tokenizer]:
    """Model and tokenizer from nothing but a .gguf file (`experts_in_file`, and dense modules off the CPU: see
    `build_model`). `cuda_experts`, off the CPU: "dense" dequantizes the experts too (the fastest decode, 4x the
    file's bytes in bf16), "quantized" keeps them as the file's blocks on the device, "host" keeps those blocks on the
    CPU for an offload runtime to pack into pinned RAM (`offload.install`), "auto" is dense when the dense model fits
    in free VRAM, else quantized."""
    if cuda_experts not in CUDA_EXPERTS:
        raise ValueError(f"cuda_experts must be one of {CUDA_EXPERTS}, got {cuda_experts!r}")
    device = torch.device(device)
    g = GGUFFile(path)
    model_config(g)  # architecture errors before the tokenizer's
    tokenizer = load_tokenizer(g)
    quantized = None
    if device.type != "cpu":
        if cuda_experts == "auto":
            cuda_experts = "dense" if _dense_fits(g, dtype, device) else "quantized"
        quantized = {"dense": None, "quantized": device, "host": torch.device("cpu")}[cuda_experts]
    model = build_model(
        g, dtype=dtype, device=device, progress=progress, experts_in_file=experts_in_file, quantized_experts=quantized
    )
    # The metadata and the tokenizer's build leave many Python strings and temporaries behind; hand the freed memory
    # back before the prompt's activations and the KV cache arrive, which lowers the peak RSS.
    del g
    gc.collect()
    from ..layers.gguf import trim_heap

    trim_heap()
    return model, tokenizer


def _dense_fits(g: GGUFFile, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether every weight of `g` dequantized to `dtype` fits in the device's free memory, leaving the margin
    `--gpu-mem auto` leaves (the KV cache and activations come on top: a tight fit takes the quantized experts)."""
    from ..offload.budget import AUTO_GPU_MARGIN

    need = sum(math.prod(info.shape) for info in g.tensors.values()) * torch.finfo(dtype).bits // 8
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    return need + 2 * AUTO_GPU_MARGIN <= free
