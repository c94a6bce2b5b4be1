"""Graphs made by `onnxruntime.quantization.quantize_dynamic`: each MatMul's DynamicQuantizeLinear ->
MatMulInteger -> Cast -> Mul chain is one `linear(x, qweight{matmulinteger}, act u8)`, the
quantized embedding Gather an embedding over its table dequantized at compile time; checked
against onnxruntime on the same file. Also the cost of u8 inputs, `--act` overrides, and every
malformed chain as one error naming the node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_fixtures import max_err, shared_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from test_cli import assert_node_refused
from test_generate import ort_greedy

from cimc.driver import CompileOptions, compile_model
from cimc.frontend import WeightStore, import_onnx
from isa.cost import CostModel
from isa.encoding import Instr, decode_columns, encode
from isa.fields import Dim, Mem
from isa.hw import load_hw
from isa.program import Program
from runtime.generate import generate
from runtime.interpreter import Session, simulate

MODELS = ["llama_a_dynamo", "qwen2_a_dynamo"]
FORMS = {"QInt8": (QuantType.QInt8, False), "QInt8-per-channel": (QuantType.QInt8, True),
         "QUInt8": (QuantType.QUInt8, False), "QUInt8-per-channel": (QuantType.QUInt8, True)}
CASES = [(m, f) for m in MODELS for f in FORMS]
PROMPT = [1, 5, 9, 2, 77, 14]
NEW = 16
SEQ = 5

logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process the model


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """(shared float model, form) -> its quantize_dynamic export, made once per module."""
    folder = tmp_path_factory.mktemp("quantize_dynamic")
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, form: str) -> Path:
        if (name, form) not in made:
            out = folder / f"{name}_{form}.onnx"
            weight_type, per_channel = FORMS[form]
            quantize_dynamic(shared_model(name), out, weight_type=weight_type, per_channel=per_channel)
            made[name, form] = out
        return made[name, form]
    return get


@pytest.fixture(scope="module")
def programs(exports) -> Callable[[str, str], Program]:
    """(model, form) -> the export compiled once, prefill long enough to recompute a whole generation."""
    cache: dict[tuple[str, str], Program] = {}

    def get(name: str, form: str) -> Program:
        if (name, form) not in cache:
            cache[name, form] = compile_model(exports(name, form), CompileOptions(max_seq=len(PROMPT) + NEW))
        return cache[name, form]
    return get


def reference_ids(name: str) -> np.ndarray:
    return np.load(shared_model(name, with_npz=True).with_suffix(".npz"))["input.input_ids"]


def ort_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"],
                                                                                    {"input_ids": ids})[0]


# ---- the shared float models, quantized by onnxruntime ----------------------------------------------


@pytest.mark.parametrize(("name", "form"), CASES)
def test_logits_follow_onnxruntime(name: str, form: str, exports, programs) -> None:
    """The integer parts are exact (MatMulInteger's int32 sums, DynamicQuantizeLinear's u8 values):
    only the f32 rescaling and the float ops around them may round differently (measured <= 7.2e-7
    on logits of magnitude ~1.4)."""
    ids = reference_ids(name)
    got = simulate(programs(name, form), {"input_ids": ids}).outputs["logits"]
    err = max_err(got, ort_logits(exports(name, form), ids))
    assert err <= 1e-5, f"{name} {form}: max |logits - onnxruntime| = {err:.3g}"


@pytest.mark.parametrize(("name", "form"), CASES)
def test_greedy_ids_follow_onnxruntime(name: str, form: str, exports, programs) -> None:
    """These exports carry no KV cache, so onnxruntime's greedy loop runs the whole sequence at every
    step (and DynamicQuantizeLinear quantizes all of it at once): cimc's prefill, run the same way,
    gives the same ids."""
    session, ids, got = Session(programs(name, form)), list(PROMPT), []
    for _ in range(NEW):
        logits = session.run("prefill", {"input_ids": np.array([ids], np.int64)}, past=0).outputs["logits"]
        got.append(int(np.argmax(logits[0, -1])))
        ids.append(got[-1])
    want, _ = ort_greedy(exports(name, form), PROMPT, NEW)
    assert got == want, f"{name} {form}: cimc {got} vs onnxruntime {want}"


@pytest.mark.parametrize("name", ["llama_c_optimum_kv", "qwen2_c_optimum_kv"])
@pytest.mark.parametrize("form", ["QInt8-per-channel", "QUInt8"])
def test_cached_generation_follows_onnxruntime_with_its_cache(name: str, form: str, exports) -> None:
    """With a KV cache each decode step quantizes its one token, in cimc as in onnxruntime on an
    export that carries the cache: the same ids, every step's logits close."""
    path = exports(name, form)
    gen = generate(Session(compile_model(path, CompileOptions(max_seq=8, max_ctx=len(PROMPT) + NEW))), PROMPT, NEW)
    want, logits = ort_greedy(path, PROMPT, NEW)
    assert gen.tokens == want, f"{name} {form}: cimc {gen.tokens} vs onnxruntime {want}"
    err = max(max_err(run.outputs["logits"][0, -1], ref) for run, ref in zip(gen.runs, logits, strict=True))
    assert err <= 1e-5, f"{name} {form}: max |logits - onnxruntime| over the steps = {err:.3g}"


