"""Converters by opset: the attribute and input forms of Slice, Squeeze, Unsqueeze, ReduceMean and
ReduceSum, and Softmax's axis before and after opset 13, each compiled from a tiny graph and
compared with onnxruntime on the same file; an opset outside every registered range is refused.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_fixtures import ROPE_HD, ROPE_HEADS, matches_onnxruntime, refusals, rope_nodes, xy_model
from onnx import helper, numpy_helper

from cimc.frontend import import_onnx
from cimc.frontend.converters import CONVERTERS
from cimc.ir.rules import RULES

HD = ROPE_HD
D = ROPE_HEADS * ROPE_HD
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


def opset_model(path: Path, opset: int, softmax_axis: int | None = -1) -> Path:
    """x [1, seq, D] -> RoPE on two heads (rotate_half by two Slices) -> Unsqueeze, Squeeze ->
    x - mean(x) -> / (sum of squares + 1) -> Softmax -> y, written in the forms of `opset`
    (Softmax's axis attribute: `softmax_axis`, None for none), saved at `path`."""
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    rope, rope_inits = rope_nodes([_slice("q", "x1", 0, HD // 2, 3, opset, inits),
                                   _slice("q", "x2", HD // 2, HD, 3, opset, inits)], seed=opset)
    nodes = [
        *rope,
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
    return xy_model(path, nodes, rope_inits + inits, cols=D, opset=opset)


@pytest.mark.parametrize("opset", [9, 11, 13, 18])
def test_opset_forms_follow_onnxruntime(opset: int, tmp_path: Path) -> None:
    """Opset 9: every axis or bound an attribute; 11: Slice's bounds inputs; 13: Squeeze, Unsqueeze
    and ReduceSum's axes inputs; 18: ReduceMean's too. Softmax's axis is the last (2 below 13, as
    its 2-D coercion needs; -1 from 13). The RoPE must be recognised (its slices read right)."""
    path = opset_model(tmp_path / "m.onnx", opset, 2 if opset < 13 else -1)
    module, _ = import_onnx(path, max_seq=8)
    assert [op.name for op in module.walk("rope")] == ["rope"]
    assert {op.name for op in module.walk("reduce_mean")} | {op.name for op in module.walk("reduce_sum")} == \
        {"reduce_mean", "reduce_sum"}
    matches_onnxruntime(path, np.random.default_rng(1).standard_normal((1, SEQ, D)).astype(np.float32))


def test_softmax_before_opset_13_is_coerced_to_2d(tmp_path: Path) -> None:
    """Softmax-11 without an axis normalises over axes 1.. of the [1, seq, D] input together (its
    default axis is 1): not a softmax over the features, so it is refused, not miscompiled."""
    assert refusals(opset_model(tmp_path / "m.onnx", 11, None)) == \
        {"softmax": "Softmax is supported over the last axis"}


def test_opset_outside_every_range_is_refused(tmp_path: Path) -> None:
    """Add before opset 7 broadcasts by attribute only: no converter covers it, and the error says
    which opsets are converted."""
    path = xy_model(tmp_path / "m.onnx", [helper.make_node("Add", ["x", "x"], ["y"], name="add")], {}, cols=D, opset=6)
    assert refusals(path) == {"add": "Add at opset 6 is not supported (cimc converts it at opsets 7+)"}


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
