"""Read a GGUF file: its metadata, its tensor directory, and each tensor's bytes as a zero-copy torch view.

The file is memory-mapped once (copy-on-write, so nothing is ever written back and torch gets a writable buffer);
`raw(name)` returns a uint8 tensor `[..., rows, row_bytes]` that points into the mapping, so opening a 5 GB file costs
a few MB of RAM and the pages are read when a matmul first touches them, as in llama.cpp.

The header is parsed here rather than by gguf-py's `GGUFReader` for two reasons: GGUFReader builds a numpy view per
array element (seconds for a 50k-150k-token vocabulary), and every count and offset read from
the file must be bounds-checked before it is trusted. Invariants: a malformed file (bad magic, unsupported version,
truncated header or tensor data, unknown tensor type, out-of-range counts) raises a one-line `MarcoError` and never
makes the parser allocate or loop on an untrusted count; the layout follows gguf-py's `constants.py` (GGUF v2/v3,
little-endian, `general.alignment` defaulting to 32).

`model_config` turns the metadata of the supported architectures (`qwen3moe`, `qwen3`, `llama`) into a `ModelConfig`
with Hugging Face field names, hard-wiring what llama.cpp hard-wires (qwen3moe: renormalised top-k, all layers MoE).
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quant.ggml_types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..config import ModelConfig
from ..errors import InvalidModelError, MarcoError

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays: deeper than this is corruption, not data

# GGUF architecture name -> our model_type (the Hugging Face spelling, which picks the model file)
ARCHITECTURES = {"qwen3moe": "qwen3_moe", "qwen3": "qwen3", "llama": "llama"}

_SCALARS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {t: np.dtype(f) for t, f in _SCALARS.items()}
_HINT_REFETCH = "the file is damaged or incomplete: download or convert it again"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: GGUF's ne reversed, the row (ne[0]) last
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.ggml_type]
        return self.shape[-1] // block * size


class _Cursor:
    """Sequential little-endian reads from the mapped header; every read is checked against the file size."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise MarcoError(
                f"{self.path} is truncated or corrupt: {what} runs past the end of the file", _HINT_REFETCH
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise MarcoError(f"{self.path}: {what} is not valid UTF-8", _HINT_REFETCH) from e

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        try:
            t = GGUFValueType(vtype)
        except ValueError:
            raise MarcoError(f"{self.path}: {what} has unknown value type {vtype}", _HINT_REFETCH) from None
        if t == GGUFValueType.STRING:
            return self.string(what)
        if t != GGUFValueType.ARRAY:
            return self.scalar(_SCALARS[t], what)
        if depth >= MAX_NESTING:
            raise MarcoError(f"{self.path}: {what} nests arrays too deeply", _HINT_REFETCH)
        etype, count = self.scalar("<I", what), self.scalar("<Q", what)
        try:
            et = GGUFValueType(etype)
        except ValueError:
            raise MarcoError(f"{self.path}: {what} has unknown element type {etype}", _HINT_REFETCH) from None
        if et in _NUMPY:  # numeric arrays in one read
            dtype = _NUMPY[et]
            self.need(count * dtype.itemsize, what)
            out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
            self.pos += count * dtype.itemsize
            return out
        # every string or array element takes at least 8 bytes, which bounds the count before the loop starts
        self.need(count * 8, what)
        return [self.value(etype, what, depth + 1) for _ in range(count)]


