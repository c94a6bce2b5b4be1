"""Run a program: bind inputs, execute instructions (numerics), play the timeline, report.

Timing and energy come from the cost model over the decoded program (vectorised) and the
timeline loop; they do not depend on numerics, so `numerics=False` skips executing instructions
and prices a run of any length in well under a second even for 1B-parameter programs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from isa.cost import CostModel
from isa.diag import CimcError
from isa.encoding import decode, decode_columns
from isa.fields import REGS
from isa.hw import FIELDS, HardwareConfig
from isa.program import Program, Symbol
from runtime.machine import Machine, SimError
from runtime.report import build_report
from runtime.semantics import execute
from runtime.timing import Timeline, schedule

_INT = {"int64", "int32", "int16", "int8", "uint8"}


@dataclass
class SimResult:
    outputs: dict[str, np.ndarray]
    report: dict
    timeline: Timeline
    accesses: list | None = None  # (instr, space, lo, hi, write) when traced


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


def bind_inputs(program: Program, arrays: Mapping[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
    """Check user inputs against the program's symbols; returns (tokens, machine-typed arrays)."""
    inputs = [s for s in program.symbols if s.kind == "input"]
    names = {s.name for s in inputs}
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise CimcError(f"missing input(s): {', '.join(missing)} (the program takes {', '.join(sorted(names))})")
    unknown = sorted(set(arrays) - names)
    if unknown:
        raise CimcError(f"unknown input(s): {', '.join(unknown)} (the program takes {', '.join(sorted(names))})")
    seq = None
    out = {}
    max_seq = int(program.meta["max_seq"])
    for s in inputs:
        a = np.asarray(arrays[s.name])
        kind_ok = a.dtype.name in _INT if s.dtype in _INT else a.dtype.kind == "f"
        if not kind_ok:
            raise CimcError(f"input {s.name!r} has dtype {a.dtype}, expected {s.dtype}")
        if a.ndim != len(s.shape):
            raise CimcError(f"input {s.name!r} has shape {list(a.shape)}, expected {_shape_text(s)}")
        for d, want in zip(a.shape, s.shape, strict=True):
            if want == "seq":
                if seq is None:
                    seq = d
                if d != seq:
                    raise CimcError(f"input {s.name!r} has {d} tokens but other inputs have {seq}")
            elif d != want:
                raise CimcError(f"input {s.name!r} has shape {list(a.shape)}, expected {_shape_text(s)}")
        out[s.name] = a
    if seq is None:
        seq = 1
    if seq < 1:
        raise CimcError("inputs have 0 tokens; give at least one")
    if not 1 <= seq <= max_seq:
        raise CimcError(f"inputs have {seq} tokens; this program was compiled for 1..{max_seq} "
                        "(recompile with a larger --max-seq)")
    for s in inputs:
        a = out[s.name]
        if s.mtype == "i32":
            if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
                raise CimcError(f"input {s.name!r} holds values that do not fit 32 bits")
            out[s.name] = a.astype(np.int32)
        else:
            out[s.name] = a.astype(np.float32)
    return seq, out


def _shape_text(s: Symbol) -> str:
    return "[" + ", ".join(str(d) for d in s.shape) + "]"


def simulate(program: Program, inputs: Mapping[str, np.ndarray] | None = None, *, tokens: int | None = None,
             numerics: bool = True, hw: HardwareConfig | None = None, trace_accesses: bool = False,
             progress: Callable[[int, int], None] | None = None, name: str = "the binary") -> SimResult:
    """Simulate one run. With numerics, `inputs` are required; without, `tokens` sets the length.
    `name` (the binary's path) only labels errors."""
    hw = hardware_for(program, hw, name)
    cost = CostModel(hw)
    if numerics:
        if inputs is None:
            raise CimcError("numerics need inputs (or run timing-only)")
        seq, bound = bind_inputs(program, inputs)
    else:
        seq, bound = (1 if tokens is None else tokens), {}
        if not 1 <= seq <= int(program.meta["max_seq"]):
            raise CimcError(f"--tokens {seq} is outside 1..{program.meta['max_seq']} for this program")
    regs = np.zeros(len(REGS), np.int64)
    regs[REGS.index("seq")] = seq
    regs[REGS.index("ctx")] = seq
    cols = decode_columns(program.code)
    costs = cost.instr_costs(cols, regs)
    tl = schedule(costs, cols.sig, cols.wait, cost.n_units)
    outputs: dict[str, np.ndarray] = {}
    accesses = None
    if numerics:
        machine = Machine.for_program(program, regs)
        accesses = [] if trace_accesses else None
        for s in program.symbols:
            if s.kind == "input":
                _io_view(machine, s, seq, write=True)[...] = bound[s.name].reshape(seq, -1)
        _execute(program, machine, accesses, progress)
        machine.trace = None  # the host reading outputs is not part of the program
        for s in program.symbols:
            if s.kind == "output":
                shape = tuple(seq if d == "seq" else d for d in s.shape)
                outputs[s.name] = np.array(_io_view(machine, s, seq, write=False)).reshape(shape)
    return SimResult(outputs, build_report(program, cost, costs, tl, seq), tl, accesses)


def _io_view(machine: Machine, s: Symbol, seq: int, write: bool) -> np.ndarray:
    from isa.fields import Mem

    cols = int(np.prod([d for d in s.shape if d != "seq"])) if s.shape else 1
    dtype = "<i4" if s.mtype == "i32" else "<f4"
    return machine.view(Mem(1, s.addr, s.stride), seq, cols, dtype=dtype, write=write)


def _execute(program: Program, machine: Machine, accesses: list | None,
             progress: Callable[[int, int], None] | None) -> None:
    instrs = decode(program.code)
    if accesses is not None:
        machine.trace = accesses
    for i, ins in enumerate(instrs):
        machine.current = i
        try:
            execute(machine, ins)
        except SimError as e:
            op = program.debug.ops[int(program.debug.instr_op[i])]
            where = f"instruction {i} ({ins.op}, from {op['op']} at ONNX node {op['loc']!r})"
            raise SimError(f"{where}: {e.message}") from None
        if progress is not None and i % 4096 == 0:
            progress(i, len(instrs))
        if ins.op == "halt":
            break
