"""The decoder ops of issue 9 below the frontend: sliding-window and soft-capped attention,
layer_norm, tanh GELU and partial rotary, from IR text through the real pipeline to the simulator.

Numerics are checked against a float64 numpy reference written here from the models' own
definitions (transformers' sliding_window mask, Gemma2's soft-capping, ONNX LayerNormalization and
Gelu-20, rotate-half RoPE over the first rotary_dim entries), not against our semantics.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

from cimc.driver import CompileOptions, compile_module
from cimc.ir.parser import parse_module
from cimc.ir.printer import print_module
from cimc.ir.verifier import VerifyError, verify_module
from isa.cost import CostModel
from isa.diag import SourceError
from isa.encoding import Instr, decode_columns, encode
from isa.fields import Dim, Mem
from isa.hw import load_hw
from runtime.hazards import find_hazards
from runtime.interpreter import Session

HIDDEN, HEADS, KV_HEADS, HD, FF, LAYERS = 64, 4, 2, 16, 256, 2
MAX_SEQ, MAX_CTX = 64, 128
RNG = np.random.default_rng(9)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode()


def _tables(rd: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_ctx, rd] of rotate-half RoPE over rd entries (base 10000)."""
    inv = 1.0 / 10000 ** (np.arange(0, rd, 2) / rd)
    ang = np.arange(MAX_CTX)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang), np.sin(ang)


SHAPES = {"wq": (HIDDEN, HEADS * HD), "wk": (HIDDEN, KV_HEADS * HD), "wv": (HIDDEN, KV_HEADS * HD),
          "wo": (HEADS * HD, HIDDEN), "up": (HIDDEN, FF), "down": (FF, HIDDEN)}


def _weights() -> dict[str, np.ndarray]:
    w = {}
    for layer in range(LAYERS):
        for name, shape in SHAPES.items():
            w[f"{name}{layer}"] = (RNG.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32)
        for norm in ("ln1", "ln2"):  # away from their init values, so a dropped scale or bias shows
            w[f"{norm}_w{layer}"] = (1 + 0.3 * RNG.standard_normal(HIDDEN)).astype(np.float32)
            w[f"{norm}_b{layer}"] = (0.2 * RNG.standard_normal(HIDDEN)).astype(np.float32)
    return w


