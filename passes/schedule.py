"""`schedule`: place every activation in memory and pick the SFU each vector op runs on.

Program order is the IR order (a topological order the frontend produced). Activations go to
the global buffer when they fit, next-fit by address over their live range; what does not fit
spills to a DRAM read-write region, and every access to it is charged as DRAM traffic. Graph
inputs and outputs always live in that DRAM region (the host reads and writes them there).
Ops that need scratch space (partial sums of a K-split linear, attention scores, norm
temporaries) get it for their own duration. The DRAM region starts with what lives there for
good: the KV caches, in program order (so every entry compiled from the same model finds them at
the same addresses), then the graph inputs and outputs; spills take the rest. A `kv_append`
result is its cache (same memory).

Adds `mem = {space, addr, stride}` to each op with an activation result (`space` is "g" for the
global buffer or "rw" for the DRAM region, addresses relative to it), `scratch = {space, addr}`
where needed, `sfu` (the tile whose vector unit runs the op), `slots` (heads an attention runs
at once) and the module's `memory` summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from cimc.ir.core import CTX, Module, Op, Rewriter, Value
from cimc.ir.ops import traits
from isa.dtypes import ACT, elem
from passes.manager import PassContext, register
from passes.tiling import DRAM_ALIGN, Tiling, align

ELEM = elem(ACT).nbytes  # scratch tensors hold activations


def scratch_layout(op: Op, bounds: dict[str, int]) -> list[tuple[str, int, int, int, int]]:
    """(name, byte offset, rows, cols, element bytes) of the scratch tensors an op needs while it
    runs: f32 unless said otherwise."""
    rows = op.results[0].type.bound_shape(bounds)[0] if op.results else 0
    parts: list[tuple[str, int, int, int]] = []
    if op.name == "linear" and "tiling" in op.attrs:
        t = Tiling.from_attr(op.attrs["tiling"])
        if t.kchunks > 1:
            parts.append(("psum", rows * t.kchunks, t.n, ELEM))
        if op.attrs.get("act") == "i8":  # the inputs as int8, and their scales
            parts += [("xq", rows, t.k, 1), ("xs", rows, t.scale_rows(0, t.k), ELEM)]
        elif op.attrs.get("act") == "u8":  # the inputs as uint8, and each row's scale and zero point
            parts += [("xq", rows, t.k, 1), ("xs", rows, 2, ELEM)]
    elif op.name == "attention":
        for slot in range(op.attrs.get("slots", 1)):
            parts += [(*p, ELEM) for p in _attention_parts(slot, *attention_shape(op, bounds))]
    elif traits(op).norm or op.name == "softmax":  # a norm's squares (layer_norm: centred values) and row sums
        cols = int(op.results[0].type.shape[1])
        parts += [("t", rows, cols if traits(op).norm else 1, ELEM), ("s", rows, 1, ELEM)]
    out, off = [], 0
    for name, r, c, e in parts:
        out.append((name, off, r, c, e))
        off = align(off + r * c * e)
    return out


def attention_shape(op: Op, bounds: dict[str, int]) -> tuple[bool, int, int, int]:
    """How codegen splits an attention: (grouped, query rows, past keys, new keys), bounds.

    With a KV cache, the keys are the cached positions 0 .. past-1, read from DRAM, followed by
    the run's own rows, still on chip. Grouped (one token per run): the query heads sharing a
    KV head are the rows of one matrix, so each KV head is read once per step; otherwise each
    query head attends on its own over its `rows` tokens.
    """
    rows = op.results[0].type.bound_shape(bounds)[0]
    cached = op.operands[1].type.shape[0] == CTX
    grouped = cached and rows == 1
    queries = op.attrs["heads"] // op.attrs["kv_heads"] if grouped else rows
    past = bounds[CTX] if cached else 0
    return grouped, queries, past, rows


def _attention_parts(slot: int, grouped: bool, queries: int, past: int, new: int) -> list[tuple[str, int, int]]:
    """The scratch of one attention slot: scores over the past keys (p) and the new ones (s),
    their row maxima (m, n) and row sums (l, k)."""
    parts = [(f"s{slot}", queries, new), (f"m{slot}", queries, 1), (f"l{slot}", queries, 1)]
    if past:
        parts += [(f"p{slot}", queries, past), (f"n{slot}", queries, 1), (f"k{slot}", queries, 1)]
    return parts


def scratch_bytes(op: Op, bounds: dict[str, int]) -> int:
    lay = scratch_layout(op, bounds)
    return align(lay[-1][1] + lay[-1][2] * lay[-1][3] * lay[-1][4]) if lay else 0


def attention_slots(op: Op, bounds: dict[str, int], tiles: int, budget: int) -> int:
    """Heads (or KV groups) computed concurrently, one per SFU, each with its own score buffer:
    as many as there are tiles, but no more than fit in `budget` bytes (long contexts), at least one."""
    grouped, queries, past, new = attention_shape(op, bounds)
    jobs = op.attrs["kv_heads"] if grouped else op.attrs["heads"]
    per_slot = sum(align(r * c * ELEM) for _, r, c in _attention_parts(0, grouped, queries, past, new))
    return max(1, min(jobs, tiles, budget // per_slot))


class _Pool:
    """Next-fit allocator over an address-ordered free list.

    Searching from just past the previous allocation (wrapping around) rather than from the
    start avoids handing out the memory a value freed a moment ago; reusing it at once would
    make the next op wait for that value's last readers (a write-after-read) for no reason.
    The spill region (no capacity) uses plain first-fit to stay small.
    """

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity if capacity is not None else 1 << 60)]
        self.peak = 0
        self.cursor = 0

    def alloc(self, size: int) -> int | None:
        size = align(max(size, DRAM_ALIGN))
        order = range(len(self.free)) if self.capacity is None else \
            sorted(range(len(self.free)), key=lambda i: (self.free[i][0] < self.cursor, self.free[i][0]))
        for i in order:
            start, length = self.free[i]
            if length >= size:
                self.free[i] = (start + size, length - size)
                if self.free[i][1] == 0:
                    del self.free[i]
                self.peak = max(self.peak, start + size)
                self.cursor = start + size
                return start
        return None

    def release(self, addr: int, size: int) -> None:
        size = align(max(size, DRAM_ALIGN))
        self.free.append((addr, size))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self.free = merged


def value_bytes(v: Value, bounds: dict[str, int]) -> int:
    return elem(v.type.dtype).packed_bytes(math.prod(v.type.bound_shape(bounds)))


def reads(op: Op) -> list[Value]:
    """The values an op reads: its operands and, for an attention over a KV cache, the rows its
    `kv_append`s add (attention takes them from where they were computed, not back from DRAM)."""
    extra = [v.owner.operands[1] for v in op.operands[1:] if op.name == "attention" and v.owner is not None
             and v.owner.name == "kv_append"]
    return [*op.operands, *extra]


def last_uses(module: Module) -> dict[int, int]:
    """For every value (by id), the index of the last op reading it; a result nobody reads dies
    where it is made."""
    last: dict[int, int] = {}
    for i, op in enumerate(module.ops):
        for v in (*reads(op), *(r for r in op.results if not r.users)):
            last[id(v)] = i
    return last


def _place(pools: dict[str, _Pool], size: int) -> tuple[str, int]:
    """The global buffer if `size` bytes fit there now, else the DRAM spill region."""
    addr = pools["g"].alloc(size)
    return ("g", addr) if addr is not None else ("rw", pools["rw"].alloc(size))


@register
@dataclass(frozen=True)
class SchedulePass:
    name: ClassVar[str] = "schedule"

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        hw, bounds, tiles = ctx.hw, module.bounds, ctx.hw.chip.tiles
        gbuf = hw.global_buf.size_kb * 1024
        pools = {"g": _Pool(gbuf), "rw": _Pool(None)}
        io_values = {id(op.operands[0]) for op in module.outputs()}
        # what lives in DRAM for good comes first: KV caches, then graph inputs and outputs
        placed = [*module.walk("kv_cache"), *(op for op in module.ops if op.results and op.name != "kv_append"
                                              and (op.name == "input" or id(op.results[0]) in io_values))]
        for op in placed:
            v = op.results[0]
            rw.set_attr(op, "mem", {"space": "rw", "addr": pools["rw"].alloc(value_bytes(v, bounds)),
                                    "stride": _stride(v)})
        last_use = last_uses(module)
        placed_ids = {id(op) for op in placed}
        dying: dict[int, list[tuple[str, int, int]]] = {}
        next_sfu = 0
        for i, op in enumerate(module.ops):
            if traits(op).unit == "sfu" or op.attrs.get("act") in ("i8", "u8"):  # an 8-bit linear quantizes its input
                rw.set_attr(op, "sfu", next_sfu)
                next_sfu = (next_sfu + 1) % tiles
            if op.name == "attention":
                rw.set_attr(op, "slots", attention_slots(op, bounds, tiles, gbuf // 2))
            if op.name == "kv_append":
                rw.set_attr(op, "mem", dict(op.operands[0].owner.attrs["mem"]))  # type: ignore[union-attr]
            elif op.results and not traits(op).constant and id(op) not in placed_ids:
                v = op.results[0]
                size = value_bytes(v, bounds)
                space, addr = _place(pools, size)
                rw.set_attr(op, "mem", {"space": space, "addr": addr, "stride": _stride(v)})
                dying.setdefault(last_use[id(v)], []).append((space, addr, size))
            need = scratch_bytes(op, bounds)
            if need:
                space, addr = _place(pools, need)
                rw.set_attr(op, "scratch", {"space": space, "addr": addr})
                dying.setdefault(i, []).append((space, addr, need))
            for space, addr, size in dying.pop(i, []):
                pools[space].release(addr, size)
        rw.set_module_attr("memory", {"gbuf_bytes": pools["g"].peak, "rw_bytes": align(pools["rw"].peak, 4096)})


def _stride(v: Value) -> int:
    return int(v.type.shape[1]) if v.type.rank == 2 else 1
