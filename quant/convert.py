"""`quantize`: turn a Hugging Face qwen3_moe checkpoint into a GGUF file or a bitsandbytes checkpoint folder, safely.

Invariants:
- The source is checked completely before anything is written: config.json, every shard present and not truncated
  (`Checkpoint`), and for GGUF every expected tensor present with the shape the config implies plus the tokenizer
  (`plan_gguf`, `read_vocab`); the free disk space is checked against the planned output size.
- An existing OUT is never replaced without `force`, and `force` replaces only what a quantize run could have
  written (`_check_replaceable`): a file or symlink, or for nf4/fp4/int8 a folder holding just what `write_bnb`
  writes. Never the source checkpoint, a user's folder, the current folder or one above it, home or /.
- Output goes to a temporary name in OUT's folder (`.OUT.XXXX.partial`) and is renamed over OUT only once complete and
  flushed to disk, so Ctrl-C, an exception or a full disk leaves neither a half-written OUT nor the temporary file.
  An old OUT is moved aside, not deleted, until the new one is in place (`_replace`): a failed rename loses nothing.
- Writers stream (one tensor, or one layer's experts, at a time); this module only dispatches: GGUF presets to
  `gguf_writer.write_gguf`, bitsandbytes presets to `bnb_writer.write_bnb`.
- `progress(done, total)` counts source bytes; `tensor_progress(done, total)` counts output tensors (GGUF only).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from marco_local.config import load_config
from marco_local.errors import MarcoError
from marco_local.formats.checkpoint import Checkpoint

from .gguf_writer import GGUF_PRESETS, plan_gguf, read_vocab, write_gguf

ProgressFn = Callable[[int, int], None]

BNB_PRESETS = ("nf4", "fp4", "int8")
PRESETS = (*GGUF_PRESETS, *BNB_PRESETS)
CLASS_ORDER = ("embeddings", "attention", "router", "experts", "dense ffn", "mlp", "norms", "other")


@dataclass
class ClassStats:
    params: int = 0
    bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params if self.params else 0.0


@dataclass
class QuantizeReport:
    src: Path
    out: Path
    preset: str
    format: str  # "gguf" or "bnb"
    output_bytes: int  # the whole output on disk (file, or folder with config and tokenizer)
    seconds: float
    classes: dict[str, ClassStats]
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> number of tensors (GGUF)
    warnings: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.classes.values())

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the tensor data (headers and tokenizer excluded), as llama.cpp reports BPW."""
        data = sum(c.bytes for c in self.classes.values())
        return 8 * data / self.params if self.params else 0.0


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _quantization_config(folder: Path) -> dict | None:
    """config.json's `quantization_config`, or None (also when config.json is unreadable: load_config reports that)."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return qc if isinstance(qc, dict) and qc else None


def _is_bnb_output(folder: Path) -> bool:
    """Whether `folder` holds exactly what a previous nf4/fp4/int8 run wrote: a config.json recording a bitsandbytes
    quantization_config, and only regular files named as `write_bnb` names them. A subfolder, a link or any other
    file (notes a user added, a checkpoint from elsewhere) makes it something --force must not delete."""
    from .bnb_writer import is_output_file

    qc = _quantization_config(folder)
    if qc is None or qc.get("quant_method") != "bitsandbytes":
        return False
    try:
        return all(f.is_file() and not f.is_symlink() and is_output_file(f.name) for f in folder.iterdir())
    except OSError:
        return False


def _check_replaceable(out: Path, src: Path, is_gguf: bool) -> None:
    """Raise unless `force` may replace the existing `out`: only something a quantize run could have written.

    That is a file or a symlink (the link is replaced, never followed) or, for a bitsandbytes preset, a folder
    `_is_bnb_output` recognises; never the source checkpoint nor, whatever they hold, the current folder, a folder
    above it, home or / (`-o . --force` once emptied the folder it was run in).
    """
    hint = "choose a new name with -o"
    src_real = src.resolve()
    if src_real == out.resolve() or out.resolve() in src_real.parents:
        raise MarcoError(f"{out} holds the source checkpoint; refusing to overwrite it", hint=hint)
    # where the entry itself lies: a symlink is judged by its own place, not by what it points to
    where = out.resolve() if out.name in ("", ".", "..") else out.parent.resolve() / out.name
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    protected = {p: "a folder above the current one" for p in cwd.parents}
    protected |= {Path(cwd.anchor): "the root folder", home: "your home folder", cwd: "the current folder"}
    if where in protected:
        raise MarcoError(f"{out} is {protected[where]} ({where}); refusing to replace it", hint=hint, exit_code=2)
    if out.name in ("", ".", ".."):  # always an existing folder, and one that cannot be renamed by that name
        raise MarcoError(f"{out} names a folder by '.' or '..'; refusing to replace it", hint=hint, exit_code=2)
    is_dir = out.is_dir() and not out.is_symlink()
    if not is_gguf and not is_dir and src_real in where.parents:
        # a bitsandbytes output is a folder: replacing a file in SRC would destroy part of the source checkpoint
        raise MarcoError(f"{out} is a file of the source checkpoint; refusing to overwrite it", hint=hint, exit_code=2)
    if out.is_symlink() or out.is_file():
        return
    if is_gguf or not is_dir:
        raise MarcoError(f"{out} is not a regular file; refusing to replace it", hint=hint, exit_code=2)
    if not _is_bnb_output(out):
        raise MarcoError(
            f"{out} is a folder that marco quantize did not write; refusing to replace it",
            hint=f"{hint} (--force replaces only a previous nf4/fp4/int8 output folder)",
            exit_code=2,
        )


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`. An old `out` is moved into a hidden folder beside it and deleted only once
    the new one is in place; if the rename fails, it is moved back, so a failure at this last step loses nothing."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old = aside / out.name
    try:
        os.replace(out, old)
    except OSError as e:
        aside.rmdir()
        raise MarcoError(
            f"could not move the old {out} aside to replace it: {e.strerror}",
            hint="remove it yourself, or choose another -o",
        ) from e
    try:
        os.replace(tmp, out)
    except BaseException as e:
        os.replace(old, out)
        aside.rmdir()
        if isinstance(e, OSError):
            raise MarcoError(f"could not rename the new output to {out}: {e.strerror}; the old one is kept") from e
        raise
    shutil.rmtree(aside, ignore_errors=True)  # the new output is in place; a leftover here would only cost space


def _nearly_full(folder: Path) -> bool:
    return shutil.disk_usage(folder).free < 1 << 20


FLOAT_DTYPES = ("BF16", "F16", "F32")


def _check_float(ckpt: Checkpoint) -> None:
    """Every tensor holds float weights: integer or float8 codes (a checkpoint quantized by some tool that left no
    quantization_config) would be quantized as if they were weights, into a model that computes garbage."""
    dtypes = {n: ckpt.dtype(n) for n in ckpt.names()}
    other = [(n, d) for n, d in dtypes.items() if d not in FLOAT_DTYPES]
    if other:
        name, dtype = other[0]
        raise MarcoError(
            f"tensor {name} in {ckpt.folder} is stored as {dtype} ({len(other)} tensors are not bf16, f16 or f32)",
            hint="quantize from the original float checkpoint",
        )


def _fsync_tree(path: Path) -> None:
    """Flush the output to disk before the rename makes it visible (a crash must not leave a renamed empty file)."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _source_bytes_per_weight(ckpt: Checkpoint) -> float:
    params = 0
    for name in ckpt.names():
        n = 1
        for s in ckpt.shape(name):
            n *= s
        params += n
    return ckpt.nbytes() / params if params else 2.0


