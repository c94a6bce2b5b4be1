"""Lift an analyzed ONNX graph to the IR: the traversal, and the services converters call.

Nodes are visited in topological order; each is lifted by the converter registered for its
domain, op type and opset (`converters.find`; the converter modules are `cimc/frontend/ops/`).
Each ONNX value becomes a *term*:
  - `View`: a strided view of an IR value (layout ops like Reshape/Transpose only re-view);
  - `Static`: a value known at compile time (folded, or a small initializer);
  - `Lazy`: a weight matrix (an initializer, maybe transposed) left on disk;
  - `QLazy`: integer weights a DequantizeLinear dequantizes, left on disk (a `qweight` where a
    MatMul or Gemm takes them, a float table dequantized at compile time where a Gather does);
  - `Expr`: an op that cannot be lowered on its own (it works on a head-split view, or is part
    of attention); it waits for an idiom rule to consume it;
  - `Bad`: a value that cannot be compiled (its node's reason is recorded; or, for an output a
    converter does not produce, such as a norm's statistics, `reason`, recorded where it is used).
When a converter defers its node (an `Expr`), the frontend's idiom rules anchored at its op type
are tried (`cimc.ir.rules`, level "onnx": RoPE at its final Add, attention at the
`MatMul(softmax, V)`, quantize_dynamic's MatMulInteger chain at its final Mul). A rule that does
not match records why, so an unsupported model gets one error listing every node that could not
be compiled and the near-miss reasons.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from onnx import TensorProto

from cimc.frontend import converters
from cimc.frontend import views as V
from cimc.frontend.converters import Unsupported, no_weights
from cimc.frontend.fold import Facts, Roles
from cimc.frontend.model import FLOAT_TYPES, Node, OnnxModel, cannot_compile
from cimc.frontend.views import Axis, View, ViewError
from cimc.ir.core import CTX, SEQ, Module, Rewriter, TensorType, Value
from cimc.ir.ops import OPS
from cimc.ir.rules import NoMatch, rules
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
    probe: np.ndarray | None = None  # a mask's value at the mask-probe binding (`Lifter.fmask`)


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
    reason: str = ""  # why this output of a node that lifted is not produced (reported if used)


Term = View | Static | Lazy | QLazy | Expr | Bad


def unproduced(node: Node, index: int, what: str) -> Bad:
    """Output `index` of `node` (`what`, say a norm's mean), which its converter does not produce."""
    name = node.outputs[index] if index < len(node.outputs) else ""
    return Bad(node, f"its {what} output {name!r} is not produced (only graphs that do not use it compile)")

_INT = {TensorProto.INT64, TensorProto.INT32}


class Lifter:
    """Builds the IR module for one model; see the module docstring."""

    def __init__(self, model: OnnxModel, facts: dict[str, Facts], roles: Roles, max_seq: int, max_ctx: int,
                 name: str, weights: Callable[[str], np.ndarray]) -> None:
        # facts: "main" (seq and past >= 2 and distinct, so no such axis looks like a size-1
        # axis), "seq" (one more token), "past" (more cached tokens; exports with a cache only),
        # "table" (max_ctx tokens, nothing cached: every position of a position table), "mask"
        # (fold.mask_probe: where a sliding window of up to max_ctx keys shows; graphs with masks).
        self.model, self.roles, self.max_ctx = model, roles, max_ctx
        self.weights = weights  # reads an initializer kept on disk (zero points, to pick a weight type)
        self.f1, self.f2, self.fpast, self.ftab = facts["main"], facts["seq"], facts.get("past"), facts["table"]
        self.fmask = facts.get("mask")
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

    def op(self, name: str, operands: list[Value], loc: str, attrs: dict | None = None) -> Value:
        """Create an op whose result type follows from its operands (the op's type rule)."""
        types = OPS[name].infer([v.type for v in operands], attrs or {})
        return self.rw.create(name, operands, types, attrs, loc).result

    def view_of(self, base: Value, onnx_shape: tuple[int, ...]) -> View:
        return V.reshape(View(base, tuple(V.base_axes(base, self._rows(base)))), onnx_shape)

    def is_plain(self, v: View) -> bool:
        """Whether `v` is its base value as a whole [tokens, features] activation."""
        return V.is_canonical(v, self._rows(v.base))

    def plain(self, t: Term) -> View | None:
        """`t` if it is a whole [tokens, features] activation, else None."""
        return t if isinstance(t, View) and self.is_plain(t) else None

    def activation(self, t: Term, what: str) -> View:
        """`t` as a whole [tokens, features] activation (a deferred expression lowered), or
        Unsupported naming `what`."""
        v = self.need_view(t, what)
        if not self.is_plain(v):
            raise Unsupported(f"{what} is not a [tokens, features] activation")
        return v

    def vector(self, t: Term, what: str, n: object) -> Value:
        """The constant operand of a constant vector of `n` values (a scale, a bias), or
        Unsupported naming `what` and the shape it has."""
        if isinstance(t, Lazy):
            raise Unsupported(f"{what} {t.init!r} must be a vector of {n} values, got {list(t.shape)}")
        if not isinstance(t, Static) or np.asarray(t.value).size != n:
            shape = list(np.asarray(t.value).shape) if isinstance(t, Static) else "an activation"
            raise Unsupported(f"{what} must be a constant vector of {n} values, got {shape}")
        return self.const(t, np.asarray(t.value, np.float32).reshape(-1), False)

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
        attrs = {"name": name, "onnx_dtype": dtype_name(et), "onnx_shape": onnx_shape}
        if name in self.roles.caches:
            return self._cache_input(name, attrs)
        if name in self.roles.assumed:
            # a mask or positions input: its value is assumed (and checked when the program runs)
            rows = CTX if "ctx" in onnx_shape else SEQ
            attrs["assume"] = self.roles.assumed[name]
            self.rw.create("input", [], [TensorType("i32", (rows,))], attrs, name)
            return Static(name, self.f1.values[name], self.f2.values.get(name), False, self.ftab.values.get(name))
        if et in _INT and len(seq) == 1 and len(core) == 1:
            t = TensorType("i32", (SEQ,))
        elif et == TensorProto.FLOAT and len(seq) == 1 and seq[0] == len(shape) - 2 and len(core) == 2:
            t = TensorType(ACT, (SEQ, shape[-1]))
        else:
            raise CimcError(f"{self.model.path}: graph input {name!r} {onnx_shape} is not a token sequence "
                            "([1, seq] ids or [1, seq, hidden] floats); other inputs are not supported yet")
        base = self.rw.create("input", [], [t], attrs, name).result
        return self.view_of(base, shape)

    def _cache_input(self, name: str, attrs: dict) -> View:
        """A past KV input [1, kv_heads, past, head_dim]: the first `past` rows of a KV cache; a
        window buffer [1, kv_heads, W, head_dim] holds its last W (for its attention op alone)."""
        shape = self.shape(name)
        positions = self.roles.windows.get(name, "past")
        if len(shape) != 4 or shape[0] != 1 or self.axis_names(name)[2] != positions:
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
            self._used(term)
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
        attrs = {"name": name, "onnx_dtype": dtype_name(self.f1.elem_types.get(name, 1)),
                 "onnx_shape": self.axis_names(name)}
        owner = v.base.owner
        if owner is not None and owner.name == "kv_append" and name in self.roles.caches.values():
            heads = int(v.axes[1].size)
            hd = int(v.axes[3].size)
            rows = self.roles.windows.get(name) or self._rows(v.base)  # a window buffer: the last W rows
            if v.r0 or v.c0 or v.axes[1:] != (Axis(heads, 0, hd), Axis(rows, 1, 0), Axis(hd, 0, 1)):
                self.reasons[name] = "the present KV output is not the whole cache as [1, kv_heads, ctx, head_dim]"
                return
            self.rw.create("output", [v.base], [], {**attrs, "heads": heads}, name)
            return
        if not self.is_plain(v):
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
            for a in args:
                self._used(a)
            for o in outs:
                self.env[o] = Bad(node)
            return
        try:
            conv = self.converter(node)
            weights_only = all(isinstance(a, (Lazy, QLazy, Static)) or a is None for a in args)
            if conv is None:
                if weights_only:
                    no_weights(self, node, args)
                raise Unsupported(f"op {node.op_type} is not supported on activations")
            if weights_only and conv.weights is not None:
                result: Term | tuple[Term, ...] = conv.weights(self, node, args)
            else:
                result = conv.lift(self, node, args)
            if isinstance(result, Expr) and result.node is node:
                result = self.apply_rules(result)
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

    def _used(self, term: Term | None) -> None:
        """Record why a value a converter does not produce cannot be used (once, at its node)."""
        if isinstance(term, Bad) and term.reason:
            self.reasons.setdefault(term.node.name, term.reason)

    def converter(self, node: Node) -> converters.Converter | None:
        """The converter that lifts `node`."""
        return converters.find(self.model, node)

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
        return self.view_of(base, shape)

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
                      self.ftab.values.get(name), self.fmask.values.get(name) if self.fmask else None)

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
        conv = converters.find(self.model, e.node)
        if conv is None or conv.materialize is None:
            return None
        args = []
        for a in e.args:
            if isinstance(a, Expr):
                a = self._materialize(a)
            if not (isinstance(a, Static) or (isinstance(a, View) and self.is_plain(a))):
                return None
            args.append(a)
        view = conv.materialize(self, e.node, args)
        self.env[e.node.outputs[0]] = view
        return view

    def apply_rules(self, expr: Expr) -> Term:
        """What the first frontend idiom rule anchored at `expr`'s op type that matches makes of
        it, else `expr`; each near miss is recorded for the cannot-compile error."""
        for rule in rules("onnx", expr.node.op_type):
            got = rule.match(self, expr)
            if isinstance(got, NoMatch):
                self.near_miss[expr.node.name] = f"{rule.name} idiom: {got.reason}"
                for part in got.parts:
                    self.near_miss.setdefault(part, f"part of {rule.name} at {expr.node.name}: {got.reason}")
            elif got is not None:
                return got
        return expr

    def _report_expr(self, e: Expr) -> None:
        stack = [e]
        while stack:
            x = stack.pop()
            if x.node.name not in self.reasons:
                self.reasons[x.node.name] = self.near_miss.get(
                    x.node.name, f"{x.node.op_type} on a head-split or intermediate tensor that no decoder "
                                 "idiom (RoPE, attention) consumed")
            stack += [a for a in x.args if isinstance(a, Expr)]

    def embedding(self, node: Node, ids: Term, table: Value) -> View:
        """`embedding(ids, table)` for `node`, whose first output it becomes."""
        idv = self.need_view(ids, "indices")
        if idv.base.type.dtype != "i32" or not self.is_plain(idv):
            raise Unsupported("Gather indices must be the token ids")
        out = self.op("embedding", [idv.base, table], node.name)
        return self.view_of(out, self.shape(node.outputs[0]))

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

    def linear(self, node: Node, x: Term, w: Value, bias: Term | None, attrs: dict | None = None) -> View:
        """`linear(x, w (+ bias))` for `node`, whose first output it becomes; x must be a
        [tokens, features] activation with as many features as w has rows."""
        xv = self.activation(x, f"{node.op_type} input")
        k, n = w.type.shape
        if xv.base.type.shape[1] != k:
            raise Unsupported(f"the input has {xv.base.type.shape[1]} features but the weight has {k} rows")
        operands = [xv.base, w]
        if bias is not None:
            operands.append(self.vector(bias, "bias", n))
        out = self.op("linear", operands, node.name, attrs)
        return self.view_of(out, self.shape(node.outputs[0]))


def transposed(w: Lazy | QLazy) -> Lazy | QLazy:
    """The transposed view of a weight left on disk."""
    return Lazy(w.init, w.shape, not w.transpose) if isinstance(w, Lazy) else replace(w, transpose=not w.transpose)



def dtype_name(et: int) -> str:
    """"float", "int64", ...: the ONNX element type's name."""
    return TensorProto.DataType.Name(et).lower()
