"""The frontend's generic mode (cimc/frontend/generic.py): graphs without token ids or a KV cache,
every input a fixed-size activation, compiled and simulated, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cimc.backend import CimcBackend
from cimc.driver import compile_model
from cimc.frontend.model import CannotCompile
from cimc.ir.core import TensorType
from cimc.ir.ops import OPS, Piece, TypeRuleError
from isa.diag import CimcError


def _model(nodes: list, inputs: dict[str, list[int]], outputs: list[str], inits: dict[str, np.ndarray],
           opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "generic", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = CimcBackend.prepare(model).run(feeds)
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_a_chain_across_rows_matches_onnxruntime():
    """Transpose, a Gemm with transA/alpha/beta and a matrix C, Softmax over axis 0, a ReduceMean over
    two axes and a broadcasting Mul of two activations: relayouts between ops, weights on the macros."""
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 6)).astype(np.float32), "c": rng.standard_normal((3, 6)).astype(np.float32),
             "axes": np.array([0, 2], np.int64), "shape": np.array([3, 2, 3], np.int64)}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("Gemm", ["xt", "w", "c"], ["g"], transA=1, alpha=0.5, beta=2.0),
             helper.make_node("Softmax", ["g"], ["s"], axis=0),
             helper.make_node("Mul", ["s", "y"], ["m"]),
             helper.make_node("Reshape", ["m", "shape"], ["m3"]),
             helper.make_node("ReduceMean", ["m3", "axes"], ["r"], keepdims=1)]
    model = _model(nodes, {"x": [3, 4], "y": [6]}, ["s", "r"], inits)
    _check(model, {"x": rng.standard_normal((3, 4)).astype(np.float32),
                   "y": rng.standard_normal(6).astype(np.float32)})


def test_concat_gather_and_a_stepped_slice_match_onnxruntime():
    rng = np.random.default_rng(1)
    inits = {"idx": np.array([[2, 0], [1, 2]], np.int64), "starts": np.array([3], np.int64),
             "ends": np.array([-10], np.int64), "axes": np.array([1], np.int64), "steps": np.array([-2], np.int64)}
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
             helper.make_node("Gather", ["c", "idx"], ["g"], axis=0),
             helper.make_node("Slice", ["c", "starts", "ends", "axes", "steps"], ["s"])]
    model = _model(nodes, {"a": [3, 2], "b": [3, 3]}, ["g", "s"], inits)
    _check(model, {"a": rng.standard_normal((3, 2)).astype(np.float32),
                   "b": rng.standard_normal((3, 3)).astype(np.float32)})


def test_batched_matmul_has_one_weight_per_matrix():
    rng = np.random.default_rng(2)
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"])], {"a": [3, 1, 2, 4]}, ["y"],
                   {"b": rng.standard_normal((2, 4, 5)).astype(np.float32)})
    _check(model, {"a": rng.standard_normal((3, 1, 2, 4)).astype(np.float32)})


def test_layer_norm_over_leading_axes_with_its_statistics_matches_onnxruntime():
    """LayerNormalization from axis 1 of a transposed (strided) tensor: a row normalisation of its
    [2, 15] matrix, Scale broadcast from [5] to [3, 5], and the Mean and InvStdDev outputs."""
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal(5).astype(np.float32), "b": rng.standard_normal((3, 5)).astype(np.float32)}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("LayerNormalization", ["xt", "w", "b"], ["y", "mean", "inv"], axis=1, epsilon=0.01)]
    model = _model(nodes, {"x": [3, 2, 5]}, ["y", "mean", "inv"], inits, opset=17)
    _check(model, {"x": (rng.standard_normal((3, 2, 5)) * 3 + 1).astype(np.float32)})


def test_layer_norm_without_statistics_takes_scale_and_bias_as_bound_inputs():
    rng = np.random.default_rng(4)
    model = _model([helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-2)],
                   {"x": [2, 3, 4], "w": [3, 4], "b": [4]}, ["y"], {}, opset=17)
    feeds = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32),
             "w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    _check(model, feeds)


def test_rms_norm_over_leading_axes_matches_onnxruntime():
    rng = np.random.default_rng(5)
    model = _model([helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=0, epsilon=0.1)], {"x": [2, 3, 4]},
                   ["y"], {"w": rng.standard_normal((2, 3, 4)).astype(np.float32)}, opset=23)
    _check(model, {"x": rng.standard_normal((2, 3, 4)).astype(np.float32)})


def test_a_norm_scale_that_does_not_broadcast_is_refused_at_its_node():
    model = _model([helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=1)], {"x": [2, 3, 4]}, ["y"],
                   {"w": np.ones(3, np.float32)}, opset=23)
    with pytest.raises(CannotCompile) as e:
        CimcBackend.prepare(model)
    assert [(n.op_type, why) for n, why in e.value.failures] == [
        ("RMSNormalization", "RMSNormalization input 'w' of shape [3] does not broadcast to the normalised shape "
                             "[3, 4]")]


def test_where_by_a_constant_condition_matches_onnxruntime():
    """Each row's runs come from X (an activation broadcast across a leading axis) or Y (a constant)."""
    rng = np.random.default_rng(6)
    cond = rng.random((2, 3, 4)) < 0.5
    cond[0, 0], cond[1, 2] = True, False  # whole rows of one choice too
    model = _model([helper.make_node("Where", ["c", "x", "y"], ["z"])], {"x": [3, 4]}, ["z"],
                   {"c": cond, "y": np.float32(-7.5)})
    _check(model, {"x": rng.standard_normal((3, 4)).astype(np.float32)})


