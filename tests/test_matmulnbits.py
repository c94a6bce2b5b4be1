"""`com.microsoft:MatMulNBits` graphs: imported as `linear(x, qweight)` with the node's own numbers
(never requantized), checked against onnxruntime on the same file; every node cimc cannot take
is one error naming the node and the value.

Small graphs are x [1, seq, K] -> MatMulNBits -> y [1, seq, N], with B, scales and zero points
from onnxruntime's own blockwise quantizer (the kernels `MatMulNBitsQuantizer` calls).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_fixtures import max_err, shared_model
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
from test_cli import assert_node_refused
from test_generate import ort_greedy

from cimc.driver import CompileOptions, compile_model
from cimc.frontend import WeightStore, import_onnx
from isa.program import Program
from runtime.generate import generate
from runtime.interpreter import Session, simulate

SHARED = ["llama_e_int4_rtn", "qwen2_e_int4_rtn"]
PROMPT = [1, 5, 9, 2, 77, 14]
NEW = 16
SEQ = 5  # tokens fed to the small graphs
NODE = "mnb"


# ---- helpers -----------------------------------------------------------------------------------


def cosine_rows(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row (last axis) of two same-shaped arrays."""
    g, w = got.reshape(-1, got.shape[-1]).astype(np.float64), want.reshape(-1, want.shape[-1]).astype(np.float64)
    return (g * w).sum(-1) / (np.linalg.norm(g, axis=-1) * np.linalg.norm(w, axis=-1))


def quantize(w: np.ndarray, bits: int, block: int, symmetric: bool,
             scale_dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """onnxruntime's blockwise quantization of a float [K, N] matrix: B [N, k_blocks, blob],
    scales [N, k_blocks], packed zero points [N, ceil(k_blocks * bits / 8)]."""
    k, n = w.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), scale_dtype)
    padded[:k] = w
    packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    zero = np.zeros((n, -(-blocks * bits // 8)), np.uint8)
    scales = np.zeros((n, blocks), scale_dtype)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, padded, scales, zero, block, n, k, symmetric)
    return packed, scales, zero


def nbits_model(k: int, n: int, bits: int = 4, block: int = 32, *, symmetric: bool = True, level: int = 0,
                bias: bool = False, scale_dtype: type = np.float32, seed: int = 0) -> onnx.ModelProto:
    """x float [1, seq, K] -> MatMulNBits (named NODE; B "B", scales "S", zero points "Z") -> y."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    packed, scales, zero = quantize(w, bits, block, symmetric, scale_dtype)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["x", "B", "S", "" if symmetric else "Z"]
    if not symmetric:
        inits.append(numpy_helper.from_array(zero, "Z"))
    if bias:
        inputs += ["", "bias"]
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"))
    node = helper.make_node("MatMulNBits", inputs, ["y"], name=NODE, domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", n])], inits)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def replace_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    init(model, name).CopyFrom(numpy_helper.from_array(value, name))


def with_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    """A copy of `model` with every MatMulNBits node at this accuracy_level."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
    return out


def ort_run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray], output: str = "y") -> np.ndarray:
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run([output], feeds)[0]


def cimc_run(path: Path, x: np.ndarray, **opts: object) -> np.ndarray:
    return simulate(compile_model(path, CompileOptions(max_seq=8, **opts)), {"x": x}).outputs["y"]


def random_x(k: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, SEQ, k)).astype(np.float32)


def relative_err(got: np.ndarray, want: np.ndarray) -> float:
    return max_err(got, want) / float(np.abs(want).max())


# ---- the shared int4 exports -------------------------------------------------------------------


@pytest.fixture(scope="module")
def programs() -> Callable[[str, str | None], Program]:
    """name, act -> the shared model compiled once per module (prefill up to its 9-token npz input)."""
    cache: dict[tuple[str, str | None], Program] = {}

    def get(name: str, act: str | None = None) -> Program:
        if (name, act) not in cache:
            path = shared_model(name, with_npz=True)
            cache[name, act] = compile_model(path, CompileOptions(max_seq=16, max_ctx=len(PROMPT) + NEW, act=act))
        return cache[name, act]
    return get


