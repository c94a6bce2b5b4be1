"""The search of `cimc dse`: evaluate design points of a space on one model and keep the Pareto front.

A space no larger than the budget is swept whole, in grid order. A larger one is searched by pymoo's
NSGA-II over the axes' value indices (integer-coded), seeded, so the same seed, space and objectives
ask for the same points in the same order; a point the store holds is not evaluated again, so a
resumed sweep replays the search up to where it stopped and goes on. The budget counts distinct
compiled points (ok or error): infeasible ones cost nothing to store, so they do not use it up, but a
search visits at most INFEASIBLE_CAP times the budget in all, so a space with almost no feasible
point ends. Evaluations run on local worker processes or on a dask.distributed cluster (BACKENDS);
results are stored in the order the search asked for them, so any backend and worker count gives the
same store.

Evaluating a point compiles the model for that hardware and prices a prompt and its decode steps
without computing values, as `cimc estimate` does. A point outside the space's constraints is
stored as infeasible without being compiled; one the compiler refuses is stored with its error.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace

import numpy as np

from cimc.dse.space import METRICS, Point, Space
from cimc.dse.store import Row, Store, canonical, fingerprint
from isa.diag import CimcError
from isa.hw import HardwareConfig


@dataclass(frozen=True)
class Objective:
    """A figure of an evaluation the search can optimise; `sense` is +1 to maximise, -1 to minimise."""

    sense: int
    unit: str
    doc: str


#: What `--objectives` can name. Every evaluation records all of them.
OBJECTIVES: dict[str, Objective] = {
    "tokens_per_s": Objective(+1, "tokens/s", "decode rate"),
    "tokens_per_j": Objective(+1, "tokens/J", "decode tokens per joule"),
    "ttft_s": Objective(-1, "s", "time to first token (the prefill)"),
    **{name: Objective(-1, m.unit, m.doc) for name, m in METRICS.items()},
}
#: The default `--objectives`.
DEFAULT_OBJECTIVES = ("tokens_per_s", "tokens_per_j", "area_mm2")
#: NSGA-II's population; smaller when the budget is.
POPULATION = 20
#: Generations in a row that propose no new point before the search stops short of its budget.
STALE_GENERATIONS = 20
#: Most points (feasible or not) a search visits, as a multiple of its budget of compiled points.
INFEASIBLE_CAP = 10


def parse_objectives(text: str) -> tuple[str, ...]:
    """`tokens_per_s,area_mm2` -> its names, checked against OBJECTIVES."""
    names = tuple(n.strip() for n in text.split(","))
    known = ", ".join(f"{n} ({'max' if o.sense > 0 else 'min'}imised, {o.unit})" for n, o in OBJECTIVES.items())
    for name in names:
        if name not in OBJECTIVES:
            raise CimcError(f"--objectives: unknown objective '{name}'; the objectives are {known}")
    if len(set(names)) != len(names):
        raise CimcError(f"--objectives {text}: an objective is listed twice")
    if len(names) < 2:
        raise CimcError(f"--objectives {text}: give at least two objectives to trade off")
    return names


@dataclass(frozen=True)
class Task:
    """What a worker needs to evaluate one point."""

    model: str
    options: object  # cimc.driver.CompileOptions; its hw is replaced by each point's
    prompt: int
    new_tokens: int


def evaluate(task: Task, hw: HardwareConfig) -> tuple[str, str | None, dict[str, float]]:
    """Compile and price `task` on `hw`: (status, error, metrics). Runs in a worker process."""
    from cimc.driver import compile_module, load_module
    from runtime.generate import generate
    from runtime.interpreter import Session

    opts = replace(task.options, hw=hw)
    try:
        module, weights = load_module(task.model, opts, need_weights=True)
        assert weights is not None
        session = Session(compile_module(module, weights, opts)[0], hw, name=task.model)
    except CimcError as e:
        return "error", e.message, {}
    report = generate(session, [0] * task.prompt, task.new_tokens, numerics=False).report
    metrics = {"tokens_per_s": report["decode"]["tokens_per_s"], "tokens_per_j": report["decode"]["tokens_per_j"],
               "ttft_s": report["ttft_s"], **{name: m.of(hw) for name, m in METRICS.items()}}
    assert set(metrics) == set(OBJECTIVES)
    return "ok", None, metrics


def file_sha256(path: str) -> str:
    """sha256 of a model file, read in chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise CimcError(f"{path}: cannot read ({e.strerror})") from None
    return h.hexdigest()


