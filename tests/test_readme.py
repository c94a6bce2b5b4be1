"""README.md's sample outputs are what the commands beside them print today."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from model_fixtures import REPO, SHARED_MODELS

README = (REPO / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)


def _samples() -> list[tuple[str, str]]:
    """(command, output) for every `sh` block of one command line followed by `prints:` and a block."""
    out = []
    for m in re.finditer(r"```sh\n([^\n]+)\n```\nprints:\n\n```\n(.*?)```", README, re.S):
        out.append((m.group(1), m.group(2)))
    return out


def test_readme_has_samples() -> None:
    assert len(_samples()) >= 2


@pytest.mark.parametrize(("command", "output"), _samples(), ids=lambda x: x.split()[1] if " " in x else x[:20])
def test_sample_output_is_current(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str,
                                  output: str) -> None:
    if "../shared/models/" in command and not SHARED_MODELS.is_dir():
        pytest.skip("shared models not available")
    work = tmp_path / "clone"  # looks like the clone's root: examples/ inside, ../shared/models beside it
    work.mkdir()
    os.symlink(REPO / "examples", work / "examples")
    if SHARED_MODELS.is_dir():
        os.symlink(SHARED_MODELS.parent, tmp_path / "shared")
    monkeypatch.chdir(work)
    printed = ""
    for part in command.split(" && "):
        argv = shlex.split(part)
        assert argv[0] == "cimc"
        res = cli(*argv[1:])
        assert res.status == 0, res.err
        printed += res.out
    assert printed == output


def test_python_api_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python snippet runs as pasted, with the bundled example as its model.onnx."""
    import shutil

    (snippet,) = re.findall(r"```python\n(.*?)```", README, re.S)
    shutil.copy(REPO / "examples" / "tiny_llama.onnx", tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "model.cimb").is_file()