def module_text(attention: str = "", rope: str = "", gelu: str = "", bias: bool = True, rd: int = HD) -> str:
    """A GPT-2 / Gemma2-like decoder of LAYERS blocks on float inputs x [seq, hidden]: x + attention
    (layer_norm, q/k/v projections, rope on q and k, attention, output projection), then + MLP
    (layer_norm, up, gelu, down); with extra attributes (`, key = value` text) on attention, rope and
    gelu, and layer_norm biases or not."""
    kv = KV_HEADS * HD
    lines = ["cimir 1", f'module "decoder_ops" {{max_ctx = {MAX_CTX}, max_seq = {MAX_SEQ}}}']

    def op(text: str) -> str:
        lines.append(f"%{len(lines) - 2} = {text}")
        return f"%{len(lines) - 3}"

    def weight(name: str, shape: tuple[int, ...]) -> str:
        return op(f'weight() {{init = "{name}"}} : f32[{",".join(map(str, shape))}] loc("{name}")')

    def norm(x: str, name: str) -> str:
        args = [x, weight(f"{name[:3]}_w{name[3:]}", (HIDDEN,))]
        args += [weight(f"{name[:3]}_b{name[3:]}", (HIDDEN,))] if bias else []
        return op(f'layer_norm({", ".join(args)}) {{eps = 1e-05}} : f32[seq,{HIDDEN}] loc("{name}")')

    def linear(x: str, name: str) -> str:
        return op(f'linear({x}, {weight(name, SHAPES[name[:-1]])}) : f32[seq,{SHAPES[name[:-1]][1]}] loc("{name}")')

    x = op(f'input() {{name = "x", onnx_dtype = "float", onnx_shape = [1, "seq", {HIDDEN}]}} : f32[seq,{HIDDEN}] '
           'loc("x")')
    cos, sin = (op(f'const() {{data = "{_b64(t)}"}} : f32[ctx,{rd}] loc("{name}")')
                for t, name in zip(_tables(rd), ("cos", "sin"), strict=True))
    for i in range(LAYERS):
        h = norm(x, f"ln1{i}")
        q, k, v = (linear(h, f"w{c}{i}") for c in "qkv")
        q, k = (op(f'rope({t}, {cos}, {sin}) {{head_dim = {HD}{rope}}} : f32[seq,{cols}] loc("{name}{i}")')
                for t, cols, name in ((q, HEADS * HD, "q_rope"), (k, kv, "k_rope")))
        a = op(f"attention({q}, {k}, {v}) {{causal = true, head_dim = {HD}, heads = {HEADS}, kv_heads = {KV_HEADS}, "
               f'scale = 0.25{attention}}} : f32[seq,{HEADS * HD}] loc("attn{i}")')
        x = op(f'add({x}, {linear(a, f"wo{i}")}) : f32[seq,{HIDDEN}] loc("res_a{i}")')
        u = linear(norm(x, f"ln2{i}"), f"up{i}")
        g = op(f'gelu({u}){" {" + gelu + "}" if gelu else ""} : f32[seq,{FF}] loc("gelu{i}")')
        x = op(f'add({x}, {linear(g, f"down{i}")}) : f32[seq,{HIDDEN}] loc("res_m{i}")')
    lines.append(f'output({x}) {{name = "y", onnx_dtype = "float", onnx_shape = [1, "seq", {HIDDEN}]}} loc("y")')
    return "\n".join(lines) + "\n"


# ---- the reference, float64, from the models' definitions ------------------------------------


def gelu_erf(t: np.ndarray) -> np.ndarray:
    return 0.5 * t * (1 + np.vectorize(math.erf)(t / math.sqrt(2)))


def gelu_tanh(t: np.ndarray) -> np.ndarray:  # ONNX Gelu-20 approximate="tanh", transformers' gelu_new
    return 0.5 * t * (1 + np.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3)))


