"""Design-space files (cimc.dse.space): the grid they span, their constraints, and their located errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cimc.cli import main
from cimc.dse.space import METRICS, load_space, render_text
from isa.diag import CimcError
from isa.hw import CROSS_FIELD_PAIRS, FIELDS, load_hw

REPO = Path(__file__).resolve().parents[1]
# issue 10, part 2, as written there
ISSUE_EXAMPLE = """\
hw = "edgecim-65nm"                 # the base every point overrides
[space]
"chip.tiles" = [8, 16, 32]
"macro.rows" = { range = [64, 256], step = 64 }
"dram.peak_gbps" = { log = [51.2, 204.8], points = 3 }
[constraints]
area_mm2 = { max = 80.0 }
"""


def write(tmp_path: Path, text: str, name: str = "space.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_issue_example_spans_the_expected_grid(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, ISSUE_EXAMPLE))
    assert [(a.key, a.values) for a in space.axes] == [
        ("chip.tiles", (8, 16, 32)), ("macro.rows", (64, 128, 192, 256)), ("dram.peak_gbps", (51.2, 102.4, 204.8))]
    points = list(space.points())
    assert space.size == len(points) == 36
    assert points == [{"chip.tiles": t, "macro.rows": r, "dram.peak_gbps": g}
                      for t in (8, 16, 32) for r in (64, 128, 192, 256) for g in (51.2, 102.4, 204.8)]
    base = load_hw("edgecim-65nm")
    assert space.base == base
    hw = space.config(points[-1])
    assert (hw.chip.tiles, hw.macro.rows, hw.dram.peak_gbps) == (32, 256, 204.8)
    assert hw.values() | points[-1] == hw.values() and hw.macro.cols == base.macro.cols
    assert "space.toml: point chip.tiles = 32" in hw.sources["chip.tiles"]
    # the preset (16 tiles) is 90 mm2: 8 tiles fit the 80 mm2 budget, 16 and 32 do not
    feasible = {p["chip.tiles"]: space.feasible(space.config(p)) for p in points}
    assert feasible == {8: True, 16: False, 32: False}
    assert all(space.feasible(c) == (c.area_mm2 <= 80.0) for c in map(space.config, points))


def test_nested_and_dotted_keys_mean_the_same(tmp_path: Path) -> None:
    quoted = load_space(write(tmp_path, '[space]\n"macro.rows" = [64, 128]\n"noc.topology" = ["mesh", "bus"]\n'))
    dotted = load_space(write(tmp_path, '[space]\nmacro.rows = [64, 128]\nnoc.topology = ["mesh", "bus"]\n', "b.toml"))
    nested = load_space(write(tmp_path, '[space.macro]\nrows = [64, 128]\n[space.noc]\ntopology = ["mesh", "bus"]\n',
                              "c.toml"))
    assert quoted.axes == dotted.axes == nested.axes
    assert [a.values for a in quoted.axes] == [(64, 128), ("mesh", "bus")]  # lists keep their order
    assert quoted.constraints == () and quoted.base == load_hw()  # hw defaults to edgecim-65nm


def test_spans_of_each_kind(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, """\
[space]
"chip.f_clk_mhz" = { range = [100, 130], step = 10 }
"dram.efficiency" = { range = [0.5, 0.8], step = 0.1 }
"chip.tiles" = { log = [4, 64], points = 5 }
"macro.weight_bits" = [[4, 8], [4]]
"sfu.lanes" = { range = [32, 32], step = 8 }
"""))
    assert [a.values for a in space.axes] == [
        (100.0, 110.0, 120.0, 130.0), (0.5, 0.6, 0.7, 0.8), (4, 8, 16, 32, 64), ((4, 8), (4,)), (32,)]
    assert space.size == 4 * 4 * 5 * 2


def test_hw_path_is_relative_to_the_space_file(tmp_path: Path) -> None:
    (tmp_path / "hw").mkdir()
    write(tmp_path / "hw", 'extends = "edgecim-28nm"\n[chip]\ntiles = 8\n', "mine.toml")
    space = load_space(write(tmp_path, 'hw = "hw/mine.toml"\n[space]\n"sfu.lanes" = [16, 32]\n'))
    assert space.base.chip.tiles == 8 and space.base.chip.tech_nm == 28


def test_determinism(tmp_path: Path) -> None:
    first = load_space(write(tmp_path, ISSUE_EXAMPLE))
    again = load_space(write(tmp_path, ISSUE_EXAMPLE))
    assert list(first.points()) == list(again.points())
    assert render_text(first, first.size) == render_text(again, again.size)
    assert [first.config(p) for p in first.points()] == [again.config(p) for p in again.points()]


BAD = [
    # (file text, line of the error or None, what the message must say)
    ('[space]\n"chip.tile" = [8]\n', 2, "[space] 'chip.tile': unknown hardware key (did you mean 'chip.tiles'?)"),
    ('[space]\n[space.chip]\ntile = [8]\n', 3, "unknown hardware key (did you mean 'chip.tiles'?)"),
    ('[space]\n"chip.tiles" = "8"\n', 2, 'must be a list of values, { range = [lo, hi], step = s } or'),
    ('[space]\n"chip.tiles" = [8, 8.5]\n', 2, "each value must be an integer in [1, 256], got 8.5"),
    ('[space]\n"macro.rows" = { range = [64, 256], step = 64.0 }\n', 2, "needs integer bounds and step"),
    ('[space]\n"chip.tiles" = []\n', 2, "lists no value"),
    ('[space]\n"chip.tiles" = [8, 16, 8]\n', 2, "value 8 is listed twice"),
    ('[space]\n"macro.rows" = { range = [256, 64], step = 64 }\n', 2, "range [256, 64] is inverted"),
    ('[space]\n"dram.peak_gbps" = { log = [204.8, 51.2], points = 3 }\n', 2, "log [204.8, 51.2] is inverted"),
    ('[space]\n"macro.rows" = { range = [64, 256], step = 0 }\n', 2, "step must be a finite number > 0, got 0"),
    ('[space]\n"dram.efficiency" = { range = [0.5, 0.8], step = -0.1 }\n', 2, "step must be a finite number > 0"),
    ('[space]\n"dram.peak_gbps" = { log = [0, 204.8], points = 3 }\n', 2, "log [0, 204.8] needs 0 < lo < hi"),
    ('[space]\n"dram.peak_gbps" = { log = [-1.0, 204.8], points = 3 }\n', 2, "needs 0 < lo < hi"),
    ('[space]\n"dram.peak_gbps" = { log = [51.2, 51.2], points = 3 }\n', 2, "needs 0 < lo < hi"),
    ('[space]\n"dram.peak_gbps" = { log = [51.2, 204.8], points = 1 }\n', 2, "points must be an integer in [2, "),
    ('[space]\n"dram.peak_gbps" = [51.2, nan]\n', 2, "each value must be a number in [0.001, 100000], got nan"),
    ('[space]\n"dram.peak_gbps" = [inf]\n', 2, "got inf"),
    ('[space]\n"dram.peak_gbps" = { range = [51.2, inf], step = 1.0 }\n', 2, "two finite numbers, got [51.2, inf]"),
    ('[space]\n"dram.efficiency" = { range = [0.5, 0.8], step = nan }\n', 2, "step must be a finite number > 0"),
    ('[space]\n"chip.tiles" = { range = [8, 32], step = 8, points = 3 }\n', 2, "unknown key 'points' in a range"),
    ('[space]\n"chip.tiles" = { range = [8, 32] }\n', 2, "a range needs 'step'"),
    ('[space]\n"chip.tiles" = { range = [8, 32], log = [8, 32], step = 8 }\n', 2, "either range = [lo, hi]"),
    ('[space]\n"chip.tiles" = { log = [1, 4], points = 5 }\n', 2, "repeat integers after rounding (1, 1, 2, 3, 4)"),
    ('[space]\n"noc.topology" = { range = [1, 2], step = 1 }\n', 2, 'a range needs a numeric key, and this one takes '
                                                                     'one of "bus", "mesh"'),
    ('[space]\n"dram.efficiency" = { range = [0.01, 1.0], step = 0.0001 }\n', 2, "spans 9901 values, more than 1000"),
    ('[space]\n"macro.weight_bits" = [4, 8]\n', 2, "list lists: [[4, 8], [4]]"),
    ('[space]\n"dram.mts" = [6400, 8533]\n', 2, "is not modelled (label"),
    # values the hardware validation refuses: alone, and in combination
    ('[space]\n"chip.tiles" = [8, 300]\n', 2, "each value must be an integer in [1, 256], got 300"),
    ('[space]\n"noc.link_bits" = [512, 12]\n', 2, "'noc.link_bits' = 12 is refused: key 'noc.link_bits' (12) must be "
                                                  "a whole number of bytes"),
    ('[space]\n"macro.input_bit_serial" = [true, false]\n', 2, "= false is not modelled by this simulator"),
    ('[space]\n"chip.tiles" = [1, 2]\n"chip.macros_per_tile" = [1, 4]\n', 3,
     "'chip.tiles' = 1, 'chip.macros_per_tile' = 1 is refused: keys 'chip.tiles' x 'chip.macros_per_tile' must give"
     " >= 2 macros"),
    ('[space]\n"dram.interleave_bytes" = [64, 256]\n"dram.burst_bytes" = [32, 128]\n', 3,
     "'dram.interleave_bytes' = 64, 'dram.burst_bytes' = 128 is refused"),
    ('[space]\n"macro.weight_bits" = [[4, 8], [16]]\n"macro.cols" = [8, 128]\n', 2,
     "'macro.cols' = 8, 'macro.weight_bits' = [16] is refused: key 'macro.cols' (8) must be >= every"),
    # the file, the base and the constraints
    ('[space]\n"chip.tiles" = [8]\n[constraints]\npower_w = { max = 5.0 }\n', 4,
     "[constraints] 'power_w': unknown constraint; the budgets a hardware description gives are area_mm2"),
    ('[space]\n"chip.tiles" = [8]\n[constraints]\narea_mm2 = 80.0\n', 4, "must be { max = x }, { min = x } or both"),
    ('[space]\n"chip.tiles" = [8]\n[constraints]\narea_mm2 = { below = 80.0 }\n', 4, "must be { max = x }"),
    ('[space]\n"chip.tiles" = [8]\n[constraints]\narea_mm2 = { max = nan }\n', 4, "'max' must be a finite number"),
    ('[space]\n"chip.tiles" = [8]\n[constraints]\narea_mm2 = { min = 90.0, max = 80.0 }\n', 4, "min (90.0) is above"),
    ('hw = "edgecim-7nm"\n[space]\n"chip.tiles" = [8]\n', 1, "edgecim-7nm' (presets: edgecim-28nm, edgecim-65nm)"),
    ('hw = 65\n[space]\n"chip.tiles" = [8]\n', 1, "'hw': must be a preset name (edgecim-28nm, edgecim-65nm)"),
    ('spaces = 1\n[space]\n"chip.tiles" = [8]\n', 1, "unknown key 'spaces' (a space file has hw, [space] and"),
    ('hw = "edgecim-65nm"\n', None, "'space': must be a table naming at least one hardware key to vary"),
    ('[space]\n', 1, "'space': must be a table naming at least one hardware key to vary"),
    ('[space\n', None, "not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)"),
]


@pytest.mark.parametrize(("text", "line", "message"), BAD, ids=[f"{i}:{m[:40]}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_space_is_one_located_error(tmp_path: Path, text: str, line: int | None, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(CimcError) as info:
        load_space(path)
    rendered = info.value.render()
    assert message in rendered
    first = rendered.splitlines()[0]
    assert first.startswith(f"{path}:{line}:" if line else f"{path}: ")
    if line:
        assert text.splitlines()[line - 1] in rendered  # the excerpt shows the key's line


def test_located_without_a_line_by_key_path(tmp_path: Path) -> None:
    # an inline table under [space] has no line of its own for the key: the key path locates it
    path = write(tmp_path, 'space = { "chip.tiles" = [8, 300] }\n')
    with pytest.raises(CimcError, match=r"space\.toml: \[space\] 'chip\.tiles': each value must be an integer"):
        load_space(path)


def test_cross_field_pairs_are_every_two_key_rule() -> None:
    """Every pair of keys the hardware refuses in some combination (probing each key's bounds, the base and
    its choices) is in CROSS_FIELD_PAIRS, and each listed pair is refused in some combination."""
    base = load_hw()
    probes: dict[str, list[object]] = {}
    for key, spec in FIELDS.items():
        value = base.values()[key]
        if spec.kind == "bool":
            candidates: list[object] = [True, False]
        elif spec.kind == "str":
            candidates = list(spec.choices or [value])
        elif spec.kind == "int_list":
            candidates = [(int(spec.lo),), (int(spec.hi),), value]
        elif spec.kind == "int":  # powers of two around the base find divisibility rules too
            candidates = [int(spec.lo), int(spec.hi), *(int(value * f) for f in (0.25, 0.5, 1, 2, 4))]
        else:
            candidates = [spec.lo, value, spec.hi if spec.hi is not None else value * 1000]
        probes[key] = [v for v in dict.fromkeys(candidates) if _accepted(base, {key: v})]
    refused = set()
    for a, b in itertools.combinations(FIELDS, 2):
        if any(not _accepted(base, {a: va, b: vb}) for va in probes[a] for vb in probes[b]):
            refused.add(frozenset((a, b)))
    assert refused == {frozenset(pair) for pair in CROSS_FIELD_PAIRS}


def _accepted(base, values: dict) -> bool:
    try:
        base.with_values(values, "probe")
    except CimcError:
        return False
    return True


def test_edgecim_example_space() -> None:
    space = load_space(REPO / "examples/spaces/edgecim.toml")
    assert space.base == load_hw("edgecim-65nm")
    configs = [space.config(p) for p in space.points()]
    assert len(configs) == space.size > 100
    assert space.base in configs  # the preset itself is a point of its space
    assert 0 < sum(map(space.feasible, configs)) < space.size
    for c in space.constraints:  # each budget rules out some points on its own
        assert any(not c.holds(hw) for hw in configs), c.metric
    assert set(METRICS) == {c.metric for c in space.constraints}


def test_cli_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, ISSUE_EXAMPLE)
    assert main(["dse", "--space", str(path), "--dry-run", "--first", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"{path}: 36 points over edgecim-65nm"
    assert lines[1:4] == ["  chip.tiles      8, 16, 32", "  macro.rows      64, 128, 192, 256",
                          "  dram.peak_gbps  51.2, 102.4, 204.8"]
    assert "constraints: area_mm2 <= 80 mm2" in out and lines[5] == "first 3 points:"
    assert len(lines) == 6 + 1 + 3 and lines[-1].split()[:3] == ["8", "64", "204.8"]
    assert main(["dse", "--space", str(path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert main(["dse", "--space", str(write(tmp_path, '[space]\n"chip.tile" = [8]\n'))]) == 2
    assert "unknown hardware key" in capsys.readouterr().err
