"""Graphs quantized by onnxruntime's tools, imported with their own numbers (never requantized).

- **Weight-only QDQ**: `DequantizeLinear(W_q, scale, zero_point?, axis, block_size)` of an int8,
  uint8, int4 or uint4 initializer is a `QLazy` term; a MatMul or Gemm taking it (also through a
  Transpose) gets a `qweight` of format `dequantizelinear` with `act = f32`: the graph computes in
  float on the dequantized weights (onnxruntime's reference kernels; its default session may fuse
  the pair into MatMulNBits at accuracy level 4, see docs/numerics-and-timing.md). Scales per
  tensor, per output column or in blocks along the reduction axis fit a `qweight` exactly; per-row
  scales along the reduction axis, or blocks along the output axis, are refused at the MatMul,
  naming the DequantizeLinear and the weight.
- **quantize_dynamic**: per MatMul, `DynamicQuantizeLinear(x) -> (x_q, x_scale, x_zp)`,
  `MatMulInteger(x_q, W_q, x_zp, w_zp?)`, `Cast(to float)`, `Mul(x_scale, w_scale)` and the final
  `Mul` of the two wait as expressions until that final Mul (`dynamic_linear`), which becomes
  `linear(x, qweight{format matmulinteger}, act = u8)`: the tile's SFU quantizes x as
  DynamicQuantizeLinear does (`vquant` asym) and the macros take the uint8 values with their zero
  point. Its quantized embedding, `Gather(table_q, ids) -> DequantizeLinear`, and QDQ's
  `DequantizeLinear(table_q) -> Gather` are embeddings over a float table dequantized at compile
  time (a `weight` of format `dequantize`).
- **QuantizeLinear** (static activation quantization) is refused.

Every check that the attributes, initializer metadata and graph structure allow is made before
folding (`check`), with the node and the value named; scales and zero points are never folded
(zero points are read only to pick a weight type).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from onnx import TensorProto

from cimc.frontend.converters import Converter, Unsupported, register
from cimc.frontend.lift import Dequant, Expr, Lazy, Lifter, QLazy, Static, Term, View
from cimc.frontend.model import Node, OnnxModel
from cimc.frontend.ops.gather import gathered
from cimc.ir.core import Value
from cimc.ir.quant import dequantize, held_type
from cimc.ir.rules import Rule, register_rule
from isa.dtypes import ACT

#: ONNX integer types a quantized weight may have.
WEIGHT_INTS = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)
NO_ACTIVATIONS = "static activation quantization is not supported: quantize weights only"


def _type(et: int) -> str:
    return TensorProto.DataType.Name(et).lower()


def _describe(t: TensorProto) -> str:
    return f"{_type(t.data_type)}{list(t.dims)}"


def _initializer(model: OnnxModel, what: str, name: str, types: tuple[int, ...]) -> TensorProto:
    """Initializer `name`, which must exist and have one of `types`."""
    t = model.initializers.get(name)
    if t is None:
        raise Unsupported(f"{what} {name!r} is not an initializer")
    if t.data_type not in types:
        raise Unsupported(f"{what} {name!r} is {_describe(t)}; expected {' or '.join(map(_type, types))}")
    return t


def _pad(names: list[str], count: int) -> list[str]:
    """The first `count` names, "" for those absent."""
    return [*names, *[""] * count][:count]


def _size(t: TensorProto) -> int:
    out = 1
    for d in t.dims:
        out *= d
    return out


# ---- DequantizeLinear ----------------------------------------------------------------------------


def _source(model: OnnxModel, node: Node, op_type: str) -> str:
    """The initializer that x of DequantizeLinear `node` is the `op_type` (Gather, Transpose) of, or ""."""
    prod = model.producer.get(node.inputs[0])
    if prod is None or prod.op_type != op_type or prod.inputs[0] not in model.initializers:
        return ""
    t = model.initializers[prod.inputs[0]]
    if op_type == "Transpose" and (len(t.dims) != 2 or list(prod.attrs.get("perm", [1, 0])) != [1, 0]):
        return ""
    return prod.inputs[0]


def read_dequant(model: OnnxModel, node: Node) -> Dequant | None:
    """Check a DequantizeLinear; None for one of a small constant (a vector: folded at compile time)."""
    x, scale, zp = _pad(node.inputs, 3)
    table, transposed = _source(model, node, "Gather"), _source(model, node, "Transpose")
    if x in model.initializers or transposed:
        t = model.initializers[x if x in model.initializers else transposed]
        if len(t.dims) < 2:
            return None
        rank, dims = len(t.dims), list(t.dims)[::-1] if transposed else list(t.dims)
    elif table:
        t = model.initializers[table]
        ids = model.inputs.get(model.producer[x].inputs[1])
        rank = len(t.dims) - 1 + (len(ids.type.tensor_type.shape.dim) if ids is not None else 2)
        dims = []
    else:
        raise Unsupported(f"x {x!r} is an activation: {NO_ACTIVATIONS}")
    what = "x" if not table else f"x {x!r} gathered from"
    if t.data_type not in WEIGHT_INTS:
        raise Unsupported(f"{what} {t.name!r} is {_describe(t)}; quantized weights must be int8, uint8, int4 or uint4")
    out = node.attrs.get("output_dtype", 0)
    if out not in (0, TensorProto.FLOAT):
        raise Unsupported(f"output_dtype={_type(out)}: only float32 outputs are supported")
    s = _initializer(model, "scale", scale, (TensorProto.FLOAT,)) if scale else None
    if s is None:
        raise Unsupported("the scale input is required")
    if zp:
        z = _initializer(model, "zero point", zp, (t.data_type,))
        if list(z.dims) != list(s.dims):
            raise Unsupported(f"zero point {zp!r} is {_describe(z)} but scale {scale!r} is {_describe(s)}; "
                              "they must have the same shape")
    block, axis = int(node.attrs.get("block_size", 0)), int(node.attrs.get("axis", 1))
    if _size(s) == 1 and len(s.dims) <= 1:
        if block:
            raise Unsupported(f"block_size={block} with one scale ({scale!r} is {_describe(s)}) for the tensor")
        return Dequant(_type(t.data_type), scale, zp, 0, 0, True, bool(table))
    if not -rank <= axis < rank:
        raise Unsupported(f"axis={axis} is out of range for the rank-{rank} input {x!r}")
    axis %= rank
    if len(s.dims) == 1:
        if block:
            raise Unsupported(f"block_size={block} needs scales of x's rank {rank}; scale {scale!r} is {_describe(s)}")
        if table and axis != rank - 1:
            raise Unsupported(f"axis={axis}: a gathered table is dequantized per tensor or per feature (the last axis)")
        if not table and s.dims[0] != dims[axis]:
            raise Unsupported(f"scale {scale!r} is {_describe(s)} but x {x!r} has {dims[axis]} values along "
                              f"axis {axis}")
        return Dequant(_type(t.data_type), scale, zp, axis, 0, False, bool(table))
    if table or transposed or len(s.dims) != rank:
        raise Unsupported(f"scale {scale!r} is {_describe(s)}: expected a scalar, a vector along axis {axis}"
                          + ("" if table or transposed else f", or blocks of x's rank {rank}"))
    if block < 1:
        raise Unsupported(f"scale {scale!r} is {_describe(s)}, blocks of x {_describe(t)}, but block_size={block}")
    for i, (d, sd) in enumerate(zip(dims, s.dims, strict=True)):
        if i != axis and d != sd:
            raise Unsupported(f"scale {scale!r} is {_describe(s)} but x {x!r} is {_describe(t)}: only axis {axis} "
                              "may differ")
    blocks = s.dims[axis]
    if -(-dims[axis] // block) != blocks:
        fits = f"{-(-dims[axis] // blocks)}..{-(-dims[axis] // (blocks - 1)) - 1}" if blocks > 1 else \
            f"{dims[axis]} or more"
        raise Unsupported(f"block_size={block} does not fit: x {x!r} has {dims[axis]} values along axis {axis} and "
                          f"scale {scale!r} {blocks} blocks (block sizes {fits} do)")
    return Dequant(_type(t.data_type), scale, zp, axis, block, False, False)


def _dequant_lazy(model: OnnxModel, node: Node) -> list[str]:
    """The quantized tensor (or the table gathered from), its scales and zero points."""
    x = node.inputs[0]
    t = model.initializers.get(x)
    src = x if t is not None and len(t.dims) >= 2 else _source(model, node, "Gather") or \
        _source(model, node, "Transpose")
    return [src, *(name for name in node.inputs[1:3] if name)] if src else []


def _dequant_lift(lifter: Lifter, node: Node, args: list) -> Term:
    """A QLazy weight, or an embedding over the dequantized table (Gather -> DequantizeLinear)."""
    dq = read_dequant(lifter.model, node)
    x = args[0]
    if dq is not None and isinstance(x, Lazy):  # of an initializer, or of its Transpose (a tied LM head)
        axis = 1 - dq.axis if x.transpose else dq.axis  # along the stored tensor (blocks are not transposed)
        q = QLazy(node, x.init, x.shape, replace(dq, axis=axis))
        return replace(q, transpose=True) if x.transpose else q
    if dq is not None and dq.gathered and isinstance(x, Expr) and x.node.op_type == "Gather":
        table, ids = x.args
        if not isinstance(table, Lazy) or len(table.shape) != 2:
            raise Unsupported("the embedding table must be a [vocab, hidden] initializer")
        if isinstance(ids, Static):  # rows by position (learned positions): dequantized at compile time
            w = lifter.weights
            rows = dequantize(w(table.init), w(dq.scales), w(dq.zero_points) if dq.zero_points else None, 1, 0)
            return gathered(node.outputs[0], rows, ids, table.init)
        return lifter.embedding(node, ids, lifter.dequantized_table(table.init, dq.scales, dq.zero_points, 1, 0))
    raise Unsupported(f"x {node.inputs[0]!r} is not an integer initializer: {NO_ACTIVATIONS}")


def dequantized_weight(lifter: Lifter, q: QLazy) -> Value:
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
    zero = lifter.weights(dq.zero_points) if dq.zero_points else None
    attrs = {"init": q.init, "format": "dequantizelinear", "group": group, "scale_type": ACT,
             "scales": dq.scales} | ({"zero_points": dq.zero_points} if dq.zero_points else {}) \
        | ({"transpose": True} if q.transpose else {})
    return lifter.qweight(attrs, held_type(dq.dtype, zero), (int(k), int(n)), q.init)


# ---- QuantizeLinear --------------------------------------------------------------------------------


def _quant_check(model: OnnxModel, node: Node) -> None:
    if node.inputs[0] in model.initializers:
        raise Unsupported(f"QuantizeLinear of initializer {node.inputs[0]!r}: store quantized weights instead "
                          "(a DequantizeLinear of an integer initializer)")
    raise Unsupported(NO_ACTIVATIONS)


def _never(lifter: Lifter, node: Node, args: list) -> Term:
    raise Unsupported(NO_ACTIVATIONS)


# ---- quantize_dynamic: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -----------------------


def _dynamic_check(model: OnnxModel, node: Node) -> None:
    """Each output feeds only its part of quantize_dynamic's chain."""
    y, scale, zero = _pad(node.outputs, 3)
    uses = ((y, "MatMulInteger", 0, "input A of MatMulInteger"),
            (zero, "MatMulInteger", 2, "a_zero_point of MatMulInteger"),
            (scale, "Mul", -1, "a Mul by the weight scale"))
    for name, op, at, what in uses:
        if name in model.outputs:
            raise Unsupported(f"output {name!r} is a graph output; only quantize_dynamic's MatMulInteger chain "
                              "may use it")
        for c in model.consumers.get(name, []):
            for i, used in enumerate(c.inputs):
                if used == name and (c.op_type != op or at not in (-1, i)):
                    raise Unsupported(f"output {name!r} feeds {c.op_type} {c.name!r} (input {i}); only {what} "
                                      "may use it (quantize_dynamic's chain)")


