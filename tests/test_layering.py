"""The import direction of the design card: isa <- cimc.ir <- passes <- cimc.driver; runtime <- isa."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("cimc", "isa", "passes", "runtime")
# package (or module prefix) -> top-level packages of ours it may import
ALLOWED = {
    "isa": {"isa"},
    "runtime": {"isa", "runtime"},
    "cimc.ir": {"isa", "cimc.ir"},
    "passes": {"isa", "cimc.ir", "passes"},
    "cimc.frontend": {"isa", "cimc.ir", "cimc.frontend"},
}


def _all_imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute imports)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _imports(path: Path) -> set[str]:
    """The modules of ours `path` imports."""
    return {n for n in _all_imports(path) if n.split(".")[0] in OURS}


def _files(package: str) -> list[Path]:
    base = ROOT / package.replace(".", "/")
    return sorted(base.rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    allowed = ALLOWED[package]
    bad = []
    for path in _files(package):
        for name in _imports(path):
            if not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_nothing_unpickles() -> None:
    for package in OURS:
        for path in _files(package):
            unpicklers = {n for n in _all_imports(path) if n.split(".")[0] in ("pickle", "dill", "cloudpickle")}
            assert not unpicklers, f"{path} imports {unpicklers}"
            assert "allow_pickle=True" not in path.read_text(), path


def test_only_dev_scripts_import_the_exporters() -> None:
    """torch, transformers and optimum are dev-only (dev/zoo makes the zoo): CI does not install them."""
    dev_only = ("torch", "transformers", "optimum", "onnxruntime_genai")
    for package in (*OURS, "tests"):
        for path in _files(package):
            found = {n for n in _all_imports(path) if n.split(".")[0] in dev_only}
            assert not found, f"{path.relative_to(ROOT)} imports {found}"
