"""`com.microsoft:MatMulNBits` -> `linear(x, qweight (+ bias))`, keeping the node's own numbers.

The node's initializers stay on disk: the `qweight` (format `matmulnbits`) names B
[N, k_blocks, block*bits/8], the scales and the zero points, and codegen decodes them
(`cimc.ir.quant.matmulnbits`) as it streams the weights. Nothing is requantized: without zero
points onnxruntime's zero point is 2^(bits-1), so q - 2^(bits-1) is exact in the signed type (i4,
i8); packed uint8 zero points make the type unsigned (u4, u8). `group` is the block size and
`scale_type` the scales' type. `accuracy_level` 4 (inputs quantized to int8 per block, as
onnxruntime does) becomes `act = i8`; levels 0-3 compute in float on onnxruntime's CPU: `act = f32`.

Accepted: bits 4 and 8, block sizes 16..256 (powers of two), with or without zero points,
accuracy levels 0..4, an optional bias. Everything else (other widths, float zero points, g_idx,
prepacked weights, shapes that disagree with K and N, weights that are not initializers) is
refused with the value named.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from cimc.frontend.converters import Converter, Unsupported, register
from cimc.frontend.lift import Lifter, Term
from cimc.frontend.model import Node, OnnxModel

#: Signed (no zero points) and unsigned (uint8 zero points) weight types per bit width.
BITS = {4: ("i4", "u4"), 8: ("i8", "u8")}
BLOCK_SIZES = (16, 32, 64, 128, 256)
SCALE_TYPES = {TensorProto.FLOAT: "f32", TensorProto.FLOAT16: "f16"}
#: accuracy_level -> act: 4 quantizes the inputs to int8 per block; 0 (unset) to 3 compute in float.
ACTS = {0: "f32", 1: "f32", 2: "f32", 3: "f32", 4: "i8"}


@dataclass(frozen=True)
class NBits:
    """A checked MatMulNBits node: its shape, weight and scale types, act and initializers
    (`zero_points` and `bias` are "" when absent)."""

    k: int
    n: int
    wt: str
    group: int
    scale_type: str
    act: str
    b: str
    scales: str
    zero_points: str
    bias: str

    def qweight_attrs(self) -> dict:
        """The attributes of the `qweight` holding these weights."""
        attrs = {"init": self.b, "format": "matmulnbits", "group": self.group, "scale_type": self.scale_type,
                 "scales": self.scales}
        return attrs | ({"zero_points": self.zero_points} if self.zero_points else {})


def read(model: OnnxModel, node: Node) -> NBits:
    """Check a MatMulNBits node against onnxruntime's spec from its attributes and initializer
    metadata (no data is read); raises Unsupported naming the offending value."""
    at = node.attrs
    for name in ("K", "N", "block_size"):
        if name not in at:
            raise Unsupported(f"attribute {name} is missing")
    k, n, block = int(at["K"]), int(at["N"]), int(at["block_size"])
    bits, level = int(at.get("bits", 4)), int(at.get("accuracy_level", 0))
    if k < 1 or n < 1:
        raise Unsupported(f"K={k} and N={n} must be positive")
    if bits not in BITS:
        raise Unsupported(f"bits={bits} is not supported (4 or 8)")
    if block not in BLOCK_SIZES:
        raise Unsupported(f"block_size={block} is not supported (a power of two from 16 to 256)")
    if level not in ACTS:
        raise Unsupported(f"accuracy_level={level} is not one of 0..4")
    if at.get("weight_prepacked", 0):
        raise Unsupported(f"weight_prepacked={at['weight_prepacked']}: prepacked weights are not supported")
    a, b, scales, zp, g_idx, bias = (node.inputs + [""] * 6)[:6]
    if not (a and b and scales):
        raise Unsupported("inputs A, B and scales are required")
    if g_idx:
        raise Unsupported(f"g_idx input {g_idx!r} is not supported")
    blocks = -(-k // block)
    zp_bytes = -(-blocks * bits // 8)
    _initializer(model, "B", b, (TensorProto.UINT8,), [[n, blocks, block * bits // 8]], k, n)
    st = _initializer(model, "scales", scales, tuple(SCALE_TYPES), [[n, blocks], [n * blocks]], k, n)
    if zp:
        _initializer(model, "zero_points", zp, (TensorProto.UINT8,), [[n, zp_bytes], [n * zp_bytes]], k, n)
    return NBits(k, n, BITS[bits][bool(zp)], block, SCALE_TYPES[st], ACTS[level], b, scales, zp, bias)


def _initializer(model: OnnxModel, what: str, name: str, types: tuple[int, ...], shapes: list[list[int]],
                 k: int, n: int) -> int:
    """The element type of initializer `name`, checked against the allowed types and shapes."""
    t = model.initializers.get(name)
    if t is None:
        raise Unsupported(f"{what} {name!r} is not an initializer")
    got = f"{_type_name(t.data_type)}{list(t.dims)}"
    if t.data_type not in types:
        raise Unsupported(f"{what} {name!r} is {got}; expected {' or '.join(map(_type_name, types))}")
    if list(t.dims) not in shapes:
        want = " or ".join(f"{_type_name(t.data_type)}{s}" for s in shapes)
        raise Unsupported(f"{what} {name!r} is {got}; K={k}, N={n} need {want}")
    return t.data_type


def _type_name(et: int) -> str:
    return TensorProto.DataType.Name(et).lower()


def lazy(model: OnnxModel, node: Node) -> list[str]:
    """B, scales and zero points: read by codegen, never at import."""
    return [name for name in node.inputs[1:4] if name]


def standin(node: Node) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """Gather(A, [N] indices, axis=-1): the output shape A[..., N] and type of A, for any K."""
    cols = f"{node.name}/standin_cols"
    gather = helper.make_node("Gather", [node.inputs[0], cols], [node.outputs[0]], name=node.name, axis=-1)
    return [gather], [helper.make_tensor_value_info(cols, TensorProto.INT64, [int(node.attrs["N"])])]


def lift(lifter: Lifter, node: Node, args: list) -> Term:
    """linear(A, qweight (+ bias)) with the node's act."""
    nb = read(lifter.model, node)
    features = lifter.shape(node.inputs[0])[-1]
    if features != nb.k:
        raise Unsupported(f"K={nb.k} but input A {node.inputs[0]!r} has {features} features")
    bias = args[5] if nb.bias else None
    return lifter.linear(node, args[0], lifter.qweight(nb.qweight_attrs(), nb.wt, (nb.k, nb.n), nb.b), bias,
                         {"act": nb.act})


register(Converter("com.microsoft", "MatMulNBits", lift, check=read, lazy=lazy, standin=standin))
