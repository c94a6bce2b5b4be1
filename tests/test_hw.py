"""Hardware descriptions: presets, layering, overrides, fingerprints, errors, listing."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from isa.diag import CimcError
from isa.hw import FIELDS, PRESET_DIR, SCHEMA, HardwareConfig, list_presets, load_hw, render_text


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_list_presets() -> None:
    assert list_presets() == ["edgecim-28nm", "edgecim-65nm"]


def test_default_is_65nm_with_section_7_figures() -> None:
    hw = load_hw()
    assert hw == load_hw("edgecim-65nm")
    assert (hw.name, hw.origin) == ("edgecim-65nm", "edgecim-65nm")
    assert hw.chip.tech_nm == 65 and hw.chip.f_clk_mhz == 200 and hw.chip.vdd_v == 1.0
    assert (hw.chip.tiles, hw.chip.macros_per_tile) == (16, 16)
    assert (hw.macro.rows, hw.macro.cols, hw.macro.weight_bits) == (128, 128, (4, 8))
    assert hw.macro.type == "digital_sram_cim" and hw.macro.input_bit_serial is True
    assert hw.macro.e_slice_w4_fj == 26.0 and hw.macro.e_write_fj_per_bit == 97.0
    assert hw.macro.area_mm2 == 0.2272 and hw.macro.write_while_compute is False
    assert (hw.tile_buf.size_kb, hw.tile_buf.e_read_pj, hw.tile_buf.e_write_pj) == (32, 13.8, 11.4)
    assert (hw.global_buf.size_kb, hw.global_buf.width_bits, hw.global_buf.leak_mw) == (256, 2048, 12.3)
    assert hw.global_buf.e_read_pj / (hw.global_buf.width_bits / 64) == pytest.approx(40.3)  # §3.1 per 64 bits
    assert (hw.instr_buf.size_kb, hw.instr_buf.width_bits) == (16, 512)
    assert (hw.noc.topology, hw.noc.link_bits, hw.noc.f_clk_mhz, hw.noc.e_pj_per_bit_mm, hw.noc.hop_mm) == (
        "bus", 1024, 800, 0.10, 2.0)
    assert (hw.dram.type, hw.dram.mts, hw.dram.peak_gbps, hw.dram.efficiency) == ("LPDDR5", 6400, 102.4, 0.75)
    assert (hw.dram.channels_x16, hw.dram.latency_ns, hw.dram.burst_bytes, hw.dram.max_outstanding) == (8, 44, 32, 16)
    assert hw.dram.e_read_pj_per_bit == 8.0 and hw.dram.kv_cache_in_dram is True
    assert (hw.sfu.lanes, hw.sfu.dtype, hw.sfu.e_add_pj, hw.sfu.e_exp_pj) == (32, "fp16", 0.71, 12.6)
    assert (hw.sfu.e_add_fp32_pj, hw.sfu.e_mul_fp32_pj) == (1.60, 6.60)


def test_28nm_overrides_and_inherits() -> None:
    hw = load_hw("edgecim-28nm")
    assert hw.name == "edgecim-28nm"
    assert hw.chip.tech_nm == 28 and hw.chip.f_clk_mhz == 400 and hw.chip.vdd_v == 0.9
    assert hw.macro.e_slice_w4_fj == 6.0 and hw.macro.e_write_fj_per_bit == 23.3
    assert hw.tile_buf.e_read_pj == 2.58 and hw.global_buf.e_write_pj / 32 == pytest.approx(5.90)
    assert (hw.noc.e_pj_per_bit_mm, hw.noc.hop_mm, hw.noc.link_bits) == (0.081, 1.0, 2048)
    assert (hw.dram.type, hw.dram.mts, hw.dram.peak_gbps) == ("LPDDR5X", 8533, 136.5)
    assert (hw.sfu.e_exp_pj, hw.sfu.e_add_fp32_pj, hw.sfu.e_mul_fp32_pj) == (4.4, 0.56, 2.30)
    # inherited from edgecim-65nm, with the 65 nm source notes
    assert (hw.macro.rows, hw.chip.tiles, hw.dram.efficiency, hw.sfu.lanes) == (128, 16, 0.75, 32)
    assert hw.sources["macro.rows"] == load_hw().sources["macro.rows"]
    assert hw.sources["chip.f_clk_mhz"].startswith("M7")


def test_28nm_file_lists_only_differing_keys() -> None:
    data = tomllib.loads((PRESET_DIR / "edgecim-28nm.toml").read_text(encoding="utf-8"))
    assert data["extends"] == "edgecim-65nm"
    assert "rows" not in data["macro"] and "tiles" not in data["chip"]


@pytest.mark.parametrize("preset", ["edgecim-65nm", "edgecim-28nm"])
def test_every_preset_key_has_a_source_note(preset: str) -> None:
    hw = load_hw(preset)
    assert list(hw.sources) == list(FIELDS)
    for key, note in hw.sources.items():
        assert note and not note.startswith("set in"), key
    assert "M1" in hw.sources["macro.rows"] and "[ASM]" in hw.sources["chip.tiles"]
    assert hw.sources["macro.e_write_fj_per_bit"].startswith("W2" if preset == "edgecim-65nm" else "W3")


def test_preset_sources_tables_only_name_known_keys() -> None:
    for preset in list_presets():
        data = tomllib.loads((PRESET_DIR / f"{preset}.toml").read_text(encoding="utf-8"))
        assert set(data["sources"]) <= set(FIELDS)


def test_schema_structural_fields() -> None:
    structural = {spec.key for spec in SCHEMA if spec.structural}
    assert structural == {
        "chip.tiles",
        "chip.macros_per_tile",
        "macro.rows",
        "macro.cols",
        "macro.weight_bits",
        "macro.act_bits",
        "buffer.tile_act.size_kb",
        "buffer.global.size_kb",
        "dram.kv_cache_in_dram",
    }


def test_user_file_extends_28nm(tmp_path: Path) -> None:
    path = write(
        tmp_path / "mine.toml",
        'extends = "edgecim-28nm"\n[chip]\nname = "mine"\n[macro]\nrows = 256\n'
        '[sources]\n"macro.rows" = "taller macro, our guess"\n',
    )
    hw = load_hw(path)
    assert (hw.name, hw.origin) == ("mine", str(path))
    assert (hw.macro.rows, hw.chip.f_clk_mhz, hw.dram.type) == (256, 400, "LPDDR5X")
    assert hw.sources["macro.rows"] == "taller macro, our guess"
    assert hw.sources["chip.name"] == f"set in {path}"
    assert hw.sources["chip.f_clk_mhz"] == load_hw("edgecim-28nm").sources["chip.f_clk_mhz"]


def test_user_file_defaults_to_65nm_and_extends_relative_path(tmp_path: Path) -> None:
    write(tmp_path / "base.toml", "[dram]\npeak_gbps = 51.2\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    top = write(sub / "top.toml", 'extends = "../base.toml"\n[noc]\nhop_mm = 3.0\n')
    hw = load_hw(str(top))
    assert (hw.dram.peak_gbps, hw.noc.hop_mm, hw.chip.tech_nm) == (51.2, 3.0, 65)
    assert hw.sources["dram.peak_gbps"] == f"set in {sub / '../base.toml'}"


def test_overrides() -> None:
    hw = load_hw(
        "edgecim-65nm", ["macro.rows=256", 'dram.type="LPDDR4"', "sfu.dtype=bf16", " chip.f_clk_mhz = 250 "]
    )
    assert (hw.macro.rows, hw.dram.type, hw.sfu.dtype, hw.chip.f_clk_mhz) == (256, "LPDDR4", "bf16", 250.0)
    assert isinstance(hw.chip.f_clk_mhz, float)
    assert hw.sources["macro.rows"] == "set on the command line"
    assert load_hw(overrides=["macro.weight_bits=[4]"]).macro.weight_bits == (4,)


def test_fingerprint_tracks_structural_fields_only() -> None:
    base = load_hw()
    fp = base.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert load_hw(overrides=["macro.e_slice_w4_fj=105.3", "chip.f_clk_mhz=100"]).fingerprint() == fp
    assert load_hw("edgecim-28nm").fingerprint() == fp  # same shapes, different costs
    assert load_hw(overrides=["macro.rows=256"]).fingerprint() != fp
    assert load_hw(overrides=["buffer.global.size_kb=512"]).fingerprint() != fp


@pytest.mark.parametrize("setting", ["macro.write_while_compute=true", "dram.kv_cache_in_dram=false",
                                     "macro.input_bit_serial=false"])
def test_unmodelled_values_are_refused(setting: str) -> None:
    key = setting.split("=")[0]
    with pytest.raises(CimcError, match=rf"--set: key '{key}' = .* is not modelled by this simulator"):
        load_hw(overrides=[setting])


def test_write_time_follows_write_cycles_full() -> None:
    """A whole-macro write takes write_cycles_full; half the rows take half as long."""
    from isa.cost import CostModel
    for full in (128, 300):
        cm = CostModel(load_hw(overrides=[f"macro.write_cycles_full={full}"]))
        assert cm.write_cycles(128, 32, 4) == full and cm.write_cycles(64, 32, 4) == -(-full // 2)


def test_dict_round_trip(tmp_path: Path) -> None:
    hw = load_hw("edgecim-28nm", ["macro.weight_bits=[8, 4]"])
    d = json.loads(json.dumps(hw.to_dict()))
    assert d["buffer"]["global"]["e_read_pj"] == 266.9 and d["macro"]["weight_bits"] == [8, 4]
    back = HardwareConfig.from_dict(d, "prog.cimb")
    assert back == hw and back.to_dict() == hw.to_dict() and back.sources == hw.sources
    assert back.origin == "prog.cimb" and back.fingerprint() == hw.fingerprint()
    assert hash(back) == hash(hw)


def test_from_dict_validates() -> None:
    d = load_hw().to_dict()
    del d["macro"]["rows"]
    with pytest.raises(CimcError, match=r"prog\.cimb: .*missing 'macro\.rows'"):
        HardwareConfig.from_dict(d, "prog.cimb")
    d = load_hw().to_dict()
    d["sfu"]["lanes"] = 10**400
    with pytest.raises(CimcError, match=r"prog\.cimb: key 'sfu\.lanes' must be an integer in \[1, 4096\]"):
        HardwareConfig.from_dict(d, "prog.cimb")
    d = load_hw().to_dict()
    d["dram"]["e_read_pj_per_bit"] = 10**400
    with pytest.raises(CimcError, match=r"key 'dram\.e_read_pj_per_bit' must be a number >= 0"):
        HardwareConfig.from_dict(d, "prog.cimb")
    with pytest.raises(CimcError, match="must be a table"):
        HardwareConfig.from_dict([], "prog.cimb")  # type: ignore[arg-type]


BAD_FILES = [
    ("[macro\nrows = 1\n", r"not valid TOML: .*line 1", None),
    ("[macro]\nrowz = 256\n", r"unknown key 'macro\.rowz' \(did you mean 'macro\.rows'\?\)", "macro.rowz"),
    ("[macro]\nrows = 0\n", r"key 'macro\.rows' must be an integer in \[8, 4096\], got 0", "macro.rows"),
    (
        '[macro]\nrows = "big"\n',
        r"key 'macro\.rows' must be an integer in \[8, 4096\], got \"big\"",
        "macro.rows",
    ),
    ("[macro]\nrows = 128.0\n", r"must be an integer in \[8, 4096\], got 128\.0", "macro.rows"),
    (
        "[dram]\nefficiency = 1.5\n",
        r"key 'dram\.efficiency' must be a number in \[0\.01, 1\]",
        "dram.efficiency",
    ),
    ("[dram]\ne_read_pj_per_bit = nan\n", r"must be a number >= 0, got nan", "dram.e_read_pj_per_bit"),
    ("[dram]\nkv_cache_in_dram = 1\n", r"must be true or false, got 1", "dram.kv_cache_in_dram"),
    ('[sfu]\ndtype = "fp8"\n', r"must be one of \"fp16\", \"bf16\", \"fp32\", got \"fp8\"", "sfu.dtype"),
    (
        "[macro]\nweight_bits = [4, 32]\n",
        r"distinct integers, each in \[1, 16\], got \[4, 32\]",
        "macro.weight_bits",
    ),
    ("[macro]\nweight_bits = [4, 4]\n", r"list of distinct integers", "macro.weight_bits"),
    ("[macro]\nweight_bits = []\n", r"non-empty list", "macro.weight_bits"),
    ("macro = 3\n", r"'macro' must be a table", "macro"),
    ("[macro.rows]\nx = 1\n", r"key 'macro\.rows' must be an integer .*got a table", "macro.rows"),
    ("[gpu]\ncores = 3\n", r"unknown table \[gpu\] \(tables: chip, macro, buffer\.tile_act", None),
    ("[macr]\nrows = 3\n", r"unknown table \[macr\] \(did you mean \[macro\]\?\)", None),
    ("[noc]\nzzz = 3\n", r"unknown key 'noc\.zzz' \(keys of \[noc\]: topology, link_bits, f_clk_mhz", "noc.zzz"),
    ('[sources]\n"macro.rowz" = "x"\n', r"source note for unknown key 'macro\.rowz'", "macro.rowz"),
    ('[sources]\n"macro.rows" = 3\n', r"source note for 'macro\.rows' must be a string", "macro.rows"),
    ("extends = 3\n", r"key 'extends' must be a preset name or a path", "extends"),
    ('extends = "nope.toml"\n', r"key 'extends': no hardware preset or file named 'nope\.toml'", "extends"),
    ("[macro]\ncols = 8\nweight_bits = [4, 16]\n", r"'macro\.cols' \(8\) must be >= every", "macro.cols"),
    ("[chip]\ntiles = 1\nmacros_per_tile = 1\n", r"'chip\.tiles' x 'chip\.macros_per_tile'", "chip.tiles"),
    ("[dram]\ninterleave_bytes = 48\n", r"'dram\.interleave_bytes' \(48\) and 'dram\.burst_bytes' \(32\) do not "
     r"fit: a channel's interleave must be a whole number of bursts", "dram.interleave_bytes"),
    ("[dram]\nburst_bytes = 3\n", r"'dram\.interleave_bytes' \(256\) and 'dram\.burst_bytes' \(3\)",
     "dram.burst_bytes"),
    ("[noc]\nlink_bits = 12\n", r"'noc\.link_bits' \(12\) must be a whole number of bytes", "noc.link_bits"),
    ("[buffer.global]\nwidth_bits = 100\n", r"'buffer\.global\.width_bits' \(100\) must be a whole number of bytes",
     "buffer.global.width_bits"),
    ("[buffer.instr]\nsize_kb = 0\n", r"'buffer\.instr\.size_kb' must be an integer in \[1, ", "buffer.instr.size_kb"),
    ('[noc]\ntopology = "ring"\n', r"'noc\.topology' must be one of \"bus\", \"mesh\"", "noc.topology"),
    ("[chip]\ntiles = 300\n", r"'chip\.tiles' must be an integer in \[1, 256\]", "chip.tiles"),
    ("[dram]\nmax_outstanding = 0\n", r"'dram\.max_outstanding' must be an integer in \[1, 4096\]",
     "dram.max_outstanding"),
]


@pytest.mark.parametrize(("text", "pattern", "key"), BAD_FILES)
def test_bad_file_errors(tmp_path: Path, text: str, pattern: str, key: str | None) -> None:
    path = write(tmp_path / "my.toml", text)
    with pytest.raises(CimcError, match=pattern) as info:
        load_hw(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    if key is not None:
        assert f"'{key}'" in message


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "my.toml"
    path.write_bytes(b'[chip]\nname = "\xff"\n')
    with pytest.raises(CimcError, match=r"my\.toml: not valid TOML: the file is not UTF-8"):
        load_hw(path)


def test_missing_file_and_unknown_preset(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(
        CimcError, match=r"no hardware preset or file named '.*nope\.toml' \(presets: edgecim-28nm"
    ):
        load_hw(missing)
    with pytest.raises(
        CimcError, match=r"^no hardware preset or file named 'foo' \(presets: edgecim-28nm, edgecim-65nm\)$"
    ):
        load_hw("foo")
    with pytest.raises(CimcError, match="no hardware preset or file named"):
        load_hw(tmp_path)  # a directory is not a file


def test_extends_cycle(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", 'extends = "b.toml"\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n')
    with pytest.raises(
        CimcError, match=r"b\.toml: extends cycle: .*a\.toml -> .*b\.toml -> .*a\.toml"
    ) as info:
        load_hw(a)
    assert "'extends'" in str(info.value)
    self_loop = write(tmp_path / "self.toml", 'extends = "./self.toml"\n')
    with pytest.raises(CimcError, match="extends cycle"):
        load_hw(self_loop)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("macro.rows", r"^--set 'macro\.rows': expected KEY=VALUE"),
        ("=3", r"^--set '=3': expected KEY=VALUE"),
        ("macro.rowz=3", r"^--set 'macro\.rowz': unknown key \(did you mean 'macro\.rows'\?\)"),
        ("macro.rows=0", r"^--set 'macro\.rows': must be an integer in \[8, 4096\], got 0$"),
        ("macro.rows=big", r"^--set 'macro\.rows': must be an integer in \[8, 4096\], got \"big\""),
        ("macro.rows=[1", r"^--set 'macro\.rows': \"\[1\" is not a TOML value"),
        ("macro.rows=", r"^--set 'macro\.rows': \"\" is not a TOML value"),
        ("macro.rows=256\nx = 1", r"^--set 'macro\.rows': \"256\\nx = 1\" is not a TOML value"),
        ("sfu.dtype=fp8", r"^--set 'sfu\.dtype': must be one of"),
    ],
)
def test_bad_overrides(override: str, pattern: str) -> None:
    with pytest.raises(CimcError, match=pattern):
        load_hw(overrides=[override])


def test_cross_field_error_names_the_last_setter(tmp_path: Path) -> None:
    with pytest.raises(
        CimcError, match=r"^--set: key 'macro\.cols' \(8\) must be >= every 'macro\.weight_bits' value \[16\]"
    ):
        load_hw(overrides=["macro.cols=8", "macro.weight_bits=[16]"])
    path = write(tmp_path / "my.toml", "[macro]\ncols = 8\n")
    with pytest.raises(CimcError, match=r"^--set: key 'macro\.cols' \(8\) must be >= every"):
        load_hw(path, ["macro.weight_bits=[16]"])
    assert load_hw(path, ["macro.weight_bits=[8]"]).macro.cols == 8


def test_render_text() -> None:
    hw = load_hw("edgecim-28nm", ["macro.rows=256"])
    text = render_text(hw)
    lines = text.splitlines()
    assert lines[0] == f"edgecim-28nm  (origin: edgecim-28nm, fingerprint: {hw.fingerprint()})"
    assert "[buffer.tile_act]" in lines and "[sfu]" in lines
    rows = next(line for line in lines if line.lstrip().startswith("rows "))
    assert rows.split() == ["rows", "=", "256", "bitcells", "#", "set", "on", "the", "command", "line"]
    f_clk = next(line for line in lines if line.lstrip().startswith("f_clk_mhz "))
    assert "MHz" in f_clk and "# M7 (28 nm DCIM, 400 MHz)" in f_clk
    assert "e_write_fj_per_bit" in text and "fJ/bit" in text and "W3: CACTI 32 nm" in text
    # values and comments line up
    derived = lines.index("derived:")
    body = [line for line in lines[:derived] if line.startswith("  ")]
    assert len({line.index("=") for line in body}) == 1 and len({line.index("#") for line in body}) == 1
    assert "  DRAM          8 channels x 17.06 GB/s = 136.5 GB/s peak, 102.4 GB/s sustained; 44 ns first access, " \
           "up to 16 transfers in flight" in lines
    assert "  interconnect  bus, 2048-bit links at 800 MHz = 204.8 GB/s per link; 32 mm of links" in lines
    wires = 32 * 2048 * 0.2e-3
    assert next(line for line in lines if line.startswith("  area ")) == (
        f"  area          {256 * 0.067 + 16 * 0.067 + 0.44 + 0.034 + wires:.4g} mm2: macros {256 * 0.067:.4g}, "
        f"buffers {16 * 0.067 + 0.44 + 0.034:.4g}, interconnect wires {wires:.4g} "
        "(SFUs, adder, control and DRAM PHY not included)")
    # what no key models is listed after the keys
    assert lines[lines.index("not modelled (by any key):") + 1].startswith("  - DRAM row-buffer")


def test_derived_figures() -> None:
    hw = load_hw()
    assert (hw.total_macros, hw.weight_storage_kb, hw.cycle_ns) == (256, 512.0, 5.0)
    assert hw.dram_effective_gbps == pytest.approx(76.8)


def test_docs_list_what_is_not_modelled() -> None:
    """docs/numerics-and-timing.md says what `cimc hw show` says is not modelled, word for word."""
    from isa.hw import NOT_MODELLED_EFFECTS
    doc = (Path(__file__).resolve().parents[1] / "docs" / "numerics-and-timing.md").read_text(encoding="utf-8")
    for effect in NOT_MODELLED_EFFECTS:
        assert f"- {effect}." in doc, effect
    assert all(f"  - {effect}" in render_text(load_hw()) for effect in NOT_MODELLED_EFFECTS)
