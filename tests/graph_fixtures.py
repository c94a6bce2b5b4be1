"""Tiny ONNX graphs for converter and idiom-rule tests: x [1, seq, features] -> nodes -> y, compiled,
simulated and compared with onnxruntime on the same file, or refused with the listed-nodes error."""

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

#: The RoPE graph's two heads of ROPE_HD entries.
ROPE_HEADS, ROPE_HD = 2, 8


def xy_model(path: Path, nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray] | list[onnx.TensorProto], *,
             cols: int, out_cols: int | None = None, opset: int = 18, contrib: bool = False) -> Path:
    """x [1, seq, cols] -> `nodes` -> y [1, seq, out_cols (cols)] at `opset` (and com.microsoft 1
    with `contrib`), saved at `path`."""
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()] if isinstance(inits, dict) else inits
    graph = helper.make_graph(nodes, path.stem,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", cols])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", out_cols or cols])],
                              tensors)
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    ir_version = max(8, helper.find_min_ir_version_for(opsets[:1]))
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=ir_version), str(path))
    return path


def matches_onnxruntime(path: Path, x: np.ndarray | None = None, *, scale: float = 1.0, max_seq: int = 8,
                        tol: float = 1e-5) -> None:
    """y of `path` compiled and simulated on x (default: 5 tokens of normal values times `scale`) is
    within `tol` of onnxruntime's on the same file (its graph optimisations off, so it runs the
    nodes as written)."""
    if x is None:
        cols = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[2].dim_value
        x = (scale * np.random.default_rng(0).standard_normal((1, 5, cols))).astype(np.float32)
    got = simulate(compile_model(path, CompileOptions(max_seq=max_seq)), {"x": x}).outputs["y"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert max_err(got, want) <= tol, f"{path.name}: max |y - onnxruntime| = {max_err(got, want):.3g}"


def refusals(path: Path, max_seq: int = 8) -> dict[str, str]:
    """Node name -> reason, of the listed-nodes error importing `path` must raise."""
    with pytest.raises(CannotCompile) as err:
        import_onnx(path, max_seq=max_seq)
    return {node.name: reason for node, reason in err.value.failures}


def rope_nodes(halves: list[onnx.NodeProto], seed: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and initializers of x [1, seq, ROPE_HEADS * ROPE_HD] -> heads q [1, heads, seq, hd] ->
    q * cos + rotate_half(q) * sin -> merged back to h [1, seq, heads * hd]: `halves` make rotate_half's
    x1 and x2 from q (by Slices or a Split); the cos and sin tables (rows drawn from `seed`) are made
    from x's shape, so they are per-position tables."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([1, -1, ROPE_HEADS, ROPE_HD], np.int64), "heads_shape"),
             numpy_helper.from_array(np.array([1, -1, ROPE_HEADS * ROPE_HD], np.int64), "merge"),
             numpy_helper.from_array(np.array([1], np.int64), "seq_at"),
             numpy_helper.from_array(np.array([ROPE_HD], np.int64), "hd"),
             numpy_helper.from_array(rng.uniform(-1, 1, ROPE_HD).astype(np.float32), "cvec"),
             numpy_helper.from_array(rng.uniform(-1, 1, ROPE_HD).astype(np.float32), "svec")]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "seq_at"], ["seq"], name="seq"),
        helper.make_node("Concat", ["seq", "hd"], ["table_shape"], name="table_shape", axis=0),
        helper.make_node("ConstantOfShape", ["table_shape"], ["ones"], name="ones",
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("Mul", ["ones", "cvec"], ["cos"], name="cos"),
        helper.make_node("Mul", ["ones", "svec"], ["sin"], name="sin"),
        helper.make_node("Reshape", ["x", "heads_shape"], ["heads"], name="heads"),
        helper.make_node("Transpose", ["heads"], ["q"], name="q", perm=[0, 2, 1, 3]),
        *halves,
        helper.make_node("Neg", ["x2"], ["neg"], name="neg"),
        helper.make_node("Concat", ["neg", "x1"], ["rot"], name="rot", axis=3),
        helper.make_node("Mul", ["q", "cos"], ["qc"], name="qc"),
        helper.make_node("Mul", ["rot", "sin"], ["rs"], name="rs"),
        helper.make_node("Add", ["qc", "rs"], ["rope"], name="rope"),
        helper.make_node("Transpose", ["rope"], ["back"], name="back", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["back", "merge"], ["h"], name="h"),
    ]
    return nodes, inits
