"""End-to-end numerics: ONNX -> cimc compile -> simulate, checked against onnxruntime on the same file.

Every expected value comes from onnxruntime (run live here on the same ONNX file) or from the
reference `.npz` that was written by onnxruntime when the shared models were exported; nothing is
compared against an earlier cimc result.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from model_fixtures import max_err, ort_logits, shared_model

from cimc.driver import CompileOptions, compile_model, load_module, run_pipeline
from cimc.synth import DecoderConfig, build_decoder_onnx
from isa.hw import load_hw
from runtime.interpreter import simulate

SHARED = ["llama_a_dynamo", "qwen2_a_dynamo"]
TOL = 1e-4


def cimc_logits(program, ids: np.ndarray) -> np.ndarray:
    return simulate(program, {"input_ids": ids.astype(np.int64)}).outputs["logits"]


def random_ids(vocab: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, n), dtype=np.int64)


# ---- the shared torch-dynamo exports ---------------------------------------------------------


@pytest.fixture(scope="module")
def shared_programs() -> dict:
    """Compiled programs keyed by (model name, max_seq); max_seq None is the default (256)."""
    cache: dict = {}

    def get(name: str, max_seq: int | None):
        key = (name, max_seq)
        if key not in cache:
            opts = CompileOptions() if max_seq is None else CompileOptions(max_seq=max_seq)
            cache[key] = compile_model(shared_model(name, with_npz=True), opts)
        return cache[key]

    return get


@pytest.mark.parametrize("max_seq", [16, None], ids=["max_seq16", "default"])
@pytest.mark.parametrize("name", SHARED)
def test_shared_model_matches_reference_npz(shared_programs, name: str, max_seq: int | None) -> None:
    path = shared_model(name, with_npz=True)
    ref = np.load(path.with_suffix(".npz"))
    program = shared_programs(name, max_seq)
    assert int(program.entry().meta["max_seq"]) == (max_seq or 256)
    got = cimc_logits(program, ref["input.input_ids"])
    assert max_err(got, ref["output.logits"]) <= TOL


@pytest.mark.parametrize("max_seq", [16, None], ids=["max_seq16", "default"])
@pytest.mark.parametrize("name", SHARED)
def test_shared_model_matches_onnxruntime_at_lengths(shared_programs, name: str, max_seq: int | None) -> None:
    path = shared_model(name, with_npz=True)
    program = shared_programs(name, max_seq)
    bound = int(program.entry().meta["max_seq"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vocab = session.get_outputs()[0].shape[-1]
    for n in (1, 3, 8, bound):
        ids = random_ids(vocab, n, seed=100 + n)
        want = session.run(["logits"], {"input_ids": ids})[0]
        err = max_err(cimc_logits(program, ids), want)
        assert err <= TOL, f"{name} max_seq={bound} length {n}: max |err| {err:.3g}"


# ---- synthetic variants (cimc.synth) -----------------------------------------------------------

SMALL = {"vocab": 256, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128}

VARIANTS: dict[str, tuple[dict, bool]] = {
    # name: (DecoderConfig overrides, external data)
    "gqa-2to1": ({}, False),
    "gqa-4to1": ({"hidden": 128, "heads": 8, "kv_heads": 2}, False),
    "mha": ({"kv_heads": 4}, False),
    "qkv-bias": ({"qkv_bias": True, "vocab": 384, "rope_theta": 1e6}, False),
    "tied-embeddings": ({"tie_embeddings": True}, False),
    "head-dim-32": ({"heads": 4, "kv_heads": 2, "head_dim": 32}, False),
    "one-layer": ({"layers": 1}, False),
    "three-layers": ({"layers": 3}, False),
    "odd-intermediate": ({"intermediate": 200, "vocab": 300}, False),
    "k-split-across-tiles": ({"layers": 1, "intermediate": 2304}, False),
    "external-data": ({}, True),
    "qwen2-like-all": ({"hidden": 128, "heads": 8, "kv_heads": 2, "intermediate": 200, "vocab": 384,
                        "tie_embeddings": True, "qkv_bias": True}, True),
    "mqa-4to1-kv1": ({"heads": 4, "kv_heads": 1}, False),
    "single-head": ({"heads": 1, "kv_heads": 1, "hidden": 32}, False),
}
SYNTH_MAX_SEQ = 12


def _variant_params():
    for key, (over, ext) in VARIANTS.items():
        yield pytest.param(key, over, ext, id=key)


@pytest.mark.parametrize(("key", "over", "external"), list(_variant_params()))
def test_synthetic_variant_matches_onnxruntime(tmp_path: Path, key: str, over: dict, external: bool) -> None:
    cfg = DecoderConfig(name=key, **(SMALL | over))
    path = build_decoder_onnx(cfg, tmp_path / f"{key}.onnx", seed=7, external_data=external)
    assert path.with_name(path.name + ".data").is_file() == external
    program = compile_model(path, CompileOptions(max_seq=SYNTH_MAX_SEQ))
    for n in (5, SYNTH_MAX_SEQ):
        ids = random_ids(cfg.vocab, n, seed=n)
        err = max_err(cimc_logits(program, ids), ort_logits(path, ids))
        assert err <= TOL, f"{key} length {n}: max |err| {err:.3g}"


def test_k_split_variant_really_splits_k(tmp_path: Path) -> None:
    """The K-split variant is only meaningful if its down projection needs several K chunks."""
    over = VARIANTS["k-split-across-tiles"][0]
    cfg = DecoderConfig(name="ksplit", **(SMALL | over))
    path = build_decoder_onnx(cfg, tmp_path / "k.onnx", seed=7)
    opts = CompileOptions(max_seq=4)
    module, _ = load_module(path, opts)
    run_pipeline(module, opts, until="tile-partition")
    kchunks = {op.loc: (op.operands[1].type.shape[0], op.attrs["tiling"]["kchunks"]) for op in module.walk("linear")}
    down = [chunks for k, chunks in kchunks.values() if k == cfg.intermediate]
    assert down and all(c >= 2 for c in down), kchunks


# ---- the lifted IR really contains the idioms -------------------------------------------------


@pytest.mark.parametrize(
    "over",
    [
        pytest.param({}, id="llama-gqa"),
        pytest.param({"qkv_bias": True, "tie_embeddings": True, "head_dim": 32, "layers": 3}, id="qwen2-hd32"),
        pytest.param({"kv_heads": 4, "layers": 1}, id="mha"),
    ],
)
def test_lifted_ir_has_decoder_idioms(tmp_path: Path, over: dict) -> None:
    cfg = DecoderConfig(name="idioms", **(SMALL | over))
    path = build_decoder_onnx(cfg, tmp_path / "m.onnx", seed=1)
    opts = CompileOptions(max_seq=8)
    module, _ = load_module(path, opts)
    run_pipeline(module, opts, until="lift-idioms")
    counts = Counter(op.name for op in module.ops)
    hd = cfg.head_dim

    attn = list(module.walk("attention"))
    assert len(attn) == cfg.layers
    for op in attn:
        assert (op.attrs["heads"], op.attrs["kv_heads"], op.attrs["head_dim"]) == (cfg.heads, cfg.kv_heads, hd)
        assert op.attrs["scale"] == pytest.approx(1 / math.sqrt(hd), rel=1e-6)
        assert op.attrs.get("causal") is True
        q, k, v = (o.type.shape for o in op.operands)
        assert q == ("seq", cfg.heads * hd)
        assert k == v == ("seq", cfg.kv_heads * hd)

    ropes = list(module.walk("rope"))
    assert len(ropes) == 2 * cfg.layers  # q and k of every layer
    assert all(op.attrs["head_dim"] == hd for op in ropes)
    assert {op.operands[0].type.shape[1] for op in ropes} == {cfg.heads * hd, cfg.kv_heads * hd}

    assert counts["rms_norm"] == 2 * cfg.layers + 1
    for op in module.walk("rms_norm"):
        assert op.attrs["eps"] == pytest.approx(cfg.rms_eps)
    assert counts["swiglu"] == cfg.layers
    for op in module.walk("swiglu"):
        assert op.result.type.shape == ("seq", cfg.intermediate)

    linears = list(module.walk("linear"))
    assert len(linears) == 7 * cfg.layers + 1
    biased = [op for op in linears if len(op.operands) == 3]
    if cfg.qkv_bias:
        assert len(biased) == 3 * cfg.layers
        assert sorted(op.operands[2].type.shape[0] for op in biased[:3]) == sorted(
            [cfg.heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd])
    else:
        assert not biased

    emb = list(module.walk("embedding"))
    assert len(emb) == 1
    table = emb[0].operands[1]
    assert table.type.shape == (cfg.vocab, cfg.hidden)
    head = next(out.operands[0].owner for out in module.outputs())
    assert head.name == "linear"
    head_w = head.operands[1].owner
    assert head_w.name == "weight" and head.operands[1].type.shape == (cfg.hidden, cfg.vocab)
    if cfg.tie_embeddings:  # the LM head reads the embedding table, transposed
        assert head_w.attrs["init"] == table.owner.attrs["init"] and head_w.attrs.get("transpose") is True

    for leftover in ("sigmoid", "reduce_mean", "sqrt", "reciprocal", "rsqrt", "softmax", "silu"):
        assert counts[leftover] == 0, f"{leftover} left after lift-idioms: {dict(counts)}"
    # only the residual adds stay elementwise
    assert counts["add"] == 2 * cfg.layers
    assert counts["mul"] == 0


# ---- hardware variation changes timing, never numerics ----------------------------------------

HW_VARIANTS = {
    "edgecim-65nm": (None, []),
    "edgecim-28nm": ("edgecim-28nm", []),
    "4-tiles": (None, ["chip.tiles=4"]),
    "global-8kb": (None, ["buffer.global.size_kb=8"]),
    "4-tiles-global-8kb": (None, ["chip.tiles=4", "buffer.global.size_kb=8"]),
}


@pytest.fixture(scope="module")
def hw_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cfg = DecoderConfig(name="hw", vocab=256, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256)
    path = build_decoder_onnx(cfg, tmp_path_factory.mktemp("hw") / "hw.onnx", seed=5)
    ids = random_ids(cfg.vocab, 16, seed=1)
    want = ort_logits(path, ids)
    runs = {}
    for key, (spec, overrides) in HW_VARIANTS.items():
        program = compile_model(path, CompileOptions(max_seq=16, hw=load_hw(spec, overrides)))
        result = simulate(program, {"input_ids": ids})
        runs[key] = (max_err(result.outputs["logits"], want), result.report)
    return runs


@pytest.mark.parametrize("key", HW_VARIANTS)
def test_hardware_variant_keeps_numerics(hw_runs: dict, key: str) -> None:
    err, report = hw_runs[key]
    assert err <= TOL, f"{key}: max |err| {err:.3g}"
    assert report["cycles"] > 0 and report["dram_bytes"] > 0


def test_hardware_variants_change_timing(hw_runs: dict) -> None:
    base = hw_runs["edgecim-65nm"][1]["cycles"]
    for key in ("edgecim-28nm", "4-tiles", "global-8kb"):
        assert hw_runs[key][1]["cycles"] != base, key


def test_small_global_buffer_spills_to_dram(hw_runs: dict) -> None:
    base = hw_runs["edgecim-65nm"][1]["dram_bytes"]
    assert hw_runs["global-8kb"][1]["dram_bytes"] > base
    assert hw_runs["4-tiles-global-8kb"][1]["dram_bytes"] > hw_runs["4-tiles"][1]["dram_bytes"]