def _dynamic_lift(lifter: Lifter, node: Node, args: list) -> tuple[Term, ...]:
    """Three deferred outputs, for the MatMulInteger chain's idiom to consume."""
    x = lifter.need_view(args[0], "input")
    lifter.near_miss[node.name] = "DynamicQuantizeLinear is supported in quantize_dynamic's MatMulInteger chain"
    return Expr(node, [x]), Expr(node, [x]), Expr(node, [x])


@dataclass(frozen=True)
class IntegerMatMul:
    """A checked MatMulInteger of quantize_dynamic's chain: B [K, N] (numpy type name `dtype`), its
    zero points ("" if none), the weight scale and the final Mul."""

    b: str
    dtype: str
    k: int
    n: int
    zero_points: str
    scale: str
    mul: str


def read_matmulinteger(model: OnnxModel, node: Node) -> IntegerMatMul:
    """Check a MatMulInteger and the chain around it (see the module doc)."""
    a, b, a_zero, b_zero = _pad(node.inputs, 4)
    dq = model.producer.get(a)
    if dq is None or dq.op_type != "DynamicQuantizeLinear":
        raise Unsupported(f"input A {a!r} is not a DynamicQuantizeLinear output: only quantize_dynamic's chain "
                          "is supported")
    if not a_zero or a_zero != _pad(dq.outputs, 3)[2]:
        raise Unsupported(f"a_zero_point {a_zero!r} is not the zero point of DynamicQuantizeLinear {dq.name!r}")
    w = _initializer(model, "B", b, (TensorProto.INT8, TensorProto.UINT8))
    if len(w.dims) != 2:
        raise Unsupported(f"B {b!r} is {_describe(w)}; expected a matrix [K, N]")
    k, n = w.dims
    if b_zero:
        z = _initializer(model, "b_zero_point", b_zero, (w.data_type,))
        if list(z.dims) not in ([], [1], [n]):
            raise Unsupported(f"b_zero_point {b_zero!r} is {_describe(z)}; B {_describe(w)} needs a scalar or [{n}]")
    chain = "must be followed by Cast(to float) and Mul by (x_scale * w_scale), as quantize_dynamic emits it"
    casts = model.consumers.get(node.outputs[0], [])
    if len(casts) != 1 or casts[0].op_type != "Cast" or casts[0].attrs.get("to") != TensorProto.FLOAT:
        raise Unsupported(f"output {node.outputs[0]!r} {chain}; it feeds {_names(casts)}")
    muls = model.consumers.get(casts[0].outputs[0], [])
    if len(muls) != 1 or muls[0].op_type != "Mul":
        raise Unsupported(f"Cast {casts[0].name!r} {chain}; it feeds {_names(muls)}")
    other = next((i for i in muls[0].inputs if i != casts[0].outputs[0]), "")
    scales = model.producer.get(other)
    x_scale = _pad(dq.outputs, 3)[1]
    if scales is None or scales.op_type != "Mul" or x_scale not in scales.inputs:
        raise Unsupported(f"Mul {muls[0].name!r} does not scale by x_scale {x_scale!r} times a weight scale "
                          f"({chain})")
    w_scale = next((i for i in scales.inputs if i != x_scale), "")
    s = _initializer(model, "weight scale", w_scale, (TensorProto.FLOAT,))
    if list(s.dims) not in ([], [1], [n]):
        raise Unsupported(f"weight scale {w_scale!r} is {_describe(s)}; B {_describe(w)} needs a scalar or [{n}]")
    return IntegerMatMul(b, _type(w.data_type), int(k), int(n), b_zero, w_scale, muls[0].name)


