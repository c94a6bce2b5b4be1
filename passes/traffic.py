"""The least DRAM traffic of a run, from the IR alone (see `isa.traffic.MinTraffic`).

What any program for this model must move, whatever its code: every weight streamed through
the macros once at its bit width; each constant the run reads once (norm weights and biases,
the embedding rows of its tokens, the RoPE table rows of its positions); the KV cache once (the
cached positions read, the new ones written; behind a sliding window of W keys only the last
W - 1 cached positions can be seen, so only those count, however the code keeps the cache); the
graph inputs it reads and the outputs it writes; and every activation larger than the global
buffer written out and read back once.
"""

from __future__ import annotations

from cimc.ir.core import CTX, SEQ, Module, Op, Value
from cimc.ir.ops import traits
from isa.dtypes import IDS, elem
from isa.hw import HardwareConfig
from isa.traffic import BOUND_KINDS, MinTraffic
from passes.tiling import Tiling


def min_traffic(module: Module, hw: HardwareConfig) -> MinTraffic:
    """The bound for runs of this module on `hw` (only the global buffer's size matters)."""
    terms = {k: [0.0, 0.0, 0.0] for k in BOUND_KINDS}  # fixed, per seq, per past

    def rows_term(kind: str, v: Value, row_bytes: float) -> None:
        """`v`'s rows (seq, ctx = past + seq, or a count) of `row_bytes` each, once per run."""
        rows = v.type.shape[0] if v.type.rank == 2 else 1
        t = terms[kind]
        if rows == SEQ:
            t[1] += row_bytes
        elif rows == CTX:
            t[1] += row_bytes
            t[2] += row_bytes
        else:
            t[0] += int(rows) * row_bytes

    seen: set[int] = set()
    large: list[tuple[str, float, float]] = []
    windows: list[tuple[int, float]] = []
    buffer = hw.global_buf.size_kb * 1024
    outputs = {id(o.operands[0]) for o in module.outputs()}
    for op in module.ops:
        if op.name == "linear":
            t = Tiling.from_attr(op.attrs["tiling"])
            terms["weights"][0] += t.least_bytes()
            if len(op.operands) == 3:
                _once(seen, op.operands[2], terms)
        elif op.name == "embedding":
            table = op.operands[1]
            terms["io"][1] += elem(IDS).nbytes  # one id per token
            terms["constants"][1] += _row_bytes(table)  # the table row of each token
        elif op.name == "kv_append":
            window = _window(op)
            if window:  # new rows written; the cached rows the window sees read (MinTraffic.windows)
                terms["kv_cache"][1] += _row_bytes(op.result)
                windows.append((window, float(_row_bytes(op.result))))
            else:
                rows_term("kv_cache", op.result, _row_bytes(op.result))  # past rows read, new ones written
        elif op.name == "output":
            v = op.operands[0]
            if v.owner is not None and not traits(v.owner).state:
                rows_term("io", v, _row_bytes(v))
        else:
            for v in op.operands:
                if v.owner is not None and traits(v.owner).constant:
                    _once(seen, v, terms)
        t = traits(op)
        if op.results and t.unit != "none" and not t.state and id(op.results[0]) not in outputs:  # an activation
            v = op.results[0]
            bound = elem(v.type.dtype).packed_bytes(_count(v, module.bounds))
            if bound > buffer:
                rows = v.type.shape[0] if v.type.rank == 2 else 1
                large.append((str(rows), float(_row_bytes(v)), 2.0))
    return MinTraffic({k: (a, b, c) for k, (a, b, c) in terms.items()}, tuple(large), buffer, tuple(windows))


def _window(append: Op) -> int:
    """The sliding window (keys each query sees) of the attention reading this cache, 0 if none."""
    return min((int(op.attrs.get("window", 0)) for op in append.result.users if op.name == "attention"), default=0)


def _once(seen: set[int], w: Value, terms: dict[str, list[float]]) -> None:
    """Charge a constant the first time the run reads it: a position table by the run's rows
    (positions past .. past+seq-1), anything else whole."""
    if id(w) in seen:
        return
    seen.add(id(w))
    if w.type.rank == 2 and w.type.shape[0] == CTX:
        terms["constants"][1] += _row_bytes(w)
    else:
        terms["constants"][0] += _bytes(w)


def _row_bytes(v: Value) -> float:
    return float(elem(v.type.dtype).packed_bytes(int(v.type.shape[1]) if v.type.rank == 2 else 1))


def _bytes(v: Value) -> float:
    return float(elem(v.type.dtype).packed_bytes(_count(v, {})))


def _count(v: Value, bounds: dict[str, int]) -> int:
    n = 1
    for d in v.type.bound_shape(bounds):
        n *= d
    return n
