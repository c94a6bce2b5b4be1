"""Per-head RMSNorm (Qwen3's q_norm and k_norm): `w * (x * 1/sqrt(mean(x^2, last axis) + eps))`
on a head-split tensor x [.., heads, head_dim] -> `rms_norm(x, w)` with `head_dim`, anchored at
the Mul by w. Needs ONNX facts: x must be a whole activation split into heads (a norm over whole
rows is lifted by the IR rule `rms_norm` instead), w a constant of head_dim values. The square is
`Pow(x, 2)` or `x * x`, the inverse `Reciprocal(Sqrt(.))` or `Div(1, Sqrt(.))`; float32 casts
anywhere in the chain are peeled.

The genai builder's form, anchored at the Reshape back: `Reshape(SimplifiedLayerNormalization(
Reshape(x, [.., seq*heads, head_dim]), w))` of a whole activation x (consecutive head_dim entries
of its rows are its heads) is the same rms_norm.
"""

from __future__ import annotations

import numpy as np

from cimc.frontend.converters import Unsupported
from cimc.frontend.lift import Expr, Lifter, Static, Term, View
from cimc.frontend.ops.contrib_norms import DEFAULT_EPS
from cimc.frontend.rules.terms import heads_base, scalar, strip_float_casts
from cimc.ir.rules import NoMatch, Rule, register_rule


def _op(t: Term, op_type: str) -> Expr | None:
    t = strip_float_casts(t)
    return t if isinstance(t, Expr) and t.node.op_type == op_type else None


def _pair(e: Expr, kind: type) -> tuple | None:
    """(the operand of `kind`, the other one) of a binary expression, either order."""
    a, b = (strip_float_casts(t) for t in e.args)
    return (a, b) if isinstance(a, kind) else (b, a) if isinstance(b, kind) else None


def _inverse_rms(r: Term, x: View) -> float:
    """eps, if `r` is 1/sqrt(mean(x^2, last axis) + eps) of the same x."""
    sq = _op(r, "Reciprocal")
    div = _op(r, "Div")
    if sq is not None:
        root = _op(sq.args[0], "Sqrt")
    elif div is not None and scalar(div.args[0]) == 1.0:
        root = _op(div.args[1], "Sqrt")
    else:
        raise Unsupported("the scale is not 1/sqrt(...)")
    add = _op(root.args[0], "Add") if root is not None else None
    split = _pair(add, Static) if add is not None else None
    if split is None or scalar(split[0]) is None:
        raise Unsupported("no `mean + eps` under the square root")
    eps, mean = scalar(split[0]), _op(split[1], "ReduceMean")
    if mean is None or mean.node.attrs.get("keepdims", 1) != 1:
        raise Unsupported("no mean (keeping the axis) under the square root")
    axes = mean.node.attrs.get("axes")
    if axes is None and len(mean.args) > 1 and isinstance(mean.args[1], Static):
        axes = np.asarray(mean.args[1].value).ravel().tolist()
    if axes is None or [a % len(x.shape) for a in axes] != [len(x.shape) - 1]:
        raise Unsupported("the mean is not over the last (head_dim) axis")
    pw, mul = _op(mean.args[0], "Pow"), _op(mean.args[0], "Mul")
    square = (pw is not None and strip_float_casts(pw.args[0]) == x and scalar(pw.args[1]) == 2.0) or \
        (mul is not None and all(strip_float_casts(a) == x for a in mul.args))
    if not square:
        raise Unsupported("the mean is not of x^2 for the same x")
    return eps


def match(lifter: Lifter, mul: Expr) -> View | NoMatch | None:
    """The per-head rms_norm, or why a weight times a normalised head-split tensor is not one."""
    outer = _pair(mul, Static)
    inner = _op(outer[1], "Mul") if outer is not None else None
    split = _pair(inner, View) if inner is not None else None
    if split is None:
        return None
    (w, _), (x, r) = outer, split
    if not isinstance(r, Expr):
        return None
    try:
        eps = _inverse_rms(r, x)
        base, hd = heads_base(lifter, x, "the normalised tensor")
        if hd != x.shape[-1]:
            raise Unsupported("the norm is over part of each head")
        wv = np.asarray(w.value, np.float32)
        if wv.size != hd or (wv.ndim and wv.shape[-1] != hd):
            raise Unsupported(f"the weight {w.name!r} {list(wv.shape)} is not a vector of head_dim = {hd} values")
    except Unsupported as e:
        return NoMatch(str(e))
    weight = lifter.const(w, wv.reshape(-1), False)
    out = lifter.op("rms_norm", [base, weight], mul.node.name, {"eps": float(eps), "head_dim": hd})
    return View(out, x.axes)


def match_flat(lifter: Lifter, back: Expr) -> View | NoMatch | None:
    """The per-head rms_norm of the genai builder's flattened form, anchored at the Reshape back."""
    norm = back.args[0]
    if not (isinstance(norm, Expr) and norm.node.op_type == "SimplifiedLayerNormalization"):
        return None
    flat = norm.args[0]
    if not (isinstance(flat, Expr) and flat.node.op_type == "Reshape" and isinstance(flat.args[0], View)):
        return None
    x, w = flat.args[0], norm.args[1]
    hd = lifter.shape(flat.node.outputs[0])[-1]
    cols = int(x.base.type.shape[1]) if x.base.type.rank == 2 else 0
    if not lifter.is_plain(x) or cols % hd:
        return NoMatch(f"the normalised rows are not head_dim = {hd} wide blocks of a whole activation")
    if not isinstance(w, Static) or np.asarray(w.value).size != hd:
        return NoMatch(f"the scale is not a constant vector of head_dim = {hd} values")
    weight = lifter.const(w, np.asarray(w.value, np.float32).reshape(-1), False)
    eps = float(norm.node.attrs.get("epsilon", DEFAULT_EPS))
    out = lifter.op("rms_norm", [x.base, weight], norm.node.name, {"eps": eps, "head_dim": hd})
    return lifter.view_of(out, lifter.shape(back.node.outputs[0]))


register_rule(Rule("per-head RMSNorm", "onnx", "Mul",
                   "w * (x * 1/sqrt(mean(x^2) + eps)) over head_dim of heads -> rms_norm(x, w) with head_dim", match))
register_rule(Rule("flat per-head RMSNorm", "onnx", "Reshape",
                   "Reshape(SimplifiedLayerNormalization(Reshape(x, [.., seq*heads, head_dim]), w)) -> rms_norm(x, w) "
                   "with head_dim", match_flat))
