"""Layout ops: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Expand, Slice, Split, Identity, Cast,
Concat.

On an activation they only re-view it (cimc.frontend.views); on a deferred expression they defer
too (an idiom may consume the chain). Concat(past KV, new KV) along the position axis is a cache
append. Transpose, Identity, Cast and Reshape also apply to weights left on disk (`weights`).

Opset forms: Squeeze and Unsqueeze take `axes` as an attribute before opset 13 and as an input
from 13; Slice takes `starts`/`ends`/`axes` as attributes before opset 10 and as inputs from 10;
Split takes its part sizes `split` as an attribute before opset 13 and as an input from 13, and
from 18, without sizes, `num_outputs` parts (the last one smaller if the axis does not divide);
Cast names its target type by a string before opset 6 (not converted).

A Slice or Split of a block of a whole activation's columns (the q, k and v of a fused qkv
projection, the gate and up of a fused gate_up) is recomputed as an activation of its own from
the producing linear's weight columns (`split_columns`), so later ops see a whole activation;
otherwise a part is a view of its input.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import TensorProto

from cimc.frontend import views as V
from cimc.frontend.converters import Unsupported, no_weights, standard
from cimc.frontend.lift import Expr, Lazy, Lifter, QLazy, Static, Term, transposed
from cimc.frontend.model import FLOAT_TYPES, Node
from cimc.frontend.ops.columns import split_columns
from cimc.frontend.views import Axis, View, ViewError


def relayout(lifter: Lifter, node: Node, args: list, fn: Callable[[View], View]) -> Term:
    """`fn` of the input view, or a deferred expression if the input is one."""
    if isinstance(args[0], Expr):
        return Expr(node, args)
    return fn(lifter.need_view(args[0], "input"))


def static_ints(args: list, i: int) -> list[int] | None:
    """Input `i` as a list of ints, if it is given and known at compile time."""
    if len(args) > i and isinstance(args[i], Static):
        return [int(a) for a in np.asarray(args[i].value).ravel()]
    return None


# ---- Identity, Cast, Reshape, Flatten, Transpose, Expand ----------------------------------------


def identity(lifter: Lifter, node: Node, args: list) -> Term:
    return args[0]


def identity_weights(lifter: Lifter, node: Node, args: list) -> Term:
    if isinstance(args[0], (Lazy, QLazy)):
        return args[0]
    return no_weights(lifter, node, args)


def cast(lifter: Lifter, node: Node, args: list) -> Term:
    if isinstance(args[0], Expr):  # part of a chain an idiom may consume (quantize_dynamic's)
        return Expr(node, args)
    et = lifter.f1.elem_types.get(node.inputs[0])
    if node.attrs.get("to") == TensorProto.FLOAT and et in FLOAT_TYPES:
        return args[0]
    raise Unsupported("Cast of an activation to another element type is not supported")


def cast_weights(lifter: Lifter, node: Node, args: list) -> Term:
    s = args[0]
    if isinstance(s, Static) and node.attrs.get("to") == TensorProto.FLOAT:  # of a constant gathered from a weight
        return Static(node.outputs[0], *(None if v is None else np.asarray(v, np.float32)
                                         for v in (s.value, s.value2)), False,
                      None if s.table is None else np.asarray(s.table, np.float32))
    if isinstance(args[0], Lazy):
        if node.attrs.get("to") != TensorProto.FLOAT:
            raise Unsupported("weights may only be cast to float32")
        return args[0]
    return no_weights(lifter, node, args)


def reshape(lifter: Lifter, node: Node, args: list) -> Term:
    """A re-view; one no strided view expresses (rows merged with a column split: the genai
    builder's [1, seq*heads, head_dim] around a per-head norm) is deferred for an idiom, with its
    reason kept for the error if none takes it."""
    if isinstance(args[0], View):
        try:
            return V.reshape(args[0], lifter.shape(node.outputs[0]))
        except ViewError as e:
            lifter.near_miss.setdefault(node.name, str(e))
            return Expr(node, args)
    return relayout(lifter, node, args, lambda v: V.reshape(v, lifter.shape(node.outputs[0])))


def reshape_weights(lifter: Lifter, node: Node, args: list) -> Term:
    src = args[0]
    if isinstance(src, Lazy) and not src.transpose \
            and lifter.model.initializers[src.init].data_type not in FLOAT_TYPES:
        return Lazy(src.init, lifter.shape(node.outputs[0]))  # packed integers a converter reads (row-major)
    return no_weights(lifter, node, args)


def transpose(lifter: Lifter, node: Node, args: list) -> Term:
    rank = len(lifter.shape(node.inputs[0]))
    perm = list(node.attrs.get("perm", reversed(range(rank))))
    return relayout(lifter, node, args, lambda v: V.transpose(v, perm))


def transpose_weights(lifter: Lifter, node: Node, args: list) -> Term:
    src = args[0]
    if isinstance(src, (Lazy, QLazy)) and len(src.shape) == 2 and list(node.attrs.get("perm", [1, 0])) == [1, 0]:
        return transposed(src)
    return no_weights(lifter, node, args)


def expand(lifter: Lifter, node: Node, args: list) -> Term:
    return relayout(lifter, node, args, lambda v: V.expand(v, lifter.shape(node.outputs[0])))


# ---- Squeeze, Unsqueeze: axes attribute (opsets 1-12) or input (13+) ---------------------------


def squeeze_attr(lifter: Lifter, node: Node, args: list) -> Term:
    axes = node.attrs.get("axes")
    return relayout(lifter, node, args, lambda v: V.squeeze(v, None if axes is None else list(axes)))


def squeeze_input(lifter: Lifter, node: Node, args: list) -> Term:
    axes = static_ints(args, 1)
    if len(args) > 1 and args[1] is not None and axes is None:
        raise Unsupported("Squeeze axes must be known at compile time")
    return relayout(lifter, node, args, lambda v: V.squeeze(v, axes))


def unsqueeze_attr(lifter: Lifter, node: Node, args: list) -> Term:
    axes = list(node.attrs.get("axes", []))
    return relayout(lifter, node, args, lambda v: V.unsqueeze(v, axes))


def unsqueeze_input(lifter: Lifter, node: Node, args: list) -> Term:
    axes = static_ints(args, 1)
    if axes is None:
        raise Unsupported("Unsqueeze axes must be known at compile time")
    return relayout(lifter, node, args, lambda v: V.unsqueeze(v, axes))


def take(lifter: Lifter, node: Node, v: View, axis: int, lo: int, n: int) -> View:
    """Entries lo .. lo+n-1 of `v` along `axis`: a view, or for a block of the columns of a whole
    activation, straight from the node that made it with a linear (and constant vector ops after
    it) or through re-views that keep it [batch, tokens, features] (GPT-2's Gemm on [seq, 3*hidden]
    reshaped to [1, seq, 3*hidden]), that block recomputed. (A slice of a head-split activation,
    such as rotate_half's halves of a single head, stays a view for the idioms to read.)"""
    part = V.slice_axis(v, axis, lo, n)
    a = v.axes[axis]
    owner = v.base.owner
    if n == a.size or not lifter.is_plain(v) or (a.rs, a.cs, a.rep) != (0, 1, 1) or owner is None \
            or not _made_by(lifter, node.inputs[0], owner.loc):
        return part
    try:
        return lifter.view_of(split_columns(lifter, v.base, lo, lo + n, node.name), part.shape)
    except Unsupported:
        return part


#: Re-views that keep an activation whole when their output has rank <= 3 ([batch, tokens, features]).
_ROW_VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def _made_by(lifter: Lifter, name: str, maker: str) -> bool:
    """Whether value `name` is the output of node `maker`, or of re-views of it of rank <= 3."""
    src = lifter.model.producer.get(name)
    while src is not None and src.name != maker and src.op_type in _ROW_VIEWS \
            and len(lifter.f1.shapes.get(src.outputs[0], (0,) * 4)) <= 3:
        src = lifter.model.producer.get(src.inputs[0])
    return src is not None and src.name == maker


# ---- Slice: bounds as attributes (opsets 1-9) or inputs (10+) ----------------------------------


def _slice(lifter: Lifter, node: Node, args: list, starts: list[int], ends: list[int], axes: list[int] | None,
           steps: list[int] | None) -> Term:
    shape = lifter.shape(node.inputs[0])
    if len({len(starts), len(ends), *(len(x) for x in (axes, steps) if x is not None)}) != 1:
        raise Unsupported(f"Slice starts {starts}, ends {ends}, axes {axes} and steps {steps} differ in length")
    axes = list(range(len(starts))) if axes is None else axes
    if steps is not None and any(s != 1 for s in steps):
        raise Unsupported("Slice with a step other than 1 is not supported on activations")

    def apply(v: View) -> View:
        for st, en, ax in zip(starts, ends, axes, strict=True):
            if not -len(shape) <= ax < len(shape):
                raise Unsupported(f"Slice axis {ax} is out of range for a rank-{len(shape)} input")
            ax %= len(shape)
            lo, hi, _ = slice(st, en).indices(shape[ax])
            v = take(lifter, node, v, ax, lo, max(0, hi - lo))
        return v

    return relayout(lifter, node, args, apply)


def slice_attr(lifter: Lifter, node: Node, args: list) -> Term:
    at = node.attrs
    if "starts" not in at or "ends" not in at:
        raise Unsupported("Slice needs its starts and ends attributes")
    return _slice(lifter, node, args, list(at["starts"]), list(at["ends"]),
                  list(at["axes"]) if "axes" in at else None, None)


def slice_input(lifter: Lifter, node: Node, args: list) -> Term:
    if not all(isinstance(a, Static) for a in args[1:] if a is not None):
        raise Unsupported("Slice bounds must be known at compile time")
    starts, ends, axes, steps = (static_ints(args, i) for i in (1, 2, 3, 4))
    if starts is None or ends is None:
        raise Unsupported("Slice needs its starts and ends inputs")
    return _slice(lifter, node, args, starts, ends, axes, steps)


# ---- Split: sizes as an attribute (opsets 2-12) or an input (13+; num_outputs from 18) ----------


def _split(lifter: Lifter, node: Node, args: list, sizes: list[int] | None) -> tuple[Term, ...]:
    shape = lifter.shape(node.inputs[0])
    axis = node.attrs.get("axis", 0)
    if not -len(shape) <= axis < len(shape):
        raise Unsupported(f"Split axis {axis} is out of range for a rank-{len(shape)} input")
    axis %= len(shape)
    parts, dim = len(node.outputs), shape[axis]
    if sizes is None:
        if "num_outputs" in node.attrs:  # opset 18: ceil-sized parts, the last one smaller
            count = int(node.attrs["num_outputs"])
            if count < 1:
                raise Unsupported(f"Split num_outputs={count} must be positive")
            chunk = -(-dim // count)
            sizes = [min(chunk, dim - i * chunk) for i in range(count)]
        elif dim % parts == 0:
            sizes = [dim // parts] * parts
        else:
            raise Unsupported(f"Split of {dim} entries into {parts} equal parts")
    if len(sizes) != parts or sum(sizes) != dim or min(sizes) < 0:
        raise Unsupported(f"Split sizes {sizes} do not cover the {dim} entries of axis {axis} in {parts} parts")
    v = lifter.need_view(args[0], "input")
    starts = np.cumsum([0, *sizes[:-1]])
    return tuple(take(lifter, node, v, axis, int(lo), n) for lo, n in zip(starts, sizes, strict=True))


def split_attr(lifter: Lifter, node: Node, args: list) -> tuple[Term, ...]:
    sizes = node.attrs.get("split")
    return _split(lifter, node, args, None if sizes is None else list(sizes))


def split_input(lifter: Lifter, node: Node, args: list) -> tuple[Term, ...]:
    sizes = static_ints(args, 1)
    if len(args) > 1 and args[1] is not None and sizes is None:
        raise Unsupported("Split sizes must be known at compile time")
    return _split(lifter, node, args, sizes)


# ---- Concat -------------------------------------------------------------------------------------


def concat(lifter: Lifter, node: Node, args: list) -> Term:
    """Concat(past KV, new KV) along the position axis is a cache append; others wait (RoPE)."""
    past = args[0]
    if is_cache(past):
        new = lifter.need_view(args[1], "new keys or values") if len(args) == 2 else None
        if new is None or node.attrs.get("axis", 0) % len(past.shape) != 2:
            raise Unsupported("only Concat(past, new) of a KV cache along its position axis is supported")
        return append_cache(lifter, past, new, node.name)
    return Expr(node, args)


def is_cache(t: Term) -> bool:
    """Whether `t` is a past KV cache input (a view of a `kv_cache`)."""
    return isinstance(t, View) and t.base.owner is not None and t.base.owner.name == "kv_cache"


def append_cache(lifter: Lifter, past: View, new: View, loc: str) -> View:
    """`kv_append(past, new)` as the [1, kv_heads, ctx, head_dim] present: `new` must be the
    [1, kv_heads, seq, head_dim] head split of one activation laid out as the cache."""
    if new.r0 or new.c0 or new.axes[1:] != (past.axes[1], Axis(lifter.n, 1, 0), past.axes[3]) or \
            new.base.type.shape[1] != past.base.type.shape[1]:
        raise Unsupported("the new keys or values are not [1, kv_heads, seq, head_dim] of one activation laid out "
                          "as the cache")
    out = lifter.op("kv_append", [past.base, new.base], loc)
    return View(out, (Axis(1), past.axes[1], Axis(lifter.n + lifter.past, 1, 0), past.axes[3]))


standard("Identity", identity, weights=identity_weights)
standard("Cast", cast, since=6, weights=cast_weights)
standard("Reshape", reshape, weights=reshape_weights)
standard("Flatten", reshape)
standard("Transpose", transpose, weights=transpose_weights)
standard("Expand", expand)
standard("Squeeze", squeeze_attr, until=13)
standard("Squeeze", squeeze_input, since=13)
standard("Unsqueeze", unsqueeze_attr, until=13)
standard("Unsqueeze", unsqueeze_input, since=13)
standard("Slice", slice_attr, until=10)
standard("Slice", slice_input, since=10)
standard("Split", split_attr, since=2, until=13)
standard("Split", split_input, since=13)
standard("Concat", concat)
