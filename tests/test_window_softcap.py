"""Mistral's and Gemma2's attention variants and Gemma's GELU as exporters write them: the attention
rule reads a sliding window off the folded mask (`window`) and soft-capping c * tanh(s / c) between
the scaled scores and the mask (`softcap`); ONNX Gelu-20 and the spelled-out tanh GELU become
`gelu`. Each is checked against onnxruntime on the same file, on prompts long enough for the window
to bite, in prefill and in decode steps over the KV cache; what is not such a mask is refused at
the attention node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from model_fixtures import max_err
from model_fixtures import ort_logits as ort_run
from onnx import TensorProto, helper, numpy_helper
from test_frontend import attention_parts, compile_error, error_lines, node_by_output, save, synth
from zoo_fixtures import ZOO, zoo_prompt

from cimc.accuracy import measure_accuracy
from cimc.driver import CompileOptions, compile_model, load_module, run_pipeline
from cimc.ir.core import Module
from runtime.generate import generate
from runtime.interpreter import Session, simulate

PROMPT = [3, 41, 7, 99, 12, 250, 8, 77]
NEW = 6
OPTIONS = dict(max_seq=len(PROMPT), max_ctx=len(PROMPT) + NEW)


def lifted(path: Path, **options: object) -> Module:
    """The module after lift-idioms."""
    opts = CompileOptions(**(OPTIONS | options))  # type: ignore[arg-type]
    module, _ = load_module(path, opts)
    run_pipeline(module, opts, until="lift-idioms")
    return module


def check_against_onnxruntime(path: Path) -> None:
    """Prefill of the prompt and NEW decode steps (teacher-forced on onnxruntime's greedy tokens)
    within 1e-4 of onnxruntime, and the same greedy tokens free-running."""
    program = compile_model(path, CompileOptions(**OPTIONS))  # type: ignore[arg-type]
    acc = measure_accuracy(program, path, PROMPT, NEW)
    assert acc["max_abs_error"] <= 1e-4, acc
    assert generate(Session(program), PROMPT, NEW).tokens == acc["reference_tokens"]


# ---- sliding windows and soft-capping on the synthetic decoder ---------------------------------


def _window_mask(model: onnx.ModelProto, window: int, lower: str = "Greater") -> None:
    """The mask's `kv <= q` becomes `kv <= q and kv > q - window` (transformers' sliding window);
    with `lower` another comparison of kv with q - window."""
    le = node_by_output(model, attention_parts(model, 0)["mask_where"].input[0])
    kv, q = le.input
    w = numpy_helper.from_array(np.array(window, np.int64), "window")
    model.graph.initializer.append(w)
    nodes = [helper.make_node("Sub", [q, "window"], ["q_minus_w"], name="q_minus_w"),
             helper.make_node(lower, [kv, "q_minus_w"], ["in_window"], name="in_window"),
             helper.make_node("And", [le.output[0], "in_window"], ["sliding"], name="sliding")]
    where = attention_parts(model, 0)["mask_where"]
    where.input[0] = "sliding"
    at = list(model.graph.node).index(where)
    for k, n in enumerate(nodes):
        model.graph.node.insert(at + k, n)


def _softcap(model: onnx.ModelProto, cap: float) -> None:
    """Every layer's scores s become cap * tanh(s / cap) before the mask is added (Gemma2)."""
    model.graph.initializer.append(numpy_helper.from_array(np.array(cap, np.float32), "cap"))
    for layer in range(2):
        add = attention_parts(model, layer)["mask_add"]
        s = add.input[0]
        nodes = [helper.make_node("Div", [s, "cap"], [f"{s}_d"], name=f"{s}_d"),
                 helper.make_node("Tanh", [f"{s}_d"], [f"{s}_t"], name=f"{s}_t"),
                 helper.make_node("Mul", [f"{s}_t", "cap"], [f"{s}_c"], name=f"{s}_c")]
        add.input[0] = f"{s}_c"
        at = list(model.graph.node).index(add)
        for k, n in enumerate(nodes):
            model.graph.node.insert(at + k, n)


@pytest.mark.parametrize("window", [3, 7])
def test_sliding_window_mask_sets_window(tmp_path: Path, window: int) -> None:
    """A window of 3 shows at the small lengths the graph is lifted at; one of 7 only at the mask
    probe (every position up to max_ctx): either way the 8-token prompt and the decode steps after
    it see only the last `window` keys, as onnxruntime does."""
    model = onnx.load(str(synth(tmp_path)))
    _window_mask(model, window)
    path = save(model, tmp_path / "window.onnx")
    windows = [op.attrs.get("window", 0) for op in lifted(path).walk("attention")]
    assert windows == [window, window]  # the synthetic decoder shares one mask between its layers
    check_against_onnxruntime(path)


def test_softcap_sets_softcap(tmp_path: Path) -> None:
    model = onnx.load(str(synth(tmp_path)))
    _softcap(model, 0.5)
    path = save(model, tmp_path / "softcap.onnx")
    atts = list(lifted(path).walk("attention"))
    assert [op.attrs.get("softcap") for op in atts] == [0.5, 0.5]
    assert not list(lifted(path).walk("tanh"))
    check_against_onnxruntime(path)


def test_a_mask_that_is_no_sliding_window_is_refused_at_the_attention(tmp_path: Path) -> None:
    """Keys at least `window` behind visible too (>= instead of >): still a window (of one more
    key); `<` instead: the keys far behind only, which is no causal mask."""
    model = onnx.load(str(synth(tmp_path)))
    _window_mask(model, 3, lower="Less")
    path = save(model, tmp_path / "bad_window.onnx")
    err = compile_error(path)
    attn = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.output[0].startswith("scaled_dot")]
    assert "is not causal" in error_lines(err)[attn[0]], err.render()


