"""onnxruntime-genai int4 exports (GroupQueryAttention, SkipSimplifiedLayerNormalization,
SimplifiedLayerNormalization, GatherBlockQuantized, MatMulNBits at accuracy level 4) compile, run
and match onnxruntime: prefill and a decode step against the npz references, greedy generation
against an onnxruntime loop, and what cannot be honoured is refused naming the node and value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from model_fixtures import shared_model
from onnx import TensorProto, helper, numpy_helper

from cimc.accuracy import measure_accuracy, reference_logits
from cimc.driver import CompileOptions, compile_model
from cimc.ir.quant import gather_blocks
from runtime.generate import generate
from runtime.interpreter import Session

GENAI = ["llama_d_genai_int4", "qwen2_d_genai_int4"]
PROMPT = [1, 5, 9, 2, 77, 14]
NEW = 8
#: cimc reproduces onnxruntime's accuracy-level-4 scheme (int8 activations per block), so the
#: models agree to float rounding (measured: at most 4.8e-7 on logits and presents).
TOL = 1e-5


@pytest.fixture(scope="module")
def programs() -> dict:
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = compile_model(shared_model(name, with_npz=True),
                                        CompileOptions(max_seq=8, max_ctx=len(PROMPT) + NEW + 2))
        return cache[name]
    return get


def ort_greedy(path: Path, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding with onnxruntime and the genai graph's own cache (an empty past first)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    outputs = [o.name for o in sess.get_outputs()]
    kv_heads = {i.name: i.shape[1] for i in sess.get_inputs()}
    head_dim = int(np.load(path.with_suffix(".npz"))["output.present.0.key"].shape[3])
    past = {n: np.zeros((1, kv_heads[n], 0, head_dim), np.float32) for n in past_names}
    tokens, step_ids, done = [], list(prompt), 0
    for _ in range(new):
        feeds = {"input_ids": np.array([step_ids], np.int64),
                 "attention_mask": np.ones((1, done + len(step_ids)), np.int64), **past}
        res = dict(zip(outputs, sess.run(outputs, feeds), strict=True))
        tokens.append(int(np.argmax(res["logits"][0, -1])))
        past = {n: res[n.replace("past_key_values", "present")] for n in past_names}
        done += len(step_ids)
        step_ids = [tokens[-1]]
    return tokens


@pytest.mark.parametrize("name", GENAI)
def test_prefill_and_decode_step_match_the_npz(name: str, programs) -> None:
    data = np.load(shared_model(name, with_npz=True).with_suffix(".npz"))
    program = programs(name)
    first = Session(program).run("prefill", {k[6:]: data[k] for k in data if k.startswith("input.")})
    assert set(first.outputs) == {k[7:] for k in data if k.startswith("output.")}
    for key, got in first.outputs.items():
        want = data[f"output.{key}"]
        assert got.shape == want.shape, key
        assert np.abs(got - want).max() <= TOL, (key, float(np.abs(got - want).max()))
    step = {k[12:]: data[k] for k in data if k.startswith("step2.input.")}
    second = Session(program).run("decode", step)  # past KV from the inputs, on a fresh machine
    assert set(second.outputs) == {k[13:] for k in data if k.startswith("step2.output.")}
    for key, got in second.outputs.items():
        want = data[f"step2.output.{key}"]
        assert got.shape == want.shape, key
        assert np.abs(got - want).max() <= TOL, (key, float(np.abs(got - want).max()))


@pytest.mark.parametrize("name", GENAI)
def test_greedy_generation_matches_onnxruntime(name: str, programs) -> None:
    gen = generate(Session(programs(name)), PROMPT, NEW)
    assert gen.tokens == ort_greedy(shared_model(name), PROMPT, NEW)
    assert [r.report["entry"] for r in gen.runs] == ["prefill"] + ["decode"] * (NEW - 1)


def _edited(tmp_path: Path, op_type: str, attr: str, value: object) -> tuple[Path, str]:
    """llama's genai export with `attr` of the first `op_type` node set to `value` (one file)."""
    model = onnx.load(str(shared_model("llama_d_genai_int4")))
    node = next(n for n in model.graph.node if n.op_type == op_type)
    kept = [a for a in node.attribute if a.name != attr]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute(attr, value)])
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path, node.name


@pytest.mark.parametrize(("op_type", "attr", "value", "needle"), [
    ("GroupQueryAttention", "softcap", -1.0, "softcap=-1.0"),
    ("GroupQueryAttention", "local_window_size", 0, "local_window_size=0"),
    ("GroupQueryAttention", "rotary_interleaved", 1, "rotary_interleaved=1"),
    ("SkipSimplifiedLayerNormalization", "axis", 1, "axis=1"),
    ("SimplifiedLayerNormalization", "axis", 0, "axis=0"),
])
def test_what_cannot_be_honoured_is_refused(op_type: str, attr: str, value: object, needle: str, cli,
                                            tmp_path: Path) -> None:
    path, node = _edited(tmp_path, op_type, attr, value)
    out = tmp_path / "x.cimb"
    res = cli("compile", path, "-o", out, "-q", "--max-seq", "8")
    assert res.status == 2 and not out.exists() and "internal error" not in res.err
    lines = [line for line in res.err.splitlines() if node in line]
    assert len(lines) == 1 and needle in lines[0] and op_type in lines[0], res.err


def test_accuracy_reference_drives_the_genai_graph(programs) -> None:
    """`--accuracy` runs onnxruntime on the export itself: its symbolic head_dim comes from the
    GroupQueryAttention, and the simulator matches it teacher-forced."""
    path = shared_model("llama_d_genai_int4")
    tokens, _ = reference_logits(path, PROMPT, NEW)
    assert tokens == ort_greedy(path, PROMPT, NEW)
    acc = measure_accuracy(programs("llama_d_genai_int4"), path, PROMPT, NEW)
    assert acc["top1_agreement"] == 1.0 and acc["max_abs_error"] <= TOL, acc


@pytest.mark.parametrize("zero_points", [False, True])
def test_gather_block_quantized_table_is_onnxruntimes(zero_points: bool) -> None:
    """The compile-time dequantized table equals what onnxruntime's GatherBlockQuantized gathers,
    with packed 4-bit zero points or without (then 8)."""
    rng = np.random.default_rng(0)
    vocab, hidden, block = 6, 96, 32
    data = rng.integers(0, 256, (vocab, hidden // 2), dtype=np.uint8)
    scales = rng.random((vocab, hidden // block)).astype(np.float32)
    zp = rng.integers(0, 256, (vocab, 2), dtype=np.uint8)  # 3 blocks: two bytes a row, the last nibble unused
    inits = [numpy_helper.from_array(data, "d"), numpy_helper.from_array(scales, "s")]
    ins = ["d", "ids", "s"]
    if zero_points:
        inits.append(numpy_helper.from_array(zp, "z"))
        ins.append("z")
    node = helper.make_node("GatherBlockQuantized", ins, ["y"], domain="com.microsoft", bits=4, block_size=block,
                            gather_axis=0, quantize_axis=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [vocab])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"ids": np.arange(vocab, dtype=np.int64)})[0]
    got = gather_blocks(data, scales, zp if zero_points else None, 4, block)
    assert got.shape == want.shape and np.array_equal(got, want)
