"""The design space of a search: a base hardware description, the values each varied key takes, and budgets.

A space file is TOML:

    hw = "edgecim-65nm"                  # the base: a preset, or a hardware TOML relative to this file
    [space]                              # any key of isa.hw.SCHEMA, as `--set` names it
    "chip.tiles" = [8, 16, 32]                               # these values, in this order
    "macro.rows" = { range = [64, 256], step = 64 }          # lo, lo + step, ... up to hi
    "dram.peak_gbps" = { log = [51.2, 204.8], points = 3 }   # geometric, both ends included
    [constraints]
    area_mm2 = { max = 80.0 }            # a key of METRICS, with `min` and/or `max`

`hw` defaults to `edgecim-65nm`. The grid is every combination of the varied keys, the first key
varying slowest. The file is checked whole when it is loaded, before any work: every value against
its key's type and range and, with the others at the base, against the hardware's rules, and each
pair of keys in `isa.hw.CROSS_FIELD_PAIRS` in all its combinations, so that every point of the grid
is a valid description. Each mistake is one `CimcError` naming the file, the key's line and what to
change.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isa.diag import CimcError, SourceError
from isa.hw import (
    CROSS_FIELD_PAIRS,
    DEFAULT_PRESET,
    FIELDS,
    NOT_MODELLED,
    FieldSpec,
    HardwareConfig,
    list_presets,
    load_hw,
    suggest_key,
    toml_repr,
)

#: Most values one key may take: a finer step is almost surely a typo, and would stall the checks.
MAX_VALUES = 1000
#: A point of the grid: the value of each varied key, in the space's key order.
Point = dict[str, object]


@dataclass(frozen=True)
class Metric:
    """A figure of a hardware description that a constraint can bound."""

    unit: str
    doc: str
    of: Callable[[HardwareConfig], float]


#: What `[constraints]` can bound. These are the figures a description gives without running a model;
#: run figures (power under load, tokens/s) come with the search's evaluations.
METRICS: dict[str, Metric] = {
    "area_mm2": Metric("mm2", "area of macros, buffers and interconnect wires (as `cimc hw show`)",
                       lambda hw: hw.area_mm2),
    "leakage_mw": Metric("mW", "static power: leakage of macros, buffers and SFUs", lambda hw: hw.leakage_mw),
}


@dataclass(frozen=True)
class Axis:
    """One varied key and its values, in grid order."""

    key: str
    values: tuple[object, ...]


@dataclass(frozen=True)
class Constraint:
    """`lo <= metric <= hi`; a missing bound is None."""

    metric: str
    lo: float | None
    hi: float | None

    def holds(self, hw: HardwareConfig) -> bool:
        """Whether `hw` meets this budget."""
        value = METRICS[self.metric].of(hw)
        return (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)


@dataclass(frozen=True)
class Space:
    """A validated design space; `label` names its file in messages."""

    label: str
    base: HardwareConfig
    axes: tuple[Axis, ...]
    constraints: tuple[Constraint, ...]

    @property
    def size(self) -> int:
        """Points in the grid."""
        return math.prod(len(axis.values) for axis in self.axes)

    def points(self) -> Iterator[Point]:
        """Every point of the grid, the first key varying slowest."""
        keys = [axis.key for axis in self.axes]
        for values in itertools.product(*(axis.values for axis in self.axes)):
            yield dict(zip(keys, values, strict=True))

    def config(self, point: Point) -> HardwareConfig:
        """The base with the point's values, validated by the hardware's rules."""
        label = f"{self.label}: point " + ", ".join(f"{key} = {toml_repr(value)}" for key, value in point.items())
        return self.base.with_values(point, label)

    def feasible(self, hw: HardwareConfig) -> bool:
        """Whether `hw` meets every constraint."""
        return all(c.holds(hw) for c in self.constraints)


def load_space(path: str | Path) -> Space:
    """Read and check a space file; raise CimcError (located at the key's line) for any mistake."""
    label = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise CimcError(f"{label}: cannot read file: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise CimcError(f"{label}: not valid TOML: the file is not UTF-8 text") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CimcError(f"{label}: not valid TOML: {e}") from e
    src = _Source(label, text)
    for top in data:
        if top not in ("hw", "space", "constraints"):
            raise src.error("", top, f"unknown key '{top}' (a space file has hw, [space] and [constraints])")
    base = _base(data.get("hw", DEFAULT_PRESET), Path(path).parent, src)
    axes = _axes(data.get("space"), base, src)
    constraints = _constraints(data.get("constraints", {}), src)
    return Space(label, base, axes, constraints)


def render_text(space: Space, first: int = 10) -> str:
    """The grid at a glance (`cimc dse --dry-run`): each varied key's values, the constraints, and the
    first points with their metrics and whether they meet the constraints."""
    width = max(len(axis.key) for axis in space.axes)
    lines = [f"{space.label}: {space.size:,} points over {space.base.name}"]
    lines += [f"  {axis.key:<{width}}  {', '.join(map(toml_repr, axis.values))}" for axis in space.axes]
    budgets = [f"{c.metric} {op} {bound:g} {METRICS[c.metric].unit}" for c in space.constraints
               for op, bound in ((">=", c.lo), ("<=", c.hi)) if bound is not None]
    lines.append(f"constraints: {', '.join(budgets) or 'none'}")
    header = [axis.key for axis in space.axes] + list(METRICS) + ["feasible"]
    rows = []
    for point in itertools.islice(space.points(), first):
        hw = space.config(point)
        rows.append([toml_repr(v) for v in point.values()] + [f"{m.of(hw):.4g}" for m in METRICS.values()]
                    + ["yes" if space.feasible(hw) else "no"])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append(f"first {len(rows)} points:")
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in [header, *rows]]
    return "\n".join(lines) + "\n"


class _Source:
    """The text of a space file, to point at the line of a key (tomllib keeps no positions)."""

    def __init__(self, label: str, text: str) -> None:
        self.label, self.text = label, text
        self.lines: dict[str, tuple[int, int]] = {}
        table = ""
        for n, line in enumerate(text.splitlines(), 1):
            if header := _HEADER.match(line):
                table = _dotted(header.group(1))
                self.lines.setdefault(table, (n, header.start(1)))
            elif key := _KEY.match(line):
                path = _dotted(key.group(1))
                self.lines.setdefault(f"{table}.{path}" if table else path, (n, key.start(1) + 1))

    def error(self, table: str, key: str, message: str) -> CimcError:
        """`message` about `key` of `table` ('' for the top level), at the key's line if it is found."""
        path, shown = (f"{table}.{key}", f"[{table}] '{key}'") if table else (key, f"'{key}'")
        if path in self.lines:
            line, column = self.lines[path]
            return SourceError(self.label, self.text, line, column, f"{shown}: {message}")
        return CimcError(f"{self.label}: {shown}: {message}")

    def check(self, base: HardwareConfig, values: Point, key: str, advice: str = "") -> None:
        """Raise the hardware's own error about `values` over `base`, as an error at `key` of [space]."""
        try:
            base.with_values(values, self.label)
        except CimcError as e:
            what = ", ".join(f"'{k}' = {toml_repr(v)}" for k, v in values.items())
            why = e.message.removeprefix(self.label + ": ")
            raise self.error("space", key, f"{what} is refused: {why}{advice}") from None


_BARE = r"[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'"
_HEADER = re.compile(rf"\s*\[\s*((?:{_BARE})(?:\s*\.\s*(?:{_BARE}))*)\s*\]\s*(?:#.*)?$")
_KEY = re.compile(rf"\s*((?:{_BARE})(?:\s*\.\s*(?:{_BARE}))*)\s*=")


def _dotted(key: str) -> str:
    """'space . "macro.rows"' -> 'space.macro.rows' (quoted parts unquoted, as the grid flattens them)."""
    return ".".join(part.strip("\"'") for part in re.findall(_BARE, key))


def _base(spec: object, folder: Path, src: _Source) -> HardwareConfig:
    if not isinstance(spec, str) or not spec:
        presets = ", ".join(list_presets())
        raise src.error("", "hw", f"must be a preset name ({presets}) or a path to a hardware TOML, "
                                  f"got {toml_repr(spec)}")
    try:
        return load_hw(spec if spec in list_presets() else folder / spec)
    except CimcError as e:
        raise src.error("", "hw", e.message) from None


def _axes(table: object, base: HardwareConfig, src: _Source) -> tuple[Axis, ...]:
    example = '"chip.tiles" = [8, 16, 32]'
    if not isinstance(table, Mapping) or not table:
        raise src.error("", "space", f"must be a table naming at least one hardware key to vary, e.g. "
                                     f"[space] {example}")
    axes = tuple(Axis(key, _values(FIELDS[key], raw, functools.partial(src.error, "space", key)))
                 for key, raw in _flatten(table, "", src))
    for axis in axes:
        for value in axis.values:
            src.check(base, {axis.key: value}, axis.key)
    by_key = {axis.key: axis for axis in axes}
    for a, b in CROSS_FIELD_PAIRS:
        if a in by_key and b in by_key:
            for va, vb in itertools.product(by_key[a].values, by_key[b].values):
                src.check(base, {a: va, b: vb}, b, "; every point of the grid must be a valid design: drop one "
                          "of the two values")
    return axes


def _flatten(table: Mapping[str, Any], prefix: str, src: _Source) -> Iterator[tuple[str, object]]:
    """(hardware key, its spec) from `"macro.rows" = ...`, `macro.rows = ...` or `[space.macro] rows = ...`."""
    for sub, raw in table.items():
        key = prefix + sub
        if key in FIELDS:
            if key in NOT_MODELLED:
                raise src.error("space", key, f"is not modelled ({NOT_MODELLED[key]}): varying it changes no "
                                                "result; set it in the hardware file instead")
            yield key, raw
        elif isinstance(raw, Mapping) and any(field.startswith(key + ".") for field in FIELDS):
            yield from _flatten(raw, key + ".", src)
        else:
            raise src.error("space", key, f"unknown hardware key{suggest_key(key)}")


Error = Callable[[str], CimcError]
_FORMS = {"range": "step", "log": "points"}


def _values(spec: FieldSpec, raw: object, error: Error) -> tuple[object, ...]:
    """The values a `[space]` entry lists or spans, each converted and checked by the key's spec."""
    if isinstance(raw, list):
        if not raw:
            raise error("lists no value; give at least one")
        items = raw
    elif isinstance(raw, Mapping):
        items = _span(spec, raw, error)
    else:
        raise error(f"must be a list of values, {{ range = [lo, hi], step = s }} or "
                    f"{{ log = [lo, hi], points = n }}, got {toml_repr(raw)}")
    hint = " (this key takes a list, so list lists: [[4, 8], [4]])" if spec.kind == "int_list" else ""
    values: list[object] = []
    for item in items:
        try:
            value = spec.convert(item)
        except ValueError as e:
            raise error(f"each value {e}{hint}") from None
        if value in values:
            raise error(f"value {toml_repr(value)} is listed twice; list each value once")
        values.append(value)
    if len(values) > MAX_VALUES:
        raise error(f"lists {len(values)} values, more than {MAX_VALUES}; list fewer")
    return tuple(values)


def _span(spec: FieldSpec, table: Mapping[str, Any], error: Error) -> list[float]:
    """The values of `{ range = [lo, hi], step = s }` or `{ log = [lo, hi], points = n }`."""
    forms = [form for form in _FORMS if form in table]
    if len(forms) != 1:
        raise error("a table must have either range = [lo, hi] with step, or log = [lo, hi] with points")
    form = forms[0]
    count = _FORMS[form]
    for extra in table:
        if extra not in (form, count):
            raise error(f"unknown key '{extra}' in a {form} (it takes {form} and {count})")
    if count not in table:
        raise error(f"a {form} needs '{count}'")
    if spec.kind not in ("int", "float"):
        raise error(f"a {form} needs a numeric key, and this one takes {spec.allowed()}; list its values")
    bounds = table[form]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(_finite(b) for b in bounds)):
        raise error(f"{form} must be [lo, hi], two finite numbers, got {toml_repr(bounds)}")
    lo, hi = bounds
    if lo > hi:
        raise error(f"{form} [{lo}, {hi}] is inverted: write the lower bound first")
    integer = spec.kind == "int"
    if form == "range":
        step = table["step"]
        if not (_finite(step) and step > 0):
            raise error(f"step must be a finite number > 0, got {toml_repr(step)}")
        if integer and not all(isinstance(x, int) for x in (lo, hi, step)):
            raise error(f"an integer key needs integer bounds and step, got range = {toml_repr(bounds)}, "
                        f"step = {toml_repr(step)}")
        n = int((hi - lo) / step * (1 + 1e-12)) + 1
        if n > MAX_VALUES:
            raise error(f"spans {n} values, more than {MAX_VALUES}; use a coarser step")
        return [lo + i * step if integer else _tidy(lo + i * step) for i in range(n)]
    points = table["points"]
    if not (isinstance(points, int) and not isinstance(points, bool) and 2 <= points <= MAX_VALUES):
        raise error(f"points must be an integer in [2, {MAX_VALUES}], got {toml_repr(points)}")
    if lo <= 0 or lo == hi:
        raise error(f"log [{lo}, {hi}] needs 0 < lo < hi")
    spaced = [lo * (hi / lo) ** (i / (points - 1)) for i in range(points)]
    spaced[-1] = hi
    if not integer:
        return [_tidy(x) for x in spaced]
    rounded = [round(x) for x in spaced]
    if len(set(rounded)) < points:
        raise error(f"{points} points over log [{lo}, {hi}] repeat integers after rounding "
                    f"({', '.join(map(str, rounded))}); use fewer points or list the values")
    return rounded