def test_import_lifts_each_chain_and_reads_no_weights(exports, monkeypatch: pytest.MonkeyPatch) -> None:
    """One u8-input linear per MatMulInteger chain, its weight the node's own B; the quantized
    embedding a table dequantized at compile time; no weight matrix is read at import (small
    vectors are: zero points, to choose the weight type, and the per-channel scales)."""
    path = exports("qwen2_a_dynamo", "QUInt8-per-channel")
    model = onnx.load(str(path), load_external_data=False)
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMulInteger"}
    read: list[str] = []
    get = WeightStore.get
    monkeypatch.setattr(WeightStore, "get", lambda self, name: read.append(name) or get(self, name))
    module, _ = import_onnx(path, max_seq=8)
    assert not (weights | {"m.lm_head.weight_quantized"}) & set(read), read
    linears = list(module.walk("linear"))
    u8 = [op for op in linears if op.attrs.get("act") == "u8"]
    assert len(u8) == len(weights) == 14
    assert {op.operands[1].owner.attrs["init"] for op in u8} == weights
    assert {op.operands[1].owner.attrs["format"] for op in u8} == {"matmulinteger"}
    assert {str(op.operands[1].type.dtype) for op in u8} == {"u8"}  # QUInt8: unsigned, with zero points
    (head,) = [op for op in linears if op not in u8]  # the LM head tied to the embedding: DequantizeLinear
    assert head.attrs["act"] == "f32" and head.operands[1].owner.attrs["format"] == "dequantizelinear"
    assert head.operands[1].owner.attrs["transpose"] is True
    (embedding,) = module.walk("embedding")
    table = embedding.operands[1].owner
    assert table.name == "weight" and table.attrs["format"] == "dequantize"
    assert table.attrs["init"] == head.operands[1].owner.attrs["init"]  # one uint8 table, both ways


def test_ir_dump_compiles_to_the_same_numbers(cli, exports) -> None:
    """The new attributes (qweight formats, the dequantized table's) print and parse back."""
    path = exports("qwen2_a_dynamo", "QUInt8-per-channel")
    dump = path.with_suffix(".cimir")  # beside the export, whose initializers it names
    assert cli("ir", path, "-o", dump, "--max-seq", "16").status == 0
    ids = reference_ids("qwen2_a_dynamo")
    got = simulate(compile_model(dump, CompileOptions()), {"input_ids": ids}).outputs["logits"]
    want = simulate(compile_model(path, CompileOptions(max_seq=16)), {"input_ids": ids}).outputs["logits"]
    np.testing.assert_array_equal(got, want)


def test_signed_weights_without_zero_points_stay_signed(exports) -> None:
    """QInt8 zero points are 0: the weights are i8, with no zero-point correction."""
    module, _ = import_onnx(exports("llama_a_dynamo", "QInt8-per-channel"), max_seq=8)
    types = {op.operands[1].type.dtype for op in module.walk("linear") if op.attrs.get("act") == "u8"}
    assert types == {"i8"}


def test_act_overrides_keep_the_weights(exports, programs) -> None:
    """--act int8 or fp32 change only how inputs enter the macros: the same qweights, and logits that
    stay close to onnxruntime (not exact: another input scheme)."""
    name, form = "llama_a_dynamo", "QUInt8-per-channel"
    path, ids = exports(name, form), reference_ids(name)
    want = ort_logits(path, ids)
    default = programs(name, form)
    for act in ("int8", "fp32"):
        program = compile_model(path, CompileOptions(max_seq=16, act=act))
        assert program.meta["weights"].replace("i8 inputs", "u8 inputs").replace("f32 inputs", "u8 inputs") \
            == default.meta["weights"]
        got = simulate(program, {"input_ids": ids}).outputs["logits"]
        cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
        assert cos.min() >= 0.999, f"--act {act}: min cosine {cos.min():.6f} vs onnxruntime"
        assert max_err(got, want) > 1e-5  # really another scheme


