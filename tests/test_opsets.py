"""Converters by opset: the attribute and input forms of Slice, Squeeze, Unsqueeze, ReduceMean and
ReduceSum, and Softmax's axis before and after opset 13, each compiled from a tiny graph and
compared with onnxruntime on the same file; an opset outside every registered range is refused.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_fixtures import max_err
from onnx import TensorProto, helper, numpy_helper

from cimc.driver import CompileOptions, compile_model
from cimc.frontend import import_onnx
from cimc.frontend.converters import CONVERTERS
from cimc.frontend.model import CannotCompile
from cimc.ir.rules import RULES
from runtime.interpreter import simulate

HEADS, HD = 2, 8
D = HEADS * HD
SEQ = 5


def _axes_node(op: str, src: str, out: str, axes: list[int], opset: int, first_input_opset: int,
               inits: list[onnx.TensorProto], **attrs: object) -> onnx.NodeProto:
    """`op` with `axes` as an attribute below `first_input_opset`, as an input from it."""
    if opset < first_input_opset:
        return helper.make_node(op, [src], [out], name=out, axes=axes, **attrs)
    inits.append(numpy_helper.from_array(np.array(axes, np.int64), f"{out}_axes"))
    return helper.make_node(op, [src, f"{out}_axes"], [out], name=out, **attrs)


def _slice(src: str, out: str, lo: int, hi: int, axis: int, opset: int,
           inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    if opset < 10:
        return helper.make_node("Slice", [src], [out], name=out, starts=[lo], ends=[hi], axes=[axis])
    for name, v in (("lo", lo), ("hi", hi), ("ax", axis)):
        inits.append(numpy_helper.from_array(np.array([v], np.int64), f"{out}_{name}"))
    return helper.make_node("Slice", [src, f"{out}_lo", f"{out}_hi", f"{out}_ax"], [out], name=out)


def opset_model(opset: int, softmax_axis: int | None = -1) -> onnx.ModelProto:
    """x [1, seq, D] -> RoPE on two heads (rotate_half by two Slices; cos and sin tables made from
    x's shape) -> Unsqueeze, Squeeze -> x - mean(x) -> / (sum of squares + 1) -> Softmax -> y,
    written in the forms of `opset` (Softmax's axis attribute: `softmax_axis`, None for none)."""
    rng = np.random.default_rng(opset)
    inits = [numpy_helper.from_array(np.array([1, -1, HEADS, HD], np.int64), "split"),
             numpy_helper.from_array(np.array([1, -1, D], np.int64), "merge"),
             numpy_helper.from_array(np.array([1], np.int64), "seq_at"),
             numpy_helper.from_array(np.array([HD], np.int64), "hd"),
             numpy_helper.from_array(rng.uniform(-1, 1, HD).astype(np.float32), "cvec"),
             numpy_helper.from_array(rng.uniform(-1, 1, HD).astype(np.float32), "svec"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "seq_at"], ["seq"], name="seq"),
        helper.make_node("Concat", ["seq", "hd"], ["table_shape"], name="table_shape", axis=0),
        helper.make_node("ConstantOfShape", ["table_shape"], ["ones"], name="ones",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Mul", ["ones", "cvec"], ["cos"], name="cos"),
        helper.make_node("Mul", ["ones", "svec"], ["sin"], name="sin"),
        helper.make_node("Reshape", ["x", "split"], ["heads"], name="heads"),
        helper.make_node("Transpose", ["heads"], ["q"], name="q", perm=[0, 2, 1, 3]),
        _slice("q", "x1", 0, HD // 2, 3, opset, inits),
        _slice("q", "x2", HD // 2, HD, 3, opset, inits),
        helper.make_node("Neg", ["x2"], ["neg"], name="neg"),
        helper.make_node("Concat", ["neg", "x1"], ["rot"], name="rot", axis=3),
        helper.make_node("Mul", ["q", "cos"], ["qc"], name="qc"),
        helper.make_node("Mul", ["rot", "sin"], ["rs"], name="rs"),
        helper.make_node("Add", ["qc", "rs"], ["rope"], name="rope"),
        helper.make_node("Transpose", ["rope"], ["back"], name="back", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["back", "merge"], ["h"], name="h"),
        _axes_node("Unsqueeze", "h", "u", [0], opset, 13, inits),
        _axes_node("Squeeze", "u", "s", [0], opset, 13, inits),
        _axes_node("ReduceMean", "s", "mean", [-1], opset, 18, inits, keepdims=1),
        helper.make_node("Sub", ["s", "mean"], ["d"], name="d"),
        helper.make_node("Mul", ["d", "d"], ["d2"], name="d2"),
        _axes_node("ReduceSum", "d2", "ss", [2], opset, 13, inits, keepdims=1),
        helper.make_node("Add", ["ss", "one"], ["den"], name="den"),
        helper.make_node("Div", ["d", "den"], ["z"], name="z"),
        helper.make_node("Softmax", ["z"], ["y"], name="softmax",
                         **({} if softmax_axis is None else {"axis": softmax_axis})),
    ]
    graph = helper.make_graph(nodes, f"opset{opset}", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                     [1, "seq", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


@pytest.mark.parametrize("opset", [9, 11, 13, 18])
def test_opset_forms_follow_onnxruntime(opset: int, tmp_path: Path) -> None:
    """Opset 9: every axis or bound an attribute; 11: Slice's bounds inputs; 13: Squeeze, Unsqueeze
    and ReduceSum's axes inputs; 18: ReduceMean's too. Softmax's axis is the last (2 below 13, as
    its 2-D coercion needs; -1 from 13). The RoPE must be recognised (its slices read right)."""
    path = tmp_path / "m.onnx"
    onnx.save(opset_model(opset, 2 if opset < 13 else -1), str(path))
    module, _ = import_onnx(path, max_seq=8)
    assert [op.name for op in module.walk("rope")] == ["rope"]
    assert {op.name for op in module.walk("reduce_mean")} | {op.name for op in module.walk("reduce_sum")} == \
        {"reduce_mean", "reduce_sum"}
    x = np.random.default_rng(1).standard_normal((1, SEQ, D)).astype(np.float32)
    got = simulate(compile_model(path, CompileOptions(max_seq=8)), {"x": x}).outputs["y"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert max_err(got, want) <= 1e-5, f"opset {opset}: max |y - onnxruntime| = {max_err(got, want):.3g}"


def _refusals(path: Path) -> dict[str, str]:
    with pytest.raises(CannotCompile) as err:
        import_onnx(path, max_seq=8)
    return {node.name: reason for node, reason in err.value.failures}


def test_softmax_before_opset_13_is_coerced_to_2d(tmp_path: Path) -> None:
    """Softmax-11 without an axis normalises over axes 1.. of the [1, seq, D] input together (its
    default axis is 1): not a softmax over the features, so it is refused, not miscompiled."""
    path = tmp_path / "m.onnx"
    onnx.save(opset_model(11, None), str(path))
    assert _refusals(path) == {"softmax": "Softmax is supported over the last axis"}


def test_opset_outside_every_range_is_refused(tmp_path: Path) -> None:
    """Add before opset 7 broadcasts by attribute only: no converter covers it, and the error says
    which opsets are converted."""
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"], name="add")], "old",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", D])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=7), str(path))
    assert _refusals(path) == {"add": "Add at opset 6 is not supported (cimc converts it at opsets 7+)"}


def test_registries_are_consistent() -> None:
    """Each op's opset ranges are sorted and disjoint; rule names are unique; every rule's level
    is one of the two and a frontend rule's anchor is an op type some converter lifts."""
    for key, versions in CONVERTERS.items():
        for a, b in pairwise(versions):
            assert a.until is not None and a.until <= b.since, key
    assert len({r.name for r in RULES}) == len(RULES)
    lifted = {op for _, op in CONVERTERS}
    assert {r.level for r in RULES} == {"onnx", "ir"}
    assert all(r.anchor in lifted for r in RULES if r.level == "onnx")
