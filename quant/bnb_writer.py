"""Write a bitsandbytes-quantized checkpoint folder (presets `nf4`, `fp4`, `int8`) from a Hugging Face checkpoint.

The output is the layout transformers 4.x `save_pretrained` writes for a bnb-quantized `qwen3_moe` whose experts are
`nn.Linear`s (one per expert): every quantized linear `X` is stored as

- 4-bit: `X.weight` (uint8 `[numel / 2, 1]`, two codes per byte, first value in the high nibble) plus exactly what
  bitsandbytes' `QuantState.as_dict(packed=True)` serializes under `X.weight.`: `absmax`, `quant_map`, with double
  quantization `nested_absmax` and `nested_quant_map`, and `quant_state.bitsandbytes__nf4` (or `__fp4`), a uint8 JSON
  blob (quant type, blocksize 64, dtype, shape, nested blocksize/dtype/offset);
- int8 (LLM.int8, row-wise absmax): `X.weight` int8 `[out, in]`, `X.SCB` float32 `[out]` (row absmax) and
  `X.weight_format` uint8 scalar 0 ("row"), as `bnb.nn.Linear8bitLt._save_to_state_dict` writes them.

Quantized: the attention projections (q/k/v/o), every expert's gate/up/down projection and dense MLP layers'
projections. Kept in bf16: the router (`mlp.gate`), norms, embeddings and an untied `lm_head`; config.json names them
in `quantization_config.llm_int8_skip_modules` (transformers matches those names as module-name suffixes).

Codecs are bitsandbytes' own, run on the CPU: `bitsandbytes.functional.quantize_4bit(blocksize=64,
compress_statistics=double_quant)` and `int8_vectorwise_quant` (bitsandbytes 0.50 ships CPU implementations of both).
Inputs are prepared like bitsandbytes' `Params4bit`/`Int8Params` do when transformers quantizes a bf16 model: 4-bit
quantizes the bf16 weight (so the quant state's dtype is bfloat16), int8 quantizes it cast on to float16.

Streaming invariant: one source tensor (or one batch of a layer's experts, `EXPERT_BATCH_WEIGHTS`) is read
(memory-mapped), quantized and appended to the current shard's data files before the next is read, and the source
maps are released after each layer, so peak memory is about one layer of mapped source pages plus one batch and its
temporaries, whatever the model size.
Shards are written as safetensors files of at most `max_shard_bytes` of tensor data; since a safetensors header must
precede the data, each shard's tensors go first to side files (one per dtype width, so that every tensor ends up
aligned, as safetensors' own writer arranges them), which are then concatenated behind the header. One shard is named
`model.safetensors`; several are `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, as
transformers names them. Only files inside `out_dir` are written; the caller owns the folder (temp name, rename).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from marco_local.config import ModelConfig
from marco_local.errors import MarcoError
from marco_local.formats.checkpoint import RECOMPUTED, Checkpoint

# bitsandbytes logs a warning on import when its optional CPU kernel package is absent; a library must not print.
logging.getLogger("bitsandbytes").addHandler(logging.NullHandler())

ProgressFn = Callable[[int, int], None]

PRESETS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # weights per 4-bit absmax block (bitsandbytes' and transformers' default)
NESTED_BLOCKSIZE = 256  # absmax values per block of the double quantization (fixed in quantize_4bit)
EXPERT_BATCH_WEIGHTS = 1 << 23  # weights quantized per batched call: bounds the float32 temporaries to ~100 MB
MAX_SHARD_BYTES = 2 * 1000**3  # "2GB" in transformers' decimal units
SKIP_MODULES = ["lm_head", "mlp.gate"]  # kept in bf16; embed_tokens is not a Linear, so transformers never converts it
KEEP_DTYPE = torch.bfloat16
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
CLASSES = ("attention", "router", "experts", "mlp", "embeddings", "norms")
_SHARD_NAME = re.compile(r"model(-\d{5,}-of-\d{5,})?\.safetensors")  # as `_ShardWriter.close` names them

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint8: "U8",
    torch.int8: "I8",
}
_ATTN = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.(weight|bias)")
_NORM = re.compile(
    r"(model\.layers\.\d+\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)|model\.norm)\.weight"
)
_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")
_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)")  # transformers 5 in-memory names
_DENSE = re.compile(r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight")
_ROUTER = re.compile(r"model\.layers\.\d+\.mlp\.gate\.weight")


def _bnbF():
    """bitsandbytes.functional, imported on first use (importing it costs seconds: it sets up torch.compile)."""
    import bitsandbytes.functional

    return bitsandbytes.functional


def quantization_config(preset: str, double_quant: bool = True) -> dict[str, Any]:
    """What transformers' `BitsAndBytesConfig.to_dict()` writes into config.json for this preset (all keys)."""
    four = preset in ("nf4", "fp4")
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": "bfloat16" if four else "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": preset if four else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant) if four else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": list(SKIP_MODULES),
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