@pytest.mark.parametrize("name", SHARED)
def test_shared_logits_match_onnxruntime(name: str, programs) -> None:
    """accuracy_level 0 exports run in float on the exact int4 weights: onnxruntime's own logits."""
    ref = np.load(shared_model(name, with_npz=True).with_suffix(".npz"))
    got = simulate(programs(name), {"input_ids": ref["input.input_ids"]}).outputs["logits"]
    err = max_err(got, ref["output.logits"])
    assert err <= 1e-4, f"{name}: max |logits - onnxruntime| = {err:.3g}"


@pytest.mark.parametrize("name", SHARED)
def test_shared_greedy_generation_matches_onnxruntime(name: str, programs) -> None:
    got = generate(Session(programs(name)), PROMPT, NEW).tokens
    want, _ = ort_greedy(shared_model(name), PROMPT, NEW)
    assert got == want, f"{name}: cimc {got} vs onnxruntime {want}"


@pytest.mark.parametrize("name", SHARED)
def test_shared_int8_activations_stay_close(name: str, programs) -> None:
    """--act int8 quantizes every linear's inputs per token and block: close, not exact."""
    ref = np.load(shared_model(name, with_npz=True).with_suffix(".npz"))
    got = simulate(programs(name, "int8"), {"input_ids": ref["input.input_ids"]}).outputs["logits"]
    cos = cosine_rows(got, ref["output.logits"])
    assert cos.mean() >= 0.999, f"{name}: mean cosine {cos.mean():.6f} (min {cos.min():.6f}) vs onnxruntime"
    # the scheme is onnxruntime's accuracy_level 4: the same graph at that level gives the same logits
    path = shared_model(name)
    level4 = ort_run(with_level(onnx.load(str(path)), 4), {"input_ids": ref["input.input_ids"]}, "logits")
    err, gap = max_err(got, level4), max_err(level4, ref["output.logits"])
    assert err <= gap / 10, f"{name}: max |logits - onnxruntime level 4| = {err:.3g} (level 4 vs 0: {gap:.3g})"


def test_shared_import_keeps_the_quantized_initializers_on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Import reads no B, scales or zero points (codegen streams them); the IR names them."""
    path = shared_model("llama_e_int4_rtn")
    model = onnx.load(str(path), load_external_data=False)
    quantized = {i for n in model.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:4] if i}
    read: list[str] = []
    get = WeightStore.get
    monkeypatch.setattr(WeightStore, "get", lambda self, name: read.append(name) or get(self, name))
    module, _ = import_onnx(path, max_seq=8)
    assert not quantized & set(read), sorted(quantized & set(read))
    qweights = list(module.walk("qweight"))
    assert len(qweights) == 15
    assert {q.attrs["init"] for q in qweights} | {q.attrs["scales"] for q in qweights} == quantized
    assert all(q.result.type.dtype == "i4" and q.attrs["group"] == 32 for q in qweights)
    assert {u.attrs["act"] for q in qweights for u in q.result.users} == {"f32"}


# ---- small graphs against onnxruntime ----------------------------------------------------------


@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [4, 8])
def test_float_activations_match_onnxruntime(tmp_path: Path, bits: int, symmetric: bool, block: int) -> None:
    """accuracy_level 0: float inputs on the exact weights; K is 2.5 blocks (a partial last block)."""
    k, n = 2 * block + block // 2, 40
    path = save(nbits_model(k, n, bits, block, symmetric=symmetric), tmp_path / "m.onnx")
    module, _ = import_onnx(path, max_seq=8)
    (q,) = module.walk("qweight")
    assert str(q.result.type) == f"{('i' if symmetric else 'u')}{bits}[{k},{n}]" and q.attrs["group"] == block
    x = random_x(k)
    err = relative_err(cimc_run(path, x), ort_run(path, {"x": x}))
    assert err <= 1e-4, f"max |y - onnxruntime| / max |y| = {err:.3g}"


@pytest.mark.parametrize(("bits", "symmetric", "block"), [(4, True, 32), (4, False, 16), (8, True, 64),
                                                           (8, False, 128), (4, True, 256)])
def test_accuracy_level_4_runs_int8_activations(tmp_path: Path, bits: int, symmetric: bool, block: int) -> None:
    """accuracy_level 4 lifts to act i8: onnxruntime's own int8-activation scheme, so cimc is far
    closer to onnxruntime's level-4 output than that is to the float one; --act fp32 overrides it."""
    k, n = 3 * block, 48
    model = nbits_model(k, n, bits, block, symmetric=symmetric, level=4)
    path = save(model, tmp_path / "m.onnx")
    module, _ = import_onnx(path, max_seq=8)
    assert [op.attrs.get("act") for op in module.walk("linear")] == ["i8"]
    x = random_x(k)
    got, level4, level0 = cimc_run(path, x), ort_run(model, {"x": x}), ort_run(with_level(model, 0), {"x": x})
    cos = cosine_rows(got, level4)
    err, gap = relative_err(got, level4), relative_err(level4, level0)
    assert cos.min() >= 0.999, f"cosine vs onnxruntime level 4: mean {cos.mean():.6f}, min {cos.min():.6f}"
    assert err <= gap / 10, f"relative error {err:.3g} vs onnxruntime level 4 (level 4 vs 0: {gap:.3g})"
    err = relative_err(cimc_run(path, x, act="fp32"), level0)
    assert err <= 1e-4, f"--act fp32: relative error {err:.3g} vs onnxruntime level 0"


