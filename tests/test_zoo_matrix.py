"""The family × exporter × precision matrix (benchmarks/matrix.py): every zoo file still gets the
verdict docs/matrix.md and the README table record, re-measured against onnxruntime now."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from model_fixtures import REPO

_spec = importlib.util.spec_from_file_location("matrix", REPO / "benchmarks" / "matrix.py")
matrix = sys.modules["matrix"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)

ZOO = matrix.zoo()
RECORDED = json.loads(matrix.RESULTS.read_text(encoding="utf-8"))
PROMPTS = {f["family"]: f["prompt"] for f in ZOO["families"]}


def test_docs_are_generated_from_the_recorded_matrix() -> None:
    assert {r["file"] for r in ZOO["models"]} == set(RECORDED), "run python benchmarks/matrix.py"
    assert matrix.DOC.read_text(encoding="utf-8") == matrix.doc(RECORDED)
    readme = matrix.README.read_text(encoding="utf-8")
    assert matrix.readme_section(RECORDED) in readme


@pytest.mark.parametrize("record", ZOO["models"], ids=lambda r: r["file"].removesuffix(".onnx"))
def test_cell_verdict_is_current(record: dict) -> None:
    got = matrix.run_cell(record, PROMPTS[record["family"]])
    want = RECORDED[record["file"]]
    assert (got["verdict"], got["reason"]) == (want["verdict"], want["reason"]), \
        "the cell's verdict changed: if on purpose, record it with python benchmarks/matrix.py"
    for key in ("max_abs_error", "mean_cosine"):
        if key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
