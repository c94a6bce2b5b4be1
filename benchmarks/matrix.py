"""The family × exporter × precision matrix: compile every model of the test zoo, generate, compare.

Each cell is one file of `tests/zoo/` (see its MANIFEST.md; made by `dev/zoo/make_zoo.py`). A
cell passes when cimc compiles it, and the simulator, teacher-forced on onnxruntime's own greedy
tokens after the family's prompt (`cimc.measure_accuracy`), has logits within the precision's bar
(`BARS`) at every position, and a free-running greedy generation gives onnxruntime's ids. Graphs
whose inputs are quantized to uint8 over the whole input at once (`quantize_dynamic`) are compared
on one full-sequence run instead, the only like-for-like comparison (see `measure_accuracy`).
A cell the exporter could not make is listed as such.

    python benchmarks/matrix.py            # run every cell; write tests/zoo/matrix.json, docs/matrix.md, README table
    python benchmarks/matrix.py --check    # exit 1 if docs/matrix.md or README's table is not what matrix.json gives

`tests/test_zoo_matrix.py` re-runs every cell and checks it still gets the verdict recorded here.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cimc.accuracy import (  # noqa: E402
    compare_logits,
    measure_accuracy,
    reference_logits,
    simulated_logits,
    whole_input_quantized,
)
from cimc.driver import CompileOptions, compile_model, group_failures  # noqa: E402
from cimc.frontend.model import CannotCompile  # noqa: E402
from isa.atomic import atomic_file  # noqa: E402
from isa.diag import CimcError  # noqa: E402
from runtime.generate import generate  # noqa: E402
from runtime.interpreter import Session  # noqa: E402

ZOO = ROOT / "tests" / "zoo"
RESULTS = ZOO / "matrix.json"
DOC = ROOT / "docs" / "matrix.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- matrix:begin (benchmarks/matrix.py) -->", "<!-- matrix:end -->"
NEW_TOKENS = 8
#: Compile options of every cell: the family prompts are 9 tokens, generation adds 8.
OPTIONS = {"max_seq": 16, "max_ctx": 32}
#: What a cell must reach, by the precision of its file: (max abs logit error, mean cosine) bounds.
#: fp32 is the issue's 1e-4; imported integer graphs are held to the import tests' fidelity.
BARS = {"fp32": {"max_abs_error": 1e-4}, "int4": {"mean_cosine": 0.999}, "int8": {"mean_cosine": 0.999}}
FLAVOURS = {
    "a_dynamo": "torch dynamo",
    "b_dynamo_kv": "torch dynamo + KV cache",
    "t_torchscript": "TorchScript",
    "c_optimum_kv": "optimum + KV cache",
    "g_genai_fp32": "genai fp32",
    "d_genai_int4": "genai int4",
    "e_int4_rtn": "ORT MatMulNBits int4",
    "q_int8_dynamic": "ORT quantize_dynamic int8",
    "o_dynamo_opset23": "torch dynamo opset 23",
    "o_dynamo_opset23_kv": "torch dynamo opset 23 + KV cache",
    "f_ort_fused": "onnxscript ORT fusions",
}


@functools.cache
def zoo() -> dict:
    """The zoo's manifest: `models` (one record per file) and `families` (prompt per family); read
    once (the renderers each consult it). Not to be mutated."""
    return json.loads((ZOO / "zoo.json").read_text(encoding="utf-8"))


def _why(e: CimcError, file: str) -> str:
    """A failed cell's reason: the error's first line, or for unliftable nodes their op groups."""
    if isinstance(e, CannotCompile):
        groups = group_failures(e.failures)
        shown = "; ".join(f"{(g['domain'] + ':') if g['domain'] else ''}{g['op_type']} ×{g['count']}: "
                          f"{g['reason'][:110]}" for g in groups[:2])
        more = f"; {len(groups) - 2} more kind(s)" if len(groups) > 2 else ""
        return f"cannot compile {len(e.failures)} node(s): {shown}{more}"
    return (str(e).splitlines() or [type(e).__name__])[0].replace(str(ZOO / file), file)


def run_cell(record: dict, prompt: list[int]) -> dict:
    """Compile and measure one zoo file: `{"verdict": pass|fail|not made, "reason", figures...}`."""
    if record["status"] != "ok":
        return {"verdict": "not made", "reason": record["status"]}
    path = ZOO / record["file"]
    try:
        program = compile_model(path, CompileOptions(**OPTIONS))
        if whole_input_quantized(program):  # compare one full-sequence run, the like-for-like one
            tokens, want = reference_logits(path, prompt, NEW_TOKENS)
            whole = simulated_logits(Session(program), prompt + tokens[:-1], tokens[-1:])
            acc = {**compare_logits(whole, want), "reference_tokens": tokens}
        else:
            acc = measure_accuracy(program, path, prompt, NEW_TOKENS)
        greedy = generate(Session(program), prompt, NEW_TOKENS).tokens
    except CimcError as e:
        return {"verdict": "fail", "reason": _why(e, record["file"])}
    figures = {k: acc[k] for k in ("max_abs_error", "mean_cosine", "top1_agreement")}
    bar = BARS[record["precision"]]
    misses = []
    if greedy != acc["reference_tokens"]:
        misses.append(f"greedy ids {greedy} != onnxruntime's {acc['reference_tokens']}")
    if acc["max_abs_error"] > bar.get("max_abs_error", float("inf")):
        misses.append(f"max abs error {acc['max_abs_error']:.2e} > {bar['max_abs_error']:.0e}")
    if acc["mean_cosine"] < bar.get("mean_cosine", -1.0):
        misses.append(f"mean cosine {acc['mean_cosine']:.6f} < {bar['mean_cosine']}")
    return {"verdict": "fail" if misses else "pass", "reason": "; ".join(misses), **figures}


def run_all(progress: bool = True) -> dict[str, dict]:
    z = zoo()
    prompts = {f["family"]: f["prompt"] for f in z["families"]}
    out = {}
    for i, rec in enumerate(z["models"]):
        out[rec["file"]] = run_cell(rec, prompts[rec["family"]])
        if progress:
            print(f"[{i + 1}/{len(z['models'])}] {rec['file']}: {out[rec['file']]['verdict']}", file=sys.stderr)
    return out


_MARK = {"pass": "✓", "fail": "✗", "not made": "—"}


def _grid(results: dict[str, dict]) -> list[str]:
    z = zoo()
    families = [f["family"] for f in z["families"]]
    by = {(r["family"], r["flavour"]): r["file"] for r in z["models"]}
    flavours = [f for f in FLAVOURS if any(fl == f for _, fl in by)]
    lines = ["| family | " + " | ".join(FLAVOURS[f] for f in flavours) + " |",
             "|---|" + "---|" * len(flavours)]
    for fam in families:
        cells = [_MARK[results[by[fam, f]]["verdict"]] if (fam, f) in by else " " for f in flavours]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return lines


def _totals(results: dict[str, dict]) -> str:
    c = Counter(r["verdict"] for r in results.values())
    made = c["pass"] + c["fail"]
    return f"{c['pass']}/{made} cells pass ({c['not made']} not made by their exporter)"


def _ops(results: dict[str, dict]) -> str:
    ops = sorted({op for r in zoo()["models"] if results[r["file"]]["verdict"] == "pass" for op in r["ops"]})
    return ", ".join(f"`{op.removeprefix('ai.onnx:')}`" for op in ops)


def readme_section(results: dict[str, dict]) -> str:
    return "\n".join([
        BEGIN,
        f"Families × exporters of the test zoo (`tests/zoo/`), each cell compiled, generated for {NEW_TOKENS} "
        "tokens and compared with onnxruntime on the same file: ✓ greedy ids equal and teacher-forced logits "
        "within 1e-4 max abs (fp32) or mean cosine ≥ 0.999 (integer imports); ✗ fails (reasons in "
        "[docs/matrix.md](docs/matrix.md)); — the exporter cannot make it. "
        f"{_totals(results)}; {_worst(results)}.", "", *_grid(results), "",
        f"ONNX ops in the passing exports: {_ops(results)}.", END])


def _worst(results: dict[str, dict]) -> str:
    """The largest fp32 logit error and the smallest integer-import cosine among passing cells."""
    precision = {r["file"]: r["precision"] for r in zoo()["models"]}
    passing = [(f, r) for f, r in results.items() if r["verdict"] == "pass"]
    err = max((r["max_abs_error"] for f, r in passing if precision[f] == "fp32"), default=0.0)
    cos = min((r["mean_cosine"] for f, r in passing if precision[f] != "fp32"), default=1.0)
    return f"the passing fp32 cells are within {err:.1e} max abs logit error, the integer imports ≥ {cos:.6f} cosine"


def doc(results: dict[str, dict]) -> str:
    z = zoo()
    lines = ["# Family × exporter × precision matrix", "",
             "Generated by `python benchmarks/matrix.py` from `tests/zoo/matrix.json`; "
             "`tests/test_zoo_matrix.py` re-runs every cell and checks its verdict. "
             f"Compile options {OPTIONS}; {NEW_TOKENS} new tokens after each family's prompt; bars {BARS}.", "",
             f"overall: {_totals(results)}", "", *_grid(results), "",
             "| file | precision | verdict | max abs error | mean cosine | reason |", "|---|---|---|---|---|---|"]
    for rec in z["models"]:
        r = results[rec["file"]]
        err = f"{r['max_abs_error']:.2e}" if "max_abs_error" in r else ""
        cos = f"{r['mean_cosine']:.6f}" if "mean_cosine" in r else ""
        reason = r.get("reason", "").replace("|", "\\|")
        lines.append(f"| {rec['file']} | {rec['precision']} | {r['verdict']} | {err} | {cos} | {reason} |")
    return "\n".join(lines) + "\n"


def _with_section(text: str, section: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    return head + section + rest.split(END, 1)[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check the docs against tests/zoo/matrix.json")
    args = ap.parse_args()
    if args.check:
        results = json.loads(RESULTS.read_text(encoding="utf-8"))
        readme = README.read_text(encoding="utf-8")
        stale = [str(p) for p, ok in ((DOC, DOC.read_text(encoding="utf-8") == doc(results)),
                                      (README, _with_section(readme, readme_section(results)) == readme)) if not ok]
        if stale:
            print(f"stale: {', '.join(stale)}; run python benchmarks/matrix.py", file=sys.stderr)
        return 1 if stale else 0
    results = run_all()
    with atomic_file(RESULTS, "w", encoding="utf-8") as f:
        f.write(json.dumps(results, indent=1, sort_keys=True) + "\n")
    with atomic_file(DOC, "w", encoding="utf-8") as f:
        f.write(doc(results))
    readme = _with_section(README.read_text(encoding="utf-8"), readme_section(results))
    with atomic_file(README, "w", encoding="utf-8") as f:
        f.write(readme)
    print(_totals(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
