"""The ONNX backend (cimc.backend) and the conformance table it feeds (benchmarks/conformance.py,
docs/conformance.md). CI runs a few node cases per claimed op against what the table records;
`pytest -m conformance` runs them all and regenerates the table in memory."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cimc.backend import CimcBackend
from cimc.frontend.model import CannotCompile

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("conformance", ROOT / "benchmarks" / "conformance.py")
conformance = sys.modules["conformance"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conformance)

#: Cases per claimed op in the CI subset (the first by name).
FAST_PER_OP = 2
OVERALL = re.compile(r"^overall: (\d+)/(\d+) cases", re.M)


def _recorded() -> dict[str, str]:
    """docs/conformance.md's verdict per case: "" for a pass, else the failure's reason."""
    text = conformance.DOC.read_text(encoding="utf-8")
    failed = dict(re.findall(r"^- `(test_\w+)` \(\w+\): (.*)$", text, re.M))
    cases = conformance.counted(conformance.claimed_ops())
    return {c.name: failed.get(c.name, "") for mine in cases.values() for c in mine}


def _linear_tanh(tmp_path: Path) -> onnx.ModelProto:
    """A token-sequence model cimc compiles: tanh(x @ W + b) over [1, seq, 8] activations."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"]),
         helper.make_node("Tanh", ["z"], ["y"])], "linear_tanh",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", 4])], [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_backend_matches_onnxruntime(tmp_path):
    model = _linear_tanh(tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 5, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rep = CimcBackend.prepare(model, max_seq=8)
    (got,) = rep.run([x])
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rep.run({"x": x}).y, got)


def test_backend_raises_the_cannot_compile_error():
    graph = helper.make_graph(
        [helper.make_node("Mod", ["x", "x"], ["y"])], "mod",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", 4])])
    with pytest.raises(CannotCompile) as e:
        CimcBackend.prepare(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    assert [(n.op_type, why) for n, why in e.value.failures] == [("Mod", "op Mod is not supported on activations")]
    assert not CimcBackend.supports_device("CUDA") and CimcBackend.supports_device("CPU")


def test_claim_is_derived_from_the_frontend():
    ops = conformance.frontend_ops()
    assert {"MatMul", "Softmax", "DequantizeLinear"} <= set(ops)  # a handler, a handler, a converter
    assert set(conformance.EXCLUDED) <= set(ops), "an exclusion names an op the frontend no longer takes"
    assert set(conformance.claimed_ops()) == set(ops) - set(conformance.EXCLUDED)


def test_doc_overall_line_sums_its_table():
    text = conformance.DOC.read_text(encoding="utf-8")
    passed, total = map(int, OVERALL.search(text).groups())
    rows = re.findall(r"^\| \w+ \| (\d+) \| (\d+) \|", text, re.M)
    assert (passed, total) == (sum(int(p) for _, p in rows), sum(int(n) for n, _ in rows))
    assert total == len(_recorded())


def test_fast_subset_agrees_with_the_doc():
    """A few cases per claimed op give the verdict docs/conformance.md records for them."""
    recorded = _recorded()
    for outcome in conformance.run(conformance.claimed_ops(), per_op=FAST_PER_OP):
        assert outcome.reason == recorded[outcome.case], f"{outcome.case}: docs/conformance.md is stale"


@pytest.mark.conformance
def test_doc_is_what_the_script_generates():
    ops = conformance.claimed_ops()
    assert conformance.DOC.read_text(encoding="utf-8") == conformance.render(conformance.run(ops), ops), \
        "docs/conformance.md is out of date: run python benchmarks/conformance.py"


@pytest.mark.conformance
def test_pass_rate_is_at_least_95_percent():
    outcomes = conformance.run(conformance.claimed_ops())
    assert sum(not o.reason for o in outcomes) >= 0.95 * len(outcomes)
