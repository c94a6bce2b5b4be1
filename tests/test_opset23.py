"""Opset-23 operators exporters emit (RMSNormalization, Attention, RotaryEmbedding) and the
onnxruntime contrib ops onnxscript's fusions make of the same graphs (RotaryEmbedding,
MultiHeadAttention, FusedMatMul): tiny graphs compiled, simulated and compared with onnxruntime on
the same file; the forms cimc does not take are refused with the reason, naming the attribute and value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from graph_fixtures import matches_onnxruntime, refusals, xy_model
from onnx import TensorProto, helper, numpy_helper

from cimc.accuracy import measure_accuracy
from cimc.driver import CompileOptions, compile_model
from cimc.frontend import import_onnx
from cimc.frontend.model import CannotCompile
from cimc.frontend.ops.linear import FUSED_REFUSED
from runtime.generate import generate
from runtime.interpreter import Session

D = 16


def rms_model(path: Path, **attrs: object) -> Path:
    """x [1, seq, D] -> RMSNormalization(x, scale) -> y, at opset 23."""
    scale = np.random.default_rng(0).uniform(0.5, 1.5, D).astype(np.float32)
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="rms", **attrs)
    return xy_model(path, [node], {"scale": scale}, cols=D, opset=23)


@pytest.mark.parametrize("attrs", [{}, {"epsilon": 0.3, "axis": 2}])
def test_rms_normalization_matches_onnxruntime(attrs: dict, tmp_path: Path) -> None:
    """A large epsilon shows whether it is honoured."""
    path = rms_model(tmp_path / "rms.onnx", **attrs)
    module, _ = import_onnx(path, max_seq=8)
    assert [op.attrs["eps"] for op in module.walk("rms_norm")] == [pytest.approx(attrs.get("epsilon", 1e-5))]
    matches_onnxruntime(path, np.random.default_rng(1).standard_normal((1, 5, D)).astype(np.float32))


@pytest.mark.parametrize(("attrs", "needle"), [({"axis": 1}, "axis=1"), ({"stash_type": 10}, "stash_type=10")])
def test_rms_normalization_forms_not_taken_are_refused(attrs: dict, needle: str, tmp_path: Path) -> None:
    reasons = refusals(rms_model(tmp_path / "rms.onnx", **attrs))
    assert list(reasons) == ["rms"] and needle in reasons["rms"], reasons


# ---- Attention, RotaryEmbedding (opset 23), com.microsoft RotaryEmbedding and MultiHeadAttention ----------------
VOCAB, HID, HEADS, KVH, HD = 32, 32, 4, 2, 8
PROMPT = [3, 17, 5, 29, 11, 8]
NEW = 4


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


class Graph:
    """A tiny decoder (embedding, q/k/v projections, one attention, an output projection) built
    node by node, so each test swaps in the attention and rotary form it checks."""

    def __init__(self, past: bool = False) -> None:
        rng = np.random.default_rng(7)
        self.nodes: list[onnx.NodeProto] = []
        self.inits = [_init(n, rng.standard_normal(s).astype(np.float32) * 0.3) for n, s in
                      (("emb", (VOCAB, HID)), ("wq", (HID, HEADS * HD)), ("wk", (HID, KVH * HD)),
                       ("wv", (HID, KVH * HD)), ("wo", (HEADS * HD, VOCAB)))]
        self.inits += [_init("i0", np.array([0])), _init("i1", np.array([1])), _init("i2", np.array([2])),
                       _init("s0", np.array(0)), _init("s1", np.array(1))]
        self.inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])]
        self.outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", VOCAB])]
        self.past = past
        self.add("Gather", ["emb", "input_ids"], "x", axis=0)
        for w in ("q", "k", "v"):
            self.add("MatMul", ["x", f"w{w}"], f"{w}3")
        self.add("Shape", ["input_ids"], "ids_shape")
        self.add("Gather", ["ids_shape", "s1"], "seq_len", axis=0)  # scalar
        if past:
            for kv in ("key", "value"):  # the names the reference driver (cimc.accuracy) feeds
                self.inputs.append(helper.make_tensor_value_info(f"past_key_values.0.{kv}", TensorProto.FLOAT,
                                                                 [1, KVH, "past", HD]))
                self.outputs.append(helper.make_tensor_value_info(f"present.0.{kv}", TensorProto.FLOAT,
                                                                  [1, KVH, "total", HD]))
            self.add("Shape", ["past_key_values.0.key"], "pk_shape")
            self.add("Gather", ["pk_shape", "i2"], "past_len1", axis=0)
            self.add("Squeeze", ["past_len1", "i0"], "past_len")
        else:
            self.inits.append(_init("past_len", np.array(0)))
        self.add("Add", ["past_len", "seq_len"], "end")
        self.add("Range", ["past_len", "end", "s1"], "pos")  # [seq] positions
        self.add("Unsqueeze", ["pos", "i0"], "position_ids")  # [1, seq]

    def add(self, op: str, inputs: list[str], out: str | list[str], domain: str = "", **attrs: object) -> None:
        outs = [out] if isinstance(out, str) else out
        self.nodes.append(helper.make_node(op, inputs, outs, name=outs[0] or op, domain=domain, **attrs))

    def heads(self, src: str, heads: int, out: str) -> None:
        """[1, seq, heads*HD] -> [1, heads, seq, HD]."""
        self.inits.append(_init(f"{out}_shape", np.array([1, -1, heads, HD])))
        self.add("Reshape", [src, f"{out}_shape"], f"{out}_r")
        self.add("Transpose", [f"{out}_r"], out, perm=[0, 2, 1, 3])

    def merge(self, src: str, out: str) -> None:
        """[1, HEADS, seq, HD] -> [1, seq, HEADS*HD]."""
        self.add("Transpose", [src], f"{out}_t", perm=[0, 2, 1, 3])
        self.inits.append(_init(f"{out}_shape", np.array([1, -1, HEADS * HD])))
        self.add("Reshape", [f"{out}_t", f"{out}_shape"], out)

    def rope_tables(self, rd: int, by_position: bool) -> tuple[str, str]:
        """cos/sin caches: [positions, rd/2] initializers, or [1, seq, rd/2] computed from the positions."""
        inv = 1.0 / (10000 ** (np.arange(0, rd, 2) / rd))
        if by_position:
            ang = np.arange(64)[:, None] * inv[None, :]
            self.inits += [_init("cos_cache", np.cos(ang).astype(np.float32)),
                           _init("sin_cache", np.sin(ang).astype(np.float32))]
            return "cos_cache", "sin_cache"
        self.inits.append(_init("inv_freq", inv[None, :].astype(np.float32)))
        self.add("Cast", ["pos"], "posf", to=TensorProto.FLOAT)
        self.add("Unsqueeze", ["posf", "i1"], "pos_col")  # [seq, 1]
        self.add("MatMul", ["pos_col", "inv_freq"], "ang")  # [seq, rd/2]
        for f in ("Cos", "Sin"):
            self.add(f, ["ang"], f"{f.lower()}_2d")
            self.add("Unsqueeze", [f"{f.lower()}_2d", "i0"], f"{f.lower()}_seq")  # [1, seq, rd/2]
        return "cos_seq", "sin_seq"

    def causal_mask(self, window: int = 0, kind: str = "bool") -> str:
        """[seq, past+seq] causal mask (maybe a sliding window of `window` keys), bool or additive float."""
        self.add("Range", ["s0", "end", "s1"], "keys")
        self.add("Unsqueeze", ["pos", "i1"], "q_col")
        self.add("Unsqueeze", ["keys", "i0"], "k_row")
        self.add("LessOrEqual", ["k_row", "q_col"], "seen")
        mask = "seen"
        if window:
            self.inits.append(_init("win", np.array(window)))
            self.add("Sub", ["q_col", "win"], "lo")
            self.add("Greater", ["k_row", "lo"], "in_win")
            self.add("And", ["seen", "in_win"], "seen_w")
            mask = "seen_w"
        if kind == "float":
            self.inits += [_init("zero_f", np.array(0.0, np.float32)), _init("ninf", np.array(-np.inf, np.float32))]
            self.add("Where", [mask, "zero_f", "ninf"], "mask_f")
            mask = "mask_f"
        return mask

    def finish(self, attn_out: str, path: Path, opsets: dict[str, int]) -> Path:
        self.add("MatMul", [attn_out, "wo"], "logits")
        graph = helper.make_graph(self.nodes, "tiny", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                                  ir_version=10)
        onnx.save(model, str(path))
        return path


OPSET23 = {"": 23}
CONTRIB = {"": 20, "com.microsoft": 1}


def attention_model(path: Path, *, three_d: bool = False, past: bool = False, mask: str | None = None,
                    window: int = 0, rope: str | None = None, rd: int = HD, **attrs: object) -> Path:
    """The tiny decoder with ONNX Attention (4-D, or 3-D with head counts), maybe its own past
    cache, a mask, and ONNX RotaryEmbedding on q and k (`rope`: "positions" or "tables")."""
    g = Graph(past)
    if rope:
        cos, sin = g.rope_tables(rd, by_position=rope == "positions")
        extra = ["position_ids"] if rope == "positions" else []
        for w, h in (("q", HEADS), ("k", KVH)):
            g.heads(f"{w}3", h, f"{w}4")
            g.add("RotaryEmbedding", [f"{w}4", cos, sin, *extra], f"{w}r", rotary_embedding_dim=rd if rd != HD else 0)
        q, k = "qr", "kr"
    else:
        g.heads("q3", HEADS, "qr")
        g.heads("k3", KVH, "kr")
        q, k = "qr", "kr"
    g.heads("v3", KVH, "vr")
    if three_d:
        q, k, v = "q3", "k3", "v3"
        attrs |= {"q_num_heads": HEADS, "kv_num_heads": KVH}
    else:
        v = "vr"
    m = g.causal_mask(window, mask) if mask else ""
    ins = [q, k, v, m] + (["past_key_values.0.key", "past_key_values.0.value"] if past else [])
    outs = ["y"] + (["present.0.key", "present.0.value"] if past else [])
    g.add("Attention", ins, outs, **attrs)
    if three_d:
        return g.finish("y", path, OPSET23)
    g.merge("y", "y3")
    return g.finish("y3", path, OPSET23)


def _matches_onnxruntime(path: Path) -> dict:
    program = compile_model(path, CompileOptions(max_seq=len(PROMPT), max_ctx=len(PROMPT) + NEW))
    acc = measure_accuracy(program, path, PROMPT, NEW)
    assert acc["max_abs_error"] <= 1e-5 and acc["top1_agreement"] == 1.0, acc
    assert generate(Session(program), PROMPT, NEW).tokens == acc["reference_tokens"]
    return program.meta


ATTENTION_FORMS = {
    "4d causal": {"is_causal": 1},
    "3d causal, scale, softcap": {"three_d": True, "is_causal": 1, "scale": 0.3, "softcap": 2.0},
    "bool mask": {"mask": "bool"},
    "float mask with a window": {"mask": "float", "window": 3},
    "causal and a window mask": {"mask": "bool", "window": 2, "is_causal": 1},
    "own past cache, rope by positions": {"past": True, "is_causal": 1, "rope": "positions"},
    "own past cache, mask": {"past": True, "mask": "bool", "window": 3, "rope": "positions"},
    "partial rope from per-token tables": {"is_causal": 1, "rope": "tables", "rd": 4},
    "softmax_precision float": {"is_causal": 1, "softmax_precision": 1},
}


@pytest.mark.parametrize("form", ATTENTION_FORMS)
def test_attention_and_rotary_embedding_match_onnxruntime(form: str, tmp_path: Path) -> None:
    """Each accepted form of ONNX Attention (and RotaryEmbedding feeding it) generates onnxruntime's
    tokens with its logits; the IR attention carries the scale, softcap and window."""
    attrs = ATTENTION_FORMS[form]
    path = attention_model(tmp_path / "a.onnx", **attrs)
    module, _ = import_onnx(path, max_seq=len(PROMPT), max_ctx=len(PROMPT) + NEW)
    (att,) = module.walk("attention")
    assert att.attrs["scale"] == pytest.approx(attrs.get("scale", HD ** -0.5))
    assert att.attrs.get("softcap") == attrs.get("softcap")
    assert att.attrs.get("window") == (attrs.get("window") or None)
    assert len(list(module.walk("rope"))) == (2 if attrs.get("rope") else 0)
    _matches_onnxruntime(path)


ATTENTION_REFUSALS = {
    "qk output": ({"is_causal": 1, "qk_matmul_output_mode": 1}, "qk_matmul_output_mode=1"),
    "softmax precision": ({"is_causal": 1, "softmax_precision": 10}, "softmax_precision=10"),
    "negative softcap": ({"is_causal": 1, "softcap": -1.0}, "softcap=-1.0"),
    "bidirectional": ({}, "is_causal=0 without attn_mask"),
    "interleaved rope": ({"is_causal": 1, "rope": "positions"}, "interleaved=1"),
}


@pytest.mark.parametrize("form", ATTENTION_REFUSALS)
def test_attention_forms_not_taken_are_refused(form: str, tmp_path: Path) -> None:
    attrs, needle = ATTENTION_REFUSALS[form]
    path = attention_model(tmp_path / "a.onnx", **attrs)
    model = onnx.load(str(path))
    for node in model.graph.node:
        if form == "qk output" and node.op_type == "Attention":
            node.output[:] = ["y", "", "", "qk"]
        if form == "interleaved rope" and node.op_type == "RotaryEmbedding":
            node.attribute.append(helper.make_attribute("interleaved", 1))
    onnx.save(model, str(path))
    with pytest.raises(CannotCompile) as err:
        import_onnx(path, max_seq=8)
    assert any(needle in why for _, why in err.value.failures), err.value.failures


def test_a_mask_that_is_not_causal_is_refused(tmp_path: Path) -> None:
    """A window mask without the causal part lets queries see later keys."""
    path = attention_model(tmp_path / "a.onnx", mask="bool", window=2)
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.name == "seen_w":  # And(seen, in_win) -> in_win alone: keys after the query are seen
            node.op_type, node.input[:] = "Identity", ["in_win"]
    onnx.save(model, str(path))
    with pytest.raises(CannotCompile) as err:
        import_onnx(path, max_seq=8)
    assert any("is not causal" in why for _, why in err.value.failures), err.value.failures


def contrib_model(path: Path, *, bias_mask: bool = False, rope: bool = True, **attrs: object) -> Path:
    """The tiny decoder with com.microsoft RotaryEmbedding (3-D, position ids) on q and k and
    MultiHeadAttention over k and v repeated to every head (as onnxscript's fusion feeds it)."""
    g = Graph()
    q, k = "q3", "k3"
    if rope:
        cos, sin = g.rope_tables(HD, by_position=True)
        g.add("RotaryEmbedding", ["q3", "position_ids", cos, sin], "qr", domain="com.microsoft", num_heads=HEADS)
        g.add("RotaryEmbedding", ["k3", "position_ids", cos, sin], "kr", domain="com.microsoft", num_heads=KVH)
        q, k = "qr", "kr"
    for src, out in ((k, "k_rep"), ("v3", "v_rep")):  # [1, s, KVH*HD] -> [1, s, HEADS*HD], each kv head twice
        g.inits.append(_init(f"{out}_s5", np.array([1, -1, KVH, 1, HD])))
        g.inits.append(_init(f"{out}_e", np.array([1, 1, KVH, HEADS // KVH, HD])))
        g.inits.append(_init(f"{out}_s3", np.array([1, -1, HEADS * HD])))
        g.add("Reshape", [src, f"{out}_s5"], f"{out}_5")
        g.add("Expand", [f"{out}_5", f"{out}_e"], f"{out}_x")
        g.add("Reshape", [f"{out}_x", f"{out}_s3"], out)
    ins = [q, "k_rep", "v_rep"]
    if bias_mask:
        mask = g.causal_mask(0, "float")
        g.add("Unsqueeze", [mask, "i0"], "mask3")
        g.add("Unsqueeze", ["mask3", "i0"], "mask4")  # [1, 1, seq, seq]
        ins += ["", "", "mask4"]
    g.add("MultiHeadAttention", ins, "y", domain="com.microsoft", num_heads=HEADS, **attrs)
    return g.finish("y", path, CONTRIB)


CONTRIB_FORMS = {
    "unidirectional": {"unidirectional": 1},
    "attention_bias, scale": {"bias_mask": True, "scale": 0.4},
    "no rope": {"unidirectional": 1, "rope": False},
}


@pytest.mark.parametrize("form", CONTRIB_FORMS)
def test_contrib_rotary_embedding_and_multihead_attention_match_onnxruntime(form: str, tmp_path: Path) -> None:
    attrs = CONTRIB_FORMS[form]
    path = contrib_model(tmp_path / "m.onnx", **attrs)
    module, _ = import_onnx(path, max_seq=len(PROMPT), max_ctx=len(PROMPT) + NEW)
    (att,) = module.walk("attention")
    assert (att.attrs["heads"], att.attrs["kv_heads"]) == (HEADS, KVH)
    assert att.attrs["scale"] == pytest.approx(attrs.get("scale", HD ** -0.5))
    _matches_onnxruntime(path)


CONTRIB_REFUSALS = {
    "interleaved": ("RotaryEmbedding", {"interleaved": 1}, "interleaved=1"),
    "rotary scale": ("RotaryEmbedding", {"scale": 2.0}, "scale=2.0"),
    "packed batching": ("RotaryEmbedding", {"is_packed_batching": 1}, "is_packed_batching=1"),
    "bidirectional": ("MultiHeadAttention", {}, "unidirectional=0 without attention_bias"),
    "key padding mask": ("MultiHeadAttention", {"unidirectional": 1, "_input4": "input_ids"},
                         "key_padding_mask 'input_ids'"),
}


@pytest.mark.parametrize("form", CONTRIB_REFUSALS)
def test_contrib_forms_not_taken_are_refused(form: str, tmp_path: Path) -> None:
    op, attrs, needle = CONTRIB_REFUSALS[form]
    path = contrib_model(tmp_path / "m.onnx", unidirectional=1)
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == op:
            del node.attribute[:]
            node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items() if not k.startswith("_"))
            node.attribute.append(helper.make_attribute("num_heads", HEADS if op == "MultiHeadAttention" else KVH))
            if "_input4" in attrs:
                node.input[:] = [*node.input[:3], "", attrs["_input4"]]
    onnx.save(model, str(path))
    with pytest.raises(CannotCompile) as err:
        import_onnx(path, max_seq=8)
    assert any(needle in why for _, why in err.value.failures), err.value.failures


# ---- com.microsoft FusedMatMul: alpha * A @ (transB ? B^T : B), on weights and as attention scores --------------
FUSED_WEIGHT_FORMS = {"plain": {}, "alpha": {"alpha": 0.5}, "transB": {"transB": 1},
                      "transB, alpha": {"transB": 1, "alpha": -1.5}}


@pytest.mark.parametrize("form", FUSED_WEIGHT_FORMS)
def test_fused_matmul_on_a_weight_matches_onnxruntime(form: str, tmp_path: Path) -> None:
    """FusedMatMul(x, W) is one linear (of W^T with transB), then an affine by alpha if alpha != 1."""
    attrs = FUSED_WEIGHT_FORMS[form]
    w = np.random.default_rng(3).standard_normal((D, 24)).astype(np.float32)
    w = np.ascontiguousarray(w.T) if attrs.get("transB") else w
    node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], name="fmm", domain="com.microsoft", **attrs)
    path = xy_model(tmp_path / "m.onnx", [node], {"w": w}, cols=D, out_cols=24, opset=20, contrib=True)
    module, _ = import_onnx(path, max_seq=8)
    assert len(list(module.walk("linear"))) == 1
    assert [op.attrs["alpha"] for op in module.walk("affine")] == ([attrs["alpha"]] if "alpha" in attrs else [])
    matches_onnxruntime(path)


def fused_scores_model(path: Path, *, alpha: float = 1.0, trans_b: int = 1, mul: float = 1.0,
                       softcap: float | None = None, **attrs: object) -> Path:
    """The tiny decoder with its scores as FusedMatMul(q, k, alpha, transB) (k given transposed when
    not transB), maybe times `mul` and soft-capped (Gemma2's ORT-fused export), then an additive
    causal mask, Softmax and MatMul with v."""
    g = Graph()
    g.heads("q3", HEADS, "qr")
    g.inits += [_init("i2_1", np.array([2])), _init("rep_e", np.array([1, KVH, HEADS // KVH, 1, 1])),
                _init("rep_s", np.array([1, HEADS, -1, HD]))]
    for w in ("k", "v"):  # [1, KVH, s, HD] -> [1, HEADS, s, HD], each kv head repeated (as torch's export does)
        g.heads(f"{w}3", KVH, f"{w}h")
        g.add("Unsqueeze", [f"{w}h", "i2_1"], f"{w}h5")
        g.add("Expand", [f"{w}h5", "rep_e"], f"{w}hx")
        g.add("Reshape", [f"{w}hx", "rep_s"], f"{w}r")
    k = "kr"
    if not trans_b:
        g.add("Transpose", ["kr"], "kt", perm=[0, 1, 3, 2])
        k = "kt"
    g.add("FusedMatMul", ["qr", k], "s", domain="com.microsoft", alpha=alpha, transB=trans_b, **attrs)
    s = "s"
    if mul != 1.0:
        g.inits.append(_init("mul", np.array(mul, np.float32)))
        g.add("Mul", [s, "mul"], "s_mul")
        s = "s_mul"
    if softcap:
        g.inits.append(_init("cap", np.array(softcap, np.float32)))
        g.add("Div", [s, "cap"], "s_div")
        g.add("Tanh", ["s_div"], "s_tanh")
        g.add("Mul", ["s_tanh", "cap"], "s_cap")
        s = "s_cap"
    g.add("Add", [s, g.causal_mask(0, "float")], "s_masked")
    g.add("Softmax", ["s_masked"], "p", axis=-1)
    g.add("MatMul", ["p", "vr"], "o")
    g.merge("o", "o3")
    return g.finish("o3", path, CONTRIB)


FUSED_SCORE_FORMS = {
    "transB, alpha": {"alpha": HD ** -0.5},
    "k transposed, alpha": {"alpha": 0.3, "trans_b": 0},
    "transB, then a scale and a softcap": {"mul": HD ** -0.5, "softcap": 2.0},
}


@pytest.mark.parametrize("form", FUSED_SCORE_FORMS)
def test_fused_matmul_scores_are_attention(form: str, tmp_path: Path) -> None:
    """FusedMatMul of q and k under a softmax is the attention rule's scores, alpha folded into the
    scale; the decoder generates onnxruntime's tokens with its logits."""
    attrs = FUSED_SCORE_FORMS[form]
    path = fused_scores_model(tmp_path / "m.onnx", **attrs)
    module, _ = import_onnx(path, max_seq=len(PROMPT), max_ctx=len(PROMPT) + NEW)
    (att,) = module.walk("attention")
    assert (att.attrs["heads"], att.attrs["kv_heads"]) == (HEADS, KVH)
    assert att.attrs["scale"] == pytest.approx(attrs.get("alpha", 1.0) * attrs.get("mul", 1.0))
    assert att.attrs.get("softcap") == attrs.get("softcap")
    _matches_onnxruntime(path)


@pytest.mark.parametrize("attr", ["transA", "transBatchA", "transBatchB"])
def test_fused_matmul_forms_not_taken_are_refused(attr: str, tmp_path: Path) -> None:
    """Each attribute cimc does not compute is refused at its node, named with its value."""
    path = fused_scores_model(tmp_path / "m.onnx", alpha=0.3, **{attr: 1})
    assert refusals(path) == {"s": f"{attr}=1 is not supported ({FUSED_REFUSED[attr]})"}