def test_where_by_a_boolean_input_binds_it_at_the_first_run():
    rng = np.random.default_rng(7)
    model = _model([helper.make_node("Where", ["c", "x", "y"], ["z"])], {"x": [2, 3], "y": [2, 3]}, ["z"], {})
    model.graph.input.insert(0, helper.make_tensor_value_info("c", TensorProto.BOOL, [2, 3]))
    feeds = {"c": rng.random((2, 3)) < 0.5, "x": rng.standard_normal((2, 3)).astype(np.float32),
             "y": rng.standard_normal((2, 3)).astype(np.float32)}
    _check(model, feeds)


def test_an_integer_data_input_is_refused_with_its_type(tmp_path):
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "neg",
                              [helper.make_tensor_value_info("x", TensorProto.INT8, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.INT8, [3])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "neg.onnx")
    with pytest.raises(CimcError, match="graph input 'x' has element type int8; cimc takes float32"):
        compile_model(tmp_path / "neg.onnx")


def test_a_bound_parameter_must_not_change():
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["y"])], {"x": [2, 3]}, ["y"], {})
    model.graph.input.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [2]))
    rep = CimcBackend.prepare(model)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(rep.run({"x": x, "shape": np.array([3, 2])})[0], x.reshape(3, 2))
    with pytest.raises(Exception, match="bound as a constant"):
        rep.run({"x": x, "shape": np.array([6, 1])})


def test_relayout_type_rule_rejects_a_piece_outside_its_operand():
    t = TensorType("f32", (2, 3))
    ok = Piece(0, 0, 0, 0, (3, 2), (0, 1), (1, 0), (2, 1)).encode()  # the transpose
    assert OPS["relayout"].infer([t], {"shape": [3, 2], "pieces": [ok]}) == [TensorType("f32", (3, 2))]
    bad = Piece(0, 0, 1, 0, (3, 2), (0, 1), (1, 0), (2, 1)).encode()  # one column too far
    with pytest.raises(TypeRuleError, match="reads outside operand 0"):
        OPS["relayout"].infer([t], {"shape": [3, 2], "pieces": [bad]})


