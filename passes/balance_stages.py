"""`balance-stages`: group the weight stream into pipeline stages that ping-pong between sets.

Stage s loads its weight groups into macro set `s mod sets` while earlier stages compute on the
other set(s). With the cost model, a stage's load time is max(DRAM time of its bytes, the
slowest macro write), and its compute time is its MVMs (tiles in parallel) plus the vector work
(norms, attention, ...) between linears that falls in it. The pipeline then runs as

    load_end[s]    = max(load_end[s-1], compute_end[s-sets]) + load[s]
    compute_end[s] = max(load_end[s], compute_end[s-1]) + compute[s]

The pass tries every stage size from 1 to `tiles_per_set` groups, each either spanning vector
work or cutting at it, and keeps the partition with the smallest estimated makespan (on ties, the
fewer stages). `rows` is the number of tokens the estimate assumes (default: max_seq).

The estimate is the compiler's, not the simulation: vector work is counted per IR op from its
element count (`sfu_estimate`), and activations that `schedule` later spills to DRAM are not
charged; the simulator charges both exactly.

Adds `stages = [[stage, first_group, count], ...]` to each linear and a `balance` summary to the
module (stage count, estimated cycles, slowest stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cimc.ir.core import CTX, SEQ, Module, Op, Rewriter
from isa.cost import CostModel
from isa.diag import CimcError
from passes.manager import PassContext, register
from passes.tiling import Tiling

#: Input bits fed serially per weight mode (fp32 inputs are aligned to a 32-bit significand).
ACT_BITS = {32: 32}


def act_bits(wbits: int, hw_act_bits: int) -> int:
    return ACT_BITS.get(wbits, hw_act_bits)


@register
@dataclass(frozen=True)
class BalanceStagesPass:
    name: ClassVar[str] = "balance-stages"
    rows: int = 0

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        if "macro_sets" not in module.attrs:
            raise CimcError("balance-stages needs place-weights first")
        if self.rows < 0:
            raise CimcError(f"balance-stages: rows must be 0 (max_seq) or more, got {self.rows}")
        sets = module.attrs["macro_sets"]
        per = len(sets[0])
        rows = self.rows or module.max_seq
        dram, write, comp, op_of, sfu_after = self._items(module, rows, ctx)
        if not op_of:  # no weights to stream
            rw.set_module_attr("balance", {"stages": 0, "est_cycles": 0.0, "slowest_stage_cycles": 0.0})
            return
        best = None
        for cap in range(1, per + 1):
            for cut_at_sfu in (False, True):
                bounds = _partition(len(op_of), cap, sfu_after if cut_at_sfu else None)
                est, slowest = _estimate(bounds, dram, write, comp, sfu_after, len(sets))
                key = (round(est, 6), len(bounds))
                if best is None or key < best[0]:
                    best = (key, bounds, est, slowest, cap)
        assert best is not None
        _, bounds, est, slowest, cap = best
        self._annotate(module, rw, bounds, op_of)
        rw.set_module_attr("balance", {"stages": len(bounds), "est_cycles": float(round(est, 3)),
                                       "slowest_stage_cycles": float(round(slowest, 3)), "max_groups": cap,
                                       "rows": rows})

    def _items(self, module: Module, rows: int, ctx: PassContext):
        """Per weight group in stream order: DRAM cycles, macro write cycles, MVM cycles, owning
        linear, and the vector work after it."""
        cost = ctx.cost
        dram, write, comp, op_of, sfu_after = [], [], [], [], []
        pending_sfu = 0.0
        for op in module.ops:
            if op.name != "linear":
                pending_sfu += sfu_estimate(op, rows, cost)
                continue
            if sfu_after:
                sfu_after[-1] += pending_sfu
            pending_sfu = 0.0
            t = Tiling.from_attr(op.attrs["tiling"])
            ab = act_bits(t.wbits, ctx.hw.macro.act_bits)
            same_level = bool(op_of) and op_of[-1].operands[0] is op.operands[0]
            for g in range(t.groups):
                _, k0, k1, n0, n1 = t.group(g)
                k, n = k1 - k0, n1 - n0
                dram.append(cost.dram_cycles(k * n * t.wbits / 8))
                write.append(float(cost.write_cycles(k, n, t.wbits)))
                first_of_level = g == 0 and not same_level
                comp.append(float(cost.mvm_cycles(rows, ab)) if first_of_level else 0.0)
                op_of.append(op)
                sfu_after.append(0.0)
        if sfu_after:
            sfu_after[-1] += pending_sfu
        return dram, write, comp, op_of, sfu_after

    def _annotate(self, module: Module, rw: Rewriter, bounds: list[tuple[int, int]], op_of: list[Op]) -> None:
        first: dict[int, int] = {}
        for i, op in enumerate(op_of):
            first.setdefault(id(op), i)
        per_op: dict[int, list] = {}
        for s, (a, b) in enumerate(bounds):
            i = a
            while i < b:
                op = op_of[i]
                j = i
                while j < b and op_of[j] is op:
                    j += 1
                per_op.setdefault(id(op), []).append([s, i - first[id(op)], j - i])
                i = j
        for op in module.walk("linear"):
            rw.set_attr(op, "stages", per_op.get(id(op), []))


def sfu_estimate(op: Op, rows: int, cost: CostModel) -> float:
    """Rough SFU cycles of a non-linear op (the compiler's estimate, not the simulation)."""
    if not op.results or op.name in ("weight", "const", "input", "embedding", "kv_cache", "kv_append"):
        return 0.0
    shape = op.results[0].type.shape
    r = rows if shape and shape[0] in (SEQ, CTX) else (int(shape[0]) if shape else 1)
    elems = r * (int(shape[1]) if len(shape) > 1 else 1)
    if op.name == "attention":
        h, hd = op.attrs["heads"], op.attrs["head_dim"]
        per_head = 2 * float(cost.sfu_cycles(r * r * hd, 2.0)) + float(cost.sfu_cycles(r * r, 8.0))
        return per_head * -(-h // min(h, cost.tiles))
    ops = {"rms_norm": 6.0, "softmax": 8.0, "rope": 3.0, "swiglu": 5.0}.get(op.name, 1.0)
    return float(cost.sfu_cycles(elems, ops))


def _partition(n: int, cap: int, sfu_after: list[float] | None) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for i in range(n):
        if i - start + 1 == cap or i == n - 1 or (sfu_after is not None and sfu_after[i] > 0):
            bounds.append((start, i + 1))
            start = i + 1
    return bounds


def _estimate(bounds, dram, write, comp, sfu_after, sets: int) -> tuple[float, float]:
    """Makespan of the two-resource pipeline and its slowest stage (max of load, compute).

    `comp[i]` is the MVM time group i adds to its stage: groups of one dependency level (the
    linears reading the same input, like q/k/v) run in parallel on their tiles, so only the
    first group of a level counts; later levels wait for earlier ones.
    """
    load_end = [0.0] * len(bounds)
    comp_end = [0.0] * len(bounds)
    slowest = 0.0
    for s, (a, b) in enumerate(bounds):
        ls = max(sum(dram[a:b]), max(write[a:b]))
        cs = sum(comp[a:b]) + sum(sfu_after[a:b])
        prev_load = load_end[s - 1] if s else 0.0
        free = comp_end[s - sets] if s >= sets else 0.0
        load_end[s] = max(prev_load, free) + ls
        comp_end[s] = max(load_end[s], comp_end[s - 1] if s else 0.0) + cs
        slowest = max(slowest, ls, cs)
    return comp_end[-1], slowest
