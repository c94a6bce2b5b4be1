"""The ONNX frontend: unsupported models, bad files, strided views, folding at two sequence lengths.

Unsupported-model tests start from a `cimc.synth` decoder (the graph torch dynamo exports) and
edit it with `onnx.helper`, so exactly one thing is wrong with each model. Numerics, where a test
checks them, are compared with onnxruntime on the same file.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_fixtures import max_err, shared_model
from model_fixtures import ort_logits as ort_run
from onnx import TensorProto, helper, numpy_helper

from cimc.driver import CompileOptions, compile_model
from cimc.frontend import import_onnx
from cimc.frontend import views as V
from cimc.frontend.views import Axis, View, ViewError
from cimc.ir.core import TensorType, Value
from cimc.synth import DecoderConfig, build_decoder_onnx
from isa.diag import CimcError
from runtime.interpreter import simulate

TOL = 1e-4
CFG = DecoderConfig(name="tiny", vocab=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)


# ---- helpers -----------------------------------------------------------------------------------


def synth(tmp_path: Path, cfg: DecoderConfig = CFG, name: str = "base", **kw: object) -> Path:
    return build_decoder_onnx(cfg, tmp_path / f"{name}.onnx", seed=11, **kw)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def node_by_output(model: onnx.ModelProto, value: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if value in n.output)


def consumers(model: onnx.ModelProto, value: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if value in n.input]


def add_init(model: onnx.ModelProto, name: str, value: object, dtype: type = np.float32) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
    return name


def insert_before(model: onnx.ModelProto, user: onnx.NodeProto, value: str, nodes: list[onnx.NodeProto],
                  new_value: str) -> None:
    """Make `user` read `new_value` (computed by `nodes` from `value`) instead of `value`."""
    for i, name in enumerate(user.input):
        if name == value:
            user.input[i] = new_value
    at = list(model.graph.node).index(user)
    for k, n in enumerate(nodes):
        model.graph.node.insert(at + k, n)


def mlp_parts(model: onnx.ModelProto, layer: int) -> dict[str, onnx.NodeProto]:
    """The SwiGLU MLP of one synth layer: sigmoid, the silu*up Mul, down MatMul and residual Add."""
    sigmoid = [n for n in model.graph.node if n.op_type == "Sigmoid"][layer]
    silu = consumers(model, sigmoid.output[0])[0]
    gate_up = consumers(model, silu.output[0])[0]
    down = consumers(model, gate_up.output[0])[0]
    residual = consumers(model, down.output[0])[0]
    return {"sigmoid": sigmoid, "silu": silu, "mul": gate_up, "down": down, "residual": residual}


def attention_parts(model: onnx.ModelProto, layer: int) -> dict[str, onnx.NodeProto]:
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"][layer]
    mask_add = node_by_output(model, softmax.input[0])
    return {"softmax": softmax, "mask_add": mask_add, "mask_where": node_by_output(model, mask_add.input[1])}


def compile_error(path: Path, **opts: object) -> CimcError:
    with pytest.raises(CimcError) as info:
        compile_model(path, CompileOptions(max_seq=8, **opts))
    return info.value


def error_lines(err: CimcError) -> dict[str, str]:
    """node name -> reason, from the detail of an 'cannot compile N node(s)' error."""
    out = {}
    for line in err.detail.splitlines():
        m = re.match(r"\s+(\S+) \[([^\]]+)\]: ?(.*)$", line)
        assert m, f"unexpected detail line {line!r}"
        out[m.group(1)] = m.group(3)
    return out


# ---- unsupported models: one error listing every offending node ------------------------------


def test_unsupported_ops_are_listed_in_one_error(tmp_path: Path, cli) -> None:
    """Sin (for SiLU's sigmoid), LpNormalization (on up_proj) and TopK (on the residual) in layer 0."""
    model = onnx.load(str(synth(tmp_path)))
    mlp = mlp_parts(model, 0)
    mlp["sigmoid"].op_type, mlp["sigmoid"].name = "Sin", "bad_sin"
    up = next(i for i in mlp["mul"].input if i != mlp["silu"].output[0])
    ln = helper.make_node("LpNormalization", [up], ["up_ln"], name="bad_lpnorm", axis=-1)
    insert_before(model, mlp["mul"], up, [ln], "up_ln")
    residual = next(i for i in mlp["residual"].input if i != mlp["down"].output[0])
    k = add_init(model, "topk_k", [CFG.hidden], np.int64)
    topk = helper.make_node("TopK", [residual, k], ["topk_values", "topk_indices"], name="bad_topk", axis=-1)
    insert_before(model, mlp["residual"], residual, [topk], "topk_values")
    path = save(model, tmp_path / "unsupported.onnx")
    ort_run(path, {"input_ids": np.zeros((1, 3), np.int64)})  # a valid model, just not compilable

    err = compile_error(path)
    text = err.render()
    assert str(path) in err.message and "nothing was written" in err.message
    lines = error_lines(err)
    assert set(lines) == {"bad_sin", "bad_lpnorm", "bad_topk"}, text
    assert "cannot compile 3 node(s)" in err.message
    for name, op in (("bad_sin", "Sin"), ("bad_lpnorm", "LpNormalization"), ("bad_topk", "TopK")):
        assert f"{name} [{op}]" in text and op in lines[name]

    out = tmp_path / "unsupported.cimb"
    res = cli("compile", path, "-o", out, "-q", "--max-seq", "8")
    assert res.status == 2 and not out.exists()
    assert "nothing was written" in res.err and "Traceback" not in res.err
    assert all(name in res.err for name in ("bad_sin", "bad_lpnorm", "bad_topk"))


def test_unsupported_op_in_every_layer_is_listed(tmp_path: Path) -> None:
    model = onnx.load(str(synth(tmp_path)))
    names = []
    for layer, sig in enumerate([n for n in model.graph.node if n.op_type == "Sigmoid"]):
        sig.op_type, sig.name = "Sin", f"bad_sin_{layer}"
        names.append(sig.name)
    assert len(names) == CFG.layers
    err = compile_error(save(model, tmp_path / "sin.onnx"))
    assert set(error_lines(err)) == set(names), err.render()


@pytest.mark.parametrize("name", ["llama_d_genai_int4", "qwen2_d_genai_int4"])
def test_shared_genai_exports_are_lifted(name: str) -> None:
    """genai-builder int4 exports lift to the decoder ops: the fused norms to rms_norm, each
    GroupQueryAttention to rope (q and k) + kv_append (k and v) + attention over the export's
    own caches (numerics: tests/test_genai.py)."""
    module, _ = import_onnx(shared_model(name), max_seq=8)
    count = Counter(op.name for op in module.ops)
    assert count["attention"] == 2 and count["rope"] == 4 and count["kv_append"] == 4
    assert count["kv_cache"] == 4 and count["rms_norm"] == 5 and count["embedding"] == 1
    inputs = {op.attrs["name"]: op.attrs.get("assume") for op in module.ops if op.name == "input"}
    assert inputs == {"input_ids": None, "attention_mask": "ones"}


def test_shared_genai_export_lists_every_unsupported_contrib_op(tmp_path: Path) -> None:
    """A contrib op outside the registry is listed with its reason, and only those nodes (the
    genai export's other contrib ops are supported)."""
    model = onnx.load(str(shared_model("llama_d_genai_int4")))
    want = {}
    for n in model.graph.node:
        if n.op_type == "GroupQueryAttention":
            n.op_type = "SparseAttention"
            want[n.name] = "operator not supported yet"
    assert len(want) == 2
    assert error_lines(compile_error(save(model, tmp_path / "sparse.onnx"))) == want


def _zero_mask(model: onnx.ModelProto) -> None:
    where = attention_parts(model, 0)["mask_where"]
    assert where.op_type == "Where"
    where.input[2] = add_init(model, "no_mask_fill", 0.0)  # mask all zeros: every key visible


def _drop_mask(model: onnx.ModelProto) -> None:
    for layer in range(CFG.layers):
        att = attention_parts(model, layer)
        att["softmax"].input[0] = att["mask_add"].input[0]


def _upper_mask(model: onnx.ModelProto) -> None:
    le = node_by_output(model, attention_parts(model, 0)["mask_where"].input[0])
    assert le.op_type == "LessOrEqual"
    le.input[0], le.input[1] = le.input[1], le.input[0]  # anti-causal: attend to the future only


@pytest.mark.parametrize(("edit", "why"), [
    pytest.param(_zero_mask, "is not causal", id="all-zero-mask"),
    pytest.param(_upper_mask, "is not causal", id="anti-causal-mask"),
    pytest.param(_drop_mask, "no causal mask", id="no-mask"),
])
def test_non_causal_attention_is_rejected(tmp_path: Path, edit, why: str) -> None:
    model = onnx.load(str(synth(tmp_path)))
    edit(model)
    path = save(model, tmp_path / "mask.onnx")
    ort_run(path, {"input_ids": np.zeros((1, 4), np.int64)})
    err = compile_error(path)
    lines = error_lines(err)
    attn = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.output[0].startswith("scaled_dot")]
    assert attn[0] in lines, err.render()
    assert "mask" in lines[attn[0]] and why in lines[attn[0]]


