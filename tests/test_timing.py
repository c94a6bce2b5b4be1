"""Timing and energy: hazard-free timelines, estimate vs simulation, and the cost formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_fixtures import EXAMPLE

from cimc.driver import CompileOptions, compile_model
from isa.binary import read_binary, write_binary
from isa.cost import COMPONENTS, CostModel
from isa.encoding import decode_columns
from isa.hw import load_hw
from runtime.hazards import find_hazards
from runtime.interpreter import simulate

IDS = np.load(EXAMPLE.with_suffix(".npz"))["input.input_ids"]

HW_VARIANTS = {
    "default": [],
    "spill-to-dram": ["buffer.global.size_kb=4"],
    "two-tiles": ["chip.tiles=2"],
    "one-macro-per-tile": ["chip.tiles=3", "chip.macros_per_tile=1"],
    "28nm": None,
}


def _hw(name: str):
    return load_hw("edgecim-28nm") if HW_VARIANTS[name] is None else load_hw(None, HW_VARIANTS[name])


@pytest.mark.parametrize("variant", sorted(HW_VARIANTS))
def test_timeline_respects_every_dependency(variant: str) -> None:
    """Every memory/macro access conflict in the numeric run is ordered in simulated time."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=16, hw=_hw(variant)))
    r = simulate(program, {"input_ids": IDS}, trace_accesses=True)
    assert r.accesses
    hazards = find_hazards(r.accesses, r.timeline)
    assert not hazards, "\n".join(map(str, hazards))


def test_hazard_checker_catches_a_missing_barrier() -> None:
    """Drop every wait mask: the checker must then find violations (so it is not vacuous)."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=16))
    entry = program.entry()
    words = np.frombuffer(entry.code, dtype="<u8").reshape(-1, 8).copy()
    words[:, 1] = 0
    entry.code = words.tobytes()
    r = simulate(program, {"input_ids": IDS}, trace_accesses=True)
    assert find_hazards(r.accesses, r.timeline)


def test_compiler_estimate_tracks_the_simulation() -> None:
    """balance-stages' pipeline estimate (same cost model) is within 30 % of the simulated time."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=16))
    ids = np.resize(IDS, (1, 16))
    r = simulate(program, {"input_ids": ids})
    est, sim = program.entry().meta["balance"]["est_cycles"], r.report["cycles"]
    assert 0.7 < est / sim < 1.3, (est, sim)


def test_timing_only_equals_timing_of_the_numeric_run() -> None:
    program = compile_model(EXAMPLE, CompileOptions(max_seq=16))
    full = simulate(program, {"input_ids": IDS})
    fast = simulate(program, numerics=False, tokens=IDS.shape[1])
    assert fast.report["cycles"] == full.report["cycles"]
    assert fast.report["joules"] == full.report["joules"]
    assert fast.outputs == {}


def test_more_tokens_cost_more_and_energy_adds_up() -> None:
    program = compile_model(EXAMPLE, CompileOptions(max_seq=32))
    one, many = (simulate(program, numerics=False, tokens=n).report for n in (1, 32))
    assert many["cycles"] > one["cycles"] and many["joules"] > one["joules"]
    for r in (one, many):
        assert set(r["energy_pj"]) == {*COMPONENTS, "leakage"}
        assert r["joules"] == pytest.approx(sum(r["energy_pj"].values()) * 1e-12)
        assert r["seconds"] == pytest.approx(r["cycles"] / 200e6)
        assert list(r["layers"]) == ["embed", "layer0", "layer1", "head"]
        layer_energy = sum(d["energy_pj"] for d in r["layers"].values())
        assert layer_energy == pytest.approx(sum(v for k, v in r["energy_pj"].items() if k != "leakage"))


