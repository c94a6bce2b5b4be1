"""Simulated timelines as Chrome trace-event JSON, for ui.perfetto.dev and chrome://tracing.

A report gives totals; a picture of the timeline shows *why*: weight loads streaming over the
DRAM channel while tiles run MVMs and SFUs do vector work, and where a unit sits idle waiting for
a barrier. `write_trace` turns one or more simulated runs (say a prefill and the decode steps
after it) into a trace file a person opens in Perfetto.

Layout: one process, "cimc simulator". Its first track, "runs", holds one slice per run (named
by the run's label) so the boundaries between runs are visible. Then comes one track per unit
that any run uses, in unit order (dram, noc, tiles, SFUs, as `CostModel.unit_names`), kept in
that order by `thread_sort_index` metadata. Every instruction is a complete event (`"ph": "X"`)
on its main unit, from its start for `busy0` cycles, named by its mnemonic; one that also holds
the DRAM channel (a weight load, an operand in DRAM) adds `<mnemonic>:dram` on the dram track
for `busy1` cycles. Args carry the instruction's index within its run, its IR op, ONNX node,
model layer and busy cycles. Instructions that hold no unit (halt, sync) are not drawn. Runs
are laid back to back: each starts where the previous one ended.

Times are microseconds written with three decimals, i.e. whole nanoseconds, the resolution
Perfetto stores. Each slice boundary is rounded once from its cycle count, so slices that abut
on a unit (the in-order model never overlaps them) still do not overlap after rounding, as
they could if `ts` and `dur` were rounded independently (Perfetto drops badly nested slices).

Size: a 1B-parameter model's decode step is ~300k instructions, so many steps can exceed what a
viewer loads. When the events of all runs would exceed `max_events`, runs are sampled: the
first run and every k-th one after it are drawn in full, with the smallest k that fits; every
other run keeps its slice on the "runs" track, whose args say its instructions are not drawn.
If the first run alone does not fit, only its first instructions (program order) are drawn.
The file is streamed event by event, and written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from isa.atomic import atomic_file
from isa.cost import InstrCosts
from isa.program import DebugInfo
from isa.spec import BY_OPCODE
from runtime.timing import Timeline

PROCESS = "cimc simulator"
PID = 1
RUNS_TID = 1  # the "runs" track; unit u is on track u + 2


@dataclass
class TraceRun:
    """One simulated program run to put on the trace (arrays are indexed by instruction)."""

    label: str  # e.g. "prefill (8 tokens)" or "decode step 3"
    start: np.ndarray  # float cycles
    end: np.ndarray
    unit0: np.ndarray  # main unit index, or -1
    busy0: np.ndarray  # cycles on unit0
    unit1: np.ndarray  # the DRAM channel when the instruction also moves DRAM bytes, or -1
    busy1: np.ndarray
    names: list[str] | np.ndarray  # mnemonics, e.g. "mvm"
    ops: list[dict]  # debug op table: {"op": "linear", "loc": "node_linear_3", "layer": "layer0"}
    instr_op: np.ndarray  # index into `ops`

    @classmethod
    def from_sim(cls, label: str, timeline: Timeline, costs: InstrCosts, opcode: np.ndarray,
                 debug: DebugInfo) -> TraceRun:
        """A run from the simulator's pieces: timeline, priced program, opcodes, debug map."""
        codes, inverse = np.unique(np.asarray(opcode, dtype=np.int64), return_inverse=True)
        mnemonics = np.array([BY_OPCODE[int(c)].mnemonic for c in codes], dtype=object)
        return cls(label, timeline.start, timeline.end, costs.unit0, costs.busy0, costs.unit1, costs.busy1,
                   mnemonics[inverse], debug.ops, debug.instr_op)

    @property
    def total(self) -> float:
        """Cycles from the run's start until its last instruction ends."""
        return float(np.max(self.end)) if len(self.end) else 0.0


