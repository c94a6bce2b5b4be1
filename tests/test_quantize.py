"""`--weights int8|int4`: the quantize pass, what the binary streams, what it costs, and bad options."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import EXAMPLE
from test_cli import assert_user_error

from cimc.driver import CompileOptions, compile_model
from cimc.ir.quant import rtn
from isa.binary import write_binary
from isa.cost import macros_used
from isa.hw import load_hw
from runtime.interpreter import Session

INPUTS = dict(np.load(EXAMPLE.with_suffix(".npz")))
IDS = INPUTS["input.input_ids"]
REF = INPUTS["output.logits"][0]
MODES = {"fp32": {}, "int8": {"weights": "int8"}, "int4": {"weights": "int4"},
         "int4-f32act": {"weights": "int4", "act": "fp32"}, "int4-g64": {"weights": "int4", "group_size": 64}}


@pytest.fixture(scope="module")
def sessions() -> dict[str, Session]:
    return {name: Session(compile_model(EXAMPLE, CompileOptions(max_seq=16, max_ctx=32, **opts)))
            for name, opts in MODES.items()}


def _cos_err(got: np.ndarray, want: np.ndarray) -> float:
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    return float(1 - cos.mean())


def test_rtn_puts_the_extreme_value_on_the_lowest_level() -> None:
    """Symmetric RTN: per group and column, the value of largest magnitude maps to -2^(b-1)
    exactly; every value is within half a step of its level; an all-zero group stays zero."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 5)).astype(np.float32)
    w[32:, 4] = 0
    for wt, lo, hi in (("i4", -8, 7), ("i8", -128, 127)):
        q = rtn(w, wt, 32, "f32")
        assert q.q.min() >= lo and q.q.max() <= hi
        assert q.scales.shape == (2, 5) and q.zero is None
        for g in range(2):
            block, qb = w[32 * g: 32 * g + 32], q.q[32 * g: 32 * g + 32]
            at = np.abs(block).argmax(axis=0)
            live = np.abs(block).max(axis=0) > 0
            assert (qb[at, np.arange(5)][live] == lo).all()
        err = np.abs(q.dequantize() - w)
        step = np.abs(np.repeat(q.scales, 32, axis=0))
        assert (err <= step / 2 + 1e-6).all() or wt == "i4"  # i4 clips the opposite extreme to +7
        assert (q.dequantize()[32:, 4] == 0).all() and (q.q[32:, 4] == 0).all()


def test_logit_error_grows_as_bits_shrink(sessions: dict[str, Session]) -> None:
    """fp32 matches onnxruntime; int8 is close, int4 further, neither is the float result."""
    err = {name: _cos_err(s.run("prefill", {"input_ids": IDS}).outputs["logits"][0], REF)
           for name, s in sessions.items()}
    assert err["fp32"] < 1e-9
    assert 0 < err["int8"] < err["int4"] < 0.1, err
    assert err["int4-f32act"] != err["int4"] and err["int4-f32act"] < 0.1, err  # int8 activations change it


def test_costs_follow_precision(sessions: dict[str, Session]) -> None:
    """DRAM weight bytes, macro writes, MVM input bits and macro occupancy follow the widths;
    the scales are streamed and rescaled on the SFU; bits per weight streamed are reported."""
    runs = {name: s.run("decode", numerics=False, past=3).report for name, s in sessions.items()}
    w = {name: r["dram_bytes_by_kind"]["weights"] for name, r in runs.items()}
    bits = {name: r["weights"]["bits_per_weight_streamed"] for name, r in runs.items()}
    assert bits["fp32"] == pytest.approx(32.0, abs=0.01)
    assert bits["int4"] == pytest.approx(4.5, abs=0.02)  # 4 bits + an fp16 scale per 32 weights
    assert bits["int4-g64"] == pytest.approx(4.25, abs=0.02)
    assert 8.0 < bits["int8"] < 8.6  # per channel: a scale row per tile group of 128+ rows
    assert w["fp32"] / w["int4"] == pytest.approx(32 / 4.5, rel=0.02)
    e = {name: r["energy_pj"] for name, r in runs.items()}
    assert e["fp32"]["macro_write"] / e["int4"]["macro_write"] == pytest.approx(8.0, rel=1e-6)
    assert e["fp32"]["macro_write"] / e["int8"]["macro_write"] == pytest.approx(4.0, rel=1e-6)
    # int8 inputs: 8 bit planes instead of 32; float inputs on int4 weights are priced at 32
    assert e["int4-f32act"]["mvm"] / e["int4"]["mvm"] == pytest.approx(4.0, rel=1e-6)
    assert e["int4"]["sfu"] > e["fp32"]["sfu"]  # vquant and the rescaling of partial sums
    assert runs["int4"]["weights"]["kind"] == "i4 group 32 (f16 scales), i8 inputs"
    assert macros_used(128, 128, 4, 128, 128) * 8 == macros_used(128, 128, 32, 128, 128)


