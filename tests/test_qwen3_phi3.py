"""Qwen3 and Phi-3 idioms: the per-head q/k RMSNorm (on a head-split tensor, and the genai
builder's flattened form), fused projections split on activations (Slice and Split of a linear's
columns), partial rotary; each from a tiny graph compiled, simulated and compared with onnxruntime
on the same file, with a near miss per rule; and Phi-3's long-rope switch at
original_max_position_embeddings (the zoo's qwen3 and phi3 cells are tests/test_zoo_matrix.py's)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_fixtures import matches_onnxruntime, refusals, xy_model
from onnx import TensorProto, helper, numpy_helper
from zoo_fixtures import ZOO

from cimc.accuracy import measure_accuracy
from cimc.driver import CompileOptions, compile_model
from cimc.frontend import import_onnx
from cimc.frontend.model import CannotCompile
from runtime.generate import generate
from runtime.interpreter import Session

D, HEADS, HD, FF = 32, 2, 16, 24
RNG = np.random.default_rng(3)


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def _floats(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return _init(name, (scale * RNG.standard_normal(shape)).astype(np.float32))


# ---- per-head RMSNorm ---------------------------------------------------------------------------


def head_norm_model(square: str, inverse: str, mean_axis: int = -1) -> tuple[list, list]:
    """y = q_norm(x @ wq split into heads), merged back: dynamo's and optimum's forms of the chain."""
    inits = [_floats("wq", D, HEADS * HD), _init("heads", np.array([1, -1, HEADS, HD], np.int64)),
             _init("merge", np.array([1, -1, HEADS * HD], np.int64)), _init("two", np.array(2.0, np.float32)),
             _init("one", np.array(1.0, np.float32)), _init("eps", np.array(1e-6, np.float32)),
             _init("axes", np.array([mean_axis], np.int64)),
             _init("w", (1 + 0.3 * RNG.standard_normal(HD)).astype(np.float32))]  # away from 1: a dropped w shows
    sq = helper.make_node("Pow", ["q", "two"], ["sq"], name="sq") if square == "Pow" else \
        helper.make_node("Mul", ["q", "q"], ["sq"], name="sq")
    inv = helper.make_node("Reciprocal", ["root"], ["inv"], name="inv") if inverse == "Reciprocal" else \
        helper.make_node("Div", ["one", "root"], ["inv"], name="inv")
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["p"], name="proj"),
             helper.make_node("Reshape", ["p", "heads"], ["q"], name="split_heads"), sq,
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="mean", keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["var"], name="var"),
             helper.make_node("Sqrt", ["var"], ["root"], name="root"), inv,
             helper.make_node("Mul", ["q", "inv"], ["normed"], name="normed"),
             helper.make_node("Mul", ["w", "normed"], ["scaled"], name="q_norm"),
             helper.make_node("Reshape", ["scaled", "merge"], ["y"], name="merge_heads")]
    return nodes, inits


@pytest.mark.parametrize(("square", "inverse"), [("Pow", "Reciprocal"), ("Mul", "Div")])
def test_per_head_rms_norm_matches_onnxruntime(square: str, inverse: str, tmp_path: Path) -> None:
    path = xy_model(tmp_path / "m.onnx", *head_norm_model(square, inverse), cols=D)
    module, _ = import_onnx(path, max_seq=8)
    assert [(op.name, op.attrs["head_dim"]) for op in module.walk("rms_norm")] == [("rms_norm", HD)]
    matches_onnxruntime(path)


def test_per_head_rms_norm_over_the_heads_axis_is_refused(tmp_path: Path) -> None:
    path = xy_model(tmp_path / "m.onnx", *head_norm_model("Pow", "Reciprocal", mean_axis=2), cols=D)
    assert refusals(path)["q_norm"] == "per-head RMSNorm idiom: the mean is not over the last (head_dim) axis"


def test_flat_per_head_rms_norm_matches_onnxruntime(tmp_path: Path) -> None:
    """The genai builder's form: Reshape to [1, seq*heads, head_dim], SimplifiedLayerNormalization,
    Reshape back."""
    inits = [_floats("wq", D, HEADS * HD), _init("flat", np.array([0, -1, HD], np.int64)),
             _init("back", np.array([0, -1, HEADS * HD], np.int64)),
             _init("w", (1 + 0.3 * RNG.standard_normal(HD)).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["p"], name="proj"),
             helper.make_node("Reshape", ["p", "flat"], ["f"], name="flat"),
             helper.make_node("SimplifiedLayerNormalization", ["f", "w"], ["n"], name="q_norm", axis=-1,
                              epsilon=1e-6, stash_type=1),
             helper.make_node("Reshape", ["n", "back"], ["y"], name="back")]
    path = xy_model(tmp_path / "m.onnx", nodes, inits, cols=D)
    module, _ = import_onnx(path, max_seq=8)
    assert [op.attrs["head_dim"] for op in module.walk("rms_norm")] == [HD]
    matches_onnxruntime(path)


# ---- fused projections split on activations -------------------------------------------------------


@pytest.mark.parametrize("split_by", ["Split", "Slice"])
def test_fused_gate_up_split_on_activations_matches_onnxruntime(split_by: str, tmp_path: Path) -> None:
    """Phi-3's MLP: one gate_up projection whose output columns are split into gate and up: each
    becomes a linear over its weight columns (the whole one is not computed)."""
    inits = [_floats("w_gu", D, 2 * FF), _floats("w_down", FF, D), _init("lo", np.array([0, FF], np.int64)),
             _init("hi", np.array([FF, 2 * FF], np.int64)), _init("ax", np.array([-1], np.int64))]
    if split_by == "Split":
        parts = [helper.make_node("Split", ["gu"], ["g", "u"], name="split", axis=2, num_outputs=2)]
    else:
        inits += [_init(f"{n}{i}", np.array([v], np.int64)) for i, (a, b) in enumerate(((0, FF), (FF, 2 * FF)))
                  for n, v in (("s", a), ("e", b))]
        parts = [helper.make_node("Slice", ["gu", f"s{i}", f"e{i}", "ax"], [o], name=o) for i, o in enumerate("gu")]
    nodes = [helper.make_node("MatMul", ["x", "w_gu"], ["gu"], name="gate_up"), *parts,
             helper.make_node("Sigmoid", ["g"], ["sg"], name="sg"),
             helper.make_node("Mul", ["g", "sg"], ["act"], name="act"),
             helper.make_node("Mul", ["act", "u"], ["h"], name="h"),
             helper.make_node("MatMul", ["h", "w_down"], ["y"], name="down")]
    path = xy_model(tmp_path / "m.onnx", nodes, inits, cols=D)
    module, _ = import_onnx(path, max_seq=8)
    widths = sorted(int(op.result.type.shape[1]) for op in module.walk("linear") if op.result.uses)
    assert widths == [FF, FF, D]
    matches_onnxruntime(path)


# ---- partial rotary ------------------------------------------------------------------------------


def partial_rope_model(rd: int, rest_of: str = "q") -> tuple[list, list]:
    """Heads of x @ wq, RoPE on the first rd entries of each head (rotate_half by Slices; tables
    rd wide from x's shape), Concat with the rest of `rest_of`'s heads, merged back."""
    inits = [_floats("wq", D, HEADS * HD), _floats("wk", D, HEADS * HD),
             _init("heads", np.array([1, -1, HEADS, HD], np.int64)),
             _init("merge", np.array([1, -1, HEADS * HD], np.int64)), _init("seq_at", np.array([1], np.int64)),
             _init("rd", np.array([rd], np.int64)), _init("ax", np.array([3], np.int64)),
             _init("cvec", RNG.uniform(-1, 1, rd).astype(np.float32)),
             _init("svec", RNG.uniform(-1, 1, rd).astype(np.float32))]
    for name, v in (("zero", 0), ("half", rd // 2), ("rd_end", rd), ("end", HD)):
        inits.append(_init(name, np.array([v], np.int64)))

    def sl(src: str, out: str, lo: str, hi: str) -> onnx.NodeProto:
        return helper.make_node("Slice", [src, lo, hi, "ax"], [out], name=out)

    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "seq_at"], ["seq"], name="seq"),
             helper.make_node("Concat", ["seq", "rd"], ["table_shape"], name="table_shape", axis=0),
             helper.make_node("ConstantOfShape", ["table_shape"], ["ones"], name="ones",
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Mul", ["ones", "cvec"], ["cos"], name="cos"),
             helper.make_node("Mul", ["ones", "svec"], ["sin"], name="sin")]
    for t in ("q", "k"):
        nodes += [helper.make_node("MatMul", ["x", f"w{t}"], [f"{t}p"], name=f"{t}_proj"),
                  helper.make_node("Reshape", [f"{t}p", "heads"], [f"{t}h"], name=f"{t}_heads"),
                  helper.make_node("Transpose", [f"{t}h"], [t], name=f"{t}_t", perm=[0, 2, 1, 3])]
    nodes += [sl("q", "rot", "zero", "rd_end"), sl(rest_of, "rest", "rd_end", "end"),
              sl("rot", "x1", "zero", "half"), sl("rot", "x2", "half", "rd_end"),
              helper.make_node("Neg", ["x2"], ["neg"], name="neg"),
              helper.make_node("Concat", ["neg", "x1"], ["rh"], name="rotate_half", axis=-1),
              helper.make_node("Mul", ["rot", "cos"], ["xc"], name="xc"),
              helper.make_node("Mul", ["rh", "sin"], ["rs"], name="rs"),
              helper.make_node("Add", ["xc", "rs"], ["emb"], name="rope"),
              helper.make_node("Concat", ["emb", "rest"], ["qr"], name="join", axis=-1),
              helper.make_node("Transpose", ["qr"], ["back"], name="back", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["back", "merge"], ["y"], name="y")]
    return nodes, inits


def test_partial_rotary_matches_onnxruntime(tmp_path: Path) -> None:
    path = xy_model(tmp_path / "m.onnx", *partial_rope_model(HD // 2), cols=D)
    module, _ = import_onnx(path, max_seq=8)
    assert [(op.attrs["head_dim"], op.attrs["rotary_dim"]) for op in module.walk("rope")] == [(HD, HD // 2)]
    matches_onnxruntime(path)


def test_partial_rotary_joined_with_another_tensor_is_refused(tmp_path: Path) -> None:
    path = xy_model(tmp_path / "m.onnx", *partial_rope_model(HD // 2, rest_of="k"), cols=D)
    assert refusals(path)["join"] == \
        "partial RoPE idiom: Concat does not join the rotated entries with the rest of the same heads"


# ---- GroupQueryAttention with separate q, k, v ----------------------------------------------------


def test_group_query_attention_key_without_value_is_refused(cli, tmp_path: Path) -> None:
    model = onnx.load(str(ZOO / "qwen3_g_genai_fp32.onnx"))
    gqa = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    gqa.input[2] = ""
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    res = cli("check", path)
    assert res.status == 2 and f"key '{gqa.input[1]}' and value '' must be given both" in res.err, res.err


# ---- the zoo's files -----------------------------------------------------------------------------


def test_phi3_long_rope_past_original_max_positions() -> None:
    """original_max_position_embeddings is 32. optimum's export folds to one rotary table, which
    holds past position 32: 28 prompt tokens and 12 generated match onnxruntime. dynamo's export
    switches every position's factors once the sequence is longer than 32 (Where(len > 32, long,
    short)): no one program reproduces that, so a context beyond 32 is refused at the RoPE."""
    prompt = [(7 * i + 3) % 128 for i in range(28)]
    path = ZOO / "phi3_c_optimum_kv.onnx"
    program = compile_model(path, CompileOptions(max_seq=32, max_ctx=48))
    acc = measure_accuracy(program, path, prompt, 12)
    assert generate(Session(program), prompt, 12).tokens == acc["reference_tokens"]
    assert acc["top1_agreement"] == 1.0 and acc["max_abs_error"] <= 1e-4, acc
    with pytest.raises(CannotCompile) as err:
        import_onnx(ZOO / "phi3_a_dynamo.onnx", max_seq=32, max_ctx=48)
    ropes = {node.name: reason for node, reason in err.value.failures if node.op_type == "Add"
             and reason.startswith("RoPE idiom")}
    assert ropes and all("changes with the sequence length" in r for r in ropes.values()), err.value.failures
    import_onnx(ZOO / "phi3_a_dynamo.onnx", max_seq=16, max_ctx=32)  # within 32 it compiles
