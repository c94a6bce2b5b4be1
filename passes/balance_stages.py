"""`balance-stages`: group the weight stream into pipeline stages that ping-pong between sets.

Stage s loads its weight groups into macro set `s mod sets` while earlier stages compute on the
other set(s): codegen issues the loads of stage s + sets right after stage s's MVMs are done.
Which partition is best depends on everything the program does, so the pass prices candidates
with the compiler's estimate (`isa.estimate`) over the instructions codegen emits: it generates
the module's code once, prices every instruction with the cost model at `rows` tokens after
`past` cached ones, and for each candidate re-orders those priced instructions as codegen would
emit them (`codegen.StageOrder`: a sync after each stage's last group, then the next loads of
that macro set) and plays them. Candidates: every stage size from 1 to `tiles_per_set` groups, each either spanning
vector work or cutting at it; the smallest estimate wins (on ties, the fewer stages). Programs
longer than `FULL_SEARCH_INSTRS` instructions search from the largest stages down, while the
estimate improves.

Adds `stages = [[stage, first_group, count], ...]` to each linear and a `balance` summary to the
module (stage count, estimated cycles, the candidate chosen, rows and past it assumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cimc.ir.core import Module, Op, Rewriter
from isa.cost import DramMap
from isa.diag import CimcError
from isa.encoding import decode_columns
from isa.estimate import JOIN, Stream, estimate
from isa.fields import REGS
from isa.spec import BY_NAME
from passes.codegen import StageOrder, _Codegen, group_tile, load_wait, stage_barrier
from passes.manager import PassContext, register
from passes.tiling import Tiling

#: Programs up to this many instructions try every candidate; longer ones search from the largest
#: stages down while that lowers the estimate (each estimate of a 1B-parameter model takes seconds).
FULL_SEARCH_INSTRS = 50000


@register
@dataclass(frozen=True)
class BalanceStagesPass:
    name: ClassVar[str] = "balance-stages"
    rows: int = 0
    past: int = 0

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        if "macro_sets" not in module.attrs or "memory" not in module.attrs:
            raise CimcError("balance-stages needs place-weights and schedule first")
        rows = self.rows or module.max_seq
        if not 1 <= rows <= module.max_seq:
            raise CimcError(f"balance-stages: rows must be 0 (max_seq) or 1..{module.max_seq}, got {self.rows}")
        if not 0 <= self.past <= module.max_ctx - rows:
            raise CimcError(f"balance-stages: past must be in 0..{module.max_ctx - rows} (max_ctx - rows), "
                            f"got {self.past}")
        linears = list(module.walk("linear"))
        groups = [Tiling.from_attr(op.attrs["tiling"]).groups for op in linears]
        if not linears:  # no weights to stream
            rw.set_module_attr("balance", {"stages": 0, "est_cycles": 0.0, "rows": rows, "past": self.past})
            return
        vector_after = _vector_work_after(module, linears, groups)
        per = len(module.attrs["macro_sets"][0])
        plan = _Plan(module, rw, ctx, linears, groups, rows, self.past)
        tried: dict[tuple[int, bool], tuple[tuple[float, int], list[tuple[int, int]]]] = {}
        known: dict[tuple[tuple[int, int], ...], float] = {}  # candidates often coincide

        def price(cap: int, cut: bool) -> tuple[float, int]:
            if (cap, cut) not in tried:
                bounds = _partition(sum(groups), cap, vector_after if cut else None)
                key = tuple(bounds)
                if key not in known:
                    known[key] = round(plan.estimate(bounds), 6)
                tried[(cap, cut)] = ((known[key], len(bounds)), bounds)
            return tried[(cap, cut)][0]

        if len(plan.stream.op) <= FULL_SEARCH_INSTRS:
            for cap in range(1, per + 1):
                for cut in (False, True):
                    price(cap, cut)
        else:  # descend from the largest stages while that helps
            cut = min((False, True), key=lambda c: price(per, c))
            for cap in range(per - 1, 0, -1):
                if price(cap, cut) >= price(cap + 1, cut):
                    break
        (cap, cut), ((est, _), bounds) = min(tried.items(), key=lambda kv: kv[1][0])
        _annotate(rw, linears, groups, bounds)
        rw.set_module_attr("balance", {"stages": len(bounds), "est_cycles": float(round(est, 3)), "max_groups": cap,
                                       "cut_at_vector_work": cut, "rows": rows, "past": self.past})


def _vector_work_after(module: Module, linears: list[Op], groups: list[int]) -> list[bool]:
    """Per weight group in stream order: whether vector work (an op on an SFU) follows it before
    the next linear's groups."""
    after = [False] * sum(groups)
    last, seen = -1, 0
    index = {id(op): i for i, op in enumerate(linears)}
    for op in module.ops:
        if id(op) in index:
            seen += groups[index[id(op)]]
            last = seen - 1
        elif "sfu" in op.attrs and last >= 0:
            after[last] = True
    return after


def _partition(n: int, cap: int, cut_after: list[bool] | None) -> list[tuple[int, int]]:
    """Stages as [first, end) ranges of the group stream: `cap` groups at most, and (with
    `cut_after`) ending where vector work follows."""
    bounds, start = [], 0
    for i in range(n):
        if i - start + 1 == cap or i == n - 1 or (cut_after is not None and cut_after[i]):
            bounds.append((start, i + 1))
            start = i + 1
    return bounds