def test_estimate_and_simulation_agree_at_int4(sessions: dict[str, Session]) -> None:
    for entry, past in (("prefill", 0), ("decode", 9)):
        r = sessions["int4"].run(entry, numerics=False, tokens=8 if entry == "prefill" else 1, past=past).report
        assert r["estimated_cycles"] == pytest.approx(r["cycles"], rel=0.05), (entry, r["estimated_cycles"],
                                                                               r["cycles"])


def test_mvms_of_one_linear_run_side_by_side(tmp_path: Path) -> None:
    """The MVMs of one quantized linear wait for its inputs' quantization, not for each other:
    on different tiles they overlap in time (a 2048-wide MLP has several groups per linear)."""
    from cimc.synth import DecoderConfig, build_decoder_onnx
    from isa.encoding import decode

    path = build_decoder_onnx(DecoderConfig(hidden=128, intermediate=2048, layers=1), tmp_path / "wide.onnx")
    session = Session(compile_model(path, CompileOptions(max_seq=4, weights="int4")))
    r = session.run("decode", numerics=False, past=2)
    code = decode(session.entry("decode").code)
    mvms = [i for i, ins in enumerate(code) if ins.op == "mvm"]
    by_sig: dict[int, list[int]] = {}
    for i in mvms:
        by_sig.setdefault(code[i].sig, []).append(i)
    tl = r.timeline
    overlapping = [sig for sig, ids in by_sig.items() if len(ids) > 1 and any(
        tl.start[b] < tl.end[a] for a, b in itertools.pairwise(ids))]
    assert overlapping, "every linear's MVMs ran one after another"


def test_bound_holds_for_integer_weights(sessions: dict[str, Session]) -> None:
    r = sessions["int4"].run("decode", numerics=False, past=5).report
    least, moved = r["min_dram_bytes_by_kind"], r["dram_bytes_by_kind"]
    assert 0 < least["weights"] <= moved["weights"] <= least["weights"] * 1.02


def test_quantized_compile_is_deterministic(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"m{i}.cimb")
        write_binary(paths[-1], compile_model(EXAMPLE, CompileOptions(max_seq=8, weights="int4", group_size=64)))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_generation_runs_on_integer_weights(sessions: dict[str, Session]) -> None:
    from runtime.generate import generate

    gen = generate(sessions["int4"], [1, 5, 9, 2], 6)
    assert len(gen.tokens) == 6 and all(0 <= t < REF.shape[-1] for t in gen.tokens)


QUANT_ERRORS = [
    (["--weights", "int4", "--group-size", "48"], ["group must be one of", "48"]),
    (["--weights", "int4", "--group-size", "rows"], ["--group-size 'rows'", "channel"]),
    (["--group-size", "32"], ["--group-size applies to integer weights"]),
    (["--act", "int8"], ["act i8 applies to integer weights", "--weights int8 or int4"]),
    (["--weights", "int8", "--group-size", "128"], ["group 128 does not divide the 64 rows", "node_linear"]),
    (["--weights", "int4", "--set", "macro.weight_bits=[8]"], ["4-bit weights do not fit the macros", "weight_bits"]),
    (["--weights", "int4", "--pipeline", "lift-idioms,insert-kv-cache,quantize,tile-partition,place-weights,"
      "schedule,balance-stages"], ["quantize pass in --pipeline"]),
    (["--pipeline", "lift-idioms,insert-kv-cache,quantize{bits=3},tile-partition,place-weights,schedule,"
      "balance-stages"], ["bits must be 4 or 8", "3"]),
]


@pytest.mark.parametrize(("argv", "needles"), QUANT_ERRORS, ids=lambda x: "_".join(x)[:40] if isinstance(x, list)
                         and x and x[0].startswith("-") else None)
