"""The generic mode: graphs that are not decoders (no token ids, no KV cache, fixed input shapes),
such as the ONNX backend node tests (`cimc.backend`).

Every float32 graph input is a fixed-size activation, the row-major `[prod(shape[:-1]), shape[-1]]`
matrix of its ONNX shape (`isa.program.fixed_matrix`; a scalar or vector is one row), and so is
every graph output. Layout ops still only re-view (cimc.frontend.views); where an op needs a whole
activation and has a strided view of one (a Transpose, Expand or stepped Slice of it, an operand
that broadcasts across rows), the view is copied into its own matrix by a `relayout` op. The
converters here take what the decoder path refuses or defers on such graphs: binary ops between
activations with numpy broadcasting, Concat and Gather by constant indices (relayouts), Softmax and
the reductions over any axes (a relayout moves them last), MatMul and Gemm with constant B (and
Gemm's alpha, beta, transA, a matrix C; batched B one weight per matrix; a vector B as a row
product), Pow of activations and stepped Slices, LayerNormalization and RMSNormalization over any
trailing axes (with LayerNormalization's Mean and InvStdDev), Where by a constant condition,
Attention per batch and head (`matmul` products of two activations, a constant mask, the op's own
past concatenated) and RotaryEmbedding with constant caches (any position ids, interleaved or not).
Every other op uses its decoder-path converter.
The decoder path (cimc.frontend.lift.Lifter) is not changed by any of this.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from math import prod

import numpy as np
from onnx import TensorProto

from cimc.frontend import converters
from cimc.frontend import views as V
from cimc.frontend.converters import Converter, Unsupported
from cimc.frontend.lift import Bad, Lazy, Lifter, QLazy, Static, Term, dtype_name, transposed
from cimc.frontend.model import Node
from cimc.frontend.ops.contrib_norms import DEFAULT_EPS
from cimc.frontend.ops.elementwise import BINARY, with_const
from cimc.frontend.ops.layout import static_ints
from cimc.frontend.ops.reduce import REDUCE
from cimc.frontend.views import Axis, View
from cimc.ir.core import TensorType, Value
from cimc.ir.ops import Piece, traits
from isa.diag import CimcError
from isa.dtypes import ACT
from isa.program import fixed_matrix

GENERIC: dict[tuple[str, str], list[Converter]] = {}


def generic(op_types: str | tuple[str, ...], lift: Callable[[GenericLifter, Node, list], Term], *,
            since: int = 1, until: int | None = None) -> None:
    """Register a generic-mode converter for standard ops over opsets [since, until)."""
    for op_type in (op_types,) if isinstance(op_types, str) else op_types:
        GENERIC.setdefault(("", op_type), []).append(Converter("", op_type, lift, since, until))  # type: ignore[arg-type]


def row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a row-major tensor of `shape`."""
    return tuple(prod(shape[a + 1:]) for a in range(len(shape)))