def _annotate(rw: Rewriter, linears: list[Op], groups: list[int], bounds: list[tuple[int, int]]) -> None:
    """`stages = [[stage, first group, count], ...]` on each linear."""
    first = np.concatenate([[0], np.cumsum(groups)]).tolist()
    for op, g0, g1 in zip(linears, first, first[1:], strict=False):
        rw.set_attr(op, "stages", [[s, max(a, g0) - g0, min(b, g1) - max(a, g0)]
                                   for s, (a, b) in enumerate(bounds) if a < g1 and b > g0])


class _Plan:
    """The module's code, generated once and priced, cut into the pieces a partition re-orders:
    per linear, its MVMs and weight loads (one per group) and the instructions after them; the
    other ops' instructions as they are."""

    def __init__(self, module: Module, rw: Rewriter, ctx: PassContext, linears: list[Op], groups: list[int],
                 rows: int, past: int) -> None:
        self.sets = module.attrs["macro_sets"]
        self.linears, self.groups = linears, groups
        _annotate(rw, linears, groups, _partition(sum(groups), len(self.sets[0]), None))  # any partition will do
        cg = _Codegen(module, ctx.hw, _no_weights, "balance")
        entry, _ = cg.run()
        cols = decode_columns(entry.code)
        regs = np.zeros(len(REGS), np.int64)
        regs[REGS.index("seq")], regs[REGS.index("past")], regs[REGS.index("ctx")] = rows, past, rows + past
        costs = ctx.cost.instr_costs(cols, regs, DramMap.from_meta(entry.meta))
        self.stream = Stream.priced(ctx.cost, costs, cols.opcode, cols.sig, cols.wait, entry.debug.instr_op)
        self.tile_unit, self.sfu_unit = ctx.cost.tile_unit, ctx.cost.sfu_unit
        op_of = entry.debug.instr_op.astype(np.int64)
        position = {id(op): i for i, op in enumerate(module.ops)}
        self.linear_at = {position[id(op)]: k for k, op in enumerate(linears)}
        self.position = [position[id(op)] for op in linears]
        self.slot0 = [op.attrs["dram"]["slot0"] for op in linears]
        mvm, wload, sync = (BY_NAME[m].opcode for m in ("mvm", "wload", "sync"))
        self.rows_of: dict[int, list[int]] = {}  # op position -> its instructions other than MVMs, loads, syncs
        self.mvm: dict[int, list[int]] = {}
        self.load: dict[int, list[int]] = {}
        for i, (o, code) in enumerate(zip(op_of.tolist(), cols.opcode.tolist(), strict=True)):
            table = self.mvm if code == mvm else self.load if code == wload else None if code == sync else self.rows_of
            if table is not None:
                table.setdefault(o, []).append(i)
        self.barrier = [int(self.stream.sig[self.mvm[position[id(op)]][0]]) for op in linears]
        self.n_ops = len(module.ops)

    def estimate(self, bounds: list[tuple[int, int]]) -> float:
        """The estimate for a partition (stage ranges over the group stream)."""
        stage_of = np.zeros(sum(self.groups), dtype=np.int64)
        for s, (a, b) in enumerate(bounds):
            stage_of[a:b] = s
        members: list[int] = [0] * len(bounds)  # barrier masks of the linears in each stage
        nsets = len(self.sets)
        first = np.concatenate([[0], np.cumsum(self.groups)]).tolist()
        order: list[int] = []
        loads: list[tuple[int, int, int]] = []  # (position in order, stage, tile)
        mvms: list[tuple[int, int]] = []  # (position, tile)
        syncs: list[tuple[int, int, int]] = []  # (position, stage, op)
        by_stage: list[list[tuple[int, int]]] = [[] for _ in bounds]  # (linear, group)
        for k in range(len(self.linears)):
            for g in range(self.groups[k]):
                by_stage[int(stage_of[first[k] + g])].append((k, g))

        def emit_loads(s: int) -> None:
            for k, g in by_stage[s]:
                loads.append((len(order), s, group_tile(self.sets, s, self.slot0[k], g)))
                order.append(self.load[self.position[k]][g])

        stage_order = StageOrder([b - a for a, b in bounds], nsets)
        for o in range(self.n_ops):
            k = self.linear_at.get(o)
            if k is None:
                order.extend(self.rows_of.get(o, []))
                continue
            for s in stage_order.first_loads():
                emit_loads(s)
            for g in range(self.groups[k]):
                s = int(stage_of[first[k] + g])
                mvms.append((len(order), group_tile(self.sets, s, self.slot0[k], g)))
                order.append(self.mvm[o][g])
                members[s] |= 1 << self.barrier[k]
                sync, next_loads = stage_order.after_mvm(s)
                if sync:
                    syncs.append((len(order), s, o))
                    order.append(-1)
                for s2 in next_loads:
                    emit_loads(s2)
            order.extend(self.rows_of.get(o, []))
        idx = np.array(order, dtype=np.int64)
        cand = self.stream.take(np.maximum(idx, 0))
        for pos, s, o in syncs:
            cand.op[pos], cand.kind[pos], cand.wait[pos], cand.sig[pos] = o, JOIN, members[s], stage_barrier(s)
            cand.unit[pos], cand.also[pos], cand.time[pos], cand.dram_done[pos] = -1, -1, 0.0, 0.0
            cand.pools[pos] = 0.0
        for pos, s, tile in loads:
            cand.wait[pos], cand.unit[pos] = load_wait(s, nsets), self.tile_unit(tile)
        for pos, tile in mvms:
            cand.unit[pos] = self.tile_unit(tile)
            if cand.also[pos] >= 0:  # the tile's SFU rescales integer partial sums
                cand.also[pos] = self.sfu_unit(tile)
        return estimate(cand)


def _no_weights(name: str) -> np.ndarray:
    raise AssertionError(f"balance-stages does not read weights ({name})")