class GGUFFile:
    """An open GGUF file: `metadata` (key -> Python value), `tensors` (name -> TensorInfo), `raw(name)`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            if size < 24:
                raise MarcoError(f"{self.path} is not a GGUF file (only {size} bytes)", _HINT_REFETCH)
            # mode "c": copy-on-write pages, so torch.from_numpy gets a writable array and the file is never modified
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c")
        except OSError as e:
            raise MarcoError(f"cannot read {self.path}: {e.strerror or e}") from e
        cur = _Cursor(memoryview(self._map), self.path)
        if bytes(self._map[:4]) != GGUF_MAGIC:
            raise MarcoError(
                f"{self.path} is not a GGUF file (it starts with {bytes(self._map[:4])!r}, not b'GGUF')",
                hint="pass a .gguf model file, a checkpoint folder or a known model name",
            )
        cur.pos = 4
        self.version = cur.scalar("<I", "the version")
        if self.version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            kind = "a big-endian GGUF" if swapped in (2, 3) else f"GGUF version {self.version}"
            raise MarcoError(f"{self.path} is {kind}, which marco-local cannot read", hint="use a GGUF v3 file")
        n_tensors, n_kv = cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the metadata count")
        # each metadata pair takes >= 12 bytes and each tensor entry >= 24: bound the counts before looping on them
        cur.need(n_kv * 12 + n_tensors * 24, "the header")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:  # llama.cpp refuses these too: which of the two values is meant?
                raise MarcoError(f"{self.path}: metadata key {key} appears twice", _HINT_REFETCH)
            self.metadata[key] = cur.value(cur.scalar("<I", key), key)
        entries = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.scalar("<I", name)
            if not 1 <= n_dims <= MAX_DIMS:
                raise MarcoError(f"{self.path}: tensor {name} has {n_dims} dimensions", _HINT_REFETCH)
            ne = [cur.scalar("<Q", name) for _ in range(n_dims)]
            raw_type, offset = cur.scalar("<I", name), cur.scalar("<Q", name)
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise MarcoError(
                    f"{self.path}: tensor {name} has unknown GGML type {raw_type}",
                    hint="the file was written by a newer tool than marco-local knows, or it is corrupt",
                ) from None
            entries.append((name, ne, ggml_type, offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise MarcoError(f"{self.path}: general.alignment {alignment!r} is not a power of two", _HINT_REFETCH)
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, ggml_type, offset in entries:
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            if ne[0] % block or any(d <= 0 for d in ne):
                raise MarcoError(
                    f"{self.path}: tensor {name} has shape {ne}, invalid for {ggml_type.name} (blocks of {block})",
                    _HINT_REFETCH,
                )
            nbytes = math.prod(ne[1:]) * (ne[0] // block * type_size)
            start = data_start + offset
            if offset % alignment:
                raise MarcoError(f"{self.path}: tensor {name} is not aligned to {alignment} bytes", _HINT_REFETCH)
            if start + nbytes > size:
                raise MarcoError(
                    f"{self.path} is truncated: tensor {name} needs bytes up to {start + nbytes:,}, "
                    f"the file has {size:,}",
                    _HINT_REFETCH,
                )
            if name in self.tensors:
                raise MarcoError(f"{self.path}: tensor {name} appears twice", _HINT_REFETCH)
            self.tensors[name] = TensorInfo(name, tuple(reversed(ne)), ggml_type, start, nbytes)
        # two tensors sharing bytes are one corruption away from garbage: each tensor owns its range
        ranges = sorted(self.tensors.values(), key=lambda t: t.offset)
        for a, b in zip(ranges, ranges[1:], strict=False):
            if b.offset < a.offset + a.nbytes:
                raise MarcoError(f"{self.path}: the data of tensors {a.name} and {b.name} overlap", _HINT_REFETCH)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise MarcoError(f"{self.path} has no general.architecture", _HINT_REFETCH)
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise MarcoError(f"{self.path} lacks the metadata key {key}", hint="the GGUF is incomplete or not a model")
        return self.metadata[key]

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise MarcoError(f"{self.path} lacks the tensor {name}", hint="the GGUF does not match its architecture")
        return self.tensors[name]

    def raw(self, name: str) -> torch.Tensor:
        """The tensor's bytes, zero-copy: uint8 [*shape[:-1], row_bytes] (an expert tensor is [E, rows, row_bytes])."""
        import torch  # here, not at the top: `marco list` and `info` read headers only and need no torch

        t = self.info(name)
        view = self._map[t.offset : t.offset + t.nbytes].reshape(*t.shape[:-1], t.row_bytes)
        return torch.from_numpy(view)


def _arch_value(g: GGUFFile, arch: str, key: str, default: Any = None, required: bool = False) -> Any:
    full = f"{arch}.{key}"
    value = g.require(full) if required else g.get(full, default)
    if isinstance(value, list):  # per-layer values (some hybrids): ours must be uniform
        if not value or any(v != value[0] or isinstance(v, list) for v in value):
            raise InvalidModelError(g.path, full, value, "is not one value for every layer")
        value = value[0]
    return value


def _arch_int(g: GGUFFile, arch: str, key: str, default: Any = None, required: bool = False) -> int:
    """An integer size the loader computes with before the config is built (and checked as a whole)."""
    value = _arch_value(g, arch, key, default, required)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_SIZE:
        raise InvalidModelError(g.path, f"{arch}.{key}", value, f"is not an integer in 1..{MAX_SIZE}")
    return value


def _token_id(g: GGUFFile, key: str, vocab: int) -> int | None:
    value = g.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab:
        raise InvalidModelError(g.path, key, value, f"is not a token id below the vocabulary size ({vocab})")
    return value


