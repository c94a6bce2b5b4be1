"""`com.microsoft:GatherBlockQuantized` (an onnxruntime-genai int4 embedding) -> `embedding` over a
float table dequantized at compile time (a `weight` of format `gatherblockquantized`, see
cimc.ir.quant: the values packed two to a byte, low nibble first, a scale per `block_size` columns
of a row, zero points packed likewise or 2^(bits-1) when absent, as onnxruntime computes it).

Accepted: `data` a uint8 initializer (or a Reshape of one: genai's tied table shares the LM
head's MatMulNBits weights) [vocab, hidden*bits/8], `bits` 4 or 8, `block_size` a power of two
from 16, `gather_axis = 0`, `quantize_axis` the last axis, float32 scales [vocab, hidden/block]
and optional uint8 zero points. Anything else is refused with the value named.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from cimc.frontend.converters import Converter, Unsupported, register
from cimc.frontend.lift import Lazy, Lifter, Term
from cimc.frontend.model import Node, OnnxModel
from cimc.ir.core import TensorType
from isa.dtypes import ACT


def _data(model: OnnxModel, node: Node) -> tuple[str, list[int]]:
    """The uint8 initializer behind `data` and the [rows, bytes] shape it is read as."""
    name = node.inputs[0]
    init = model.initializers.get(name)
    if init is None:
        prod = model.producer.get(name)
        if prod is None or prod.op_type != "Reshape" or prod.inputs[0] not in model.initializers:
            raise Unsupported(f"data {name!r} is not an initializer (or a Reshape of one)")
        init = model.initializers[prod.inputs[0]]
    if init.data_type != TensorProto.UINT8:
        raise Unsupported(f"data {name!r} is {TensorProto.DataType.Name(init.data_type).lower()}; only packed "
                          "uint8 is supported")
    return init.name, list(init.dims)


def check(model: OnnxModel, node: Node) -> tuple[str, int, int, int]:
    """(initializer, bits, block, vocab) of a checked node."""
    at = node.attrs
    bits, block = int(at.get("bits", 4)), int(at.get("block_size", 128))
    if bits not in (4, 8):
        raise Unsupported(f"bits={bits} is not supported (4 or 8)")
    if block < 16 or block & (block - 1):
        raise Unsupported(f"block_size={block} is not supported (a power of two from 16)")
    if int(at.get("gather_axis", 0)) != 0:
        raise Unsupported(f"gather_axis={at['gather_axis']} is not supported (only 0: table rows)")
    ins = ([*node.inputs, "", "", "", ""])[:4]
    init, dims = _data(model, node)
    scales = model.initializers.get(ins[2])
    if scales is None or scales.data_type != TensorProto.FLOAT:
        raise Unsupported(f"scales {ins[2]!r} must be a float32 initializer")
    vocab = int(scales.dims[0]) if scales.dims else 0
    if int(at.get("quantize_axis", 1)) not in (1, -1):
        raise Unsupported(f"quantize_axis={at['quantize_axis']} is not supported (only the last axis of a "
                          "[vocab, hidden] table)")
    if ins[3]:
        zp = model.initializers.get(ins[3])
        if zp is None or zp.data_type != TensorProto.UINT8:
            raise Unsupported(f"zero_points {ins[3]!r} must be a uint8 initializer")
    size = 1
    for d in dims:
        size *= d
    if len(scales.dims) != 2 or vocab < 1 or size % vocab:
        raise Unsupported(f"scales {ins[2]!r} {list(scales.dims)} are not [vocab, hidden/block_size] for data "
                          f"{dims}")
    return init, bits, block, vocab


def lazy(model: OnnxModel, node: Node) -> list[str]:
    ins = ([*node.inputs, "", "", "", ""])[:4]
    return [n for n in (node.inputs[0], _data(model, node)[0], ins[2], ins[3]) if n]


def standin(node: Node) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """Gather(a float [vocab, hidden] table, indices): hidden is unknown here, so the table is the
    data's shape times 8/bits along the last axis, built by Concat of Cast(data)."""
    bits = int(node.attrs.get("bits", 4))
    pre = f"{node.name}/standin"
    cast = helper.make_node("Cast", [node.inputs[0]], [f"{pre}_f"], name=f"{pre}_f", to=TensorProto.FLOAT)
    table = helper.make_node("Concat", [f"{pre}_f"] * (8 // bits), [f"{pre}_t"], name=f"{pre}_t", axis=-1)
    gather = helper.make_node("Gather", [f"{pre}_t", node.inputs[1]], [node.outputs[0]], name=pre, axis=0)
    return [cast, table, gather], []


def lift(lifter: Lifter, node: Node, args: list) -> Term:
    init, bits, block, vocab = check(lifter.model, node)
    data = args[0]
    if not isinstance(data, Lazy):
        raise Unsupported(f"data {node.inputs[0]!r} is not a table kept on disk")
    size = 1
    for d in lifter.model.initializers[init].dims:
        size *= d
    hidden = size * (8 // bits) // vocab
    ins = ([*node.inputs, "", "", "", ""])[:4]
    attrs = {"init": init, "format": "gatherblockquantized", "scales": ins[2], "bits": bits, "block": block} | \
        ({"zero_points": ins[3]} if ins[3] else {})
    table = next((op.result for op in lifter.module.walk("weight") if op.attrs == attrs), None)
    if table is None:
        table = lifter.rw.create("weight", [], [TensorType(ACT, (vocab, hidden))], attrs, init).result
    return lifter.embedding(node, args[1], table)


register(Converter("com.microsoft", "GatherBlockQuantized", lift, check=check, lazy=lazy, standin=standin))
