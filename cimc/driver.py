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
from cimc.family import recognise
from cimc.frontend import import_onnx, open_model
from cimc.frontend.model import CannotCompile
from cimc.hfconfig import NoWeights, build_module, read_config
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
    """Read a model (.onnx), an IR dump (.cimir) or a Hugging Face config.json (weight-free,
    `cimc.hfconfig`); returns the module and its weight source (None for a dump whose model is
    not next to it, an error with `need_weights`; for a config, one that refuses every read)."""
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
    if p.suffix == ".json":
        if opts.dims:
            raise CimcError(f"{p}: --dim applies when lifting an .onnx; a config.json's dimensions are its own")
        module = build_module(read_config(p), max_seq, opts.max_ctx, source=p.name)
        return module, NoWeights(str(p))
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


# ---- cimc check --------------------------------------------------------------------------------

#: `check_model` lifts at this many tokens: enough for the frontend's checks, and fast.
CHECK_MAX_SEQ = 8


def _hint(reason: str) -> str:
    """What a user can do about a node `cimc check` reports, from its reason."""
    if reason == "operator not supported yet":
        return "a contrib op, not supported yet: export without it (a plain torch.onnx export, no " \
               "onnxruntime fusions) or ask for a converter"
    if reason == "not a standard ONNX operator":
        return "not in any ONNX opset: re-export with standard ONNX ops only"
    if "cimc converts it at opsets" in reason:
        return "this opset's form of the op is not converted: re-export at one of the opsets named"
    if "idiom" in reason or "is supported in" in reason or "must be followed" in reason:
        return "a decoder pattern (RoPE, attention, a quantized chain) that did not match; the reason says " \
               "where it differs: compare the export with a supported one"
    if reason.startswith("op ") and "not supported on activations" in reason:
        return "no lowering for this op on activations: export without it"
    return "this use of the op is not supported (see the reason)"


def group_failures(failures: list) -> list[dict]:
    """Unsupported nodes grouped by (domain, op type, reason), most frequent first."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for node, reason in failures:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        groups.setdefault((domain, node.op_type, reason), []).append(node.name)
    return [{"domain": d, "op_type": op, "count": len(names), "nodes": names, "reason": reason,
             "hint": _hint(reason)}
            for (d, op, reason), names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]


def _weight_format(op, act: str) -> str:
    """How a linear's weight operand is stored: f32, or e.g. `int4 matmulnbits (group 32, act i8)`."""
    if op is None:
        return "computed"
    dtype = op.result.type.dtype
    if op.name == "weight":
        return dtype + (f" (act {act})" if act else "")
    if op.name != "qweight":
        return op.name
    bits = "".join(ch for ch in dtype if ch.isdigit())
    kind = ("uint" if dtype.startswith("u") else "int") + bits
    group = op.attrs.get("group", op.attrs.get("block"))
    notes = [f"group {group}" if group else "per channel" if group == 0 else "", f"act {act}" if act else ""]
    notes = [n for n in notes if n]
    return f"{kind} {op.attrs.get('format', '?')}" + (f" ({', '.join(notes)})" if notes else "")


def _summary(module: Module) -> dict:
    """What the lifted IR shows of the model's architecture."""
    attn = list(module.walk("attention"))

    def one(key: str) -> int | list[int] | None:
        vals = sorted({int(op.attrs[key]) for op in attn if key in op.attrs})
        return vals[0] if len(vals) == 1 else (vals or None)

    emb = next(module.walk("embedding"), None)
    hidden = int(emb.result.type.shape[-1]) if emb is not None else None
    outs = [op for op in module.outputs() if "heads" not in op.attrs]
    vocab = int(outs[0].operands[0].type.shape[-1]) if outs and outs[0].operands else None
    formats: dict[str, int] = {}
    # the lifter may leave dead ops (a fused projection whose slices were lifted instead): count
    # only linears an output depends on
    live: set[int] = set()
    for op in reversed(module.ops):
        if not op.results or any(id(user) in live for r in op.results for user in r.users):
            live.add(id(op))
    for op in module.walk("linear"):
        if id(op) not in live:
            continue
        fmt = _weight_format(op.operands[1].owner if len(op.operands) > 1 else None, op.attrs.get("act", ""))
        formats[fmt] = formats.get(fmt, 0) + 1
    caches = [op.attrs.get("name", "") for op in module.walk("kv_cache")]
    return {"layers": len(attn), "heads": one("heads"), "kv_heads": one("kv_heads"), "head_dim": one("head_dim"),
            "hidden": hidden, "vocab": vocab, "kv_cache": bool(caches), "kv_cache_inputs": len(caches),
            "linears": sum(formats.values()), "weights": formats}


