"""Attention: `MatMul(Softmax(cap(scale * MatMul(q, k^T)) + causal mask), v)` -> `attention(q, k, v)`,
anchored at the last MatMul; the scores may be onnxruntime's `FusedMatMul(q, k, alpha, transB)`
(alpha * q @ k^T with transB, else k given transposed; its converter refuses transA). Needs ONNX
facts: q, k and v must be head-split views (with GQA/MQA head repetition), the mask a folded causal
[seq, past + seq] matrix, maybe a sliding window (`window`: the keys a query sees, read off the
folded masks, which exporters build from position comparisons); soft-capping `c * tanh(s / c)` sets
`softcap` (Gemma2). Exporters' scalar scalings, `Where(mask, x, -inf)` masks, `Where(IsNaN(p), 0,
p)` guards and casts of the probabilities to float32 are peeled.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from cimc.frontend.converters import Unsupported
from cimc.frontend.lift import Expr, Lifter, Static, Term, View
from cimc.frontend.rules.terms import strip_float_casts, strip_nan_guard, strip_scalars
from cimc.frontend.views import Axis
from cimc.ir.core import Value
from cimc.ir.rules import NoMatch, Rule, register_rule


def match(lifter: Lifter, mm: Expr) -> View | NoMatch | None:
    """The attention op, or why a MatMul of a softmax and V is not causal attention."""
    p, v = mm.args
    p = strip_float_casts(strip_nan_guard(strip_float_casts(p)))
    if not (isinstance(p, Expr) and p.node.op_type == "Softmax"):
        return None
    node = mm.node
    try:
        z = p.args[0]
        z, mask = _strip_mask(lifter, z)
        y, scale = strip_scalars(z)
        softcap = None
        if isinstance(y, Expr) and y.node.op_type == "Tanh":  # c * tanh(scale / c * s): softcap c
            softcap = scale
            y, inner = strip_scalars(y.args[0])
            scale = inner * softcap
            if not softcap > 0:
                raise Unsupported(f"soft-capping c * tanh(s / c) needs c > 0, got {softcap}")
        if not (isinstance(y, Expr) and y.node.op_type in ("MatMul", "FusedMatMul")):
            raise Unsupported("softmax input is not a (scaled) MatMul or FusedMatMul of queries and keys")
        a, sa = strip_scalars(y.args[0])
        b, sb = strip_scalars(y.args[1])
        scale *= sa * sb * float(y.node.attrs.get("alpha", 1.0))
        if not (isinstance(a, View) and isinstance(b, View) and isinstance(v, View)):
            raise Unsupported("attention operands are not head-split views of q, k and v")
        return attend(lifter, node.name, a, b, v, mask, scale, softcap, k_transposed=not y.node.attrs.get("transB", 0))
    except Unsupported as e:
        parts = (p, *(p.args if isinstance(p, Expr) else []))
        return NoMatch(str(e), tuple(part.node.name for part in parts if isinstance(part, Expr)))


def attend(lifter: Lifter, loc: str, q: View, k: View, v: View, mask: Mask | None, scale: float | None,
           softcap: float | None, k_transposed: bool = False) -> View:
    """The `attention` op over head-split views q [.., heads, seq, hd], k [.., kv_heads, keys, hd]
    (`k_transposed`: [.., kv_heads, hd, keys]) and v, as a [.., heads, seq, hd] view; `mask` must
    be causal (with a sliding window, maybe: None is refused); `scale` None is 1/sqrt(hd)."""
    heads, hd, qb = head_operand(q, "q", seq_last=False)
    kvh, hdk, kb = head_operand(k, "k", seq_last=k_transposed)
    kvh_v, hdv, vb = head_operand(v, "v", seq_last=False)
    if hdk != hd or hdv != hd or kvh != kvh_v:
        raise Unsupported("q, k and v disagree on head_dim or kv heads")
    if heads % kvh:
        raise Unsupported(f"{heads} query heads are not a multiple of {kvh} kv heads")
    if mask is None:
        raise Unsupported("attention has no causal mask (bidirectional attention is not supported)")
    window = _window(mask)
    scale = 1.0 / float(np.sqrt(hd)) if scale is None else scale
    attrs = {"heads": heads, "kv_heads": kvh, "head_dim": hd, "scale": float(np.float32(scale)), "causal": True} \
        | ({"window": window} if window else {}) | ({"softcap": float(np.float32(softcap))} if softcap else {})
    out = lifter.op("attention", [qb, kb, vb], loc, attrs)
    head_axes = [Axis(heads, 0, hd), Axis(lifter.n, 1, 0), Axis(hd, 0, 1)]
    return View(out, tuple([Axis(1)] * (len(q.shape) - 3) + head_axes))


def head_operand(x: View, what: str, seq_last: bool) -> tuple[int, int, Value]:
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


@dataclass
class Mask:
    """A folded mask as additive [.., seq, past + seq] arrays, with (seq, past) of each binding
    it is known at (main, one more token, the mask probe)."""

    name: str
    values: list[tuple[np.ndarray, int, int]]


def bindings(lifter: Lifter) -> list[tuple[int, int] | None]:
    """(seq, past) of the main binding, of one more token, and of the mask probe (None: no probe)."""
    probe = lifter.fmask.binding if lifter.fmask is not None else None
    return [(lifter.n, lifter.past), (lifter.n + 1, lifter.past), (probe.seq, probe.past) if probe else None]


def mask_of(lifter: Lifter, m: Static) -> Mask:
    """A folded mask operand as additive arrays at each binding it is known at; a boolean mask
    (True: the key is seen) is 0 where True and -inf elsewhere."""
    values = []
    for arr, bn in zip(_bound(m), bindings(lifter), strict=True):
        if arr is not None and bn is not None:
            a = np.asarray(arr)
            values.append((np.where(a, 0.0, -np.inf) if a.dtype == bool else a.astype(np.float64), *bn))
    return Mask(m.name, values)


def _strip_mask(lifter: Lifter, z: Term) -> tuple[Term, Mask | None]:
    """Peel the masks around the scores: an Add of a constant, a Where(constant condition, scores,
    constant), float32 Casts between them (GPT-2: Where by its causal bias, then + the attention
    mask's), summed into one additive mask."""
    bound_at = bindings(lifter)
    names: list[str] = []
    total: list[np.ndarray | None] = [None] * len(bound_at)
    while True:
        z = strip_float_casts(z)
        z, name, layer = _mask_layer(z)
        if name is None:
            break
        names.append(name)
        total = [None if (t is None and names[:-1]) or m is None else m if t is None else t + m
                 for t, m in zip(total, layer, strict=True)]
    if not names:
        return z, None
    return z, Mask(" + ".join(names), [(arr, *bn) for arr, bn in zip(total, bound_at, strict=True)
                                         if arr is not None])


def _mask_layer(z: Term) -> tuple[Term, str | None, list[np.ndarray | None]]:
    """One mask around `z`: (the masked term, the mask's name, its additive values per binding)."""
    if isinstance(z, Expr) and z.node.op_type == "Add":
        a, b = z.args
        x, m = (a, b) if isinstance(b, Static) else (b, a) if isinstance(a, Static) else (z, None)
        if m is not None:
            return x, m.name, [None if arr is None else np.asarray(arr, np.float64) for arr in _bound(m)]
    if isinstance(z, Expr) and z.node.op_type == "Where":
        cond, x, y = z.args
        if isinstance(cond, Static) and isinstance(y, Static) and not isinstance(x, Static):
            values = []
            for c, fill in zip(_bound(cond), _bound(y), strict=True):
                fill = y.value if fill is None else fill
                values.append(None if c is None else
                              np.where(np.asarray(c).astype(bool), 0.0, np.asarray(fill, np.float64)))
            return x, cond.name, values
    return z, None, []


def _bound(s: Static) -> list[np.ndarray | None]:
    """`s` at the main binding, with one more token, and at the mask probe."""
    return [s.value, s.value2, s.probe]


def _window(mask: Mask) -> int:
    """The keys each query sees in a causal mask with a sliding window (0: no window shows at any
    binding). A query at position p sees the keys at p-window+1 .. p (0 .. p without a window):
    0 there, very negative elsewhere."""
    seen, window = [], 0
    for arr, n, past in mask.values:
        m = np.asarray(arr, np.float64)
        m = m.reshape(m.shape[-2:]) if prod(m.shape[:-2]) == 1 else None
        if m is None or m.shape != (n, past + n):
            raise Unsupported(f"mask {mask.name!r} is not one [seq, past+seq] matrix shared by all heads")
        if np.any((m != 0) & (m > -1e4)):
            raise Unsupported(f"mask {mask.name!r} is not 0 or very negative everywhere")
        seen.append((m == 0, past))
        last = int(np.sum(m[-1] == 0))  # keys the last query sees: fewer than all when a window shows
        if 0 < last < past + n:
            if window and last != window:
                raise Unsupported(f"mask {mask.name!r} is not causal with one sliding window (windows of {window} "
                                  f"and {last} keys at different lengths)")
            window = last
    for vis, past in seen:
        pos = past + np.arange(vis.shape[0])[:, None]
        key = np.arange(vis.shape[1])[None, :]
        want = (key <= pos) & ((key > pos - window) if window else True)
        if not np.array_equal(vis, want):
            raise Unsupported(f"mask {mask.name!r} is not causal (0 where the key's position is at most the "
                              "query's, within a sliding window if any, very negative elsewhere)")
    return window


register_rule(Rule("attention", "onnx", "MatMul",
                   "MatMul(Softmax(cap(s * q @ k^T) + causal mask), v) -> attention(q, k, v) (maybe a sliding window, "
                   "a soft-cap)", match))
