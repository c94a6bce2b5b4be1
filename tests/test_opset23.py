"""Opset-23 operators exporters emit: RMSNormalization compiled from a tiny graph, simulated and
compared with onnxruntime on the same file; the forms cimc does not take are refused with the
reason, naming the node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_fixtures import max_err
from onnx import TensorProto, helper, numpy_helper

from cimc.driver import CompileOptions, compile_model
from cimc.frontend import import_onnx
from cimc.frontend.model import CannotCompile
from runtime.interpreter import simulate

D = 16


def rms_model(path: Path, **attrs: object) -> Path:
    """x [1, seq, D] -> RMSNormalization(x, scale) -> y, at opset 23."""
    scale = np.random.default_rng(0).uniform(0.5, 1.5, D).astype(np.float32)
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="rms", **attrs)
    graph = helper.make_graph([node], "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", D])],
                              [numpy_helper.from_array(scale, "scale")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10), str(path))
    return path


@pytest.mark.parametrize("attrs", [{}, {"epsilon": 0.3, "axis": 2}])
def test_rms_normalization_matches_onnxruntime(attrs: dict, tmp_path: Path) -> None:
    """A large epsilon shows whether it is honoured."""
    path = rms_model(tmp_path / "rms.onnx", **attrs)
    module, _ = import_onnx(path, max_seq=8)
    assert [op.attrs["eps"] for op in module.walk("rms_norm")] == [pytest.approx(attrs.get("epsilon", 1e-5))]
    x = np.random.default_rng(1).standard_normal((1, 5, D)).astype(np.float32)
    got = simulate(compile_model(path, CompileOptions(max_seq=8)), {"x": x}).outputs["y"]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert max_err(got, want) <= 1e-5


@pytest.mark.parametrize(("attrs", "needle"), [({"axis": 1}, "axis=1"), ({"stash_type": 10}, "stash_type=10")])
def test_rms_normalization_forms_not_taken_are_refused(attrs: dict, needle: str, tmp_path: Path) -> None:
    with pytest.raises(CannotCompile) as err:
        import_onnx(rms_model(tmp_path / "rms.onnx", **attrs), max_seq=8)
    assert [(n.name, needle in why) for n, why in err.value.failures] == [("rms", True)], err.value.failures
