"""What models exist, what is on disk, how to fetch one, and what one needs: the library behind `list`, `pull`, `info`.

Invariants: listing and `info` never touch the network and never build or load a model (headers only: safetensors
JSON headers, the GGUF tensor directory); `pull` downloads only through huggingface_hub into the standard Hugging Face
cache and honours `offline` and HF_HUB_OFFLINE. Parameter counts come from the configuration, byte counts from the
tensors actually stored, so a quantized file reports its real bits per weight. Nothing here prints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import MarcoError
from .offload.memory import Footprint, ParamCounts, StoredModel, footprints
from .registry import ModelEntry, known_models, local_snapshot, resolve

ProgressFn = Callable[[int, int], None]

# What a checkpoint folder needs; skips duplicate .bin/.pt weights, ONNX exports, GGUF variants and images.
PULL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "LICENSE*", "README*"]
RUNTIME_MARGIN = 256 << 20  # activations, logits and allocator slack on top of weights + KV cache (an estimate)


# -- what is on disk ----------------------------------------------------------------------------------------------


@dataclass
class ModelListing:
    name: str
    description: str
    repo: str | None  # Hugging Face repo id, None for built-in/packaged models
    source: str | None  # builtin:/package: source, None for Hub models
    path: str | None  # local folder or file, None when not present
    size_bytes: int
    formats: list[str] = field(default_factory=list)

    @property
    def present(self) -> bool:
        return self.path is not None


def disk_size(path: Path) -> int:
    """Bytes on disk under `path`, following the HF cache's symlinks to blobs and counting each blob once."""
    if path.is_file():
        return path.stat().st_size
    seen: set[Path] = set()
    total = 0
    for p in path.rglob("*"):
        real = p.resolve()
        if real in seen or not real.is_file():
            continue
        seen.add(real)
        total += real.stat().st_size
    return total


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def formats_of(path: Path) -> list[str]:
    """What weights a folder or file holds, as recorded in it (config.json's quantization_config, GGUF file type)."""
    if path.is_file():
        return [f"gguf:{_gguf_type(path)}"] if path.suffix.lower() == ".gguf" else []
    out = []
    if any(path.glob("*.safetensors")):
        qc = _read_json(path / "config.json").get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes":
            bits = "4bit" if qc.get("load_in_4bit") else "8bit" if qc.get("load_in_8bit") else "?"
            kind = qc.get("bnb_4bit_quant_type", "") if bits == "4bit" else "int8"
            out.append(f"bnb-{bits}" + (f"-{kind}" if kind else ""))
        elif isinstance(qc, dict):
            out.append(f"safetensors-{qc.get('quant_method', 'quantized')}")
        else:
            out.append("safetensors")
    out += [f"gguf:{_gguf_type(p)}" for p in sorted(path.glob("*.gguf"))]
    return out


def _gguf_type(path: Path) -> str:
    """The dominant tensor type by bytes (llama.cpp's `general.file_type` names a recipe, not always the bulk)."""
    try:
        from .formats.gguf import GGUFFile

        g = GGUFFile(path)
    except MarcoError:
        return "unreadable"
    by_type: dict[str, int] = {}
    for t in g.tensors.values():
        by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
    return max(by_type, key=by_type.get) if by_type else "empty"


def _hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _local_path(entry: ModelEntry) -> Path | None:
    if entry.source == "builtin:demo":
        from .paths import demo_dir

        folder = demo_dir()
        return folder if (folder / "config.json").is_file() else None  # listing never builds it
    if entry.source:
        try:
            return resolve(entry.name).path
        except MarcoError:
            return None
    return local_snapshot(entry.repo) if entry.repo else None


def list_models() -> list[ModelListing]:
    """models.toml entries, then any other qwen3_moe checkpoint in the local Hugging Face cache."""
    rows = []
    known = known_models()
    for entry in known.values():
        path = _local_path(entry)
        rows.append(
            ModelListing(
                name=entry.name,
                description=entry.description,
                repo=entry.repo,
                source=entry.source,
                path=str(path) if path else None,
                size_bytes=disk_size(path) if path else 0,
                formats=formats_of(path) if path else [],
            )
        )
    repos = {e.repo for e in known.values() if e.repo}
    cache = _hf_cache_dir()
    for folder in sorted(cache.glob("models--*")) if cache.is_dir() else []:
        repo = folder.name.removeprefix("models--").replace("--", "/", 1)
        if repo in repos:
            continue
        snap = local_snapshot(repo)
        if snap is None or _read_json(snap / "config.json").get("model_type") != "qwen3_moe":
            continue
        rows.append(ModelListing(repo, "(in the Hugging Face cache)", repo, None, str(snap), disk_size(snap), []))
        rows[-1].formats = formats_of(snap)
    return rows


def listing_dict(row: ModelListing) -> dict[str, Any]:
    return {**asdict(row), "present": row.present}


# -- download -----------------------------------------------------------------------------------------------------