def _constraints(table: object, src: _Source) -> tuple[Constraint, ...]:
    if not isinstance(table, Mapping):
        raise src.error("", "constraints", "must be a table, e.g. [constraints] area_mm2 = { max = 80.0 }")
    out = []
    for metric, bound in table.items():
        error = functools.partial(src.error, "constraints", metric)
        if metric not in METRICS:
            known = ", ".join(f"{name} ({m.unit}: {m.doc})" for name, m in METRICS.items())
            raise error(f"unknown constraint; the budgets a hardware description gives are {known}")
        if not isinstance(bound, Mapping) or not bound or set(bound) - {"min", "max"}:
            raise error(f"must be {{ max = x }}, {{ min = x }} or both, got {toml_repr(bound)}")
        for name, value in bound.items():
            if not _finite(value):
                raise error(f"'{name}' must be a finite number, got {toml_repr(value)}")
        lo, hi = bound.get("min"), bound.get("max")
        if lo is not None and hi is not None and lo > hi:
            raise error(f"min ({lo}) is above max ({hi}): no design can meet it")
        out.append(Constraint(metric, lo, hi))
    return tuple(out)


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _tidy(x: float) -> float:
    """`x` to 12 significant digits, so that 0.1 * 3 reads 0.3 and 51.2 * 2 reads 102.4."""
    return float(f"{x:.12g}")
