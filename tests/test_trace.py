"""Chrome trace export: layout, times, back-to-back runs, size limit, atomic writes, and the
pipeline overlap the trace exists to show."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import EXAMPLE

from isa.diag import CimcError
from runtime.trace import TraceRun, write_trace

UNITS = ["dram0", "dram1", "bus.down", "tile0", "tile1", "sfu0", "sfu1"]
F_CLK = 1e9  # 1 cycle = 1 ns = 0.001 us
OPS = [{"op": "linear", "loc": "node_linear_3", "layer": "layer0"},
       {"op": "silu", "loc": "node_silu_1", "layer": "layer0"},
       {"op": "program", "loc": "", "layer": ""}]
NAMES = ["wload", "mvm", "dma", "vsilu", "mvm", "sync", "halt"]


def _run(label: str = "prefill (8 tokens)", shift: float = 0.0) -> TraceRun:
    """A code fetch on dram0; wload tile0 (+dram0, bus), mvm tile0, dma on dram1, vsilu on sfu1,
    mvm tile1 (+dram1 operand); sync and halt hold nothing."""
    events = [  # instr (-1: fetch of block 0), start, unit, busy
        (-1, 0, 0, 20),
        (0, 20, 3, 100), (0, 20, 0, 80), (0, 20, 2, 60),
        (1, 120, 3, 50),
        (2, 100, 1, 40),
        (3, 170, 6, 25.5),
        (4, 140, 4, 30), (4, 140, 1, 10),
    ]
    instr, start, unit, busy = (np.array(x) for x in zip(*events, strict=True))
    return TraceRun(label, 195.5, start.astype(float) + shift, busy.astype(float), unit, instr, NAMES, OPS,
                    np.array([0, 0, 0, 1, 0, 2, 2]))


def _load(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    assert doc["displayTimeUnit"] in ("ns", "ms")
    return doc["traceEvents"]


def _tracks(events: list[dict]) -> dict[int, str]:
    return {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}


def _slices(events: list[dict], track: str) -> list[dict]:
    tid = {name: t for t, name in _tracks(events).items()}[track]
    return [e for e in events if e["ph"] == "X" and e["tid"] == tid]


def test_layout_and_times(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    n = write_trace(out, [_run()], UNITS, F_CLK)
    events = _load(out)
    assert n == len(events)
    assert {e["pid"] for e in events} == {1}
    assert [e["args"]["name"] for e in events if e["name"] == "process_name"] == ["cimc simulator"]
    tracks = _tracks(events)
    order = {e["tid"]: e["args"]["sort_index"] for e in events if e["name"] == "thread_sort_index"}
    assert [tracks[t] for t in sorted(tracks, key=order.get)] == ["runs", "dram0", "dram1", "bus.down", "tile0",
                                                                  "tile1", "sfu1"]

    def seen(track: str) -> list[tuple]:
        return [(e["name"], e["ts"], e["dur"], e["args"].get("instr", e["args"].get("block"))) for e in
                _slices(events, track)]

    assert sorted(seen("tile0")) == [("mvm", 0.12, 0.05, 1), ("wload", 0.02, 0.1, 0)]
    assert seen("tile1") == [("mvm", 0.14, 0.03, 4)]
    assert seen("sfu1") == [("vsilu", 0.17, 0.026, 3)]  # 25.5 cycles rounds to 26 ns
    assert seen("dram0") == [("fetch", 0.0, 0.02, 0), ("wload", 0.02, 0.08, 0)]
    assert sorted(seen("dram1")) == [("dma", 0.1, 0.04, 2), ("mvm", 0.14, 0.01, 4)]
    assert seen("bus.down") == [("wload", 0.02, 0.06, 0)]
    wload = next(e for e in _slices(events, "tile0") if e["name"] == "wload")
    assert wload["args"] == {"instr": 0, "op": "linear", "onnx": "node_linear_3", "layer": "layer0", "cycles": 100.0}
    assert next(e for e in _slices(events, "sfu1"))["args"]["cycles"] == 25.5
    assert next(e for e in _slices(events, "dram0"))["args"] == {"block": 0, "cycles": 20.0}
    (run,) = _slices(events, "runs")
    assert (run["name"], run["ts"], run["dur"]) == ("prefill (8 tokens)", 0.0, 0.196)
    assert run["args"]["instructions"] == run["args"]["instructions_drawn"] == 7
    assert not [e for e in events if e["ph"] == "X" and e["name"] in ("sync", "halt")]


def test_runs_back_to_back_and_clock(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    write_trace(out, [_run("prefill"), _run("decode step 0", shift=10)], UNITS, 200e6)  # 5 ns per cycle
    events = _load(out)
    first, second = _slices(events, "runs")
    assert (first["ts"], first["dur"], second["ts"]) == (0.0, 0.978, 0.978)  # 195.5 cycles = 977.5 ns
    assert second["dur"] == pytest.approx(195.5 * 0.005, abs=1e-3)
    runs_tid = {n: t for t, n in _tracks(events).items()}["runs"]
    work = [e for e in events if e["ph"] == "X" and e["tid"] != runs_tid]
    assert len(work) == 2 * 9
    assert all(e["ts"] >= second["ts"] for e in work[9:])
    assert all(e["ts"] + e["dur"] <= first["ts"] + first["dur"] + 1e-9 for e in work[:9])
    assert min(e["ts"] for e in work[9:]) == pytest.approx((195.5 + 10) * 0.005, abs=1e-3)


def test_deterministic_and_atomic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_trace(a, [_run(), _run("decode")], UNITS, F_CLK)
    write_trace(b, [_run(), _run("decode")], UNITS, F_CLK)
    assert a.read_bytes() == b.read_bytes()
    write_trace(a, [_run()], UNITS, F_CLK)  # overwrites in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_write_errors(tmp_path: Path) -> None:
    with pytest.raises(CimcError, match=r"cannot write .*missing.*t\.json: "):
        write_trace(tmp_path / "missing" / "t.json", [_run()], UNITS, F_CLK)
    bad = _run()
    bad.unit[0] = len(UNITS)
    with pytest.raises(ValueError, match="unit"):
        write_trace(tmp_path / "t.json", [bad], UNITS, F_CLK)
    assert not list(tmp_path.iterdir())


def test_max_events_samples_runs_and_marks_all(tmp_path: Path) -> None:
    runs = [_run(f"decode step {k}") for k in range(10)]
    out = tmp_path / "t.json"
    full = write_trace(out, runs, UNITS, F_CLK)
    limit = full // 3
    n = write_trace(out, runs, UNITS, F_CLK, max_events=limit)
    events = _load(out)
    assert n == len(events) <= limit
    marks = _slices(events, "runs")
    assert [e["name"] for e in marks] == [r.label for r in runs]
    drawn = [e["args"]["instructions_drawn"] for e in marks]
    assert drawn[0] == 7 and 0 in drawn
    assert all("not drawn" in e["args"]["note"] for e in marks if e["args"]["instructions_drawn"] < 7)
    # tiny limit: the first run is cut to its leading instructions, every run still marked
    n = write_trace(out, runs, UNITS, F_CLK, max_events=31)
    events = _load(out)
    assert n == len(events) <= 31
    assert len(_slices(events, "runs")) == 10
    assert 0 < _slices(events, "runs")[0]["args"]["instructions_drawn"] < 7


def test_real_pipeline_shows_weight_loads_overlapping_mvms(tmp_path: Path) -> None:
    from cimc.driver import CompileOptions, compile_model
    from runtime.interpreter import Session

    session = Session(compile_model(EXAMPLE, CompileOptions(max_seq=16)))
    run = session.trace_run(session.run(numerics=False, tokens=8), "prefill (8 tokens)")
    cost = session.cost
    out = tmp_path / "tiny.json"
    write_trace(out, [run], cost.unit_names(), cost.f_hz)
    events = _load(out)
    loads = [(e["ts"], e["ts"] + e["dur"]) for e in _slices(events, "dram0") if e["name"] == "wload"]
    tiles = [t for t in _tracks(events).values() if t.startswith("tile")]
    mvms = [(e["ts"], e["ts"] + e["dur"]) for t in tiles for e in _slices(events, t) if e["name"] == "mvm"]
    assert loads and mvms
    assert any(a0 < b1 and b0 < a1 for a0, a1 in loads for b0, b1 in mvms)
    # slices on one unit never overlap (Perfetto would drop badly nested ones)
    for track in _tracks(events).values():
        spans = sorted((round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)) for e in _slices(events, track))
        assert all(prev[1] <= nxt[0] for prev, nxt in pairwise(spans)), track