def offline_mode(flag: bool = False) -> bool:
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _progress_class(progress: ProgressFn | None):
    """A tqdm subclass that never draws and reports the bytes written to `progress(done, total)` instead."""
    from tqdm.auto import tqdm

    class Reporter(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # huggingface_hub passes it to its own tqdm subclass only
            kwargs["disable"] = True
            desc = str(kwargs.get("desc") or "")
            # snapshot_download keeps two byte bars (network transfer, bytes written); report the written bytes
            self._report = kwargs.get("unit") == "B" and not desc.startswith("Downloading bytes")
            super().__init__(*args, **kwargs)
            self.n = kwargs.get("initial", 0) or 0

        def update(self, n=1):
            self.n += n or 0
            if self._report and progress is not None:
                progress(int(self.n), int(self.total or 0))

    return Reporter


def pull(spec: str, offline: bool = False, progress: ProgressFn | None = None) -> Path:
    """Fetch a model into the standard Hugging Face cache (or build/find a built-in one); returns its folder."""
    models = known_models()
    if spec in models and models[spec].source:
        return resolve(spec).path  # built locally or shipped in a package: nothing to download
    if spec in models:
        repo = models[spec].repo
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists():
        repo = spec
    else:
        raise MarcoError(
            f"unknown model {spec!r}: not a known name or a Hugging Face repo id (owner/name)",
            hint=f"known: {', '.join(models)}",
        )
    if offline_mode(offline):
        snap = local_snapshot(repo)
        if snap is None:
            raise MarcoError(
                f"{repo} is not in the local Hugging Face cache, and offline mode is on",
                hint="drop --offline / unset HF_HUB_OFFLINE to download it, or pass a local checkpoint folder",
            )
        return snap

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo, allow_patterns=PULL_PATTERNS, tqdm_class=_progress_class(progress)))
    except GatedRepoError as e:
        raise MarcoError(
            f"{repo} is gated: its license must be accepted first",
            hint=f"accept it on https://huggingface.co/{repo}, then log in with: hf auth login",
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise MarcoError(
            f"{repo} was not found on the Hugging Face Hub", hint="check the name; private repos need: hf auth login"
        ) from e
    except LocalEntryNotFoundError as e:  # raised when the Hub cannot be reached and nothing is cached
        raise MarcoError(
            f"cannot reach the Hugging Face Hub to download {repo} (no network?)",
            hint="check the connection, proxy or HF_ENDPOINT; or copy the model folder here and pass its path",
        ) from e
    except HfHubHTTPError as e:
        raise MarcoError(f"downloading {repo} failed: {str(e).splitlines()[0]}", hint="try again later") from e
    except OSError as e:
        raise MarcoError(
            f"downloading {repo} failed: {e.strerror or e}", hint="check disk space and permissions"
        ) from e
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise MarcoError(
            f"{repo} has no config.json + safetensors checkpoint",
            hint="for a GGUF repo, download the one .gguf file you want (hf download REPO FILE) and pass its path",
        )
    return folder


# -- what a model needs --------------------------------------------------------------------------------------------


@dataclass
class TensorGroup:
    dtype: str
    count: int
    nbytes: int


@dataclass
class ModelInfo:
    name: str
    path: str
    format: str
    architecture: str
    config: dict[str, Any]
    params: ParamCounts
    tensor_types: list[TensorGroup]
    weight_bytes: int
    expert_bytes: int  # all routed experts as stored
    bits_per_weight: float
    kv_bytes: int
    ctx: int
    placements: list[Footprint]

    @property
    def one_expert_bytes(self) -> int:
        n = self.params.moe_layers * self.config.get("num_experts", 0)
        return self.expert_bytes // n if n else 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["one_expert_bytes"] = self.one_expert_bytes
        return d


def model_info(spec: str, ctx: int = 4096, gpu_mem: int | None = None) -> ModelInfo:
    """Architecture, parameters, stored tensor types and the memory each placement needs, from headers only."""

    source = resolve(spec)
    stored = StoredModel.read(source.path, gguf=source.format == "gguf")
    cfg, params, tensors = stored.config, stored.params, stored.tensors
    groups: dict[str, TensorGroup] = {}
    for t in tensors:
        group = groups.setdefault(t.dtype, TensorGroup(t.dtype, 0, 0))
        group.count += 1
        group.nbytes += t.nbytes
    weight_bytes = stored.weight_bytes
    return ModelInfo(
        name=spec,
        path=str(source.path),
        format=source.format if source.format == "gguf" else ", ".join(formats_of(source.path)) or "safetensors",
        architecture=cfg.model_type,
        config={
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "attention_heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "num_experts": cfg.num_experts,
            "experts_per_token": cfg.num_experts_per_tok,
            "expert_width": cfg.moe_intermediate_size,
            "vocab_size": cfg.vocab_size,
            "context_length": cfg.max_position_embeddings,
            "tied_embeddings": cfg.tie_word_embeddings,
        },
        params=params,
        tensor_types=sorted(groups.values(), key=lambda t: -t.nbytes),
        weight_bytes=weight_bytes,
        expert_bytes=stored.expert_bytes,
        bits_per_weight=weight_bytes * 8 / params.total if params.total else 0.0,
        kv_bytes=stored.kv_bytes(ctx),
        ctx=stored.plan_ctx(ctx),
        placements=footprints(stored, ctx, gpu_mem),
    )