def test_a_window_of_one_more_key(tmp_path: Path) -> None:
    model = onnx.load(str(synth(tmp_path)))
    _window_mask(model, 3, lower="GreaterOrEqual")
    path = save(model, tmp_path / "window_ge.onnx")
    assert [op.attrs.get("window") for op in lifted(path).walk("attention")] == [4, 4]


# ---- GELU --------------------------------------------------------------------------------------


def _mlp_graph(tmp_path: Path, name: str, act: list[onnx.NodeProto], opset: int) -> Path:
    """logits = act(x @ w) on x [1, seq, 16]; `act` maps "h" to "y" (the output's name is the one
    ort_logits reads)."""
    w = np.random.default_rng(5).standard_normal((16, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"), *act,
         helper.make_node("Identity", ["y"], ["logits"], name="out")], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", 16])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return save(model, tmp_path / f"{name}.onnx")


def _consts(**values: float) -> list[onnx.NodeProto]:
    return [helper.make_node("Constant", [], [k], name=k, value=numpy_helper.from_array(np.array(v, np.float32)))
            for k, v in values.items()]


def _tanh_gelu_chain(half_first: bool) -> list[onnx.NodeProto]:
    """0.5 * h * (1 + tanh(sqrt(2/pi) * (h + 0.044715 h^3))) as TorchScript spells it (the 0.5 at
    the end), or as GPT-2's gelu_new does (0.5 * h first)."""
    mk = helper.make_node
    nodes = [
        *_consts(c=0.044715, k=float(np.sqrt(2 / np.pi)), one=1.0, half=0.5),
        mk("Mul", ["h", "h"], ["h2"], name="h2"), mk("Mul", ["h", "h2"], ["h3"], name="h3"),
        mk("Mul", ["h3", "c"], ["ch3"], name="ch3"), mk("Add", ["h", "ch3"], ["inner"], name="inner"),
        mk("Mul", ["inner", "k"], ["kin"], name="kin"), mk("Tanh", ["kin"], ["t"], name="t"),
        mk("Add", ["t", "one"], ["onep"], name="onep")]
    if half_first:
        return [*nodes, mk("Mul", ["h", "half"], ["hh"], name="hh"), mk("Mul", ["hh", "onep"], ["y"], name="y")]
    return [*nodes, mk("Mul", ["h", "onep"], ["p"], name="p"), mk("Mul", ["p", "half"], ["y"], name="y")]


GELUS = {
    "gelu20-erf": ([helper.make_node("Gelu", ["h"], ["y"], name="gelu")], 20),
    "gelu20-tanh": ([helper.make_node("Gelu", ["h"], ["y"], name="gelu", approximate="tanh")], 20),
    "chain-half-last": (_tanh_gelu_chain(False), 17),
    "chain-half-first": (_tanh_gelu_chain(True), 17),
}


@pytest.mark.parametrize("name", sorted(GELUS))
def test_gelu_forms_lift_to_one_gelu_and_match_onnxruntime(tmp_path: Path, name: str) -> None:
    nodes, opset = GELUS[name]
    path = _mlp_graph(tmp_path, name.replace("-", "_"), nodes, opset)
    module = lifted(path, max_seq=4, max_ctx=4)
    gelus = list(module.walk("gelu"))
    assert len(gelus) == 1 and not list(module.walk("tanh"))
    assert gelus[0].attrs.get("approximate", "none") == ("none" if name == "gelu20-erf" else "tanh")
    program = compile_model(path, CompileOptions(max_seq=4))
    x = np.random.default_rng(6).standard_normal((1, 4, 16)).astype(np.float32)
    got = simulate(program, {"x": x}).outputs["logits"]
    want = ort_run(path, {"x": x})
    assert max_err(got, want) <= 1e-5


# ---- the zoo's Mistral, Gemma and Gemma2 --------------------------------------------------------

FAMILY_ATTENTION = {  # what the attention rule must read off each family's export: (window, softcap) per layer
    "mistral": [(4, None), (4, None)],
    "gemma": [(0, None), (0, None)],
    "gemma2": [(4, 0.5), (0, 0.5)],  # sliding_window 4 on even layers, attn_logit_softcapping 0.5
}
CELLS = [f"{family}_{flavour}" for family in FAMILY_ATTENTION
         for flavour in ("a_dynamo", "e_int4_rtn", "q_int8_dynamic")]


@pytest.mark.parametrize("name", CELLS)
def test_zoo_attention_variants(name: str) -> None:
    path = ZOO / f"{name}.onnx"
    got = [(op.attrs.get("window", 0), op.attrs.get("softcap")) for op in lifted(path).walk("attention")]
    assert got == FAMILY_ATTENTION[name.split("_")[0]]


@pytest.mark.parametrize("name", ["mistral_a_dynamo", "gemma_a_dynamo", "gemma2_a_dynamo"])
def test_zoo_fp32_cells_match_onnxruntime(name: str) -> None:
    """The family's 9-token prompt and 8 new tokens: the window of 4 bites in prefill and in every
    decode step; Gemma2's final-logit soft-capping is plain elementwise ops."""
    prompt = zoo_prompt(name)
    path = ZOO / f"{name}.onnx"
    program = compile_model(path, CompileOptions(max_seq=16, max_ctx=32))
    acc = measure_accuracy(program, path, prompt, 8)
    assert acc["max_abs_error"] <= 1e-4, acc
    assert generate(Session(program), prompt, 8).tokens == acc["reference_tokens"]