def test_bias_and_flat_scales_and_zero_points(tmp_path: Path) -> None:
    """The optional bias input, and the older 1-D layout of scales and zero points."""
    k, n = 96, 24
    model = nbits_model(k, n, 4, 32, symmetric=False, bias=True)
    for name in ("S", "Z"):
        replace_init(model, name, numpy_helper.to_array(init(model, name)).reshape(-1))
    path = save(model, tmp_path / "m.onnx")
    x = random_x(k)
    err = relative_err(cimc_run(path, x), ort_run(path, {"x": x}))
    assert err <= 1e-4, f"relative error {err:.3g}"


def test_float16_scales_are_kept_as_f16(tmp_path: Path) -> None:
    """f16 scales give scale_type f16; the numbers equal onnxruntime's on the same scales in f32
    (onnxruntime wants scales of A's type; cimc computes in f32 either way)."""
    k, n = 64, 32
    model = nbits_model(k, n, 4, 16, symmetric=False, scale_dtype=np.float16)
    path = save(model, tmp_path / "f16.onnx")
    module, _ = import_onnx(path, max_seq=8)
    (q,) = module.walk("qweight")
    assert q.attrs["scale_type"] == "f16"
    replace_init(model, "S", numpy_helper.to_array(init(model, "S")).astype(np.float32))
    x = random_x(k)
    err = relative_err(cimc_run(path, x), ort_run(model, {"x": x}))
    assert err <= 1e-4, f"relative error {err:.3g}"


def test_shared_weights_and_ir_dump(cli, tmp_path: Path) -> None:
    """Two nodes on the same initializers share one qweight; the IR dump compiles to the same numbers."""
    k = 64
    model = nbits_model(k, k, 8, 32, symmetric=False)  # y = (x @ W) @ W
    first = model.graph.node[0]
    first.output[0] = "h"
    second = helper.make_node("MatMulNBits", ["h", *first.input[1:]], ["y"], name="again", domain="com.microsoft")
    second.attribute.extend(first.attribute)
    model.graph.node.append(second)
    path = save(model, tmp_path / "m.onnx")
    module, _ = import_onnx(path, max_seq=8)
    (q,) = module.walk("qweight")
    assert len(q.result.users) == 2
    dump = tmp_path / "m.cimir"
    assert cli("ir", path, "-o", dump, "--max-seq", "8").status == 0
    x = random_x(k)
    got, want = cimc_run(dump, x), ort_run(path, {"x": x})
    assert relative_err(got, want) <= 1e-4


# ---- nodes cimc cannot take: one error naming the node and the value ------------------------------


def _attr(name: str, value: int) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        node = model.graph.node[0]
        kept = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute(name, value)])
    return edit


def _init_as(name: str, value: Callable[[np.ndarray], np.ndarray]) -> Callable[[onnx.ModelProto], None]:
    return lambda model: replace_init(model, name, value(numpy_helper.to_array(init(model, name))))


