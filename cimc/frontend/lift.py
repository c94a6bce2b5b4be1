"""Lift an analyzed ONNX graph to the IR: decoder idioms by pattern, the rest elementwise.

Nodes are visited in topological order. Each ONNX value becomes a *term*:
  - `View`: a strided view of an IR value (layout ops like Reshape/Transpose only re-view);
  - `Static`: a value known at compile time (folded, or a small initializer);
  - `Lazy`: a weight matrix (an initializer, maybe transposed) left on disk;
  - `QLazy`: integer weights a DequantizeLinear dequantizes, left on disk (a `qweight` where a
    MatMul or Gemm takes them, a float table dequantized at compile time where a Gather does);
  - `Expr`: an op that cannot be lowered on its own (it works on a head-split view, or is part
    of attention); it waits for an idiom rule to consume it;
  - `Bad`: a node that cannot be compiled, with the reason.
Idiom rules are anchored where an idiom ends: RoPE at its final Add, attention at the
`MatMul(softmax, V)`; converters may register more (`converters.IDIOMS`, e.g. quantize_dynamic's
MatMulInteger chain at its final Mul). A rule that does not match records why, so an unsupported
model gets one error listing every node that could not be compiled and the near-miss reasons.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, replace
from math import prod

import numpy as np
from onnx import TensorProto

from cimc.frontend import converters
from cimc.frontend import views as V
from cimc.frontend.converters import Unsupported
from cimc.frontend.fold import Facts, Roles
from cimc.frontend.model import FLOAT_TYPES, Node, OnnxModel, cannot_compile
from cimc.frontend.views import Axis, View, ViewError
from cimc.ir.core import CTX, SEQ, Module, Rewriter, TensorType, Value
from cimc.ir.ops import OPS
from cimc.ir.quant import ONNX_INTS, held_type
from isa.diag import CimcError
from isa.dtypes import ACT


class Poisoned(Exception):
    """An input of this node is an expression no idiom consumed (already reported)."""


@dataclass
class Static:
    name: str
    value: np.ndarray
    value2: np.ndarray | None  # the same value with one more token (None: not seq-dependent)
    init: bool
    table: np.ndarray | None = None  # the value with every position 0..max_ctx-1 and nothing cached


@dataclass
class Lazy:
    init: str
    shape: tuple[int, ...]
    transpose: bool = False


@dataclass(frozen=True)
class Dequant:
    """A checked DequantizeLinear of an integer initializer (or of a Gather of one: `gathered`):
    x's numpy type name, its scales and zero points ("" if none), the quantized axis (normalised) and
    block size (0: per axis), or one scale for the tensor (`per_tensor`)."""

    dtype: str
    scales: str
    zero_points: str
    axis: int
    block: int
    per_tensor: bool
    gathered: bool


@dataclass
class QLazy:
    """Integer weights `init` (stored `shape`) that DequantizeLinear `node` dequantizes as `dq` says
    (its axis counted along the stored tensor); viewed transposed with `transpose`."""

    node: Node
    init: str
    shape: tuple[int, ...]
    dq: Dequant
    transpose: bool = False


@dataclass
class Expr:
    node: Node
    args: list


@dataclass
class Bad:
    node: Node


Term = View | Static | Lazy | QLazy | Expr | Bad

_INT = {TensorProto.INT64, TensorProto.INT32}
_UNARY = {"Neg": "neg", "Exp": "exp", "Sqrt": "sqrt", "Reciprocal": "reciprocal", "Sigmoid": "sigmoid",
          "Tanh": "tanh"}
_BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Max": "max"}
_REDUCE = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max"}


class Lifter:
    """Builds the IR module for one model; see the module docstring."""

    def __init__(self, model: OnnxModel, facts: dict[str, Facts], roles: Roles, max_seq: int, max_ctx: int,
                 name: str, weights: Callable[[str], np.ndarray]) -> None:
        # facts: "main" (seq and past >= 2 and distinct, so no such axis looks like a size-1
        # axis), "seq" (one more token), "past" (more cached tokens; exports with a cache only),
        # "table" (max_ctx tokens, nothing cached: every position of a position table).
        self.model, self.roles, self.max_ctx = model, roles, max_ctx
        self.weights = weights  # reads an initializer kept on disk (zero points, to pick a weight type)
        self.f1, self.f2, self.fpast, self.ftab = facts["main"], facts["seq"], facts.get("past"), facts["table"]
        self.n, self.past = self.f1.binding.seq, self.f1.binding.past
        self.module = Module(name, {"max_seq": max_seq, "max_ctx": max_ctx, "source": model.path.name})
        self.rw = Rewriter(self.module)
        self.env: dict[str, Term] = {}
        self.reasons: dict[str, str] = {}  # node name -> why it could not be compiled
        self.near_miss: dict[str, str] = {}  # anchor node -> why an idiom rule did not match
        self._weights: dict[tuple[str, bool], Value] = {}
        self._consts: dict[str, Value] = {}

    # ---- entry ---------------------------------------------------------------------------

    def run(self) -> Module:
        for name in self.model.inputs:
            self.env[name] = self._input(name)
        for node in self.model.nodes:
            self._visit(node)
        for name in self.model.outputs:
            self._output(name)
        if self.reasons:
            self._fail()
        return self.module

    def _fail(self) -> None:
        # a reason is keyed by node name, or by graph output name (reported at the node making it)
        by_node = {o: n for n in self.model.nodes for o in n.outputs if o} | {n.name: n for n in self.model.nodes}
        raise cannot_compile(self.model, [(by_node[name], reason) for name, reason in self.reasons.items()
                                          if name in by_node])

    # ---- helpers -------------------------------------------------------------------------

    def seq_axes(self, name: str, other: Facts | None = None) -> list[int]:
        """Axes of `name` whose size follows the token count (or, with `other`, that binding's change)."""
        other = self.f2 if other is None else other
        s1, s2 = self.f1.shapes.get(name), other.shapes.get(name)
        if s1 is None or s2 is None or len(s1) != len(s2):
            return []
        return [i for i, (a, b) in enumerate(zip(s1, s2, strict=True)) if a != b]

    def axis_names(self, name: str) -> list[int | str]:
        """The ONNX shape of `name` with its dynamic axes named seq, past or ctx."""
        seq = set(self.seq_axes(name))
        past = set(self.seq_axes(name, self.fpast)) if self.fpast is not None else set()
        return ["ctx" if i in seq and i in past else "seq" if i in seq else "past" if i in past else d
                for i, d in enumerate(self.shape(name))]

    def _rows(self, base: Value) -> int:
        d = base.type.shape[0]
        return self.n if d == SEQ else self.n + self.past if d == CTX else int(d)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.f1.shapes:
            raise Unsupported(f"the shape of {name!r} is unknown after shape inference")
        return self.f1.shapes[name]

    def _op(self, name: str, operands: list[Value], loc: str, attrs: dict | None = None) -> Value:
        """Create an op whose result type follows from its operands (the op's type rule)."""
        types = OPS[name].infer([v.type for v in operands], attrs or {})
        return self.rw.create(name, operands, types, attrs, loc).result

    def _view_of(self, base: Value, onnx_shape: tuple[int, ...]) -> View:
        return V.reshape(View(base, tuple(V.base_axes(base, self._rows(base)))), onnx_shape)

    def _is_plain(self, v: View) -> bool:
        return V.is_canonical(v, self._rows(v.base))

    def weight(self, lazy: Lazy) -> Value:
        key = (lazy.init, lazy.transpose)
        if key not in self._weights:
            t = self.model.initializers[lazy.init]
            if t.data_type != TensorProto.FLOAT:
                raise Unsupported(f"weight {lazy.init!r} has element type "
                                  f"{TensorProto.DataType.Name(t.data_type)}; only float32 weights are supported")
            shape = tuple(reversed(lazy.shape)) if lazy.transpose else lazy.shape
            attrs = {"init": lazy.init} | ({"transpose": True} if lazy.transpose else {})
            self._weights[key] = self.rw.create("weight", [], [TensorType(ACT, shape)], attrs, lazy.init).result
        return self._weights[key]

    def const(self, s: Static, arr: np.ndarray, positions: bool) -> Value:
        """A constant operand: an initializer reference when possible, else folded data inline.
        With `positions`, row r of `arr` belongs to position r (a RoPE table, say): it becomes a
        `ctx`-row table of max_ctx rows."""
        if s.init and arr.shape == s.value.shape and not positions:
            return self.weight(Lazy(s.name, tuple(arr.shape)))
        if positions:
            arr = arr[: self.max_ctx]
        key = f"{s.name}:{arr.shape}"
        if key not in self._consts:
            data = base64.b64encode(np.ascontiguousarray(arr, dtype="<f4").tobytes()).decode()
            shape = (CTX, *arr.shape[1:]) if positions else arr.shape
            self._consts[key] = self.rw.create("const", [], [TensorType(ACT, shape)], {"data": data},
                                               s.name).result
        return self._consts[key]

    def position_table(self, s: Static, rows_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """The full per-position table of a constant whose rows follow the tokens.

        `rows_of` turns the ONNX value into a matrix with one row per token. Row r at the main
        binding must be row past + r of the table (the constant is a function of the position),
        with one more token too; otherwise one program cannot serve every length."""
        if s.table is None:
            raise Unsupported(f"constant {s.name!r} has no per-position form")
        table = rows_of(np.asarray(s.table))
        for value, n in ((s.value, self.n), (s.value2, self.n + 1)):
            if value is None:
                continue
            got = rows_of(np.asarray(value))
            want = table[self.past:self.past + n]
            if got.shape != want.shape or not np.array_equal(got, want):
                raise Unsupported(f"constant {s.name!r} changes with the sequence length in a way one compiled "
                                  "program cannot reproduce (it is not a function of the token position)")
        return table

    # ---- graph inputs and outputs --------------------------------------------------------

    def _input(self, name: str) -> Term:
        shape, seq = self.shape(name), self.seq_axes(name)
        et = self.f1.elem_types[name]
        onnx_shape = self.axis_names(name)
        core = [d for d in shape if d != 1]
        attrs = {"name": name, "onnx_dtype": _dtype_name(et), "onnx_shape": onnx_shape}
        if name in self.roles.caches:
            return self._cache_input(name, attrs)
        if name in self.roles.assumed:
            # a mask or positions input: its value is assumed (and checked when the program runs)
            rows = CTX if "ctx" in onnx_shape else SEQ
            attrs["assume"] = self.roles.assumed[name]
            self.rw.create("input", [], [TensorType("i32", (rows,))], attrs, name)
            return Static(name, self.f1.values[name], self.f2.values.get(name), False)
        if et in _INT and len(seq) == 1 and len(core) == 1:
            t = TensorType("i32", (SEQ,))
        elif et == TensorProto.FLOAT and len(seq) == 1 and seq[0] == len(shape) - 2 and len(core) == 2:
            t = TensorType(ACT, (SEQ, shape[-1]))
        else:
            raise CimcError(f"{self.model.path}: graph input {name!r} {onnx_shape} is not a token sequence "
                            "([1, seq] ids or [1, seq, hidden] floats); other inputs are not supported yet")
        base = self.rw.create("input", [], [t], attrs, name).result
        return self._view_of(base, shape)

    def _cache_input(self, name: str, attrs: dict) -> View:
        """A past KV input [1, kv_heads, past, head_dim]: the first `past` rows of a KV cache."""
        shape = self.shape(name)
        if len(shape) != 4 or shape[0] != 1 or self.axis_names(name)[2] != "past":
            raise CimcError(f"{self.model.path}: KV cache input {name!r} {self.axis_names(name)} is not "
                            "[batch, kv_heads, past, head_dim]")
        _, heads, past, hd = shape
        t = TensorType(ACT, (CTX, heads * hd))
        cache = self.rw.create("kv_cache", [], [t], {**attrs, "heads": heads}, name).result
        return View(cache, (Axis(1), Axis(heads, 0, hd), Axis(past, 1, 0), Axis(hd, 0, 1)))

    def _output(self, name: str) -> None:
        if name not in self.model.producer:
            raise CimcError(f"{self.model.path}: graph output {name!r} is a graph input or an initializer, not "
                            "computed by the model; only computed outputs are supported")
        term = self.env.get(name)
        if isinstance(term, Bad) or term is None:
            return
        if isinstance(term, Static):
            self.reasons[name] = f"graph output {name!r} does not depend on the input tokens (a constant)"
            return
        try:
            v = self.need_view(term, f"graph output {name!r}")
        except Poisoned:
            return
        except (Unsupported, ViewError) as e:
            self.reasons[name] = str(e)
            return
        attrs = {"name": name, "onnx_dtype": _dtype_name(self.f1.elem_types.get(name, 1)),
                 "onnx_shape": self.axis_names(name)}
        owner = v.base.owner
        if owner is not None and owner.name == "kv_append" and name in self.roles.caches.values():
            heads = int(v.axes[1].size)
            hd = int(v.axes[3].size)
            if v.r0 or v.c0 or v.axes[1:] != (Axis(heads, 0, hd), Axis(self._rows(v.base), 1, 0), Axis(hd, 0, 1)):
                self.reasons[name] = "the present KV output is not the whole cache as [1, kv_heads, ctx, head_dim]"
                return
            self.rw.create("output", [v.base], [], {**attrs, "heads": heads}, name)
            return
        if not self._is_plain(v):
            self.reasons[name] = "graph output is not a [1, seq, features] tensor"
            return
        self.rw.create("output", [v.base], [], attrs, name)

    # ---- visiting ------------------------------------------------------------------------

    def _visit(self, node: Node) -> None:
        outs = [o for o in node.outputs if o]
        if all(o in self.f1.values for o in outs):
            for o in outs:
                self.env[o] = self._static(o)
            return
        args = [self._term(i) for i in node.inputs]
        if any(isinstance(a, Bad) for a in args):
            for o in outs:
                self.env[o] = Bad(node)
            return
        try:
            conv = converters.find(node)
            if conv is not None:
                result: Term | tuple[Term, ...] = conv.lift(self, node, args)
            elif all(isinstance(a, (Lazy, QLazy, Static)) or a is None for a in args):
                result = self._weight_expr(node, args)
            else:
                handler = getattr(self, f"_on_{node.op_type}", None)
                if handler is None:
                    raise Unsupported(f"op {node.op_type} is not supported on activations")
                result = handler(node, args)
        except Poisoned:
            result = self._placeholder(node) or Bad(node)
        except (Unsupported, ViewError) as e:
            self.reasons[node.name] = str(e) or self.near_miss.get(node.name, "not supported")
            result = self._placeholder(node) or Bad(node)
        if isinstance(result, tuple):  # one term per output
            for o, term in zip(node.outputs, result, strict=False):
                if o:
                    self.env[o] = term
            return
        self.env[outs[0]] = result
        for o in outs[1:]:
            self.env[o] = Bad(node)

    def _placeholder(self, node: Node) -> View | None:
        """A stand-in activation for a node that failed, so the nodes after it are still checked
        and every unsupported node is reported at once (the module is discarded on failure)."""
        name = node.outputs[0]
        shape, seq = self.f1.shapes.get(name), self.seq_axes(name)
        if shape is None or len(seq) != 1 or shape[seq[0]] != self.n or \
                self.f1.elem_types.get(name) not in FLOAT_TYPES:
            return None
        lead = [d for i, d in enumerate(shape) if i < seq[0]]
        rest = [d for i, d in enumerate(shape) if i > seq[0]]
        if any(d != 1 for d in lead) or len([d for d in rest if d != 1]) > 1:
            return None
        cols = int(np.prod(rest)) if rest else 1
        base = self.rw.create("const", [], [TensorType(ACT, (SEQ, cols))], {"data": ""}, node.name).result
        return self._view_of(base, shape)

    def _term(self, name: str) -> Term | None:
        if not name:
            return None
        if name in self.env:
            return self.env[name]
        if self.model.is_weight(name) or (name in self.model.initializers and name not in self.f1.values):
            self.env[name] = Lazy(name, tuple(self.model.initializers[name].dims))  # kept on disk
        else:
            self.env[name] = self._static(name)
        return self.env[name]

    def _static(self, name: str) -> Static:
        return Static(name, self.f1.values[name], self.f2.values.get(name), name in self.model.initializers,
                      self.ftab.values.get(name))

    def _weight_expr(self, node: Node, args: list) -> Term:
        src = args[0]
        if node.op_type == "Transpose" and isinstance(src, (Lazy, QLazy)) and len(src.shape) == 2 \
                and list(node.attrs.get("perm", [1, 0])) == [1, 0]:
            return _transposed(src)
        if node.op_type == "Identity" and isinstance(src, QLazy):
            return src
        if node.op_type == "Reshape" and isinstance(src, Lazy) and not src.transpose \
                and self.model.initializers[src.init].data_type not in FLOAT_TYPES:
            return Lazy(src.init, self.shape(node.outputs[0]))  # packed integers a converter reads (row-major)
        if node.op_type in ("Identity", "Cast") and isinstance(src, Lazy):
            if node.op_type == "Cast" and node.attrs.get("to") != TensorProto.FLOAT:
                raise Unsupported("weights may only be cast to float32")
            return src
        raise Unsupported(f"{node.op_type} of a weight matrix is not supported (only Transpose)")

    def need_view(self, term: Term, what: str) -> View:
        """A term that must be an activation view; a pending Expr here means an idiom failed."""
        if isinstance(term, View):
            return term
        if isinstance(term, Expr):
            view = self._materialize(term)
            if view is not None:
                return view
            self._report_expr(term)
            raise Poisoned
        raise Unsupported(f"{what} must be an activation")

    def _materialize(self, e: Expr) -> View | None:
        """Lower a deferred elementwise expression on whole activations generically (it was
        deferred only in case an idiom such as RoPE would consume it)."""
        op = e.node.op_type
        if op not in _BINARY and op not in _UNARY:
            return None
        args = []
        for a in e.args:
            if isinstance(a, Expr):
                a = self._materialize(a)
            if not (isinstance(a, Static) or (isinstance(a, View) and self._is_plain(a))):
                return None
            args.append(a)
        view = (self._lower_binary if op in _BINARY else self._lower_unary)(e.node, args)
        self.env[e.node.outputs[0]] = view
        return view

    def _report_expr(self, e: Expr) -> None:
        stack = [e]
        while stack:
            x = stack.pop()
            if x.node.name not in self.reasons:
                self.reasons[x.node.name] = self.near_miss.get(
                    x.node.name, f"{x.node.op_type} on a head-split or intermediate tensor that no decoder "
                                 "idiom (RoPE, attention) consumed")
            stack += [a for a in x.args if isinstance(a, Expr)]

    # ---- layout ops ----------------------------------------------------------------------

    def _layout(self, node: Node, args: list, fn) -> Term:
        src = args[0]
        if isinstance(src, Expr):
            return Expr(node, args)
        return fn(self.need_view(src, "input"))

    def _on_Identity(self, node: Node, args: list) -> Term:
        return args[0]

    def _on_Cast(self, node: Node, args: list) -> Term:
        if isinstance(args[0], Expr):  # part of a chain an idiom may consume (quantize_dynamic's)
            return Expr(node, args)
        et = self.f1.elem_types.get(node.inputs[0])
        if node.attrs.get("to") == TensorProto.FLOAT and et in FLOAT_TYPES:
            return args[0]
        raise Unsupported("Cast of an activation to another element type is not supported")

    def _on_Reshape(self, node: Node, args: list) -> Term:
        return self._layout(node, args, lambda v: V.reshape(v, self.shape(node.outputs[0])))

    _on_Flatten = _on_Reshape

    def _on_Transpose(self, node: Node, args: list) -> Term:
        rank = len(self.shape(node.inputs[0]))
        perm = list(node.attrs.get("perm", reversed(range(rank))))
        return self._layout(node, args, lambda v: V.transpose(v, perm))

    def _axes(self, node: Node, args: list) -> list[int] | None:
        if "axes" in node.attrs:
            return list(node.attrs["axes"])
        if len(args) > 1 and isinstance(args[1], Static):
            return [int(a) for a in np.asarray(args[1].value).ravel()]
        return None

    def _on_Unsqueeze(self, node: Node, args: list) -> Term:
        axes = self._axes(node, args) or []
        return self._layout(node, args, lambda v: V.unsqueeze(v, axes))

    def _on_Squeeze(self, node: Node, args: list) -> Term:
        axes = self._axes(node, args)
        return self._layout(node, args, lambda v: V.squeeze(v, axes))

    def _on_Expand(self, node: Node, args: list) -> Term:
        return self._layout(node, args, lambda v: V.expand(v, self.shape(node.outputs[0])))

    def _on_Slice(self, node: Node, args: list) -> Term:
        if not all(isinstance(a, Static) for a in args[1:] if a is not None):
            raise Unsupported("Slice bounds must be known at compile time")
        shape = self.shape(node.inputs[0])
        starts, ends = (np.asarray(args[i].value).ravel() for i in (1, 2))
        axes = np.asarray(args[3].value).ravel() if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = np.asarray(args[4].value).ravel() if len(args) > 4 and args[4] is not None else [1] * len(starts)
        if any(int(s) != 1 for s in steps):
            raise Unsupported("Slice with a step other than 1 is not supported on activations")

        def apply(v: View) -> View:
            for st, en, ax in zip(starts, ends, axes, strict=True):
                if not -len(shape) <= int(ax) < len(shape):
                    raise Unsupported(f"Slice axis {int(ax)} is out of range for a rank-{len(shape)} input")
                ax = int(ax) % len(shape)
                lo, hi, _ = slice(int(st), int(en)).indices(shape[ax])
                v = V.slice_axis(v, ax, lo, max(0, hi - lo))
            return v

        return self._layout(node, args, apply)

    # ---- embedding and linear ------------------------------------------------------------

    def _on_Gather(self, node: Node, args: list) -> Term:
        table, ids = args
        if node.attrs.get("axis", 0) != 0 or not isinstance(table, (Lazy, QLazy, Static)):
            raise Unsupported("only Gather of table rows by token id (axis 0 of a constant table) is supported")
        lazy = Lazy(table.name, table.value.shape) if isinstance(table, Static) else table
        if len(lazy.shape) != 2 or lazy.transpose:
            raise Unsupported("the embedding table must be a [vocab, hidden] initializer")
        if isinstance(lazy, QLazy):
            dq = lazy.dq
            return self.embedding(node, ids, self.dequantized_table(lazy.init, dq.scales, dq.zero_points, dq.axis,
                                                                    dq.block))
        if _dtype_name(self.model.initializers[lazy.init].data_type) in ONNX_INTS:  # quantize_dynamic's table
            self.near_miss[node.name] = f"Gather of the integer table {lazy.init!r} must be followed by the " \
                                        "DequantizeLinear that dequantizes it"
            return Expr(node, args)
        return self.embedding(node, ids, self.weight(lazy))

    def embedding(self, node: Node, ids: Term, table: Value) -> View:
        """`embedding(ids, table)` for `node`, whose first output it becomes."""
        idv = self.need_view(ids, "indices")
        if idv.base.type.dtype != "i32" or not self._is_plain(idv):
            raise Unsupported("Gather indices must be the token ids")
        out = self._op("embedding", [idv.base, table], node.name)
        return self._view_of(out, self.shape(node.outputs[0]))

    def dequantized_table(self, init: str, scales: str, zero_points: str, axis: int, block: int) -> Value:
        """A float `weight` of the integer initializer `init` dequantized at compile time (format
        `dequantize`, see cimc.ir.quant), one per distinct set of attributes."""
        attrs = {"init": init, "format": "dequantize", "scales": scales, "axis": axis} | \
            ({"zero_points": zero_points} if zero_points else {}) | ({"block": block} if block else {})
        for op in self.module.walk("weight"):
            if op.attrs == attrs:
                return op.result
        shape = tuple(self.model.initializers[init].dims)
        return self.rw.create("weight", [], [TensorType(ACT, shape)], attrs, init).result

    def qweight(self, attrs: dict, wt: str, shape: tuple[int, int], loc: str) -> Value:
        """The `qweight` with these attributes, type and [K, N] shape (one per distinct set, shared
        by the nodes using it)."""
        t = TensorType(wt, shape)
        for op in self.module.walk("qweight"):
            if op.attrs == attrs and op.result.type == t:
                return op.result
        return self.rw.create("qweight", [], [t], attrs, loc).result

    def _dequantized(self, q: QLazy) -> Value:
        """The `qweight` (format `dequantizelinear`) a MatMul or Gemm takes from a DequantizeLinear:
        scales per tensor, per output column, or in blocks along the reduction axis; anything else
        the macros' per-column scales cannot hold is refused, naming the node and the value."""
        where, dq = f"weight {q.init!r} of DequantizeLinear {q.node.name!r}", q.dq
        if len(q.shape) != 2:
            raise Unsupported(f"{where} has shape {list(q.shape)}; a MatMul weight must be a matrix")
        k_axis = 1 if q.transpose else 0
        k, n = reversed(q.shape) if q.transpose else q.shape
        if dq.per_tensor:
            group = 0
        elif dq.block:
            if dq.axis != k_axis:
                raise Unsupported(f"{where} has blocks of {dq.block} along axis {dq.axis}, the output axis of "
                                  f"[K={k}, N={n}]; blocks must run along the reduction axis K")
            group = dq.block
        elif dq.axis == k_axis:
            raise Unsupported(f"{where} has one scale per row of the reduction axis (axis {dq.axis} is K={k}); the "
                              "macros scale each output column (or block of K rows), so quantize per output "
                              "channel or in blocks along K")
        else:
            group = 0
        zero = self.weights(dq.zero_points) if dq.zero_points else None
        attrs = {"init": q.init, "format": "dequantizelinear", "group": group, "scale_type": ACT,
                 "scales": dq.scales} | ({"zero_points": dq.zero_points} if dq.zero_points else {}) \
            | ({"transpose": True} if q.transpose else {})
        return self.qweight(attrs, held_type(dq.dtype, zero), (int(k), int(n)), q.init)

    def _linear(self, node: Node, x: Term, w: Term, bias: Term | None) -> Term:
        if isinstance(w, QLazy):  # weight-only QDQ: the graph computes in float on the dequantized weights
            return self.linear(node, x, self._dequantized(w), bias, {"act": ACT})
        if isinstance(w, Static) and w.init and w.value.ndim == 2:
            w = Lazy(w.name, w.value.shape)
        if not isinstance(w, Lazy) or len(w.shape) != 2:
            raise Unsupported("MatMul weight must be a 2-D initializer (or its Transpose)")
        return self.linear(node, x, self.weight(w), bias)

    def linear(self, node: Node, x: Term, w: Value, bias: Term | None, attrs: dict | None = None) -> View:
        """`linear(x, w (+ bias))` for `node`, whose first output it becomes; x must be a
        [tokens, features] activation with as many features as w has rows."""
        xv = self.need_view(x, "input")
        if not self._is_plain(xv):
            raise Unsupported(f"{node.op_type} input is not a [tokens, features] activation")
        k, n = w.type.shape
        if xv.base.type.shape[1] != k:
            raise Unsupported(f"the input has {xv.base.type.shape[1]} features but the weight has {k} rows")
        operands = [xv.base, w]
        if bias is not None:
            operands.append(self._row_vector(bias, n))
        out = self._op("linear", operands, node.name, attrs)
        return self._view_of(out, self.shape(node.outputs[0]))

    def _row_vector(self, term: Term, n: object) -> Value:
        if not isinstance(term, Static) or term.value.size != n:
            raise Unsupported(f"bias must be a constant vector of {n} values")
        return self.const(term, np.asarray(term.value, np.float32).reshape(-1), False)

    def _on_MatMul(self, node: Node, args: list) -> Term:
        a, b = args
        if isinstance(b, (Lazy, QLazy, Static)):
            return self._linear(node, a, b, None)
        expr = Expr(node, args)
        matched = self._match_attention(expr)
        return matched if matched is not None else expr

    def _on_Gemm(self, node: Node, args: list) -> Term:
        at = node.attrs
        if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0:
            raise Unsupported("Gemm with transA, alpha or beta is not supported")
        w = args[1]
        if at.get("transB", 0):
            if not isinstance(w, (Lazy, QLazy)):
                raise Unsupported("Gemm weight must be an initializer")
            w = _transposed(w)
        return self._linear(node, args[0], w, args[2] if len(args) > 2 else None)

    # ---- elementwise ---------------------------------------------------------------------

    def _plain(self, t: Term) -> View | None:
        return t if isinstance(t, View) and self._is_plain(t) else None

    def _static_operand(self, s: Static, like: View, out_name: str) -> Value | float:
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
            return self.const(s, mat.reshape(-1).astype(np.float32), False)
        if row_ax not in self.seq_axes(out_name) and like.base.type.shape[0] == SEQ:
            raise Unsupported(f"constant {s.name!r} has a per-token axis that does not follow the sequence length")
        return self.const(s, self.position_table(s, rows_of).astype(np.float32), True)

    def _binary(self, node: Node, args: list) -> Term:
        """Lower now, or defer: operands on head-split views, and x * (per-position table),
        which may be half of a RoPE (materialised generically if no idiom takes it)."""
        if any(isinstance(t, Expr) or (isinstance(t, View) and self._plain(t) is None) for t in args):
            return Expr(node, args)
        if node.op_type == "Mul" and any(isinstance(t, Static) and t.value2 is not None
                                         and t.value2.shape != t.value.shape for t in args):
            return Expr(node, args)
        return self._lower_binary(node, args)

    def _lower_binary(self, node: Node, args: list) -> View:
        a, b = args
        name = _BINARY[node.op_type]
        out_shape = self.shape(node.outputs[0])
        pa, pb = self._plain(a), self._plain(b)
        if pa is not None and pb is not None:
            ra, rb = pa.base.type.shape[0], pb.base.type.shape[0]
            if ra != rb and 1 not in (ra, rb):
                raise Unsupported("operands have different token counts")
            return self._view_of(self._op(name, [pa.base, pb.base], node.name), out_shape)
        for plain, other, left in ((pa, b, True), (pb, a, False)):
            if plain is None or not isinstance(other, Static) or out_shape != plain.shape:
                continue
            c = self._static_operand(other, plain, node.outputs[0])
            return self._view_of(self._with_const(name, plain.base, c, left, node.name), out_shape)
        raise Unsupported(f"{node.op_type} of these operands is not supported")

    def _with_const(self, name: str, x: Value, c: Value | float, x_left: bool, loc: str) -> Value:
        if isinstance(c, Value):
            return self._op(name, [x, c] if x_left else [c, x], loc)
        affine = {("add", True): (1.0, c), ("add", False): (1.0, c), ("mul", True): (c, 0.0),
                  ("mul", False): (c, 0.0), ("sub", True): (1.0, -c), ("sub", False): (-1.0, c)}
        if (name, x_left) in affine:
            alpha, beta = affine[(name, x_left)]
            return self._op("affine", [x], loc, {"alpha": float(alpha), "beta": float(beta)})
        if name == "div" and x_left:
            return self._op("affine", [x], loc, {"alpha": float(1.0 / c), "beta": 0.0})
        if name == "div":
            r = self._op("reciprocal", [x], loc)
            return r if c == 1.0 else self._op("affine", [r], loc, {"alpha": float(c), "beta": 0.0})
        arr = np.array([c], np.float32)
        cv = self.const(Static(f"{loc}:scalar", arr, None, False), arr, False)
        return self._op(name, [x, cv] if x_left else [cv, x], loc)

    def _on_Add(self, node: Node, args: list) -> Term:
        term = self._binary(node, args)
        if isinstance(term, Expr):
            rope = self._match_rope(term)
            if rope is not None:
                return rope
        return term

    def _on_Mul(self, node: Node, args: list) -> Term:
        term = self._binary(node, args)
        if isinstance(term, Expr):
            for rule in converters.IDIOMS.get("Mul", []):
                matched = rule(self, term)
                if matched is not None:
                    return matched
        return term

    _on_Sub = _on_Div = _on_Max = _binary

    def _unary(self, node: Node, args: list) -> Term:
        if isinstance(args[0], Expr) or (isinstance(args[0], View) and self._plain(args[0]) is None):
            return Expr(node, args)
        return self._lower_unary(node, args)

    def _lower_unary(self, node: Node, args: list) -> View:
        p = self._plain(args[0])
        if p is None:
            raise Unsupported(f"{node.op_type} input must be an activation")
        return self._view_of(self._op(_UNARY[node.op_type], [p.base], node.name), self.shape(node.outputs[0]))

    _on_Neg = _on_Exp = _on_Sqrt = _on_Reciprocal = _on_Sigmoid = _on_Tanh = _unary

    def _on_Pow(self, node: Node, args: list) -> Term:
        p, e = self._plain(args[0]), args[1]
        if p is None or not isinstance(e, Static) or np.asarray(e.value).size != 1:
            raise Unsupported("Pow is supported for an activation raised to a constant scalar")
        k = float(np.asarray(e.value).ravel()[0])
        loc, shape = node.name, self.shape(node.outputs[0])
        if k == 2.0:
            return self._view_of(self._op("mul", [p.base, p.base], loc), shape)
        ops = {1.0: [], 0.5: ["sqrt"], -1.0: ["reciprocal"], -0.5: ["rsqrt"]}.get(k)
        if ops is None:
            raise Unsupported(f"Pow with exponent {k} is not supported (2, 1, 0.5, -0.5, -1 are)")
        out = p.base
        for name in ops:
            out = self._op(name, [out], loc)
        return self._view_of(out, shape)

    def _reduce(self, node: Node, args: list) -> Term:
        p = self._plain(args[0])
        axes = self._axes(node, args)
        rank = len(self.shape(node.inputs[0]))
        if p is None or axes is None or [a % rank for a in axes] != [rank - 1]:
            raise Unsupported(f"{node.op_type} is supported over the last (feature) axis of an activation")
        out = self._op(_REDUCE[node.op_type], [p.base], node.name)
        return self._view_of(out, self.shape(node.outputs[0]))

    _on_ReduceMean = _on_ReduceSum = _on_ReduceMax = _reduce

    def _on_Softmax(self, node: Node, args: list) -> Term:
        rank = len(self.shape(node.inputs[0]))
        if node.attrs.get("axis", -1) % rank != rank - 1:
            raise Unsupported("Softmax is supported over the last axis")
        p = self._plain(args[0])
        if p is None:
            return Expr(node, args)
        return self._view_of(self._op("softmax", [p.base], node.name), self.shape(node.outputs[0]))

    def _deferred(self, node: Node, args: list) -> Term:
        return Expr(node, args)

    _on_Where = _on_IsNaN = _deferred

    def _on_Concat(self, node: Node, args: list) -> Term:
        """Concat(past KV, new KV) along the position axis is a cache append; others wait (RoPE)."""
        past = args[0]
        if isinstance(past, View) and past.base.owner is not None and past.base.owner.name == "kv_cache":
            new = self.need_view(args[1], "new keys or values") if len(args) == 2 else None
            rank = len(past.shape)
            if new is None or node.attrs.get("axis", 0) % rank != 2 or new.r0 or new.c0 or \
                    new.axes[1:] != (past.axes[1], Axis(self.n, 1, 0), past.axes[3]) or \
                    new.base.type.shape[1] != past.base.type.shape[1]:
                raise Unsupported("only Concat(past, new) of a KV cache along its position axis is supported")
            out = self._op("kv_append", [past.base, new.base], node.name)
            return View(out, (Axis(1), past.axes[1], Axis(self.n + self.past, 1, 0), past.axes[3]))
        return Expr(node, args)

    # ---- idiom: rotary embedding ---------------------------------------------------------

    def _match_rope(self, add: Expr) -> View | None:
        """x*cos + rotate_half(x)*sin, either operand order. Records why a candidate (an Add of
        two products) did not match, keeping the most specific reason."""
        reasons: list[str] = []
        for m1, m2 in (add.args, add.args[::-1]):
            xc = _split_mul(m1, View)
            rs = _split_mul(m2, Expr)
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
                tables = [self._rope_table(t, x, add.node) for t in (cos, sin)]
                base = self._heads_base(x, hd)
            except Unsupported as e:
                reasons.append(str(e))
                continue
            out = self._op("rope", [base, *tables], add.node.name, {"head_dim": hd})
            return View(out, x.axes)
        if reasons:
            self.near_miss[add.node.name] = f"RoPE idiom: {reasons[-1]}"
        elif all(isinstance(a, Expr) and a.node.op_type == "Mul" for a in add.args):
            self.near_miss[add.node.name] = "RoPE idiom: Add of products is not x*cos + rotate_half(x)*sin"
        return None

    def _heads_base(self, x: View, hd: int) -> Value:
        core = sorted(x.core(), key=lambda a: (a.rs, a.cs))
        cols = int(x.base.type.shape[1]) if x.base.type.rank == 2 else 1
        want = sorted([a for a in (Axis(hd, 0, 1), Axis(cols // hd, 0, hd), Axis(self.n, 1, 0)) if a.size != 1],
                      key=lambda a: (a.rs, a.cs))
        if x.r0 or x.c0 or cols % hd or core != want:
            raise Unsupported("RoPE input is not a whole [tokens, heads*head_dim] activation split into heads")
        return x.base

    def _rope_table(self, s: Static, x: View, node: Node) -> Value:
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

        return self.const(s, np.ascontiguousarray(self.position_table(s, rows_of)), True)

    # ---- idiom: attention ----------------------------------------------------------------

    def _match_attention(self, mm: Expr) -> View | None:
        why = self.near_miss
        p, v = mm.args
        p = _strip_nan_guard(p)
        if not (isinstance(p, Expr) and p.node.op_type == "Softmax"):
            return None
        node = mm.node
        try:
            z = p.args[0]
            z, mask = self._strip_mask(z)
            scale = 1.0
            y, s = _strip_scalars(z)
            scale *= s
            if not (isinstance(y, Expr) and y.node.op_type == "MatMul"):
                raise Unsupported("softmax input is not a (scaled) MatMul of queries and keys")
            a, sa = _strip_scalars(y.args[0])
            b, sb = _strip_scalars(y.args[1])
            scale *= sa * sb
            if not (isinstance(a, View) and isinstance(b, View) and isinstance(v, View)):
                raise Unsupported("attention operands are not head-split views of q, k and v")
            heads, hd, q = self._attn_operand(a, "q", seq_last=False)
            kvh, hdk, k = self._attn_operand(b, "k", seq_last=True)
            kvh_v, hdv, vv = self._attn_operand(v, "v", seq_last=False)
            if hdk != hd or hdv != hd or kvh != kvh_v:
                raise Unsupported("q, k and v disagree on head_dim or kv heads")
            if mask is None:
                raise Unsupported("attention has no causal mask (bidirectional attention is not supported)")
            self._check_causal(mask)
        except Unsupported as e:
            why[node.name] = f"attention idiom: {e}"
            for part in (p, *(p.args if isinstance(p, Expr) else [])):
                if isinstance(part, Expr):
                    why.setdefault(part.node.name, f"part of attention at {node.name}: {e}")
            return None
        attrs = {"heads": heads, "kv_heads": kvh, "head_dim": hd, "scale": float(np.float32(scale)), "causal": True}
        out = self._op("attention", [q, k, vv], node.name, attrs)
        head_axes = [Axis(heads, 0, hd), Axis(self.n, 1, 0), Axis(hd, 0, 1)]
        return View(out, tuple([Axis(1)] * (len(a.shape) - 3) + head_axes))

    def _attn_operand(self, x: View, what: str, seq_last: bool) -> tuple[int, int, Value]:
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

    def _strip_mask(self, z: Term) -> tuple[Term, Static | None]:
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

    def _check_causal(self, mask: Static) -> None:
        """The mask must be [seq, past + seq]: 0 where key j <= past + query i, very negative after."""
        for arr in (mask.value, mask.value2):
            if arr is None:
                continue
            m = np.asarray(arr, np.float64)
            m = m.reshape(m.shape[-2:]) if prod(m.shape[:-2]) == 1 else None
            if m is None or m.shape[1] - m.shape[0] != self.past:
                raise Unsupported(f"mask {mask.name!r} is not one [seq, past+seq] matrix shared by all heads")
            upper = np.triu(np.ones(m.shape, bool), 1 + self.past)
            if np.any(m[~upper] != 0) or np.any(m[upper] > -1e4):
                raise Unsupported(f"mask {mask.name!r} is not causal (0 on and below the diagonal, "
                                  "very negative above)")


def _transposed(w: Lazy | QLazy) -> Lazy | QLazy:
    """The transposed view of a weight left on disk."""
    return Lazy(w.init, w.shape, not w.transpose) if isinstance(w, Lazy) else replace(w, transpose=not w.transpose)


def _split_mul(t: Term, kind: type) -> tuple | None:
    """(x, static) if `t` is Mul(x, static) with x of `kind`."""
    if not (isinstance(t, Expr) and t.node.op_type == "Mul"):
        return None
    a, b = t.args
    if isinstance(a, kind) and isinstance(b, Static):
        return a, b
    if isinstance(b, kind) and isinstance(a, Static):
        return b, a
    return None


def _scalar(t: Term) -> float | None:
    if isinstance(t, Static) and np.asarray(t.value).size == 1:
        return float(np.asarray(t.value).ravel()[0])
    return None


def _strip_scalars(t: Term) -> tuple[Term, float]:
    """Peel Mul/Div by constant scalars: returns (inner term, accumulated factor)."""
    factor = 1.0
    while isinstance(t, Expr) and t.node.op_type in ("Mul", "Div"):
        a, b = t.args
        if _scalar(b) is not None:
            factor = factor * _scalar(b) if t.node.op_type == "Mul" else factor / _scalar(b)
            t = a
        elif t.node.op_type == "Mul" and _scalar(a) is not None:
            factor *= _scalar(a)
            t = b
        else:
            break
    return t, factor


def _strip_nan_guard(t: Term) -> Term:
    """`Where(IsNaN(p), 0, p)` -> p (exporters guard fully masked rows; causal rows never are)."""
    if isinstance(t, Expr) and t.node.op_type == "Where":
        cond, zero, p = t.args
        if isinstance(cond, Expr) and cond.node.op_type == "IsNaN" and cond.args[0] is p and _scalar(zero) == 0.0:
            return p
    return t


def _dtype_name(et: int) -> str:
    """"float", "int64", ...: the ONNX element type's name."""
    return TensorProto.DataType.Name(et).lower()