@contextmanager
def _local(workers: int, address: str | None) -> Iterator[Executor | None]:
    """Worker processes on this machine (none: evaluate in this process when there is one worker)."""
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        yield pool
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


@contextmanager
def _dask(workers: int, address: str | None) -> Iterator[Executor | None]:
    """A dask.distributed client of the scheduler at `address`, else of a LocalCluster of `workers` processes."""
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if address is None:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.ERROR)
        client = Client(cluster if cluster is not None else address, timeout=10)
    except (OSError, TimeoutError) as e:
        if cluster is not None:
            cluster.close()
        raise CimcError(f"--backend dask: cannot reach the scheduler {address or 'LocalCluster'} ({e})") from None
    try:
        yield client.get_executor()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


#: What `--backend` can name: each opens the executor a sweep submits its evaluations to (None: not built yet).
BACKENDS: dict[str, Callable[[int, str | None], AbstractContextManager[Executor | None]] | None] = {
    "local": _local, "dask": _dask, "ray": None}


def check_backend(backend: str, address: str | None) -> None:
    """Raise CimcError if `backend` cannot run here (called before a run folder is made)."""
    if BACKENDS[backend] is None:
        raise CimcError(f"--backend {backend}: not built yet; use " + " or ".join(n for n, b in BACKENDS.items() if b))
    if address is not None and backend != "dask":
        raise CimcError(f"--address {address} names a dask scheduler: give it with --backend dask")
    if backend == "dask":
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise CimcError("--backend dask needs dask.distributed: pip install 'cimc[dask]'") from None


