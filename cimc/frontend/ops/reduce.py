"""Reductions over the feature axis (ReduceMean, ReduceSum, ReduceMax) and Softmax.

Opset forms: the reductions take `axes` as an attribute before opset 18 (13 for ReduceSum) and as
an input from then on. Softmax before opset 13 coerces its input to 2-D at `axis` (default 1), so
it is a softmax over the last axis exactly when `axis` is the last axis; from 13 `axis` (default
-1) is the one axis it normalises.
"""

from __future__ import annotations

from cimc.frontend.converters import Unsupported, standard
from cimc.frontend.lift import Expr, Lifter, Term
from cimc.frontend.model import Node
from cimc.frontend.ops.layout import static_ints
from cimc.frontend.views import View

#: ONNX op type -> (IR op, the first opset taking axes as an input).
REDUCE = {"ReduceMean": ("reduce_mean", 18), "ReduceSum": ("reduce_sum", 13), "ReduceMax": ("reduce_max", 18)}


def _reduce(lifter: Lifter, node: Node, args: list, axes: list[int] | None) -> Term:
    if isinstance(args[0], Expr) or (isinstance(args[0], View) and lifter.plain(args[0]) is None):
        return Expr(node, args)  # on a head-split view: part of an idiom (a per-head norm), or refused
    p = lifter.plain(args[0])
    rank = len(lifter.shape(node.inputs[0]))
    if p is None or axes is None or [a % rank for a in axes] != [rank - 1]:
        raise Unsupported(f"{node.op_type} is supported over the last (feature) axis of an activation")
    out = lifter.op(REDUCE[node.op_type][0], [p.base], node.name)
    return lifter.view_of(out, lifter.shape(node.outputs[0]))


def reduce_attr(lifter: Lifter, node: Node, args: list) -> Term:
    axes = node.attrs.get("axes")
    return _reduce(lifter, node, args, None if axes is None else list(axes))


def reduce_input(lifter: Lifter, node: Node, args: list) -> Term:
    return _reduce(lifter, node, args, static_ints(args, 1))


def _softmax(lifter: Lifter, node: Node, args: list, default_axis: int) -> Term:
    rank = len(lifter.shape(node.inputs[0]))
    if node.attrs.get("axis", default_axis) % rank != rank - 1:
        raise Unsupported("Softmax is supported over the last axis")
    p = lifter.plain(args[0])
    if p is None:
        return Expr(node, args)
    return lifter.view_of(lifter.op("softmax", [p.base], node.name), lifter.shape(node.outputs[0]))


def softmax_2d(lifter: Lifter, node: Node, args: list) -> Term:
    return _softmax(lifter, node, args, 1)


def softmax(lifter: Lifter, node: Node, args: list) -> Term:
    return _softmax(lifter, node, args, -1)


for _name, (_, _since) in REDUCE.items():
    standard(_name, reduce_attr, until=_since)
    standard(_name, reduce_input, since=_since)
standard("Softmax", softmax_2d, until=13)
standard("Softmax", softmax, since=13)
