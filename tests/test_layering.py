"""Package structure: the import direction of docs/design.md, file sizes, module docstrings.

Everything is read with ``ast`` (nothing is imported), so the test is fast and also sees
imports inside functions and ``if TYPE_CHECKING:`` blocks: a type-only import still
couples two layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import terarec

ROOT = Path(terarec.__file__).resolve().parent
MAX_LINES = 800

# Leaf modules every layer may import. ``config`` is plain data that every layer consumes
# (TableConfig, SparseOptimConfig, ModelConfig, ...) and imports only stdlib + yaml;
# ``hashing`` (splitmix64, shared by data/ and ps/) is a leaf of docs/design.md's table and
# imports only numpy + torch; ``__init__`` is the package root (``__version__``).
# ``runtime`` (the device resolver and the distributed handles) imports only torch.
BASE = {"__init__", "config", "hashing", "runtime"}

# The "may import" column of docs/design.md's layer table, restricted to terarec's own
# layers (third-party packages are not checked here). Keys are the first component under
# ``terarec.``; a layer may always import itself and BASE.
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "config": set(),
    "hashing": set(),
    "runtime": set(),
    "data": set(),
    "optim": set(),
    "topology": set(),
    "models": set(),
    # docs/design.md: "optim/ (row optimizers), topology/ (the plan)".
    "ps": {"optim", "topology"},
    "trainer": {"data", "ps", "optim", "topology", "models"},  # "everything above"
    # docs/design.md: models, ps (read-only tiers), the checkpoint reader; data/ for
    # hashing raw values to keys exactly as training does.
    "serve": {"models", "ps", "data", "trainer"},
    "launch": {"topology"},
    "cli": {"data", "ps", "optim", "topology", "models", "trainer", "serve", "launch"},
}


# Inside ps/: what each part may import besides itself (the first component under
# ``terarec.ps.``; top-level modules by name). Storage never reaches up to the group or
# the embedding module: index < tiers < store < group < table < shard < embedding.
PS_ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "index": set(),
    "initializer": set(),
    "admission": set(),
    "touched": {"index", "changes"},
    "changes": {"index"},
    "features": set(),
    "pooling": set(),
    "state": set(),
    "tiers": {"index"},
    "store": {"index", "tiers"},
    "group": {"index", "tiers", "store", "admission", "touched", "changes", "initializer"},
    "table": {"group", "initializer"},
    "shard": {"group", "index", "tiers", "store"},
    "embedding": {"group", "table", "shard", "tiers", "store", "features", "pooling",
                  "state"},
}
# Files in these layers stay under this many lines (the others under MAX_LINES).
SMALL = {"ps": 600, "trainer": 600}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _all_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


FILES = _all_files()
MODULES = {_module_name(p) for p in FILES}


def _layer(module: str) -> str:
    """``terarec.ps.table`` -> ``ps``; ``terarec`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """Absolute module named by a (possibly relative) ``from X import ...``."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def terarec_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every ``terarec.*`` module that ``source`` (the code of ``module``) imports."""
    out: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "terarec"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(node, module, is_package)
            if target.split(".")[0] != "terarec":
                continue
            for alias in node.names:
                # `from terarec import ps` imports the subpackage, not just the root.
                sub = f"{target}.{alias.name}"
                out.append(sub if sub in MODULES else target)
    return out


def test_every_layer_is_in_the_map() -> None:
    layers = {_layer(m) for m in MODULES}
    unknown = sorted(layers - set(ALLOWED))
    assert not unknown, (
        f"terarec/ has top-level modules/packages {unknown} that this test's ALLOWED map "
        "does not know; add them with the imports docs/design.md allows"
    )


def test_import_direction_follows_design() -> None:
    violations = []
    for path in FILES:
        src = _module_name(path)
        src_layer = _layer(src)
        allowed = ALLOWED[src_layer] | BASE | {src_layer}
        code = path.read_text()
        for imported in terarec_imports(code, src, path.name == "__init__.py"):
            if _layer(imported) not in allowed:
                violations.append(f"{src} -> {imported}")
    assert not violations, (
        "imports against the direction of docs/design.md (lower layers must not import higher "
        "ones):\n  " + "\n  ".join(violations)
    )


def _ps_part(module: str) -> str:
    """``terarec.ps.tiers.cache`` -> ``tiers``; ``terarec.ps`` -> ``__init__``."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 else "__init__"


def test_every_ps_part_is_in_the_map() -> None:
    parts = {_ps_part(m) for m in MODULES if _layer(m) == "ps"}
    assert parts <= set(PS_ALLOWED), sorted(parts - set(PS_ALLOWED))


def test_ps_parts_import_downwards() -> None:
    violations = []
    for path in FILES:
        src = _module_name(path)
        if _layer(src) != "ps":
            continue
        allowed = PS_ALLOWED[_ps_part(src)] | {_ps_part(src), "__init__"}
        for imported in terarec_imports(path.read_text(), src, path.name == "__init__.py"):
            if _layer(imported) == "ps" and _ps_part(imported) not in allowed:
                violations.append(f"{src} -> {imported}")
    assert not violations, "ps/ imports against its layering:\n  " + "\n  ".join(violations)


def test_relative_imports_resolve() -> None:
    tree = ast.parse("from . import hash_index\nfrom ..optim.sparse import RowOptimizer\n")
    a, b = tree.body
    assert isinstance(a, ast.ImportFrom) and isinstance(b, ast.ImportFrom)
    assert _resolve_from(a, "terarec.ps.table", False) == "terarec.ps"
    assert _resolve_from(b, "terarec.ps.table", False) == "terarec.optim.sparse"
    assert _resolve_from(a, "terarec.ps", True) == "terarec.ps"


def test_checker_catches_an_upward_import() -> None:
    # A ps module that imports higher layers, relatively and absolutely, in a function.
    code = "def f():\n    from ..trainer import loop\n    import terarec.models\n"
    found = terarec_imports(code, "terarec.ps.table")
    assert found == ["terarec.trainer.loop", "terarec.models"]
    assert {_layer(m) for m in found} - (ALLOWED["ps"] | BASE) == {"trainer", "models"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_file_size(path: Path) -> None:
    n = len(path.read_text().splitlines())
    limit = SMALL.get(_layer(_module_name(path)), MAX_LINES)
    assert n <= limit, f"{path.relative_to(ROOT.parent)}: {n} lines (> {limit}); split it"


def _is_public(path: Path) -> bool:
    parts = path.relative_to(ROOT).parts
    return not any(p.startswith("_") and p != "__init__.py" for p in parts)


@pytest.mark.parametrize(
    "path", [p for p in FILES if _is_public(p)], ids=lambda p: str(p.relative_to(ROOT.parent))
)
def test_public_module_has_docstring(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and doc.strip(), f"{path.relative_to(ROOT.parent)}: no module docstring"


def test_serve_uses_the_checkpoint_reader_not_the_training_loop() -> None:
    bad = []
    for path in FILES:
        src = _module_name(path)
        if _layer(src) != "serve":
            continue
        for imported in terarec_imports(path.read_text(), src, path.name == "__init__.py"):
            if _layer(imported) == "trainer" and not imported.startswith(
                    "terarec.trainer.checkpoint"):
                bad.append(f"{src} -> {imported}")
    assert not bad, "serve/ may read checkpoints, never run the trainer:\n  " + "\n  ".join(bad)