def write_trace(path: str | os.PathLike, runs: Sequence[TraceRun], unit_names: Sequence[str], f_clk_hz: float,
                *, max_events: int = 2_000_000) -> int:
    """Write `runs` back to back (each starts where the previous ended) as one Chrome trace.

    Returns the number of trace events written. Metadata and the per-run slices are always
    written; instruction events are sampled to keep the total within `max_events` (see the
    module docstring). Inconsistent runs raise ValueError; a failure to write raises CimcError,
    leaving no temporary file and any existing `path` untouched.
    """
    path = os.fspath(path)
    if not (np.isfinite(f_clk_hz) and f_clk_hz > 0):
        raise ValueError(f"clock frequency must be positive, got {f_clk_hz}")
    for run in runs:
        _check(run, len(unit_names))
    masks = [_event_mask(r) for r in runs]
    units: set[int] = set()
    for r, (m0, m1) in zip(runs, masks, strict=True):
        units.update(np.unique(np.asarray(r.unit0)[m0]).tolist(), np.unique(np.asarray(r.unit1)[m1]).tolist())
    used = sorted(units)
    fixed = 1 + 2 * (1 + len(used)) + len(runs)  # process name, track names and order, run slices
    events = [m0.astype(np.int64) + m1 for m0, m1 in masks]
    budgets = _plan([int(e.sum()) for e in events], max_events - fixed)
    shown = [_prefix(e, b) for e, b in zip(events, budgets, strict=True)]

    with atomic_file(path, "w", encoding="ascii", newline="\n") as f:
        count = _write(f, runs, masks, shown, unit_names, used, f_clk_hz, max_events)
    return count


def _check(run: TraceRun, n_units: int) -> None:
    n = len(run.start)
    arrays = {"end": run.end, "unit0": run.unit0, "busy0": run.busy0, "unit1": run.unit1, "busy1": run.busy1,
              "names": run.names, "instr_op": run.instr_op}
    bad = [k for k, a in arrays.items() if len(a) != n]
    if bad:
        raise ValueError(f"run {run.label!r}: {', '.join(bad)} do not have {n} entries like start")
    for k in ("start", "end", "busy0", "busy1"):
        a = np.asarray(getattr(run, k), dtype=np.float64)
        if n and not (np.isfinite(a).all() and a.min() >= 0):
            raise ValueError(f"run {run.label!r}: {k} must be finite and non-negative")
    for k in ("unit0", "unit1"):
        a = np.asarray(getattr(run, k))
        if n and not (-1 <= a.min() and a.max() < n_units):
            raise ValueError(f"run {run.label!r}: {k} holds a unit outside -1..{n_units - 1}")
    if n and not (0 <= np.min(run.instr_op) and np.max(run.instr_op) < len(run.ops)):
        raise ValueError(f"run {run.label!r}: instr_op points outside its {len(run.ops)} ops")


def _event_mask(run: TraceRun) -> tuple[np.ndarray, np.ndarray]:
    """Which instructions get an event on their main unit, and which one on the DRAM channel."""
    return ((np.asarray(run.unit0) >= 0) & (np.asarray(run.busy0) > 0),
            (np.asarray(run.unit1) >= 0) & (np.asarray(run.busy1) > 0))


def _prefix(events: np.ndarray, budget: int) -> int:
    """How many leading instructions (with `events` events each) to draw within `budget` events."""
    if budget >= events.sum():
        return len(events)
    return 0 if budget <= 0 else int(np.searchsorted(np.cumsum(events), budget, side="right"))


def _plan(counts: list[int], budget: int) -> list[int]:
    """Instruction events to draw per run: all of runs 0, k, 2k... for the smallest k that fits the
    budget, none of the others; if run 0 alone does not fit, as many of its events as do."""
    budget = max(budget, 0)
    for k in range(1, len(counts) + 1):
        if sum(counts[::k]) <= budget:
            return [c if i % k == 0 else 0 for i, c in enumerate(counts)]
    return [min(c, budget) if i == 0 else 0 for i, c in enumerate(counts)]


def _us(ns: int) -> str:
    """Nanoseconds as microseconds with three decimals (exact, unlike a float)."""
    return f"{ns // 1000}.{ns % 1000:03d}"


def _dumps(x: object) -> str:
    return json.dumps(x, separators=(",", ":"), sort_keys=True)


