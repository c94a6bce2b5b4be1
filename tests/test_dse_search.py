"""`cimc dse`: the grid and NSGA-II searches, the budget of compiled points, the SQLite store and resume,
worker-count and backend determinism (dask on a LocalCluster), and its option errors, on the tiny llama config
(each point compiles and prices in well under 0.1 s)."""

from __future__ import annotations

import csv
import sqlite3
import sys
from pathlib import Path

import pytest

from cimc.cli import _progress, main
from cimc.driver import CompileOptions
from cimc.dse import search
from cimc.dse.search import OBJECTIVES, Sweep, Task, pareto
from cimc.dse.space import load_space
from cimc.dse.store import CSV_NAME, DB_NAME, Row, Store, fingerprint

REPO = Path(__file__).resolve().parents[1]
MODEL = str(REPO / "tests/zoo/configs/llama/config.json")
OBJ = ("tokens_per_s", "tokens_per_j", "area_mm2")
# 8 points; the area budget rules out the 16-tile, 1024-bit ones (90 mm2)
GRID = """\
[space]
"chip.tiles" = [8, 16]
"noc.link_bits" = [512, 1024]
"dram.peak_gbps" = [51.2, 136.5]
[constraints]
area_mm2 = { max = 80.0 }
"""
# 36 points, more than the budgets below: NSGA-II
LARGE = """\
[space]
"chip.tiles" = [8, 12, 16]
"noc.link_bits" = [512, 1024]
"dram.peak_gbps" = [51.2, 102.4, 136.5]
"sfu.lanes" = [16, 32]
"""
FAST = ["--prompt", "4", "--new-tokens", "3"]


def sweep(tmp_path: Path, text: str, out: str = "run", *, resume: bool = False, workers: int = 1,
          on_evaluated=None) -> Sweep:
    space_file = tmp_path / "space.toml"
    space_file.write_text(text)
    store = Store(tmp_path / out, {"space": text}, resume=resume)
    task = Task(MODEL, CompileOptions(max_seq=4, max_ctx=6, weights="int4"), 4, 3)
    return Sweep(load_space(space_file), task, OBJ, store, "test", workers, on_evaluated)


def dominates(a: Row, b: Row) -> bool:
    better = [OBJECTIVES[o].sense * (a.metrics[o] - b.metrics[o]) for o in OBJ]
    return all(d >= 0 for d in better) and any(d > 0 for d in better)


def test_grid_finds_the_pareto_set(tmp_path: Path) -> None:
    s = sweep(tmp_path, GRID)
    rows = s.run(budget=8, seed=0)
    assert [r.seq for r in rows] == list(range(8)) and s.evaluated == 8
    assert [r.point for r in rows] == list(s.space.points())  # grid order
    status = [r.status for r in rows]
    assert status == ["ok"] * 6 + ["infeasible"] * 2 and all(not r.metrics for r in rows[6:])
    ok = [r for r in rows if r.status == "ok"]
    brute = [r for r in ok if not any(dominates(o, r) for o in ok)]
    front = pareto(s.store.rows(), OBJ)
    assert front == brute and 0 < len(front) < len(ok)
    # the store holds the same rows, with config, fingerprint, model hash and version
    db = sqlite3.connect(tmp_path / "run" / DB_NAME)
    stored = db.execute("SELECT seq, fingerprint, config, model_sha256, cimc_version, status FROM evals ORDER BY seq")
    for (seq, fp, config, sha, version, st), row in zip(stored, rows, strict=True):
        assert (seq, fp, st, version) == (row.seq, fingerprint(row.point), row.status, "test") and len(sha) == 64
        assert '"chip.tiles":' in config
    # a second run evaluates nothing
    s.store.close()
    again = sweep(tmp_path, GRID, resume=True)
    assert again.run(budget=8, seed=0) == rows and again.evaluated == 0


def test_nsga2_is_seeded(tmp_path: Path) -> None:
    def points(seed: int, out: str) -> list[dict]:
        s = sweep(tmp_path, LARGE, out)
        rows = s.run(budget=10, seed=seed)
        assert len(rows) == 10 == s.evaluated and len({fingerprint(r.point) for r in rows}) == 10
        return [r.point for r in rows]

    first = points(1, "a")
    assert points(1, "b") == first
    assert points(2, "c") != first


def test_resume_loses_and_repeats_nothing(tmp_path: Path) -> None:
    class Killed(Exception):
        pass

    seen: list[str] = []

    def kill_after(k: int):
        def hook(row: Row) -> None:
            seen.append(fingerprint(row.point))
            if len(seen) == k:
                raise Killed
        return hook

    with pytest.raises(Killed):
        sweep(tmp_path, LARGE, on_evaluated=kill_after(4)).run(budget=10, seed=5)
    assert len(seen) == 4
    resumed = sweep(tmp_path, LARGE, resume=True, on_evaluated=kill_after(-1))
    rows = resumed.run(budget=10, seed=5)
    assert resumed.evaluated == 6 and len(seen) == 10 == len(set(seen))
    assert {fingerprint(r.point) for r in rows} == set(seen)
    whole = sweep(tmp_path, LARGE, "whole").run(budget=10, seed=5)  # the same as a sweep never killed
    assert [(r.seq, r.point, r.metrics) for r in whole] == [(r.seq, r.point, r.metrics) for r in rows]