def test_attention_with_gqa_past_softcap_and_a_mask_matches_onnxruntime():
    """3-D Q, K, V over 2 batches, 4 query heads on 2 KV heads, the op's own past_key/past_value (graph
    inputs; the presents are outputs), a float mask over past + new keys, causal, scale and softcap:
    per batch and head `matmul`s of two activations."""
    rng = np.random.default_rng(8)
    mask = rng.standard_normal((3, 5)).astype(np.float32)
    mask[1, 0] = -np.inf
    node = helper.make_node("Attention", ["q", "k", "v", "mask", "pk", "pv"], ["y", "presk", "presv"],
                            q_num_heads=4, kv_num_heads=2, is_causal=1, scale=0.3, softcap=2.5)
    model = _model([node], {"q": [2, 3, 16], "k": [2, 3, 8], "v": [2, 3, 6], "pk": [2, 2, 2, 4], "pv": [2, 2, 2, 3]},
                   ["y", "presk", "presv"], {"mask": mask}, opset=23)
    shapes = {"q": (2, 3, 16), "k": (2, 3, 8), "v": (2, 3, 6), "pk": (2, 2, 2, 4), "pv": (2, 2, 2, 3)}
    _check(model, {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()})


def test_attention_bidirectional_4d_with_its_softmax_scores_matches_onnxruntime():
    rng = np.random.default_rng(9)
    node = helper.make_node("Attention", ["q", "k", "v"], ["y", "", "", "qk"], qk_matmul_output_mode=3)
    shapes = {"q": (2, 2, 3, 4), "k": (2, 2, 5, 4), "v": (2, 2, 5, 6)}
    model = _model([node], {n: list(s) for n, s in shapes.items()}, ["y", "qk"], {}, opset=23)
    _check(model, {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()})


def test_attention_zeroes_a_query_that_sees_no_key():
    """A row the mask hides every key from gives zeros (the ONNX spec), not the NaN of a softmax of -inf."""
    rng = np.random.default_rng(10)
    mask = np.zeros((2, 3), np.float32)
    mask[0] = -np.inf
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"])
    model = _model([node], {"q": [1, 1, 2, 4], "k": [1, 1, 3, 4], "v": [1, 1, 3, 4]}, ["y"], {"mask": mask}, opset=23)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((1, 1, 2, 4), (1, 1, 3, 4), (1, 1, 3, 4)))
    (y,) = CimcBackend.prepare(model).run([q, k, v])
    s = q[0, 0, 1] @ k[0, 0].T / 2.0
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_array_equal(y[0, 0, 0], np.zeros(4, np.float32))
    np.testing.assert_allclose(y[0, 0, 1], p @ v[0, 0], rtol=1e-5, atol=1e-6)


def test_attention_refuses_a_qk_output_the_spec_and_its_reference_disagree_on():
    node = helper.make_node("Attention", ["q", "k", "v"], ["y", "", "", "qk"], qk_matmul_output_mode=1, softcap=2.0)
    model = _model([node], {"q": [1, 1, 2, 4], "k": [1, 1, 2, 4], "v": [1, 1, 2, 4]}, ["y", "qk"], {}, opset=23)
    with pytest.raises(CannotCompile) as e:
        CimcBackend.prepare(model)
    assert [(n.op_type, why) for n, why in e.value.failures] == [
        ("Attention", "qk_matmul_output_mode=1 with softcap=2.0 is not supported (the ONNX spec and its reference "
                      "disagree on what it returns)")]


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding_by_position_ids_matches_onnxruntime(interleaved):
    """3-D input with num_heads, a partial rotary_embedding_dim, caches indexed by arbitrary position ids
    (bound at the first run), interleaved pairs or halves."""
    rng = np.random.default_rng(11)
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin", "pos"], ["y"], num_heads=2,
                            rotary_embedding_dim=4, interleaved=interleaved)
    model = _model([node], {"x": [2, 3, 12], "cos": [9, 2], "sin": [9, 2]}, ["y"], {}, opset=23)
    model.graph.input.append(helper.make_tensor_value_info("pos", TensorProto.INT64, [2, 3]))
    angle = rng.standard_normal((9, 2))
    _check(model, {"x": rng.standard_normal((2, 3, 12)).astype(np.float32), "cos": np.cos(angle).astype(np.float32),
                   "sin": np.sin(angle).astype(np.float32), "pos": np.array([[4, 0, 8], [1, 1, 2]], np.int64)})
