"""Split in its three opset forms (sizes as an attribute before 13, as an input from 13, `num_outputs`
from 18): rotate_half written with a Split, compiled from a tiny graph and compared with
onnxruntime on the same file; parts that do not cover the axis are refused with the reason."""

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

HEADS, HD, SEQ = 2, 8, 5
D = HEADS * HD


def split_model(opset: int, sizes: list[int] | None = None) -> onnx.ModelProto:
    """x [1, seq, D] -> heads -> RoPE whose rotate_half halves come from one Split on the last axis
    (`sizes`, else equal halves: by output count, or by num_outputs from opset 18)."""
    rng = np.random.default_rng(opset)
    inits = [numpy_helper.from_array(np.array([1, -1, HEADS, HD], np.int64), "split_heads"),
             numpy_helper.from_array(np.array([1, -1, D], np.int64), "merge"),
             numpy_helper.from_array(np.array([1], np.int64), "seq_at"),
             numpy_helper.from_array(np.array([HD], np.int64), "hd"),
             numpy_helper.from_array(rng.uniform(-1, 1, HD).astype(np.float32), "cvec"),
             numpy_helper.from_array(rng.uniform(-1, 1, HD).astype(np.float32), "svec")]
    if sizes is not None and opset >= 13:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        split = helper.make_node("Split", ["q", "sizes"], ["x1", "x2"], name="split", axis=3)
    elif sizes is not None:
        split = helper.make_node("Split", ["q"], ["x1", "x2"], name="split", axis=3, split=sizes)
    elif opset >= 18:
        split = helper.make_node("Split", ["q"], ["x1", "x2"], name="split", axis=-1, num_outputs=2)
    else:
        split = helper.make_node("Split", ["q"], ["x1", "x2"], name="split", axis=3)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "seq_at"], ["seq"], name="seq"),
        helper.make_node("Concat", ["seq", "hd"], ["table_shape"], name="table_shape", axis=0),
        helper.make_node("ConstantOfShape", ["table_shape"], ["ones"], name="ones",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Mul", ["ones", "cvec"], ["cos"], name="cos"),
        helper.make_node("Mul", ["ones", "svec"], ["sin"], name="sin"),
        helper.make_node("Reshape", ["x", "split_heads"], ["heads"], name="heads"),
        helper.make_node("Transpose", ["heads"], ["q"], name="q", perm=[0, 2, 1, 3]),
        split,
        helper.make_node("Neg", ["x2"], ["neg"], name="neg"),
        helper.make_node("Concat", ["neg", "x1"], ["rot"], name="rot", axis=3),
        helper.make_node("Mul", ["q", "cos"], ["qc"], name="qc"),
        helper.make_node("Mul", ["rot", "sin"], ["rs"], name="rs"),
        helper.make_node("Add", ["qc", "rs"], ["rope"], name="rope"),
        helper.make_node("Transpose", ["rope"], ["back"], name="back", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["back", "merge"], ["y"], name="y"),
    ]
    graph = helper.make_graph(nodes, f"split{opset}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize(("opset", "sizes"), [(11, None), (11, [HD // 2] * 2), (13, None), (13, [HD // 2] * 2),
                                              (18, None), (18, [HD // 2] * 2)])
def test_split_forms_follow_onnxruntime(opset: int, sizes: list[int] | None, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(split_model(opset, sizes), str(path))
    module, _ = import_onnx(path, max_seq=8)
    assert [op.name for op in module.walk("rope")] == ["rope"]
    x = np.random.default_rng(1).standard_normal((1, SEQ, D)).astype(np.float32)
    got = simulate(compile_model(path, CompileOptions(max_seq=8)), {"x": x}).outputs["y"]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert max_err(got, want) <= 1e-5, f"opset {opset} {sizes}: max |y - onnxruntime| = {max_err(got, want):.3g}"


@pytest.mark.parametrize("opset", [11, 13])
def test_split_sizes_not_covering_the_axis_are_refused(opset: int, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    model = split_model(opset, [3, 3])
    onnx.save(model, str(path))
    with pytest.raises(CannotCompile) as err:
        import_onnx(path, max_seq=8)
    reasons = {node.name: reason for node, reason in err.value.failures}
    assert reasons["split"] == "Split sizes [3, 3] do not cover the 8 entries of axis 3 in 2 parts"
