"""The evaluations of a sweep, in SQLite (`RUN/evals.sqlite`): one row per design point, written in
its own transaction as it completes, so a killed sweep loses nothing and `--resume` re-runs nothing.

A row holds the point's overrides as canonical JSON and their fingerprint (the key), the order the
search first asked for it (`seq`), the model (path and sha256), the cimc version, the status
(`ok`, `infeasible`: outside the space's constraints, not run; `error`: the compiler refused it,
with its message) and the metrics as JSON. The run's settings (model and its sha256, options, space, objectives,
seed) are stored once in `meta`; resuming with different settings is refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from isa.atomic import atomic_file
from isa.diag import CimcError

DB_NAME = "evals.sqlite"
CSV_NAME = "points.csv"
STATUSES = ("ok", "infeasible", "error")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evals (
    fingerprint TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    config TEXT NOT NULL,
    model TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    cimc_version TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'infeasible', 'error')),
    error TEXT,
    metrics TEXT
);
"""


def canonical(point: dict[str, object]) -> str:
    """The overrides of a point as JSON with sorted keys (floats by repr: exact on every platform)."""
    return json.dumps(point, sort_keys=True, separators=(",", ":"))


def fingerprint(point: dict[str, object]) -> str:
    """16 hex digits of sha256 over `canonical(point)`."""
    return hashlib.sha256(canonical(point).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Row:
    """One stored evaluation."""

    seq: int
    point: dict[str, object]
    status: str
    error: str | None
    metrics: dict[str, float]


class Store:
    """The SQLite store of one run folder."""

    def __init__(self, folder: Path, meta: dict[str, object], *, resume: bool) -> None:
        path = folder / DB_NAME
        if not resume and folder.exists():
            raise CimcError(f"--out {folder}: the folder exists; give a new one, or add --resume to continue the "
                            "sweep stored in it")
        if resume and not path.is_file():
            raise CimcError(f"--resume: {path} does not exist; start the sweep without --resume")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.db = sqlite3.connect(path, isolation_level=None)  # autocommit: each write is its own transaction
        self.db.executescript(_SCHEMA)
        stored = dict(self.db.execute("SELECT key, value FROM meta"))
        wanted = {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}
        if not stored:
            with self.db:
                self.db.execute("BEGIN")
                self.db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(wanted.items()))
        else:
            changed = [k for k in sorted(wanted) if stored.get(k) != wanted[k]]
            if changed:
                was = "; ".join(f"{k} was {stored.get(k)}, now {wanted[k]}" for k in changed)
                raise CimcError(f"--resume {folder}: the sweep stored there was started with other settings ({was}); "
                                "resume it with the same ones, or start a new --out")
        self.done: dict[str, Row] = {fp: row for fp, row in self._rows()}

    def _rows(self) -> Iterator[tuple[str, Row]]:
        for fp, seq, config, status, error, metrics in self.db.execute(
                "SELECT fingerprint, seq, config, status, error, metrics FROM evals ORDER BY seq"):
            yield fp, Row(seq, json.loads(config), status, error, json.loads(metrics) if metrics else {})

    def rows(self) -> list[Row]:
        """Every stored evaluation, in the order the search asked for them."""
        return sorted(self.done.values(), key=lambda r: r.seq)

    def add(self, point: dict[str, object], seq: int, model: str, model_sha256: str, version: str, status: str,
            error: str | None, metrics: dict[str, float]) -> Row:
        """Store one evaluation (one transaction)."""
        assert status in STATUSES
        row = Row(seq, point, status, error, metrics)
        self.db.execute("INSERT INTO evals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (fingerprint(point), seq, canonical(point), model, model_sha256, version, status, error,
                         json.dumps(metrics, sort_keys=True) if metrics else None))
        self.done[fingerprint(point)] = row
        return row

    def write_csv(self, keys: Sequence[str], metrics: Sequence[str], pareto: set[int]) -> Path:
        """Write `points.csv` from the store: one line per point, in `seq` order; returns its path."""
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(["seq", "fingerprint", *keys, "status", *metrics, "pareto", "error"])
        for row in self.rows():
            out.writerow([row.seq, fingerprint(row.point), *(json.dumps(row.point[k]) if isinstance(row.point[k], list)
                                                             else row.point[k] for k in keys),
                          row.status, *(repr(row.metrics[m]) if m in row.metrics else "" for m in metrics),
                          int(row.seq in pareto), row.error or ""])
        path = self.folder / CSV_NAME
        with atomic_file(path, "w", encoding="utf-8") as f:
            f.write(buf.getvalue())
        return path

    def close(self) -> None:
        """Close the database."""
        self.db.close()
