"""Weight-only QDQ graphs: `DequantizeLinear` of an int8/uint8/int4/uint4 initializer into a MatMul
or Gemm becomes `linear(x, qweight{dequantizelinear}, act f32)` with the node's own numbers, a
quantized embedding table an embedding over it dequantized at compile time; checked against
onnxruntime on the same file. Forms a `qweight` cannot hold, and static activation quantization,
are one error naming the node and the value.

The reference is onnxruntime computing the graph as written (`FLOAT`: graph optimisations off).
Its default CPU session fuses K-blocked DequantizeLinear + MatMul pairs into MatMulNBits at
accuracy level 4 (int8 activations per block): `--act int8` is that scheme.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_fixtures import max_err, shared_model
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_node_refused

from cimc.driver import CompileOptions, compile_model
from cimc.frontend import WeightStore, import_onnx
from runtime.generate import generate
from runtime.interpreter import Session, simulate

MODELS = ["llama_a_dynamo", "qwen2_a_dynamo"]
SHARED = [(m, sym) for m in MODELS for sym in ("sym", "asym")]
PROMPT = [1, 5, 9, 2, 77, 14]
NEW = 16
SEQ = 5
K, N = 64, 48


def session(path: Path | onnx.ModelProto, fused: bool = False) -> ort.InferenceSession:
    """onnxruntime on the graph as written (`fused`: its default session, with graph optimisations)."""
    opts = ort.SessionOptions()
    if not fused:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def relative_err(got: np.ndarray, want: np.ndarray) -> float:
    return max_err(got, want) / float(np.abs(want).max())


# ---- the shared float models, quantized to blocked int4 QDQ by onnxruntime ------------------------------


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """(model, sym|asym) -> MatMulNBitsQuantizer(block_size=32, quant_format=QDQ) of it, made once."""
    if importlib.util.find_spec("onnx_ir") is None:
        pytest.skip("MatMulNBitsQuantizer needs onnx_ir, which is not installed")
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    folder = tmp_path_factory.mktemp("qdq")
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, sym: str) -> Path:
        if (name, sym) not in made:
            quantizer = MatMulNBitsQuantizer(onnx.load(str(shared_model(name))), block_size=32,
                                             is_symmetric=sym == "sym", quant_format=QuantFormat.QDQ)
            quantizer.process()
            made[name, sym] = folder / f"{name}_{sym}.onnx"
            quantizer.model.save_model_to_file(str(made[name, sym]), use_external_data_format=False)
        return made[name, sym]
    return get


@pytest.mark.parametrize(("name", "sym"), SHARED)
def test_shared_logits_follow_onnxruntime(name: str, sym: str, exports) -> None:
    """act f32 is the graph's float computation (measured <= 7e-7 on logits of ~1.4); with onnxruntime's
    fusion to MatMulNBits level 4, --act int8 is that (measured <= 7e-7)."""
    path = exports(name, sym)
    ids = np.load(shared_model(name, with_npz=True).with_suffix(".npz"))["input.input_ids"]
    feeds = {"input_ids": ids}
    floats, fused = (session(path, f).run(["logits"], feeds)[0] for f in (False, True))
    got = simulate(compile_model(path, CompileOptions(max_seq=16)), feeds).outputs["logits"]
    err = max_err(got, floats)
    assert err <= 1e-4, f"{name} {sym}: max |logits - onnxruntime| = {err:.3g}"
    if max_err(fused, floats) > 1e-4:  # this onnxruntime fused the pairs into MatMulNBits (accuracy level 4)
        got = simulate(compile_model(path, CompileOptions(max_seq=16, act="int8")), feeds).outputs["logits"]
        err = max_err(got, fused)
        assert err <= 1e-5, f"{name} {sym} --act int8: max |logits - onnxruntime's fused session| = {err:.3g}"


@pytest.mark.parametrize(("name", "sym"), SHARED)
def test_shared_greedy_ids_follow_onnxruntime(name: str, sym: str, exports) -> None:
    path = exports(name, sym)
    program = compile_model(path, CompileOptions(max_seq=8, max_ctx=len(PROMPT) + NEW))
    got = generate(Session(program), PROMPT, NEW).tokens
    ort_session, ids, want = session(path), list(PROMPT), []
    for _ in range(NEW):
        want.append(int(np.argmax(ort_session.run(["logits"], {"input_ids": np.array([ids], np.int64)})[0][0, -1])))
        ids.append(want[-1])
    assert got == want, f"{name} {sym}: cimc {got} vs onnxruntime {want}"


def test_shared_import_keeps_the_quantized_weights_on_disk(exports, monkeypatch: pytest.MonkeyPatch) -> None:
    path = exports("llama_a_dynamo", "asym")
    model = onnx.load(str(path), load_external_data=False)
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    read: list[str] = []
    get = WeightStore.get
    monkeypatch.setattr(WeightStore, "get", lambda self, name: read.append(name) or get(self, name))
    module, _ = import_onnx(path, max_seq=8)
    assert not ({n.input[0] for n in dq} | {n.input[1] for n in dq}) & set(read), read
    quantized = [op for op in module.walk("linear") if op.operands[1].owner.name == "qweight"]
    assert len(quantized) == len(dq) == 15
    for op in quantized:
        w = op.operands[1].owner
        assert (w.attrs["format"], w.attrs["group"], str(w.result.type.dtype), op.attrs["act"]) == \
               ("dequantizelinear", 32, "u4", "f32")


# ---- small graphs: one DequantizeLinear into a MatMul or Gemm, against onnxruntime ---------------------------


def dq_model(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None = None, *, axis: int | None = None,
             block: int | None = None, transpose: bool = False, gemm: bool = False, bias: bool = False,
             k: int = K, n: int = N) -> onnx.ModelProto:
    """x [1, seq, K] -> MatMul "mm" (or Gemm with transB) of DequantizeLinear "dq"("W", "S", "Z"), through a
    Transpose with `transpose` (W stored [N, K]) -> y [1, seq, N]. Gemm takes x as [seq, K]."""
    inits = [numpy_helper.from_array(q, "W"), numpy_helper.from_array(scale, "S")]
    if zero is not None:
        inits.append(numpy_helper.from_array(zero, "Z"))
    attrs = {name: v for name, v in (("axis", axis), ("block_size", block)) if v is not None}
    nodes = [helper.make_node("DequantizeLinear", ["W", "S", "Z"][:2 + (zero is not None)], ["w"], name="dq", **attrs)]
    weight = "w"
    if transpose and not gemm:
        nodes.append(helper.make_node("Transpose", ["w"], ["wt"], name="tr", perm=[1, 0]))
        weight = "wt"
    if gemm:
        inits += [numpy_helper.from_array(np.array([-1, k], np.int64), "flat"),
                  numpy_helper.from_array(np.array([1, -1, n], np.int64), "back"),
                  numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float32), "bias")]
        nodes += [helper.make_node("Reshape", ["x", "flat"], ["x2"], name="flat"),
                  helper.make_node("Gemm", ["x2", weight, *(["bias"] if bias else [])], ["y2"], name="mm",
                                   transB=int(transpose)),
                  helper.make_node("Reshape", ["y2", "back"], ["y"], name="back")]
    else:
        nodes.append(helper.make_node("MatMul", ["x", weight], ["y"], name="mm"))
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def ints(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random integers over the whole range of an ONNX integer type (int4/uint4 as ml_dtypes)."""
    lo, hi = {"int8": (-128, 127), "uint8": (0, 255), "int4": (-8, 7), "uint4": (0, 15)}[dtype]
    v = rng.integers(lo, hi + 1, shape)
    return v.astype(helper.tensor_dtype_to_np_dtype(getattr(TensorProto, dtype.upper())))