def _g_idx(model: onnx.ModelProto) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.arange(64, dtype=np.int32) // 32, "g"))
    model.graph.node[0].input.extend(["g"])


def _computed(name: str) -> Callable[[onnx.ModelProto], None]:
    """`name` produced by an Identity of the initializer, not an initializer itself."""
    def edit(model: onnx.ModelProto) -> None:
        init(model, name).name = f"{name}_src"
        model.graph.node.insert(0, helper.make_node("Identity", [f"{name}_src"], [name], name=f"copy_{name}"))
    return edit


BAD = {  # edit of the valid graph (K 64, N 32, 4 bits, block 32, zero points) -> what the error names
    "bits-2": (_attr("bits", 2), "bits=2 is not supported"),
    "bits-3": (_attr("bits", 3), "bits=3 is not supported"),
    "block-8": (_attr("block_size", 8), "block_size=8 is not supported"),
    "block-48": (_attr("block_size", 48), "block_size=48 is not supported"),
    "block-512": (_attr("block_size", 512), "block_size=512 is not supported"),
    "accuracy-5": (_attr("accuracy_level", 5), "accuracy_level=5 is not one of 0..4"),
    "accuracy-neg": (_attr("accuracy_level", -1), "accuracy_level=-1 is not one of 0..4"),
    "prepacked": (_attr("weight_prepacked", 1), "weight_prepacked=1"),
    "K-blocks": (_attr("K", 100), "B 'B' is uint8[32, 2, 16]; K=100, N=32 need uint8[32, 4, 16]"),
    "K-input": (_attr("K", 60), "K=60 but input A 'x' has 64 features"),
    "N": (_attr("N", 40), "B 'B' is uint8[32, 2, 16]; K=64, N=40 need uint8[40, 2, 16]"),
    "B-shape": (_init_as("B", lambda b: b.reshape(32, 32)), "B 'B' is uint8[32, 32]"),
    "B-type": (_init_as("B", lambda b: b.astype(np.int8)), "B 'B' is int8[32, 2, 16]; expected uint8"),
    "scales-shape": (_init_as("S", lambda s: s[:, :1]), "scales 'S' is float[32, 1]; K=64, N=32 need float[32, 2]"),
    "scales-type": (_init_as("S", lambda s: s.astype(np.float64)), "scales 'S' is double[32, 2]; expected float"),
    "zero-float": (_init_as("Z", lambda z: np.full((32, 2), 8, np.float32)),
                   "zero_points 'Z' is float[32, 2]; expected uint8"),
    "zero-shape": (_init_as("Z", lambda z: np.zeros((32, 2), np.uint8)), "zero_points 'Z' is uint8[32, 2]"),
    "g_idx": (_g_idx, "g_idx input 'g' is not supported"),
    "B-computed": (_computed("B"), "B 'B' is not an initializer"),
    "scales-computed": (_computed("S"), "scales 'S' is not an initializer"),
    "zero-computed": (_computed("Z"), "zero_points 'Z' is not an initializer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_node_is_one_error_naming_it(case: str, cli, tmp_path: Path) -> None:
    edit, needle = BAD[case]
    model = nbits_model(64, 32, 4, 32, symmetric=False)
    edit(model)
    path, out = save(model, tmp_path / "bad.onnx"), tmp_path / "bad.cimb"
    res = cli("compile", path, "-o", out, "-q")
    assert_node_refused(res, path, out, f"{NODE} [MatMulNBits (domain com.microsoft)]", needle)


def test_other_contrib_ops_are_still_refused_up_front(cli, tmp_path: Path) -> None:
    """A MatMulNBits graph with another contrib op: that op alone is listed, with the usual reason."""
    model = nbits_model(64, 32)
    model.graph.node[0].output[0] = "h"
    model.graph.node.append(helper.make_node("QuickGelu", ["h"], ["y"], name="gelu", domain="com.microsoft"))
    path = save(model, tmp_path / "gelu.onnx")
    res = cli("compile", path, "-o", tmp_path / "x.cimb", "-q")
    assert res.status == 2
    assert res.err.strip().splitlines()[1:] == ["  gelu [QuickGelu (domain com.microsoft)]: operator not supported yet"]
