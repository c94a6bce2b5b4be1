"""Simulated timelines as Chrome trace-event JSON, for ui.perfetto.dev and chrome://tracing.

A report gives totals; a picture of the timeline shows *why*: weight loads streaming over the
DRAM channel while tiles run MVMs and SFUs do vector work, and where a unit sits idle waiting for
a barrier. `write_trace` turns one or more simulated runs (say a prefill and the decode steps
after it) into a trace file a person opens in Perfetto.

Layout: one process, "cimc simulator". Its first track, "runs", holds one slice per run (named
by the run's label) so the boundaries between runs are visible. Then comes one track per unit
that any run uses, in unit order (`CostModel.unit_names`: DRAM channels, interconnect links,
global-buffer ports, tiles, SFUs, tile ports), kept in that order by `thread_sort_index`
metadata. Every resource an instruction holds is a complete event (`"ph": "X"`) on that
resource's track, from the instruction's start for the time it holds it, named by its mnemonic;
code fetches are events named `fetch` on the DRAM channels. Args carry the instruction's index
within its run, its IR op, ONNX node, model layer and busy cycles (a fetch: its code block).
Instructions that hold no resource (halt, sync) are not drawn. Runs are laid back to back:
each starts where the previous one ended.

Times are microseconds written with three decimals, i.e. whole nanoseconds, the resolution
Perfetto stores. Each slice boundary is rounded once from its cycle count, so slices that abut
on a unit (the in-order model never overlaps them) still do not overlap after rounding, as
they could if `ts` and `dur` were rounded independently (Perfetto drops badly nested slices).

Size: a 1B-parameter model's decode step is ~300k instructions holding a few resources each,
so many steps can exceed what a viewer loads. When the events of all runs would exceed
`max_events`, runs are sampled: the first run and every k-th one after it are drawn in full,
with the smallest k that fits; every other run keeps its slice on the "runs" track, whose args
say its instructions are not drawn. If the first run alone does not fit, only its first
instructions (program order) are drawn.
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
    """One simulated program run to put on the trace: its events (arrays indexed by event, in
    program order) and, per instruction, its mnemonic and IR op."""

    label: str  # e.g. "prefill (8 tokens)" or "decode step 3"
    total: float  # cycles from the run's start until it ends
    start: np.ndarray  # float cycles
    dur: np.ndarray
    unit: np.ndarray
    instr: np.ndarray  # the instruction holding the unit, or -1 - b for the fetch of code block b
    names: list[str] | np.ndarray  # mnemonic per instruction, e.g. "mvm"
    ops: list[dict]  # debug op table: {"op": "linear", "loc": "node_linear_3", "layer": "layer0"}
    instr_op: np.ndarray  # per instruction, index into `ops`

    @classmethod
    def from_sim(cls, label: str, timeline: Timeline, costs: InstrCosts, opcode: np.ndarray,
                 debug: DebugInfo) -> TraceRun:
        """A run from the simulator's pieces: timeline, priced program, opcodes, debug map."""
        codes, inverse = np.unique(np.asarray(opcode, dtype=np.int64), return_inverse=True)
        mnemonics = np.array([BY_OPCODE[int(c)].mnemonic for c in codes], dtype=object)
        instr = costs.instr_of()
        blocks, chans = np.nonzero(costs.fetch.busy)
        # a block's fetch goes before the first instruction it holds
        key = np.concatenate([instr * 2 + 1, blocks * costs.fetch.per_block * 2])
        order = np.argsort(key, kind="stable")
        return cls(label, timeline.total,
                   np.concatenate([timeline.start[instr], timeline.fetch_start[blocks]])[order],
                   np.concatenate([costs.busy, costs.fetch.busy[blocks, chans]])[order],
                   np.concatenate([costs.unit, chans])[order],
                   np.concatenate([instr, -1 - blocks])[order],
                   mnemonics[inverse], debug.ops, debug.instr_op)


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
    used = sorted(set().union(*(np.unique(r.unit).tolist() for r in runs))) if runs else []
    fixed = 1 + 2 * (1 + len(used)) + len(runs)  # process name, track names and order, run slices
    budgets = _plan([len(r.start) for r in runs], max_events - fixed)
    with atomic_file(path, "w", encoding="ascii", newline="\n") as f:
        count = _write(f, runs, budgets, unit_names, used, f_clk_hz, max_events)
    return count


