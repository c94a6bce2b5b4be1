"""Gather of embedding rows by token id: `embedding(ids, table)`; Gather of table rows by
position (GPT-2's learned positions, `Gather(wpe, position_ids)`): a constant folded per position.

The table is a float initializer (or the transpose of one: a tied lm_head's [hidden, vocab]
weights, as the onnxruntime-genai builder shares them), integer weights a DequantizeLinear dequantizes (QDQ: a float
table dequantized at compile time), or an integer table a DequantizeLinear after the Gather
dequantizes (quantize_dynamic: the Gather waits for it, see ops/qdq.py).

Indices known at compile time (positions: `Range` of the sequence, or assumed position ids
past .. past+seq-1) gather from a float initializer at compile time: the result is a constant,
with its rows at every position 0 .. max_ctx-1 (`Static.table`) when the indices have that form,
so an Add to the token embeddings becomes a position table (`Lifter.position_table`, as RoPE's
cos/sin are), checked to be a function of the position.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from cimc.frontend.converters import Unsupported, no_weights, standard
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


def gather_constant(lifter: Lifter, node: Node, args: list) -> Term:
    """Rows of a float initializer at indices known at compile time (positions): a constant. An
    integer table waits for its DequantizeLinear (quantize_dynamic), as for token ids."""
    table, ids = args
    if not (isinstance(table, Lazy) and isinstance(ids, Static)) or table.transpose or \
            node.attrs.get("axis", 0) != 0 or len(table.shape) != 2:
        return no_weights(lifter, node, args)
    if lifter.model.initializers[table.init].data_type != TensorProto.FLOAT:
        return gather(lifter, node, args)
    return gathered(node.outputs[0], np.asarray(lifter.weights(table.init), np.float32), ids, table.init)


def gathered(name: str, rows: np.ndarray, ids: Static, what: str) -> Static:
    """The constant `rows[ids]` at every binding of the indices (and at every position, if they
    have a per-position form)."""

    def take(idx: np.ndarray | None) -> np.ndarray | None:
        if idx is None:
            return None
        idx = np.asarray(idx).astype(np.int64)
        if idx.size and not (-len(rows) <= idx.min() and idx.max() < len(rows)):
            raise Unsupported(f"indices {idx.min()}..{idx.max()} run past the {len(rows)} rows of {what!r} "
                              "(at --max-ctx positions: reduce it)")
        return np.take(rows, idx, axis=0)

    return Static(name, take(ids.value), take(ids.value2), False, take(ids.table))


standard("Gather", gather, weights=gather_constant)