def test_cli_act_int8_on_an_export(cli, exports, tmp_path: Path) -> None:
    out = tmp_path / "m.cimb"
    res = cli("compile", exports("llama_a_dynamo", "QInt8"), "-o", out, "--act", "int8", "-q")
    assert res.status == 0 and out.exists(), res.err


# ---- small graphs: one chain, against onnxruntime ------------------------------------------------------


def chain_model(k: int, n: int, wtype: int, *, per_channel: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x [1, seq, K] -> DynamicQuantizeLinear "dq" -> MatMulInteger "mm" (B "W", b_zero_point "Z") ->
    Cast "cast" -> Mul "mul" by Mul "scales"(x_scale, "S") -> y, as quantize_dynamic emits it."""
    rng = np.random.default_rng(seed)
    signed = wtype == TensorProto.INT8
    w = rng.integers(-128 if signed else 0, 128 if signed else 256, (k, n)).astype(np.int8 if signed else np.uint8)
    shape = (n,) if per_channel else ()
    z = (rng.integers(1, 6, shape) if signed else rng.integers(100, 156, shape)).astype(w.dtype)  # nonzero
    s = (rng.random(shape) * 0.01 + 0.001).astype(np.float32)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq"),
             helper.make_node("MatMulInteger", ["xq", "W", "xz", "Z"], ["acc"], name="mm"),
             helper.make_node("Cast", ["acc"], ["accf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "S"], ["scale"], name="scales"),
             helper.make_node("Mul", ["accf", "scale"], ["y"], name="mul")]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(z, "Z"), numpy_helper.from_array(s, "S")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def run_both(path: Path, k: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    x = (np.random.default_rng(seed).standard_normal((1, SEQ, k)) + 0.3).astype(np.float32)
    got = simulate(compile_model(path, CompileOptions(max_seq=8)), {"x": x}).outputs["y"]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    return got, want


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("wtype", [TensorProto.INT8, TensorProto.UINT8], ids=["int8", "uint8"])
def test_one_chain_is_onnxruntimes_numbers(tmp_path: Path, wtype: int, per_channel: bool) -> None:
    """int8 weights with nonzero zero points become u8 (q + 128); uint8 keep theirs. K = 96 keeps the
    u8 x u8 sums within the 24-bit accumulator (K * 255^2 < 2^23): the result is exact, the final f32
    multiply onnxruntime's."""
    k = 96
    path = save(chain_model(k, 40, wtype, per_channel=per_channel), tmp_path / "m.onnx")
    module, _ = import_onnx(path, max_seq=8)
    (op,) = module.walk("linear")
    assert op.attrs["act"] == "u8" and str(op.operands[1].type) == f"u8[{k},40]"
    got, want = run_both(path, k)
    np.testing.assert_array_equal(got, want)


def test_a_k_split_across_tiles_only_rounds(tmp_path: Path) -> None:
    """K = 4096 is split over two tiles: each tile's sums are exact over the zero points, their f32
    partial results are added by tred (onnxruntime adds the int32 sums first: rounding only)."""
    model = chain_model(4096, 40, TensorProto.INT8, per_channel=True)
    next(t for t in model.graph.initializer if t.name == "Z").CopyFrom(numpy_helper.from_array(np.zeros(40, np.int8),
                                                                                               "Z"))
    path = save(model, tmp_path / "m.onnx")
    assert "i8 per channel" in compile_model(path, CompileOptions(max_seq=8)).meta["weights"]
    got, want = run_both(path, 4096)
    assert 0 < max_err(got, want) / float(np.abs(want).max()) <= 1e-6


def test_wide_u8_products_need_a_wide_accumulator(tmp_path: Path) -> None:
    """u8 inputs times u8 weights are summed as stored (offset by their zero points): K = 512 reaches
    past the presets' 24-bit accumulator, which saturates as the ISA says (far from onnxruntime);
    32 bits hold it, and the result is onnxruntime's exactly."""
    path = save(chain_model(512, 40, TensorProto.UINT8), tmp_path / "m.onnx")
    x = (np.random.default_rng(1).standard_normal((1, SEQ, 512)) + 0.3).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    results = {bits: simulate(compile_model(path, CompileOptions(max_seq=8, hw=load_hw(None, [
        f"macro.accum_bits={bits}"]))), {"x": x}).outputs["y"] for bits in (24, 32)}
    assert max_err(results[24], want) > 0.5 * float(np.abs(want).max())
    np.testing.assert_array_equal(results[32], want)
    from cimc.driver import compile_module, load_module

    for bits, noted in ((24, True), (32, False)):
        opts = CompileOptions(max_seq=8, hw=load_hw(None, [f"macro.accum_bits={bits}"]))
        module, weights = load_module(path, opts)
        notes = compile_module(module, weights, opts)[1].notes
        assert any("can exceed the 24-bit accumulator" in n and "accum_bits=26" in n for n in notes) == noted, notes


# ---- the cost of u8 inputs ------------------------------------------------------------------------------


def _mvm(xt: str, wt: str, k: int = 128, n: int = 64, nvec: int = 4) -> Instr:
    return Instr("mvm", {"tile": 3, "m0": 0, "k": k, "n": n, "wt": wt, "xt": xt, "gk": 0, "acc": 0,
                         "nvec": Dim(0, nvec), "wst": "f32", "dst": Mem(0, 1 << 16, n), "src": Mem(0, 0, k),
                         "xs": Mem(0, 1 << 15, 2 if xt == "u8" else 1), "ws": Mem(1, 0, n), "wz": Mem(1, 1 << 12, n)})


def _priced(instrs: list[Instr]) -> tuple[CostModel, object]:
    cm = CostModel(load_hw())
    return cm, cm.instr_costs(decode_columns(encode(instrs)), np.array([0, 1, 0, 1]))


def _busy(cm: CostModel, costs, i: int, unit: str) -> float:
    lo, hi = costs.ptr[i], costs.ptr[i + 1]
    return sum(float(b) for u, b in zip(costs.unit[lo:hi], costs.busy[lo:hi], strict=True) if cm.names[u] == unit)


@pytest.mark.parametrize("wt", ["i8", "u8"])
def test_u8_inputs_cost_a_plane_and_the_zero_point_work(wt: str) -> None:
    """Against i8 inputs: one more (all-ones) input plane in the macros for the weights' column
    sums; on the SFU a multiply and an add per element for xz * sum(w) (and another pair for
    K * xz * z with unsigned weights), plus an integer add each; the second f32 per vector read."""
    cm, costs = _priced([_mvm("i8", wt), _mvm("u8", wt)])
    hw = cm.hw
    assert _busy(cm, costs, 1, "tile3") - _busy(cm, costs, 0, "tile3") == pytest.approx(hw.macro.cycles_per_input_bit)
    elems = 4 * 1 * 64
    zero = wt == "u8"
    work = {xt: elems * (2 + zero + extra + 1) + (4 * 128 + elems if zero else 0) + elems * extra
            for xt, extra in (("i8", 0), ("u8", 1 + zero))}
    for i, xt in enumerate(("i8", "u8")):
        assert _busy(cm, costs, i, "sfu3") == pytest.approx(np.ceil(work[xt] / hw.sfu.lanes) * hw.sfu.cycles_per_op)
    slice_pj = float(cm.e_slice_fj(8)) / 1000
    assert costs.energy["mvm"][1] - costs.energy["mvm"][0] == pytest.approx(128 * 64 * slice_pj)
    assert costs.energy["sfu"][1] > costs.energy["sfu"][0]


def test_vquant_asym_costs_its_two_passes() -> None:
    """asym: add 3, mul 1, recip 1 per element on the SFU (5 ops, sym 3); the block read twice; two
    f32 (scale, zero point) written per row."""
    def vquant(asym: int) -> Instr:
        return Instr("vquant", {"tile": 2, "asym": asym, "dst": Mem(0, 0, 64), "sc": Mem(0, 1 << 14, 2 if asym else 1),
                                "src": Mem(0, 1 << 15, 64), "rows": Dim(0, 8), "cols": Dim(0, 64), "group": 0})
    cm, costs = _priced([vquant(0), vquant(1)])
    lanes, per = cm.hw.sfu.lanes, cm.hw.sfu.cycles_per_op
    assert _busy(cm, costs, 0, "sfu2") == pytest.approx(np.ceil(8 * 64 * 3 / lanes) * per)
    assert _busy(cm, costs, 1, "sfu2") == pytest.approx(np.ceil(8 * 64 * 5 / lanes) * per)
    assert costs.energy["buffer"][1] > costs.energy["buffer"][0]  # the second read of the block
    e = cm.e_sfu
    assert costs.energy["sfu"][1] == pytest.approx(8 * 64 * (3 * e["add"] + e["mul"] + e["recip"]))


# ---- chains cimc cannot take: one error naming the node and the value -----------------------------------


def _cast_to_int(model: onnx.ModelProto) -> None:
    """Cast to int64 instead of float."""
    cast = next(n for n in model.graph.node if n.name == "cast")
    del cast.attribute[:]
    cast.attribute.append(helper.make_attribute("to", TensorProto.INT64))


def _replace_init(name: str, value: np.ndarray) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        init = next(t for t in model.graph.initializer if t.name == name)
        init.CopyFrom(numpy_helper.from_array(value, name))
    return edit


def _cast_to_output(model: onnx.ModelProto) -> None:
    """MatMulInteger -> Cast -> y: no scale Mul."""
    del model.graph.node[3:]
    model.graph.node[2].output[0] = "y"


def _dq_feeds_cast(model: onnx.ModelProto) -> None:
    """The quantized x also feeds a Cast, a second graph output."""
    model.graph.node.append(helper.make_node("Cast", ["xq"], ["xf"], name="leak", to=TensorProto.FLOAT))
    model.graph.output.append(helper.make_tensor_value_info("xf", TensorProto.FLOAT, [1, "seq", 64]))


def _a_from_cast(model: onnx.ModelProto) -> None:
    """MatMulInteger's A from a Cast of x, not DynamicQuantizeLinear."""
    model.graph.node.insert(0, helper.make_node("Cast", ["x"], ["xu"], name="tou8", to=TensorProto.UINT8))
    next(n for n in model.graph.node if n.name == "mm").input[0] = "xu"


def _static_quantize(model: onnx.ModelProto) -> None:
    """QuantizeLinear of the activation instead of DynamicQuantizeLinear."""
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "qs"),
                                    numpy_helper.from_array(np.uint8(128), "qz")])
    model.graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "qs", "qz"], ["xq2"], name="q"))
    next(n for n in model.graph.node if n.name == "mm").input[0] = "xq2"


