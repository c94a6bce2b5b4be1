"""Small matchers on lifter terms shared by the frontend's idiom rules."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from cimc.frontend.converters import Unsupported
from cimc.frontend.lift import Expr, Lifter, Static, Term
from cimc.frontend.views import Axis, View
from cimc.ir.core import Value


def split_mul(t: Term, kind: type) -> tuple | None:
    """(x, static) if `t` is Mul(x, static) with x of `kind`."""
    if not (isinstance(t, Expr) and t.node.op_type == "Mul"):
        return None
    a, b = t.args
    if isinstance(a, kind) and isinstance(b, Static):
        return a, b
    if isinstance(b, kind) and isinstance(a, Static):
        return b, a
    return None


def scalar(t: Term) -> float | None:
    """The value of a constant scalar term, else None."""
    if isinstance(t, Static) and np.asarray(t.value).size == 1:
        return float(np.asarray(t.value).ravel()[0])
    return None


def strip_scalars(t: Term) -> tuple[Term, float]:
    """Peel Mul/Div by constant scalars: returns (inner term, accumulated factor)."""
    factor = 1.0
    while isinstance(t, Expr) and t.node.op_type in ("Mul", "Div"):
        a, b = t.args
        if scalar(b) is not None:
            factor = factor * scalar(b) if t.node.op_type == "Mul" else factor / scalar(b)
            t = a
        elif t.node.op_type == "Mul" and scalar(a) is not None:
            factor *= scalar(a)
            t = b
        else:
            break
    return t, factor


def strip_nan_guard(t: Term) -> Term:
    """`Where(IsNaN(p), 0, p)` -> p (exporters guard fully masked rows; causal rows never are)."""
    if isinstance(t, Expr) and t.node.op_type == "Where":
        cond, zero, p = t.args
        if isinstance(cond, Expr) and cond.node.op_type == "IsNaN" and cond.args[0] is p and scalar(zero) == 0.0:
            return p
    return t


def strip_float_casts(t: Term) -> Term:
    """`Cast(p, to=float)` -> p, repeatedly (exporters cast a float32 softmax back to the model's
    float type, float32 here: a no-op)."""
    while isinstance(t, Expr) and t.node.op_type == "Cast" and t.node.attrs.get("to") == TensorProto.FLOAT:
        t = t.args[0]
    return t


def heads_base(lifter: Lifter, x: View, what: str) -> tuple[Value, int]:
    """(base, head_dim) of `x`, a whole [tokens, heads*head_dim] activation split into heads, or
    the first x.shape[-1] entries of each of its heads."""
    rd = x.shape[-1]
    cols = int(x.base.type.shape[1]) if x.base.type.rank == 2 else 1
    heads = [a for a in x.axes[:-1] if a.size != 1 and (a.rs, a.rep) == (0, 1) and a.cs >= rd]
    hd = heads[0].cs if len(heads) == 1 and heads[0].cs * heads[0].size == cols else cols
    core = sorted(x.core(), key=lambda a: (a.rs, a.cs))
    want = sorted([a for a in (Axis(rd, 0, 1), Axis(cols // hd, 0, hd), Axis(lifter.n, 1, 0)) if a.size != 1],
                  key=lambda a: (a.rs, a.cs))
    if x.r0 or x.c0 or cols % hd or core != want:
        raise Unsupported(f"{what} is not a whole [tokens, heads*head_dim] activation split into heads "
                          "(or the first rotary_dim entries of each head)")
    return x.base, hd
