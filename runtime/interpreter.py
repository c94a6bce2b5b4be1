"""Run a program: bind inputs, execute instructions (numerics), play the timeline, report.

Timing and energy come from the cost model over the decoded program (vectorised) and the
timeline loop; they do not depend on numerics, so `numerics=False` skips executing instructions
and prices a run of any length in well under a second even for 1B-parameter programs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from isa.cost import CostModel, DramMap, InstrCosts
from isa.diag import CimcError
from isa.dtypes import elem
from isa.encoding import Columns, decode, decode_columns
from isa.estimate import Stream, estimate
from isa.fields import REGS, Mem
from isa.hw import FIELDS, HardwareConfig
from isa.program import Entry, Program, Symbol
from runtime.machine import Machine, SimError
from runtime.report import build_report
from runtime.semantics import SEMANTICS
from runtime.timing import Timeline, schedule
from runtime.trace import TraceRun

_INT = {"int64", "int32", "int16", "int8", "uint8"}


@dataclass
class SimResult:
    outputs: dict[str, np.ndarray]
    report: dict
    timeline: Timeline
    accesses: list | None = None  # (instr, space, lo, hi, write, pitch, width) when traced
    costs: InstrCosts | None = None


def hardware_for(program: Program, hw: HardwareConfig | None, name: str = "the binary") -> HardwareConfig:
    """The config to simulate with: the binary's own, or `hw` if its structure matches.

    Energies and clocks may differ (re-pricing a binary is the point); array shapes and buffer
    sizes may not, since the code was generated for them.
    """
    built = HardwareConfig.from_dict(program.hw, f"embedded in {name}")
    if hw is None:
        return built
    if hw.fingerprint() != program.hw_fingerprint:
        mine, theirs = built.values(), hw.values()
        diff = [f"{k} is {mine[k]} there, {theirs[k]} here" for k, spec in FIELDS.items()
                if spec.structural and mine[k] != theirs[k]]
        raise CimcError(f"{name} was compiled for a different hardware structure ({'; '.join(diff) or 'fingerprint'}); "
                        "recompile it with these settings, or run without --hw/--set to use its own")
    return hw


@dataclass
class Bound:
    """Inputs checked against an entry: token count, cached length (None: not given), arrays."""

    seq: int
    past: int | None
    arrays: dict[str, np.ndarray]


def bind_inputs(entry: Entry, arrays: Mapping[str, np.ndarray]) -> Bound:
    """Check user inputs against an entry's symbols and convert them to machine types.

    Past KV tensors (and window buffers) are optional: without them the run continues the cache
    already in the machine. Mask and position inputs (`check`) are optional too; given,
    they must hold the values generation assumes (checked once `past` is known, see `check_assumed`).
    """
    inputs = [s for s in entry.symbols if s.kind == "input"]
    names = {s.name for s in inputs}
    optional = {s.name for s in inputs if s.check or s.heads}
    missing = [s.name for s in inputs if s.name not in arrays and s.name not in optional]
    if missing:
        raise CimcError(f"missing input(s): {', '.join(missing)} (the program takes {', '.join(sorted(names))})")
    unknown = sorted(set(arrays) - names)
    if unknown:
        raise CimcError(f"unknown input(s): {', '.join(unknown)} (the program takes {', '.join(sorted(names))})")
    sizes: dict[str, int] = {}
    out = {}
    max_seq = int(entry.meta["max_seq"])
    for s in inputs:
        if s.name not in arrays:
            continue
        a = np.asarray(arrays[s.name])
        kind_ok = a.dtype.name in _INT if s.dtype in _INT else a.dtype.kind == "f"
        if not kind_ok:
            raise CimcError(f"input {s.name!r} has dtype {a.dtype}, expected {s.dtype}")
        if a.ndim != len(s.shape):
            raise CimcError(f"input {s.name!r} has shape {list(a.shape)}, expected {_shape_text(s)}")
        for d, want in zip(a.shape, s.shape, strict=True):
            if isinstance(want, str):
                if sizes.setdefault(want, d) != d:
                    raise CimcError(f"input {s.name!r} has {d} for {want}, but other inputs have {sizes[want]}")
            elif d != want:
                raise CimcError(f"input {s.name!r} has shape {list(a.shape)}, expected {_shape_text(s)}")
        out[s.name] = a
    seq = sizes.get("seq", 1)
    if seq < 1:
        raise CimcError("inputs have 0 tokens; give at least one")
    if seq > max_seq:
        raise CimcError(f"inputs have {seq} tokens; this program was compiled for 1..{max_seq} "
                        "(recompile with a larger --max-seq)")
    past = sizes.get("past")
    if past is not None and "ctx" in sizes and sizes["ctx"] != past + seq:
        raise CimcError(f"inputs cover {sizes['ctx']} positions, but past ({past}) + seq ({seq}) is {past + seq}")
    if past is None and "ctx" in sizes:
        past = sizes["ctx"] - seq
    for s in inputs:
        if s.name not in out:
            continue
        a, t = out[s.name], elem(s.mtype)
        if not t.is_float and a.size and (a.min() < t.lo or a.max() > t.hi):
            raise CimcError(f"input {s.name!r} holds values that do not fit {t.name}")
        out[s.name] = a.astype(t.np())
    return Bound(seq, past, out)


def check_assumed(entry: Entry, bound: Bound, past: int) -> None:
    """Mask and position inputs must hold what the compiled program assumes."""
    for s in entry.symbols:
        a = bound.arrays.get(s.name)
        if s.kind != "input" or not s.check or a is None:
            continue
        if s.check == "ones" and not np.all(a == 1):
            raise CimcError(f"input {s.name!r} must be all ones (batch 1, no padding): cimc compiles the causal "
                            "mask into the program")
        want = past + np.arange(bound.seq)
        if s.check == "positions" and not np.array_equal(a.reshape(-1), want):
            raise CimcError(f"input {s.name!r} must be {past}..{past + bound.seq - 1} (the positions after the "
                            f"{past} cached tokens): cimc compiles positions into the program")


def _shape_text(s: Symbol) -> str:
    return "[" + ", ".join(str(d) for d in s.shape) + "]"


class Session:
    """A program loaded on a simulated machine. The DRAM read-write region (where the KV cache
    lives) persists from one run to the next, so a prefill run can be continued by decode runs.

    Decoded code is cached per entry; timing and energy are computed for every run (they depend
    on the run's token count and cache length).
    """

    def __init__(self, program: Program, hw: HardwareConfig | None = None, *, name: str = "the binary") -> None:
        self.program = program
        self.hw = hardware_for(program, hw, name)
        self.cost = CostModel(self.hw)
        self.name = name
        self.machine: Machine | None = None
        self.cached = 0  # KV-cache positions the machine holds valid values for (numeric runs)
        self._columns: dict[str, Columns] = {}
        self._instrs: dict[str, list] = {}

    def columns(self, name: str) -> Columns:
        """The decoded (column-wise) code of an entry, decoded once."""
        if name not in self._columns:
            self._columns[name] = decode_columns(self.entry(name).code)
        return self._columns[name]

    def trace_run(self, result: SimResult, label: str) -> TraceRun:
        """A run's timeline as a trace run (see runtime.trace)."""
        name = result.report["entry"]
        assert result.costs is not None
        return TraceRun.from_sim(label, result.timeline, result.costs, self.columns(name).opcode,
                                 self.entry(name).debug)

    def entry(self, name: str | None) -> Entry:
        try:
            return self.program.entry(name)
        except KeyError:
            have = ", ".join(e.name for e in self.program.entries)
            raise CimcError(f"{self.name} has no entry {name!r} (it has {have})") from None

    def run(self, entry_name: str | None = None, inputs: Mapping[str, np.ndarray] | None = None, *,
            tokens: int | None = None, past: int | None = None, numerics: bool = True,
            trace_accesses: bool = False, progress: Callable[[int, int], None] | None = None) -> SimResult:
        """Run one entry. With numerics, `inputs` are required; without, `tokens` sets the length.
        `past` is the number of tokens already in the KV cache (given past KV inputs set it)."""
        entry = self.entry(entry_name)
        if numerics:
            if self.program.meta.get("weight_free"):
                raise CimcError(f"{self.name} was built from a config.json without weights: it can be priced "
                                "(timing and energy, numerics=False / --no-numerics), not run with numerics")
            if inputs is None:
                raise CimcError("numerics need inputs (or run timing-only)")
            bound = bind_inputs(entry, inputs)
            seq = bound.seq
            if bound.past is not None and past not in (None, bound.past):
                raise CimcError(f"the inputs hold {bound.past} cached positions, not {past}")
            past = bound.past if bound.past is not None else (past or 0)
            if bound.past is None and past > self.cached:
                raise CimcError(f"past={past}, but the KV cache holds {self.cached} positions from earlier runs: "
                                "run the prompt first, or give the past key/value inputs")
            check_assumed(entry, bound, past)
        else:
            seq, bound, past = (1 if tokens is None else tokens), Bound(1, None, {}), past or 0
            if not 1 <= seq <= int(entry.meta["max_seq"]):
                raise CimcError(f"--tokens {seq} is outside 1..{entry.meta['max_seq']} for entry {entry.name!r}")
        max_ctx = int(self.program.meta.get("max_ctx", entry.meta["max_seq"]))
        if past < 0 or past + seq > max_ctx:
            raise CimcError(f"{past} cached + {seq} new tokens exceed the context of {max_ctx} this program "
                            "was compiled for (recompile with a larger --max-ctx)")
        regs = np.zeros(len(REGS), np.int64)
        regs[REGS.index("seq")], regs[REGS.index("past")], regs[REGS.index("ctx")] = seq, past, past + seq
        cols = self.columns(entry.name)
        costs = self.cost.instr_costs(cols, regs, DramMap.from_meta(entry.meta))
        tl = schedule(costs, cols.sig, cols.wait, self.cost.n_units, self.hw.dram.max_outstanding)
        outputs: dict[str, np.ndarray] = {}
        accesses = None
        if numerics:
            if self.machine is None:
                self.machine = Machine.for_program(self.program)
            machine = self.machine
            machine.regs = regs
            accesses = [] if trace_accesses else None
            for sym in entry.symbols:
                if sym.kind == "input" and sym.name in bound.arrays and not sym.check:
                    _write_input(machine, sym, bound.arrays[sym.name], seq, past)
            if entry.name not in self._instrs:
                self._instrs[entry.name] = decode(entry.code)
            _execute(entry, self._instrs[entry.name], machine, accesses, progress)
            self.cached = past + seq
            machine.trace = None  # the host reading outputs is not part of the program
            for sym in entry.symbols:
                if sym.kind == "output":
                    outputs[sym.name] = _read_output(machine, sym, seq, past)
        stream = Stream.priced(self.cost, costs, cols.opcode, cols.sig, cols.wait, entry.debug.instr_op)
        estimated = estimate(stream)
        report = build_report(self.program, entry, self.cost, costs, tl, cols.opcode, seq, past, estimated)
        return SimResult(outputs, report, tl, accesses, costs)


def simulate(program: Program, inputs: Mapping[str, np.ndarray] | None = None, *, tokens: int | None = None,
             past: int | None = None, numerics: bool = True, hw: HardwareConfig | None = None,
             trace_accesses: bool = False, progress: Callable[[int, int], None] | None = None,
             name: str = "the binary", entry: str | None = None) -> SimResult:
    """Simulate one run of an entry (default: the first) on a fresh machine (see `Session.run`).
    `name` (the binary's path) only labels errors."""
    return Session(program, hw, name=name).run(entry, inputs, tokens=tokens, past=past, numerics=numerics,
                                                trace_accesses=trace_accesses, progress=progress)


def _sizes(s: Symbol, seq: int, past: int) -> tuple[int, ...]:
    named = {"seq": seq, "past": past, "ctx": past + seq}
    return tuple(named[d] if isinstance(d, str) else d for d in s.shape)


def _io_view(machine: Machine, s: Symbol, rows: int, write: bool) -> np.ndarray:
    return machine.view(Mem(1, s.addr, s.stride), rows, s.stride if s.heads else max(s.stride, 1),
                        dtype=elem(s.mtype).numpy, write=write)


def _window(s: Symbol, filled: int) -> tuple[int, int]:
    """The cache rows a KV symbol covers when `filled` positions are cached: (first, count); a
    window buffer's W slots cover the last min(W, filled)."""
    slots = s.shape[2]
    return (0, filled) if isinstance(slots, str) else (max(0, filled - slots), min(slots, filled))


def _write_input(machine: Machine, s: Symbol, a: np.ndarray, seq: int, past: int) -> None:
    """Write a user input into DRAM: token rows, or past KV [1, heads, past, hd] (or a window
    buffer's slots) as cache rows."""
    if s.heads:
        first, rows = _window(s, past)
        if rows:
            cache = _io_view(machine, s, first + rows, write=True)
            cache[first:] = a[0, :, :rows].transpose(1, 0, 2).reshape(rows, -1)
        return
    rows = s.rows(seq)
    if a.size:
        _io_view(machine, s, rows, write=True)[:, :a.size // rows] = a.reshape(rows, -1)


def _read_output(machine: Machine, s: Symbol, seq: int, past: int) -> np.ndarray:
    shape = _sizes(s, seq, past)
    if s.heads:
        first, rows = _window(s, past + seq)
        m = np.zeros((shape[2], s.stride), np.float32)
        m[:rows] = _io_view(machine, s, first + rows, write=False)[first:]
        return m.reshape(shape[2], s.heads, -1).transpose(1, 0, 2)[None].reshape(shape)
    rows = s.rows(seq)
    if not rows or not np.prod(shape):
        return np.zeros(shape, np.float32)
    cols = int(np.prod(shape, dtype=np.int64)) // rows
    return np.array(_io_view(machine, s, rows, write=False)[:, :cols]).reshape(shape)


def _execute(entry: Entry, instrs: list, machine: Machine, accesses: list | None,
             progress: Callable[[int, int], None] | None) -> None:
    if accesses is not None:
        machine.trace = accesses
    i = 0
    try:
        for i, ins in enumerate(instrs):
            machine.current = i
            SEMANTICS[ins.op](machine, ins.f)
            if progress is not None and i % 4096 == 0:
                progress(i, len(instrs))
            if ins.op == "halt":
                break
    except SimError as e:
        op = entry.debug.ops[int(entry.debug.instr_op[i])]
        where = f"instruction {i} ({instrs[i].op}, from {op['op']} at ONNX node {op['loc']!r})"
        raise SimError(f"{where}: {e.message}") from None
