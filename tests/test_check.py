"""`cimc check`: whether a model compiles (frontend only), with its architecture, or every node
that cannot be compiled, grouped by op type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from model_fixtures import EXAMPLE, shared_model
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_user_error

import cimc

# the shared zoo's known config (MANIFEST.md): 2 layers, 4 heads, 2 KV heads, head_dim 16, hidden 64
ZOO = {  # name: (vocab, KV cache in the export, weights summary)
    "llama_a_dynamo": (320, False, "15 x f32 linears"),
    "llama_c_optimum_kv": (320, True, "15 x f32 linears"),
    "llama_d_genai_int4": (320, True, "15 x int4 matmulnbits (group 32, act i8) linears"),
    "llama_e_int4_rtn": (320, False, "15 x int4 matmulnbits (group 32, act f32) linears"),
    "qwen2_a_dynamo": (384, False, "15 x f32 linears"),
    "qwen2_c_optimum_kv": (384, True, "15 x f32 linears"),
    "qwen2_d_genai_int4": (384, True, "15 x int4 matmulnbits (group 32, act i8) linears"),
    "qwen2_e_int4_rtn": (384, False, "15 linears: 14 x int4 matmulnbits (group 32, act f32), 1 x f32"),
}


def _summary(vocab: int, cache: bool, weights: str) -> str:
    kv = "KV cache in the export (4 past inputs)" if cache else "no KV cache in the export"
    return (f"2 layers, 4 heads (2 KV heads, head_dim 16), hidden 64, vocab {vocab}, {kv}; weights: {weights}; "
            "compiles")


def test_check_example(cli) -> None:
    res = cli("check", EXAMPLE)
    assert res.status == 0, res.err
    assert res.err == ""
    assert res.out == f"tiny_llama.onnx: {_summary(512, False, '15 x f32 linears')}\n"


def test_check_api_example() -> None:
    info = cimc.check_model(EXAMPLE)
    assert info["compiles"] is True
    assert (info["layers"], info["heads"], info["kv_heads"], info["head_dim"]) == (2, 4, 2, 16)
    assert (info["hidden"], info["vocab"], info["kv_cache"]) == (64, 512, False)
    assert info["linears"] == 15 and info["weights"] == {"f32": 15}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_check_shared_models(cli, name: str) -> None:
    path = shared_model(name)
    res = cli("check", path)
    assert res.status == 0, res.err
    assert res.out == f"{name}.onnx: {_summary(*ZOO[name])}\n"


def _unsupported(path: Path, foreign: bool) -> None:
    """input_ids -> embedding -> two Erf and a LayerNormalization (with `foreign`: a contrib
    FastGelu and a made-up default-domain op instead, which are refused before any lifting)
    (summed) -> MatMul -> logits."""
    vocab, hidden = 32, 16
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32), "head"),
             numpy_helper.from_array(np.ones(hidden, np.float32), "ln_scale"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "ln_bias")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed")]
    if foreign:
        nodes += [helper.make_node("FastGelu", ["h"], ["a"], name="my_gelu", domain="com.microsoft"),
                  helper.make_node("Frobnicate", ["h"], ["b"], name="my_frob"),
                  helper.make_node("Frobnicate", ["h"], ["c"], name="my_frob2")]
    else:
        nodes += [helper.make_node("Erf", ["h"], ["a"], name="erf_a"),
                  helper.make_node("Erf", ["h"], ["b"], name="erf_b"),
                  helper.make_node("LayerNormalization", ["h", "ln_scale", "ln_bias"], ["c"], name="my_ln",
                                   axis=-1)]
    nodes += [helper.make_node("Add", ["a", "b"], ["ab"], name="add1"),
              helper.make_node("Add", ["ab", "c"], ["s"], name="add2"),
              helper.make_node("MatMul", ["s", "head"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "handmade",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_check_unsupported_ops_grouped(cli, tmp_path: Path) -> None:
    path = tmp_path / "erf.onnx"
    _unsupported(path, foreign=False)
    res = cli("check", path)
    assert_user_error(res, [f"{path}: cannot compile 3 node(s) of 2 kind(s)"],
                      ["Erf x 2 (erf_a, erf_b): op Erf is not supported on activations -- ",
                       "LayerNormalization x 1 (my_ln): op LayerNormalization is not supported"])


def test_check_foreign_ops_grouped(cli, tmp_path: Path) -> None:
    path = tmp_path / "foreign.onnx"
    _unsupported(path, foreign=True)
    res = cli("check", path)
    assert_user_error(res, [f"{path}: cannot compile 3 node(s) of 2 kind(s)"],
                      ["Frobnicate x 2 (my_frob, my_frob2): not a standard ONNX operator -- ",
                       "com.microsoft:FastGelu x 1 (my_gelu): operator not supported yet -- "])
    assert "a contrib op, not supported yet: export without it" in res.err.splitlines()[2]


def test_check_api_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "erf.onnx"
    _unsupported(path, foreign=False)
    info = cimc.check_model(path)
    assert info["compiles"] is False
    assert [(g["domain"], g["op_type"], g["count"]) for g in info["unsupported"]] == \
        [("", "Erf", 2), ("", "LayerNormalization", 1)]
    assert all(g["reason"] and g["hint"] for g in info["unsupported"])


@pytest.mark.parametrize("content, needle", [
    (None, "no such file"),
    (np.random.default_rng(0).bytes(4096), "not an ONNX model"),
], ids=["missing", "random-bytes"])
def test_check_bad_file(cli, tmp_path: Path, content: bytes | None, needle: str) -> None:
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    assert_user_error(cli("check", path), [f"{path}: ", needle])


def test_check_refuses_ir_dump(cli, tmp_path: Path) -> None:
    path = tmp_path / "model.cimir"
    path.write_text("cimir 1\n")
    assert_user_error(cli("check", path), [f"{path}: ", "takes an .onnx model"])


def test_check_hints() -> None:
    from cimc.driver import _hint

    assert "not supported yet" in _hint("com.microsoft", "operator not supported yet")
    assert "standard ONNX ops" in _hint("", "not a standard ONNX operator")
    assert "did not match" in _hint("", "RoPE idiom: Add of products is not x*cos + rotate_half(x)*sin")
