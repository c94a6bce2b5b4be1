"""DRAM traffic: the KV cache moved exactly as the hardware needs it, and the independent bound
(passes/traffic.py, from the IR) never above what the simulator moved."""

from __future__ import annotations

from pathlib import Path

import pytest
from model_fixtures import EXAMPLE, shared_model

from cimc.driver import CompileOptions, compile_model
from cimc.synth import DecoderConfig, build_decoder_onnx
from runtime.generate import generate, render_text
from runtime.interpreter import Session


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 1), (4, 2), (4, 4)], ids=["MQA", "GQA", "MHA"])
def test_kv_bytes_per_decode_step_are_exact(tmp_path: Path, heads: int, kv_heads: int) -> None:
    """A decode step at context P reads the P - 1 cached positions of each KV head once (shared
    by its query heads) and writes the new one: 2 x layers x kv_heads x head_dim x P x 4 bytes.
    A prompt writes its rows and reads nothing back."""
    cfg = DecoderConfig(name="kv", vocab=64, hidden=64, layers=3, heads=heads, kv_heads=kv_heads, head_dim=16,
                        intermediate=96)
    model = build_decoder_onnx(cfg, tmp_path / "kv.onnx")
    session = Session(compile_model(model, CompileOptions(max_seq=8, max_ctx=64)))
    per_position = 2 * cfg.layers * kv_heads * cfg.head_dim * 4
    for ctx in (1, 2, 17, 64):
        r = session.run("decode", numerics=False, past=ctx - 1).report
        assert r["dram_bytes_by_kind"]["kv_cache"] == per_position * ctx, ctx
        assert r["min_dram_bytes_by_kind"]["kv_cache"] == per_position * ctx
    r = session.run("prefill", numerics=False, tokens=8).report
    assert r["dram_bytes_by_kind"]["kv_cache"] == per_position * 8


@pytest.mark.parametrize("model", ["tiny_llama", "llama_c_optimum_kv", "qwen2_a_dynamo"])
def test_bound_is_never_above_the_simulation(model: str) -> None:
    """Kind by kind, every run moves at least the bytes the IR says it must (more where code
    fetch, re-reads, spills and bursts add to it)."""
    path = EXAMPLE if model == "tiny_llama" else shared_model(model)
    for spill in (False, True):
        hw_set = ["buffer.global.size_kb=8"] if spill else []
        from isa.hw import load_hw
        session = Session(compile_model(path, CompileOptions(max_seq=32, max_ctx=64, hw=load_hw(None, hw_set))))
        for entry, tokens, past in (("prefill", 1, 0), ("prefill", 32, 0), ("prefill", 8, 20), ("decode", 1, 0),
                                    ("decode", 1, 50)):
            r = session.run(entry, numerics=False, tokens=tokens, past=past).report
            least, moved = r["min_dram_bytes_by_kind"], r["dram_bytes_by_kind"]
            assert least["weights"] > 0 and least["io"] > 0
            for kind, n in least.items():
                assert moved[kind] >= n, (entry, tokens, past, spill, kind)
            assert r["dram_bytes"] >= r["min_dram_bytes"]


def test_overhead_above_the_bound_is_named(tmp_path: Path) -> None:
    """More than 2 % above the least DRAM bytes is printed with its causes; a tiny model's
    decode step is dominated by its own instruction fetch."""
    session = Session(compile_model(EXAMPLE, CompileOptions(max_seq=8, max_ctx=32)))
    report = generate(session, [1, 2, 3], 4, numerics=False).report
    over = report["bounds"]["dram_overhead"]
    assert over["fraction"] > 0.02 and over["by_cause"]["instruction fetch"] > 0
    assert over["bytes_per_token"] == pytest.approx(sum(over["by_cause"].values()))  # no kind below its least
    text = render_text(report)
    assert "more DRAM bytes than the least: instruction fetch" in text


def test_broadcast_operands_and_rope_tables_are_read_once(tmp_path: Path) -> None:
    """A norm weight (one row broadcast over all tokens) is read once per norm, not once per row;
    RoPE reads one table row of head_dim per token, not one per head."""
    import numpy as np
    cfg = DecoderConfig(name="wide", vocab=64, hidden=256, layers=1, heads=4, kv_heads=2, intermediate=128)
    model = build_decoder_onnx(cfg, tmp_path / "wide.onnx")
    session = Session(compile_model(model, CompileOptions(max_seq=64)))
    run = session.run("prefill", numerics=False, tokens=64)
    entry = session.entry("prefill")
    op_of = np.array([entry.debug.ops[i]["op"] for i in entry.debug.instr_op])
    constants = run.costs.dram_kind_bytes["constants"]
    norms = sum(o["op"] == "rms_norm" for o in entry.debug.ops)
    assert norms == 3 and constants[op_of == "rms_norm"].sum() == norms * cfg.hidden * 4
    ropes = sum(o["op"] == "rope" for o in entry.debug.ops)
    assert ropes == 2 and constants[op_of == "rope"].sum() == ropes * 2 * 64 * cfg.head_dim * 4  # cos and sin


def test_a_windowed_layers_bound_counts_only_the_window() -> None:
    """Gemma2's genai export keeps its window-4 layer's whole cache (docs/ir.md): a decode step at
    past P reads all P cached rows of it, where the window sees only the last min(P, 3). The
    bound counts those, so the rest shows as KV cache re-read above the least."""
    from zoo_fixtures import ZOO
    session = Session(compile_model(ZOO / "gemma2_g_genai_fp32.onnx", CompileOptions(max_seq=16, max_ctx=32)))
    per_position = 2 * 2 * 16 * 4  # key and value, 2 KV heads of 16, f32
    for past in (0, 3, 16, 31):
        r = session.run("decode", numerics=False, past=past).report
        moved, least = r["dram_bytes_by_kind"]["kv_cache"], r["min_dram_bytes_by_kind"]["kv_cache"]
        assert moved == 2 * per_position * (past + 1)
        assert least == per_position * (past + 1) + per_position * (min(past, 3) + 1)
    report = generate(session, list(range(3, 12)), 8, numerics=False).report
    assert report["bounds"]["dram_overhead"]["by_cause"]["KV cache re-read"] > 0
