"""Column blocks of a linear's output, recomputed from the same weights' columns: a packed qkv
projection (GroupQueryAttention) or a fused projection split on activations (Phi-3's qkv and
gate_up, GPT-2's c_attn; see ops/layout.py). A `weight`/`qweight` op with `cols` reads those
columns only; constant vector ops after the linear (a bias added later) are split alike.
"""

from __future__ import annotations

import base64

import numpy as np

from cimc.frontend.converters import Unsupported
from cimc.frontend.lift import Lifter, Static
from cimc.ir.core import TensorType, Value


def _vector_of(lifter: Lifter, v: Value) -> np.ndarray | None:
    """The numbers of a constant vector operand (a `const`, or a plain float `weight`)."""
    op = v.owner
    if op is None or v.type.rank != 1:
        return None
    if op.name == "const":
        return np.frombuffer(base64.b64decode(op.attrs["data"]), "<f4")
    if op.name == "weight" and set(op.attrs) == {"init"}:
        return np.asarray(lifter.weights(op.attrs["init"]), np.float32).reshape(-1)
    return None


def split_columns(lifter: Lifter, v: Value, c0: int, c1: int, loc: str) -> Value:
    """Columns c0 .. c1-1 of the activation `v`, recomputed from the producing linear (the same
    weights' columns: a float or integer weight op's `cols`) and the elementwise ops by constant
    vectors after it."""
    op = v.owner
    n = int(v.type.shape[1])
    if op is not None and op.name == "linear" and op.operands[1].owner is not None \
            and op.operands[1].owner.name in ("weight", "qweight"):
        operands = [op.operands[0], _weight_columns(lifter, op.operands[1], c0, c1)]
        if len(op.operands) > 2:
            bias = _vector_of(lifter, op.operands[2])
            if bias is None:
                raise Unsupported("the packed qkv projection's bias is not a constant vector")
            operands.append(_const(lifter, bias[c0:c1], f"{loc}:bias[{c0}:{c1}]"))
        return lifter.op("linear", operands, op.loc, {k: op.attrs[k] for k in ("act",) if k in op.attrs})
    if op is not None and op.name in ("add", "mul", "sub") and len(op.operands) == 2:
        a, b = op.operands
        for x, c, left in ((a, b, True), (b, a, False)):
            vec = _vector_of(lifter, c)
            if vec is not None and x.type.rank == 2 and vec.size == n:
                part = split_columns(lifter, x, c0, c1, loc)
                cv = _const(lifter, vec[c0:c1], f"{op.loc}:[{c0}:{c1}]")
                return lifter.op(op.name, [part, cv] if left else [cv, part], op.loc)
    what = op.name if op is not None else "a graph input"
    raise Unsupported(f"packed qkv comes from {what}, not from a projection (and constant vector ops after it) "
                      "that can be split into its q, k and v column blocks")


def _weight_columns(lifter: Lifter, w: Value, c0: int, c1: int) -> Value:
    """Columns c0 .. c1-1 of the [K, n] `weight` or `qweight` w: the same op with `cols` (one per
    distinct set of attributes, shared by the nodes using it)."""
    src = w.owner
    assert src is not None
    k, n = (int(d) for d in w.type.shape)
    attrs = dict(src.attrs)
    b0, _, full = attrs.pop("cols", [0, n, n])
    attrs["cols"] = [b0 + c0, b0 + c1, full]
    t = TensorType(w.type.dtype, (k, c1 - c0))
    for op in lifter.module.walk(src.name):
        if op.attrs == attrs and op.result.type == t:
            return op.result
    return lifter.rw.create(src.name, [], [t], attrs, src.loc).result


def _const(lifter: Lifter, arr: np.ndarray, name: str) -> Value:
    arr = np.ascontiguousarray(arr, np.float32)
    return lifter.const(Static(name, arr, None, False), arr, False)