def is_output_file(name: str) -> bool:
    """Whether `write_bnb` writes a file of this name: `quantize --force` replaces only folders that hold just these."""
    if name in ("config.json", "model.safetensors.index.json", *TOKENIZER_FILES):
        return True
    return _SHARD_NAME.fullmatch(name) is not None


def quantize_linear(w: torch.Tensor, preset: str, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """One Linear weight [out, in] -> its state-dict entries, keyed by suffix after the module name."""
    return quantize_linears(w.unsqueeze(0), preset, double_quant)[0]


def quantize_linears(ws: torch.Tensor, preset: str, double_quant: bool = True) -> list[dict[str, torch.Tensor]]:
    """k stacked Linear weights [k, out, in] -> k state dicts, each bit-identical to quantizing that weight alone.

    bitsandbytes' CPU ops have a large fixed cost per call (~20 ms), so a layer's experts are quantized in batches.
    Batching is exact because every stage works on independent blocks that never straddle two weights: int8 rows;
    4-bit blocks of 64 (when out*in is a multiple of 64); nested absmax blocks of 256 (when out*in is a multiple of
    64*256). The nested offset (mean absmax) is computed per weight. Otherwise it falls back to one call per weight.
    """
    bnbF = _bnbF()
    k, rows, cols = ws.shape
    if preset == "int8":
        # as bnb's Int8Params._quantize of a bf16 model: float16 input, absmax per row
        cb, scb, _ = bnbF.int8_vectorwise_quant(ws.reshape(k * rows, cols).to(KEEP_DTYPE).to(torch.float16))
        fmt = torch.tensor(0, dtype=torch.uint8)
        return [
            {"weight": cb[i * rows : (i + 1) * rows], "SCB": scb[i * rows : (i + 1) * rows], "weight_format": fmt}
            for i in range(k)
        ]
    n = rows * cols
    if k > 1 and n % (BLOCKSIZE * (NESTED_BLOCKSIZE if double_quant else 1)):
        return [quantize_linears(w.unsqueeze(0), preset, double_quant)[0] for w in ws]
    packed, state = bnbF.quantize_4bit(
        ws.reshape(k * rows, cols).contiguous().to(KEEP_DTYPE),
        blocksize=BLOCKSIZE,
        compress_statistics=False,
        quant_type=preset,
        quant_storage=torch.uint8,
    )
    nb = -(n // -BLOCKSIZE)  # absmax values per weight
    absmax = state.absmax.view(k, nb)
    offsets = qabsmax = nested = None
    if double_quant:  # what quantize_4bit(compress_statistics=True) does, per weight
        offsets = [absmax[i].clone().mean() for i in range(k)]
        centred = torch.cat([absmax[i] - offsets[i] for i in range(k)])
        qabsmax, nested = bnbF.quantize_blockwise(centred, blocksize=NESTED_BLOCKSIZE)
    out = []
    per_nested = -(nb // -NESTED_BLOCKSIZE)
    for i in range(k):
        state2 = None
        if double_quant:
            state2 = bnbF.QuantState(
                absmax=nested.absmax[i * per_nested : (i + 1) * per_nested],
                code=nested.code,
                blocksize=NESTED_BLOCKSIZE,
                dtype=torch.float32,
            )
        st = bnbF.QuantState(
            absmax=qabsmax[i * nb : (i + 1) * nb] if double_quant else absmax[i],
            shape=torch.Size((rows, cols)),
            code=state.code,
            blocksize=BLOCKSIZE,
            quant_type=preset,
            dtype=KEEP_DTYPE,
            offset=offsets[i] if double_quant else None,
            state2=state2,
        )
        entry = {"weight": packed[i * n // 2 : (i + 1) * n // 2]}
        entry.update({f"weight.{key}": v for key, v in st.as_dict(packed=True).items()})
        out.append(entry)
    return out


def classify(name: str) -> str | None:
    """Tensor class of a source tensor name, or None for one this writer does not know."""
    if _ATTN.fullmatch(name):
        return "attention"
    if _EXPERT.fullmatch(name) or _FUSED.fullmatch(name):
        return "experts"
    if _ROUTER.fullmatch(name):
        return "router"
    if _DENSE.fullmatch(name):
        return "mlp"
    if _NORM.fullmatch(name):
        return "norms"
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "embeddings"
    return None


def _natural_key(name: str) -> list:
    """model.layers.2.mlp.experts.10 sorts after ...experts.9: output files read in model order."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class _ShardWriter:
    """Appends tensors to safetensors shards of bounded size without holding a shard in memory."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.done: list[tuple[Path, list[str]]] = []  # (written shard, its tensor names)
        self.total_bytes = 0
        self._start()

    def _start(self) -> None:
        n = len(self.done) + 1
        self._parts = {w: self.out_dir / f".shard{n:05d}.w{w}.part" for w in (8, 4, 2, 1)}
        self._files = {w: open(p, "wb") for w, p in self._parts.items()}
        self._entries: list[tuple[str, str, list[int], int, int, int]] = []  # name, dtype, shape, width, start, end
        self._sizes = dict.fromkeys(self._parts, 0)

    @property
    def _bytes(self) -> int:
        return sum(self._sizes.values())

    def add(self, tensors: dict[str, torch.Tensor]) -> int:
        """Write one module's tensors together (never split across shards); returns their byte count."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._entries and self._bytes + size > self.max_bytes:
            self._finish_shard()
            self._start()
        for name, t in tensors.items():
            if t.dtype not in _SAFETENSORS_DTYPES:
                raise MarcoError(f"internal: cannot store {name} of dtype {t.dtype}")
            width = t.element_size()
            data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._files[width].write(memoryview(data))
            start = self._sizes[width]
            self._sizes[width] += data.nbytes
            self._entries.append((name, _SAFETENSORS_DTYPES[t.dtype], list(t.shape), width, start, start + data.nbytes))
        self.total_bytes += size
        return size

    def _finish_shard(self) -> None:
        for f in self._files.values():
            f.close()
        # Widest dtypes first, each region a multiple of its width: every tensor is aligned to its element size.
        base, offset = {}, 0
        for w in (8, 4, 2, 1):
            base[w] = offset
            offset += self._sizes[w]
        entries = sorted(self._entries, key=lambda e: base[e[3]] + e[4])
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        for name, dtype, shape, w, start, end in entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [base[w] + start, base[w] + end]}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors pads it
        path = self.out_dir / f".shard{len(self.done) + 1:05d}.safetensors.part"
        with open(path, "wb") as out:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            for w in (8, 4, 2, 1):
                with open(self._parts[w], "rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)
                self._parts[w].unlink()
        self.done.append((path, [e[0] for e in entries]))

    def close(self) -> list[str]:
        """Finish the last shard, give shards their final names (and an index when several); return file names."""
        self._finish_shard()
        n = len(self.done)
        if n == 1:
            self.done[0][0].rename(self.out_dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self.done, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / final)
            names.append(final)
            weight_map.update(dict.fromkeys(tensors, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names

    def abort(self) -> None:
        for f in self._files.values():
            f.close()


def _plan(ckpt: Checkpoint, cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """Work units in model order: (kind, source names). Checks first that every expected tensor is there.

    kind is "tensor" (one source tensor), "experts" (one projection of a batch of experts, per-expert layout) or
    "fused" (one transformers-5 fused expert tensor).
    """
    names = [n for n in ckpt.names() if not RECOMPUTED.fullmatch(n)]
    unknown = [n for n in names if classify(n) is None]
    if unknown:
        raise MarcoError(
            f"unexpected tensor {unknown[0]} in {ckpt.folder} ({len(unknown)} unknown)",
            hint="only qwen3_moe checkpoints (Marco-Nano, Marco-Mini) can be quantized",
        )
    present = set(names)
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        required.append("lm_head.weight")
    expert_units: list[tuple[str, list[str]]] = []
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}"
        required += [f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"]
        required += [f"{p}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")]
        required += [f"{p}.self_attn.{n}_norm.weight" for n in "qk"]
        if not cfg.is_moe_layer(layer):
            required += [f"{p}.mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
            continue
        required.append(f"{p}.mlp.gate.weight")
        fused = [f"{p}.mlp.experts.gate_up_proj", f"{p}.mlp.experts.down_proj"]
        if all(f in present for f in fused):
            expert_units += [("fused", [f]) for f in fused]
            continue
        for x in ("gate", "up", "down"):
            per = [f"{p}.mlp.experts.{e}.{x}_proj.weight" for e in range(cfg.num_experts)]
            required += per
            if all(n in present for n in per):
                shape = ckpt.shape(per[0])
                batch = max(1, EXPERT_BATCH_WEIGHTS // max(1, shape[0] * shape[-1]))
                expert_units += [("experts", per[i : i + batch]) for i in range(0, len(per), batch)]
    missing = [n for n in required if n not in present]
    if missing:
        raise MarcoError(
            f"tensor {missing[0]} is missing from the checkpoint in {ckpt.folder} ({len(missing)} missing)",
            hint="the checkpoint is incomplete; re-download it",
        )
    batched = {n for _, unit in expert_units for n in unit}
    stray = [n for n in names if classify(n) == "experts" and n not in batched]
    if stray:  # e.g. experts numbered beyond num_experts
        raise MarcoError(f"tensor {stray[0]} in {ckpt.folder} does not fit the config's {cfg.num_experts} experts")
    if cfg.tie_word_embeddings and "lm_head.weight" in present:
        names.remove("lm_head.weight")  # tied: transformers saves (and loads) the embedding only
    units = [("tensor", [n]) for n in names if n not in batched] + expert_units
    return sorted(units, key=lambda u: _natural_key(u[1][0]))


def _outputs(ckpt: Checkpoint, kind: str, names: list[str], preset: str, double_quant: bool):
    """[(module name, its output tensors)] for one work unit."""
    if kind == "experts":  # one projection of consecutive experts: model.layers.L.mlp.experts.E.gate_proj.weight
        stacked = torch.stack([ckpt.get(n) for n in names])
        modules = [n.rsplit(".", 1)[0] for n in names]
        return list(zip(modules, quantize_linears(stacked, preset, double_quant), strict=True))
    w = ckpt.get(names[0])
    if kind == "fused":  # [E, 2I, D] or [E, D, I] -> one Linear per expert, as the 4.x layout stores them
        prefix, fused_name = _FUSED.fullmatch(names[0]).groups()
        projs = ("down_proj",) if fused_name == "down_proj" else ("gate_proj", "up_proj")
        batch = max(1, EXPERT_BATCH_WEIGHTS // max(1, w[0].numel()))
        groups = []
        for half, proj in enumerate(projs):
            for e0 in range(0, w.shape[0], batch):
                part = w[e0 : e0 + batch]
                if len(projs) == 2:
                    part = part.chunk(2, dim=1)[half]
                qs = quantize_linears(part, preset, double_quant)
                groups += [(f"{prefix}.{e0 + i}.{proj}", q) for i, q in enumerate(qs)]
        return groups
    name = names[0]
    module, leaf = name.rsplit(".", 1)
    if classify(name) in ("attention", "experts", "mlp") and leaf == "weight":
        return [(module, quantize_linear(w, preset, double_quant))]
    return [(module, {leaf: w.to(KEEP_DTYPE)})]


def _write_config(src_folder: Path, out_dir: Path, preset: str, double_quant: bool) -> None:
    raw = json.loads((src_folder / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = quantization_config(preset, double_quant)
    dtype_key = "dtype" if "dtype" in raw else "torch_dtype"  # transformers 5 / 4 spelling
    raw[dtype_key] = "bfloat16"  # what the unquantized tensors are stored in
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_bnb(
    ckpt: Checkpoint,
    cfg: ModelConfig,
    src_folder: Path,
    out_dir: Path,
    preset: str,
    progress: ProgressFn | None = None,
    double_quant: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict[str, dict[str, int]]:
    """Quantize `ckpt` into the empty folder `out_dir`.

    `progress(done, total)` counts source weights (parameters) processed. Returns, per tensor class (attention,
    router, experts, embeddings, norms; mlp only for dense layers), {"params": source parameters, "bytes": bytes
    stored for them including quantization state}.
    """
    if preset not in PRESETS:
        raise MarcoError(f"unknown bitsandbytes preset {preset!r}", hint=f"use one of {', '.join(PRESETS)}")
    src_folder, out_dir = Path(src_folder), Path(out_dir)
    raw = json.loads((src_folder / "config.json").read_text(encoding="utf-8"))
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise MarcoError(
            f"{src_folder} is already quantized ({method})", hint="quantize from the original bf16 checkpoint"
        )
    units = _plan(ckpt, cfg)
    total = sum(_numel(ckpt.shape(n)) for _, unit in units for n in unit)
    stats = {c: {"params": 0, "bytes": 0} for c in CLASSES}
    writer = _ShardWriter(out_dir, max_shard_bytes)
    done = 0
    try:
        layer = None
        for kind, names in units:
            if _layer_of(names[0]) != layer:  # unmap the finished layer's source pages: RSS stays one layer deep
                ckpt.release()
                layer = _layer_of(names[0])
            cls = classify(names[0])
            params = sum(_numel(ckpt.shape(n)) for n in names)
            stats[cls]["params"] += params
            for module, tensors in _outputs(ckpt, kind, names, preset, double_quant):
                stats[cls]["bytes"] += writer.add({f"{module}.{k}": v for k, v in tensors.items()})
            done += params
            if progress:
                progress(done, total)
        writer.close()
    except BaseException:
        writer.abort()  # the caller removes out_dir; just release the open files
        raise
    _write_config(src_folder, out_dir, preset, double_quant)
    for f in TOKENIZER_FILES:
        if (src_folder / f).is_file():
            shutil.copyfile(src_folder / f, out_dir / f)
    if stats["mlp"]["params"] == 0:
        del stats["mlp"]
    return stats


def _layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
