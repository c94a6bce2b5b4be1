"""The `cimc` command line: a thin layer over the Python API in `cimc.driver` and `runtime`.

Every user error is one line on stderr (plus a source excerpt where one helps) and exit status
2; output files are written atomically, so a failed command never leaves a partial file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from isa.atomic import atomic_file
from isa.diag import CimcError

if TYPE_CHECKING:
    from cimc.dse.search import Sweep
    from cimc.dse.store import Row

EPILOG = "Docs: README.md (CLI reference, architecture), docs/isa.md (instruction set), docs/ir.md (IR)."


def _text_out(path: str | None, text: str) -> None:
    if path in (None, "-"):
        sys.stdout.write(text)
    else:
        with atomic_file(path, "w", encoding="utf-8") as f:
            f.write(text)


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


# ---- option groups ---------------------------------------------------------------------------


def _add_hw(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hw", metavar="NAME|FILE", help="hardware preset (edgecim-65nm, edgecim-28nm) or TOML file "
                   "(default: edgecim-65nm; for run: the hardware the binary was compiled for)")
    p.add_argument("--set", dest="hw_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hardware field, e.g. --set dram.peak_gbps=136.5 (repeatable)")


def _add_frontend(p: argparse.ArgumentParser, helps: dict[str, str] | None = None) -> None:
    """The compile options; `helps` replaces the help of some (by option name, without dashes)."""
    def help_(name: str, text: str) -> str:
        return (helps or {}).get(name, text)

    p.add_argument("--max-seq", type=int, default=None, metavar="N",
                   help=help_("max-seq", "most tokens one run takes (a prompt); any length 1..N runs (default 256, "
                                         "or --max-ctx if smaller)"))
    p.add_argument("--max-ctx", type=int, default=None, metavar="N",
                   help=help_("max-ctx", "positions the KV cache holds: prompt plus generated tokens "
                                         "(default: --max-seq)"))
    p.add_argument("--weights", default="fp32", choices=["fp32", "int8", "int4"],
                   help=help_("weights", "weights in the macros: fp32 (float compute, the exact functional check; "
                                         "an imported quantized graph keeps its own integer weights), int8 or int4 "
                                         "(symmetric, round to nearest)"))
    p.add_argument("--group-size", default=None, metavar="32|64|128|channel",
                   help=help_("group-size", "rows of the reduction axis sharing a weight scale (default: channel, "
                                            "one scale per output channel, for int8; 32 for int4)"))
    p.add_argument("--act", default=None, choices=["int8", "fp32"],
                   help=help_("act", "how inputs enter the macros with integer weights: int8 (dynamic, one scale "
                                     "per token and weight group; the default for --weights int8/int4) or fp32 "
                                     "(float compute on the dequantized weights); an imported graph runs the scheme "
                                     "its format implies unless this is given"))
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help=help_("dim", "bind a named dynamic input dimension other than batch and sequence"))
    p.add_argument("--schedule", choices=["balanced", "naive"], default="balanced",
                   help=help_("schedule", "balanced: ping-pong stages overlapping weight loads with compute "
                                          "(default); naive: one macro set, load then compute, no overlap (the "
                                          "baseline)"))
    p.add_argument("--pipeline", default=None, metavar="PASSES",
                   help=help_("pipeline", "pass pipeline (overrides --schedule), e.g. 'lift-idioms,insert-kv-cache,"
                                          "tile-partition,place-weights{sets=2},schedule,balance-stages'"))


def _hw(args: argparse.Namespace, required: bool = True):
    from isa.hw import load_hw

    if args.hw is None and not args.hw_set and not required:
        return None
    return load_hw(args.hw, args.hw_set)


def _dims(items: list[str]) -> dict[str, int]:
    """`--dim NAME=N` options as a dict."""
    dims = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdigit() or int(value) < 1:
            raise CimcError(f"--dim {item!r}: expected NAME=N with a dimension name and a positive integer N")
        dims[name] = int(value)
    return dims


def _options(args: argparse.Namespace):
    from cimc.driver import SCHEDULES, CompileOptions

    dims = _dims(args.dim)
    group = args.group_size
    if group is not None:
        if group != "channel" and not group.isdigit():
            raise CimcError(f"--group-size {group!r}: expected a number of rows (32, 64, 128) or channel")
        group = 0 if group == "channel" else int(group)
    return CompileOptions(max_seq=args.max_seq, max_ctx=args.max_ctx, weights=args.weights, group_size=group,
                          act=args.act, hw=_hw(args),
                          dims=dims, pipeline=args.pipeline or SCHEDULES[getattr(args, "schedule", "balanced")])


# ---- commands --------------------------------------------------------------------------------


def cmd_compile(args: argparse.Namespace) -> None:
    from cimc.driver import compile_module, load_module
    from isa.binary import write_binary

    opts = _options(args)
    if args.dump_after or args.dump_dir:
        opts.dump_after = set(args.dump_after or ["all"])
        if args.dump_dir:
            opts.dump_dir = Path(args.dump_dir)
            existing = next(p for p in (opts.dump_dir, *opts.dump_dir.absolute().parents) if p.exists())
            if not existing.is_dir():
                raise CimcError(f"--dump-dir {args.dump_dir}: {existing} is not a folder")
        else:
            opts.on_dump = lambda name, text: sys.stdout.write(f"// ---- IR after {name} ----\n{text}")
    t0 = time.perf_counter()
    _log(args, f"cimc: importing {args.model} ...")
    module, weights = load_module(args.model, opts, need_weights=True)
    assert weights is not None
    t1 = time.perf_counter()
    _log(args, f"cimc: lifted for max-seq {module.max_seq}, max-ctx {module.max_ctx}, weights {opts.weights}"
               + (f", activations {opts.act}" if opts.act else ""))
    _log(args, f"cimc: running passes and generating code for {opts.hw.name} (prefill and decode) ...")
    program, pm = compile_module(module, weights, opts)
    for note in pm.notes:
        _log(args, f"cimc: note: {note}")
    t2 = time.perf_counter()
    _log(args, "cimc: writing the binary ...")
    write_binary(args.output, program)
    t3 = time.perf_counter()
    if args.time_passes:
        print(f"  frontend  {1000 * (t1 - t0):8.1f} ms\n{pm.timing_report()}\n"
              f"  all passes and codegen (both entries) {1000 * (t2 - t1):8.1f} ms\n"
              f"  writing   {1000 * (t3 - t2):8.1f} ms", file=sys.stderr)
    entries = ", ".join(f"{e.name} {e.n_instrs:,} instructions / {e.meta['stages']} stages"
                        for e in program.entries)
    _log(args, f"cimc: wrote {args.output} ({entries}; DRAM image {program.dram.size / 1e6:,.2f} MB) "
               f"in {t3 - t0:.2f} s")


def _load_inputs(path: str, entry) -> dict[str, np.ndarray]:
    """An .npz's arrays under the entry's input names (keys NAME or input.NAME, as in the
    reference files), checked against the entry: errors name the file."""
    from runtime.interpreter import bind_inputs

    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        data = np.load(path, allow_pickle=False) if is_zip else None
    except (OSError, ValueError) as e:
        raise CimcError(f"{path}: cannot read inputs ({str(e).splitlines()[0]}); expected an .npz file") from None
    if data is None:
        raise CimcError(f"{path}: not an .npz file (save inputs with numpy.savez(path, input_ids=ids))")
    with data:
        names = [s.name for s in entry.symbols if s.kind == "input"]
        arrays = {}
        for key in data.keys():
            name = key[6:] if key.startswith("input.") else key
            if name in names:
                arrays[name] = data[key]
            elif "." not in key:
                raise CimcError(f"{path}: unknown input {key} (the program takes {', '.join(names)})")
    try:
        bind_inputs(entry, arrays)
    except CimcError as e:
        raise CimcError(f"{path}: {e}") from None
    return arrays


def cmd_check(args: argparse.Namespace) -> None:
    from cimc.driver import check_model, render_check, render_unsupported

    result = check_model(args.model, dims=_dims(args.dim))
    if not result["compiles"]:
        raise render_unsupported(result)
    print(render_check(result))


def cmd_run(args: argparse.Namespace) -> None:
    from isa.binary import read_binary
    from runtime.interpreter import Session
    from runtime.report import render_text

    program = read_binary(args.binary, verify_dram=not args.no_numerics)
    session = Session(program, _hw(args, required=False), name=args.binary)
    entry = session.entry(args.entry)
    if args.no_numerics:
        if args.inputs or args.outputs:
            raise CimcError("--no-numerics computes no values: drop --inputs/--outputs or drop --no-numerics")
        result = session.run(entry.name, numerics=False, tokens=args.tokens, past=args.past)
    else:
        if not args.inputs:
            raise CimcError("--inputs FILE.npz is required (or use --no-numerics for timing and energy only)")
        inputs = _load_inputs(args.inputs, entry)
        big = entry.n_instrs > 20000 and not args.quiet

        def progress(i: int, n: int) -> None:
            print(f"\rcimc: executing {i:,}/{n:,} instructions", end="", file=sys.stderr, flush=True)

        result = session.run(entry.name, inputs, past=args.past, progress=progress if big else None)
        if big:
            print(file=sys.stderr)
        if args.outputs:
            with atomic_file(args.outputs, "wb") as f:
                np.savez(f, **result.outputs)
    if args.report_json:
        _text_out(args.report_json, json.dumps(result.report, indent=1) + "\n")
    if not args.quiet:
        print(render_text(result.report))


def cmd_ir(args: argparse.Namespace) -> None:
    from cimc.driver import load_module, run_pipeline
    from cimc.ir.printer import print_module
    from cimc.ir.verifier import verify_module

    opts = _options(args)
    module, _ = load_module(args.model, opts)
    if args.after:
        run_pipeline(module, opts, until=args.after)
    else:
        verify_module(module)
    _text_out(args.output, print_module(module))


def cmd_disasm(args: argparse.Namespace) -> None:
    from isa.asm import disassemble
    from isa.binary import read_binary

    program = read_binary(args.binary)
    # `.incbin` paths resolve against the assembly file's folder: written relative to it with -o,
    # as given on stdout (the usual `cimc disasm x.cimb > x.s` keeps both in one folder)
    name = args.binary
    if args.output not in (None, "-"):
        name = os.path.relpath(os.path.abspath(args.binary), os.path.dirname(os.path.abspath(args.output)))
    _text_out(args.output, disassemble(program, dram=args.dram, binary_path=args.binary, incbin_name=name))


def cmd_asm(args: argparse.Namespace) -> None:
    from isa.asm import assemble
    from isa.binary import write_binary

    try:
        text = Path(args.source).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CimcError(f"{args.source}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    write_binary(args.output, assemble(text, args.source))


def cmd_hw(args: argparse.Namespace) -> None:
    from isa.hw import list_presets, load_hw, render_text

    if args.action == "list":
        print("\n".join(list_presets()))
        return
    print(render_text(load_hw(args.name, args.hw_set)))


@contextmanager
def _progress(sweep: Sweep, budget: int, objective: str, disable: bool) -> Iterator[None]:
    """A tqdm bar on stderr while `sweep` runs: compiled points of the budget, evaluations/s, ETA and the best
    `objective` so far; nothing when disabled."""
    from tqdm import tqdm

    from cimc.dse.search import OBJECTIVES

    sense, unit = OBJECTIVES[objective].sense, OBJECTIVES[objective].unit
    done = [r for r in sweep.store.done.values() if r.status != "infeasible"]
    grid = list(sweep.space.points()) if sweep.space.size <= budget else None
    total = sum(map(sweep.feasible, grid)) if grid is not None else budget
    best = max((sense * r.metrics[objective] for r in done if r.status == "ok"), default=None)
    infeasible = 0
    with tqdm(total=max(total - len(done), 0), unit="eval", desc="cimc dse", disable=disable, file=sys.stderr,
              dynamic_ncols=True) as bar:
        def update(row: Row) -> None:
            nonlocal best, infeasible
            if row.status == "infeasible":
                infeasible += 1
            else:
                bar.update()
            if row.status == "ok" and (best is None or sense * row.metrics[objective] > best):
                best = sense * row.metrics[objective]
            if best is not None:
                bar.set_postfix_str(f"best {objective} {sense * best:.4g} {unit}, {infeasible} infeasible skipped")

        sweep.on_evaluated = None if disable else update
        yield


def cmd_dse(args: argparse.Namespace) -> None:
    from cimc.dse.search import (
        DEFAULT_OBJECTIVES,
        OBJECTIVES,
        Sweep,
        Task,
        check_backend,
        default_workers,
        file_sha256,
        pareto,
        parse_objectives,
        render_front,
    )
    from cimc.dse.space import load_space, render_text
    from cimc.dse.store import Store

    if args.first < 0:
        raise CimcError(f"--first {args.first}: must be >= 0")
    space = load_space(args.space)
    if args.dry_run:
        print(render_text(space, args.first), end="")
        return
    missing = [what for what, value in (("a model (.onnx or config.json)", args.model), ("--budget N", args.budget),
                                        ("--out RUN_FOLDER", args.out)) if value is None]
    if missing:
        raise CimcError(f"cimc dse: give {', '.join(missing)} (or --dry-run to check the space)")
    for flag, n, least in (("--budget", args.budget, 1), ("--prompt", args.prompt, 1),
                           ("--new-tokens", args.new_tokens, 2), ("--workers", args.workers, 1)):
        if n is not None and n < least:
            raise CimcError(f"{flag} {n}: must be >= {least}"
                            + (" (the first comes from the prefill; decode steps give tokens/s)"
                               if flag == "--new-tokens" else ""))
    if not Path(args.model).is_file():
        raise CimcError(f"{args.model}: no such model file")
    objectives = parse_objectives(args.objectives or ",".join(DEFAULT_OBJECTIVES))
    check_backend(args.backend, args.address)
    args.hw, args.hw_set = None, []
    args.max_seq = args.max_seq or args.prompt
    args.max_ctx = args.max_ctx or max(args.max_seq, args.prompt + args.new_tokens - 1)
    opts = _options(args)
    task = Task(args.model, opts, args.prompt, args.new_tokens)
    meta = {"model": args.model, "model_sha256": file_sha256(args.model), "space": Path(args.space).read_text(),
            "objectives": list(objectives),
            "seed": args.seed, "prompt": args.prompt, "new_tokens": args.new_tokens, "weights": args.weights,
            "group_size": opts.group_size, "act": opts.act, "max_seq": opts.max_seq, "max_ctx": opts.max_ctx,
            "dims": opts.dims, "pipeline": opts.pipeline}
    store = Store(Path(args.out), meta, resume=args.resume)
    try:
        sweep = Sweep(space, task, objectives, store, _version(), args.workers or default_workers(),
                      backend=args.backend, address=args.address)
        mode = "grid" if space.size <= args.budget else f"NSGA-II (seed {args.seed})"
        where = f"dask scheduler {args.address}" if args.address else f"{sweep.workers} {args.backend} worker(s)"
        _log(args, f"cimc: {space.size:,} points in {args.space}; searching {min(space.size, args.budget):,} by "
                   f"{mode} on {where}; {len(store.done)} already stored in {args.out}")
        with _progress(sweep, args.budget, objectives[0], disable=args.quiet or not sys.stderr.isatty()):
            sweep.run(args.budget, args.seed)
        rows = store.rows()
        front = pareto(rows, objectives)
        keys = [axis.key for axis in space.axes]
        csv_path = store.write_csv(keys, list(OBJECTIVES), {r.seq for r in front})
    finally:
        store.close()
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "infeasible", "error")}
    _log(args, f"cimc: {len(rows)} point(s) stored ({', '.join(f'{n} {s}' for s, n in counts.items())}), "
               f"{sweep.evaluated} evaluated by this run; {csv_path}")
    print(f"Pareto front ({len(front)} of {counts['ok']} evaluated point(s)):")
    print(render_front(front, keys, objectives), end="")


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise CimcError(f"--prompt-ids {text!r}: expected comma-separated token ids, e.g. 1,5,9,2") from None


def _progress_bar(label: str) -> Callable[[int, int], None]:
    """A progress callback drawing `cimc: LABEL[####....] done/total tokens` on stderr."""
    def progress(done: int, total: int) -> None:
        width = 30
        fill = width * done // total
        print(f"\rcimc: {label}[{'#' * fill}{'.' * (width - fill)}] {done}/{total} tokens", end="", file=sys.stderr,
              flush=True)
    return progress


def cmd_generate(args: argparse.Namespace) -> None:
    from cimc.accuracy import find_reference, measure_accuracy
    from cimc.driver import compile_model
    from isa.binary import read_binary
    from runtime.generate import generate, render_text
    from runtime.interpreter import Session
    from runtime.report import render_accuracy
    from runtime.trace import write_trace

    if args.accuracy and args.no_numerics:
        raise CimcError("--accuracy compares computed logits with onnxruntime: drop --no-numerics")
    if args.reference and not args.accuracy:
        raise CimcError("--reference names the model --accuracy compares with: add --accuracy")
    prompt = _ids(args.prompt_ids)
    if args.model.endswith(".cimb"):
        given = [flag for flag, value in (("--weights", args.weights != "fp32"), ("--group-size", args.group_size),
                                          ("--act", args.act), ("--max-seq", args.max_seq), ("--max-ctx", args.max_ctx),
                                          ("--pipeline", args.pipeline), ("--dim", args.dim)) if value]
        if given:
            raise CimcError(f"{args.model} is compiled already: {', '.join(given)} apply when generating from an "
                            ".onnx (compile again with them, or drop them)")
        program = read_binary(args.model, verify_dram=not args.no_numerics)
        hw = _hw(args, required=False)
    else:
        if not prompt:
            raise CimcError("the prompt is empty: give at least one token id")
        args.max_seq = args.max_seq or len(prompt)
        args.max_ctx = args.max_ctx or max(args.max_seq, len(prompt) + max(args.max_new_tokens, 1) - 1)
        opts = _options(args)
        _log(args, f"cimc: compiling {args.model} for {opts.hw.name} (max-seq {opts.max_seq}, "
                   f"max-ctx {opts.max_ctx}) ...")
        program = compile_model(args.model, opts)
        hw = opts.hw
    reference = find_reference(args.model, program, args.reference) if args.accuracy else None
    session = Session(program, hw, name=args.model)
    bar = sys.stderr.isatty() and not args.quiet
    gen = generate(session, prompt, args.max_new_tokens, numerics=not args.no_numerics,
                   progress=_progress_bar("") if bar else None)
    if bar:
        print(file=sys.stderr)
    if reference is not None:
        _log(args, f"cimc: accuracy: onnxruntime on {reference}, then the simulator teacher-forced on its tokens ...")
        gen.report["accuracy"] = measure_accuracy(session, reference, prompt, args.max_new_tokens,
                                                  progress=_progress_bar("accuracy ") if bar else None)
        if bar:
            print(file=sys.stderr)
    if args.report_json:
        _text_out(args.report_json, json.dumps(gen.report, indent=1) + "\n")
    if args.trace:
        runs = [session.trace_run(r, "prefill" if i == 0 else f"decode step {i}") for i, r in enumerate(gen.runs)]
        write_trace(args.trace, runs, session.cost.unit_names(), session.cost.f_hz)
    if args.quiet:
        print(" ".join(map(str, gen.tokens)) if gen.tokens else "")
    else:
        print("\n".join(filter(None, [render_text(gen.report), render_accuracy(gen.report)])))


def cmd_estimate(args: argparse.Namespace) -> None:
    from cimc.driver import compile_module, load_module
    from runtime.generate import generate, render_text
    from runtime.interpreter import Session

    if (args.model is None) == (args.hf_config is None):
        raise CimcError("give a model .onnx or --hf-config CONFIG.json (one of them)")
    path = args.hf_config or args.model
    if args.hf_config is not None and not args.hf_config.endswith(".json"):
        raise CimcError(f"--hf-config {args.hf_config}: expected a Hugging Face config.json")
    for flag, n in (("--prompt", args.prompt), ("--new-tokens", args.new_tokens)):
        if n < 1:
            raise CimcError(f"{flag} {n}: expected a positive number of tokens")
    args.max_seq = args.max_seq or args.prompt
    args.max_ctx = args.max_ctx or max(args.max_seq, args.prompt + args.new_tokens - 1)
    opts = _options(args)
    module, weights = load_module(path, opts, need_weights=True)  # a bad model fails here, before any progress
    assert weights is not None
    _log(args, f"cimc: compiling {path} for {opts.hw.name} (max-seq {opts.max_seq}, max-ctx {opts.max_ctx}) ...")
    session = Session(compile_module(module, weights, opts)[0], opts.hw, name=path)
    gen = generate(session, [0] * args.prompt, args.new_tokens, numerics=False)
    if args.report_json:
        _text_out(args.report_json, json.dumps(gen.report, indent=1) + "\n")
    if not args.quiet:
        print(render_text(gen.report))


def cmd_demo(args: argparse.Namespace) -> None:
    from cimc.demo import run_demo

    run_demo(hw_spec=args.hw, overrides=args.hw_set, quiet=args.quiet)


# ---- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from cimc.dse.search import BACKENDS, INFEASIBLE_CAP
    from cimc.hfconfig import FAMILIES

    ap = argparse.ArgumentParser(
        prog="cimc", epilog=EPILOG,
        description="Compile decoder-only language models (ONNX) to a compute-in-memory accelerator and "
                    "simulate them with cycle and energy accounting.")
    ap.add_argument("--version", action="version", version=f"cimc {_version()}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile an ONNX model to a .cimb binary", epilog=EPILOG)
    p.add_argument("model", help="model .onnx (external data next to it is mapped, not loaded) or .cimir dump")
    p.add_argument("-o", "--output", required=True, help="binary to write (.cimb)")
    _add_frontend(p)
    _add_hw(p)
    p.add_argument("--dump-after", action="append", metavar="PASS|all",
                   help="print the IR after this pass (repeatable), or write it to --dump-dir")
    p.add_argument("--dump-dir", metavar="DIR", help="write NN-<pass>.cimir files here instead of printing "
                   "(alone: after every pass)")
    p.add_argument("--time-passes", action="store_true", help="print how long each pass took")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("check", help="tell whether cimc can compile a model (frontend only, fast): the "
                       "architecture it recognised, or every node it cannot compile, grouped", epilog=EPILOG)
    p.add_argument("model", help="model .onnx")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                   help="bind a named dynamic input dimension other than batch and sequence")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="simulate a binary: outputs, time and energy", epilog=EPILOG)
    p.add_argument("binary", help="a .cimb from `cimc compile`")
    p.add_argument("--inputs", metavar="NPZ", help="inputs keyed by ONNX input name (or input.NAME)")
    p.add_argument("--outputs", metavar="NPZ", help="write the outputs under their ONNX names")
    p.add_argument("--report-json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--entry", default="prefill", metavar="NAME",
                   help="program to run: prefill (up to --max-seq tokens, default) or decode (one token)")
    p.add_argument("--past", type=int, default=None, metavar="N",
                   help="tokens already in the KV cache (default: as many as the past key/value inputs hold, "
                        "else 0); with --no-numerics, prices a run at that context length")
    p.add_argument("--no-numerics", action="store_true",
                   help="timing and energy only (no values computed; fast on any model size)")
    p.add_argument("--tokens", type=int, default=1, metavar="N",
                   help="tokens the run takes with --no-numerics (default 1; the decode entry takes exactly 1)")
    _add_hw(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no report on stdout")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("generate", help="greedy generation on the simulator: tokens, TTFT, tokens/s, tokens/J",
                       epilog=EPILOG)
    p.add_argument("model", help="model .onnx (compiled first) or a .cimb from `cimc compile`")
    p.add_argument("--prompt-ids", required=True, metavar="IDS", help="prompt token ids, comma-separated: 1,5,9,2")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    p.add_argument("--report-json", metavar="FILE", help="write the generation report as JSON")
    p.add_argument("--trace", metavar="FILE",
                   help="write a Chrome/Perfetto trace (a track per DRAM channel, interconnect link, buffer "
                        "and tile port, tile and SFU; open it in ui.perfetto.dev)")
    _add_frontend(p, {
        "max-seq": "when compiling: most prompt tokens (default: the prompt's length)",
        "max-ctx": "when compiling: KV cache positions (default: prompt + new tokens)",
        "dim": argparse.SUPPRESS,
        "schedule": "when compiling: ping-pong balanced stages (default) or the naive no-overlap baseline",
        "pipeline": "when compiling: the pass pipeline",
    })
    p.add_argument("--no-numerics", action="store_true",
                   help="timing and energy only: price prefill and every decode step without computing values "
                        "(no tokens; for large models)")
    p.add_argument("--accuracy", action="store_true",
                   help="also compare the simulator's logits with onnxruntime's on the ONNX model, teacher-forced "
                        "on onnxruntime's greedy tokens: logit error, cosine, top-1 agreement (report key accuracy)")
    p.add_argument("--reference", metavar="FILE.onnx",
                   help="with --accuracy: the ONNX model the binary was compiled from (default: the .onnx given, "
                        "or the source model the binary records, next to it)")
    _add_hw(p)
    p.add_argument("-q", "--quiet", action="store_true", help="print only the generated ids")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("estimate", help="price a prompt and its decode steps (time, energy, tokens/s, tokens/J) "
                       "without computing values: of an ONNX model, or of a Hugging Face config.json without "
                       "weights", epilog=EPILOG)
    p.add_argument("model", nargs="?", help="model .onnx (or give --hf-config)")
    p.add_argument("--hf-config", metavar="CONFIG.json",
                   help=f"a Hugging Face config.json (model_type {', '.join(FAMILIES)}): the architecture is built "
                        "without weights, as its ONNX export would lift, and priced")
    p.add_argument("--prompt", type=int, default=128, metavar="N", help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, metavar="M",
                   help="generated tokens: the prefill's first one, then M-1 decode steps (default 128)")
    p.add_argument("--report-json", metavar="FILE",
                   help="write the report as JSON (the keys of `cimc generate --no-numerics --report-json`)")
    _add_frontend(p, {
        "max-seq": "most prompt tokens the program takes (default: --prompt)",
        "max-ctx": "KV cache positions (default: prompt + new tokens - 1)",
        "dim": "bind a named dynamic input dimension of an .onnx other than batch and sequence",
    })
    _add_hw(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no report on stdout (with --report-json)")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("ir", help="print the IR of a model (optionally after a pass), or re-print a dump",
                       epilog=EPILOG)
    p.add_argument("model", help=".onnx model or .cimir dump")
    p.add_argument("--after", metavar="PASS", help="run the pipeline up to and including PASS first")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    _add_frontend(p)
    _add_hw(p)
    p.set_defaults(func=cmd_ir)

    p = sub.add_parser("disasm", help="print a binary as assembly (cimc asm rebuilds it byte for byte)",
                       epilog=EPILOG)
    p.add_argument("binary")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument("--dram", choices=["auto", "inline", "incbin"], default="auto",
                   help="embed the DRAM image as base64 (inline) or refer to the binary (incbin); "
                        "auto: inline up to 64 MiB")
    p.set_defaults(func=cmd_disasm)

    p = sub.add_parser("asm", help="assemble a .s file into a binary", epilog=EPILOG)
    p.add_argument("source")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_asm)

    p = sub.add_parser("hw", help="list hardware presets or show one with units and sources", epilog=EPILOG)
    p.add_argument("action", choices=["show", "list"])
    p.add_argument("name", nargs="?", default=None, help="preset name or TOML file (default edgecim-65nm)")
    p.add_argument("--set", dest="hw_set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_hw)

    p = sub.add_parser("dse", help="design-space exploration: search a space of hardware for a model's Pareto front "
                       "(grid or NSGA-II), stored in RUN/evals.sqlite and RUN/points.csv", epilog=EPILOG)
    p.add_argument("model", nargs="?", help="model .onnx or Hugging Face config.json (weight-free)")
    p.add_argument("--space", required=True, metavar="FILE", help="design space TOML (see examples/spaces/)")
    p.add_argument("--dry-run", action="store_true", help="check the space and print its size and first points")
    p.add_argument("--first", type=int, default=10, metavar="N", help="points --dry-run shows (default 10)")
    p.add_argument("--objectives", metavar="A,B,...", help="what to optimise (default "
                   "tokens_per_s,tokens_per_j,area_mm2; also ttft_s, leakage_mw)")
    p.add_argument("--budget", type=int, metavar="N", help="most distinct points to compile: the whole grid if it "
                   "has no more points, else NSGA-II. Points outside the space's constraints are stored as infeasible "
                   "without compiling and do not count, but NSGA-II visits at most "
                   f"{INFEASIBLE_CAP}*N points in all, so a space with almost no feasible point ends")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="NSGA-II seed (default 0)")
    p.add_argument("--workers", type=int, default=None, metavar="W", help="worker processes, local or of dask's "
                   "LocalCluster (default: one per core); the results do not depend on it")
    p.add_argument("--backend", choices=list(BACKENDS), default="local", help="where points are evaluated: local "
                   "worker processes (default) or dask.distributed (pip install 'cimc[dask]'); same results")
    p.add_argument("--address", metavar="HOST:PORT", help="with --backend dask: an existing scheduler's address "
                   "(default: start a LocalCluster of --workers processes)")
    p.add_argument("--out", metavar="RUN", help="run folder to create (evals.sqlite, points.csv)")
    p.add_argument("--resume", action="store_true", help="continue the sweep stored in --out: stored points are "
                   "not evaluated again")
    p.add_argument("--prompt", type=int, default=128, metavar="N", help="prompt tokens priced (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, metavar="M",
                   help="generated tokens: the prefill's first one, then M-1 decode steps (default 128)")
    _add_frontend(p, {
        "max-seq": "most prompt tokens the program takes (default: --prompt)",
        "max-ctx": "KV cache positions (default: prompt + new tokens - 1)",
    })
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_dse)

    p = sub.add_parser("demo", help="compile and run the bundled example model, check it against onnxruntime",
                       epilog=EPILOG)
    _add_hw(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cimc")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, 3 internal error)."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CimcError as e:
        print(f"cimc: error: {e.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cimc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        if os.environ.get("CIMC_DEBUG"):
            raise
        print(f"cimc: internal error: {type(e).__name__}: {e} (this is a bug in cimc; rerun with "
              "CIMC_DEBUG=1 for a traceback and report it)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
