"""Model configuration read from a Hugging Face `config.json` (model_type `qwen3_moe`).

Field names are the config.json keys. `from_dict` ignores keys it does not know and maps the two spellings found in
the wild: transformers 4.x writes `num_experts`, `rope_theta`, `rope_scaling`; 5.x writes `num_local_experts` and
`rope_parameters: {rope_theta, rope_type, ...}`. A missing required key or another model_type is a `MarcoError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidModelError, MarcoError

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)
SUPPORTED_ROPE_TYPES = ("default", "linear")

# Upper bounds far above any real model (Marco-Mini: 28 layers, hidden 1024, 256 experts; the largest open models:
# ~130 layers, hidden 16k, 256k vocabulary): a value past them is corruption, and stops before anything is built.
MAX_LAYERS = 1024
MAX_HEAD_DIM = 1024
_INT_RANGES = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 16),
    "num_hidden_layers": (1, MAX_LAYERS),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "num_experts": (0, 1 << 16),
    "num_experts_per_tok": (0, 1 << 16),
    "moe_intermediate_size": (0, 1 << 20),
    "intermediate_size": (0, 1 << 20),
    "max_position_embeddings": (1, 1 << 24),
    "decoder_sparse_step": (1, MAX_LAYERS),
}
_FLOAT_RANGES = {"rms_norm_eps": (0.0, 1.0), "rope_theta": (1.0, 1e12)}
MAX_ROPE_FACTOR = 1e6


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int = 0
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 32768
    norm_topk_prob: bool = False
    mlp_only_layers: list[int] = field(default_factory=list)
    decoder_sparse_step: int = 1
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self, source: object = "config.json") -> None:
        """Type and range of every field, and the rules between them, before any module is built from the config:
        a wrong value must be one line naming it, not a ZeroDivisionError, a hang over 2^32 layers or a silent
        misread. Raises `InvalidModelError` keyed by the field's name (GGUF readers rename it to their key)."""

        def bad(key: str, problem: str) -> InvalidModelError:
            return InvalidModelError(source, key, getattr(self, key), problem)

        for key, (lo, hi) in _INT_RANGES.items():
            value = getattr(self, key)
            if not _is_int(value):
                raise bad(key, "is not an integer")
            if not lo <= value <= hi:
                raise bad(key, f"is outside {lo}..{hi}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not _is_int(self.head_dim) or not 2 <= self.head_dim <= MAX_HEAD_DIM or self.head_dim % 2:
            raise bad("head_dim", f"is not an even size in 2..{MAX_HEAD_DIM}")
        if self.num_key_value_heads > self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise InvalidModelError(
                source,
                "num_key_value_heads",
                self.num_key_value_heads,
                f"does not divide num_attention_heads ({self.num_attention_heads})",
            )
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise bad("num_experts_per_tok", f"is outside 1..num_experts ({self.num_experts})")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise bad("moe_intermediate_size", "must be positive in a model with experts")
        for key in ("rms_norm_eps", "rope_theta"):
            lo, hi = _FLOAT_RANGES[key]
            value = getattr(self, key)
            if not _is_number(value) or not lo < value <= hi:
                raise bad(key, f"is not a number in ({lo:g}, {hi:g}]")
        for key in ("norm_topk_prob", "tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "is not true or false")
        if not isinstance(self.model_type, str):
            raise bad("model_type", "is not a string")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "is not supported (only 'silu' is implemented)")
        if not isinstance(self.mlp_only_layers, list) or not all(
            _is_int(i) and 0 <= i < self.num_hidden_layers for i in self.mlp_only_layers
        ):
            raise bad("mlp_only_layers", f"is not a list of layer numbers below {self.num_hidden_layers}")
        dense_layers = any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        if dense_layers and self.intermediate_size < 1:
            raise bad("intermediate_size", "must be positive in a model with dense layers")
        self._check_rope_scaling(source)
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            ids = value if isinstance(value, list) else [] if value is None else [value]
            if (key == "bos_token_id" and isinstance(value, list)) or not all(
                _is_int(i) and 0 <= i < self.vocab_size for i in ids
            ):
                raise bad(key, f"is not a token id below vocab_size ({self.vocab_size})")

    def _check_rope_scaling(self, source: object) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise InvalidModelError(source, "rope_scaling", scaling, "is not an object")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            hint = f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            raise InvalidModelError(source, "rope_scaling.rope_type", rope_type, "is not supported", hint=hint)
        if rope_type == "linear":
            factor = scaling.get("factor")
            if not _is_number(factor) or not 0 < factor <= MAX_ROPE_FACTOR:
                raise InvalidModelError(source, "rope_scaling.factor", factor, f"is not in (0, {MAX_ROPE_FACTOR:g}]")

    def is_moe_layer(self, layer: int) -> bool:
        """Same rule as transformers' Qwen3MoeDecoderLayer: sparse unless listed in mlp_only_layers or off-step."""
        return (
            layer not in self.mlp_only_layers and self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: object = "config.json") -> ModelConfig:
        d = dict(raw)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MarcoError(
                f"unsupported architecture model_type={model_type!r}",
                hint=f"marco-local runs {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints (Marco-Nano, Marco-Mini)",
            )
        # transformers 5.x spellings
        if "num_experts" not in d and "num_local_experts" in d:
            d["num_experts"] = d["num_local_experts"]
        rope_parameters = d.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            d.setdefault("rope_theta", rope_parameters.get("rope_theta", 10000.0))
            if rope_parameters.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        missing = [k for k in (*_REQUIRED, "num_experts") if d.get(k) is None]
        if missing:
            raise MarcoError(f"config.json lacks required key(s): {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names and v is not None})
        except InvalidModelError as e:
            raise e.renamed(source, e.key) from None

    def to_dict(self) -> dict[str, Any]:
        """The transformers 4.x spelling, which both 4.x and 5.x read."""
        d = dataclasses.asdict(self)
        d["architectures"] = ["Qwen3MoeForCausalLM"]
        return d


def load_config(folder: str | Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MarcoError(f"no config.json in {folder}", hint="point MODEL at a Hugging Face checkpoint folder")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MarcoError(f"{path} is not valid JSON: {str(e) or 'nested too deeply'}") from e
    except OSError as e:
        raise MarcoError(f"cannot read {path}: {e.strerror or e}") from e
    if not isinstance(raw, dict):
        raise MarcoError(f"{path} does not hold a JSON object")
    return ModelConfig.from_dict(raw, source=path)