def test_every_listed_node_has_a_reason(tmp_path: Path) -> None:
    model = onnx.load(str(synth(tmp_path)))
    _zero_mask(model)
    err = compile_error(save(model, tmp_path / "mask.onnx"))
    empty = [name for name, why in error_lines(err).items() if not why.strip()]
    assert not empty, err.render()


def test_pow_with_unsupported_exponent(tmp_path: Path) -> None:
    model = onnx.load(str(synth(tmp_path)))
    pow_node = next(n for n in model.graph.node if n.op_type == "Pow")
    pow_node.input[1], pow_node.name = add_init(model, "four", 4.0), "bad_pow"
    err = compile_error(save(model, tmp_path / "pow4.onnx"))
    lines = error_lines(err)
    assert list(lines) == ["bad_pow"]
    assert "exponent 4" in lines["bad_pow"]


def _extra_input(model: onnx.ModelProto) -> str:
    model.graph.input.append(helper.make_tensor_value_info("token_types", TensorProto.INT64, [1, "seq", 4]))
    return "token_types"


def _static_ids(model: onnx.ModelProto) -> str:
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_param")
    dim.dim_value = 8
    return "input_ids"


def _float_ids(model: onnx.ModelProto) -> str:
    model.graph.input.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, "seq"]))
    return "scores"


