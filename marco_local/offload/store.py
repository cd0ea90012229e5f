"""The slow tier: every expert of one layer, packed per expert, and the byte layout shared with the fast-tier slots.

`ExpertLayout` finds the per-expert data of an `Experts` module (tensors whose leading dimension is E, registered
or plain attributes, lists of E tensors, and the tensors of a list of E per-expert modules, as quantized modules keep
them; a module's `shared_tensors` names those that only look per-expert) and packs one expert's slice of all of
them into one row of `expert_bytes` bytes (each field 64-byte aligned), so one copy moves
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
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import MarcoError

ALIGN = 64
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8, "I8": torch.int8}


@dataclass(frozen=True)
class Field:
    path: tuple  # attribute names / tuple indices from the experts module to the data, e.g. ("gate_proj",)
    # "param" / "buffer" (registered [E, ...]), "attr" (plain [E, ...] attribute), "list" (E tensors), "each" (a
    # tensor of each of E same-shaped modules or objects in a list; path = list path, EACH, path inside an element)
    kind: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # one expert's shape (without the leading E)
    offset: int  # byte offset inside a packed row
    nbytes: int

    @property
    def name(self) -> str:
        return ".".join(str(p) for p in self.path)


_LEAF_TYPES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)
EACH = "*"  # in a Field path: every element of the list before it


def _get(obj, path: tuple):
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def _set(obj, path: tuple, value) -> None:
    """Set `path` inside obj, rebuilding tuples on the way (they are immutable)."""
    *head, last = path
    parent = _get(obj, tuple(head))
    if isinstance(last, int):
        items = list(parent)
        items[last] = value
        _set(obj, tuple(head), tuple(items) if isinstance(parent, tuple) else items)
    elif isinstance(parent, nn.Module) and last in parent._parameters:
        parent._parameters[last] = nn.Parameter(value, requires_grad=False)
    elif isinstance(parent, nn.Module) and last in parent._buffers:
        parent._buffers[last] = value
    else:
        setattr(parent, last, value)


def _children(obj) -> list[tuple]:
    """(name, value, kind) of what a module, a tuple/list or a plain helper object holds."""
    if isinstance(obj, nn.Module):
        items = [(n, t, "param") for n, t in obj._parameters.items() if t is not None]
        items += [(n, t, "buffer") for n, t in obj._buffers.items() if t is not None]
        items += [(n, m, "module") for n, m in obj._modules.items() if m is not None]
        return items + [(n, v, "attr") for n, v in vars(obj).items() if not n.startswith("_")]
    if isinstance(obj, (tuple, list)):
        return [(i, v, "attr") for i, v in enumerate(obj)]
    return [(n, v, "attr") for n, v in vars(obj).items()]


def _is_helper(value) -> bool:
    """A plain object worth looking into (a quantization state), not a leaf, a class or a function."""
    return hasattr(value, "__dict__") and not isinstance(value, (_LEAF_TYPES, type)) and not callable(value)


def _tensors_in(obj, path: tuple, out: list, seen: set[int], depth: int = 0) -> None:
    """Every tensor reachable from one expert's module or object: (path, kind, tensor)."""
    if id(obj) in seen or depth > 4:
        return
    seen.add(id(obj))
    for name, value, kind in _children(obj):
        if isinstance(value, torch.Tensor):
            out.append(((*path, name), kind, value))
        elif isinstance(value, (nn.Module, tuple, list)) or _is_helper(value):
            _tensors_in(value, (*path, name), out, seen, depth + 1)


def _discover_each(elements: list, where: tuple, out: list) -> None:
    """E modules or objects of one structure (a ModuleList of per-expert quantized linears): each tensor that differs
    between them is per-expert data; a tensor they all share (one code table) is not."""
    found: list = []
    _tensors_in(elements[0], (), found, set())
    for sub, _kind, first in found:
        tensors = [_get(el, sub) for el in elements]
        if all(t is first for t in tensors):
            continue
        if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
            raise MarcoError(f"{'.'.join(map(str, (*where, *sub)))} differs in shape between experts")
        out.append(((*where, EACH, *sub), "each", first.dtype, tuple(first.shape)))


def _discover(obj, num_experts: int, path: tuple, out: list, seen: set[int], depth: int = 0) -> None:
    """Find per-expert data: tensors with a leading E (registered or plain attributes, also inside tuples) and lists
    of E same-shaped tensors, in the module, its submodules and plain helper objects (a quantized bank)."""
    if id(obj) in seen or depth > 4:
        return
    seen.add(id(obj))
    shared = getattr(obj, "shared_tensors", ()) if isinstance(obj, nn.Module) else ()
    for name, value, kind in _children(obj):
        where = (*path, name)
        if name in shared:  # one table for all experts, whatever its leading size
            continue
        if isinstance(value, torch.Tensor):
            if value.dim() >= 1 and value.shape[0] == num_experts and id(value) not in seen:
                seen.add(id(value))
                out.append((where, kind, value.dtype, tuple(value.shape[1:])))
        elif isinstance(value, list) and len(value) == num_experts and all(isinstance(v, torch.Tensor) for v in value):
            first = value[0]
            if all(v.shape == first.shape and v.dtype == first.dtype for v in value):
                out.append((where, "list", first.dtype, tuple(first.shape)))
        elif isinstance(value, nn.ModuleList) and len(value) == num_experts > 1:
            _discover_each(list(value), where, out)
        elif isinstance(value, (tuple, list)) or _is_helper(value):
            _discover(value, num_experts, where, out, seen, depth + 1)