def reference(x: np.ndarray, w: dict[str, np.ndarray], *, window: int = 0, softcap: float = 0.0, rd: int = HD,
              tanh_gelu: bool = False, bias: bool = True) -> np.ndarray:
    """y for tokens x [n, hidden] at positions 0 .. n-1."""
    n = len(x)
    cos, sin = (t[:n] for t in _tables(rd))
    pos = np.arange(n)
    visible = pos[None, :] <= pos[:, None]  # [query, key]
    if window:
        visible &= pos[None, :] > pos[:, None] - window  # transformers' sliding_window_overlay

    def norm(t: np.ndarray, name: str) -> np.ndarray:  # ONNX LayerNormalization over the last axis
        mu = t.mean(axis=1, keepdims=True)
        var = ((t - mu) ** 2).mean(axis=1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-5) * w[f"{name}_w{i}"] + (w[f"{name}_b{i}"] if bias else 0.0)

    def rope(t: np.ndarray, heads: int) -> np.ndarray:  # rotate-half on the first rd entries of each head
        t = t.reshape(n, heads, HD).copy()
        r = t[..., :rd]
        rot = np.concatenate([-r[..., rd // 2:], r[..., : rd // 2]], axis=-1)
        t[..., :rd] = r * cos[:, None] + rot * sin[:, None]
        return t

    x = x.astype(np.float64)
    for i in range(LAYERS):
        h = norm(x, "ln1")
        q, k, v = (h @ w[f"w{c}{i}"] for c in "qkv")
        q, k, v = rope(q, HEADS), rope(k, KV_HEADS), v.reshape(n, KV_HEADS, HD)
        out = np.zeros((n, HEADS, HD))
        for head in range(HEADS):
            g = head // (HEADS // KV_HEADS)
            s = q[:, head] @ k[:, g].T * 0.25
            if softcap:  # Gemma2: after the scaling, before the mask
                s = softcap * np.tanh(s / softcap)
            s = np.where(visible, s, -np.inf)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[:, head] = (p / p.sum(axis=1, keepdims=True)) @ v[:, g]
        x = x + out.reshape(n, HEADS * HD) @ w[f"wo{i}"]
        x = x + (gelu_tanh if tanh_gelu else gelu_erf)(norm(x, "ln2") @ w[f"up{i}"]) @ w[f"down{i}"]
    return x


VARIANTS = {  # name: (module_text kwargs, reference kwargs)
    "window-softcap-partial-tanh": (dict(attention=", softcap = 2.0, window = 3", rope=", rotary_dim = 4",
                                         gelu='approximate = "tanh"', rd=4),
                                    dict(window=3, softcap=2.0, rd=4, tanh_gelu=True)),
    "window-only": (dict(attention=", window = 2"), dict(window=2)),
    "softcap-only-no-bias": (dict(attention=", softcap = 1.5", bias=False), dict(softcap=1.5, bias=False)),
    "plain": (dict(), dict()),
}


def _compile(text: str, weights: dict[str, np.ndarray]):
    module = parse_module(text, "decoder_ops.cimir")
    return compile_module(module, weights.__getitem__, CompileOptions(max_seq=MAX_SEQ, max_ctx=MAX_CTX))[0]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def compiled(request):
    text_kw, ref_kw = VARIANTS[request.param]
    w = _weights()
    return _compile(module_text(**text_kw), w), w, ref_kw, request.param


def test_prefill_chunked_prefill_and_decode_past_the_window(compiled) -> None:
    """Prefill 5 tokens, prefill 2 more after them (past 5), then decode one at a time to 12
    positions (past 7 .. 11, well beyond the windows of 2 and 3): every row equals the reference
    over all 12 tokens, whose mask depends on absolute positions."""
    program, w, ref_kw, _ = compiled
    x = RNG.standard_normal((12, HIDDEN)).astype(np.float32)
    want = reference(x, w, **ref_kw)
    s = Session(program)
    got = [s.run("prefill", {"x": x[None, :5]}).outputs["y"][0],
           s.run("prefill", {"x": x[None, 5:7]}, past=5).outputs["y"][0]]
    got += [s.run("decode", {"x": x[None, t:t + 1]}, past=t).outputs["y"][0] for t in range(7, 12)]
    np.testing.assert_allclose(np.concatenate(got), want, atol=2e-5, rtol=1e-4)


def test_the_variants_differ(compiled) -> None:
    """A test that cannot fail is a defect: the reference must tell the variants apart."""
    _, w, ref_kw, name = compiled
    x = RNG.standard_normal((8, HIDDEN)).astype(np.float32)
    if name != "plain":
        assert np.abs(reference(x, w, **ref_kw) - reference(x, w)).max() > 1e-3


def test_timeline_is_hazard_free_and_the_estimate_matches(compiled) -> None:
    """Prefill (with past 0 and past 3) and decode after 9 cached positions order every memory
    conflict in simulated time; the compiler's estimate lands within 5 % of the simulated cycles
    for prefill of 3, 16 and 64 tokens, 6 after 3, and decode after 9 and 100."""
    program, *_ = compiled
    s = Session(program)
    x = RNG.standard_normal((1, 12, HIDDEN)).astype(np.float32)
    for entry, lo, hi in (("prefill", 0, 3), ("prefill", 3, 9), ("decode", 9, 10)):
        r = s.run(entry, {"x": x[:, lo:hi]}, past=lo, trace_accesses=True)
        hazards = find_hazards(r.accesses, r.timeline)
        assert r.accesses and not hazards, "\n".join(map(str, hazards[:5]))
    for entry, tokens, past in (("prefill", 3, 0), ("prefill", 16, 0), ("prefill", 64, 0), ("prefill", 6, 3),
                                ("decode", 1, 9), ("decode", 1, 100)):
        r = s.run(entry, numerics=False, tokens=tokens, past=past)
        assert r.report["estimated_cycles"] == pytest.approx(r.report["cycles"], rel=0.05), (entry, tokens, past)


# ---- costs -----------------------------------------------------------------------------------


def _costs(instrs: list[Instr], regs=(0, 8, 0, 8)):
    """Per-instruction cycles on its SFU and pJ of SFU arithmetic."""
    cm = CostModel(load_hw())
    costs = cm.instr_costs(decode_columns(encode(instrs)), np.array(regs))
    return costs.duration(), costs.energy["sfu"]


G = lambda addr, stride: Mem(0, addr, stride)  # noqa: E731


def test_new_sfu_work_is_priced_and_grows_with_the_work() -> None:
    """Each new operation costs time and SFU energy, more for more elements; a window's second
    compare costs more than the plain causal mask; rotating fewer entries costs less; the tanh
    GELU costs more arithmetic than the erf one it approximates is priced at."""
    unary = dict(tile=1, dst=G(0, 64), src=G(0x4000, 64))
    instrs = [
        Instr("vsoftcap", {**unary, "rows": Dim(0, 4), "cols": Dim(0, 64), "cap": 30.0}),
        Instr("vsoftcap", {**unary, "rows": Dim(0, 8), "cols": Dim(0, 64), "cap": 30.0}),
        Instr("vgelut", {**unary, "rows": Dim(0, 8), "cols": Dim(0, 64)}),
        Instr("vgelu", {**unary, "rows": Dim(0, 8), "cols": Dim(0, 64)}),
        Instr("vcausal", {"tile": 1, "dst": G(0, 64), "rows": Dim(0, 8), "cols": Dim(0, 64), "diag": Dim(0, 0),
                          "window": 0, "one": 0}),
        Instr("vcausal", {"tile": 1, "dst": G(0, 64), "rows": Dim(0, 8), "cols": Dim(0, 64), "diag": Dim(0, 0),
                          "window": 4, "one": 0}),
    ]
    rope = dict(tile=1, dst=G(0, 64), src=G(0x4000, 64), cos=G(0x8000, 16), sin=G(0x9000, 16), rows=Dim(0, 8),
                cols=Dim(0, 64), hd=16)
    instrs += [Instr("vrope", {**rope, "rd": 0}), Instr("vrope", {**rope, "rd": 8})]
    time, energy = _costs(instrs)
    assert (time > 0).all() and (energy > 0).all()
    assert time[1] > time[0] and energy[1] == pytest.approx(2 * energy[0])
    assert time[2] > time[3] and energy[2] > energy[3]
    assert time[5] > time[4] and energy[5] == pytest.approx(2 * energy[4])
    assert time[6] > time[7] and energy[7] == pytest.approx(energy[6] / 2)


def test_each_attribute_adds_its_instructions_and_their_cost() -> None:
    """The compiled program prices softcap and window work: more SFU energy with them than without,
    and exactly the instructions each asks for."""
    w = _weights()
    plain, fancy = (_compile(module_text(**VARIANTS[n][0]), w) for n in ("plain", "window-softcap-partial-tanh"))
    reports = []
    for p in (plain, fancy):
        s = Session(p)
        cols = s.columns("decode")
        counts = {m: len(idx) for m, idx in cols.rows.items()}
        reports.append((counts, s.run("decode", numerics=False, past=9).report))
    (c0, r0), (c1, r1) = reports
    # per layer: the new and the cached scores of each KV group are capped; the cached ones masked (a
    # decode step's one new key is its own position)
    assert "vsoftcap" not in c0 and c1["vsoftcap"] == 2 * KV_HEADS * LAYERS
    assert "vcausal" not in c0 and c1["vcausal"] == KV_HEADS * LAYERS
    assert c1["vgelut"] == c0["vgelu"] == LAYERS and "vgelu" not in c1
    assert r1["energy_pj"]["sfu"] > r0["energy_pj"]["sfu"]


# ---- IR text ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_ir_text_round_trips(name: str) -> None:
    text = module_text(**VARIANTS[name][0])
    assert print_module(parse_module(text)) == text


@pytest.mark.parametrize(("edit", "loc", "fragment"), [
    (dict(attention=", window = -1"), "attn0", "window must be 0 (unbounded) or the keys a query sees, got -1"),
    (dict(attention=", softcap = 0.0"), "attn0", "softcap must be positive (leave it out for none), got 0.0"),
    (dict(attention=", softcap = -2.0"), "attn0", "softcap must be positive"),
    (dict(rope=", rotary_dim = 3", rd=3), "q_rope0", "rotary_dim 3 must be even and in 2..head_dim (16)"),
    (dict(rope=", rotary_dim = 32", rd=32), "q_rope0", "rotary_dim 32 must be even and in 2..head_dim (16)"),
    (dict(rope=", rotary_dim = 4"), "q_rope0", "cos table must have rotary_dim = 4 columns, got f32[ctx,16]"),
    (dict(gelu='approximate = "fast"'), "gelu0", "approximate must be one of none, tanh, got 'fast'"),
    (dict(attention=", window = 1.5"), "attn0", "attribute 'window' must be int, got 1.5"),
])
def test_bad_values_are_located_errors(edit: dict, loc: str, fragment: str) -> None:
    """In IR text: file:line:col of the op; from the verifier (after a pass): the op's ONNX node,
    its printed line underlined."""
    text = module_text(**edit)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if f'loc("{loc}")' in t)
    with pytest.raises(SourceError) as e:
        parse_module(text, "decoder_ops.cimir")
    assert e.value.message.startswith(f"decoder_ops.cimir:{line}:1: ") and fragment in e.value.message
    with pytest.raises(VerifyError) as v:
        verify_module(parse_module(text, verify=False))
    assert fragment in v.value.message and f"ONNX node {loc!r}" in v.value.message
    lines = v.value.detail.splitlines()
    assert f'loc("{loc}")' in lines[0] and set(lines[1].strip()) == {"^"}


def test_a_window_needs_causal_attention() -> None:
    text = module_text(attention=", window = 3").replace("causal = true", "causal = false")
    with pytest.raises(SourceError, match="a window needs causal attention"):
        parse_module(text)


@pytest.mark.parametrize(("op", "want"), [
    ("tanh", np.tanh),
    ("gelu", gelu_erf),
    ('gelu {approximate = "tanh"}', gelu_tanh),
])
def test_tanh_and_gelu_lower_end_to_end(op: str, want) -> None:
    """The generic elementwise ops the new families use compile and run on their own."""
    name, _, attrs = op.partition(" ")
    text = "\n".join([
        "cimir 1", 'module "one_op" {max_seq = 4}',
        '%0 = input() {name = "x", onnx_dtype = "float", onnx_shape = [1, "seq", 16]} : f32[seq,16] loc("x")',
        '%1 = weight() {init = "w"} : f32[16,16] loc("w")',
        '%2 = linear(%0, %1) : f32[seq,16] loc("proj")',
        f'%3 = {name}(%2){" " + attrs if attrs else ""} : f32[seq,16] loc("act")',
        'output(%3) {name = "y", onnx_dtype = "float", onnx_shape = [1, "seq", 16]} loc("y")', ""])
    w = {"w": RNG.standard_normal((16, 16)).astype(np.float32)}
    program = compile_module(parse_module(text), w.__getitem__, CompileOptions(max_seq=4))[0]
    x = RNG.standard_normal((1, 4, 16)).astype(np.float32)
    y = Session(program).run("prefill", {"x": x}).outputs["y"]
    np.testing.assert_allclose(y[0], want(x[0].astype(np.float64) @ w["w"]), atol=1e-5, rtol=1e-5)
