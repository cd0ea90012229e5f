"""The slow tier: every expert of one layer, packed per expert, and the byte layout shared with the fast-tier slots.

`ExpertLayout` finds every tensor (parameter or buffer) of an `Experts` module whose leading dimension is E and packs
one expert's slice of all of them into one row of `expert_bytes` bytes (each field 64-byte aligned), so one copy moves
gate, up and down (and any quantization scales) together. The fast tier is a `[S, expert_bytes]` uint8 buffer whose
typed views replace the module's tensors; a store fills one row with one expert.

Two stores: `MemoryStore` holds the packed `[E, expert_bytes]` rows in host RAM (pinned on CUDA machines, so copies
can be asynchronous); `FileStore` reads an expert's bytes straight from the model file into the slot with positional
reads (`os.preadv`), never through an mmap, so the file's pages stay in the OS page cache and out of the process's RSS.
Invariants: a store never allocates per read (the dtype-conversion scratch is allocated once); reads release the GIL.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MarcoError

ALIGN = 64
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8, "I8": torch.int8}


@dataclass(frozen=True)
class Field:
    name: str  # attribute path inside the experts module, e.g. "gate_proj" or "q.scales"
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]  # one expert's shape (without the leading E)
    offset: int  # byte offset inside a packed row
    nbytes: int


class ExpertLayout:
    """How one expert's tensors sit in a packed row."""

    def __init__(self, module: nn.Module, num_experts: int) -> None:
        self.num_experts = num_experts
        fields, offset = [], 0
        tensors = [(n, t, True) for n, t in module.named_parameters()] + [
            (n, t, False) for n, t in module.named_buffers()
        ]
        for name, t, is_param in tensors:
            if t.dim() == 0 or t.shape[0] != num_experts:
                continue  # shared by all experts: stays where it is
            nbytes = math.prod(t.shape[1:]) * t.element_size()
            fields.append(Field(name, is_param, t.dtype, tuple(t.shape[1:]), offset, nbytes))
            offset = -(-(offset + nbytes) // ALIGN) * ALIGN
        if not fields:
            raise MarcoError(f"{type(module).__name__} has no per-expert tensors to offload")
        self.fields: list[Field] = fields
        self.expert_bytes = offset

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed `[S, *shape]` views of a `[S, expert_bytes]` uint8 buffer, one per field (no copy)."""
        return {
            f.name: rows[:, f.offset : f.offset + f.nbytes].view(f.dtype).unflatten(1, f.shape) for f in self.fields
        }

    def bind(self, module: nn.Module, rows: torch.Tensor) -> None:
        """Point the module's per-expert tensors at `rows`, so indexing them by slot reads the fast tier."""
        for f, view in zip(self.fields, self.views(rows).values(), strict=True):
            owner_name, _, attr = f.name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if f.is_param:
                owner._parameters[attr] = nn.Parameter(view, requires_grad=False)
            else:
                owner._buffers[attr] = view


class ExpertStore:
    """All experts of a layer in the slow tier; `read_into(e, row)` copies expert e into a packed fast-tier row."""

    layout: ExpertLayout

    def read_into(self, e: int, row: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def resident_bytes(self) -> int:
        """Bytes this store keeps in process memory (RAM), as opposed to on disk."""
        return 0

    def close(self) -> None:
        pass


class MemoryStore(ExpertStore):
    def __init__(self, layout: ExpertLayout, rows: torch.Tensor) -> None:
        self.layout, self.rows = layout, rows  # [E, expert_bytes] uint8

    @classmethod
    def from_module(cls, module: nn.Module, layout: ExpertLayout, pin: bool = False) -> MemoryStore:
        rows = torch.empty(layout.num_experts, layout.expert_bytes, dtype=torch.uint8, pin_memory=pin)
        for f, view in zip(layout.fields, layout.views(rows).values(), strict=True):
            view.copy_(module.get_parameter(f.name) if f.is_param else module.get_buffer(f.name))
        return cls(layout, rows)

    @classmethod
    def from_store(cls, store: ExpertStore, pin: bool = False) -> MemoryStore:
        rows = torch.empty(store.layout.num_experts, store.layout.expert_bytes, dtype=torch.uint8, pin_memory=pin)
        for e in range(store.layout.num_experts):
            store.read_into(e, rows[e])
        return cls(store.layout, rows)

    def read_into(self, e: int, row: torch.Tensor) -> None:
        # asynchronous when `row` is on CUDA and the rows are pinned; the caller orders it on its copy stream
        row.copy_(self.rows[e], non_blocking=row.device.type == "cuda")

    @property
    def resident_bytes(self) -> int:
        return self.rows.nbytes


@dataclass(frozen=True)
class Segment:
    """Where one field of one expert lies in a file, and in which dtype it is stored there."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype


class FileStore(ExpertStore):
    """Experts read from the model file with `os.preadv` into the slot's memory (converting dtype when they differ)."""

    def __init__(self, layout: ExpertLayout, segments: list[list[Segment]]) -> None:
        self.layout, self.segments = layout, segments  # segments[e][field]
        self._fds: dict[Path, int] = {}
        scratch = 0
        for per_expert in segments:
            for f, seg in zip(layout.fields, per_expert, strict=True):
                self._fd(seg.path)
                want = math.prod(f.shape) * seg.dtype.itemsize
                if seg.nbytes != want:
                    raise MarcoError(f"{seg.path}: expert tensor {f.name} has {seg.nbytes} bytes, expected {want}")
                if seg.dtype != f.dtype:
                    scratch = max(scratch, seg.nbytes)
        # allocated once: conversion happens through this buffer, never through a fresh tensor per read
        self.scratch = torch.empty(scratch, dtype=torch.uint8)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise MarcoError(f"cannot open {path}: {e.strerror}") from e
        return self._fds[path]

    @property
    def resident_bytes(self) -> int:
        return self.scratch.nbytes

    def _pread(self, fd: int, dst: torch.Tensor, offset: int, path: Path) -> None:
        view = memoryview(dst.numpy()).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)  # releases the GIL: a prefetch thread overlaps compute
            if n <= 0:
                raise MarcoError(f"{path} is truncated: an expert could not be read", hint="re-download the model")
            done += n

    def read_into(self, e: int, row: torch.Tensor) -> None:
        for f, seg in zip(self.layout.fields, self.segments[e], strict=True):
            dst = row[f.offset : f.offset + f.nbytes]
            if seg.dtype == f.dtype:
                self._pread(self._fds[seg.path], dst, seg.offset, seg.path)
            else:
                tmp = self.scratch[: seg.nbytes]
                self._pread(self._fds[seg.path], tmp, seg.offset, seg.path)
                dst.view(f.dtype).copy_(tmp.view(seg.dtype))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(absolute offset of the data section, header dict) of one safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def safetensors_segments(files: dict[str, Path], prefix: str, layout: ExpertLayout) -> list[list[Segment]]:
    """Per-expert byte ranges of a qwen3_moe layer's experts (`prefix` = "model.layers.L.mlp.experts").

    Handles transformers 4.x per-expert tensors (`{prefix}.{e}.{proj}.weight`) and the fused 5.x layout
    (`{prefix}.gate_up_proj` [E, 2I, D], whose expert e holds gate rows then up rows; `{prefix}.down_proj` [E, D, I]).
    `files` maps tensor name -> shard path.
    """
    headers: dict[Path, tuple[int, dict]] = {}

    def where(name: str) -> tuple[Path, int, int, torch.dtype, list[int]]:
        path = files[name]
        if path not in headers:
            headers[path] = safetensors_header(path)
        base, header = headers[path]
        entry = header[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise MarcoError(f"{path}: tensor {name} has dtype {entry['dtype']}, which cannot be offloaded")
        begin, end = entry["data_offsets"]
        return path, base + begin, end - begin, _ST_DTYPES[entry["dtype"]], entry["shape"]

    names = {f.name for f in layout.fields}
    if names != {"gate_proj", "up_proj", "down_proj"}:
        raise MarcoError(f"cannot map expert tensors {sorted(names)} to a safetensors checkpoint")
    segments: list[list[Segment]] = []
    for e in range(layout.num_experts):
        row = []
        for f in layout.fields:
            per_expert = f"{prefix}.{e}.{f.name}.weight"
            if per_expert in files:
                path, off, nbytes, dtype, shape = where(per_expert)
                if tuple(shape) != f.shape:
                    raise MarcoError(f"{path}: tensor {per_expert} has shape {shape}, expected {list(f.shape)}")
                row.append(Segment(path, off, nbytes, dtype))
                continue
            fused = f"{prefix}.gate_up_proj" if f.name != "down_proj" else f"{prefix}.down_proj"
            if fused not in files:
                raise MarcoError(f"tensor {per_expert} is missing from the checkpoint")
            path, off, nbytes, dtype, shape = where(fused)
            per = nbytes // shape[0]
            half = 0 if f.name != "up_proj" else per // 2
            size = per if f.name == "down_proj" else per // 2
            row.append(Segment(path, off + e * per + half, size, dtype))
        segments.append(row)
    return segments


def mapped_segments(module: nn.Module, layout: ExpertLayout, maps: list[tuple[Path, int, int]]) -> list[list[Segment]]:
    """Per-expert byte ranges of tensors that are zero-copy views into memory-mapped files (a GGUF's expert tensors).

    `maps` lists (path, address of the mapping, its length). A field qualifies when its tensor lies inside one mapping
    and each expert's slice is contiguous; otherwise a `MarcoError` says so (the caller falls back to a MemoryStore).
    """
    starts = []
    for f in layout.fields:
        t = module.get_parameter(f.name) if f.is_param else module.get_buffer(f.name)
        if t.device.type != "cpu" or not t[0].is_contiguous():
            raise MarcoError(f"{f.name} is not a contiguous host tensor")
        ptr = t.data_ptr()
        owner = next(((p, base) for p, base, size in maps if base <= ptr < base + size), None)
        if owner is None:
            raise MarcoError(f"{f.name} is not a view of a mapped model file")
        starts.append((owner[0], ptr - owner[1], t.stride(0) * t.element_size()))
    return [
        [
            Segment(path, off + e * stride, f.nbytes, f.dtype)
            for f, (path, off, stride) in zip(layout.fields, starts, strict=True)
        ]
        for e in range(layout.num_experts)
    ]
