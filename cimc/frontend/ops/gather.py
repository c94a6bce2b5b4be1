"""Gather of embedding rows by token id: `embedding(ids, table)`.

The table is a float initializer (or the transpose of one: a tied lm_head's [hidden, vocab]
weights, as the onnxruntime-genai builder shares them), integer weights a DequantizeLinear dequantizes (QDQ: a float
table dequantized at compile time), or an integer table a DequantizeLinear after the Gather
dequantizes (quantize_dynamic: the Gather waits for it, see ops/qdq.py).
"""

from __future__ import annotations

from cimc.frontend.converters import Unsupported, standard
from cimc.frontend.lift import Expr, Lazy, Lifter, QLazy, Static, Term, dtype_name
from cimc.frontend.model import Node
from cimc.ir.quant import ONNX_INTS


def gather(lifter: Lifter, node: Node, args: list) -> Term:
    table, ids = args
    if node.attrs.get("axis", 0) != 0 or not isinstance(table, (Lazy, QLazy, Static)):
        raise Unsupported("only Gather of table rows by token id (axis 0 of a constant table) is supported")
    lazy = Lazy(table.name, table.value.shape) if isinstance(table, Static) else table
    if len(lazy.shape) != 2 or (isinstance(lazy, QLazy) and lazy.transpose):
        raise Unsupported("the embedding table must be a [vocab, hidden] initializer (or a float one transposed)")
    if isinstance(lazy, QLazy):
        dq = lazy.dq
        return lifter.embedding(node, ids, lifter.dequantized_table(lazy.init, dq.scales, dq.zero_points, dq.axis,
                                                                    dq.block))
    if dtype_name(lifter.model.initializers[lazy.init].data_type) in ONNX_INTS:  # quantize_dynamic's table
        lifter.near_miss[node.name] = f"Gather of the integer table {lazy.init!r} must be followed by the " \
                                      "DequantizeLinear that dequantizes it"
        return Expr(node, args)
    return lifter.embedding(node, ids, lifter.weight(lazy))


standard("Gather", gather)