def piece(v: View, of: int, d0: int, ds: tuple[int, ...]) -> Piece:
    """The piece copying view `v` (operand `of`) to flat offset d0 + sum_a i_a * ds[a]; a repeated
    (GQA) axis is split into its distinct entries and a broadcast over them."""
    axes: list[tuple[int, int, int, int]] = []  # (size, rs, cs, ds)
    for a, d in zip(v.axes, ds, strict=True):
        if a.rep == 1:
            axes.append((a.size, a.rs, a.cs, d))
        elif a.size % a.rep == 0:
            axes += [(a.size // a.rep, a.rs, a.cs, d * a.rep), (a.rep, 0, 0, d)]
        else:
            raise Unsupported("a repeated axis whose size is not a multiple of its repeat count")
    sizes, rs, cs, out = (tuple(x[k] for x in axes) for k in range(4))
    return Piece(of, v.r0, v.c0, d0, sizes, rs, cs, out)


class GenericLifter(Lifter):
    """The Lifter for the generic mode (see the module docstring)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._copies: dict[tuple[View, tuple[int, ...]], View] = {}

    def converter(self, node: Node) -> Converter | None:
        return converters.find(self.model, node, GENERIC) or super().converter(node)

    def _input(self, name: str) -> Term:
        shape, et = self.shape(name), self.f1.elem_types[name]
        if name in self.roles.assumed:  # empty: in the program's interface, never read
            attrs = {"name": name, "onnx_dtype": dtype_name(et), "onnx_shape": list(shape), "assume": "empty"}
            self.rw.create("input", [], [TensorType(ACT, fixed_matrix(shape))], attrs, name)
            return Static(name, self.f1.values[name], None, False)
        if et != TensorProto.FLOAT:
            raise CimcError(f"{self.model.path}: graph input {name!r} has element type {dtype_name(et)}; cimc "
                            "takes float32 activations (integer inputs only as token ids)")
        attrs = {"name": name, "onnx_dtype": dtype_name(et), "onnx_shape": list(shape)}
        base = self.rw.create("input", [], [TensorType(ACT, fixed_matrix(shape))], attrs, name).result
        return self.view_of(base, shape)

    def _output(self, name: str) -> None:
        term = self.env.get(name)
        if isinstance(term, View) and not prod(term.shape):
            term = Static(name, np.zeros(term.shape, np.float32), None, False)
        if isinstance(term, Static) and name in self.model.producer:  # computed from no input data
            term = _view(self, term)
        if isinstance(term, View):
            v = self.plain(term)
            assert v is not None
            owner = v.base.owner
            if owner is not None and (owner.name == "input" or traits(owner).constant):  # not computed
                v = self.copy(v, None, fresh=True)
            self.env[name] = v
        super()._output(name)

    def view_of(self, base: Value, onnx_shape: tuple[int, ...]) -> View:
        if not prod(onnx_shape):  # an empty tensor: no element to place
            return View(base, tuple(Axis(d) for d in onnx_shape))
        return super().view_of(base, onnx_shape)

    def is_plain(self, v: View) -> bool:
        """Whether `v` is its base as the row-major matrix of its own shape."""
        if v.base.type.shape != fixed_matrix(v.shape) or v.r0 or v.c0:
            return False
        want = self.view_of(v.base, v.shape)
        return [a for a in v.axes if a.size != 1] == [a for a in want.axes if a.size != 1]

    def plain(self, t: Term) -> View | None:
        """`t` as a whole activation, copied into its own matrix if it is another view of one."""
        if not isinstance(t, View):
            return None
        return t if self.is_plain(t) else self.copy(t)

    def copy(self, v: View, shape: tuple[int, ...] | None = None, fresh: bool = False) -> View:
        """A `relayout` of view `v` into the row-major matrix of its shape, or of `shape` (a
        reshape a strided view cannot express); one per view and shape unless `fresh`."""
        shape = v.shape if shape is None else shape
        if fresh or (v, shape) not in self._copies:
            self._copies[(v, shape)] = self.relayout([v.base], [piece(v, 0, 0, row_major(v.shape))], shape,
                                                     v.base.owner.loc if v.base.owner else "relayout")
        return self._copies[(v, shape)]

    def relayout(self, operands: list[Value], pieces: list[Piece], shape: tuple[int, ...], loc: str) -> View:
        out = self.op("relayout", operands, loc, {"shape": list(shape), "pieces": [p.encode() for p in pieces]})
        return self.view_of(out, shape)

    def operand(self, t: Term, shape: tuple[int, ...]) -> Value:
        """An activation or constant operand of an elementwise op with result `shape`, as a matrix
        that broadcasts to the result's (the same rows, or one row; the same columns, or one)."""
        if isinstance(t, Static):
            arr = np.asarray(t.value, np.float32)
            arr = arr.reshape((1,) * (len(shape) - arr.ndim) + arr.shape)
            if not _row_broadcasts(arr.shape, shape):
                arr = np.broadcast_to(arr, shape)
            return self.const(Static(t.name, arr, None, False), arr.reshape(fixed_matrix(arr.shape)), False)
        if not isinstance(t, View):
            raise Unsupported("an operand is not an activation or a constant")
        v = V.reshape(t, (1,) * (len(shape) - len(t.shape)) + t.shape)
        if not _row_broadcasts(v.shape, shape):
            v = V.expand(v, shape)
        p = self.plain(v)
        assert p is not None
        return p.base


def _row_broadcasts(shape: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """Whether a tensor's matrix broadcasts to the result's as the vector unit does it: all rows or
    one row, all columns or one column."""
    rows_same, one_row = shape[:-1] == out[:-1], all(d == 1 for d in shape[:-1])
    return (rows_same or one_row) and (not shape or shape[-1] in (1, out[-1]))


# ---- elementwise -------------------------------------------------------------------------------


def binary(lifter: GenericLifter, node: Node, args: list) -> Term:
    """Add, Sub, Mul, Div, Max (any number of inputs), Pow, with numpy broadcasting."""
    shape = lifter.shape(node.outputs[0])
    name = "pow" if node.op_type == "Pow" else BINARY[node.op_type]
    if len(args) == 1:
        return args[0]
    terms = [a for a in args if a is not None]
    acc = terms[0]
    for t in terms[1:]:
        scalar = next((s for s in (t, acc) if isinstance(s, Static) and np.asarray(s.value).size == 1), None)
        other = acc if scalar is t else t
        if scalar is not None and isinstance(other, View) and other.shape == shape and name != "pow":
            c = float(np.asarray(scalar.value).ravel()[0])
            x = lifter.operand(other, shape)
            acc = lifter.view_of(with_const(lifter, name, x, c, scalar is t, node.name), shape)
            continue
        a, b = lifter.operand(acc, shape), lifter.operand(t, shape)
        acc = lifter.view_of(lifter.op(name, [a, b], node.name), shape)
    return acc


# ---- layout ------------------------------------------------------------------------------------


def _stack(lifter: GenericLifter, views: list[View], axis: int, loc: str) -> View:
    """The Concat of `views` along `axis` (a relayout)."""
    shape = list(views[0].shape)
    shape[axis] = sum(v.shape[axis] for v in views)
    strides = row_major(tuple(shape))
    operands: list[Value] = []
    pieces, at = [], 0
    for v in views:
        if v.base not in operands:
            operands.append(v.base)
        pieces.append(piece(v, operands.index(v.base), at * strides[axis], strides))
        at += v.shape[axis]
    return lifter.relayout(operands, pieces, tuple(shape), loc)


def concat(lifter: GenericLifter, node: Node, args: list) -> Term:
    axis = node.attrs.get("axis", 0) % len(lifter.shape(node.outputs[0]))
    return _stack(lifter, [_view(lifter, t) for t in args], axis, node.name)


def gather(lifter: GenericLifter, node: Node, args: list) -> Term:
    """Gather from an activation by constant indices: one piece per index."""
    data, idx = args
    if not isinstance(data, View):
        return converters.find(lifter.model, node).lift(lifter, node, args)  # type: ignore[union-attr]
    if not isinstance(idx, Static):
        raise Unsupported("Gather from an activation needs constant indices")
    shape = lifter.shape(node.outputs[0])
    axis = node.attrs.get("axis", 0) % len(data.shape)
    ids = np.asarray(idx.value).astype(np.int64)
    strides = row_major(shape)
    inner = strides[:axis] + strides[axis + ids.ndim:]
    pieces = []
    for at in np.ndindex(*ids.shape):
        j = int(ids[at]) % data.shape[axis]
        v = V.slice_axis(data, axis, j, 1)
        v = V.squeeze(v, [axis]) if len(v.shape) > 1 else v
        d0 = sum(i * s for i, s in zip(at, strides[axis:axis + ids.ndim], strict=True))
        pieces.append(piece(v, 0, d0, inner if len(data.shape) > 1 else (0,)))
    return lifter.relayout([data.base], pieces, shape, node.name)


def slice_steps(lifter: GenericLifter, node: Node, args: list) -> Term:
    """Slice with any steps (a negative one reads the axis backwards)."""
    if not all(isinstance(a, Static) for a in args[1:] if a is not None):
        raise Unsupported("Slice bounds must be known at compile time")
    v = _view(lifter, args[0])
    starts, ends, axes, steps = (static_ints(args, i) for i in (1, 2, 3, 4))
    assert starts is not None and ends is not None
    axes = list(range(len(starts))) if axes is None else axes
    for st, en, ax, step in zip(starts, ends, axes, steps or [1] * len(starts), strict=True):
        ax %= len(v.shape)
        lo, _, step = slice(st, en, step).indices(v.shape[ax])
        n = len(range(*slice(st, en, step).indices(v.shape[ax])))
        a = v.axes[ax]
        if a.rep != 1:
            raise Unsupported("Slice of a repeated axis")
        axes_ = list(v.axes)
        axes_[ax] = Axis(n, a.rs * step, a.cs * step)
        v = View(v.base, tuple(axes_), v.r0 + lo * a.rs if n else v.r0, v.c0 + lo * a.cs if n else v.c0)
    return v


def _view(lifter: GenericLifter, t: Term) -> View:
    """An activation view of `t` (a constant becomes a `const`)."""
    if isinstance(t, Static):
        arr = np.asarray(t.value, np.float32)
        return lifter.view_of(lifter.const(t, arr.reshape(fixed_matrix(arr.shape)), False), arr.shape)
    return lifter.need_view(t, "input")


# ---- reductions and softmax --------------------------------------------------------------------


def reshaped(lifter: GenericLifter, v: View, shape: tuple[int, ...]) -> View:
    """`v` re-viewed as `shape`, or copied to it where a strided view cannot express that."""
    try:
        return V.reshape(v, shape)
    except V.ViewError:
        return lifter.copy(v, shape)


def reshape(lifter: GenericLifter, node: Node, args: list) -> Term:
    """Reshape and Flatten."""
    return reshaped(lifter, _view(lifter, args[0]), lifter.shape(node.outputs[0]))


def _whole(lifter: GenericLifter, v: View, shape: tuple[int, ...]) -> View:
    """`v` reshaped to `shape` as a whole activation (copied first where a view cannot merge)."""
    p = lifter.plain(reshaped(lifter, v, shape))
    assert p is not None
    return p


def _over_last(lifter: GenericLifter, v: View, axes: list[int]) -> View:
    """`v` with `axes` moved last and merged into one, as a whole activation [kept..., reduced]."""
    keep = [a for a in range(len(v.shape)) if a not in axes]
    kept = tuple(v.shape[a] for a in keep)
    return _whole(lifter, V.transpose(v, keep + axes), (*kept, prod(v.shape[a] for a in axes)))


def reduce(lifter: GenericLifter, node: Node, args: list) -> Term:
    v = _view(lifter, args[0])
    rank = len(v.shape)
    since = REDUCE[node.op_type][1]
    axes = static_ints(args, 1) if (converters.opset(lifter.model, node) or 0) >= since else node.attrs.get("axes")
    if len(args) > 1 and args[1] is not None and axes is None:
        raise Unsupported(f"{node.op_type} axes must be known at compile time")
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return v
        axes = list(range(rank))
    axes = sorted({a % rank for a in axes})
    p = _over_last(lifter, v, axes)
    out = lifter.op(REDUCE[node.op_type][0], [p.base], node.name)
    return lifter.view_of(out, lifter.shape(node.outputs[0]))


def softmax(lifter: GenericLifter, node: Node, args: list) -> Term:
    """Softmax over one axis (opset 13+), or over the axes from `axis` on, flattened (before 13)."""
    v = _view(lifter, args[0])
    rank = len(v.shape)
    old = (converters.opset(lifter.model, node) or 0) < 13
    axis = node.attrs.get("axis", 1 if old else -1) % rank
    if old:
        p = _whole(lifter, v, (prod(v.shape[:axis]), prod(v.shape[axis:])))
        return lifter.view_of(lifter.op("softmax", [p.base], node.name), v.shape)
    perm = [a for a in range(rank) if a != axis] + [axis]
    p = lifter.plain(V.transpose(v, perm))
    assert p is not None
    out = lifter.view_of(lifter.op("softmax", [p.base], node.name), p.shape)
    return V.transpose(out, [perm.index(a) for a in range(rank)])


# ---- normalisations ---------------------------------------------------------------------------


def _norm_vector(lifter: GenericLifter, node: Node, name: str, term: Term, tail: tuple[int, ...]) -> Value:
    """A norm's scale or bias `name`, a constant broadcast to the normalised shape `tail` and
    flattened: one value per column of the [rows, prod(tail)] matrix."""
    if isinstance(term, Lazy) and not term.transpose:
        value = lifter.weights(term.init)
    elif isinstance(term, Static):
        value = term.value
    else:
        raise Unsupported(f"{node.op_type} input {name!r} must be a constant")
    try:
        arr = np.broadcast_to(np.asarray(value, np.float32), tail)
    except ValueError:
        raise Unsupported(f"{node.op_type} input {name!r} of shape {list(np.shape(value))} does not broadcast to "
                          f"the normalised shape {list(tail)}") from None
    flat = arr.reshape(-1)
    return lifter.const(Static(f"{name}:flat", flat, None, False), flat, False)


def norm(lifter: GenericLifter, node: Node, args: list) -> Term | tuple[Term, ...]:
    """LayerNormalization and RMSNormalization over the axes from `axis` on: the row normalisation
    (`layer_norm`, `rms_norm`) of X's [prod(shape[:axis]), prod(shape[axis:])] matrix, with the
    scale and bias broadcast to shape[axis:] and flattened. LayerNormalization's Mean and InvStdDev
    are computed where the node names them."""
    if int(node.attrs.get("stash_type", 1)) != 1:
        raise Unsupported(f"stash_type={node.attrs['stash_type']} is not supported (only 1: float32 statistics)")
    v = _view(lifter, args[0])
    shape, rank = v.shape, len(v.shape)
    axis = int(node.attrs.get("axis", -1))
    if not -rank <= axis < rank:
        raise Unsupported(f"axis={axis} is outside the {rank} axes of X")
    axis %= rank
    matrix = (prod(shape[:axis]), prod(shape[axis:]))
    x = _whole(lifter, v, matrix).base
    eps = float(node.attrs.get("epsilon", DEFAULT_EPS))
    vectors = [_norm_vector(lifter, node, name, t, shape[axis:])
               for name, t in zip(node.inputs[1:], args[1:], strict=True) if t is not None]
    layer = node.op_type == "LayerNormalization"
    y = lifter.op("layer_norm" if layer else "rms_norm", [x, *vectors], node.name, {"eps": eps})
    out = reshaped(lifter, lifter.view_of(y, matrix), shape)
    if not layer or not any(node.outputs[1:3]):
        return out
    mean = lifter.op("reduce_mean", [x], node.name)
    d = lifter.op("sub", [x, mean], node.name)
    var = lifter.op("reduce_mean", [lifter.op("mul", [d, d], node.name)], node.name)
    inv = lifter.op("rsqrt", [with_const(lifter, "add", var, eps, True, node.name)], node.name)
    named = [*node.outputs[1:3], "", ""][:2]
    stats = [lifter.view_of(s, lifter.shape(o)) if o else Bad(node) for s, o in zip((mean, inv), named, strict=True)]
    return (out, *stats)


# ---- Where -------------------------------------------------------------------------------------


def where(lifter: GenericLifter, node: Node, args: list) -> Term:
    """Where by a constant condition: a relayout copying each run of a row that the condition
    takes from X or from Y (both broadcast to the result)."""
    cond = args[0]
    if not isinstance(cond, Static):
        raise Unsupported("Where needs a constant condition (cimc has no datapath selecting by a boolean "
                          "activation)")
    shape = lifter.shape(node.outputs[0])
    rows, cols = prod(shape[:-1]), (shape[-1] if shape else 1)
    take = np.broadcast_to(np.asarray(cond.value, bool), shape).reshape(rows, cols)
    srcs = []
    for t in args[1:]:
        u = _view(lifter, t)
        u = V.expand(V.reshape(u, (1,) * (len(shape) - len(u.shape)) + u.shape), shape)
        srcs.append(reshaped(lifter, u, (rows, cols)))
    operands: list[Value] = []
    pieces = []
    for r in range(rows):
        bounds = [0, *(int(b) + 1 for b in np.flatnonzero(np.diff(take[r]))), cols]  # runs of one choice
        for lo, hi in pairwise(bounds):
            src = srcs[0 if take[r, lo] else 1]
            if src.base not in operands:
                operands.append(src.base)
            run = V.slice_axis(V.slice_axis(src, 0, r, 1), 1, lo, hi - lo)
            pieces.append(piece(run, operands.index(src.base), r * cols + lo, (cols, 1)))
    return lifter.relayout(operands, pieces, shape, node.name)


# ---- MatMul and Gemm ---------------------------------------------------------------------------


def _weight(lifter: GenericLifter, w: Lazy, index: tuple[int, ...]) -> Value:
    """The [K, N] weight at `index` of a (batched) initializer left on disk."""
    t = lifter.model.initializers[w.init]
    if t.data_type != TensorProto.FLOAT:
        raise Unsupported(f"weight {w.init!r} has element type {dtype_name(t.data_type)}; only float32 weights "
                          "are supported")
    shape = tuple(w.shape[len(index):])
    attrs = {"init": w.init} | ({"index": list(index)} if index else {})
    for op in lifter.module.walk("weight"):
        if op.attrs == attrs:
            return op.result
    return lifter.rw.create("weight", [], [TensorType(ACT, shape)], attrs, w.init).result


def matmul(lifter: GenericLifter, node: Node, args: list) -> Term:
    """A @ B for a constant B: one linear per matrix of a batched B (broadcast numpy-style); a
    vector B is a product along the rows, on the vector unit."""
    a, b = args
    if not isinstance(b, (Lazy, Static)) or isinstance(b, QLazy):
        raise Unsupported("MatMul needs a constant B (its weights go on the macros)")
    if isinstance(a, Static):
        raise Unsupported("MatMul of a constant by a constant is folded, not compiled")
    av = _view(lifter, a)
    bshape = b.shape if isinstance(b, Lazy) else b.value.shape
    out_shape = lifter.shape(node.outputs[0])
    if len(bshape) == 1:
        prod_ = lifter.op("mul", [lifter.operand(av, av.shape), lifter.operand(b, av.shape)], node.name)
        return lifter.view_of(lifter.op("reduce_sum", [prod_], node.name), out_shape)
    if isinstance(b, Static) and not b.init:
        raise Unsupported("MatMul B must be an initializer")
    lazy = b if isinstance(b, Lazy) else Lazy(b.name, bshape)
    if len(av.shape) == 1:
        av = V.unsqueeze(av, [0])
    m, k, n = av.shape[-2], av.shape[-1], bshape[-1]
    batch = tuple(np.broadcast_shapes(av.shape[:-2], tuple(bshape[:-2])))
    av = V.expand(V.reshape(av, (1,) * (len(batch) + 2 - len(av.shape)) + av.shape), (*batch, m, k))
    skip = len(batch) - (len(bshape) - 2)  # batch axes B does not have
    results, pieces = [], []
    for i, at in enumerate(np.ndindex(*batch)):
        x = av
        for j in at:
            x = V.squeeze(V.slice_axis(x, 0, j, 1), [0])
        index = tuple(0 if bshape[d] == 1 else at[skip + d] for d in range(len(bshape) - 2))
        p = lifter.plain(x)
        assert p is not None
        results.append(lifter.op("linear", [p.base, _weight(lifter, lazy, index)], node.name))
        pieces.append(Piece(i, 0, 0, i * m * n, (m, n), (1, 0), (0, 1), (n, 1)))
    if not batch:
        return lifter.view_of(results[0], out_shape)
    return lifter.relayout(results, pieces, out_shape, node.name)


def gemm(lifter: GenericLifter, node: Node, args: list) -> Term:
    """alpha * A' @ B' + beta * C with constant B and C (A' = A.T with transA, B' likewise)."""
    at = node.attrs
    a, b = args[0], args[1]
    c = args[2] if len(args) > 2 else None
    if not isinstance(b, (Lazy, Static)) or (c is not None and not isinstance(c, (Lazy, Static))):
        raise Unsupported("Gemm needs constant B and C (B's weights go on the macros)")
    av = _view(lifter, a)
    if at.get("transA", 0):
        av = V.transpose(av, [1, 0])
    w = b if isinstance(b, Lazy) else Lazy(b.name, b.value.shape)
    if at.get("transB", 0):
        w = transposed(w)
    shape = lifter.shape(node.outputs[0])
    y = lifter.linear(node, lifter.plain(av), lifter.weight(w), None)
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    if alpha != 1.0:
        y = lifter.view_of(lifter.op("affine", [y.base], node.name, {"alpha": alpha, "beta": 0.0}), shape)
    if c is None or beta == 0.0:
        return y
    cv = c.value if isinstance(c, Static) else lifter.weights(c.init)
    bias = np.asarray(cv, np.float32) * np.float32(beta)
    return binary(lifter, _add(node), [y, Static(f"{node.name}:beta_c", bias, None, False)])


def _add(node: Node) -> Node:
    """`node` seen as the Add of its result and a bias."""
    return Node(node.name, "Add", node.domain, node.inputs, node.outputs, {}, node.proto)


# ---- Attention and RotaryEmbedding -------------------------------------------------------------


def _heads(v: View, heads: int, what: str) -> View:
    """A 4-D [batch, heads, seq, head_dim] operand, or a 3-D [batch, seq, heads*head_dim] one split."""
    if len(v.shape) == 4:
        return v
    b, s, f = v.shape
    if heads < 1 or f % heads:
        raise Unsupported(f"{what} has {f} features, not a multiple of its {heads} heads")
    return V.transpose(V.reshape(v, (b, s, heads, f // heads)), [0, 2, 1, 3])


def _constant(lifter: GenericLifter, t: Term | None, name: str) -> np.ndarray | None:
    """The value of an optional input that must be a constant (an initializer, or folded)."""
    if isinstance(t, Lazy) and not t.transpose:
        return np.asarray(lifter.weights(t.init))
    if t is not None and not isinstance(t, Static):
        raise Unsupported(f"input {name!r} must be a constant")
    return None if t is None else np.asarray(t.value)


def _attention_bias(mask: np.ndarray | None, shape: tuple[int, int, int, int], causal: bool, past: int,
                    nonpad: np.ndarray | None, left: int, right: int) -> np.ndarray:
    """The additive bias [batch, heads, q, kv] of ONNX Attention: the mask (bool: True attends;
    float: added; shorter than kv: -inf beyond it), the causal and sliding-window masks aligned at
    the query block's offset (the op's own past, else nonpad_kv_seqlen - q, else 0), and the
    padding past nonpad_kv_seqlen."""
    b, _, q, kv = shape
    bias = np.zeros(shape, np.float32)
    if mask is not None:
        m = np.where(mask, 0.0, -np.inf) if mask.dtype == bool else np.asarray(mask, np.float32)
        pad = kv - m.shape[-1]
        m = np.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, pad)], constant_values=-np.inf) if pad > 0 else m
        bias = bias + m
    offset = np.full(b, past) if past or nonpad is None else nonpad.reshape(-1) - q
    diff = np.arange(q)[None, :, None] + offset[:, None, None] - np.arange(kv)[None, None, :]  # query - key
    allowed = np.ones((b, q, kv), bool)
    if causal:
        allowed &= diff >= 0
    if left >= 0:
        allowed &= diff <= left
    if right >= 0:
        allowed &= -diff <= right
    if nonpad is not None:
        allowed &= np.arange(kv)[None, None, :] < nonpad.reshape(-1)[:, None, None]
    return (bias + np.where(allowed, 0.0, -np.inf)[:, None]).astype(np.float32)


#: qk_matmul_output_mode -> the scores it returns; modes 0 and 2 with a softcap, and mode 1, are
#: refused: the ONNX spec (mask, then softcap) and its reference implementation (softcap, then
#: mask; mode 1 without the mask) disagree there.
QK_OUTPUTS = {0: "scores", 2: "biased", 3: "probs"}


def attention(lifter: GenericLifter, node: Node, args: list) -> tuple[Term, ...]:
    """ONNX Attention per batch and query head h (KV head h // (q_heads/kv_heads)): S = scale *
    Q K^T (`matmul`), soft-capped (tanh), plus the constant bias (`_attention_bias`), softmax, and
    P V (`matmul`); a query row every key is masked from gives zeros. The op's past_key/past_value
    are concatenated in front of K and V (the presents)."""
    at = node.attrs
    mode, softcap = int(at.get("qk_matmul_output_mode", 0)), float(at.get("softcap", 0.0))
    outs = [*node.outputs, "", "", ""][:4]
    if outs[3] and (mode not in QK_OUTPUTS or (softcap and mode != 3)):
        raise Unsupported(f"qk_matmul_output_mode={mode}{f' with softcap={softcap}' if softcap else ''} is not "
                          "supported (the ONNX spec and its reference disagree on what it returns)")
    if int(at.get("softmax_precision", TensorProto.FLOAT)) != TensorProto.FLOAT:
        raise Unsupported(f"softmax_precision={int(at['softmax_precision'])} is not supported (only 1: float)")
    if softcap < 0:
        raise Unsupported(f"softcap={softcap} must be 0 (none) or positive")
    q_in, k_in, v_in, mask_t, past_k, past_v, nonpad_t = (args + [None] * 7)[:7]
    names = [*node.inputs, *[""] * 7]
    mask, nonpad = _constant(lifter, mask_t, names[3]), _constant(lifter, nonpad_t, names[6])
    if (past_k is None) != (past_v is None) or (past_k is not None and nonpad is not None):
        raise Unsupported("past_key and past_value must be given together, and not with nonpad_kv_seqlen")
    q = _heads(_view(lifter, q_in), int(at.get("q_num_heads", 0)), "Q")
    k = _heads(_view(lifter, k_in), int(at.get("kv_num_heads", 0)), "K")
    v = _heads(_view(lifter, v_in), int(at.get("kv_num_heads", 0)), "V")
    presents: tuple[Term, ...] = ()
    past = 0
    if past_k is not None:
        past = _view(lifter, past_k).shape[2]
        k = _stack(lifter, [_view(lifter, past_k), k], 2, node.name)
        v = _stack(lifter, [_view(lifter, past_v), v], 2, node.name)
        presents = (k, v)
    (b, h, nq, dk), hk, nk, dv = q.shape, k.shape[1], k.shape[2], v.shape[3]
    if h % hk:
        raise Unsupported(f"{h} query heads are not a multiple of {hk} KV heads")
    bias = _attention_bias(mask, (b, h, nq, nk), bool(int(at.get("is_causal", 0))), past,
                           None if nonpad is None else nonpad.astype(np.int64),
                           int(at.get("left_window_size", -1)), int(at.get("right_window_size", -1)))
    scale = float(at["scale"]) if "scale" in at else 1.0 / float(np.sqrt(dk))
    ys, qks = [], []
    for bi, hi in np.ndindex(b, h):
        def head(x: View, i: int, b_: int = bi) -> Value:
            p = lifter.plain(V.squeeze(V.slice_axis(V.slice_axis(x, 0, b_, 1), 1, i, 1), [0, 1]))
            assert p is not None
            return p.base

        s = lifter.op("matmul", [head(q, hi), head(k, hi // (h // hk))], node.name, {"tb": True, "alpha": scale})
        if softcap:
            s = lifter.op("affine", [s], node.name, {"alpha": 1.0 / softcap, "beta": 0.0})
            s = lifter.op("affine", [lifter.op("tanh", [s], node.name)], node.name, {"alpha": softcap, "beta": 0.0})
        scores = s
        dead = np.isneginf(bias[bi, hi].max(axis=-1, keepdims=True))  # rows that see no key
        row_bias = np.where(dead, 0.0, bias[bi, hi]).astype(np.float32)
        if row_bias.any():
            s = lifter.op("add", [s, lifter.operand(Static(f"{node.name}:bias{bi},{hi}", row_bias, None, False),
                                                    (nq, nk))], node.name)
        biased = s
        p = lifter.op("softmax", [s], node.name)
        if dead.any():
            keep = Static(f"{node.name}:rows{bi},{hi}", (~dead).astype(np.float32), None, False)
            p = lifter.op("mul", [p, lifter.operand(keep, (nq, nk))], node.name)
        ys.append(lifter.op("matmul", [p, head(v, hi // (h // hk))], node.name))
        qks.append({"scores": scores, "biased": biased, "probs": p}[QK_OUTPUTS.get(mode, "scores")])

    def gather_heads(results: list[Value], cols: int, name: str) -> View:
        shape = lifter.shape(name)
        heads_last = len(shape) == 3  # [batch, q, heads*cols]
        pieces = [Piece(i, 0, 0, (bi * nq * h * cols + hi * cols) if heads_last else (bi * h + hi) * nq * cols,
                        (nq, cols), (1, 0), (0, 1), (h * cols if heads_last else cols, 1))
                  for i, (bi, hi) in enumerate(np.ndindex(b, h))]
        return lifter.relayout(results, pieces, shape, node.name)

    y = gather_heads(ys, dv, outs[0])
    qk = (gather_heads(qks, nk, outs[3]),) if outs[3] else ()
    return (y, *presents, *qk) if presents or not qk else (y, Bad(node), Bad(node), *qk)


def rotary(lifter: GenericLifter, node: Node, args: list) -> Term:
    """ONNX RotaryEmbedding with constant caches (and position ids): x * C + x' * S, where x' is
    x with each rotated pair swapped (a relayout) and C, S the cos and signed sin of each element
    (1 and 0 past rotary_embedding_dim), interleaved or in halves."""
    x_in, cos, sin, pos = [*args, None][:4]
    at = node.attrs
    x = _view(lifter, x_in)
    shape = x.shape
    names = [*node.inputs, ""]
    c, s, ids = (_constant(lifter, t, name) for t, name in zip((cos, sin, pos), names[1:4], strict=True))
    if len(shape) == 4:
        b, heads, n, hd = shape
    else:
        b, n, hidden = shape
        heads = int(at.get("num_heads", 0))
        if heads < 1 or hidden % heads:
            raise Unsupported(f"num_heads={heads} must divide a 3-D input's {hidden} features")
        hd = hidden // heads
    rd = int(at.get("rotary_embedding_dim", 0)) or hd
    if rd > hd or rd % 2:
        raise Unsupported(f"rotary_embedding_dim={rd} must be even and at most head_dim {hd}")
    assert c is not None and s is not None
    if ids is not None:
        c, s = c[ids.astype(np.int64)], s[ids.astype(np.int64)]
    if c.shape != (b, n, rd // 2) or s.shape != c.shape:
        raise Unsupported(f"the caches give {list(c.shape)} per token, not [batch, seq, rotary_embedding_dim/2]")
    half = np.arange(rd // 2)
    first, second = (2 * half, 2 * half + 1) if int(at.get("interleaved", 0)) else (half, half + rd // 2)
    cmat, smat = np.ones((b, n, hd), np.float32), np.zeros((b, n, hd), np.float32)
    cmat[..., first], cmat[..., second] = c, c
    smat[..., first], smat[..., second] = -s, s
    src = np.arange(hd)
    src[first], src[second] = second, first
    if len(shape) == 4:  # [b, n, hd] -> [b, 1, n, hd]
        cmat, smat = cmat[:, None], smat[:, None]
    else:  # [b, n, hd] -> [b, n, heads * hd]
        cmat, smat = np.tile(cmat, heads), np.tile(smat, heads)
        src = np.concatenate([src + i * hd for i in range(heads)])
    last = len(shape) - 1
    swapped = lifter.relayout([x.base], [piece(V.slice_axis(x, last, int(j), 1), 0, i, row_major(shape))
                                         for i, j in enumerate(src)], shape, node.name)
    terms = [lifter.op("mul", [lifter.operand(a, shape),
                               lifter.operand(Static(f"{node.name}:{what}", m, None, False), shape)], node.name)
             for a, m, what in ((x, cmat, "cos"), (swapped, smat, "sin"))]
    return lifter.view_of(lifter.op("add", terms, node.name), shape)


generic(("Add", "Sub", "Mul", "Div", "Pow"), binary, since=7)
generic("Max", binary, since=8)
generic(("Reshape", "Flatten"), reshape)
generic("Concat", concat, since=4)
generic("Gather", gather)
generic("Slice", slice_steps, since=10)
for _name, (_, _since) in REDUCE.items():
    generic(_name, reduce)
generic("Softmax", softmax)
generic("MatMul", matmul)
generic("Gemm", gemm, since=7)
generic("LayerNormalization", norm, since=17)
generic("RMSNormalization", norm, since=23)
generic("Where", where, since=9)
generic("Attention", attention, since=23)
generic("RotaryEmbedding", rotary, since=23)