def _int_matrix(model: onnx.ModelProto) -> str:
    model.graph.input.append(helper.make_tensor_value_info("segment", TensorProto.INT64, [1, 4]))
    return "segment"


@pytest.mark.parametrize("edit", [_extra_input, _static_ids, _float_ids, _int_matrix])
def test_graph_input_that_is_not_a_token_sequence(tmp_path: Path, edit) -> None:
    model = onnx.load(str(synth(tmp_path)))
    name = edit(model)
    err = compile_error(save(model, tmp_path / "inputs.onnx"))
    assert f"graph input {name!r}" in err.message and "not a token sequence" in err.message


def test_graph_input_without_shape(tmp_path: Path) -> None:
    model = onnx.load(str(synth(tmp_path)))
    model.graph.input.append(helper.make_tensor_value_info("opaque", TensorProto.FLOAT, None))
    err = compile_error(save(model, tmp_path / "noshape.onnx"))
    assert "'opaque'" in err.message and "no tensor shape" in err.message


# ---- files -------------------------------------------------------------------------------------


def test_not_an_onnx_file(tmp_path: Path, cli) -> None:
    for name, data in (("text.onnx", b"hello, I am not a model\n"), ("noise.onnx", bytes(range(256)) * 8),
                       ("empty.onnx", b"")):
        path = tmp_path / name
        path.write_bytes(data)
        err = compile_error(path)
        assert str(path) in err.message and "not an ONNX model" in err.message
        res = cli("compile", path, "-o", tmp_path / "x.cimb", "-q")
        assert res.status == 2 and "Traceback" not in res.err and not (tmp_path / "x.cimb").exists()


def test_missing_file(tmp_path: Path, cli) -> None:
    path = tmp_path / "nope.onnx"
    err = compile_error(path)
    assert str(path) in err.message and "no such file" in err.message
    assert "no such file" in compile_error(tmp_path).message  # a folder is not a model either
    res = cli("compile", path, "-o", tmp_path / "x.cimb", "-q")
    assert res.status == 2 and "Traceback" not in res.err


def _external(tmp_path: Path, cfg: DecoderConfig = CFG) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    return synth(folder, cfg, name="m", external_data=True)


def _edit_external(path: Path, key: str, value: str | None) -> str:
    """Set (or with None remove) one external_data key of the first external initializer."""
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    entries = {e.key: e.value for e in tensor.external_data}
    if value is None:
        entries.pop(key)
    else:
        entries[key] = value
    del tensor.external_data[:]
    for k, v in entries.items():
        tensor.external_data.add(key=k, value=v)
    path.write_bytes(model.SerializeToString())
    return tensor.name


def _check_cli(cli, path: Path, *needles: str) -> None:
    out = path.with_suffix(".cimb")
    res = cli("compile", path, "-o", out, "-q", "--max-seq", "8")
    assert res.status == 2, res.err
    assert "Traceback" not in res.err and "internal error" not in res.err
    assert not out.exists()
    for needle in needles:
        assert needle in res.err


