"""RoPE: `x*cos + rotate_half(x)*sin` (either operand order) -> `rope(x, cos, sin)`, anchored at
the final Add. Needs ONNX facts: x must be a whole activation split into heads (or the first
rotary_dim entries of each head: partial rotary), and cos/sin folded per-position tables that are
functions of the position (one program serves every length).

Partial rotary (Phi-3's partial_rotary_factor): `Concat(rope(x[..., :rd]), x[..., rd:])` on the
last axis, anchored at the Concat, is the whole `rope` result with `rotary_dim = rd` (the op
passes the other entries through).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cimc.frontend import views as V
from cimc.frontend.converters import Unsupported
from cimc.frontend.lift import Expr, Lifter, Static, View
from cimc.frontend.rules.terms import heads_base, split_mul
from cimc.ir.core import Value
from cimc.ir.rules import NoMatch, Rule, register_rule


def match(lifter: Lifter, add: Expr) -> View | NoMatch | None:
    """The rope op, or why a candidate (an Add of two products) did not match (the most
    specific reason)."""
    reasons: list[str] = []
    for m1, m2 in (add.args, add.args[::-1]):
        xc = split_mul(m1, View)
        rs = split_mul(m2, Expr)
        if xc is None or rs is None:
            continue
        (x, cos), (rot, sin) = xc, rs
        hd = x.shape[-1]
        concat_axis = rot.node.attrs.get("axis")
        if rot.node.op_type != "Concat" or len(rot.args) != 2 or concat_axis not in (-1, len(x.shape) - 1):
            reasons.append("rotate_half is not Concat(-x2, x1) on the last axis")
            continue
        neg, x1 = rot.args
        if not (isinstance(neg, Expr) and neg.node.op_type == "Neg" and isinstance(neg.args[0], View)):
            reasons.append("rotate_half's first half is not Neg(slice)")
            continue
        last = len(x.shape) - 1
        halves_ok = hd % 2 == 0 and neg.args[0] == V.slice_axis(x, last, hd // 2, hd // 2) \
            and x1 == V.slice_axis(x, last, 0, hd // 2)
        if not halves_ok:
            reasons.append("rotate_half does not swap the two halves of the head dimension")
            continue
        try:
            tables = [_table(lifter, t, x) for t in (cos, sin)]
            base, head_dim = heads_base(lifter, x, "RoPE input")
        except Unsupported as e:
            reasons.append(str(e))
            continue
        attrs = {"head_dim": head_dim} | ({"rotary_dim": hd} if hd != head_dim else {})
        out = lifter.op("rope", [base, *tables], add.node.name, attrs)
        return View(out, x.axes)
    if reasons:
        return NoMatch(reasons[-1])
    if all(isinstance(a, Expr) and a.node.op_type == "Mul" for a in add.args):
        return NoMatch("Add of products is not x*cos + rotate_half(x)*sin")
    return None


def _table(lifter: Lifter, s: Static, x: View) -> Value:
    arr = np.asarray(s.value, np.float32)
    try:
        full = np.broadcast_to(arr.reshape((1,) * (len(x.shape) - arr.ndim) + arr.shape), x.shape)
    except ValueError:
        raise Unsupported(f"RoPE table {s.name!r} {arr.shape} does not broadcast to {x.shape}") from None
    seq_ax = next(i for i, a in enumerate(x.axes) if a.rs == 1)
    idx = [0] * len(x.shape)
    idx[seq_ax] = slice(None)
    idx[-1] = slice(None)
    table = full[tuple(idx)]
    ref = np.broadcast_to(table.reshape([x.shape[i] if i in (seq_ax, len(x.shape) - 1) else 1
                                         for i in range(len(x.shape))]), x.shape)
    if not np.array_equal(ref, full):
        raise Unsupported(f"RoPE table {s.name!r} differs between heads or batch entries")

    def rows_of(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, np.float32)
        a = a.reshape((1,) * (len(x.shape) - a.ndim) + a.shape)
        pick = tuple(slice(None) if i in (seq_ax, len(x.shape) - 1) else 0 for i in range(a.ndim))
        return a[pick] if seq_ax < len(x.shape) - 1 else a[pick].T

    return lifter.const(s, np.ascontiguousarray(lifter.position_table(s, rows_of)), True)


def match_partial(lifter: Lifter, cat: Expr) -> View | NoMatch | None:
    """The whole partial-rotary `rope` result, if `cat` joins its rotated part and the input's rest."""
    if len(cat.args) != 2 or not all(isinstance(a, View) for a in cat.args):
        return None
    rot, rest = cat.args
    op = rot.base.owner
    if op is None or op.name != "rope" or "rotary_dim" not in op.attrs:
        return None
    last = len(rot.axes) - 1
    hd, rd = op.attrs["head_dim"], op.attrs["rotary_dim"]
    if cat.node.attrs.get("axis") not in (-1, last):
        return NoMatch("the partial RoPE's parts are not joined on the last axis")
    whole = replace(rot, axes=(*rot.axes[:-1], replace(rot.axes[-1], size=hd)))
    if rot != V.slice_axis(whole, last, 0, rd) or \
            rest != V.slice_axis(replace(whole, base=op.operands[0]), last, rd, hd - rd):
        return NoMatch("Concat does not join the rotated entries with the rest of the same heads")
    return whole


register_rule(Rule("RoPE", "onnx", "Add", "x*cos + rotate_half(x)*sin -> rope(x, cos, sin) over per-position tables",
                   match))
register_rule(Rule("partial RoPE", "onnx", "Concat",
                   "Concat(rope(x[..., :rd]), x[..., rd:]) -> rope(x) with rotary_dim = rd", match_partial))
