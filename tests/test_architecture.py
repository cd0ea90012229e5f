"""Imports point down the layers that docs/architecture.md describes: a module may import from a lower layer or from
its own package, never from a layer above it or from a sibling at its own level. Checked over every import in
marco_local/ and quant/, those inside functions included."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# layer of each package or root module, lowest first; modules of the same layer may not import each other's packages
LAYERS: dict[str, int] = {
    "marco_local": 0,  # the package's __init__ (its version) alone
    "marco_local.errors": 0,
    "marco_local.paths": 0,
    "marco_local.config": 1,
    "marco_local.tokenizer": 1,
    "quant": 2,
    "marco_local.kernels": 3,
    "marco_local.models": 3,
    "marco_local.formats": 4,
    "marco_local.layers": 5,
    "marco_local.offload": 6,
    "marco_local.load": 7,
    "marco_local.decode": 8,
    "marco_local.demo": 8,
    "marco_local.sampling": 9,
    "marco_local.cpu_share": 9,
    "marco_local.registry": 9,
    "marco_local.generate": 10,
    "marco_local.chat": 11,
    "marco_local.benchmark": 11,
    "marco_local.inventory": 11,
    "marco_local.runtime": 12,
    "marco_local.cli": 13,
    "marco_local.__main__": 14,
}

# Imports that break the rule today, each to be removed (issue 20); the test also fails when one of them is gone, so
# the list only shrinks.
KNOWN = {
    ("quant.bnb_writer", "marco_local.formats.checkpoint"),
    ("quant.convert", "marco_local.formats.checkpoint"),
    ("quant.gguf_writer", "marco_local.demo"),
    ("quant.gguf_writer", "marco_local.formats.checkpoint"),
}


def unit(module: str) -> str:
    """The LAYERS key a module belongs to: the longest one that is the module or a package above it."""
    best = "marco_local" if module == "marco_local" else ""
    for key in LAYERS:
        if key != "marco_local" and (module == key or module.startswith(key + ".")) and len(key) > len(best):
            best = key
    assert best, f"{module} has no layer in tests/test_architecture.py: add it"
    return best


def module_name(path: Path) -> tuple[str, list[str]]:
    """(dotted module name, its package's parts) for a source file."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def imports(path: Path) -> set[str]:
    """Every module path.py imports from marco_local or quant (absolute names; `from pkg import mod` as pkg.mod
    where mod is a module)."""
    name, package = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*sub.split("."))
                ).is_dir()
                found.add(sub if is_module else base)
    return {m for m in found if m.split(".")[0] in ("marco_local", "quant")}


def violations() -> set[tuple[str, str]]:
    bad = set()
    for top in ("marco_local", "quant"):
        for path in (ROOT / top).rglob("*.py"):
            name, _ = module_name(path)
            mine = unit(name)
            for target in imports(path):
                theirs = unit(target)
                if theirs == mine:
                    continue
                if LAYERS[theirs] >= LAYERS[mine]:
                    bad.add((name, target))
    return bad


def test_imports_point_down_the_layers() -> None:
    new = violations() - KNOWN
    assert not new, "imports from a layer above or beside (see docs/architecture.md):\n" + "\n".join(
        f"  {a} imports {b}" for a, b in sorted(new)
    )


def test_the_list_of_known_exceptions_only_shrinks() -> None:
    gone = KNOWN - violations()
    assert not gone, f"no longer imported: remove from KNOWN in tests/test_architecture.py: {sorted(gone)}"