def quantize(
    src: str | Path,
    out: str | Path,
    preset: str,
    force: bool = False,
    progress: ProgressFn | None = None,
    tensor_progress: ProgressFn | None = None,
) -> QuantizeReport:
    """Quantize checkpoint folder `src` to `out` (a .gguf file, or a folder for nf4/fp4/int8)."""
    t0 = time.monotonic()
    preset = preset.lower()
    if preset not in PRESETS:
        raise MarcoError(f"unknown quantization type {preset!r}", hint=f"one of: {', '.join(PRESETS)}", exit_code=2)
    src, out = Path(src), Path(out).expanduser()
    if not src.is_dir():
        raise MarcoError(f"{src} is not a checkpoint folder")
    qc = _quantization_config(src)
    if qc is not None:
        method = str(qc.get("quant_method", "unknown method"))
        if method == "bitsandbytes":
            method += " int8" if qc.get("load_in_8bit") else f" {qc.get('bnb_4bit_quant_type', '4-bit')}"
        raise MarcoError(f"{src} is already quantized ({method})", hint="quantize from the original bf16 checkpoint")
    is_gguf = preset in GGUF_PRESETS
    if is_gguf and (out.name in ("", ".", "..") or (out.is_dir() and not out.is_symlink())):
        raise MarcoError(
            f"{out} is a folder; --to {preset} writes one .gguf file",
            hint=f"name the file, e.g. -o {out / f'model-{preset}.gguf'}",
            exit_code=2,
        )
    if is_gguf and out.suffix.lower() != ".gguf":
        # llama.cpp does not care, but `marco run` and the other front ends recognise GGUF files by their suffix
        raise MarcoError(f"a GGUF output must be named *.gguf, not {out.name}", hint=f"-o {out}.gguf", exit_code=2)
    if not is_gguf and out.suffix.lower() == ".gguf":
        raise MarcoError(f"--to {preset} writes a checkpoint folder, not a .gguf file", hint="-o FOLDER", exit_code=2)
    if out.exists() or out.is_symlink():
        _check_replaceable(out, src, is_gguf)  # first, so that no one is told to pass a --force that would not help
        if not force:
            raise MarcoError(f"{out} already exists", hint="pass --force to overwrite it, or choose another -o")
    if not out.parent.is_dir():
        raise MarcoError(f"the folder {out.parent} does not exist", hint="create it first")

    cfg = load_config(src)
    ckpt = Checkpoint(src)  # every shard present, every header parsed, none truncated
    _check_float(ckpt)
    if is_gguf:
        plan = plan_gguf(ckpt, cfg, preset)  # every tensor present with the right shape; llama.cpp can express it
        read_vocab(src, cfg.vocab_size)
        need = sum(t.nbytes for t in plan)
    else:
        need = ckpt.nbytes() // 3  # 4-bit experts plus bf16 embeddings: well under a third of bf16
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise MarcoError(
            f"not enough disk space in {out.parent}: the output needs about {need / 2**30:.1f} GiB, "
            f"{free / 2**30:.1f} GiB free",
            hint="free some space or write elsewhere with -o",
        )
    scale = _source_bytes_per_weight(ckpt)

    def on_weights(done: int, total: int) -> None:
        if progress:
            progress(int(done * scale), int(total * scale))

    if is_gguf:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
        os.close(fd)
    else:
        tmp_name = tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~umask)  # mkstemp/mkdtemp make it private; OUT should not be
    try:
        if is_gguf:
            result = write_gguf(ckpt, cfg, src, tmp, preset, progress=on_weights, tensor_progress=tensor_progress)
        else:
            try:
                from .bnb_writer import write_bnb
            except ImportError as e:
                raise MarcoError(f"bitsandbytes presets are unavailable: {e}", hint="pip install bitsandbytes") from e
            result = write_bnb(ckpt, cfg, src, tmp, preset, progress=on_weights)
        _fsync_tree(tmp)
        _replace(tmp, out)
    except BaseException as e:
        # numpy's short write (the GGUF writer's tofile) raises an OSError with no errno: a full disk shows as such
        full = isinstance(e, OSError) and (e.errno == errno.ENOSPC or (e.errno is None and _nearly_full(out.parent)))
        _remove(tmp)
        if full:
            raise MarcoError(
                f"the disk filled up while writing {out}; nothing was left behind", hint="free some space"
            ) from e
        raise
    return _report(src, out, preset, is_gguf, result, time.monotonic() - t0)


def _report(src: Path, out: Path, preset: str, is_gguf: bool, result: dict, seconds: float) -> QuantizeReport:
    classes: dict[str, ClassStats] = {}
    types: dict[str, int] = {}
    if is_gguf:
        for t in result["tensors"]:
            c = classes.setdefault(t["class"], ClassStats())
            c.params += t["n_params"]
            c.bytes += t["n_bytes"]
            types[t["type"]] = types.get(t["type"], 0) + 1
    else:  # bnb_writer returns {class: {"params": ..., "bytes": ...}}
        for name, s in result.items():
            if isinstance(s, dict) and "params" in s:
                classes[name] = ClassStats(int(s["params"]), int(s["bytes"]))
    order = {c: i for i, c in enumerate(CLASS_ORDER)}
    classes = dict(sorted(classes.items(), key=lambda kv: order.get(kv[0], len(order))))
    return QuantizeReport(
        src=src,
        out=out,
        preset=preset,
        format="gguf" if is_gguf else "bnb",
        output_bytes=_tree_bytes(out),
        seconds=seconds,
        classes=classes,
        types=dict(sorted(types.items())),
        warnings=list(result.get("warnings", [])) if is_gguf else [],
    )