def test_external_data_file_missing(tmp_path: Path, cli) -> None:
    path = _external(tmp_path)
    path.with_name("m.onnx.data").unlink()
    with pytest.raises(CimcError, match=r"initializer '[^']+': external data file 'm\.onnx\.data' is missing"):
        import_onnx(path, max_seq=8)  # checked when the model is opened
    _check_cli(cli, path, "m.onnx.data", "missing")


@pytest.mark.parametrize("keep", [0.5, -1], ids=["half", "one-byte-short"])
def test_external_data_file_truncated(tmp_path: Path, cli, keep: float) -> None:
    path = _external(tmp_path)
    data = path.with_name("m.onnx.data")
    raw = data.read_bytes()
    data.write_bytes(raw[: int(len(raw) * keep)] if keep > 0 else raw[:keep])
    truncated = r"initializer '[^']+': external data file 'm\.onnx\.data' is truncated \(needs bytes"
    with pytest.raises(CimcError, match=truncated):
        import_onnx(path, max_seq=8)  # checked when the model is opened
    _check_cli(cli, path, "m.onnx.data", "truncated")


@pytest.mark.parametrize("location", ["../x.bin", "/etc/hostname", "sub/../../x.bin"])
def test_external_data_outside_model_folder(tmp_path: Path, cli, location: str) -> None:
    path = _external(tmp_path)
    (tmp_path / "x.bin").write_bytes(bytes(1 << 20))  # exists, big enough: must still be refused
    name = _edit_external(path, "location", location)
    with pytest.raises(CimcError, match="points outside the model's folder") as info:
        import_onnx(path, max_seq=8)  # checked when the model is opened
    assert repr(name) in info.value.message and location in info.value.message
    _check_cli(cli, path, name, "outside the model's folder")


def test_external_data_symlink_leaving_model_folder(tmp_path: Path) -> None:
    path = _external(tmp_path)
    (tmp_path / "x.bin").write_bytes(bytes(1 << 20))
    path.with_name("link.bin").symlink_to(tmp_path / "x.bin")
    _edit_external(path, "location", "link.bin")
    with pytest.raises(CimcError, match="points outside the model's folder"):
        import_onnx(path, max_seq=8)  # checked when the model is opened


def test_external_data_wrong_length(tmp_path: Path) -> None:
    path = _external(tmp_path)
    name = _edit_external(path, "length", "12")
    wrong = rf"initializer {re.escape(repr(name))} \('m\.onnx\.data'\) has offset 0 and length 12; expected a " \
        r"length of \d+"
    with pytest.raises(CimcError, match=wrong):
        import_onnx(path, max_seq=8)  # checked when the model is opened


@pytest.mark.parametrize(("key", "value"), [("length", "abc"), ("offset", "-4096"), ("offset", "x")])
def test_external_data_malformed_entries(tmp_path: Path, cli, key: str, value: str) -> None:
    path = _external(tmp_path)
    name = _edit_external(path, key, value)
    _check_cli(cli, path, name)


def test_external_data_without_location(tmp_path: Path, cli) -> None:
    # vocab 16 x hidden 64 floats = 4096 bytes: the first external tensor fits the folder's st_size
    path = _external(tmp_path, DecoderConfig(name="t", vocab=16, hidden=64, layers=1, intermediate=64))
    name = _edit_external(path, "location", None)
    with pytest.raises(CimcError, match=re.escape(repr(name))):
        import_onnx(path, max_seq=8)  # checked when the model is opened
    _check_cli(cli, path, name)


# ---- views -------------------------------------------------------------------------------------


def base_value(rows: int, cols: int) -> Value:
    return Value(TensorType("f32", (rows, cols)))