def scales(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return (rng.random(shape) * 0.02 + 0.002).astype(np.float32)


def forms(rng: np.random.Generator) -> dict[str, tuple[dict, str]]:
    """name -> (dq_model arguments, the qweight it must lift to)."""
    blocks_zero = ints(rng, "int4", (K // 16, N))
    blocks_zero[0, 0] = 3  # nonzero: the weights shift to u4
    return {
        "per-channel-int8": ({"q": ints(rng, "int8", (K, N)), "scale": scales(rng, (N,)), "axis": 1}, "i8[64,48] g0"),
        "per-channel-int8-zero": ({"q": ints(rng, "int8", (K, N)), "scale": scales(rng, (N,)),
                                   "zero": ints(rng, "int8", (N,)), "axis": 1}, "u8[64,48] g0"),
        "per-tensor-uint8": ({"q": ints(rng, "uint8", (K, N)), "scale": np.float32(0.01), "zero": np.uint8(131)},
                             "u8[64,48] g0"),
        "per-tensor-int8": ({"q": ints(rng, "int8", (K, N)), "scale": np.float32(0.01)}, "i8[64,48] g0"),
        "blocked-int4-zero": ({"q": ints(rng, "int4", (K, N)), "scale": scales(rng, (K // 16, N)),
                               "zero": blocks_zero, "axis": 0, "block": 16}, "u4[64,48] g16"),
        "blocked-uint4": ({"q": ints(rng, "uint4", (K, N)), "scale": scales(rng, (K // 32, N)),
                           "zero": ints(rng, "uint4", (K // 32, N)), "axis": 0, "block": 32}, "u4[64,48] g32"),
        "blocked-int8-partial": ({"q": ints(rng, "int8", (K, N)), "scale": scales(rng, (2, N)), "axis": 0,
                                  "block": 48}, "i8[64,48] g48"),  # blocks of 48 and 16 rows: valid ONNX
        "transposed-per-channel": ({"q": ints(rng, "int8", (N, K)), "scale": scales(rng, (N,)), "axis": 0,
                                    "transpose": True}, "i8[64,48] g0"),
        "gemm-transB-blocked": ({"q": ints(rng, "uint8", (N, K)), "scale": scales(rng, (N, K // 32)),
                                 "zero": ints(rng, "uint8", (N, K // 32)), "axis": 1, "block": 32, "transpose": True,
                                 "gemm": True, "bias": True}, "u8[64,48] g32"),
        "gemm-per-channel": ({"q": ints(rng, "int4", (K, N)), "scale": scales(rng, (N,)), "axis": 1, "gemm": True},
                             "i4[64,48] g0"),
    }


FORMS = list(forms(np.random.default_rng(0)))


@pytest.mark.parametrize("form", FORMS)
def test_small_graphs_follow_onnxruntime(form: str, tmp_path: Path) -> None:
    """Each form keeps its numbers (the qweight type and group as stated) and computes what
    onnxruntime computes on the graph as written."""
    args, lifted = forms(np.random.default_rng(0))[form]
    path = tmp_path / "m.onnx"
    onnx.save(dq_model(**args), str(path))
    module, _ = import_onnx(path, max_seq=8)
    (op,) = module.walk("linear")
    w = op.operands[1].owner
    assert f"{w.result.type} g{w.attrs['group']}" == lifted and op.attrs["act"] == "f32"
    x = np.random.default_rng(1).standard_normal((1, SEQ, K)).astype(np.float32)
    got = simulate(compile_model(path, CompileOptions(max_seq=8)), {"x": x}).outputs["y"]
    err = relative_err(got, session(path).run(["y"], {"x": x})[0])
    assert err <= 1e-4, f"{form}: max |y - onnxruntime| / max |y| = {err:.3g}"


# ---- quantized embedding tables -----------------------------------------------------------------------------


def table_model(gather_first: bool, scale: np.ndarray, zero: np.ndarray | None, axis: int,
                table: np.ndarray) -> onnx.ModelProto:
    """ids [1, seq] -> Gather of the table "T" (int8) dequantized before ("dq" -> "g") or after ("g" -> "dq")."""
    inits = [numpy_helper.from_array(table, "T"), numpy_helper.from_array(scale, "S")]
    dq_in = ["S"] + (["Z"] if zero is not None else [])
    if zero is not None:
        inits.append(numpy_helper.from_array(zero, "Z"))
    if gather_first:
        nodes = [helper.make_node("Gather", ["T", "ids"], ["e"], name="g"),
                 helper.make_node("DequantizeLinear", ["e", *dq_in], ["y"], name="dq", axis=axis)]
    else:
        nodes = [helper.make_node("DequantizeLinear", ["T", *dq_in], ["t"], name="dq", axis=axis),
                 helper.make_node("Gather", ["t", "ids"], ["y"], name="g")]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", table.shape[1]])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize(("gather_first", "per"), [(True, "tensor"), (True, "feature"), (False, "token"),
                                                   (False, "tensor")])
def test_quantized_embedding_tables(gather_first: bool, per: str, tmp_path: Path) -> None:
    """quantize_dynamic's Gather -> DequantizeLinear, and QDQ's DequantizeLinear -> Gather: an embedding
    over the table dequantized at compile time, exactly onnxruntime's values."""
    rng = np.random.default_rng(3)
    vocab, hidden = 40, 24
    table = ints(rng, "int8", (vocab, hidden))
    shape, axis = {"tensor": ((), 1), "feature": ((hidden,), 2 if gather_first else 1), "token": ((vocab,), 0)}[per]
    model = table_model(gather_first, scales(rng, shape), ints(rng, "int8", shape), axis, table)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    module, _ = import_onnx(path, max_seq=8)
    (emb,) = module.walk("embedding")
    assert emb.operands[1].owner.attrs["format"] == "dequantize"
    ids = rng.integers(0, vocab, (1, SEQ))
    got = simulate(compile_model(path, CompileOptions(max_seq=8)), {"ids": ids}).outputs["y"]
    np.testing.assert_array_equal(got, session(path).run(["y"], {"ids": ids})[0])


# ---- forms cimc cannot take: one error naming the node and the value -------------------------------------


def _tensor(name: str, et: int, dims: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, et, dims, np.zeros(int(np.prod(dims)), np.int64).tolist())


def _with_init(name: str, value: np.ndarray | onnx.TensorProto) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        t = next(t for t in model.graph.initializer if t.name == name)
        t.CopyFrom(value if isinstance(value, onnx.TensorProto) else numpy_helper.from_array(value, name))
        t.name = name
    return edit


def _dq_attr(name: str, value: int) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        dq = model.graph.node[0]
        kept = [a for a in dq.attribute if a.name != name]
        del dq.attribute[:]
        dq.attribute.extend([*kept, helper.make_attribute(name, value)])
    return edit


BASE = {"q": np.zeros((K, N), np.int8), "scale": np.full((2, N), 0.01, np.float32),
        "zero": np.zeros((2, N), np.int8), "axis": 0, "block": 32}  # valid: blocks of 32 along K
BAD = {  # edit of the valid graph -> (node named, its op, what its line says)
    "int16": (_with_init("W", _tensor("W", TensorProto.INT16, [K, N])), "dq", "DequantizeLinear",
              "x 'W' is int16[64, 48]; quantized weights must be int8, uint8, int4 or uint4"),
    "int2": (_with_init("W", _tensor("W", TensorProto.INT2, [K, N])), "dq", "DequantizeLinear",
             "x 'W' is int2[64, 48]"),
    "float8": (_with_init("W", _tensor("W", TensorProto.FLOAT8E4M3FN, [K, N])), "dq", "DequantizeLinear",
               "x 'W' is float8e4m3fn[64, 48]"),
    "zero-type": (_with_init("Z", np.zeros((2, N), np.uint8)), "dq", "DequantizeLinear",
                  "zero point 'Z' is uint8[2, 48]; expected int8"),
    "zero-shape": (_with_init("Z", np.zeros((N,), np.int8)), "dq", "DequantizeLinear",
                   "zero point 'Z' is int8[48] but scale 'S' is float[2, 48]"),
    "scale-float16": (_with_init("S", np.full((2, N), 0.01, np.float16)), "dq", "DequantizeLinear",
                      "scale 'S' is float16[2, 48]; expected float"),
    "block-misfit": (_dq_attr("block_size", 20), "dq", "DequantizeLinear",
                     "block_size=20 does not fit: x 'W' has 64 values along axis 0 and scale 'S' 2 blocks "
                     "(block sizes 32..63 do)"),
    "block-missing": (_dq_attr("block_size", 0), "dq", "DequantizeLinear", "but block_size=0"),
    "axis-range": (_dq_attr("axis", 2), "dq", "DequantizeLinear", "axis=2 is out of range for the rank-2 input 'W'"),
    "output-float16": (_dq_attr("output_dtype", TensorProto.FLOAT16), "dq", "DequantizeLinear",
                       "output_dtype=float16: only float32 outputs are supported"),
    "blocks-along-N": (lambda m: (_with_init("S", np.full((K, 2), 0.01, np.float32))(m),
                                  _with_init("Z", np.zeros((K, 2), np.int8))(m), _dq_attr("axis", 1)(m),
                                  _dq_attr("block_size", 24)(m)),
                       "mm", "MatMul", "weight 'W' of DequantizeLinear 'dq' has blocks of 24 along axis 1, the output "
                                       "axis of [K=64, N=48]; blocks must run along the reduction axis K"),
    "per-row": (lambda m: (_with_init("S", np.full((K,), 0.01, np.float32))(m),
                           _with_init("Z", np.zeros((K,), np.int8))(m), _dq_attr("block_size", 0)(m)),
                "mm", "MatMul", "weight 'W' of DequantizeLinear 'dq' has one scale per row of the reduction axis "
                                "(axis 0 is K=64)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_form_is_one_error_naming_the_node(case: str, cli, tmp_path: Path) -> None:
    edit, node, op, needle = BAD[case]
    model = dq_model(**BASE)
    edit(model)
    path, out = tmp_path / "bad.onnx", tmp_path / "bad.cimb"
    onnx.save(model, str(path))
    res = cli("compile", path, "-o", out, "-q")
    assert_node_refused(res, path, out, f"{node} [{op}]", needle)


def test_static_activation_quantization_is_refused(cli, tmp_path: Path) -> None:
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul (static QDQ): both nodes named."""
    model = dq_model(np.zeros((K, N), np.int8), np.float32(0.01))
    model.graph.initializer.extend([numpy_helper.from_array(np.float32(0.05), "qs"),
                                    numpy_helper.from_array(np.int8(0), "qz")])
    model.graph.node[1].input[0] = "xd"
    model.graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "qs", "qz"], ["xq"], name="q"))
    model.graph.node.insert(1, helper.make_node("DequantizeLinear", ["xq", "qs", "qz"], ["xd"], name="dqx"))
    path = tmp_path / "static.onnx"
    onnx.save(model, str(path))
    res = cli("compile", path, "-o", tmp_path / "x.cimb", "-q")
    assert res.status == 2, res.err
    assert res.err.strip().splitlines()[1:] == [
        "  q [QuantizeLinear]: static activation quantization is not supported: quantize weights only",
        "  dqx [DequantizeLinear]: x 'xq' is an activation: static activation quantization is not supported: "
        "quantize weights only"], res.err
