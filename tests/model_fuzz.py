"""A fuzzer for model files: seeded mutants of a small GGUF and a small checkpoint folder, each run through
`marco run MODEL hi -n 2` in a worker process, classified as a clean one-line `Error:` (exit 1), a run (exit 0), or
anything else (the CLI's "unexpected" catch-all, a traceback, a hang, a memory blow-up): the last must never happen.

Used by tests/test_model_fuzz.py (a quick slice in the normal suite) and bench/fuzz_models.py (long runs with counts).
Workers are spawned processes with an address-space limit (RLIMIT_AS) and a per-case alarm; a case the alarm cannot
stop (stuck in C) is killed with its worker by the parent's own timeout.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import struct
import sys
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the package under test: this checkout's, never an installed copy
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))

# GGUF value types (gguf-py constants.GGUFValueType)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q",
        F64: "<d"}  # fmt: skip

CASE_TIMEOUT_S = 20  # per mutant, in the worker (signal.alarm); the parent waits a little longer before killing it
MEMORY_LIMIT = 6 << 30  # address space per worker: torch alone maps ~2-3 GiB of it
PROMPT_ARGS = ("hi", "-n", "2")


# ---------------------------------------------------------------------------------------------------------------------
# GGUF as editable structure


@dataclass
class GGUFDoc:
    """A GGUF file as parts that mutations edit and `serialize` writes back, valid or not."""

    version: int
    kv: list[list[Any]]  # [key, vtype, value, element vtype or None]
    tensors: list[list[Any]]  # [name, ne (GGUF order), ggml type, offset relative to the data]
    data: bytes
    alignment: int = 32
    n_tensors: int | None = None  # header counts to write instead of the real ones
    n_kv: int | None = None
    boundaries: list[int] = field(default_factory=list)  # filled by serialize: byte offsets between fields

    def copy(self) -> GGUFDoc:
        return GGUFDoc(
            self.version, [list(k) for k in self.kv], [list(t) for t in self.tensors], self.data, self.alignment
        )


def parse_gguf(buf: bytes) -> GGUFDoc:
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        s = buf[pos : pos + n].decode()
        pos += n
        return s

    def value(t: int) -> tuple[Any, int | None]:
        if t == STR:
            return string(), None
        if t == ARR:
            et, n = take("<I"), take("<Q")
            return [value(et)[0] for _ in range(n)], et
        return take(_FMT[t]), None

    assert buf[:4] == b"GGUF"
    pos = 4
    version, n_tensors, n_kv = take("<I"), take("<Q"), take("<Q")
    kv = []
    for _ in range(n_kv):
        key = string()
        t = take("<I")
        v, et = value(t)
        kv.append([key, t, v, et])
    tensors = []
    for _ in range(n_tensors):
        name = string()
        nd = take("<I")
        ne = [take("<Q") for _ in range(nd)]
        tensors.append([name, ne, take("<I"), take("<Q")])
    alignment = next((v for k, _, v, _ in kv if k == "general.alignment"), 32)
    start = -(-pos // alignment) * alignment
    return GGUFDoc(version, kv, tensors, buf[start:], alignment)


def _pack_value(t: int, v: Any, et: int | None) -> bytes:
    if t == STR:
        raw = v.encode("utf-8", "surrogatepass") if isinstance(v, str) else bytes(v)
        return struct.pack("<Q", len(raw)) + raw
    if t == ARR:
        et = STR if et is None else et
        return struct.pack("<IQ", et, len(v)) + b"".join(_pack_value(et, x, _sub(x)) for x in v)
    return struct.pack(_FMT[t], v)


def _elem_type(arr: list) -> int:
    """The narrowest GGUF element type that holds every element of `arr` (one Python type)."""
    x = arr[0]
    if isinstance(x, int) and not isinstance(x, bool):
        return I64 if min(arr) < 0 else U64 if max(arr) >= 1 << 32 else U32
    return _vtype(x)


def _sub(x: Any) -> int | None:
    return _vtype(x[0]) if isinstance(x, list) and x else None


def _vtype(v: Any) -> int:
    if isinstance(v, bool):
        return BOOL
    if isinstance(v, int):
        return I32 if -(1 << 31) <= v < 0 else U32 if 0 <= v < 1 << 32 else U64 if v > 0 else I64
    if isinstance(v, float):
        return F32
    if isinstance(v, list):
        return ARR
    return STR


def serialize(doc: GGUFDoc) -> bytes:
    out = bytearray(b"GGUF")
    marks = [0, 4]
    n_t = len(doc.tensors) if doc.n_tensors is None else doc.n_tensors
    n_kv = len(doc.kv) if doc.n_kv is None else doc.n_kv
    out += struct.pack("<IQQ", doc.version, n_t, n_kv)
    marks += [8, 16, 24]
    for key, t, v, et in doc.kv:
        out += _pack_value(STR, key, None)
        marks.append(len(out))
        out += struct.pack("<I", t)
        marks.append(len(out))
        out += _pack_value(t, v, et)
        marks.append(len(out))
    for name, ne, gt, off in doc.tensors:
        out += _pack_value(STR, name, None) + struct.pack("<I", len(ne))
        marks.append(len(out))
        out += b"".join(struct.pack("<Q", d & (1 << 64) - 1) for d in ne) + struct.pack("<IQ", gt, off & (1 << 64) - 1)
        marks.append(len(out))
    out += b"\0" * (-len(out) % doc.alignment)
    marks.append(len(out))
    out += doc.data
    marks.append(len(out))
    doc.boundaries = marks
    return bytes(out)


# ---------------------------------------------------------------------------------------------------------------------
# Mutations

EDGE_INTS = [0, 1, -1, 2, 3, 7, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 64) - 1, -(1 << 31), 10**6]
EDGE_VALUES: list[tuple[int, Any, int | None]] = [
    *[(_vtype(i), i, None) for i in EDGE_INTS],
    (F32, 0.0, None),
    (F32, -1.0, None),
    (F32, float("inf"), None),
    (F32, float("nan"), None),
    (F32, 1e30, None),
    (F64, 1e300, None),
    (F32, 2.5, None),
    (STR, "2", None),
    (STR, "", None),
    (STR, "\x00\xff", None),
    (BOOL, True, None),
    (ARR, [], U32),
    (ARR, [1, 2], U32),
    (ARR, [[1], [2]], ARR),
    (ARR, ["a", "b"], STR),
]

TEMPLATE_BOMBS = [
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}x",
    "{% for a in 'xxxxxxxxxx' %}{% for b in 'xxxxxxxxxx' %}{% for c in 'xxxxxxxxxx' %}{% for d in 'xxxxxxxxxx' %}"
    "{% for e in 'xxxxxxxxxx' %}{% for f in 'xxxxxxxxxx' %}{% for g in 'xxxxxxxxxx' %}{% for h in 'xxxxxxxxxx' %}"
    "{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}x",
    "{{ 'x' * 1000000000 }}",
    "{{ 7 ** 100000000 }}",
    "{{ 1 / 0 }}",
    "{{ messages + 1 }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% for i in range(100000) %}{{ 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy' }}{% endfor %}",
    "",
    "   \n  ",
    "{{ raise_exception('no') }}",
    "{{ messages[5]['content'] }}",
    "{{ messages[0].content.__class__ }}",
    "{% if %}",
    "{{ '%0999999999d' % 1 }}",
    "{{ (messages * 100000000) | length }}",
    "{{ 'abc'.format_map }}",
]


def _pick_key(rng: random.Random, doc: GGUFDoc) -> list[Any]:
    return rng.choice(doc.kv)


def mutate_gguf(doc: GGUFDoc, rng: random.Random) -> tuple[str, bytes]:
    """One mutant: (what was done, the file's bytes)."""
    d = doc.copy()
    kind = rng.choice(
        [
            "value", "value", "value", "retype", "delete_key", "dup_key", "array_elem", "array_len", "template",
            "token_id", "dims", "dims", "ttype", "offset", "dup_tensor", "rename_tensor", "drop_tensor", "counts",
            "truncate", "truncate", "flip", "version", "ndims", "strlen", "arch_block",
        ]
    )  # fmt: skip
    if kind == "value":
        kv = _pick_key(rng, d)
        t, v, et = rng.choice(EDGE_VALUES)
        kv[1:] = [t, v, et]
        what = f"{kv[0]} := {v!r}"
    elif kind == "retype":
        kv = _pick_key(rng, d)
        if kv[1] in (STR, ARR):
            kv[1:] = [U32, 2, None]
        else:
            kv[1] = rng.choice([F32, F64, I8, U8, BOOL, U64, I64])
            v = kv[2]
            if kv[1] in (F32, F64):
                kv[2] = float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else 0.0
            elif kv[1] == BOOL:
                kv[2] = bool(v)
            else:
                lo, hi = {I8: (-128, 127), U8: (0, 255), U64: (0, (1 << 64) - 1), I64: (-(1 << 63), (1 << 63) - 1)}[
                    kv[1]
                ]
                iv = int(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else 0
                kv[2] = min(max(iv, lo), hi)
        what = f"{kv[0]} retyped {kv[1]}"
    elif kind == "delete_key":
        kv = d.kv.pop(rng.randrange(len(d.kv)))
        what = f"del {kv[0]}"
    elif kind == "dup_key":
        kv = list(_pick_key(rng, d))
        d.kv.insert(rng.randrange(len(d.kv) + 1), kv)
        what = f"dup {kv[0]}"
    elif kind in ("array_elem", "array_len"):
        arrays = [kv for kv in d.kv if kv[1] == ARR and kv[2]]
        kv = rng.choice(arrays)
        arr = list(kv[2])
        if kind == "array_elem":
            i = rng.randrange(len(arr))
            arr[i] = rng.choice([7, -1, 2**31, "", "a b c", "x", "\u0120 \u0120", arr[-1], 1.5, True])
            if len({type(x) for x in arr}) > 1:  # one element type per GGUF array: the new element's
                arr = [x if type(x) is type(arr[i]) else arr[i] for x in arr]
            kv[3] = _elem_type(arr)
            what = f"{kv[0]}[{i}] := {arr[i]!r}"
        else:
            arr = rng.choice([arr[: rng.randrange(len(arr))], arr + arr[: rng.randrange(1, 50)], []])
            what = f"len({kv[0]}) := {len(arr)}"
        kv[2] = arr
        if isinstance(kv[2], list) and kv[2] and kv[3] not in (STR, ARR):
            kv[3] = max(kv[3], _elem_type(kv[2])) if kv[3] in (U32, U64) else kv[3]
    elif kind == "template":
        bomb = rng.choice(TEMPLATE_BOMBS)
        d.kv = [kv for kv in d.kv if kv[0] != "tokenizer.chat_template"] + [
            ["tokenizer.chat_template", STR, bomb, None]
        ]
        what = f"template {bomb[:40]!r}"
    elif kind == "token_id":
        key = rng.choice(["tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eot_token_id"])
        v = rng.choice([400, 401, 10**6, (1 << 32) - 1, -1])
        d.kv = [kv for kv in d.kv if kv[0] != key] + [[key, _vtype(v), v, None]]
        what = f"{key} := {v}"
    elif kind == "dims":
        t = rng.choice(d.tensors)
        i = rng.randrange(len(t[1]))
        t[1][i] = rng.choice([0, 1, t[1][i] + 1, t[1][i] - 1, t[1][i] * 2, 1 << 31, (1 << 32) - 1, (1 << 64) - 1])
        what = f"{t[0]}.ne[{i}] := {t[1][i]}"
    elif kind == "ttype":
        t = rng.choice(d.tensors)
        t[2] = rng.choice([0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 16, 30, 39, 250, (1 << 32) - 1])
        what = f"{t[0]}.type := {t[2]}"
    elif kind == "offset":
        t = rng.choice(d.tensors)
        other = rng.choice(d.tensors)
        t[3] = rng.choice([other[3], other[3] + d.alignment, len(d.data), (1 << 64) - 32, t[3] + 1, 0])
        what = f"{t[0]}.offset := {t[3]}"
    elif kind == "dup_tensor":
        a, b = rng.sample(range(len(d.tensors)), 2)
        d.tensors[a][0] = d.tensors[b][0]
        what = f"tensor #{a} renamed {d.tensors[b][0]}"
    elif kind == "rename_tensor":
        t = rng.choice(d.tensors)
        t[0] = rng.choice(["blk.99.attn_norm.weight", "blk.2.attn_norm.weight", "made.up", "", "output.weight"])
        what = f"tensor renamed {t[0]}"
    elif kind == "drop_tensor":
        t = d.tensors.pop(rng.randrange(len(d.tensors)))
        what = f"drop {t[0]}"
    elif kind == "counts":
        v = rng.choice([0, 1, (1 << 64) - 1, 1 << 31, (1 << 32) - 1, len(d.tensors) + 1, len(d.kv) + 1])
        if rng.random() < 0.5:
            d.n_tensors = v
        else:
            d.n_kv = v
        what = f"counts := {v}"
    elif kind == "version":
        d.version = rng.choice([0, 1, 2, 4, 0x03000000, (1 << 32) - 1])
        what = f"version := {d.version}"
    elif kind == "ndims":
        t = rng.choice(d.tensors)
        t[1] = t[1] + [1] if rng.random() < 0.5 else t[1][:-1] or [1, 1, 1, 1, 1]
        what = f"{t[0]} ndims := {len(t[1])}"
    elif kind == "arch_block":
        v = rng.choice([0, 1, 3, 99, (1 << 32) - 1, (1 << 64) - 1])
        key = next(kv for kv in d.kv if kv[0].endswith(".block_count"))
        key[1:] = [_vtype(v), v, None]
        what = f"block_count := {v}"
    else:  # truncate, flip, strlen: byte-level, on the serialized file
        buf = bytearray(serialize(d))
        if kind == "truncate":
            at = max(0, rng.choice(d.boundaries) + rng.choice([-1, 0, 0, 1]))
            return f"truncate at {at}", bytes(buf[:at])
        header_end = d.boundaries[-2]
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(header_end)
                buf[i] ^= 1 << rng.randrange(8)
            return "flip header bits", bytes(buf)
        # strlen: a string length field (8 bytes before a key) replaced by an edge value
        at = rng.choice(d.boundaries[5:-2])
        v = rng.choice([0, (1 << 64) - 1, 1 << 31, (1 << 32) - 1, len(buf)])
        buf[at : at + 8] = struct.pack("<Q", v)
        return f"u64 at {at} := {v}", bytes(buf)
    return what, serialize(d)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint folders

CONFIG_VALUES = [0, -1, 1, 2, 1 << 31, (1 << 32) - 1, (1 << 64) - 1, 0.5, -0.0, 1e308, "2", "", None, True, [], {},
                 [1, 2], {"a": 1}, "linear", 10**30]  # fmt: skip


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def mutate_folder(base: Path, dst: Path, rng: random.Random) -> str:
    """Copy `base` to `dst` with one mutation; returns what was done."""
    shutil.copytree(base, dst, symlinks=True)
    kind = rng.choice(
        ["config", "config", "config", "config_del", "config_whole", "rope", "gen", "gen", "tok_cfg", "template",
         "tokenizer_json", "st_header", "st_header", "st_truncate", "st_shape", "index", "missing"]
    )  # fmt: skip
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if kind == "config":
        key = rng.choice(sorted(cfg))
        cfg[key] = rng.choice([*CONFIG_VALUES, float("inf"), float("nan")])
        cfg_path.write_text(json.dumps(cfg))
        return f"config {key} := {cfg[key]!r}"
    if kind == "config_del":
        key = rng.choice(sorted(cfg))
        del cfg[key]
        cfg_path.write_text(json.dumps(cfg))
        return f"config del {key}"
    if kind == "config_whole":
        text = rng.choice(["[]", "1", '"x"', "null", "{", _deep(100000), "\xff", '{"model_type": "qwen3_moe"}'])
        cfg_path.write_text(text, errors="surrogateescape")
        return f"config.json := {text[:20]!r}"
    if kind == "rope":
        cfg["rope_scaling"] = rng.choice(
            ["linear", {"rope_type": "linear", "factor": 0}, {"rope_type": "linear", "factor": "2"},
             {"rope_type": "linear"}, {"type": "linear", "factor": -1}, {"rope_type": "yarn", "factor": 2}, [1]]
        )  # fmt: skip
        cfg_path.write_text(json.dumps(cfg))
        return f"rope_scaling := {cfg['rope_scaling']!r}"
    if kind == "gen":
        path = dst / "generation_config.json"
        gen = json.loads(path.read_text()) if path.is_file() else {}
        choice = rng.choice(["whole", "eos", "temperature", "top_k", "top_p"])
        if choice == "whole":
            text = rng.choice(["[]", "3", '"x"', "null", _deep(50000)])
            path.write_text(text)
            return f"generation_config.json := {text[:20]!r}"
        gen["eos_token_id" if choice == "eos" else choice] = rng.choice(CONFIG_VALUES + [400, [1, 400]])
        path.write_text(json.dumps(gen))
        return f"generation_config {choice} := {gen.get('eos_token_id' if choice == 'eos' else choice)!r}"
    if kind in ("tok_cfg", "template"):
        path = dst / "tokenizer_config.json"
        tc = json.loads(path.read_text())
        if kind == "template":
            tc["chat_template"] = rng.choice(TEMPLATE_BOMBS)
        else:
            key = rng.choice(["chat_template", "bos_token", "eos_token", "add_bos_token"])
            tc[key] = rng.choice([5, [1], [{"name": 1}], {"content": 3}, None, "<|im_end|>", "", True])
        path.write_text(json.dumps(tc))
        return f"tokenizer_config := {str(tc.get('chat_template'))[:30]!r}"
    if kind == "tokenizer_json":
        path = dst / "tokenizer.json"
        tj = json.loads(path.read_text())
        choice = rng.choice(["added_id", "merge", "truncate", "vocab"])
        if choice == "added_id" and tj.get("added_tokens"):
            tj["added_tokens"][0]["id"] = rng.choice([400, 10**6, -1])
        elif choice == "merge":
            tj["model"]["merges"] = [rng.choice(["zz qq", "a", ["a", "b", "c"], 5]), *tj["model"]["merges"]]
        elif choice == "vocab":
            vocab = tj["model"]["vocab"]
            vocab[next(iter(vocab))] = rng.choice([10**6, -5, "x"])
        else:
            path.write_text(path.read_text()[: rng.randrange(100, 2000)])
            return "tokenizer.json truncated"
        path.write_text(json.dumps(tj))
        return f"tokenizer.json {choice}"
    shards = sorted(dst.glob("*.safetensors"))
    shard = rng.choice(shards)
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if kind in ("st_header", "st_shape"):
        if kind == "st_shape":  # one expert reshaped with the same element count
            matrices = [k for k in header if k != "__metadata__" and len(header[k]["shape"]) == 2]
            names = [k for k in matrices if ".experts.1." in k] or matrices
            name = rng.choice(names)
            r, c = header[name]["shape"]
            header[name]["shape"] = [c, r] if r != c else [r // 2, c * 2]
            what = f"{shard.name} {name} shape := {header[name]['shape']}"
        else:
            name = rng.choice([k for k in header if k != "__metadata__"])
            choice = rng.choice(["entry", "offsets", "shape", "dtype", "whole"])
            if choice == "whole":
                header = rng.choice([[], 1, "x", {"a": 1}, {"a": {"dtype": "F32"}}])
            elif choice == "entry":
                header[name] = rng.choice([1, "x", [], None])
            elif choice == "offsets":
                header[name]["data_offsets"] = rng.choice([[5, 1], ["0", 4], [0], [0, 1 << 40], None, [-1, 4]])
            elif choice == "shape":
                header[name]["shape"] = rng.choice([[-1], ["3"], None, [1 << 40, 1 << 40], [0]])
            else:
                header[name]["dtype"] = rng.choice(["F99", 3, "I8", "F16", None])
            what = f"{shard.name} header {choice} {name}"
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
        return what
    if kind == "st_truncate":
        cut = rng.choice([0, 4, 8, 9, 8 + n // 2, 8 + n, 8 + n + 1, len(raw) - 1, len(raw) // 2])
        if rng.random() < 0.3:
            raw[:8] = struct.pack("<Q", rng.choice([(1 << 64) - 1, len(raw), 1 << 40]))
            shard.write_bytes(raw)
            return f"{shard.name} header size edge"
        shard.write_bytes(raw[:cut])
        return f"{shard.name} truncated at {cut}"
    index = dst / "model.safetensors.index.json"
    if kind == "index" and index.is_file():
        idx = json.loads(index.read_text())
        key = rng.choice(sorted(idx["weight_map"]))
        choice = rng.choice(["..", "abs", "link", "type", "missing", "map"])
        if choice == "..":
            idx["weight_map"][key] = "../" + idx["weight_map"][key]
            shutil.copy(dst / idx["weight_map"][key].removeprefix("../"), dst.parent / idx["weight_map"][key][3:])
        elif choice == "abs":
            idx["weight_map"][key] = str(shards[0].resolve())
        elif choice == "link":
            outside = dst.parent / f"outside-{dst.name}.safetensors"
            shutil.copy(shards[0], outside)
            (dst / "link.safetensors").symlink_to(outside)
            idx["weight_map"][key] = "link.safetensors"
        elif choice == "type":
            idx["weight_map"][key] = rng.choice([5, None, [], ""])
        elif choice == "missing":
            idx["weight_map"][key] = "nope.safetensors"
        else:
            idx["weight_map"] = rng.choice([[], "x", 3])
        index.write_text(json.dumps(idx))
        return f"index {choice}"
    victim = rng.choice(sorted(p.name for p in dst.iterdir()))
    (dst / victim).unlink()
    return f"missing {victim}"


# ---------------------------------------------------------------------------------------------------------------------
# Running mutants


class CaseTimeout(BaseException):
    """The per-case alarm: a BaseException, so no handler in the code under test swallows it."""


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout()


def _init_worker(memory_limit: int) -> None:
    import resource

    if sys.path[0] != str(ROOT):
        sys.path.insert(0, str(ROOT))

    import torch

    torch.set_num_threads(1)
    os.environ.pop("MARCO_DEBUG", None)
    if memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    signal.signal(signal.SIGALRM, _alarm)
    import marco_local.cli.main  # imported once per worker, not per case

    assert Path(marco_local.cli.main.__file__).is_relative_to(ROOT), marco_local.cli.main.__file__


def run_case(model: str, timeout_s: int = CASE_TIMEOUT_S) -> tuple[str, str]:
    """In a worker: `marco run MODEL hi -n 2`, classified as ("error" | "ran" | "other", detail)."""
    from marco_local.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["marco", "run", model, *PROMPT_ARGS, "--device", "cpu"]
    sys.stdin = None
    code: Any = None
    signal.alarm(timeout_s)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli_main.main()
    except SystemExit as e:
        code = e.code
    except CaseTimeout:
        return "other", f"timeout after {timeout_s} s"
    except BaseException as e:  # noqa: BLE001 (anything escaping main is a finding)
        return "other", f"escaped main: {type(e).__name__}: {e}"[:300]
    finally:
        signal.alarm(0)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    if code == 0:
        return "ran", out.getvalue()[:40]
    errors = [line for line in lines if line.startswith("Error:")]
    clean = (
        code == 1
        and len(errors) == 1
        and lines[0].startswith("Error:")
        and all(line.startswith(("Error:", "Hint:")) for line in lines)
        and len(lines) <= 2
        and "unexpected" not in errors[0]
    )
    return ("error" if clean else "other"), f"exit {code}: {' | '.join(lines)[:300]}"


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    others: list[tuple[str, str, str]] = field(default_factory=list)  # (mutation, file, detail)
    ran: list[str] = field(default_factory=list)  # the mutations that ran: worth a look, each should be harmless

    def line(self) -> str:
        c = self.counts
        tried = sum(c.values())
        return f"mutants tried {tried}, clean Error lines {c['error']}, ran {c['ran']}, anything else {c['other']}"


def run_mutants(cases: list[tuple[str, str]], workers: int = 2, timeout_s: int = CASE_TIMEOUT_S) -> Report:
    """Run `cases` [(description, model path)] in a spawned worker pool; a worker that outlives its case's timeout
    is killed with the pool (a hang the alarm could not stop) and the pool is restarted."""
    report = Report()
    ctx = multiprocessing.get_context("spawn")
    pending = list(cases)
    while pending:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(MEMORY_LIMIT,), maxtasksperchild=200)
        try:
            jobs = [(what, path, pool.apply_async(run_case, (path, timeout_s))) for what, path in pending]
            pending = []
            for i, (what, path, job) in enumerate(jobs):
                try:
                    verdict, detail = job.get(timeout=timeout_s * 2 + 30)
                except multiprocessing.TimeoutError:
                    verdict, detail = "other", "hung past the alarm (killed)"
                    pending = [(w, p) for w, p, _ in jobs[i + 1 :]]
                    report.counts[verdict] += 1
                    report.others.append((what, path, detail))
                    break
                except Exception as e:  # the worker died (memory limit in C code, a crash)
                    verdict, detail = "other", f"worker failed: {type(e).__name__}: {e}"
                report.counts[verdict] += 1
                if verdict == "ran":
                    report.ran.append(what)
                if verdict == "other":
                    report.others.append((what, path, detail))
        finally:
            pool.terminate()
            pool.join()
    return report


def make_cases(gguf_bases: list[Path], folder_bases: list[Path], work: Path, count: int, seed: int) -> list:
    """`count` mutants written under `work`, about two thirds GGUF files, one third checkpoint folders."""
    rng = random.Random(seed)
    docs = [(p, parse_gguf(p.read_bytes())) for p in gguf_bases]
    cases = []
    for i in range(count):
        if not folder_bases or rng.random() < 0.67:
            base, doc = rng.choice(docs)
            what, data = mutate_gguf(doc, rng)
            path = work / f"m{i}.gguf"
            path.write_bytes(data)
        else:
            path = work / f"f{i}"
            what = mutate_folder(rng.choice(folder_bases), path, rng)
        cases.append((what, str(path)))
    return cases


# ---------------------------------------------------------------------------------------------------------------------
# The base files

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
)


def build_bases(work: Path) -> tuple[list[Path], list[Path]]:
    """Small valid models to mutate: a checkpoint folder (one file), the same sharded with an index, and GGUFs of it
    in F32 and Q8_0. Built by the test fixtures' own builders (transformers' save_pretrained, our GGUF writer)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import build_checkpoint

    from marco_local.config import load_config
    from marco_local.demo import build_tokenizer
    from marco_local.formats.checkpoint import Checkpoint
    from quant.gguf_writer import write_gguf

    tok = build_tokenizer(vocab_size=400)
    folder, sharded = work / "base-ckpt", work / "base-sharded"
    build_checkpoint(folder, tok, seed=1, **TINY)
    build_checkpoint(sharded, tok, seed=1, max_shard_size="60KB", **TINY)
    ggufs = []
    for preset in ("f32", "q8_0"):
        path = work / f"base-{preset}.gguf"
        write_gguf(Checkpoint(folder), load_config(folder), folder, path, preset)
        ggufs.append(path)
    return ggufs, [folder, sharded]
