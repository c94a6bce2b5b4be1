"""MatMul, Gemm and onnxruntime's FusedMatMul: `linear(x, w (+ bias))` with a weight left on disk,
or, between activations, a deferred expression (the attention rule anchored at MatMul takes
`MatMul(softmax, V)`, and a MatMul or FusedMatMul of q and k as its scores).

`com.microsoft:FusedMatMul(A, B)` (onnxruntime docs/ContribOperators.md) is
`alpha * (transA ? A^T : A) @ (transB ? B^T : B)`, transposing the last two axes; on a weight it
is `linear` (of the transposed weight with transB) then `affine` by alpha. transA (A is the
activation, or the queries) and transBatchA/transBatchB (batch axes moved) are refused.

A weight is a float initializer (maybe transposed: Gemm's transB, a Transpose node) or integer
weights a DequantizeLinear dequantizes (weight-only QDQ, see ops/qdq.py). Gemm is converted from
opset 7 (unidirectional broadcasting of C; earlier versions take a `broadcast` attribute).
"""

from __future__ import annotations

import onnx
from onnx import helper

from cimc.frontend.converters import Converter, Unsupported, register, standard
from cimc.frontend.lift import Expr, Lazy, Lifter, QLazy, Static, Term, transposed
from cimc.frontend.model import Node, OnnxModel
from cimc.frontend.ops.qdq import dequantized_weight
from cimc.frontend.views import View
from isa.dtypes import ACT


def weight_linear(lifter: Lifter, node: Node, x: Term, w: Term, bias: Term | None,
                  transpose: bool = False) -> View:
    """`linear(x, w (+ bias))` (`w^T` with `transpose`) for a weight term `w` of `node`."""
    if isinstance(w, Static) and w.init and w.value.ndim == 2:
        w = Lazy(w.name, w.value.shape)
    if transpose and isinstance(w, (Lazy, QLazy)):
        w = transposed(w)
    if isinstance(w, QLazy):  # weight-only QDQ: the graph computes in float on the dequantized weights
        return lifter.linear(node, x, dequantized_weight(lifter, w), bias, {"act": ACT})
    if not isinstance(w, Lazy) or len(w.shape) != 2:
        raise Unsupported(f"{node.op_type} weight must be a 2-D initializer (or its Transpose)")
    return lifter.linear(node, x, lifter.weight(w), bias)


def matmul(lifter: Lifter, node: Node, args: list) -> Term:
    a, b = args
    if isinstance(b, (Lazy, QLazy, Static)):
        return weight_linear(lifter, node, a, b, None)
    return Expr(node, args)


def gemm(lifter: Lifter, node: Node, args: list) -> Term:
    at = node.attrs
    if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0:
        raise Unsupported("Gemm with transA, alpha or beta is not supported")
    return weight_linear(lifter, node, args[0], args[1], args[2] if len(args) > 2 else None,
                         transpose=bool(at.get("transB", 0)))


#: FusedMatMul attributes cimc does not compute (any nonzero value is refused), and why.
FUSED_REFUSED = {"transA": "the first operand is the activation or the queries, whose rows are tokens",
                 "transBatchA": "batch axes moved into the first operand's rows",
                 "transBatchB": "batch axes moved into the second operand's rows"}


def check_fused(model: OnnxModel, node: Node) -> None:
    for attr, why in FUSED_REFUSED.items():
        if node.attrs.get(attr, 0):
            raise Unsupported(f"{attr}={node.attrs[attr]} is not supported ({why})")
    if len(node.inputs) != 2:
        raise Unsupported(f"takes 2 inputs, got {node.inputs}")


def standin_fused(node: Node) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """MatMul of the operands, transposed (an Einsum over the last two axes) as transA/transB say."""
    nodes, ins = [], []
    for x, attr in zip(node.inputs, ("transA", "transB"), strict=True):
        if node.attrs.get(attr, 0):
            nodes.append(helper.make_node("Einsum", [x], [f"{node.name}/standin_{attr}"], equation="...ij->...ji",
                                          name=f"{node.name}/standin_{attr}"))
            x = nodes[-1].output[0]
        ins.append(x)
    return [*nodes, helper.make_node("MatMul", ins, [node.outputs[0]], name=f"{node.name}/standin")], []


def fused_matmul(lifter: Lifter, node: Node, args: list) -> Term:
    """On a weight: `linear` (of w^T with transB), then `affine` by alpha; between activations,
    deferred for the attention rule (alpha * q @ k^T)."""
    a, b = args
    if not isinstance(b, (Lazy, QLazy, Static)):
        return Expr(node, args)
    out = weight_linear(lifter, node, a, b, None, transpose=bool(node.attrs.get("transB", 0)))
    alpha = float(node.attrs.get("alpha", 1.0))
    if alpha == 1.0:
        return out
    return lifter.view_of(lifter.op("affine", [out.base], node.name, {"alpha": alpha, "beta": 0.0}), out.shape)


standard("MatMul", matmul)
standard("Gemm", gemm, since=7)
register(Converter("com.microsoft", "FusedMatMul", fused_matmul, check=check_fused, standin=standin_fused))