def test_bad_quantization_options(cli, tmp_path: Path, argv: list[str], needles: list[str]) -> None:
    out = tmp_path / "m.cimb"
    res = cli("compile", EXAMPLE, "-o", out, "-q", *argv)
    assert_user_error(res, needles)
    assert not out.exists()


def test_hardware_weight_bits_are_checked_and_28nm_compiles() -> None:
    hw = load_hw("edgecim-28nm")
    program = compile_model(EXAMPLE, CompileOptions(max_seq=4, weights="int8", hw=hw))
    assert program.meta["weights"] == "i8 per channel (f16 scales), i8 inputs"


def test_cached_scales_follow_each_mvm_shape() -> None:
    """The simulator reads a group's scales once, but per shape: an MVM with other scale groups on
    the same loaded weights and scale address gets its own (a hand-written program may do this)."""
    from isa.dtypes import pack
    from isa.fields import DTYPES, REGS, WEIGHT_TYPES, Dim, Mem
    from runtime.machine import Machine
    from runtime.semantics import SEMANTICS

    k, n, rng = 32, 4, np.random.default_rng(0)
    q = rng.integers(-8, 8, (k, n))
    image = np.zeros(4096, np.uint8)
    packed = pack(q, "i4")
    image[:len(packed)] = packed
    ws = np.arange(1, 9, dtype=np.float32).reshape(2, n)  # two groups of 16 rows
    image[256:256 + ws.nbytes] = ws.view(np.uint8).reshape(-1)
    m = Machine(np.zeros(4096, np.uint8), image, np.zeros(64, np.uint8), 4096, np.zeros(len(REGS), np.int64),
                (1, 16, 128, 128), 24)
    x = rng.standard_normal((1, k)).astype(np.float32)
    m.gbuf[:x.nbytes] = x.view(np.uint8).reshape(-1)
    SEMANTICS["wload"](m, {"tile": 0, "m0": 0, "k": k, "n": n, "wt": WEIGHT_TYPES.index("i4"), "src": Mem(1, 0, n)})

    def mvm(gk: int, dst: int) -> np.ndarray:
        SEMANTICS["mvm"](m, {"tile": 0, "m0": 0, "k": k, "n": n, "wt": WEIGHT_TYPES.index("i4"),
                             "xt": DTYPES.index("f32"), "gk": gk, "acc": 0, "nvec": Dim(0, 1),
                             "wst": DTYPES.index("f32"), "dst": Mem(0, dst, n), "src": Mem(0, 0, k),
                             "xs": Mem(0, 0, 0), "ws": Mem(1, 256, n), "wz": Mem(0, 0, 0)})
        return np.array(m.view(Mem(0, dst, n), 1, n))

    np.testing.assert_allclose(mvm(0, 1024), (x @ q) * ws[0], rtol=1e-5)
    np.testing.assert_allclose(mvm(16, 2048), (x[:, :16] @ q[:16]) * ws[0] + (x[:, 16:] @ q[16:]) * ws[1], rtol=1e-5)


def test_narrow_accumulators_are_noted() -> None:
    """Worst-case int8 partial sums (64 rows x 127 x 128 here) that a narrow accumulator cannot hold
    are named in the pass notes, with the width that holds them; 24 bits hold them silently."""
    from cimc.driver import compile_module, load_module

    notes = {}
    for bits in (16, 24):
        opts = CompileOptions(max_seq=4, weights="int8", hw=load_hw(None, [f"macro.accum_bits={bits}"]))
        module, weights = load_module(EXAMPLE, opts)
        notes[bits] = compile_module(module, weights, opts)[1].notes
    assert [n for n in notes[16] if "can exceed the 16-bit accumulator" in n and "accum_bits=22" in n], notes[16]
    assert not [n for n in notes[24] if "accumulator" in n], notes[24]


def test_generate_on_a_binary_refuses_compile_options(cli, tmp_path: Path) -> None:
    binary = tmp_path / "m.cimb"
    write_binary(binary, compile_model(EXAMPLE, CompileOptions(max_seq=4, max_ctx=8)))
    res = cli("generate", binary, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--weights", "int4", "--act", "int8")
    assert_user_error(res, [f"{binary} is compiled already", "--weights, --act"])