@dataclass
class Sweep:
    """One sweep: its space, objectives, store and the workers evaluating its points."""

    space: Space
    task: Task
    objectives: tuple[str, ...]
    store: Store
    version: str
    workers: int = 1
    on_evaluated: Callable[[Row], None] | None = None  # after each stored evaluation (progress, tests)
    backend: str = "local"
    address: str | None = None  # a dask scheduler's; None starts a LocalCluster

    def __post_init__(self) -> None:
        self.model_sha256 = file_sha256(self.task.model)
        self.evaluated = 0  # points evaluated (not read from the store) by this sweep

    def run(self, budget: int, seed: int) -> list[Row]:
        """Compile up to `budget` distinct points (grid or NSGA-II, as the module says); returns the
        rows of the points asked for, in order."""
        check_backend(self.backend, self.address)
        opened = BACKENDS[self.backend]
        assert opened is not None
        with opened(self.workers, self.address) as pool:
            if self.space.size <= budget:
                return self._batch(list(self.space.points()), pool)
            return self._nsga2(budget, seed, pool)

    def feasible(self, point: Point) -> bool:
        """Whether `point` meets the space's constraints (and so is compiled)."""
        return self.space.feasible(self.space.config(point))

    def _batch(self, points: Sequence[Point], pool: Executor | None) -> list[Row]:
        """The rows of `points`: stored ones read, the others evaluated and stored in order."""
        points = [_normal(p) for p in points]
        todo: dict[str, tuple[Point, HardwareConfig]] = {}
        for point in points:
            fp = fingerprint(point)
            if fp not in self.store.done and fp not in todo:
                todo[fp] = (point, self.space.config(point))
        infeasible = ("infeasible", None, {})
        if pool is None:
            for point, hw in todo.values():
                self._add(point, evaluate(self.task, hw) if self.space.feasible(hw) else infeasible)
        else:
            futures = [(point, pool.submit(evaluate, self.task, hw) if self.space.feasible(hw) else None)
                       for point, hw in todo.values()]
            for point, future in futures:  # stored in the order asked, whichever finishes first
                self._add(point, future.result() if future is not None else infeasible)
        return [self.store.done[fingerprint(p)] for p in points]

    def _add(self, point: Point, result: tuple[str, str | None, dict[str, float]]) -> None:
        row = self.store.add(point, len(self.store.done), self.task.model, self.model_sha256, self.version, *result)
        self.evaluated += 1
        if self.on_evaluated is not None:
            self.on_evaluated(row)

    def _nsga2(self, budget: int, seed: int, pool: Executor | None) -> list[Row]:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.operators.crossover.sbx import SBX
        from pymoo.operators.mutation.pm import PM
        from pymoo.operators.repair.rounding import RoundingRepair
        from pymoo.operators.sampling.rnd import IntegerRandomSampling

        axes = self.space.axes
        problem = Problem(n_var=len(axes), n_obj=len(self.objectives), n_ieq_constr=1, xl=0,
                          xu=np.array([len(a.values) - 1 for a in axes]), vtype=int)
        algorithm = NSGA2(pop_size=min(POPULATION, budget), sampling=IntegerRandomSampling(),
                          crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                          mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
        algorithm.setup(problem, seed=seed, verbose=False)
        asked: list[Row] = []
        known: set[str] = set()
        compiled = stale = 0
        while compiled < budget and len(known) < INFEASIBLE_CAP * budget and stale < STALE_GENERATIONS:
            population = algorithm.ask()
            points = [_normal({a.key: a.values[int(v)] for a, v in zip(axes, x, strict=True)})
                      for x in population.get("X")]
            by_key = {canonical(p): p for p in points}
            fresh = [c for c in by_key if c not in known]
            allowed = []
            for c in fresh:  # in order, until the budget or the cap is reached
                if compiled == budget or len(known) + len(allowed) == INFEASIBLE_CAP * budget:
                    break
                allowed.append(c)
                compiled += self.feasible(by_key[c])
            stale = 0 if fresh else stale + 1
            run = [p for p in points if canonical(p) in known or canonical(p) in set(allowed)]
            rows = {canonical(p): r for p, r in zip(run, self._batch(run, pool), strict=True)}
            known.update(allowed)
            asked += [rows[c] for c in allowed]
            if len(run) < len(points):  # the budget cut this generation short: nothing more to tell
                break
            f, g = zip(*(self._fitness(rows[canonical(p)]) for p in points), strict=True)
            population.set("F", np.array(f, dtype=float), "G", np.array(g, dtype=float)[:, None])
            algorithm.tell(infills=population)
        return asked

    def _fitness(self, row: Row) -> tuple[list[float], float]:
        """pymoo minimises F subject to G <= 0: a failed or infeasible point violates G."""
        if row.status != "ok":
            return [0.0] * len(self.objectives), 1.0
        return [-OBJECTIVES[o].sense * row.metrics[o] for o in self.objectives], 0.0


def pareto(rows: Sequence[Row], objectives: Sequence[str]) -> list[Row]:
    """The rows of status ok that no other ok row dominates (ties kept), in `seq` order."""
    ok = [r for r in rows if r.status == "ok"]
    scores = [[OBJECTIVES[o].sense * r.metrics[o] for o in objectives] for r in ok]

    def dominated(i: int) -> bool:
        return any(all(a >= b for a, b in zip(other, scores[i], strict=True)) and other != scores[i]
                   for other in scores)

    return sorted((r for i, r in enumerate(ok) if not dominated(i)), key=lambda r: r.seq)


def render_front(front: Sequence[Row], keys: Sequence[str], objectives: Sequence[str]) -> str:
    """The Pareto points as a text table: the varied keys, then the objectives."""
    header = ["seq", *keys, *(f"{o} ({OBJECTIVES[o].unit})" for o in objectives)]
    body = [[str(r.seq), *(_show(r.point[k]) for k in keys), *(f"{r.metrics[o]:.6g}" for o in objectives)]
            for r in front]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *body]) + "\n"


def default_workers() -> int:
    """One worker per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _normal(point: Point) -> Point:
    """A point as the store reads it back (tuples as lists), so that both compare equal."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in point.items()}


def _show(value: object) -> str:
    return str(value) if not isinstance(value, float) or not math.isfinite(value) else f"{value:g}"

