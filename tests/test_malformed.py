"""Graphs cimc cannot lift end in the listed-nodes error (exit 2, the node named with its reason),
never in an internal error (exit 3): a corpus of small, malformed or unliftable graphs built with
onnx.helper around one embedding Gather and one lm_head MatMul, each with one thing wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN = 32, 16
MS = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _floats(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(len(name)).standard_normal(shape).astype(np.float32), name)


def _ints(name: str, value: list) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.int64), name)


def _graph(mid: list[onnx.NodeProto], inits: tuple = (), opsets: list | None = None,
           outputs: list[str] | None = None) -> onnx.ModelProto:
    """input_ids -> Gather(emb) = h -> `mid` (ending in x) -> MatMul(head) = logits, plus `outputs`."""
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"), *mid,
             helper.make_node("MatMul", ["x", "head"], ["logits"], name="lm_head")]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", VOCAB])]
    outs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs or []]
    graph = helper.make_graph(nodes, "malformed",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])], outs,
                              [_floats("emb", (VOCAB, HIDDEN)), _floats("head", (HIDDEN, VOCAB)), *inits])
    model = helper.make_model(graph, opset_imports=opsets if opsets is not None else MS[:1])
    model.ir_version = 8
    return model


def _node(op: str, inputs: list[str], name: str, out: str = "x", domain: str = "", **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [out], name=name, domain=domain, **attrs)


#: case -> (model, the node the error names, words of its reason)
CASES = {
    # a Reshape to a shape cimc cannot view (was: internal error ViewError ... changes the element count)
    "reshape-split-merge": (_graph([_node("Reshape", ["h", "s1"], "bad_reshape", "r"),
                                    _node("Reshape", ["r", "s2"], "back")], (_ints("s1", [1, -1, 8]),
                                                                             _ints("s2", [1, -1, HIDDEN]))),
                            "bad_reshape", "Reshape"),
    "reshape-element-count": (_graph([_node("Reshape", ["h", "s"], "bad_reshape")], (_ints("s", [1, 3, 7]),)),
                              "bad_reshape", "changes the element count"),
    # shape inference cannot type the node (broadcast of 16 against 3): its output shape is unknown
    "shape-inference": (_graph([_node("Add", ["h", "w3"], "bad_add")], (_floats("w3", (3,)),)),
                        "bad_add", "unknown after shape inference"),
    "matmul-mismatch": (_graph([_node("MatMul", ["h", "w"], "bad_mm")], (_floats("w", (8, HIDDEN)),)),
                        "bad_mm", "features"),
    # a node against its schema (arity), standard and contrib
    "schema-arity": (_graph([_node("Relu", ["h", "h"], "relu2")]), "relu2", "not valid ONNX"),
    "contrib-arity": (_graph([_node("SkipSimplifiedLayerNormalization", ["h"], "ssln", domain="com.microsoft")],
                             opsets=MS), "ssln", "needs 3 inputs"),
    "contrib-missing-inputs": (_graph([_node("MatMulNBits", ["h"], "mnb", domain="com.microsoft", K=HIDDEN,
                                             N=HIDDEN, bits=4, block_size=16)], opsets=MS), "mnb", "required"),
    # opset imports
    "no-default-opset": (_graph([_node("Identity", ["h"], "ident")], opsets=MS[1:]), "embed", "no opset"),
    "no-contrib-opset": (_graph([_node("SimplifiedLayerNormalization", ["h", "g"], "sln", domain="com.microsoft")],
                                (_floats("g", (HIDDEN,)),)), "sln", "no opset for its domain 'com.microsoft'"),
    # a graph output cimc cannot produce: a constant (does not depend on the tokens)
    "constant-output": (_graph([_node("Identity", ["h"], "ident"),
                                _node("Constant", [], "const", "c", value=_floats("cv", (1, 2, VOCAB)))],
                               outputs=["c"]), "const", "does not depend on the input tokens"),
    # a data-dependent shape cimc cannot bind
    "data-dependent-shape": (_graph([_node("NonZero", ["input_ids"], "nz", "nzo"), _node("Identity", ["h"], "ident")]),
                             "nz", "not supported"),
    "slice-axis-out-of-range": (_graph([_node("Slice", ["h", "st", "en", "ax"], "bad_slice")],
                                       (_ints("st", [0]), _ints("en", [8]), _ints("ax", [5]))),
                                "bad_slice", "out of range"),
    # bounds and axes a converter indexes by (were: ValueError from zip, ZeroDivisionError, IndexError)
    "slice-bounds-of-two-lengths": (_graph([_node("Slice", ["h", "st", "en", "ax"], "bad_slice")],
                                           (_ints("st", [0, 0]), _ints("en", [8]), _ints("ax", [2]))),
                                    "bad_slice", "differ in length"),
    "slice-9-bounds-of-two-lengths": (_graph([_node("Slice", ["h"], "bad_slice", starts=[0, 0], ends=[8], axes=[2])],
                                             opsets=[helper.make_opsetid("", 9)]), "bad_slice", "differ in length"),
    "split-num-outputs-0": (_graph([_node("Split", ["h"], "bad_split", axis=2, num_outputs=0)],
                                   opsets=[helper.make_opsetid("", 18)]), "bad_split", "num_outputs=0"),
    "unsqueeze-axis-out-of-range": (_graph([_node("Unsqueeze", ["h", "a"], "bad_unsqueeze", "u"),
                                            _node("Squeeze", ["u", "a"], "squeeze")], (_ints("a", [9]),)),
                                    "bad_unsqueeze", "not distinct axes of a rank-4 tensor"),
    "squeeze-11-axis-out-of-range": (_graph([_node("Unsqueeze", ["h"], "unsqueeze", "u", axes=[0]),
                                             _node("Squeeze", ["u"], "bad_squeeze", axes=[9])],
                                            opsets=[helper.make_opsetid("", 11)]),
                                     "bad_squeeze", "not distinct axes of a rank-4 tensor"),
    # a norm's statistics output used (was: compiled to a program without the logits that needed it)
    "layer-norm-mean-used": (_graph([helper.make_node("LayerNormalization", ["h", "g"], ["y", "mean"], name="ln"),
                                     _node("Add", ["y", "mean"], "add")], (_floats("g", (HIDDEN,)),)),
                             "ln", "Mean output 'mean' is not produced"),
    "skip-norm-mean-used": (_graph([helper.make_node("SkipLayerNormalization", ["h", "h", "g"], ["y", "mean"],
                                                     name="sln", domain="com.microsoft"),
                                    _node("Add", ["y", "mean"], "add")], (_floats("g", (HIDDEN,)),), opsets=MS),
                            "sln", "mean output 'mean' is not produced"),
    # a shape-only computation that fails when folded names its node
    "fold-fails": (_graph([_node("Identity", ["h"], "ident"),
                           _node("Reshape", ["k", "ks"], "bad_fold", "kk")],
                          (_ints("k", [[1, 2, 3], [4, 5, 6]]), _ints("ks", [4]))),
                   "bad_fold", "cannot be evaluated at compile time"),
}


@pytest.mark.parametrize("command", ["check", "compile"])
@pytest.mark.parametrize("case", list(CASES))
def test_unliftable_graph_is_the_listed_nodes_error(cli, tmp_path: Path, case: str, command: str) -> None:
    model, node, words = CASES[case]
    path = tmp_path / f"{case}.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out.cimb"
    res = cli("check", path) if command == "check" else cli("compile", path, "-o", out, "-q")
    assert res.status == 2, res.err
    assert "internal error" not in res.err and "Traceback" not in res.err and res.out == ""
    lines = res.err.splitlines()
    assert lines[0].startswith(f"cimc: error: {path}: cannot compile "), res.err
    named = [line for line in lines[1:] if f"({node}" in line or f"  {node} [" in line]
    assert named and words in named[0], res.err
    assert not out.exists()


def test_output_that_is_a_graph_input_is_a_user_error(cli, tmp_path: Path) -> None:
    """No node makes it, so the error names the output."""
    model = _graph([_node("Identity", ["h"], "ident")])
    model.graph.output.append(helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"]))
    path = tmp_path / "passthrough.onnx"
    onnx.save(model, str(path))
    for argv in (["check", path], ["compile", path, "-o", tmp_path / "o.cimb", "-q"]):
        res = cli(*argv)
        assert res.status == 2 and "'input_ids' is a graph input" in res.err, res.err
        assert len(res.err.splitlines()) == 1
