"""Repository hygiene: CI runs the README's test command; the code is ruff-clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from model_fixtures import REPO


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    command = next(line for line in (REPO / ".ci" / "run").read_text().splitlines()
                   if "pytest" in line and not line.startswith("#"))
    assert f"\n{command}\n" in readme
    assert "cimc demo" in readme


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    out = subprocess.run([ruff, "check", str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_python_api_is_reexported() -> None:
    """`import cimc` offers the documented API (the same objects as their home modules)."""
    import cimc
    from cimc.driver import compile_model
    from runtime.generate import generate
    for name in cimc.__all__:
        assert callable(getattr(cimc, name)), name
    assert cimc.compile_model is compile_model and cimc.generate is generate
    with pytest.raises(AttributeError):
        _ = cimc.no_such_thing
