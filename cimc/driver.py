"""The compile pipeline: model -> IR -> passes -> program, with the options users set.

Everything the CLI does goes through here (and `cimc/__init__.py` re-exports it as the Python
API), so a notebook or a sweep script gets exactly what `cimc compile` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

import passes  # noqa: F401  (registers the passes)
from cimc.frontend import import_onnx, open_model
from cimc.ir.core import Module
from cimc.ir.parser import parse_module
from cimc.ir.printer import print_module
from isa.cost import CostModel
from isa.diag import CimcError
from isa.dtypes import WEIGHT_MODES
from isa.hw import HardwareConfig, load_hw
from isa.program import Program
from passes.balance_stages import BalanceStagesPass
from passes.codegen import emit_program
from passes.manager import Pass, PassContext, PassManager, check_hw, parse_pipeline
from passes.quantize import QuantizePass

DEFAULT_PIPELINE = "lift-idioms,insert-kv-cache,tile-partition,place-weights,schedule,balance-stages"
#: The baseline schedule: one macro set, so a stage's weights load only after the previous stage
#: computed (no overlap of loading and computing), as a design without ping-pong would run.
NAIVE_PIPELINE = DEFAULT_PIPELINE.replace("place-weights", "place-weights{sets=1}")
SCHEDULES = {"balanced": DEFAULT_PIPELINE, "naive": NAIVE_PIPELINE}
DEFAULT_MAX_SEQ = 256
#: `--group-size` when not given: per output channel for int8, 32 rows for int4.
DEFAULT_GROUP = {"int8": 0, "int4": 32}
ACT_MODES = {"int8": "i8", "fp32": "f32"}


@dataclass
class CompileOptions:
    """Options of `cimc compile` / `cimc ir` (see `cimc compile --help`)."""

    max_seq: int | None = None  # tokens per prefill run; default 256, or max_ctx if that is smaller
    max_ctx: int | None = None  # positions the KV cache holds (prompt + generated); default max_seq
    weights: str = "fp32"  # a key of isa.dtypes.WEIGHT_MODES
    group_size: int | None = None  # rows per weight scale (0: per output channel); default DEFAULT_GROUP
    act: str | None = None  # int8 | fp32: how linears' inputs enter the macros (default: int8 for weights
    # the compiler quantizes; an imported quantized graph keeps the scheme its format implies)
    hw: HardwareConfig = field(default_factory=load_hw)
    dims: dict[str, int] = field(default_factory=dict)
    pipeline: str = DEFAULT_PIPELINE
    verify: bool = True
    dump_after: set[str] = field(default_factory=set)
    dump_dir: Path | None = None
    on_dump: Callable[[str, str], None] | None = None


def load_module(path: str | os.PathLike, opts: CompileOptions, need_weights: bool = False
                ) -> tuple[Module, Callable[[str], np.ndarray] | None]:
    """Read a model (.onnx) or an IR dump (.cimir); returns the module and its weight source
    (None for a dump whose model is not next to it, an error with `need_weights`)."""
    p = Path(path)
    if p.suffix == ".cimir":
        try:
            text = p.read_text()
        except OSError as e:
            raise CimcError(f"{p}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise CimcError(f"{p}: not an IR text file (not UTF-8)") from None
        module = parse_module(text, str(p))
        fixed = {"--max-seq": (opts.max_seq, module.max_seq),
                 "--max-ctx": (opts.max_ctx, module.max_ctx)}
        for flag, (asked, lifted) in fixed.items():
            if asked is not None and asked != lifted:
                raise CimcError(f"{p}: the IR was lifted with {flag} {lifted}, not {asked}; lift the .onnx again "
                                f"with {flag} {asked} (or leave {flag} out)")
        if opts.dims:
            raise CimcError(f"{p}: --dim applies when lifting an .onnx; the IR's dimensions are already bound")
        check_hw(module, opts.hw, str(p))
        src = p.parent / str(module.attrs.get("source", ""))
        if src.is_file() and src.suffix == ".onnx":
            return module, open_model(src)[1].get
        if need_weights:
            raise CimcError(f"{p}: the IR's source model {module.attrs.get('source')!r} is not next to it; "
                            "compile the .onnx instead")
        return module, None
    max_seq = opts.max_seq
    if max_seq is None:
        max_seq = min(DEFAULT_MAX_SEQ, opts.max_ctx or DEFAULT_MAX_SEQ)
    module, store = import_onnx(p, max_seq=max_seq, max_ctx=opts.max_ctx, dims=opts.dims)
    return module, store.get


def quantize_step(opts: CompileOptions) -> QuantizePass | None:
    """The `quantize` pass `--weights`, `--group-size` and `--act` ask for (None: none asked)."""
    if opts.weights not in WEIGHT_MODES:
        raise CimcError(f"--weights {opts.weights}: expected one of {', '.join(WEIGHT_MODES)}")
    if opts.act is not None and opts.act not in ACT_MODES:
        raise CimcError(f"--act {opts.act}: expected one of {', '.join(ACT_MODES)}")
    floats = opts.weights == "fp32"
    if floats and opts.group_size is not None:
        raise CimcError("--group-size applies to integer weights: add --weights int8 or int4")
    if floats and opts.act is None:
        return None
    group = DEFAULT_GROUP.get(opts.weights, 0) if opts.group_size is None else opts.group_size
    step = QuantizePass(bits=0 if floats else WEIGHT_MODES[opts.weights].bits, group=group,
                        act=ACT_MODES[opts.act] if opts.act else "")
    step.check(opts.hw.macro.weight_bits)
    return step


def pipeline_steps(opts: CompileOptions) -> list[Pass]:
    """The passes to run: `opts.pipeline`, with the `quantize` pass the options ask for before
    tile-partition."""
    steps = parse_pipeline(opts.pipeline)
    q = quantize_step(opts)
    if q is None:
        return steps
    names = [p.name for p in steps]
    if "quantize" in names:
        raise CimcError("--weights/--group-size/--act and a quantize pass in --pipeline: give one of them")
    at = names.index("tile-partition") if "tile-partition" in names else len(steps)
    return [*steps[:at], q, *steps[at:]]


def run_pipeline(module: Module, opts: CompileOptions, until: str | None = None,
                 steps: list[Pass] | None = None) -> PassManager:
    """Run the pass pipeline (`steps`, default `opts.pipeline`), up to and including `until`, on
    `module` in place."""
    pipeline = pipeline_steps(opts) if steps is None else steps
    names = [p.name for p in pipeline]
    unknown = sorted(opts.dump_after - {"all"} - set(names))
    if unknown:
        raise CimcError(f"--dump-after {unknown[0]}: not in the pipeline (passes: {', '.join(names)}, or all)")
    if until is not None:
        if until not in names:
            raise CimcError(f"--after {until}: not in the pipeline ({', '.join(names)})")
        pipeline = pipeline[: names.index(until) + 1]
    done = set(module.attrs.get("passes", []))
    pipeline = [p for p in pipeline if p.name not in done]
    pm = PassManager(pipeline, verify=opts.verify, dump_after=opts.dump_after, dump_dir=opts.dump_dir,
                     on_dump=opts.on_dump)
    pm.run(module, PassContext(opts.hw, CostModel(opts.hw)))
    return pm


def clone(module: Module) -> Module:
    """A deep copy (through the text form, which round-trips exactly)."""
    return parse_module(print_module(module), verify=False)


#: Passes code generation needs, in this order (others may come between them).
REQUIRED_PASSES = ("insert-kv-cache", "tile-partition", "place-weights", "schedule", "balance-stages")


def check_pipeline(module: Module, steps: list[Pass], pipeline: str) -> None:
    """A pipeline (`steps`, parsed from the text `pipeline`) that codegen can finish: every
    required pass, in order (done ones count)."""
    names = [*module.attrs.get("passes", []), *(p.name for p in steps)]
    at = [names.index(n) if n in names else -1 for n in REQUIRED_PASSES]
    missing = [n for n, i in zip(REQUIRED_PASSES, at, strict=True) if i < 0]
    if missing or at != sorted(at):
        raise CimcError(f"--pipeline {pipeline!r} cannot produce a program: it needs "
                        f"{', '.join(REQUIRED_PASSES)} in this order"
                        + (f" (missing {', '.join(missing)})" if missing else ""))


def compile_module(module: Module, weights: Callable[[str], np.ndarray], opts: CompileOptions
                   ) -> tuple[Program, PassManager]:
    """Compile a lifted module into a program with two entries over the same weights and KV cache:
    `prefill` takes up to max_seq tokens (a prompt), `decode` exactly one (a generated token);
    decode is the same model scheduled for one row, so its buffers are small and its stages are
    balanced for a matrix-vector product. Returns the program and prefill's pass manager."""
    steps = pipeline_steps(opts)
    check_pipeline(module, steps, opts.pipeline)
    decode = clone(module)
    decode.attrs["max_seq"] = 1
    pm = run_pipeline(module, opts, steps=steps)
    # the decode program balances its stages for one token half-way into the context, whatever the
    # pipeline says
    one_row = [replace(p, rows=1, past=(decode.max_ctx - 1) // 2) if isinstance(p, BalanceStagesPass) else p
               for p in steps]
    run_pipeline(decode, replace(opts, dump_after=set(), dump_dir=None, on_dump=None), steps=one_row)
    return emit_program({"prefill": module, "decode": decode}, weights, opts.hw), pm


def compile_model(path: str | os.PathLike, opts: CompileOptions | None = None) -> Program:
    """Compile an ONNX model (or a .cimir dump of it) to a program for `opts.hw`."""
    opts = opts or CompileOptions()
    module, weights = load_module(path, opts, need_weights=True)
    assert weights is not None
    return compile_module(module, weights, opts)[0]