def check_model(path: str | os.PathLike, dims: dict[str, int] | None = None) -> dict:
    """Whether cimc can compile the ONNX model at `path`: the frontend only (no passes, no code),
    so it is fast. Returns `{"model", "compiles": True, "family", "features", ...architecture}`
    (`cimc.family.recognise`; `_summary`: layers,
    heads, kv_heads, head_dim, hidden, vocab, kv_cache, linears, weights: format -> count of
    linears) or `{"model", "compiles": False, "unsupported": [{domain, op_type, count, nodes,
    reason, hint}, ...]}`. A file that is not a readable model raises CimcError as compile does."""
    if Path(path).suffix == ".cimir":
        raise CimcError(f"{path}: cimc check takes an .onnx model (an IR dump is lifted already)")
    try:
        module, _ = import_onnx(path, max_seq=CHECK_MAX_SEQ, dims=dims)
    except CannotCompile as e:
        if not e.failures:
            raise
        return {"model": str(path), "compiles": False, "unsupported": group_failures(e.failures)}
    run_pipeline(module, CompileOptions(), until="lift-idioms")
    family, features = recognise(module)
    return {"model": str(path), "compiles": True, "family": family, "features": features, **_summary(module)}


def render_check(result: dict) -> str:
    """`check_model`'s answer for a model that compiles, as one line."""
    name = Path(result["model"]).name

    def num(v: object) -> str:
        return "/".join(map(str, v)) if isinstance(v, list) else str(v)

    layers = result["layers"]
    arch = f"{result['family']}-style decoder" if result["family"] else "decoder of no known family"
    parts = [f"{arch} ({', '.join(result['features'])})" if result["features"] else arch]
    parts += [f"{layers} layer{'s' if layers != 1 else ''}" if layers else "no attention layers"]
    if layers:
        parts.append(f"{num(result['heads'])} heads ({num(result['kv_heads'])} KV heads, "
                     f"head_dim {num(result['head_dim'])})")
    if result["hidden"] is not None:
        parts.append(f"hidden {result['hidden']}")
    if result["vocab"] is not None:
        parts.append(f"vocab {result['vocab']}")
    parts.append(f"KV cache in the export ({result['kv_cache_inputs']} past inputs)" if result["kv_cache"]
                 else "no KV cache in the export")
    formats = sorted(result["weights"].items(), key=lambda kv: -kv[1])
    weights = ", ".join(f"{n} x {fmt}" for fmt, n in formats)
    if len(formats) == 1:
        weights += " linears"
    elif formats:
        weights = f"{result['linears']} linears: {weights}"
    return f"{name}: {', '.join(parts)}; weights: {weights or 'no linears'}; compiles"


def render_unsupported(result: dict) -> CimcError:
    """`check_model`'s answer for a model that does not compile, as the error the CLI prints."""
    groups = result["unsupported"]
    lines = []
    for g in groups:
        op = f"{g['domain']}:{g['op_type']}" if g["domain"] else g["op_type"]
        nodes = ", ".join(g["nodes"][:3]) + (", ..." if len(g["nodes"]) > 3 else "")
        lines.append(f"  {op} x {g['count']} ({nodes}): {g['reason']} -- {g['hint']}")
    n = sum(g["count"] for g in groups)
    return CimcError(f"{result['model']}: cannot compile {n} node(s) of {len(groups)} kind(s)",
                     detail="\n".join(lines))