def test_energy_figures_follow_the_hardware_description() -> None:
    """Doubling DRAM pJ/bit doubles DRAM energy exactly; the 28 nm preset is cheaper and faster."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=8))
    base = simulate(program, numerics=False, tokens=8).report
    dear = simulate(program, numerics=False, tokens=8,
                    hw=load_hw(None, ["dram.e_read_pj_per_bit=16", "dram.e_write_pj_per_bit=16"])).report
    assert dear["energy_pj"]["dram"] == pytest.approx(2 * base["energy_pj"]["dram"])
    assert dear["cycles"] == base["cycles"]
    fine = simulate(program, numerics=False, tokens=8, hw=load_hw("edgecim-28nm")).report
    assert fine["seconds"] < base["seconds"] and fine["joules"] < base["joules"]


def test_weight_load_cost_formula() -> None:
    """A wload moves k*n*wbits/8 bytes: DRAM time = bytes / (peak * efficiency), energy 8 pJ/bit."""
    hw = load_hw()
    program = compile_model(EXAMPLE, CompileOptions(max_seq=8, hw=hw))
    cols = decode_columns(program.entry().code)
    costs = CostModel(hw).instr_costs(cols, np.array([0, 8, 0, 8]))
    idx = cols.rows["wload"]
    f = cols.fields["wload"]
    nbytes = (f["k"] * f["n"] * f["wbits"] // 8).astype(float)
    seconds = nbytes / (hw.dram.peak_gbps * 1e9 * hw.dram.efficiency)
    assert np.allclose(costs.busy1[idx], seconds * hw.chip.f_clk_mhz * 1e6)
    assert np.allclose(costs.energy["dram"][idx], nbytes * 8 * hw.dram.e_read_pj_per_bit)
    assert np.all(costs.busy0[idx] >= costs.busy1[idx])


def test_binaries_are_deterministic(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.cimb")
        write_binary(paths[-1], compile_model(EXAMPLE, CompileOptions(max_seq=16)))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert read_binary(paths[0], verify_dram=True).n_instrs > 0


def test_balanced_schedule_decodes_faster_than_naive() -> None:
    """Ping-pong stages overlap weight loads with compute; one macro set cannot (same bytes moved)."""
    from cimc.driver import SCHEDULES
    from runtime.generate import generate
    from runtime.interpreter import Session

    reports = {}
    for name, pipeline in SCHEDULES.items():
        program = compile_model(EXAMPLE, CompileOptions(max_seq=8, max_ctx=16, pipeline=pipeline))
        reports[name] = generate(Session(program), [1] * 8, 6, numerics=False).report
    fast, slow = reports["balanced"]["decode"], reports["naive"]["decode"]
    assert fast["dram_bytes_per_token"]["total"] == slow["dram_bytes_per_token"]["total"]
    assert fast["tokens_per_s"] > slow["tokens_per_s"]


def test_dram_traffic_of_copies_and_gathers() -> None:
    """The DRAM channel carries every DRAM side of a copy (a DRAM -> DRAM copy twice) and a
    gather's table rows plus its destination when that is spilled to DRAM."""
    from isa.encoding import Instr, encode
    from isa.fields import Dim, Mem
    hw = load_hw()
    cm = CostModel(hw)
    bpc = hw.dram.peak_gbps * 1e9 * hw.dram.efficiency / (hw.chip.f_clk_mhz * 1e6)
    buf, dram = 0, 1
    rows, cols = 4, 64
    nbytes = rows * cols * 4

    def copy(dst: int, src: int) -> Instr:
        return Instr("dma", {"dst": Mem(dst, 0x100, cols), "src": Mem(src, 0x4000, cols), "rows": Dim(0, rows),
                             "cols": Dim(0, cols), "dt": "f32"})

    def gather(dst: int) -> Instr:
        return Instr("gather", {"dst": Mem(dst, 0x100, cols), "table": Mem(dram, 0x8000, cols),
                                "idx": Mem(buf, 0x2000, 1), "n": Dim(0, rows), "cols": Dim(0, cols), "vocab": 16})

    instrs = [copy(buf, dram), copy(dram, buf), copy(dram, dram), gather(buf), gather(dram)]
    costs = cm.instr_costs(decode_columns(encode(instrs)), np.array([0, 1, 0, 1]))
    assert np.allclose(costs.busy0[:5], np.array([1, 1, 2, 1, 2]) * nbytes / bpc)
    assert list(costs.dram_bytes[:5]) == [nbytes, nbytes, 2 * nbytes, nbytes, 2 * nbytes]