def _check(run: TraceRun, n_units: int) -> None:
    n = len(run.start)
    bad = [k for k in ("dur", "unit", "instr") if len(getattr(run, k)) != n]
    if bad or len(run.instr_op) != len(run.names):
        raise ValueError(f"run {run.label!r}: {', '.join(bad) or 'instr_op'} do not match the other arrays")
    for k in ("start", "dur"):
        a = np.asarray(getattr(run, k), dtype=np.float64)
        if n and not (np.isfinite(a).all() and a.min() >= 0):
            raise ValueError(f"run {run.label!r}: {k} must be finite and non-negative")
    if not (np.isfinite(run.total) and run.total >= 0):
        raise ValueError(f"run {run.label!r}: total must be finite and non-negative")
    if n and not (0 <= np.min(run.unit) and np.max(run.unit) < n_units):
        raise ValueError(f"run {run.label!r}: unit holds a unit outside 0..{n_units - 1}")
    if n and np.max(run.instr) >= len(run.names):
        raise ValueError(f"run {run.label!r}: instr points outside its {len(run.names)} instructions")
    if len(run.instr_op) and not (0 <= np.min(run.instr_op) and np.max(run.instr_op) < len(run.ops)):
        raise ValueError(f"run {run.label!r}: instr_op points outside its {len(run.ops)} ops")


def _plan(counts: list[int], budget: int) -> list[int]:
    """Events to draw per run: all of runs 0, k, 2k... for the smallest k that fits the budget,
    none of the others; if run 0 alone does not fit, as many of its leading events as do."""
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


def _write(f: TextIO, runs: Sequence[TraceRun], shown: list[int], unit_names: Sequence[str], used: list[int],
           f_clk_hz: float, max_events: int) -> int:
    """The whole document: header, metadata, run slices, then each run's events."""
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
        n = len(run.names)
        drawn = len(np.unique(run.instr[:shown[k]][run.instr[:shown[k]] >= 0])) if shown[k] < len(run.start) else n
        args = {"run": k, "instructions": n, "cycles": run.total, "instructions_drawn": drawn}
        if drawn < n:
            args["note"] = f"{n - drawn} of {n} instructions not drawn (trace limited to {max_events} events)"
        t0, t1 = (round(x * ns_per_cycle) for x in offsets[k:k + 2])
        f.write(f',\n{head}"tid":{RUNS_TID},"ph":"X","name":{_dumps(run.label)},"ts":{_us(t0)},"dur":{_us(t1 - t0)},'
                f'"args":{_dumps(args)}}}')
        count += 1
    for k, run in enumerate(runs):
        count += _write_run(f, run, shown[k], offsets[k], ns_per_cycle, head)
    f.write("\n]}\n")
    return count


def _write_run(f: TextIO, run: TraceRun, m: int, offset: float, ns_per_cycle: float, head: str) -> int:
    """The first `m` events of `run`, offset by `offset` cycles."""
    start = np.asarray(run.start[:m], dtype=np.float64)
    dur = np.asarray(run.dur[:m], dtype=np.float64)

    def ns(t: np.ndarray) -> list[int]:
        return np.rint((offset + t) * ns_per_cycle).astype(np.int64).tolist()

    t_start, t_end = ns(start), ns(start + dur)
    cycles = dur.tolist()
    unit = np.asarray(run.unit[:m]).tolist()
    instr = np.asarray(run.instr[:m]).tolist()
    names = np.asarray(run.names).tolist()
    op_of = np.asarray(run.instr_op).tolist()
    op_args = [_dumps({"op": o.get("op", ""), "onnx": o.get("loc", ""), "layer": o.get("layer", "")})[1:-1]
               for o in run.ops]
    quoted: dict[str, str] = {}
    for i in range(m):
        i_ = instr[i]
        if i_ >= 0:
            name = names[i_]
            what = f'"instr":{i_},{op_args[op_of[i_]]}'
        else:
            name, what = "fetch", f'"block":{-1 - i_}'
        if name not in quoted:
            quoted[name] = _dumps(name)
        f.write(f',\n{head}"tid":{unit[i] + 2},"ph":"X","name":{quoted[name]},"ts":{_us(t_start[i])},'
                f'"dur":{_us(t_end[i] - t_start[i])},"args":{{{what},"cycles":{cycles[i]!r}}}}}')
    return m