def tensor_bytes(obj, skip: set[int] = frozenset()) -> int:
    """Bytes of all distinct tensors reachable from `obj` (parameters, buffers, plain attributes, lists, helper
    objects), not descending into objects whose id is in `skip`. Bytes are counted once however many views cover
    them: contiguous tensors by the union of their address ranges (a fused q/k/v weight and its q, k and v rows), a
    strided view not at all when a contiguous tensor spans it (gate and up as halves of one stack), else once."""
    seen: set[int] = set()
    dense: dict[torch.device, list[tuple[int, int]]] = {}
    strided: dict[tuple, torch.Tensor] = {}
    meta = 0

    def walk(o, depth: int) -> None:
        nonlocal meta
        if id(o) in seen or id(o) in skip or depth > 6:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.device.type == "meta":
                meta += o.nbytes
            elif o.is_contiguous():
                dense.setdefault(o.device, []).append((o.data_ptr(), o.data_ptr() + o.nbytes))
            else:
                strided.setdefault((o.device, o.data_ptr(), o.shape, o.stride(), o.dtype), o)
            return
        if isinstance(o, nn.Module):
            children = [*o._parameters.values(), *o._buffers.values(), *o._modules.values()]
            children += [v for n, v in vars(o).items() if not n.startswith("_")]
        elif isinstance(o, (tuple, list)):
            children = list(o)
        elif isinstance(o, dict):
            children = list(o.values())
        elif hasattr(o, "__dict__") and not isinstance(o, (_LEAF_TYPES, type)) and not callable(o):
            children = list(vars(o).values())
        else:
            return
        for c in children:
            if c is not None:
                walk(c, depth + 1)

    walk(obj, 0)
    total, merged = meta, {}
    for device, spans in dense.items():
        runs: list[list[int]] = []
        for start, stop in sorted(spans):
            if runs and start <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], stop)
            else:
                runs.append([start, stop])
        merged[device] = runs
        total += sum(stop - start for start, stop in runs)
    for (device, ptr, *_), t in strided.items():
        reach = ptr + (sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1) * t.element_size()
        if not any(start <= ptr and reach <= stop for start, stop in merged.get(device, [])):
            total += t.nbytes
    return total


