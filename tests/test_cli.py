"""The `cimc` command line, exercised the way a user types it.

Most checks call `cimc.cli.main(argv)` in-process; a few run the installed `cimc` console script
in a subprocess to prove the entry point works. Expected values come from onnxruntime (the
reference `.npz` written at export time, or a live `InferenceSession` on the same ONNX file),
from the hardware presets, or from the files the test itself wrote; never from an earlier cimc run.

Bad input must give exit status 2 and one `cimc: error: ...` line naming what is wrong and where,
no traceback, no stdout, and must leave the output folder exactly as it was. Allowed extras after
that line: the source line and a caret under the column (assembly and IR parse errors), and the
indented list of unsupported nodes (`cannot compile N node(s)`), one node per line, as
`isa.diag.CimcError.detail` documents.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_fixtures import EXAMPLE, max_err, ort_logits
from onnx import TensorProto, helper, numpy_helper

from cimc.driver import DEFAULT_PIPELINE
from isa.binary import read_binary, read_sections
from isa.hw import NOT_MODELLED, SCHEMA, load_hw

PASSES = [p.split("{")[0] for p in DEFAULT_PIPELINE.split(",")]
ZOO = ["llama_a_dynamo", "qwen2_a_dynamo"]
LAYERS = ["embed", "layer0", "layer1", "head"]
TOL = 1e-4
OUTPUT_FLAGS = {"-o", "--output", "--outputs", "--report-json", "--dump-dir"}


# ---- helpers ---------------------------------------------------------------------------------


def _ok(*argv: object) -> None:
    """Run the CLI in-process for a fixture; the fixture is unusable if this fails."""
    from cimc.cli import main

    status = main([str(a) for a in argv])
    assert status == 0, f"fixture command `cimc {' '.join(map(str, argv))}` exited with {status}"


def _fill(text: str, ctx: dict[str, str]) -> str:
    """Replace `{key}` for the keys of `ctx` only (pipelines use braces too)."""
    return re.sub(r"\{(\w+)\}", lambda m: ctx.get(m.group(1), m.group(0)), text)


def assert_user_error(res, needles: list[str], extra: object = None) -> None:
    """Exit 2, no stdout, no traceback, one `cimc: error:` line holding every needle.

    `extra`: None (nothing else on stderr), "caret" (source line + caret under the reported
    column), or a list of strings, one per following indented line (the unsupported-node list).
    """
    assert res.status == 2, f"exit status {res.status}, stderr:\n{res.err}"
    assert "Traceback" not in res.err + res.out
    assert res.out == "", f"unexpected stdout on error:\n{res.out}"
    lines = res.err.splitlines()
    assert lines and lines[0].startswith("cimc: error: "), res.err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing from {lines[0]!r}"
    rest = lines[1:]
    if extra is None:
        assert rest == [], f"stderr has more than one line:\n{res.err}"
    elif extra == "caret":
        assert len(rest) == 2 and rest[0].strip(), f"expected a source line and a caret:\n{res.err}"
        assert re.fullmatch(r" *\^", rest[1]), rest[1]
        col = int(re.search(r":\d+:(\d+): ", lines[0]).group(1))  # type: ignore[union-attr]
        assert rest[1].index("^") == 2 + col - 1, f"caret is not under column {col}:\n{res.err}"
    else:
        assert isinstance(extra, list)
        assert len(rest) == len(extra), f"expected {len(extra)} detail line(s):\n{res.err}"
        for line, needle in zip(rest, extra, strict=True):
            assert line.startswith("  ") and needle in line, (line, needle)


def assert_node_refused(res, path: Path, out: Path, head: str, needle: str) -> None:
    """`cimc compile path -o out` refused exactly one node: exit 2, nothing written, no traceback or
    internal error, the file's one-line error, then one line for the node starting `head: ` and
    holding `needle`."""
    lines = res.err.strip().splitlines()
    assert res.status == 2 and not out.exists(), res.err
    assert "Traceback" not in res.err and "internal error" not in res.err, res.err
    assert lines[0] == f"cimc: error: {path}: cannot compile 1 node(s); nothing was written", res.err
    assert len(lines) == 2 and lines[1].startswith(f"  {head}: "), res.err
    assert needle in lines[1], res.err


def _cimc_exe() -> Path:
    bindir = Path(sys.executable).parent
    for name in ("cimc", "cimc.exe"):
        if (bindir / name).is_file():
            return bindir / name
    raise AssertionError(f"the `cimc` console script is not installed next to {sys.executable}")


def run_exe(*argv: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CIMC_DEBUG"}
    return subprocess.run([str(_cimc_exe()), *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def _graph_outputs(model: Path) -> dict[str, list]:
    graph = onnx.load(str(model), load_external_data=False).graph
    return {o.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in o.type.tensor_type.shape.dim]
            for o in graph.output}


def _unsupported_model(path: Path, bad_ops: list[str]) -> None:
    """input_ids -> Gather(embedding) -> one branch per op in `bad_ops` (summed) -> MatMul -> logits.

    An op is `OpType` or `domain:OpType`; its node is `my_<optype>` (`my_lpnorm` for
    LpNormalization), a repeat `my_<optype>2`, `3`, .... With `bad_ops == []` the graph is fully
    supported (a control for the error cases).
    """
    vocab, hidden = 32, 16
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32), "head")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed")]
    branches: list[str] = []
    domains = {""}
    for i, spec in enumerate(bad_ops):
        domain, _, op = spec.rpartition(":")
        domains.add(domain)
        repeat = bad_ops[:i].count(spec)
        name = "my_lpnorm" if op == "LpNormalization" else f"my_{op.lower()}"
        name += str(repeat + 1) if repeat else ""
        out = f"{name}_out"
        attrs = {"axis": -1} if op == "LpNormalization" else {}
        nodes.append(helper.make_node(op, ["h"], [out], name=name, domain=domain, **attrs))
        branches.append(out)
    cur = branches[0] if branches else "h"
    for i, other in enumerate(branches[1:]):
        nodes.append(helper.make_node("Add", [cur, other], [f"sum{i}"], name=f"sum{i}"))
        cur = f"sum{i}"
    nodes.append(helper.make_node("MatMul", [cur, "head"], ["logits"], name="lm_head"))
    graph = helper.make_graph(nodes, "handmade",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, 17 if d == "" else 1)
                                                    for d in sorted(domains)])
    model.ir_version = 8
    onnx.save(model, str(path))


# ---- session fixtures: compile once ----------------------------------------------------------


@pytest.fixture(scope="session")
def zoo(shared_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared torch-dynamo exports compiled with default options, as a user would."""
    out = tmp_path_factory.mktemp("zoo")
    bins = {}
    for name in ZOO:
        for suffix in (".onnx", ".npz"):
            if not (shared_models / f"{name}{suffix}").is_file():
                pytest.skip(f"shared model {name}{suffix} is not in {shared_models}")
        bins[name] = out / f"{name}.cimb"
        _ok("compile", shared_models / f"{name}.onnx", "-o", bins[name], "-q")
    return bins


