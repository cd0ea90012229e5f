"""What a model file stores, read from its headers alone (safetensors JSON headers, the GGUF tensor directory): its
configuration and each tensor's name, type and size. Memory planning (`marco info`, the runtime's VRAM fit) needs no
more, and reading no weight keeps it fast and torch-free."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig, load_config
from ..errors import MarcoError


@dataclass(frozen=True)
class StoredTensor:
    name: str
    dtype: str  # as the file names it: "BF16", "Q4_K", ...
    nbytes: int


def stored_model(path: Path, gguf: bool) -> tuple[ModelConfig, list[StoredTensor]]:
    """The configuration and tensors of a checkpoint folder or a GGUF file. A tied `lm_head.weight` that some
    writers store anyway is left out: the model holds the embeddings once."""
    if gguf:
        from .gguf import GGUFFile, model_config

        g = GGUFFile(path)
        return model_config(g), [StoredTensor(t.name, t.type_name, t.nbytes) for t in g.tensors.values()]
    cfg = load_config(path)
    tensors = _safetensors_tensors(path)
    if cfg.tie_word_embeddings:
        tensors = [t for t in tensors if t.name != "lm_head.weight"]
    return cfg, tensors


def _safetensors_tensors(folder: Path) -> list[StoredTensor]:
    """Each tensor of the shards' JSON headers; nothing else is read."""
    from .checkpoint import _check_complete

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MarcoError(f"no .safetensors weights in {folder}")
    out = []
    for f in files:
        _check_complete(f)  # validates the header and that the data is all there
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                start, end = meta["data_offsets"]
                out.append(StoredTensor(name, meta["dtype"], end - start))
    return out
