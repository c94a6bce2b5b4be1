"""Op definitions: operands, attributes and type rules, declared once per op.

The verifier, printer and parser read these declarations, so a new op needs no printing or
parsing code. `infer` computes result types from operand types and attributes; the frontend
uses it to build ops and the verifier to check them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cimc.ir.core import CTX, SEQ, Dim, Op, TensorType
from cimc.ir.quant import QUANT_TYPES
from isa.dtypes import ACT, IDS
from isa.program import fixed_matrix

#: How a linear's inputs enter the macros (its `act`): float, dynamic symmetric int8 per token and
#: weight scale group, or onnxruntime's DynamicQuantizeLinear (asymmetric uint8 over the whole input).
ACTS = ("f32", "i8", "u8")


class TypeRuleError(ValueError):
    """Operands or attributes an op's type rule rejects."""


ATTR_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (float, int), "str": (str,), "bool": (bool,), "list": (list,), "dict": (dict,),
}


@dataclass(frozen=True)
class OpDef:
    """Declaration of one op.

    `operands` names the operands; a trailing `?` marks an optional last operand. `attrs` maps
    required attribute names to a type name of `ATTR_TYPES`; `optional` the same for optional
    ones (passes add annotations such as `layer`, `tiling`, `stages`, `mem` that any op may
    carry, listed in `ANNOTATIONS`). The traits say what the op is, for every pass: the `unit`
    its work runs on (`UNITS`), and whether its value is a compile-time `constant` (stored in
    the DRAM image), `state` kept from one run to the next, part of the program's `interface`
    (kept even when unused), or whether it has an `effect` beyond its result; a `norm` normalises each
    row (a decoder block starts at one).
    """

    name: str
    operands: tuple[str, ...]
    infer: Callable[[Sequence[TensorType], dict], list[TensorType]]
    doc: str
    attrs: dict[str, str] = field(default_factory=dict)
    optional: dict[str, str] = field(default_factory=dict)
    unit: str = "sfu"
    constant: bool = False
    state: bool = False
    interface: bool = False
    effect: bool = False
    norm: bool = False

    @property
    def min_operands(self) -> int:
        return sum(1 for o in self.operands if not o.endswith("?"))

    @property
    def max_operands(self) -> int | None:
        """None: a last operand named `name...` repeats (one or more)."""
        return None if self.operands and self.operands[-1].endswith("...") else len(self.operands)


#: Annotations passes may attach to any op, with their types.
ANNOTATIONS: dict[str, str] = {
    "layer": "str", "tiling": "dict", "dram": "dict", "stages": "list", "mem": "dict", "scratch": "dict",
    "sfu": "int", "slots": "int",
}

#: Where an op's work runs: nowhere (a value the program is given, or keeps), the DRAM
#: controller's DMA, the CIM macros, or a tile's vector unit (SFU).
UNITS = ("none", "dma", "macro", "sfu")

OPS: dict[str, OpDef] = {}


def _def(name: str, operands: tuple[str, ...], infer: Callable[[Sequence[TensorType], dict], list[TensorType]],
         doc: str, attrs: dict[str, str] | None = None, optional: dict[str, str] | None = None,
         **traits: object) -> None:
    OPS[name] = OpDef(name, operands, infer, doc, attrs or {}, optional or {}, **traits)  # type: ignore[arg-type]
    assert OPS[name].unit in UNITS, name


def traits(op: Op) -> OpDef:
    """The declaration (and so the traits) of an op."""
    return OPS[op.name]


# ---- type rules ------------------------------------------------------------------------------


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise TypeRuleError(msg)


def _matrix(t: TensorType, what: str) -> tuple[Dim, Dim]:
    _need(t.rank == 2, f"{what} must be a matrix [rows, cols], got {t}")
    return t.shape[0], t.shape[1]


def _float(t: TensorType, what: str) -> None:
    _need(t.dtype == ACT, f"{what} must be {ACT}, got {t}")


