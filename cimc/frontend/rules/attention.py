"""Attention: `MatMul(Softmax(scale * MatMul(q, k^T) + causal mask), v)` -> `attention(q, k, v)`,
anchored at the last MatMul. Needs ONNX facts: q, k and v must be head-split views (with GQA/MQA
head repetition), the mask a folded causal [seq, past + seq] matrix; exporters' scalar scalings,
`Where(mask, x, -inf)` masks and `Where(IsNaN(p), 0, p)` guards are peeled.
"""

from __future__ import annotations

from math import prod

import numpy as np

from cimc.frontend.converters import Unsupported
from cimc.frontend.lift import Expr, Lifter, Static, Term, View
from cimc.frontend.rules.terms import strip_nan_guard, strip_scalars
from cimc.frontend.views import Axis
from cimc.ir.core import Value
from cimc.ir.rules import NoMatch, Rule, register_rule


def match(lifter: Lifter, mm: Expr) -> View | NoMatch | None:
    """The attention op, or why a MatMul of a softmax and V is not causal attention."""
    p, v = mm.args
    p = strip_nan_guard(p)
    if not (isinstance(p, Expr) and p.node.op_type == "Softmax"):
        return None
    node = mm.node
    try:
        z = p.args[0]
        z, mask = _strip_mask(z)
        scale = 1.0
        y, s = strip_scalars(z)
        scale *= s
        if not (isinstance(y, Expr) and y.node.op_type == "MatMul"):
            raise Unsupported("softmax input is not a (scaled) MatMul of queries and keys")
        a, sa = strip_scalars(y.args[0])
        b, sb = strip_scalars(y.args[1])
        scale *= sa * sb
        if not (isinstance(a, View) and isinstance(b, View) and isinstance(v, View)):
            raise Unsupported("attention operands are not head-split views of q, k and v")
        heads, hd, q = _operand(a, "q", seq_last=False)
        kvh, hdk, k = _operand(b, "k", seq_last=True)
        kvh_v, hdv, vv = _operand(v, "v", seq_last=False)
        if hdk != hd or hdv != hd or kvh != kvh_v:
            raise Unsupported("q, k and v disagree on head_dim or kv heads")
        if mask is None:
            raise Unsupported("attention has no causal mask (bidirectional attention is not supported)")
        _check_causal(lifter, mask)
    except Unsupported as e:
        parts = (p, *(p.args if isinstance(p, Expr) else []))
        return NoMatch(str(e), tuple(part.node.name for part in parts if isinstance(part, Expr)))
    attrs = {"heads": heads, "kv_heads": kvh, "head_dim": hd, "scale": float(np.float32(scale)), "causal": True}
    out = lifter.op("attention", [q, k, vv], node.name, attrs)
    head_axes = [Axis(heads, 0, hd), Axis(lifter.n, 1, 0), Axis(hd, 0, 1)]
    return View(out, tuple([Axis(1)] * (len(a.shape) - 3) + head_axes))


def _operand(x: View, what: str, seq_last: bool) -> tuple[int, int, Value]:
    """(heads, head_dim, base) of a [.., heads, seq, hd] (or [.., heads, hd, seq]) view."""
    if len(x.axes) < 3 or any(a.size != 1 for a in x.axes[:-3]) or x.r0 or x.c0:
        raise Unsupported(f"{what} is not a [batch, heads, seq, head_dim] view")
    h_ax, s_ax, d_ax = (x.axes[-3], x.axes[-1], x.axes[-2]) if seq_last else x.axes[-3:]
    hd = d_ax.size
    if (s_ax.rs, s_ax.cs, s_ax.rep) != (1, 0, 1) or (d_ax.rs, d_ax.cs, d_ax.rep) != (0, 1, 1):
        raise Unsupported(f"{what} view does not have contiguous positions and head_dim")
    if h_ax.size == 1:
        group = 1
    elif h_ax.broadcast:  # one KV head repeated for every query head (MQA)
        group = h_ax.size
    elif (h_ax.rs, h_ax.cs) == (0, hd):
        group = h_ax.rep
    else:
        raise Unsupported(f"{what} heads are not consecutive head_dim-wide column blocks")
    if what == "q" and group != 1:
        raise Unsupported("q repeats heads")
    heads = h_ax.size // group
    cols = int(x.base.type.shape[1]) if x.base.type.rank == 2 else 0
    if cols != heads * hd or h_ax.size % group:
        raise Unsupported(f"{what} covers {heads} heads of {hd} but its activation has {cols} columns")
    return heads, hd, x.base


def _strip_mask(z: Term) -> tuple[Term, Static | None]:
    if isinstance(z, Expr) and z.node.op_type == "Add":
        a, b = z.args
        if isinstance(b, Static):
            return a, b
        if isinstance(a, Static):
            return b, a
    if isinstance(z, Expr) and z.node.op_type == "Where":
        cond, x, y = z.args
        if isinstance(cond, Static) and isinstance(y, Static) and not isinstance(x, Static):
            keep = np.asarray(cond.value).astype(bool)
            fill = np.where(keep, 0.0, np.asarray(y.value, np.float64))
            y2 = y.value2 if y.value2 is not None else y.value
            fill2 = None if cond.value2 is None else \
                np.where(np.asarray(cond.value2).astype(bool), 0.0, np.asarray(y2, np.float64))
            return x, Static(cond.name, fill, fill2, False)
    return z, None


def _check_causal(lifter: Lifter, mask: Static) -> None:
    """The mask must be [seq, past + seq]: 0 where key j <= past + query i, very negative after."""
    for arr in (mask.value, mask.value2):
        if arr is None:
            continue
        m = np.asarray(arr, np.float64)
        m = m.reshape(m.shape[-2:]) if prod(m.shape[:-2]) == 1 else None
        if m is None or m.shape[1] - m.shape[0] != lifter.past:
            raise Unsupported(f"mask {mask.name!r} is not one [seq, past+seq] matrix shared by all heads")
        upper = np.triu(np.ones(m.shape, bool), 1 + lifter.past)
        if np.any(m[~upper] != 0) or np.any(m[upper] > -1e4):
            raise Unsupported(f"mask {mask.name!r} is not causal (0 on and below the diagonal, "
                              "very negative above)")


register_rule(Rule("attention", "onnx", "MatMul", "MatMul(Softmax(s * q @ k^T + causal mask), v) -> attention(q, k, v)",
                   match))
