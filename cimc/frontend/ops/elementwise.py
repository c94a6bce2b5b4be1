"""Elementwise ops: Add, Sub, Mul, Div, Max, Pow, Neg, Exp, Sqrt, Reciprocal, Sigmoid, Tanh, Erf, and the
Where/IsNaN guards exporters wrap around attention.

An op on whole [tokens, features] activations (or one and a constant) is lowered at once; one on
head-split views or on a deferred expression is deferred (an `Expr`), since it may be part of an
idiom (RoPE, attention); if no idiom takes it, `materialize` lowers it generically once its
operands are whole activations. Binary ops broadcast numpy-style from opset 7 (8 for Max);
earlier versions broadcast by attribute and are not converted.
"""

from __future__ import annotations

import numpy as np

from cimc.frontend.converters import Unsupported, standard
from cimc.frontend.lift import Expr, Lifter, Static, Term
from cimc.frontend.model import Node
from cimc.frontend.views import View
from cimc.ir.core import SEQ, Value

#: ONNX op type -> IR op.
BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Max": "max"}
UNARY = {"Neg": "neg", "Exp": "exp", "Sqrt": "sqrt", "Reciprocal": "reciprocal", "Sigmoid": "sigmoid",
         "Tanh": "tanh", "Erf": "erf"}


def binary(lifter: Lifter, node: Node, args: list) -> Term:
    """Lower now, or defer: operands on head-split views, and x * (per-position table),
    which may be half of a RoPE (materialised generically if no idiom takes it)."""
    if len(args) != 2:
        raise Unsupported(f"{node.op_type} of {len(args)} inputs is not supported (two are)")
    if any(isinstance(t, Expr) or (isinstance(t, View) and lifter.plain(t) is None) for t in args):
        return Expr(node, args)
    if node.op_type == "Mul" and any(isinstance(t, Static) and t.value2 is not None
                                     and t.value2.shape != t.value.shape for t in args):
        return Expr(node, args)
    return lower_binary(lifter, node, args)


def lower_binary(lifter: Lifter, node: Node, args: list) -> View:
    a, b = args
    name = BINARY[node.op_type]
    out_shape = lifter.shape(node.outputs[0])
    pa, pb = lifter.plain(a), lifter.plain(b)
    if pa is not None and pb is not None:
        ra, rb = pa.base.type.shape[0], pb.base.type.shape[0]
        if ra != rb and 1 not in (ra, rb):
            raise Unsupported("operands have different token counts")
        return lifter.view_of(lifter.op(name, [pa.base, pb.base], node.name), out_shape)
    for plain, other, left in ((pa, b, True), (pb, a, False)):
        if plain is None or not isinstance(other, Static) or out_shape != plain.shape:
            continue
        c = static_operand(lifter, other, plain, node.outputs[0])
        return lifter.view_of(with_const(lifter, name, plain.base, c, left, node.name), out_shape)
    raise Unsupported(f"{node.op_type} of these operands is not supported")


def static_operand(lifter: Lifter, s: Static, like: View, out_name: str) -> Value | float:
    """Fit a constant to a [tokens, features] activation: scalar, row vector or per-token table."""
    arr = np.asarray(s.value)
    if arr.dtype.kind not in "fiub":
        raise Unsupported(f"constant {s.name!r} is not numeric")
    if arr.size == 1:
        return float(arr.ravel()[0])
    shape = like.shape
    if arr.ndim > len(shape):
        raise Unsupported(f"constant {s.name!r} has a higher rank than the activation")
    al = arr.reshape((1,) * (len(shape) - arr.ndim) + arr.shape)
    row_ax = next((i for i, a in enumerate(like.axes) if a.rs == 1 and a.size != 1), None)
    col_ax = next((i for i, a in enumerate(like.axes) if a.cs == 1 and a.size != 1), None)
    for i, d in enumerate(al.shape):
        if d != 1 and i not in (row_ax, col_ax):
            raise Unsupported(f"constant {s.name!r} {arr.shape} does not broadcast like a "
                              "[tokens, features] operand")
        if d != 1 and d != shape[i]:
            raise Unsupported(f"constant {s.name!r} {arr.shape} enlarges the activation {shape}")
    keep = [i for i in (row_ax, col_ax) if i is not None]
    order = keep + [i for i in range(al.ndim) if i not in keep]
    cols = al.shape[col_ax] if col_ax is not None else 1

    def rows_of(a: np.ndarray) -> np.ndarray:
        b = a.reshape((1,) * (len(shape) - a.ndim) + a.shape).transpose(order)
        return b.reshape(-1, cols)

    mat = rows_of(arr)
    if mat.shape[0] == 1:
        return lifter.const(s, mat.reshape(-1).astype(np.float32), False)
    if row_ax not in lifter.seq_axes(out_name) and like.base.type.shape[0] == SEQ:
        raise Unsupported(f"constant {s.name!r} has a per-token axis that does not follow the sequence length")
    return lifter.const(s, lifter.position_table(s, rows_of).astype(np.float32), True)