def materialize(v: View) -> np.ndarray:
    """The flat base index (row * cols + col) each element of the view reads."""
    cols = int(v.base.type.shape[1])
    idx = np.indices(v.shape, dtype=np.int64)
    row = np.full(v.shape, v.r0, np.int64)
    col = np.full(v.shape, v.c0, np.int64)
    for a, ax in enumerate(v.axes):
        row = row + (idx[a] // ax.rep) * ax.rs
        col = col + (idx[a] // ax.rep) * ax.cs
    return row * cols + col


def test_view_canonical() -> None:
    v = V.canonical(base_value(8, 64), 8, 3)
    assert v.shape == (1, 8, 64)
    assert v.axes == (Axis(1), Axis(8, 1, 0), Axis(64, 0, 1))
    assert V.is_canonical(v, 8)
    np.testing.assert_array_equal(materialize(v), np.arange(8 * 64).reshape(1, 8, 64))
    with pytest.raises(ViewError):
        V.canonical(base_value(8, 64), 8, 1)


def test_view_head_split_reshape_and_transpose() -> None:
    """[1, seq, H*hd] -> Reshape [1, seq, H, hd] -> Transpose [0, 2, 1, 3] -> [1, H, seq, hd]."""
    seq, heads, hd = 8, 4, 16
    v = V.reshape(V.canonical(base_value(seq, heads * hd), seq, 3), (1, seq, heads, hd))
    assert v.axes == (Axis(1), Axis(seq, 1, 0), Axis(heads, 0, hd), Axis(hd, 0, 1))
    t = V.transpose(v, [0, 2, 1, 3])
    assert t.shape == (1, heads, seq, hd) and not V.is_canonical(t, seq)
    ref = np.arange(seq * heads * hd).reshape(1, seq, heads, hd).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(materialize(t), ref)
    # and back: Transpose + Reshape [1, seq, H*hd] is the canonical view again
    back = V.reshape(V.transpose(t, [0, 2, 1, 3]), (1, seq, heads * hd))
    assert V.is_canonical(back, seq)


def test_view_unsqueeze_squeeze() -> None:
    v = V.canonical(base_value(4, 6), 4, 2)
    u = V.unsqueeze(v, [0, -1])
    assert u.shape == (1, 4, 6, 1)
    np.testing.assert_array_equal(materialize(u), np.arange(24).reshape(1, 4, 6, 1))
    assert V.squeeze(u, [0, 3]).axes == v.axes
    assert V.squeeze(u, None).axes == v.axes
    with pytest.raises(ViewError):
        V.squeeze(u, [1])


def test_view_expand_is_broadcast() -> None:
    v = V.unsqueeze(V.canonical(base_value(4, 6), 4, 2), [1])  # [4, 1, 6]
    e = V.expand(v, (2, 4, 3, 6))
    assert e.shape == (2, 4, 3, 6)
    assert e.axes[0].broadcast and e.axes[2].broadcast
    np.testing.assert_array_equal(materialize(e), np.broadcast_to(np.arange(24).reshape(4, 1, 6), (2, 4, 3, 6)))
    with pytest.raises(ViewError):
        V.expand(v, (4, 1, 3))  # an axis of size 6 cannot become 3
    with pytest.raises(ViewError):
        V.expand(v, (8, 1, 6))


def test_view_slice() -> None:
    seq, hd = 8, 16
    v = V.reshape(V.canonical(base_value(seq, 2 * hd), seq, 3), (1, seq, 2, hd))
    half = V.slice_axis(v, 3, hd // 2, hd // 2)  # rotate_half's second half
    assert (half.r0, half.c0, half.shape) == (0, hd // 2, (1, seq, 2, hd // 2))
    rows = V.slice_axis(v, 1, 3, 4)
    assert (rows.r0, rows.c0) == (3, 0)
    full = np.arange(seq * 2 * hd).reshape(1, seq, 2, hd)
    np.testing.assert_array_equal(materialize(half), full[..., hd // 2:])
    np.testing.assert_array_equal(materialize(rows), full[:, 3:7])


def _gqa_view(seq: int, kvh: int, group: int, hd: int) -> tuple[View, np.ndarray]:
    """k as exported: [1, seq, KVH*hd] -> [1, KVH, seq, hd] -> Unsqueeze(2) -> Expand [1, KVH, G, seq, hd]."""
    v = V.reshape(V.canonical(base_value(seq, kvh * hd), seq, 3), (1, seq, kvh, hd))
    v = V.expand(V.unsqueeze(V.transpose(v, [0, 2, 1, 3]), [2]), (1, kvh, group, seq, hd))
    ref = np.arange(seq * kvh * hd).reshape(1, seq, kvh, hd).transpose(0, 2, 1, 3)[:, :, None]
    return v, np.broadcast_to(ref, (1, kvh, group, seq, hd))


@pytest.mark.parametrize(("kvh", "group"), [(2, 2), (2, 4), (1, 4), (3, 2)])
def test_view_gqa_merge(kvh: int, group: int) -> None:
    seq, hd = 8, 16
    v, ref = _gqa_view(seq, kvh, group, hd)
    merged = V.reshape(v, (1, kvh * group, seq, hd))
    if kvh > 1:  # KVH*G heads, each KV head repeated G times
        assert merged.axes[1] == Axis(kvh * group, 0, hd, group)
    else:  # one KV head: the head axis is a plain broadcast
        assert merged.axes[1] == Axis(group)
    assert merged.axes[2:] == (Axis(seq, 1, 0), Axis(hd, 0, 1))
    np.testing.assert_array_equal(materialize(merged), ref.reshape(1, kvh * group, seq, hd))
    if kvh > 1:
        with pytest.raises(ViewError, match="repeated"):
            V.slice_axis(merged, 1, 0, 1)


@pytest.mark.parametrize("split", [(2, 6), (4, 3), (6, 2), (12, 1)])
def test_view_split_of_repeated_axis(split: tuple[int, int]) -> None:
    """12 heads over 2 KV heads (G = 6) re-split into [a, b]: strided whenever (b*i + j) // 6 is."""
    seq, hd = 4, 8
    v, ref = _gqa_view(seq, 2, 6, hd)
    merged = V.reshape(v, (1, 12, seq, hd))
    shape = (1, *split, seq, hd)
    np.testing.assert_array_equal(materialize(V.reshape(merged, shape)), ref.reshape(shape))


def test_view_uneven_split_of_repeated_axis() -> None:
    v, _ = _gqa_view(4, 2, 6, 8)
    merged = V.reshape(v, (1, 12, 4, 8))
    with pytest.raises(ViewError, match="unevenly"):
        V.reshape(merged, (1, 3, 4, 4, 8))  # kv head (4a + b) // 6 is not a strided function of a, b


def test_view_gqa_split_and_merge_round_trip() -> None:
    seq, hd = 4, 8
    v, ref = _gqa_view(seq, 2, 3, hd)
    merged = V.reshape(v, (1, 6, seq, hd))
    again = V.reshape(V.reshape(merged, (1, 2, 3, seq, hd)), (1, 6, seq, hd))
    np.testing.assert_array_equal(materialize(again), ref.reshape(1, 6, seq, hd))


def test_view_invalid_reshapes() -> None:
    seq, heads, hd = 8, 4, 16
    v = V.canonical(base_value(seq, heads * hd), seq, 3)
    with pytest.raises(ViewError, match="element count"):
        V.reshape(v, (1, seq, heads * hd + 1))
    t = V.transpose(V.reshape(v, (1, seq, heads, hd)), [0, 2, 1, 3])  # [1, H, seq, hd]
    with pytest.raises(ViewError, match="not contiguous"):
        V.reshape(t, (1, heads * seq, hd))  # merging heads with tokens is not a strided view
    with pytest.raises(ViewError, match="not contiguous"):
        V.reshape(V.transpose(v, [0, 2, 1]), (1, seq * heads * hd))


def test_view_random_layout_chains_match_numpy() -> None:
    """Whenever a chain of layout ops is accepted, the view reads exactly what numpy's ops read."""
    rnd = random.Random(1234)
    accepted = 0
    for _ in range(1500):
        rows, cols = rnd.choice([4, 6, 8]), rnd.choice([4, 6, 12, 16])
        v = V.canonical(base_value(rows, cols), rows, rnd.choice([2, 3]))
        ref = np.arange(rows * cols).reshape(v.shape)
        try:
            for _ in range(rnd.randint(1, 5)):
                v, ref = _random_layout_op(rnd, v, ref)
                np.testing.assert_array_equal(materialize(v), ref)
        except ViewError:
            continue
        accepted += 1
    assert accepted > 800


def _random_layout_op(rnd: random.Random, v: View, ref: np.ndarray) -> tuple[View, np.ndarray]:
    shape = list(v.shape)
    kind = rnd.choice(["merge", "split", "transpose", "unsqueeze", "expand", "slice"])
    if kind == "merge" and len(shape) >= 2:
        i = rnd.randrange(len(shape) - 1)
        new = (*shape[:i], shape[i] * shape[i + 1], *shape[i + 2:])
        return V.reshape(v, new), ref.reshape(new)
    splittable = [(i, d) for i, s in enumerate(shape) for d in range(2, s) if s % d == 0]
    if kind == "split" and splittable:
        i, d = rnd.choice(splittable)
        new = (*shape[:i], shape[i] // d, d, *shape[i + 1:])
        return V.reshape(v, new), ref.reshape(new)
    if kind == "transpose":
        perm = list(range(len(shape)))
        rnd.shuffle(perm)
        return V.transpose(v, perm), ref.transpose(perm)
    ones = [i for i, s in enumerate(shape) if s == 1]
    if kind == "expand" and ones:
        new = list(shape)
        new[rnd.choice(ones)] = rnd.choice([2, 3])
        return V.expand(v, tuple(new)), np.broadcast_to(ref, new)
    wide = [i for i, s in enumerate(shape) if s > 1]
    if kind == "slice" and wide:
        i = rnd.choice(wide)
        start = rnd.randrange(shape[i])
        length = rnd.randint(1, shape[i] - start)
        idx = [slice(None)] * len(shape)
        idx[i] = slice(start, start + length)
        return V.slice_axis(v, i, start, length), ref[tuple(idx)]
    a = rnd.randrange(len(shape) + 1)
    return V.unsqueeze(v, [a]), np.expand_dims(ref, a)


# ---- fold: two bindings of the sequence length -------------------------------------------------


def _positions_over_length(model: onnx.ModelProto) -> None:
    """RoPE positions divided by the sequence length: row i of the cos/sin tables depends on seq."""
    cast = next(n for n in model.graph.node if n.op_type == "Cast" and n.output[0] == "_to_copy")
    seq_f = helper.make_node("Cast", ["sym_size_int"], ["seq_f"], name="seq_to_float", to=TensorProto.FLOAT)
    div = helper.make_node("Div", ["_to_copy", "seq_f"], ["pos_over_len"], name="positions_over_length")
    for user in consumers(model, cast.output[0]):
        insert_before(model, user, "_to_copy", [seq_f, div], "pos_over_len")


def _hidden_plus(model: onnx.ModelProto, divide_by_length: bool) -> None:
    """embedding + table[seq, 1], table = arange / seq (length-dependent) or arange * 0.01 (prefix-stable)."""
    emb = next(n for n in model.graph.node if n.op_type == "Gather")
    user = consumers(model, emb.output[0])[0]
    nodes = [helper.make_node("Cast", ["arange"], ["arange_f"], name="arange_f", to=TensorProto.FLOAT)]
    if divide_by_length:
        nodes += [helper.make_node("Cast", ["sym_size_int"], ["seq_f"], name="seq_to_float", to=TensorProto.FLOAT),
                  helper.make_node("Div", ["arange_f", "seq_f"], ["table"], name="frac_table")]
    else:
        nodes += [helper.make_node("Mul", ["arange_f", add_init(model, "step", 0.01)], ["table"], name="frac_table")]
    nodes += [helper.make_node("Unsqueeze", ["table", add_init(model, "last", [-1], np.int64)], ["table2"],
                               name="table_unsqueeze"),
              helper.make_node("Add", [emb.output[0], "table2"], ["emb_plus"], name="add_table")]
    for u in consumers(model, emb.output[0]):
        insert_before(model, u, emb.output[0], nodes if u is user else [], "emb_plus")


def test_length_dependent_table_is_rejected(tmp_path: Path) -> None:
    model = onnx.load(str(synth(tmp_path)))
    _hidden_plus(model, divide_by_length=True)
    path = save(model, tmp_path / "frac.onnx")
    ort_run(path, {"input_ids": np.zeros((1, 5), np.int64)})
    err = compile_error(path)
    lines = error_lines(err)
    assert list(lines) == ["add_table"]
    assert "changes with the sequence length" in lines["add_table"]


def test_prefix_stable_table_is_accepted(tmp_path: Path) -> None:
    """The same graph with arange * 0.01 (row i independent of the length) compiles and matches ORT."""
    model = onnx.load(str(synth(tmp_path)))
    _hidden_plus(model, divide_by_length=False)
    path = save(model, tmp_path / "stable.onnx")
    program = compile_model(path, CompileOptions(max_seq=12))
    for n in (1, 7, 12):
        ids = np.random.default_rng(n).integers(0, CFG.vocab, (1, n))
        assert max_err(simulate(program, {"input_ids": ids}).outputs["logits"],
                       ort_run(path, {"input_ids": ids})) <= TOL


def test_length_dependent_rope_table_is_rejected_clearly(tmp_path: Path) -> None:
    """A valid model (ORT runs it) whose RoPE table depends on the length: one error naming the node."""
    model = onnx.load(str(synth(tmp_path)))
    _positions_over_length(model)
    path = save(model, tmp_path / "rope_frac.onnx")
    ort_run(path, {"input_ids": np.zeros((1, 5), np.int64)})
    err = compile_error(path)
    assert "changes with the sequence length" in err.render()
    assert "nothing was written" in err.message
    assert any(n.name.startswith("node_add") for n in model.graph.node if n.name in error_lines(err))


def _embeds_model(tmp_path: Path, hidden_dim: str | int) -> Path:
    """The synth decoder fed `inputs_embeds` [1, seq, hidden_dim] instead of token ids."""
    cfg = DecoderConfig(name="embeds", vocab=256, hidden=64, layers=1, heads=4, kv_heads=2, intermediate=96)
    model = onnx.load(str(synth(tmp_path, cfg)))
    g = model.graph
    gather = next(n for n in g.node if n.op_type == "Gather")
    table = gather.input[0]
    g.node.remove(gather)
    g.initializer.remove(next(t for t in g.initializer if t.name == table))
    shape = next(n for n in g.node if n.op_type == "Shape" and n.input[0] == "input_ids")
    shape.input[0] = gather.output[0]
    del g.input[:]
    g.input.append(helper.make_tensor_value_info(gather.output[0], TensorProto.FLOAT, [1, "seq", hidden_dim]))
    return save(model, tmp_path / "embeds.onnx")


def test_other_dynamic_dims_need_binding(tmp_path: Path, cli) -> None:
    path = _embeds_model(tmp_path, "hidden_dim")
    err = compile_error(path)
    assert "'embedding'" in err.message and "axis 2" in err.message and "--dim hidden_dim=N" in err.message
    res = cli("compile", path, "-o", tmp_path / "e.cimb", "-q", "--max-seq", "8")
    assert res.status == 2 and "--dim hidden_dim=N" in res.err

    program = compile_model(path, CompileOptions(max_seq=8, dims={"hidden_dim": 64}))
    rng = np.random.default_rng(0)
    for n in (1, 8):
        x = rng.standard_normal((1, n, 64)).astype(np.float32)
        got = simulate(program, {"embedding": x}).outputs["logits"]
        assert max_err(got, ort_run(path, {"embedding": x})) <= TOL


def test_dynamic_batch_axis_binds_to_one(tmp_path: Path) -> None:
    model = onnx.load(str(synth(tmp_path)))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_value")
    dim.dim_param = "batch"
    path = save(model, tmp_path / "batch.onnx")
    program = compile_model(path, CompileOptions(max_seq=8))
    ids = np.random.default_rng(3).integers(0, CFG.vocab, (1, 6))
    assert max_err(simulate(program, {"input_ids": ids}).outputs["logits"],
                   ort_run(path, {"input_ids": ids})) <= TOL


def test_max_seq_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(CimcError, match="at least 1"):
        import_onnx(synth(tmp_path), max_seq=0)


@pytest.mark.parametrize("max_seq", [2, 3])
def test_small_max_seq(tmp_path: Path, max_seq: int) -> None:
    path = synth(tmp_path)
    program = compile_model(path, CompileOptions(max_seq=max_seq))
    for n in range(1, max_seq + 1):
        ids = np.random.default_rng(n).integers(0, CFG.vocab, (1, n))
        assert max_err(simulate(program, {"input_ids": ids}).outputs["logits"],
                       ort_run(path, {"input_ids": ids})) <= TOL




def test_max_seq_one_synth(tmp_path: Path) -> None:
    path = synth(tmp_path)
    program = compile_model(path, CompileOptions(max_seq=1))
    ids = np.array([[42]], np.int64)
    assert max_err(simulate(program, {"input_ids": ids}).outputs["logits"],
                   ort_run(path, {"input_ids": ids})) <= TOL


def test_max_seq_one_shared_llama() -> None:
    path = shared_model("llama_a_dynamo")
    program = compile_model(path, CompileOptions(max_seq=1))
    ids = np.array([[7]], np.int64)
    assert max_err(simulate(program, {"input_ids": ids}).outputs["logits"],
                   ort_run(path, {"input_ids": ids})) <= TOL


@pytest.mark.parametrize("name", ["llama_a_dynamo", "qwen2_c_optimum_kv"])
def test_long_context_costs_no_more_than_its_position_tables(name: str) -> None:
    """Position tables are folded at max_ctx rows; masks and the rest of the graph are not (a
    16k-position [seq, seq] mask would take gigabytes). Compare with a short context on the
    same machine: lifting at max_ctx 16384 stays within a few times max_ctx 32."""
    import time
    path = shared_model(name)
    took = {}
    for ctx in (32, 16384):
        start = time.perf_counter()
        module, _ = import_onnx(path, max_seq=8, max_ctx=ctx)
        took[ctx] = time.perf_counter() - start
        assert module.attrs["max_ctx"] == ctx
    assert took[16384] < 4 * took[32] + 0.5, took