BAD = {  # edit of chain_model(64, 32, INT8) -> (node named, what its line says)
    "no-scale-chain": (_cast_to_output, "mm", "MatMulInteger", "must be followed by Cast(to float) and Mul"),
    "cast-to-int": (_cast_to_int, "mm", "MatMulInteger", "it feeds Cast 'cast'"),
    "dq-feeds-cast": (_dq_feeds_cast, "dq", "DynamicQuantizeLinear",
                      "output 'xq' feeds Cast 'leak' (input 0); only input A of MatMulInteger may use it"),
    "a-not-dq": (_a_from_cast, "mm", "MatMulInteger", "input A 'xu' is not a DynamicQuantizeLinear output"),
    "B-int16": (_replace_init("W", np.zeros((64, 32), np.int16)), "mm", "MatMulInteger",
                "B 'W' is int16[64, 32]; expected int8 or uint8"),
    "zero-type": (_replace_init("Z", np.uint8(3)), "mm", "MatMulInteger",
                  "b_zero_point 'Z' is uint8[]; expected int8"),
    "zero-shape": (_replace_init("Z", np.zeros((32, 2), np.int8)), "mm", "MatMulInteger",
                   "b_zero_point 'Z' is int8[32, 2]; B int8[64, 32] needs a scalar or [32]"),
    "scale-shape": (_replace_init("S", np.ones(33, np.float32)), "mm", "MatMulInteger",
                    "weight scale 'S' is float[33]; B int8[64, 32] needs a scalar or [32]"),
    "scale-type": (_replace_init("S", np.float16(1)), "mm", "MatMulInteger", "weight scale 'S' is float16[]"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_chain_is_one_error_naming_the_node(case: str, cli, tmp_path: Path) -> None:
    edit, node, op, needle = BAD[case]
    model = chain_model(64, 32, TensorProto.INT8)
    edit(model)
    path, out = save(model, tmp_path / "bad.onnx"), tmp_path / "bad.cimb"
    res = cli("compile", path, "-o", out, "-q")
    assert_node_refused(res, path, out, f"{node} [{op}]", needle)


def test_static_activation_quantization_is_refused(cli, tmp_path: Path) -> None:
    model = chain_model(64, 32, TensorProto.INT8)
    _static_quantize(model)
    path = save(model, tmp_path / "static.onnx")
    res = cli("compile", path, "-o", tmp_path / "x.cimb", "-q")
    assert res.status == 2
    assert ("  q [QuantizeLinear]: static activation quantization is not supported: quantize weights only"
            in res.err.splitlines()), res.err


def test_accuracy_says_why_u8_logits_differ(exports, programs) -> None:
    """--accuracy on a quantize_dynamic graph: onnxruntime's full-sequence logits quantize every
    position at once, a generation each run; the report says so."""
    from cimc.accuracy import measure_accuracy

    name, form = "llama_a_dynamo", next(iter(FORMS))
    acc = measure_accuracy(programs(name, form), exports(name, form), PROMPT, 4)
    assert "not like for like" in acc["note"] and "u8 inputs" in acc["weights"]