def with_const(lifter: Lifter, name: str, x: Value, c: Value | float, x_left: bool, loc: str) -> Value:
    """`name`(x, c) (or (c, x)) for a constant operand: an affine op for a scalar where one serves."""
    if isinstance(c, Value):
        return lifter.op(name, [x, c] if x_left else [c, x], loc)
    affine = {("add", True): (1.0, c), ("add", False): (1.0, c), ("mul", True): (c, 0.0),
              ("mul", False): (c, 0.0), ("sub", True): (1.0, -c), ("sub", False): (-1.0, c)}
    if (name, x_left) in affine:
        alpha, beta = affine[(name, x_left)]
        return lifter.op("affine", [x], loc, {"alpha": float(alpha), "beta": float(beta)})
    if name == "div" and x_left:
        return lifter.op("affine", [x], loc, {"alpha": float(1.0 / c), "beta": 0.0})
    if name == "div":
        r = lifter.op("reciprocal", [x], loc)
        return r if c == 1.0 else lifter.op("affine", [r], loc, {"alpha": float(c), "beta": 0.0})
    arr = np.array([c], np.float32)
    cv = lifter.const(Static(f"{loc}:scalar", arr, None, False), arr, False)
    return lifter.op(name, [x, cv] if x_left else [cv, x], loc)


def unary(lifter: Lifter, node: Node, args: list) -> Term:
    if isinstance(args[0], Expr) or (isinstance(args[0], View) and lifter.plain(args[0]) is None):
        return Expr(node, args)
    return lower_unary(lifter, node, args)


def lower_unary(lifter: Lifter, node: Node, args: list) -> View:
    p = lifter.plain(args[0])
    if p is None:
        raise Unsupported(f"{node.op_type} input must be an activation")
    return lifter.view_of(lifter.op(UNARY[node.op_type], [p.base], node.name), lifter.shape(node.outputs[0]))


def power(lifter: Lifter, node: Node, args: list) -> Term:
    """Lower now, or defer on a head-split view (a per-head norm's square, say)."""
    if isinstance(args[0], Expr) or (isinstance(args[0], View) and lifter.plain(args[0]) is None):
        return Expr(node, args)
    return lower_power(lifter, node, args)


def lower_power(lifter: Lifter, node: Node, args: list) -> View:
    p, e = lifter.plain(args[0]), args[1]
    if p is None or not isinstance(e, Static) or np.asarray(e.value).size != 1:
        raise Unsupported("Pow is supported for an activation raised to a constant scalar")
    k = float(np.asarray(e.value).ravel()[0])
    loc, shape = node.name, lifter.shape(node.outputs[0])
    if k in (2.0, 3.0):  # x*x, (x*x)*x (GPT-2's tanh GELU cubes)
        out = p.base
        for _ in range(int(k) - 1):
            out = lifter.op("mul", [out, p.base], loc)
        return lifter.view_of(out, shape)
    ops = {1.0: [], 0.5: ["sqrt"], -1.0: ["reciprocal"], -0.5: ["rsqrt"]}.get(k)
    if ops is None:
        raise Unsupported(f"Pow with exponent {k} is not supported (3, 2, 1, 0.5, -0.5, -1 are)")
    out = p.base
    for name in ops:
        out = lifter.op(name, [out], loc)
    return lifter.view_of(out, shape)


def deferred(lifter: Lifter, node: Node, args: list) -> Term:
    """Wait for an idiom (the attention rule strips exporters' NaN guards and masks)."""
    return Expr(node, args)


standard(("Add", "Sub", "Mul", "Div"), binary, since=7, materialize=lower_binary)
standard("Max", binary, since=8, materialize=lower_binary)
standard(tuple(UNARY), unary, materialize=lower_unary)
standard("Pow", power, since=7, materialize=lower_power)
standard(("Where", "IsNaN"), deferred, since=9)