def test_cli_results_do_not_depend_on_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "space.toml").write_text(LARGE)
    outputs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["dse", MODEL, "--space", str(tmp_path / "space.toml"), "--budget", "6", "--seed", "3",
                     "--workers", str(workers), "--out", str(out), "--weights", "int4", *FAST]) == 0
        outputs.append(((out / CSV_NAME).read_text(), capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    table, front = outputs[0]
    lines = list(csv.DictReader(table.splitlines()))
    assert len(lines) == 6 and {line["status"] for line in lines} == {"ok"}
    assert front.startswith(f"Pareto front ({sum(line['pareto'] == '1' for line in lines)} of 6 evaluated point(s))")


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "0"], "--budget 0: must be >= 1"),
    (["--new-tokens", "1"], "--new-tokens 1: must be >= 2"),
    (["--objectives", "tokens_per_s,speed"], "unknown objective 'speed'"),
    (["--objectives", "tokens_per_s"], "at least two objectives"),
    (["--workers", "0"], "--workers 0: must be >= 1"),
])
def test_cli_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    (tmp_path / "space.toml").write_text(GRID)
    base = ["dse", MODEL, "--space", str(tmp_path / "space.toml"), "--budget", "8", "--out", str(tmp_path / "r")]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "r").exists()


def test_cli_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "space.toml"
    space.write_text(GRID)
    out = str(tmp_path / "r")
    base = ["dse", MODEL, "--space", str(space), "--budget", "8", "--out", out, *FAST]
    assert main(["dse", MODEL, "--space", str(space), "--budget", "8"]) == 2
    assert "give --out RUN_FOLDER" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 2
    assert "does not exist; start the sweep without --resume" in capsys.readouterr().err
    assert main(["dse", str(tmp_path / "nope.json"), "--space", str(space), "--budget", "8", "--out", out]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert main(base) == 0
    assert main(base) == 2
    assert "the folder exists" in capsys.readouterr().err
    assert main([*base, "--resume", "--seed", "9"]) == 2
    assert "seed was 0, now 9" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 0
    assert "0 evaluated by this run" in capsys.readouterr().err


def test_cli_resume_refuses_a_changed_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space, model = tmp_path / "space.toml", tmp_path / "config.json"
    space.write_text(GRID)
    model.write_text(Path(MODEL).read_text())
    base = ["dse", str(model), "--space", str(space), "--budget", "8", "--out", str(tmp_path / "r"), *FAST]
    assert main(base) == 0
    model.write_text(Path(MODEL).read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 1'))
    capsys.readouterr()
    assert main([*base, "--resume"]) == 2
    assert "model_sha256 was" in capsys.readouterr().err


def test_budget_counts_compiled_points_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 12 of the 36 points fit 60 mm2: infeasible points are stored but leave the budget to compiled ones
    s = sweep(tmp_path, LARGE + "[constraints]\narea_mm2 = { max = 60.0 }\n", "some")
    rows = s.run(budget=6, seed=3)
    status = [r.status for r in rows]
    assert status.count("ok") == 6 and status.count("infeasible") > 0 and len(rows) == 6 + status.count("infeasible")
    assert [s.feasible(r.point) for r in rows] == [st == "ok" for st in status]
    # no point fits 1 mm2: the search stops at the cap of points visited (lowered to 2x so that NSGA-II, which
    # would go on to 24 of the 36 points, reaches it)
    monkeypatch.setattr(search, "INFEASIBLE_CAP", 2)
    s = sweep(tmp_path, LARGE + "[constraints]\narea_mm2 = { max = 1.0 }\n", "none")
    rows = s.run(budget=6, seed=3)
    assert len(rows) == 2 * 6 == s.evaluated and {r.status for r in rows} == {"infeasible"}


def test_cli_dask_backend_matches_local(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "space.toml").write_text(LARGE)
    tables = []
    for backend, workers in (("local", "1"), ("dask", "2")):
        out = tmp_path / backend
        assert main(["dse", MODEL, "--space", str(tmp_path / "space.toml"), "--budget", "6", "--seed", "3",
                     "--backend", backend, "--workers", workers, "--out", str(out), "--weights", "int4", *FAST]) == 0
        tables.append((out / CSV_NAME).read_text())
    err = capsys.readouterr().err
    assert "2 dask worker(s)" in err and "eval/s" not in err  # no progress bar when stderr is not a terminal
    assert tables[0] == tables[1] and len(tables[0].splitlines()) == 7


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "dask"], "--backend dask needs dask.distributed: pip install 'cimc[dask]'"),
    (["--backend", "ray"], "--backend ray: not built yet; use local or dask"),
    (["--address", "tcp://127.0.0.1:8786"], "give it with --backend dask"),
])
def test_cli_backend_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                            args: list[str], message: str) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if dask were not installed: importing it fails
    (tmp_path / "space.toml").write_text(GRID)
    assert main(["dse", MODEL, "--space", str(tmp_path / "space.toml"), "--budget", "8", "--out",
                 str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "r").exists()


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = sweep(tmp_path, GRID)
    with _progress(s, 8, "tokens_per_s", disable=False):  # as on a terminal
        rows = s.run(budget=8, seed=0)
    best = max(r.metrics["tokens_per_s"] for r in rows if r.status == "ok")
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "6/6 [" in bar and "eval/s" in bar and f"best tokens_per_s {best:.4g} tokens/s, 2 infeasible" in bar
