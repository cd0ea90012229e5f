"""Read Hugging Face safetensors checkpoints (single file or sharded), tensor by tensor, memory-mapped.

`Checkpoint` knows files and tensor names, not models: it validates that every shard exists and every header parses
before anything is read, and reads one tensor at a time, so neither the loader nor the quantizer ever holds the whole
model twice. Every failure is a `MarcoError` naming the file (and tensor).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from ..errors import InvalidModelError, MarcoError

if TYPE_CHECKING:  # safe_open(framework="pt") imports torch when a tensor is read; `marco info` reads headers only
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


RECOMPUTED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer some old checkpoints carry; recomputed at load


class Checkpoint:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
                raise MarcoError(f"{index} is not a valid safetensors index: {e!r}") from e
            if not isinstance(weight_map, dict):
                raise InvalidModelError(index, "weight_map", weight_map, "is not an object")
            files = sorted({self._shard(index, f) for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MarcoError(
                    f"checkpoint shard(s) missing in {self.folder}: {', '.join(missing)}",
                    hint="re-download the model (marco pull)",
                )
        elif (self.folder / SINGLE_NAME).is_file():
            files = [self.folder / SINGLE_NAME]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise MarcoError(f"no .safetensors weights in {self.folder}")
        for f in files:
            for name in self._open(f).keys():
                self.file_of[name] = f

    def _shard(self, index: Path, name: object) -> Path:
        """A shard named by the index, which must be a file inside the model folder: the index is data from the
        internet, and `../../.ssh/id_rsa` or an absolute path (or a symlink out) must not be read as weights."""
        if not isinstance(name, str) or not name:
            raise InvalidModelError(index, "a weight_map file name", name, "is not a file name")
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or "\\" in name:
            raise InvalidModelError(index, "a weight_map file name", name, "points outside the model folder")
        path = self.folder / relative
        # a Hugging Face cache snapshot links each file to ../../blobs/<hash>: that store belongs to the model too
        roots = [self.folder]
        if self.folder.parent.name == "snapshots":
            roots.append(self.folder.parent.parent / "blobs")
        try:
            target = path.resolve()
            inside = any(target.is_relative_to(root.resolve()) for root in roots)
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise InvalidModelError(index, "a weight_map file name", name, f"cannot be resolved ({e})") from e
        if not inside:
            raise InvalidModelError(index, "a weight_map file name", name, "links outside the model folder")
        return path

    def _open(self, path: Path):
        if path not in self._handles:
            _check_complete(path)
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise MarcoError(
                    f"cannot read {path}: {e}", hint="the file is corrupt or truncated; re-download it"
                ) from e
        return self._handles[path]

    def release(self) -> None:
        """Close the memory maps (reopened on the next read): pages read so far stop counting toward this process's
        resident memory. Streaming readers (the quantizer) call it between layers."""
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype name ("BF16", "F32", "I8", ...), from the header."""
        return self._open(self.file_of[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise MarcoError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        path = self.file_of[name]
        try:
            return self._open(path).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise MarcoError(
                f"cannot read tensor {name} from {path}: {e}", hint="the file is corrupt or truncated; re-download it"
            ) from e

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.file_of.values()))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.file_of:
            yield name, self.get(name)


MAX_HEADER = 100 << 20  # the safetensors library's own limit on a header


def _check_complete(path: Path) -> None:
    """A truncated download still has a valid header; compare the header's last data offset with the file size. The
    header's shape is checked first (JSON of the wrong shape must not become a KeyError); the safetensors library
    then checks the rest (dtypes, sizes, contiguity) when it opens the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MarcoError(f"{path} is truncated (no safetensors header)", hint="re-download the model")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > MAX_HEADER:
                raise MarcoError(f"{path} is truncated or corrupt (a header of {n:,} bytes)", hint="re-download it")
            data = f.read(n)
    except OSError as e:
        raise MarcoError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MarcoError(f"{path} has a corrupt safetensors header: {str(e) or 'nested too deeply'}") from e
    if not isinstance(header, dict):
        raise InvalidModelError(path, "the safetensors header", header, "is not an object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_size(o) for o in offsets)):
            raise InvalidModelError(path, f"tensor {name}'s data_offsets", offsets, "is not two byte offsets")
        if offsets[0] > offsets[1]:
            raise InvalidModelError(path, f"tensor {name}'s data_offsets", offsets, "end before they start")
        if not (isinstance(shape, list) and all(_is_size(d) for d in shape)):
            raise InvalidModelError(path, f"tensor {name}'s shape", shape, "is not a list of sizes")
        if not isinstance(entry.get("dtype"), str):
            raise InvalidModelError(path, f"tensor {name}'s dtype", entry.get("dtype"), "is not a type name")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise MarcoError(
            f"{path} is truncated: {size} bytes, header promises {8 + n + end}", hint="re-download the model"
        )


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