def _names(nodes: list[Node]) -> str:
    return ", ".join(f"{c.op_type} {c.name!r}" for c in nodes) or "nothing"


def _matmulinteger_lazy(model: OnnxModel, node: Node) -> list[str]:
    """B and its zero points: streamed by codegen, never folded."""
    _, b, _, b_zero = _pad(node.inputs, 4)
    return [name for name in (b, b_zero) if name]


def _matmulinteger_lift(lifter: Lifter, node: Node, args: list) -> Term:
    lifter.near_miss[node.name] = "MatMulInteger is supported in quantize_dynamic's chain (Cast to float, then " \
                                  "Mul by x_scale * w_scale)"
    return Expr(node, args)


def dynamic_linear(lifter: Lifter, mul: Expr) -> View | None:
    """The final Mul of quantize_dynamic's chain: linear(x, qweight{matmulinteger}, act u8)."""
    for cast, scales in (mul.args, mul.args[::-1]):
        if not (isinstance(cast, Expr) and cast.node.op_type == "Cast" and isinstance(scales, Expr)
                and isinstance(cast.args[0], Expr) and cast.args[0].node.op_type == "MatMulInteger"):
            continue
        mm = cast.args[0]
        info = read_matmulinteger(lifter.model, mm.node)
        x_q = mm.args[0]
        if info.mul != mul.node.name or not isinstance(x_q, Expr):
            continue
        zero = lifter.weights(info.zero_points) if info.zero_points else None
        attrs = {"init": info.b, "format": "matmulinteger", "group": 0, "scale_type": "f32", "scales": info.scale} \
            | ({"zero_points": info.zero_points} if info.zero_points else {})
        w = lifter.qweight(attrs, held_type(info.dtype, zero), (info.k, info.n), info.b)
        return lifter.linear(mul.node, x_q.args[0], w, None, {"act": "u8"})
    return None


register(Converter("", "DequantizeLinear", _dequant_lift, check=read_dequant, lazy=_dequant_lazy))
register(Converter("", "QuantizeLinear", _never, check=_quant_check))
register(Converter("", "DynamicQuantizeLinear", _dynamic_lift, check=_dynamic_check))
register(Converter("", "MatMulInteger", _matmulinteger_lift, check=read_matmulinteger, lazy=_matmulinteger_lazy))
register_rule(Rule("dynamic_linear", "onnx", "Mul", "Mul(Cast(MatMulInteger(DynamicQuantizeLinear(x), W_q)), "
                   "x_scale * w_scale) -> linear(x, qweight{matmulinteger}, act u8)", dynamic_linear))
