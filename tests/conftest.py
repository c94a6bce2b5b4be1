"""Shared test fixtures: where the repository and the shared model zoo live, and the CLI in-process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from model_fixtures import SHARED_MODELS


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """The shared models folder; skips the test when it is not there."""
    if not SHARED_MODELS.is_dir():
        pytest.skip(f"shared models folder {SHARED_MODELS} is not available")
    return SHARED_MODELS


@dataclass
class CliResult:
    """What one `cimc` invocation did: exit status and captured stdout/stderr."""

    status: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """`cli("run", "x.cimb", ...)` runs `cimc.cli.main` in-process and returns a `CliResult`."""
    from cimc.cli import main

    monkeypatch.delenv("CIMC_DEBUG", raising=False)  # internal errors must be reported, not raised

    def run(*argv: object) -> CliResult:
        capsys.readouterr()
        status = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return CliResult(status, out, err)

    return run