@pytest.fixture(scope="session")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Bad inputs of every kind, built from the bundled example (no shared models needed).

    Returns the substitutions for the error table: `{bad}` (the folder), `{tiny}` (the example
    compiled with --max-seq 4), `{example}` (the example .onnx), `{ids}` (3 good token ids) and
    the positions of the planted assembly / IR mistakes.
    """
    d = tmp_path_factory.mktemp("bad")
    example = EXAMPLE
    tiny = d / "tiny.cimb"
    _ok("compile", example, "-o", tiny, "--max-seq", "4", "-q")
    ref = np.load(EXAMPLE.with_suffix(".npz"))
    ids = ref["input.input_ids"]
    vocab = ref["output.logits"].shape[-1]
    ctx = {"bad": str(d), "tiny": str(tiny), "example": str(example), "ids": str(d / "ids.npz"),
           "vocab": str(vocab)}

    # inputs
    np.savez(d / "ids.npz", input_ids=ids[:, :3])
    np.savez(d / "five.npz", input_ids=ids[:, :5])
    np.savez(d / "no_ids.npz", **{"input.tokens": ids[:, :3]})
    np.savez(d / "extra_key.npz", input_ids=ids[:, :3], attention_mask=np.ones_like(ids[:, :3]))
    np.savez(d / "float_ids.npz", input_ids=ids[:, :3].astype(np.float32))
    np.savez(d / "rank1.npz", input_ids=ids[0, :3])
    oov = ids[:, :3].copy()
    oov[0, 1] = vocab
    np.savez(d / "oov.npz", input_ids=oov)
    neg = ids[:, :3].copy()
    neg[0, 2] = -1
    np.savez(d / "negative.npz", input_ids=neg)
    np.save(d / "ids.npy", ids[:, :3])
    (d / "notes.npz").write_text("these are not arrays\n")

    # models
    (d / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "notes.onnx").write_text("ir_version: 8\nthis is a text file, not a protobuf\n")
    data = example.read_bytes()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    _unsupported_model(d / "sin.onnx", ["Sin"])
    _unsupported_model(d / "sin_lpnorm.onnx", ["Sin", "LpNormalization"])
    _unsupported_model(d / "made_up.onnx", ["Frobnicate"])

    # hardware files
    (d / "syntax.toml").write_text('extends = "edgecim-28nm"\n[chip\nf_clk_mhz = 300\n')
    (d / "unknown_key.toml").write_text('extends = "edgecim-28nm"\n[chip]\nfrobs = 3\n')
    (d / "out_of_range.toml").write_text('extends = "edgecim-28nm"\n[macro]\nrows = 99999\n')

    # binaries
    binary = tiny.read_bytes()
    (d / "half.cimb").write_bytes(binary[: len(binary) // 2])
    (d / "ten.cimb").write_bytes(binary[:10])
    sections = read_sections(tiny)
    spots = [("header", 8)] + [(t, sections[t].offset + sections[t].size // 2) for t in ("META", "C000", "DRAM")]
    for tag, at in spots:
        flipped = bytearray(binary)
        flipped[at] ^= 0xFF
        (d / f"flip_{tag.lower()}.cimb").write_bytes(bytes(flipped))

    # assembly: plant mistakes in the first instruction after .text
    _ok("disasm", tiny, "-o", d / "tiny.s")
    lines = (d / "tiny.s").read_text().split("\n")
    ti = lines.index(".text")
    first = lines[ti + 1]
    indent = len(first) - len(first.lstrip())
    mnemonic = first.split()[0]
    field = re.search(r"(\w+)=([^,\s]+)", first)
    assert field is not None
    ctx.update(asm_line=str(ti + 2), asm_col=str(indent + 1), asm_field=field.group(1),
               field_col=str(field.start(2) + 1), no_text_line=str(ti + 1))

    def write_asm(name: str, text_lines: list[str]) -> None:
        (d / name).write_text("\n".join(text_lines))

    write_asm("mnemonic.s", [*lines[: ti + 1], first.replace(mnemonic, "frobnicate", 1), *lines[ti + 2:]])
    write_asm("field.s", [*lines[: ti + 1], first[: field.start(2)] + "zz" + first[field.end(2):], *lines[ti + 2:]])
    write_asm("no_text.s", lines[:ti] + lines[ti + 1:])
    write_asm("directives_only.s", lines[:ti])

    # IR: plant mistakes in the embedding op
    _ok("ir", example, "--max-seq", "4", "-o", d / "tiny.cimir")
    _ok("ir", example, "--max-seq", "4", "--after", "tile-partition", "-o", d / "tiled.cimir")
    ir = (d / "tiny.cimir").read_text().split("\n")
    k = next(i for i, line in enumerate(ir) if re.match(r"%\d+ = embedding\(", line))
    m = re.match(r"%\d+ = embedding\(", ir[k])
    assert m is not None
    ctx.update(ir_line=str(k + 1), ir_col=str(m.end() + 1))
    (d / "syntax.cimir").write_text("\n".join([*ir[:k], ir[k][: m.end()] + "(" + ir[k][m.end():], *ir[k + 1:]]))
    (d / "unknown_op.cimir").write_text("\n".join([*ir[:k], ir[k].replace("embedding(", "embeddingx(", 1),
                                                   *ir[k + 1:]]))
    (d / "version.cimir").write_text("\n".join(["cimir 99", *ir[1:]]))
    (d / "binary.cimir").write_bytes(b"\xb8\xff" + np.random.default_rng(1).bytes(200))
    return ctx


# ---- the user workflow, literally ------------------------------------------------------------


def test_user_workflow_as_typed(cli, shared_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """compile / run / ir / ir round trip / disasm + asm, with relative paths from the work folder."""
    monkeypatch.chdir(tmp_path)
    models = Path(os.path.relpath(shared_models, tmp_path))
    model = models / "llama_a_dynamo.onnx"

    res = cli("compile", model, "-o", "llama.cimb")
    assert res.status == 0, res.err
    assert "llama.cimb" in res.err and "Traceback" not in res.err

    res = cli("run", "llama.cimb", "--inputs", models / "llama_a_dynamo.npz", "--outputs", "out.npz",
              "--report-json", "report.json")
    assert res.status == 0, res.err
    ref = np.load(models / "llama_a_dynamo.npz")["output.logits"]
    with np.load("out.npz") as out:
        assert max_err(out["logits"], ref) <= TOL
    assert json.loads(Path("report.json").read_text())["tokens"] == ref.shape[1]

    res = cli("ir", model, "--after", "balance-stages")
    assert res.status == 0, res.err
    Path("llama.cimir").write_text(res.out)
    again = cli("ir", "llama.cimir")
    assert again.status == 0, again.err
    assert again.out == res.out

    res = cli("disasm", "llama.cimb")
    assert res.status == 0, res.err
    Path("llama.s").write_text(res.out)
    res = cli("asm", "llama.s", "-o", "again.cimb")
    assert res.status == 0, res.err
    assert Path("again.cimb").read_bytes() == Path("llama.cimb").read_bytes()

    # every output is where the user asked, and no temporary file is left behind
    assert sorted(os.listdir()) == ["again.cimb", "llama.cimb", "llama.cimir", "llama.s", "out.npz", "report.json"]


# ---- run: numerics and report ----------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_run_outputs_match_onnxruntime_and_report_is_complete(cli, zoo, shared_models: Path, tmp_path: Path,
                                                              name: str) -> None:
    model, npz = shared_models / f"{name}.onnx", shared_models / f"{name}.npz"
    res = cli("run", zoo[name], "--inputs", npz, "--outputs", tmp_path / "out.npz",
              "--report-json", tmp_path / "report.json")
    assert res.status == 0, res.err

    ref = np.load(npz)
    want = ref["output.logits"]
    graph_outputs = _graph_outputs(model)
    with np.load(tmp_path / "out.npz") as out:
        assert sorted(out.keys()) == sorted(graph_outputs) == ["logits"]
        got = out["logits"]
    assert got.dtype == np.float32
    assert got.shape == want.shape == (*ref["input.input_ids"].shape, graph_outputs["logits"][-1])
    assert max_err(got, want) <= TOL

    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("cycles", "seconds", "joules", "energy_pj", "units", "layers"):
        assert key in report, f"report.json lacks {key!r}"
    assert report["tokens"] == want.shape[1]
    assert report["cycles"] > 0
    f_hz = load_hw().chip.f_clk_mhz * 1e6
    assert report["seconds"] == pytest.approx(report["cycles"] / f_hz, rel=1e-9)
    energy = report["energy_pj"]
    assert energy and all(v >= 0 for v in energy.values()) and {"dram", "mvm", "leakage"} <= energy.keys()
    assert report["joules"] == pytest.approx(sum(energy.values()) * 1e-12, rel=1e-9)
    units = report["units"]
    assert {"dram0", "gbuf.rd", "tile0", "sfu0", "port0.in"} <= units.keys()
    for unit, u in units.items():
        assert 0 <= u["busy_cycles"] <= report["cycles"] * (1 + 1e-9), unit
    assert list(report["layers"]) == LAYERS
    assert sum(layer["instructions"] for layer in report["layers"].values()) == report["instructions"]

    text = res.out
    assert "time" in text and "energy" in text
    assert f"{report['cycles']:,.0f} cycles" in text
    for layer in LAYERS:
        assert re.search(rf"^\s+{layer}\s", text, re.M), f"layer {layer} missing from the text report"


@pytest.mark.parametrize("name", ZOO)
def test_run_plain_key_and_shorter_sequence_match_live_onnxruntime(cli, zoo, shared_models: Path, tmp_path: Path,
                                                                   name: str) -> None:
    ids = np.load(shared_models / f"{name}.npz")["input.input_ids"][:, :3]
    np.savez(tmp_path / "ids.npz", input_ids=ids)  # plain key, not input.input_ids
    res = cli("run", zoo[name], "--inputs", tmp_path / "ids.npz", "--outputs", tmp_path / "out.npz", "-q")
    assert res.status == 0, res.err
    assert res.out == ""  # -q: no report
    want = ort_logits(shared_models / f"{name}.onnx", ids)
    with np.load(tmp_path / "out.npz") as out:
        got = out["logits"]
    assert got.shape == want.shape == (1, 3, want.shape[-1])
    assert max_err(got, want) <= TOL


def test_run_no_numerics_needs_no_inputs(cli, zoo, tmp_path: Path) -> None:
    binary = zoo["llama_a_dynamo"]
    res = cli("run", binary, "--no-numerics", "--tokens", "1", "--report-json", tmp_path / "r1.json")
    assert res.status == 0, res.err
    assert "1 token" in res.out
    one = json.loads((tmp_path / "r1.json").read_text())
    assert one["tokens"] == 1 and one["cycles"] > 0 and one["joules"] > 0
    res = cli("run", binary, "--no-numerics", "--tokens", "256", "--report-json", tmp_path / "r256.json", "-q")
    assert res.status == 0, res.err
    full = json.loads((tmp_path / "r256.json").read_text())
    assert full["tokens"] == 256 and full["cycles"] > one["cycles"]
    assert_user_error(cli("run", binary, "--no-numerics", "--tokens", "257"), ["--tokens 257", "1..256"])
    assert sorted(os.listdir(tmp_path)) == ["r1.json", "r256.json"]


def test_run_on_other_hardware_of_same_structure(cli, zoo, shared_models: Path, tmp_path: Path) -> None:
    binary, npz = zoo["llama_a_dynamo"], shared_models / "llama_a_dynamo.npz"
    reports, logits = {}, {}
    for hw in ("edgecim-65nm", "edgecim-28nm"):
        res = cli("run", binary, "--inputs", npz, "--hw", hw, "--outputs", tmp_path / f"{hw}.npz",
                  "--report-json", tmp_path / f"{hw}.json")
        assert res.status == 0, res.err
        assert hw in res.out
        reports[hw] = json.loads((tmp_path / f"{hw}.json").read_text())
        with np.load(tmp_path / f"{hw}.npz") as out:
            logits[hw] = out["logits"]
    a, b = reports["edgecim-65nm"], reports["edgecim-28nm"]
    assert (a["hardware"]["name"], b["hardware"]["name"]) == ("edgecim-65nm", "edgecim-28nm")
    assert a["instructions"] == b["instructions"]
    assert a["joules"] != pytest.approx(b["joules"], rel=1e-3)
    assert b["seconds"] == pytest.approx(b["cycles"] / (load_hw("edgecim-28nm").chip.f_clk_mhz * 1e6), rel=1e-9)
    np.testing.assert_array_equal(logits["edgecim-65nm"], logits["edgecim-28nm"])
    # the default is the hardware the binary was compiled for
    res = cli("run", binary, "--inputs", npz, "--report-json", tmp_path / "default.json", "-q")
    assert res.status == 0, res.err
    assert json.loads((tmp_path / "default.json").read_text())["joules"] == pytest.approx(a["joules"])


def test_run_on_structurally_different_hardware_is_an_error(cli, bad) -> None:
    """The error says what differs, naming the binary and the key."""
    res = cli("run", bad["tiny"], "--inputs", bad["ids"], "--set", "chip.tiles=8")
    assert_user_error(res, ["different hardware structure", "chip.tiles", bad["tiny"]])


# ---- ir, compile dumps, determinism, disasm/asm ----------------------------------------------


@pytest.mark.parametrize("after", [None, *PASSES])
def test_ir_dump_parses_back_identically(cli, shared_models: Path, tmp_path: Path, after: str | None) -> None:
    model = shared_models / "llama_a_dynamo.onnx"
    res = cli("ir", model, *(["--after", after] if after else []))
    assert res.status == 0, res.err
    assert res.out.startswith("cimir ")
    dump = tmp_path / "llama.cimir"
    dump.write_text(res.out)
    again = cli("ir", dump)
    assert again.status == 0, again.err
    assert again.out == res.out
    # -o writes the same text
    assert cli("ir", dump, "-o", tmp_path / "again.cimir").status == 0
    assert (tmp_path / "again.cimir").read_text() == res.out


def test_compile_dump_dir_has_every_pass_and_time_passes(cli, shared_models: Path, tmp_path: Path) -> None:
    model = shared_models / "qwen2_a_dynamo.onnx"
    dumps = tmp_path / "dumps"
    res = cli("compile", model, "-o", tmp_path / "q.cimb", "--max-seq", "16", "--dump-dir", dumps, "--time-passes")
    assert res.status == 0, res.err
    assert sorted(os.listdir(dumps)) == [f"{i:02d}-{p}.cimir" for i, p in enumerate(PASSES, 1)]
    for line_pass in PASSES:
        assert re.search(rf"^\s+{line_pass}\s", res.err, re.M), f"--time-passes does not list {line_pass}"
    for i, name in enumerate(PASSES, 1):
        text = (dumps / f"{i:02d}-{name}.cimir").read_text()
        direct = cli("ir", model, "--max-seq", "16", "--after", name)
        assert direct.status == 0, direct.err
        assert text == direct.out, f"dump after {name} differs from `cimc ir --after {name}`"
        again = cli("ir", dumps / f"{i:02d}-{name}.cimir")
        assert again.status == 0 and again.out == text


def test_compile_is_deterministic(cli, zoo, shared_models: Path, tmp_path: Path) -> None:
    for name in ZOO:
        res = cli("compile", shared_models / f"{name}.onnx", "-o", tmp_path / "again.cimb", "-q")
        assert res.status == 0, res.err
        assert (tmp_path / "again.cimb").read_bytes() == zoo[name].read_bytes(), name


@pytest.mark.parametrize("dram", ["auto", "inline", "incbin"])
def test_disasm_asm_round_trip_is_byte_identical(cli, zoo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 dram: str) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(zoo["llama_a_dynamo"], "llama.cimb")
    res = cli("disasm", "llama.cimb", "--dram", dram)
    assert res.status == 0, res.err
    assert (".incbin" in res.out) == (dram == "incbin")
    assert (".data" in res.out) == (dram != "incbin")
    Path("llama.s").write_text(res.out)
    res = cli("asm", "llama.s", "-o", "again.cimb")
    assert res.status == 0, res.err
    assert Path("again.cimb").read_bytes() == Path("llama.cimb").read_bytes()
    assert sorted(os.listdir()) == ["again.cimb", "llama.cimb", "llama.s"]


def test_disasm_incbin_into_another_folder_assembles(cli, bad, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(bad["tiny"], "tiny.cimb")
    (tmp_path / "asm").mkdir()
    assert cli("disasm", "tiny.cimb", "--dram", "incbin", "-o", "asm/tiny.s").status == 0
    res = cli("asm", "asm/tiny.s", "-o", "again.cimb")
    assert res.status == 0, res.err
    assert Path("again.cimb").read_bytes() == Path("tiny.cimb").read_bytes()


def test_output_files_respect_umask(cli, bad, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert cli("compile", bad["example"], "-o", tmp_path / "t.cimb", "--max-seq", "4", "-q").status == 0
        assert cli("run", tmp_path / "t.cimb", "--inputs", bad["ids"], "--outputs", tmp_path / "out.npz",
                   "--report-json", tmp_path / "r.json", "-q").status == 0
        assert cli("ir", bad["example"], "--max-seq", "4", "-o", tmp_path / "t.cimir").status == 0
        assert cli("disasm", tmp_path / "t.cimb", "-o", tmp_path / "t.s").status == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["t.cimb", "out.npz", "r.json", "t.cimir", "t.s"], 0o644)


# ---- hardware --------------------------------------------------------------------------------


def test_hw_list(cli) -> None:
    res = cli("hw", "list")
    assert res.status == 0, res.err
    assert res.out.split() == ["edgecim-28nm", "edgecim-65nm"]


@pytest.mark.parametrize("preset", ["edgecim-65nm", "edgecim-28nm"])
def test_hw_show_preset_lists_units_and_sources(cli, preset: str) -> None:
    res = cli("hw", "show", preset)
    assert res.status == 0, res.err
    lines = res.out.splitlines()
    assert lines[0].startswith(f"{preset} ")
    hw = load_hw(preset)
    for spec in SCHEMA:
        note = hw.sources[spec.key]
        hits = [line for line in lines if re.match(rf"\s+{spec.name}\s+=", line) and line.endswith(f" {note}")
                and ("[not modelled: " in line) == (spec.key in NOT_MODELLED)]
        assert hits, f"no line for {spec.key} with its source note {note!r}"
        assert any(spec.unit in line for line in hits)
    assert "MHz" in res.out and "bitcells" in res.out and "pJ" in res.out


def test_hw_show_default_is_65nm(cli) -> None:
    res = cli("hw", "show")
    assert res.status == 0 and res.out.startswith("edgecim-65nm ")


def test_hw_show_user_file_and_set(cli, tmp_path: Path) -> None:
    toml = tmp_path / "mychip.toml"
    toml.write_text('extends = "edgecim-28nm"\n\n[chip]\nf_clk_mhz = 333\n')
    res = cli("hw", "show", toml)
    assert res.status == 0, res.err
    line = next(line for line in res.out.splitlines() if re.match(r"\s+f_clk_mhz\s+=", line))
    assert "333" in line and "mychip.toml" in line
    assert re.search(r"^\s+tech_nm\s+=\s+28\s", res.out, re.M)  # inherited from edgecim-28nm
    assert re.search(r"^\s+name\s+=\s+\"edgecim-28nm\"", res.out, re.M)

    res = cli("hw", "show", toml, "--set", "dram.peak_gbps=150.5", "--set", "chip.f_clk_mhz=250")
    assert res.status == 0, res.err
    peak = next(line for line in res.out.splitlines() if re.match(r"\s+peak_gbps\s+=", line))
    clk = next(line for line in res.out.splitlines() if re.match(r"\s+f_clk_mhz\s+=", line))
    assert "150.5" in peak and "command line" in peak
    assert "250" in clk and "333" not in clk


def test_demo_on_28nm_in_process(cli) -> None:
    res = cli("demo", "--hw", "edgecim-28nm")
    assert res.status == 0, res.err
    assert "edgecim-28nm" in res.out
    err = float(re.search(r"max abs error ([0-9.e+-]+)", res.out).group(1))  # type: ignore[union-attr]
    assert err <= TOL


# ---- the console script ----------------------------------------------------------------------


def test_console_script_help_and_version(tmp_path: Path) -> None:
    res = run_exe("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for command in ("compile", "run", "ir", "disasm", "asm", "hw", "demo"):
        assert re.search(rf"^\s+{command}\s", res.stdout, re.M), f"--help does not list {command}"
    res = run_exe("--version", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("cimc ")


def test_console_script_demo(tmp_path: Path) -> None:
    res = run_exe("demo", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    m = re.search(r"max abs error ([0-9.e+-]+)", res.stdout)
    assert m, res.stdout
    assert float(m.group(1)) <= TOL
    assert os.listdir(tmp_path) == []


def test_console_script_user_error(bad, tmp_path: Path) -> None:
    res = run_exe("run", Path(bad["bad"]) / "flip_c000.cimb", "--inputs", bad["ids"], "--outputs", "out.npz",
                  cwd=tmp_path)
    assert res.returncode == 2
    assert res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.splitlines() == [res.stderr.strip()]
    assert res.stderr.startswith("cimc: error: ") and "section C000" in res.stderr
    assert os.listdir(tmp_path) == []


# ---- bad input -------------------------------------------------------------------------------


def _compile(model: str, *opts: str) -> list[str]:
    return ["compile", model, "-o", "{out}/model.cimb", "-q", *opts]


def _run(binary: str, *opts: str) -> list[str]:
    return ["run", binary, *opts, "--outputs", "{out}/out.npz", "--report-json", "{out}/report.json"]


def _asm(source: str) -> list[str]:
    return ["asm", source, "-o", "{out}/again.cimb"]


def _ir(source: str, *opts: str) -> list[str]:
    return ["ir", source, *opts, "-o", "{out}/out.cimir"]


ERROR_CASES = [
    # compile: the model file
    pytest.param(_compile("{bad}/random.onnx"), ["{bad}/random.onnx: ", "not an ONNX model"], None,
                 id="compile-random-bytes"),
    pytest.param(_compile("{bad}/notes.onnx"), ["{bad}/notes.onnx: ", "not an ONNX model"], None,
                 id="compile-text-file"),
    pytest.param(_compile("{bad}/missing.onnx"), ["{bad}/missing.onnx", "no such file"], None,
                 id="compile-missing-file"),
    pytest.param(_compile("{bad}/truncated.onnx"), ["{bad}/truncated.onnx: "], None, id="compile-truncated-onnx"),
    pytest.param(_compile("{bad}/sin.onnx"), ["{bad}/sin.onnx: ", "1 node"], ["my_sin [Sin]"],
                 id="compile-unsupported-op"),
    pytest.param(_compile("{bad}/sin_lpnorm.onnx"), ["{bad}/sin_lpnorm.onnx: ", "2 node"],
                 ["my_sin [Sin]", "my_lpnorm [LpNormalization]"], id="compile-two-unsupported-ops"),
    pytest.param(_compile("{bad}/made_up.onnx"), ["{bad}/made_up.onnx: ", "1 node"],
                 ["my_frobnicate [Frobnicate]: not a standard ONNX operator"], id="compile-non-standard-op"),
    pytest.param(_compile("{bad}/binary.cimir"), ["{bad}/binary.cimir"], None, id="compile-non-utf8-cimir"),
    pytest.param(_compile("{bad}/tiny.cimir", "--max-seq", "8"), ["{bad}/tiny.cimir: ", "--max-seq 4, not 8"], None,
                 id="compile-cimir-other-max-seq"),
    pytest.param(_ir("{bad}/tiny.cimir", "--max-ctx", "64"), ["{bad}/tiny.cimir: ", "--max-ctx 4, not 64"], None,
                 id="ir-cimir-other-max-ctx"),
    pytest.param(_compile("{bad}/tiny.cimir", "--dim", "batch=1"), ["{bad}/tiny.cimir: ", "--dim"], None,
                 id="compile-cimir-dim"),
    pytest.param(_compile("{bad}/tiled.cimir", "--set", "macro.rows=64"),
                 ["{bad}/tiled.cimir was partitioned for edgecim-65nm", "run the passes again"], None,
                 id="compile-cimir-other-hardware"),
    # compile: options
    pytest.param(_compile("{example}", "--max-seq", "0"), ["--max-seq", "0"], None, id="compile-max-seq-0"),
    pytest.param(_compile("{example}", "--max-seq", "-2"), ["--max-seq", "-2"], None, id="compile-max-seq-negative"),
    pytest.param(_compile("{example}", "--pipeline", "lift-idioms,no-such-pass"), ["no-such-pass"], None,
                 id="compile-unknown-pass"),
    pytest.param(_compile("{example}", "--pipeline", "lift-idioms,balance-stages{bogus=1}"),
                 ["balance-stages", "bogus"], None, id="compile-unknown-pass-option"),
    pytest.param(_compile("{example}", "--pipeline", "lift-idioms,insert-kv-cache"),
                 ["cannot produce a program", "missing tile-partition, place-weights, schedule, balance-stages"], None,
                 id="compile-incomplete-pipeline"),
    pytest.param(_compile("{example}", "--pipeline",
                          "insert-kv-cache,tile-partition,balance-stages,place-weights,schedule"),
                 ["cannot produce a program", "in this order"], None, id="compile-pipeline-out-of-order"),
    pytest.param(_compile("{example}", "--pipeline",
                          "lift-idioms,insert-kv-cache,tile-partition,place-weights,schedule,balance-stages{rows=-1}"),
                 ["rows", "-1"], None, id="compile-balance-negative-rows"),
    pytest.param(_compile("{example}", "--dump-after", "lift-idiom"), ["--dump-after lift-idiom", "lift-idioms"],
                 None, id="compile-dump-after-unknown-pass"),
    pytest.param(_compile("{example}", "--dump-dir", "{bad}/notes.npz/ir"),
                 ["--dump-dir {bad}/notes.npz/ir: ", "notes.npz is not a folder"], None,
                 id="compile-dump-dir-in-a-file"),
    pytest.param(_compile("{example}", "--set", "chip.tiles=many"), ["chip.tiles", "many"], None,
                 id="compile-set-bad-value"),
    pytest.param(_compile("{example}", "--set", "chip.tiles=0"), ["chip.tiles", "0"], None,
                 id="compile-set-out-of-range"),
    pytest.param(_compile("{example}", "--set", "macro.rowz=64"), ["macro.rowz"], None, id="compile-set-unknown-key"),
    pytest.param(_compile("{example}", "--set", "chip.tiles"), ["chip.tiles", "KEY=VALUE"], None,
                 id="compile-set-no-value"),
    pytest.param(_compile("{example}", "--hw", "{bad}/syntax.toml"), ["{bad}/syntax.toml: ", "TOML"], None,
                 id="compile-hw-invalid-toml"),
    pytest.param(_compile("{example}", "--hw", "{bad}/unknown_key.toml"), ["{bad}/unknown_key.toml: ", "chip.frobs"],
                 None, id="compile-hw-unknown-key"),
    pytest.param(_compile("{example}", "--hw", "{bad}/out_of_range.toml"),
                 ["{bad}/out_of_range.toml: ", "macro.rows", "99999"], None, id="compile-hw-out-of-range"),
    pytest.param(_compile("{example}", "--hw", "{bad}/no_such_hw.toml"), ["{bad}/no_such_hw.toml"], None,
                 id="compile-hw-missing-file"),
    pytest.param(_compile("{example}", "--dim", "batch"), ["--dim", "batch"], None, id="compile-dim-no-value"),
    pytest.param(_compile("{example}", "--dim", "batch=x"), ["--dim", "batch=x"], None, id="compile-dim-not-int"),
    pytest.param(_compile("{example}", "--dim", "batch=-1"), ["--dim", "batch=-1"], None, id="compile-dim-negative"),
    pytest.param(_compile("{example}", "--dim", "=3"), ["--dim", "=3"], None, id="compile-dim-empty-name"),
    pytest.param(_compile("{example}", "--dim", "batch=0"), ["--dim", "batch=0"], None, id="compile-dim-zero"),
    # run: the binary
    pytest.param(_run("{bad}/half.cimb", "--inputs", "{ids}"), ["{bad}/half.cimb: ", "truncated"], None,
                 id="run-truncated-half"),
    pytest.param(_run("{bad}/ten.cimb", "--inputs", "{ids}"), ["{bad}/ten.cimb: ", "truncated"], None,
                 id="run-truncated-10-bytes"),
    pytest.param(_run("{example}", "--inputs", "{ids}"), ["{example}: ", "not a cimc binary"], None,
                 id="run-not-a-binary"),
    pytest.param(_run("{bad}/missing.cimb", "--inputs", "{ids}"), ["{bad}/missing.cimb: "], None,
                 id="run-missing-binary"),
    pytest.param(_run("{bad}/flip_header.cimb", "--inputs", "{ids}"), ["{bad}/flip_header.cimb: ", "header"], None,
                 id="run-flipped-header"),
    pytest.param(_run("{bad}/flip_meta.cimb", "--inputs", "{ids}"), ["{bad}/flip_meta.cimb: ", "META", "checksum"],
                 None, id="run-flipped-meta"),
    pytest.param(_run("{bad}/flip_c000.cimb", "--inputs", "{ids}"), ["{bad}/flip_c000.cimb: ", "C000", "checksum"],
                 None, id="run-flipped-code"),
    pytest.param(_run("{bad}/flip_dram.cimb", "--inputs", "{ids}"), ["{bad}/flip_dram.cimb: ", "DRAM", "checksum"],
                 None, id="run-flipped-dram"),
    # run: inputs and options
    pytest.param(_run("{tiny}"), ["--inputs"], None, id="run-no-inputs"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/no_ids.npz"), ["{bad}/no_ids.npz: ", "input_ids"], None,
                 id="run-npz-missing-input"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/extra_key.npz"), ["{bad}/extra_key.npz: ", "attention_mask"], None,
                 id="run-npz-extra-key"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/float_ids.npz"), ["input_ids", "float32", "int64"], None,
                 id="run-float-ids"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/rank1.npz"), ["input_ids", "shape"], None, id="run-wrong-rank"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/five.npz"), ["5 tokens", "1..4"], None, id="run-too-many-tokens"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/oov.npz"), ["token id {vocab}", "position 1", "vocabulary"], None,
                 id="run-token-outside-vocab"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/negative.npz"), ["token id -1", "position 2"], None,
                 id="run-negative-token"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/notes.npz"), ["{bad}/notes.npz: "], None, id="run-inputs-text"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/missing.npz"), ["{bad}/missing.npz: "], None,
                 id="run-inputs-missing"),
    pytest.param(_run("{tiny}", "--inputs", "{bad}/ids.npy"), ["{bad}/ids.npy"], None, id="run-inputs-npy"),
    pytest.param(["run", "{tiny}", "--no-numerics", "--tokens", "5", "--report-json", "{out}/report.json"],
                 ["--tokens 5", "1..4"], None, id="run-tokens-beyond-max-seq"),
    pytest.param(["run", "{tiny}", "--no-numerics", "--tokens", "-1", "--report-json", "{out}/report.json"],
                 ["--tokens -1"], None, id="run-tokens-negative"),
    pytest.param(["run", "{tiny}", "--no-numerics", "--tokens", "0", "--report-json", "{out}/report.json"],
                 ["--tokens 0"], None, id="run-tokens-zero"),
    pytest.param(_run("{tiny}", "--no-numerics"), ["--no-numerics"], None, id="run-no-numerics-with-outputs"),
    pytest.param(_run("{tiny}", "--inputs", "{ids}", "--hw", "{bad}/unknown_key.toml"),
                 ["{bad}/unknown_key.toml: ", "chip.frobs"], None, id="run-hw-unknown-key"),
    pytest.param(["run", "{tiny}", "--inputs", "{ids}", "--outputs", "{out}/no/such/dir/out.npz"],
                 ["{out}/no/such/dir/out.npz"], None, id="run-outputs-folder-missing"),
    pytest.param(["run", "{tiny}", "--inputs", "{ids}", "--report-json", "{out}/no/such/dir/r.json"],
                 ["{out}/no/such/dir/r.json"], None, id="run-report-folder-missing"),
    # asm
    pytest.param(_asm("{bad}/mnemonic.s"), ["{bad}/mnemonic.s:{asm_line}:{asm_col}: ", "frobnicate"], "caret",
                 id="asm-unknown-mnemonic"),
    pytest.param(_asm("{bad}/field.s"), ["{bad}/field.s:{asm_line}:{field_col}: ", "{asm_field}", "zz"], "caret",
                 id="asm-bad-field-value"),
    pytest.param(_asm("{bad}/no_text.s"), ["{bad}/no_text.s:{no_text_line}:{asm_col}: ", ".text"], "caret",
                 id="asm-instruction-without-text"),
    pytest.param(_asm("{bad}/directives_only.s"), ["{bad}/directives_only.s:", "missing .text"], "caret",
                 id="asm-missing-text"),
    pytest.param(_asm("{bad}/missing.s"), ["{bad}/missing.s"], None, id="asm-missing-file"),
    # ir
    pytest.param(_ir("{bad}/syntax.cimir"), ["{bad}/syntax.cimir:{ir_line}:{ir_col}: ", "syntax error"], "caret",
                 id="ir-syntax-error"),
    pytest.param(_ir("{bad}/version.cimir"), ["{bad}/version.cimir:1:", "99"], "caret", id="ir-bad-version"),
    pytest.param(_ir("{bad}/unknown_op.cimir"), ["{bad}/unknown_op.cimir:{ir_line}:", "embeddingx"], "caret",
                 id="ir-unknown-op"),
    pytest.param(_ir("{bad}/binary.cimir"), ["{bad}/binary.cimir"], None, id="ir-non-utf8"),
    pytest.param(_ir("{example}", "--after", "no-such-pass"), ["--after no-such-pass", ", ".join(PASSES)], None,
                 id="ir-after-unknown-pass"),
    pytest.param(["ir", "{example}", "-o", "{out}/no/such/dir/x.cimir"], ["{out}/no/such/dir/x.cimir"], None,
                 id="ir-output-folder-missing"),
    # disasm, hw
    pytest.param(["disasm", "{example}", "-o", "{out}/x.s"], ["{example}: ", "not a cimc binary"], None,
                 id="disasm-not-a-binary"),
    pytest.param(["disasm", "{tiny}", "-o", "{out}/no/such/dir/x.s"], ["{out}/no/such/dir/x.s"], None,
                 id="disasm-output-folder-missing"),
    pytest.param(["hw", "show", "{bad}/out_of_range.toml"], ["{bad}/out_of_range.toml: ", "macro.rows"], None,
                 id="hw-show-out-of-range"),
    pytest.param(["hw", "show", "edgecim-7nm"], ["edgecim-7nm"], None, id="hw-show-unknown-preset"),
    pytest.param(["hw", "show", "--set", "sfu.dtype=int3"], ["sfu.dtype", "int3"], None, id="hw-show-set-bad-choice"),
]


@pytest.mark.parametrize(("argv", "needles", "extra"), ERROR_CASES)
def test_bad_input_is_one_line_user_error(cli, bad, tmp_path: Path, argv: list[str], needles: list[str],
                                          extra: object) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ctx = {**bad, "out": str(out)}
    args = [_fill(a, ctx) for a in argv]
    needles = [_fill(n, ctx) for n in needles]

    # 1. nothing is written
    assert_user_error(cli(*args), needles, extra)
    assert os.listdir(out) == []

    # 2. existing output files are left untouched (and no temporary file appears beside them)
    outputs = [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a in OUTPUT_FLAGS]
    existing = {p: f"previous contents of {p.name}\n".encode() for p in outputs if p.parent.is_dir()}
    for p, data in existing.items():
        p.write_bytes(data)
    assert_user_error(cli(*args), needles, extra)
    for p, data in existing.items():
        assert p.read_bytes() == data, f"{p.name} was modified"
    assert sorted(os.listdir(out)) == sorted(p.name for p in existing)


def test_compile_prints_pass_notes(cli, bad, tmp_path: Path) -> None:
    res = cli("compile", bad["example"], "-o", str(tmp_path / "one.cimb"), "--max-seq", "4", "--set", "chip.tiles=1")
    assert res.status == 0, res.err
    assert "cimc: note: place-weights: 1 tile(s) cannot form 2 macro sets; using 1" in res.err


def test_max_ctx_alone_bounds_max_seq(cli, bad, tmp_path: Path) -> None:
    """--max-ctx 16 alone gives prefill runs of up to 16 tokens (not the default 256 > 16)."""
    out = tmp_path / "c.cimb"
    res = cli("compile", bad["example"], "-o", str(out), "--max-ctx", "16")
    assert res.status == 0, res.err
    assert "max-seq 16, max-ctx 16" in res.err
    program = read_binary(out)
    assert program.entry("prefill").meta["max_seq"] == 16 and program.meta["max_ctx"] == 16


def test_handmade_graph_without_unsupported_op_compiles(cli, tmp_path: Path) -> None:
    """Control for the unsupported-op cases: the same graph minus the bad op compiles and is exact."""
    _unsupported_model(tmp_path / "ok.onnx", [])
    res = cli("compile", tmp_path / "ok.onnx", "-o", tmp_path / "ok.cimb", "--max-seq", "8", "-q")
    assert res.status == 0, res.err
    ids = np.array([[3, 1, 31, 0, 7]], dtype=np.int64)
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    res = cli("run", tmp_path / "ok.cimb", "--inputs", tmp_path / "ids.npz", "--outputs", tmp_path / "out.npz", "-q")
    assert res.status == 0, res.err
    with np.load(tmp_path / "out.npz") as out:
        assert max_err(out["logits"], ort_logits(tmp_path / "ok.onnx", ids)) <= TOL


def test_compile_error_without_quiet_ends_with_the_one_error_line(cli, bad, tmp_path: Path) -> None:
    """Without -q, progress lines come first; the error is still exactly one line, and the last."""
    res = cli("compile", Path(bad["bad"]) / "sin.onnx", "-o", tmp_path / "m.cimb")
    assert res.status == 2
    errors = [i for i, line in enumerate(res.err.splitlines()) if line.startswith("cimc: error: ")]
    assert len(errors) == 1
    tail = res.err.splitlines()[errors[0] + 1:]
    assert len(tail) == 1 and "my_sin [Sin]" in tail[0]
    assert "Traceback" not in res.err and os.listdir(tmp_path) == []


def test_run_decode_entry_with_past_inputs_and_partial_inputs(cli, shared_models: Path, tmp_path: Path) -> None:
    """`cimc run --entry decode` on the reference's second step (past key/values given) matches
    onnxruntime's outputs; a prompt given as input_ids alone runs (mask and positions optional)."""
    model = shared_models / "llama_c_optimum_kv.onnx"
    ref = np.load(shared_models / "llama_c_optimum_kv.npz")
    binary = tmp_path / "kv.cimb"
    assert cli("compile", str(model), "-o", str(binary), "--max-seq", "8", "--max-ctx", "32", "-q").status == 0

    np.savez(tmp_path / "ids.npz", input_ids=ref["input.input_ids"])
    res = cli("run", str(binary), "--inputs", str(tmp_path / "ids.npz"), "--outputs", str(tmp_path / "p.npz"))
    assert res.status == 0, res.err
    assert np.abs(np.load(tmp_path / "p.npz")["logits"] - ref["output.logits"]).max() < 1e-4

    np.savez(tmp_path / "step2.npz", **{k[6:]: ref[k] for k in ref if k.startswith("step2.input.")})
    res = cli("run", str(binary), "--entry", "decode", "--inputs", str(tmp_path / "step2.npz"),
              "--outputs", str(tmp_path / "d.npz"), "--report-json", str(tmp_path / "d.json"))
    assert res.status == 0, res.err
    assert "decode, 1 token(s) after 8 cached" in res.out
    got = np.load(tmp_path / "d.npz")
    for key in got:
        assert np.abs(got[key] - ref[f"step2.output.{key}"]).max() < 1e-4, key
    assert json.loads((tmp_path / "d.json").read_text())["past"] == 8

    res = cli("run", str(binary), "--entry", "decode", "--inputs", str(tmp_path / "ids.npz"))
    assert res.status == 2 and "ids.npz: " in res.err and "1..1" in res.err
    res = cli("run", str(binary), "--entry", "decode", "--past", "3",
              "--inputs", str(tmp_path / "step2.npz"))
    assert res.status == 2 and "the inputs hold 8 cached positions, not 3" in res.err
    res = cli("run", str(binary), "--entry", "sample", "--no-numerics")
    assert res.status == 2 and "has no entry 'sample' (it has prefill, decode)" in res.err


def test_run_no_numerics_prices_decode_at_a_context_length(cli, bad, tmp_path: Path) -> None:
    """A decode step reads every cached row: more past means more DRAM traffic and time."""
    out = tmp_path / "c.cimb"
    assert cli("compile", bad["example"], "-o", str(out), "--max-seq", "8", "--max-ctx", "64", "-q").status == 0
    reports = []
    for past in (0, 60):
        res = cli("run", str(out), "--entry", "decode", "--no-numerics", "--past", str(past),
                  "--report-json", str(tmp_path / f"r{past}.json"))
        assert res.status == 0, res.err
        reports.append(json.loads((tmp_path / f"r{past}.json").read_text()))
    assert reports[1]["dram_bytes"] > reports[0]["dram_bytes"] and reports[1]["cycles"] > reports[0]["cycles"]
    res = cli("run", str(out), "--entry", "decode", "--no-numerics", "--past", "64")
    assert res.status == 2 and "64 cached + 1 new tokens exceed the context of 64" in res.err