class ExpertLayout:
    """How one expert's data sit in a packed row."""

    def __init__(self, module: nn.Module, num_experts: int) -> None:
        self.num_experts = num_experts
        found: list = []
        _discover(module, num_experts, (), found, set())
        fields, offset = [], 0
        for path, kind, dtype, shape in found:
            nbytes = math.prod(shape) * dtype.itemsize
            fields.append(Field(path, kind, dtype, shape, offset, nbytes))
            offset = -(-(offset + nbytes) // ALIGN) * ALIGN  # aligned so every typed view is legal
        if not fields:
            raise MarcoError(f"{type(module).__name__} has no per-expert tensors to offload")
        self.fields: list[Field] = fields
        self.expert_bytes = offset

    def views(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Typed `[S, *shape]` views of a `[S, expert_bytes]` uint8 buffer, one per field (no copy)."""
        out = []
        for f in self.fields:
            flat = rows[:, f.offset : f.offset + f.nbytes].view(f.dtype)
            out.append(flat.unflatten(1, f.shape) if f.shape else flat.squeeze(1))
        return out

    def source(self, module: nn.Module, f: Field):
        """The field's data: the [E, ...] tensor, or (list, each) one tensor per expert."""
        if f.kind == "each":
            at = f.path.index(EACH)
            return [_get(el, f.path[at + 1 :]) for el in _get(module, f.path[:at])]
        return _get(module, f.path)

    def bind(self, module: nn.Module, rows: torch.Tensor) -> None:
        """Point the module's per-expert data at `rows`, so indexing them by slot reads the fast tier. With per-expert
        modules ("each"), module s of the list computes slot s; the modules past the slots get slot views too (they
        are never called with fewer slots than experts), so none keeps its own copy."""
        for f, view in zip(self.fields, self.views(rows), strict=True):
            if f.kind == "each":
                at = f.path.index(EACH)
                for e, el in enumerate(_get(module, f.path[:at])):
                    _set(el, f.path[at + 1 :], view[e % view.shape[0]])
            else:
                _set(module, f.path, list(view.unbind(0)) if f.kind == "list" else view)


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
        for f, view in zip(layout.fields, layout.views(rows), strict=True):
            src = layout.source(module, f)
            if f.kind in ("list", "each"):
                for e, t in enumerate(src):
                    view[e].copy_(t)
            else:
                view.copy_(src)
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


def _pread(fd: int, dst: torch.Tensor, offset: int, path: Path) -> None:
    """Fill the contiguous uint8 tensor `dst` from `fd` at `offset` (positional reads: no shared file position)."""
    view = memoryview(dst.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)  # releases the GIL: a prefetch thread overlaps compute
        if n <= 0:
            raise MarcoError(f"{path} is truncated: an expert could not be read", hint="re-download the model")
        done += n


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
        _pread(fd, dst, offset, path)

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


class ThreadScratch:
    """One scratch buffer per reading thread (the decode thread and the loader thread), shared by every layer's
    store, allocated on a thread's first read and reused after: a miss never allocates its read buffer."""

    THREADS = 2  # the caller's thread and the runtime's one loader thread (what the budget counts)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._local = threading.local()

    def get(self) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = torch.empty(self.nbytes, dtype=torch.uint8)
        return buf


@dataclass(frozen=True)
class RawTensor:
    """One stacked GGUF expert tensor in the file: expert e's raw blocks are `shape` at offset + e * stride."""

    path: Path
    offset: int
    stride: int
    shape: tuple[int, int]  # [rows, row_bytes]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1]


class RepackStore(ExpertStore):
    """A GGUF layer's quantized experts left in the file (repack on read).

    `read_into(e, row)` reads expert e's raw ggml blocks (its gate, up and down rows, each contiguous inside the
    stacked `ffn_*_exps` tensor) with `os.preadv` into the thread's scratch buffer, gate and up adjacent, and has the
    experts module (`qlinear.QExperts.fill_expert`) repack them into the slot's int4 kernel form: the same routine as
    the load-time repack, so the slot's bytes equal the fully resident model's. Repacking makes short-lived
    temporaries (about `REPACK_WORK` bytes per weight of the largest matrix), counted in `resident_bytes`.
    """

    REPACK_WORK = 8  # allowance in bytes per weight (nibble) of the largest matrix; tests/test_offload_gguf_disk.py

    def __init__(
        self, layout: ExpertLayout, inner: nn.Module, tensors: list[RawTensor], scratch: ThreadScratch
    ) -> None:
        self.layout, self.inner, self.tensors, self.scratch = layout, inner, tensors, scratch
        self._fds: dict[Path, int] = {}
        for t in tensors:
            if t.path not in self._fds:
                try:
                    self._fds[t.path] = os.open(t.path, os.O_RDONLY)
                except OSError as err:
                    raise MarcoError(f"cannot open {t.path}: {err.strerror}") from err

    @staticmethod
    def raw_bytes(tensors: list[RawTensor]) -> int:
        return sum(t.nbytes for t in tensors)

    @classmethod
    def work_bytes(cls, layout: ExpertLayout) -> int:
        """Repack temporaries: proportional to the largest packed field (2 weights per packed byte)."""
        return cls.REPACK_WORK * 2 * max(f.nbytes for f in layout.fields if f.dtype == torch.uint8)

    def read_into(self, e: int, row: torch.Tensor) -> None:
        buf = self.scratch.get()
        parts, at = [], 0
        for t in self.tensors:
            dst = buf[at : at + t.nbytes]
            _pread(self._fds[t.path], dst, t.offset + e * t.stride, t.path)
            parts.append(dst.view(t.shape))
            at += t.nbytes
        views = {f.name: v[0] for f, v in zip(self.layout.fields, self.layout.views(row.unsqueeze(0)), strict=True)}
        self.inner.fill_expert(*parts, views)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()


def raw_segments(layout: ExpertLayout, tensors: list[RawTensor], num_experts: int) -> list[list[Segment]]:
    """Per-expert byte ranges of experts whose slots hold the file's raw blocks as they are (`QExperts` with
    in_file="raw", fields "raws.0/1/2" = gate, up, down): a `FileStore` reads them straight into the slot."""
    by_name = {f"raws.{k}": t for k, t in enumerate(tensors)}
    fields = [by_name[f.name] for f in layout.fields]
    return [
        [Segment(t.path, t.offset + e * t.stride, t.nbytes, torch.uint8) for t in fields] for e in range(num_experts)
    ]


def raw_tensors(tensors: list[torch.Tensor], maps: list[tuple[Path, int, int]]) -> list[RawTensor]:
    """Where stacked expert tensors that are zero-copy views of memory-mapped files ([E, rows, row_bytes] uint8) lie
    in those files; `MarcoError` when one is not such a view."""
    out = []
    for t in tensors:
        ptr = t.data_ptr()
        owner = next(((p, base) for p, base, size in maps if base <= ptr < base + size), None)
        if owner is None or t.dim() != 3 or not t[0].is_contiguous():
            raise MarcoError("the experts are not a view of a mapped model file", hint="load the GGUF file itself")
        out.append(RawTensor(owner[0], ptr - owner[1], t.stride(0) * t.element_size(), (t.shape[1], t.shape[2])))
    return out


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

    names = {f.name for f in layout.fields if f.kind in ("param", "buffer")}
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
        if f.kind in ("list", "each"):
            raise MarcoError(f"{f.name} is a list of per-expert tensors, not a view of a file")
        t = layout.source(module, f)
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
