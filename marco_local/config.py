"""Model configuration read from a Hugging Face `config.json` (model_type `qwen3_moe`).

Field names are the config.json keys. `from_dict` ignores keys it does not know and maps the two spellings found in
the wild: transformers 4.x writes `num_experts`, `rope_theta`, `rope_scaling`; 5.x writes `num_local_experts` and
`rope_parameters: {rope_theta, rope_type, ...}`. A missing required key or another model_type is a `MarcoError`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MarcoError

SUPPORTED_MODEL_TYPES = ("qwen3_moe",)
SUPPORTED_ROPE_TYPES = ("default", "linear")

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
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise MarcoError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.hidden_act != "silu":
            raise MarcoError(f"unsupported hidden_act {self.hidden_act!r} (only 'silu' is implemented)")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise MarcoError(f"unsupported rope scaling {rope_type!r}", hint=f"supported: {SUPPORTED_ROPE_TYPES}")

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
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
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
        return cls(**{k: v for k, v in d.items() if k in names})

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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MarcoError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise MarcoError(f"{path} does not hold a JSON object")
    return ModelConfig.from_dict(raw)