def from_attr(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    raise TypeRuleError("result type is given, not inferred")


def _none(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    return []


def _same(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    _matrix(ts[0], "operand")
    _float(ts[0], "operand")
    return [ts[0]]


def _broadcast(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    """Numpy broadcasting, plus: a `ctx`-row operand (a table indexed by absolute position) goes
    with `seq` rows, row r reading position past + r."""
    a, b = ts
    _float(a, "left operand")
    _float(b, "right operand")
    _need(a.rank <= 2 and b.rank <= 2, f"operands must have rank <= 2, got {a} and {b}")
    sa, sb = (1,) * (2 - a.rank) + a.shape, (1,) * (2 - b.rank) + b.shape
    out: list[Dim] = []
    for axis, (x, y) in enumerate(zip(sa, sb, strict=True)):
        if axis == 0 and CTX in (x, y) and {x, y} <= {CTX, SEQ}:
            out.append(SEQ)
            continue
        _need(x == y or x == 1 or y == 1, f"shapes {a} and {b} do not broadcast")
        out.append(y if x == 1 else x)
    _need(a.rank == 2 or b.rank == 2, "at least one operand must be a matrix")
    return [TensorType(ACT, tuple(out))]


def _reduce(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    rows, _ = _matrix(ts[0], "operand")
    _float(ts[0], "operand")
    return [TensorType(ACT, (rows, 1))]


def _embedding(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    ids, table = ts
    _need(ids.rank == 1 and ids.dtype == IDS, f"ids must be {IDS}[n], got {ids}")
    _, h = _matrix(table, "table")
    _float(table, "table")
    return [TensorType(ACT, (ids.shape[0], h))]


def _linear(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    rows, k = _matrix(ts[0], "input")
    wk, n = _matrix(ts[1], "weight")
    _float(ts[0], "input")
    quantized = ts[1].dtype in QUANT_TYPES
    _need(quantized or ts[1].dtype == ACT, f"weight must be {ACT} or one of {', '.join(QUANT_TYPES)}, got {ts[1]}")
    act = attrs.get("act", ACT)
    _need(act in ACTS, f"act must be one of {', '.join(ACTS)}, got {act!r}")
    _need(quantized or act == ACT, f"act {act} needs integer weights (a qweight), got {ts[1]}")
    _need(k == wk, f"input has {k} columns but the weight has {wk} rows")
    if len(ts) == 3:
        _need(ts[2].shape == (n,), f"bias must be f32[{n}], got {ts[2]}")
    return [TensorType(ACT, (rows, n))]


def _rms_norm(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    _, cols = _matrix(ts[0], "input")
    hd = attrs.get("head_dim", cols)
    _need(isinstance(cols, int) and hd > 0 and cols % hd == 0, f"head_dim {hd} must divide the {cols} columns")
    _need(ts[1].shape == (hd,), f"weight must be f32[{hd}], got {ts[1]}")
    return [ts[0]]


def _layer_norm(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    _, cols = _matrix(ts[0], "input")
    _float(ts[0], "input")
    for t, what in zip(ts[1:], ("weight", "bias"), strict=False):
        _need(t.shape == (cols,), f"{what} must be f32[{cols}], got {t}")
    return [ts[0]]


def _rope(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    x, cos, sin = ts
    _, cols = _matrix(x, "input")
    hd = attrs["head_dim"]
    _need(hd > 0 and isinstance(cols, int) and cols % hd == 0, f"head_dim {hd} must divide the {cols} columns")
    rd = attrs.get("rotary_dim", hd)
    _need(0 < rd <= hd and rd % 2 == 0, f"rotary_dim {rd} must be even and in 2..head_dim ({hd})")
    for t, what in ((cos, "cos"), (sin, "sin")):
        trows, tcols = _matrix(t, what)
        _need(tcols == rd, f"{what} table must have rotary_dim = {rd} columns, got {t}")
        _need(trows == CTX, f"{what} table must have one row per position ({CTX} rows), got {t}")
    return [x]


def _attention(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    q, k, v = ts
    h, kvh, hd = attrs["heads"], attrs["kv_heads"], attrs["head_dim"]
    _need(h > 0 and kvh > 0 and h % kvh == 0, f"heads {h} must be a multiple of kv_heads {kvh}")
    rows, qc = _matrix(q, "q")
    krows, kc = _matrix(k, "k")
    _, vc = _matrix(v, "v")
    _need(qc == h * hd, f"q must have heads*head_dim = {h * hd} columns, got {q}")
    _need(kc == kvh * hd and vc == kvh * hd, f"k and v must have kv_heads*head_dim = {kvh * hd} columns")
    _need(krows == v.shape[0] and krows in (rows, CTX),
          "k and v must have the rows of q (no cache) or ctx rows (the KV cache)")
    window, softcap = attrs.get("window", 0), attrs.get("softcap")
    _need(window >= 0, f"window must be 0 (unbounded) or the keys a query sees, got {window}")
    _need(not window or attrs["causal"], "a window needs causal attention")
    _need(softcap is None or softcap > 0, f"softcap must be positive (leave it out for none), got {softcap}")
    return [TensorType(ACT, (rows, h * hd))]


def _kv_append(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    cache, x = ts
    _need(cache.rank == 2 and cache.shape[0] == CTX, f"cache must be f32[{CTX}, cols], got {cache}")
    _need(x.rank == 2 and x.shape[1] == cache.shape[1] and x.shape[0] != CTX,
          f"appended rows {x} must match the cache columns {cache}")
    return [cache]


@dataclass(frozen=True)
class Piece:
    """One strided copy of a `relayout`: element i (a multi-index over `sizes`) of operand `of`, at
    row r0 + sum_a i_a * rs[a] and column c0 + sum_a i_a * cs[a], goes to flat element
    d0 + sum_a i_a * ds[a] of the result (row-major)."""

    of: int
    r0: int
    c0: int
    d0: int
    sizes: tuple[int, ...]
    rs: tuple[int, ...]
    cs: tuple[int, ...]
    ds: tuple[int, ...]

    def encode(self) -> list[int]:
        """The attribute form: [of, r0, c0, d0, then size, rs, cs, ds per axis]."""
        axes = zip(self.sizes, self.rs, self.cs, self.ds, strict=True)
        return [self.of, self.r0, self.c0, self.d0, *(x for a in axes for x in a)]

    @classmethod
    def decode(cls, p: list[int]) -> Piece:
        axes = [p[i:i + 4] for i in range(4, len(p), 4)]
        return cls(p[0], p[1], p[2], p[3], *(tuple(a[k] for a in axes) for k in range(4)))

    def extent(self, strides: tuple[int, ...], base: int) -> tuple[int, int]:
        """The least and greatest of base + sum_a i_a * strides[a] over the copied elements."""
        lo = base + sum(min(0, (n - 1) * s) for n, s in zip(self.sizes, strides, strict=True))
        hi = base + sum(max(0, (n - 1) * s) for n, s in zip(self.sizes, strides, strict=True))
        return lo, hi


def _relayout(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    shape = attrs["shape"]
    _need(all(isinstance(d, int) and d >= 0 for d in shape), f"shape must be fixed sizes, got {shape}")
    rows, cols = fixed_matrix(tuple(shape))
    for p in attrs["pieces"]:
        _need(isinstance(p, list) and len(p) % 4 == 0 and len(p) >= 4 and all(isinstance(x, int) for x in p),
              f"a piece must be [of, r0, c0, d0, (size, rs, cs, ds)...], got {p}")
        piece = Piece.decode(p)
        _need(0 <= piece.of < len(ts), f"piece of operand {piece.of}: there are {len(ts)}")
        if not all(piece.sizes):
            continue
        t = ts[piece.of]
        _float(t, f"operand {piece.of}")
        r = piece.extent(piece.rs, piece.r0)
        c = piece.extent(piece.cs, piece.c0)
        d = piece.extent(piece.ds, piece.d0)
        trows, tcols = (1, t.shape[0]) if t.rank == 1 else _matrix(t, f"operand {piece.of}")
        _need(isinstance(trows, int) and r[0] >= 0 and r[1] < trows and c[0] >= 0 and c[1] < tcols,
              f"piece {p} reads outside operand {piece.of} {t}")
        _need(d[0] >= 0 and d[1] < rows * cols, f"piece {p} writes outside the result {shape}")
    return [TensorType(ACT, (rows, cols))]


def _matmul(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    a, b = ts
    _float(a, "a")
    _float(b, "b")
    m, k = _matrix(a, "a")
    br, bc = _matrix(b, "b")
    kb, n = (bc, br) if attrs.get("tb", False) else (br, bc)
    _need(k == kb, f"a {a} and b {b} do not multiply (tb = {attrs.get('tb', False)})")
    return [TensorType(ACT, (m, n))]


#: `gelu`'s `approximate` (ONNX Gelu-20): the exact erf form or the tanh approximation.
GELU_FORMS = ("none", "tanh")


def _gelu(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    form = attrs.get("approximate", "none")
    _need(form in GELU_FORMS, f"approximate must be one of {', '.join(GELU_FORMS)}, got {form!r}")
    return _same(ts, attrs)


def _swiglu(ts: Sequence[TensorType], attrs: dict) -> list[TensorType]:
    _need(ts[0].shape == ts[1].shape, f"gate {ts[0]} and up {ts[1]} must have the same shape")
    return _same(ts[:1], attrs)


# ---- definitions -----------------------------------------------------------------------------

_IO = {"name": "str", "onnx_dtype": "str", "onnx_shape": "list"}
_def("input", (), from_attr, "a graph input placed in DRAM; ids become i32; with `assume` (ones, positions) "
     "a mask or position input whose value is checked, not used", _IO, {"assume": "str"}, unit="none",
     interface=True)
_def("output", ("value",), _none, "a graph output, written to DRAM under its ONNX name; with `heads`, a KV "
     "cache shown as [1, heads, ctx, head_dim]", _IO, {"heads": "int"}, unit="none", interface=True, effect=True)
_def("weight", (), from_attr, "an ONNX initializer (optionally transposed), read lazily from the model; with "
     "`format = dequantize`, an integer initializer dequantized at compile time (cimc.ir.quant); with `index`, "
     "the matrix at that index of the initializer's leading (batch) axes; with `cols = [c0, c1, n]`, columns "
     "c0 .. c1-1 of that [K, n] matrix",
     {"init": "str"}, {"index": "list", "transpose": "bool", "format": "str", "scales": "str", "zero_points": "str",
                       "axis": "int", "block": "int", "bits": "int", "cols": "list"}, unit="none", constant=True)
_def("qweight", (), from_attr,
     "integer weights [K, N] with a scale (and, for unsigned types, a zero point) per group of `group` rows "
     "(0: all K) and column; `format` says where the numbers come from (cimc.ir.quant)",
     {"init": "str", "format": "str", "group": "int", "scale_type": "str"},
     {"transpose": "bool", "scales": "str", "zero_points": "str", "cols": "list"}, unit="none", constant=True)
_def("const", (), from_attr,
     "a constant folded at compile time; `data` is base64 of little-endian row-major values, "
     "position tables (ctx rows) stored up to max_ctx", {"data": "str"}, unit="none", constant=True)
_def("kv_cache", (), from_attr, "a KV cache: state in DRAM kept from one program run to the next; with "
     "`onnx_shape`, also the model's past-KV input [1, heads, past, head_dim]",
     {"name": "str"}, {"onnx_dtype": "str", "onnx_shape": "list", "heads": "int"}, unit="none", state=True)
_def("kv_append", ("cache", "x"), _kv_append,
     "write x's rows at positions past .. past+seq-1 of the cache; the result is the updated cache", unit="dma",
     state=True, effect=True)
_def("embedding", ("ids", "table"), _embedding, "table rows gathered by token id", unit="dma")
_def("linear", ("x", "w", "bias?"), _linear,
     "x @ w (+ bias): the op that runs on the CIM macros; with integer weights, `act` is how its inputs enter "
     "the macros: f32 (float compute on the exact dequantized weights), i8 (dynamic symmetric int8, one "
     "scale per token and weight scale group) or u8 (onnxruntime's DynamicQuantizeLinear: asymmetric uint8, "
     "one scale and zero point for the whole input)", optional={"act": "str"}, unit="macro")
_def("rms_norm", ("x", "w"), _rms_norm, "x / sqrt(mean(x^2, cols) + eps) * w; with `head_dim`, of each "
     "head_dim-wide column block on its own, w being head_dim wide (Qwen3's per-head q and k norms)",
     {"eps": "float"}, {"head_dim": "int"}, norm=True)
_def("layer_norm", ("x", "w", "b?"), _layer_norm,
     "(x - mean(x, cols)) / sqrt(mean((x - mean)^2, cols) + eps) * w (+ b): ONNX LayerNormalization over the "
     "last axis", {"eps": "float"}, norm=True)
_def("rope", ("x", "cos", "sin"), _rope,
     "rotary embedding, rotate-half form, applied to each head_dim slice of each row; with `rotary_dim`, to its "
     "first rotary_dim entries only (the rest pass through: Phi-3's partial_rotary_factor, GPT-NeoX's rotary_pct), "
     "and the cos/sin tables have rotary_dim columns", {"head_dim": "int"}, {"rotary_dim": "int"})
_def("attention", ("q", "k", "v"), _attention,
     "softmax(mask(cap(scale * q_h k_g^T))) v_g per head h, with g = h // (heads/kv_heads). `softcap` (> 0): "
     "cap(s) = softcap * tanh(s / softcap) after the scaling and before the mask (Gemma2, GroupQueryAttention "
     "softcap); absent: cap(s) = s. mask: with `causal`, the query at position p sees the keys at positions "
     "p-window+1 .. p with `window` > 0 (transformers' sliding_window: window keys, itself included; "
     "onnxruntime 1.32's GroupQueryAttention local_window_size L > 0 sees L keys: window = L), positions 0 .. p "
     "without",
     {"heads": "int", "kv_heads": "int", "head_dim": "int", "scale": "float", "causal": "bool"},
     {"window": "int", "softcap": "float"})
_def("relayout", ("src...",), _relayout,
     "copy strided pieces of fixed-size operands into the row-major [prod(shape[:-1]), shape[-1]] matrix of "
     "the ONNX tensor `shape` (a materialising transpose, Concat, Gather by constant indices; see `Piece`)",
     {"shape": "list", "pieces": "list"})
_def("matmul", ("a", "b"), _matmul,
     "alpha * a @ b (b.T with `tb`): a small product of two activations on an SFU (the generic mode's "
     "attention scores and P@V)", optional={"tb": "bool", "alpha": "float"})
_def("swiglu", ("gate", "up"), _swiglu, "silu(gate) * up")
for _name, _doc in (("add", "a + b"), ("sub", "a - b"), ("mul", "a * b"), ("div", "a / b"), ("max", "max(a, b)"),
                    ("pow", "a ** b")):
    _def(_name, ("a", "b"), _broadcast, f"elementwise {_doc} with numpy broadcasting")
for _name, _doc in (("neg", "-x"), ("exp", "exp(x)"), ("sqrt", "sqrt(x)"), ("rsqrt", "1/sqrt(x)"),
                    ("reciprocal", "1/x"), ("sigmoid", "1/(1+exp(-x))"), ("silu", "x*sigmoid(x)"),
                    ("tanh", "tanh(x)"), ("erf", "erf(x)"), ("softmax", "softmax over cols")):
    _def(_name, ("x",), _same, f"elementwise {_doc}" if _name != "softmax" else "softmax over each row")
_def("gelu", ("x",), _gelu, "elementwise 0.5*x*(1+erf(x/sqrt(2))); with `approximate = \"tanh\"` (ONNX Gelu-20, "
     "GPT-2's gelu_new, Gemma's gelu_pytorch_tanh, FastGelu) 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))",
     optional={"approximate": "str"})
_def("affine", ("x",), _same, "x * alpha + beta", {"alpha": "float", "beta": "float"})
for _name, _doc in (("reduce_sum", "sum"), ("reduce_max", "maximum"), ("reduce_mean", "mean")):
    _def(_name, ("x",), _reduce, f"row {_doc}, keeping a column: [rows, 1]")
