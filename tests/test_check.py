"""`cimc check`: whether a model compiles (frontend only), with its architecture, or every node
that cannot be compiled, grouped by op type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import EXAMPLE, REPO, shared_model
from test_cli import _unsupported_model, assert_user_error
from zoo_fixtures import ZooModel, zoo_models

import cimc

MATRIX = json.loads((REPO / "tests" / "zoo" / "matrix.json").read_text(encoding="utf-8"))

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


def _summary(vocab: int, cache: bool, weights: str, family: str = "Llama", bias: bool = False) -> str:
    kv = "KV cache in the export (4 past inputs)" if cache else "no KV cache in the export"
    features = "RMSNorm, SwiGLU MLP, RoPE, " + ("qkv bias, " if bias else "") + "grouped-query attention"
    return (f"{family}-style decoder ({features}), "
            f"2 layers, 4 heads (2 KV heads, head_dim 16), hidden 64, vocab {vocab}, {kv}; weights: {weights}; "
            "compiles")


def test_check_example(cli) -> None:
    res = cli("check", EXAMPLE)
    assert res.status == 0, res.err
    assert res.err == ""
    assert res.out == f"tiny_llama.onnx: {_summary(512, False, '15 x f32 linears')}\n"
    assert cimc.check_model(EXAMPLE)["family"] == "Llama"


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
    qwen = name.startswith("qwen2")
    assert res.out == f"{name}.onnx: {_summary(*ZOO[name], family='Qwen2' if qwen else 'Llama', bias=qwen)}\n"


#: zoo family -> the family cimc check recognises in it
FAMILY = {"llama": "Llama", "smollm": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
          "phi3": "Phi-3", "gemma": "Gemma", "gemma2": "Gemma2", "gpt2": "GPT-2"}
#: cells whose graph computes another family than its checkpoint (tests/zoo/MANIFEST.md, exporter deviations)
COMPUTES = {"mistral_g_genai_fp32.onnx": "Llama", "mistral_d_genai_int4.onnx": "Llama"}


@pytest.mark.parametrize("model", [m for m in zoo_models() if MATRIX[m.path.name]["verdict"] == "pass"],
                         ids=lambda m: m.path.stem)
def test_check_recognises_the_family_of_every_passing_zoo_cell(model: ZooModel) -> None:
    info = cimc.check_model(model.path)
    assert info["family"] == COMPUTES.get(model.path.name, FAMILY[model.family]), info["features"]


UNSUPPORTED = ["Sin", "Sin", "LpNormalization"]
#: contrib and made-up ops, refused before any lifting
FOREIGN = ["com.microsoft:QAttention", "Frobnicate", "Frobnicate"]


@pytest.mark.parametrize(("ops", "groups"), [
    (UNSUPPORTED, ["Sin x 2 (my_sin, my_sin2): op Sin is not supported on activations -- ",
                   "LpNormalization x 1 (my_lpnorm): op LpNormalization is not supported"]),
    (FOREIGN, ["Frobnicate x 2 (my_frobnicate, my_frobnicate2): not a standard ONNX operator -- ",
               "com.microsoft:QAttention x 1 (my_qattention): operator not supported yet -- "]),
], ids=["unsupported", "foreign"])
def test_check_lists_nodes_grouped(cli, tmp_path: Path, ops: list[str], groups: list[str]) -> None:
    path = tmp_path / "bad.onnx"
    _unsupported_model(path, ops)
    res = cli("check", path)
    assert_user_error(res, [f"{path}: cannot compile 3 node(s) of 2 kind(s)"], groups)
    if ops is FOREIGN:
        assert "a contrib op, not supported yet: export without it" in res.err.splitlines()[2]


def test_check_api_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "sin.onnx"
    _unsupported_model(path, UNSUPPORTED)
    info = cimc.check_model(path)
    assert info["compiles"] is False
    assert [(g["domain"], g["op_type"], g["count"]) for g in info["unsupported"]] == \
        [("", "Sin", 2), ("", "LpNormalization", 1)]
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

    assert "not supported yet" in _hint("operator not supported yet")
    assert "standard ONNX ops" in _hint("not a standard ONNX operator")
    assert "re-export at one of the opsets" in _hint("Add at opset 6 is not supported (cimc converts it at opsets 7+)")
    assert "did not match" in _hint("RoPE idiom: Add of products is not x*cos + rotate_half(x)*sin")