def _write(f: TextIO, runs: Sequence[TraceRun], masks: list[tuple[np.ndarray, np.ndarray]], shown: list[int],
           unit_names: Sequence[str], used: list[int], f_clk_hz: float, max_events: int) -> int:
    """The whole document: header, metadata, run slices, then each run's instruction events."""
    ns_per_cycle = 1e9 / f_clk_hz
    f.write('{"displayTimeUnit":"ns","otherData":' + _dumps({"generator": "cimc", "f_clk_hz": float(f_clk_hz)})
            + ',"traceEvents":[\n')
    head = f'{{"pid":{PID},'
    meta = [head + f'"ph":"M","name":"process_name","args":{_dumps({"name": PROCESS})}}}']
    for tid, name, order in [(RUNS_TID, "runs", 0), *((u + 2, unit_names[u], u + 1) for u in used)]:
        meta.append(head + f'"tid":{tid},"ph":"M","name":"thread_name","args":{_dumps({"name": name})}}}')
        meta.append(head + f'"tid":{tid},"ph":"M","name":"thread_sort_index","args":{{"sort_index":{order}}}}}')
    f.write(",\n".join(meta))
    count = len(meta)

    offsets = np.concatenate([[0.0], np.cumsum([r.total for r in runs])]).tolist()
    for k, run in enumerate(runs):
        n = len(run.start)
        args = {"run": k, "instructions": n, "cycles": run.total, "instructions_drawn": shown[k]}
        if shown[k] < n:
            args["note"] = f"{n - shown[k]} of {n} instructions not drawn (trace limited to {max_events} events)"
        t0, t1 = (round(x * ns_per_cycle) for x in offsets[k:k + 2])
        f.write(f',\n{head}"tid":{RUNS_TID},"ph":"X","name":{_dumps(run.label)},"ts":{_us(t0)},"dur":{_us(t1 - t0)},'
                f'"args":{_dumps(args)}}}')
        count += 1
    for k, run in enumerate(runs):
        count += _write_run(f, run, masks[k], shown[k], offsets[k], ns_per_cycle, head)
    f.write("\n]}\n")
    return count


def _write_run(f: TextIO, run: TraceRun, mask: tuple[np.ndarray, np.ndarray], m: int, offset: float,
               ns_per_cycle: float, head: str) -> int:
    """Events (where `mask` says, see `_event_mask`) of the first `m` instructions of `run`,
    offset by `offset` cycles."""
    start = np.asarray(run.start[:m], dtype=np.float64)

    def ns(t: np.ndarray) -> list[int]:
        return np.rint((offset + t) * ns_per_cycle).astype(np.int64).tolist()

    busy0 = np.asarray(run.busy0[:m], dtype=np.float64)
    busy1 = np.asarray(run.busy1[:m], dtype=np.float64)
    t_start, t_end0, t_end1 = ns(start), ns(start + busy0), ns(start + busy1)
    cycles0, cycles1 = busy0.tolist(), busy1.tolist()
    draw0, draw1 = (d[:m].tolist() for d in mask)
    unit0, unit1 = np.asarray(run.unit0[:m]).tolist(), np.asarray(run.unit1[:m]).tolist()
    names = np.asarray(run.names[:m]).tolist()
    op_of = np.asarray(run.instr_op[:m]).tolist()
    op_args = [_dumps({"op": o.get("op", ""), "onnx": o.get("loc", ""), "layer": o.get("layer", "")})[1:-1]
               for o in run.ops]
    quoted: dict[str, tuple[str, str]] = {}
    count = 0
    for i in range(m):
        if not (draw0[i] or draw1[i]):
            continue
        name = names[i]
        if name not in quoted:
            quoted[name] = (_dumps(name), _dumps(name + ":dram"))
        common = f'"ts":{_us(t_start[i])},"args":{{"instr":{i},{op_args[op_of[i]]},"cycles":'
        for draw, unit, end, cycles, label in ((draw0[i], unit0[i], t_end0[i], cycles0[i], quoted[name][0]),
                                               (draw1[i], unit1[i], t_end1[i], cycles1[i], quoted[name][1])):
            if draw:
                f.write(f',\n{head}"tid":{unit + 2},"ph":"X","name":{label},"dur":{_us(end - t_start[i])},'
                        f'{common}{cycles!r}}}}}')
                count += 1
    return count
