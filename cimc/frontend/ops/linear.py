"""MatMul and Gemm: `linear(x, w (+ bias))` with a weight left on disk, or, between activations,
a deferred expression (the attention rule anchored at MatMul takes `MatMul(softmax, V)`).

A weight is a float initializer (maybe transposed: Gemm's transB, a Transpose node) or integer
weights a DequantizeLinear dequantizes (weight-only QDQ, see ops/qdq.py). Gemm is converted from
opset 7 (unidirectional broadcasting of C; earlier versions take a `broadcast` attribute).
"""

from __future__ import annotations

from cimc.frontend.converters import Unsupported, standard
from cimc.frontend.lift import Expr, Lazy, Lifter, QLazy, Static, Term, transposed
from cimc.frontend.model import Node
from cimc.frontend.ops.qdq import dequantized_weight
from isa.dtypes import ACT


def weight_linear(lifter: Lifter, node: Node, x: Term, w: Term, bias: Term | None) -> Term:
    """`linear(x, w (+ bias))` for a weight term `w` of `node`."""
    if isinstance(w, QLazy):  # weight-only QDQ: the graph computes in float on the dequantized weights
        return lifter.linear(node, x, dequantized_weight(lifter, w), bias, {"act": ACT})
    if isinstance(w, Static) and w.init and w.value.ndim == 2:
        w = Lazy(w.name, w.value.shape)
    if not isinstance(w, Lazy) or len(w.shape) != 2:
        raise Unsupported("MatMul weight must be a 2-D initializer (or its Transpose)")
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
    w = args[1]
    if at.get("transB", 0):
        if not isinstance(w, (Lazy, QLazy)):
            raise Unsupported("Gemm weight must be an initializer")
        w = transposed(w)
    return weight_linear(lifter, node, args[0], w, args[2] if len(args) > 2 else None)


standard("MatMul", matmul)
standard("Gemm", gemm, since=7)