# model config field -> the GGUF key it comes from (without the architecture prefix), to name a bad value's key
_GGUF_KEYS = {
    "hidden_size": "embedding_length",
    "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "num_experts": "expert_count",
    "num_experts_per_tok": "expert_used_count",
    "moe_intermediate_size": "expert_feed_forward_length",
    "intermediate_size": "feed_forward_length",
    "head_dim": "attention.key_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
    "rope_scaling.factor": "rope.scaling.factor",
    "max_position_embeddings": "context_length",
}
MAX_SIZE = 1 << 24  # above any real dimension; bounds arithmetic on a corrupt value before the config checks it


def model_config(g: GGUFFile) -> ModelConfig:
    """The ModelConfig the GGUF's metadata describes (Hugging Face field names and meanings), every value checked
    for type and range, and against the tensors present, before anything is built from it."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise MarcoError(
            f"{g.path}: unsupported architecture {arch!r}",
            hint=f"marco-local runs GGUFs of {', '.join(ARCHITECTURES)}",
        )
    embd = g.info("token_embd.weight")
    if len(embd.shape) != 2:
        raise InvalidModelError(g.path, "tensor token_embd.weight's shape", list(embd.shape), "is not 2-D")
    vocab = embd.shape[0]
    hidden = _arch_int(g, arch, "embedding_length", required=True)
    heads = _arch_int(g, arch, "attention.head_count", required=True)
    head_dim = _arch_int(g, arch, "attention.key_length", max(hidden // heads, 1))
    if _arch_int(g, arch, "attention.value_length", head_dim) != head_dim:
        raise MarcoError(f"{g.path}: key and value head sizes differ, which marco-local does not support")
    if _arch_int(g, arch, "rope.dimension_count", head_dim) != head_dim:
        raise MarcoError(f"{g.path}: partial rotary embeddings are not supported")
    rope_scaling = None
    scaling_type = _arch_value(g, arch, "rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _arch_value(g, arch, "rope.scaling.factor", 1.0)}
    elif scaling_type != "none":
        raise InvalidModelError(g.path, f"{arch}.rope.scaling.type", scaling_type, "is not supported (linear is)")
    if "rope_freqs.weight" in g:  # llama 3.1-style per-frequency factors
        raise MarcoError(f"{g.path}: per-frequency rope factors (rope_freqs) are not supported")
    moe = arch == "qwen3moe"
    n_experts = _arch_value(g, arch, "expert_count", 0, required=moe)
    if not moe and n_experts:
        raise MarcoError(f"{g.path}: a {arch} GGUF with experts is not supported")
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    eos = sorted({i for i in (_token_id(g, k, vocab) for k in keys) if i is not None})
    layers = _arch_value(g, arch, "block_count", required=True)
    _check_blocks(g, arch, layers)
    try:
        return ModelConfig(
            model_type=ARCHITECTURES[arch],
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=_arch_value(g, arch, "attention.head_count_kv", heads),
            num_experts=n_experts,
            num_experts_per_tok=_arch_value(g, arch, "expert_used_count", 0, required=moe),
            moe_intermediate_size=_arch_value(g, arch, "expert_feed_forward_length", 0, required=moe),
            intermediate_size=_arch_value(g, arch, "feed_forward_length", 0, required=not moe),
            head_dim=head_dim,
            rms_norm_eps=_arch_value(g, arch, "attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=_arch_value(g, arch, "rope.freq_base", 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=_arch_value(g, arch, "context_length", 4096),
            norm_topk_prob=moe,  # llama.cpp's qwen3moe graph always renormalises the top-k weights
            tie_word_embeddings="output.weight" not in g,
            bos_token_id=_token_id(g, "tokenizer.ggml.bos_token_id", vocab),
            eos_token_id=eos or None,
        )
    except InvalidModelError as e:
        raise e.renamed(g.path, f"{arch}.{_GGUF_KEYS[e.key]}" if e.key in _GGUF_KEYS else e.key) from None


_BLOCK = re.compile(r"blk\.(\d+)\.")


def _check_blocks(g: GGUFFile, arch: str, layers: Any) -> None:
    """block_count must be the number of blk.N the file holds: more would build layers that are not there (2^32 of
    them: a hang), fewer would drop layers silently."""
    found = {int(m.group(1)) for name in g.tensors if (m := _BLOCK.match(name))}
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise InvalidModelError(g.path, f"{arch}.block_count", layers, "is not a positive integer")
    if len(found) != layers or found != set(range(layers)):  # the length first: range(2^64) is no set to build
        if not found:
            have = "none"
        elif len(found) == max(found) + 1:  # distinct numbers from 0: contiguous
            have = f"blk.0 to blk.{max(found)}"
        else:
            have = f"blk.{', blk.'.join(map(str, sorted(found)[:4]))}{', ...' if len(found) > 4 else ''}"
        raise InvalidModelError(g.path, f"{arch}.block_count", layers, f"does not match the layers present ({have})")
