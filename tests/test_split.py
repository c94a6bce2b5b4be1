"""Split in its three opset forms (sizes as an attribute before 13, as an input from 13, `num_outputs`
from 18): rotate_half written with a Split, compiled from a tiny graph and compared with
onnxruntime on the same file; parts that do not cover the axis are refused with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_fixtures import ROPE_HD, ROPE_HEADS, matches_onnxruntime, refusals, rope_nodes, xy_model
from onnx import helper, numpy_helper

from cimc.frontend import import_onnx

HD, SEQ = ROPE_HD, 5
D = ROPE_HEADS * ROPE_HD


def split_model(path: Path, opset: int, sizes: list[int] | None = None) -> Path:
    """x [1, seq, D] -> heads -> RoPE whose rotate_half halves come from one Split on the last axis
    (`sizes`, else equal halves: by output count, or by num_outputs from opset 18), saved at `path`."""
    inits: list[onnx.TensorProto] = []
    if sizes is not None and opset >= 13:
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), "sizes"))
        split = helper.make_node("Split", ["q", "sizes"], ["x1", "x2"], name="split", axis=3)
    elif sizes is not None:
        split = helper.make_node("Split", ["q"], ["x1", "x2"], name="split", axis=3, split=sizes)
    elif opset >= 18:
        split = helper.make_node("Split", ["q"], ["x1", "x2"], name="split", axis=-1, num_outputs=2)
    else:
        split = helper.make_node("Split", ["q"], ["x1", "x2"], name="split", axis=3)
    nodes, rope_inits = rope_nodes([split], seed=opset)
    return xy_model(path, [*nodes, helper.make_node("Identity", ["h"], ["y"], name="y")], rope_inits + inits, cols=D,
                    opset=opset)


@pytest.mark.parametrize(("opset", "sizes"), [(11, None), (11, [HD // 2] * 2), (13, None), (13, [HD // 2] * 2),
                                              (18, None), (18, [HD // 2] * 2)])
def test_split_forms_follow_onnxruntime(opset: int, sizes: list[int] | None, tmp_path: Path) -> None:
    path = split_model(tmp_path / "m.onnx", opset, sizes)
    module, _ = import_onnx(path, max_seq=8)
    assert [op.name for op in module.walk("rope")] == ["rope"]
    matches_onnxruntime(path, np.random.default_rng(1).standard_normal((1, SEQ, D)).astype(np.float32))


@pytest.mark.parametrize("opset", [11, 13])
def test_split_sizes_not_covering_the_axis_are_refused(opset: int, tmp_path: Path) -> None:
    reasons = refusals(split_model(tmp_path / "m.onnx", opset, [3, 3]))
    assert reasons["split"] == "Split sizes [3, 3] do not cover the 8 entries of axis 3 in 2 parts"
