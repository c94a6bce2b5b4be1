"""The hardware description: what the accelerator is made of and what each action costs.

A description is TOML with the sections `[chip]`, `[macro]`, `[buffer.tile_act]`,
`[buffer.global]`, `[buffer.instr]`, `[noc]`, `[dram]` and `[sfu]`, plus `[sources]`, which maps each dotted key
(`"macro.rows"`) to a note saying where its figure comes from (TOML keeps no comments).
`SCHEMA` lists every key once, with its type, unit, allowed range and whether it is structural.

Descriptions are layered. The presets in `presets/` are `edgecim-65nm` (the default, complete)
and `edgecim-28nm`; a user file names its base with `extends = "<preset or path>"` (default
`edgecim-65nm`; paths are relative to the file) and sets any subset of keys. `load_hw` merges
base first, then the file, then `KEY=VALUE` overrides, and validates every value against the
schema; each mistake is reported as a one-line `CimcError` naming the file and the key.

Structural fields (array shapes, bit widths, buffer sizes, where the KV cache lives) decide
what a compiled binary may contain; `HardwareConfig.fingerprint()` hashes exactly those, so a
binary can be re-simulated under changed energies or clocks but not under a different shape.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from isa.diag import CimcError

PRESET_DIR = Path(__file__).with_name("presets")
DEFAULT_PRESET = "edgecim-65nm"

Kind = Literal["int", "float", "bool", "str", "int_list"]
TOPOLOGIES = ("bus", "mesh")


@dataclass(frozen=True)
class FieldSpec:
    """One key of the description. `lo`/`hi` bound numbers (and list items) inclusively."""

    key: str
    kind: Kind
    unit: str
    lo: float | None
    hi: float | None
    choices: tuple[str, ...] | None
    structural: bool
    doc: str

    @property
    def section(self) -> str:
        """The TOML table holding the key: 'buffer.tile_act' for 'buffer.tile_act.size_kb'."""
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        """The key within its table: 'size_kb' for 'buffer.tile_act.size_kb'."""
        return self.key.rpartition(".")[2]

    def allowed(self) -> str:
        """What the key accepts, as a phrase: 'an integer in [8, 4096]'."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "str":
            if self.choices:
                return "one of " + ", ".join(f'"{c}"' for c in self.choices)
            return "a non-empty string"
        noun = {"int": "an integer", "float": "a number"}.get(
            self.kind, "a non-empty list of distinct integers, each"
        )
        if self.lo is not None and self.hi is not None:
            return f"{noun} in [{_num(self.lo)}, {_num(self.hi)}]"
        if self.lo is not None:
            return f"{noun} >= {_num(self.lo)}"
        return noun if self.hi is None else f"{noun} <= {_num(self.hi)}"

    def convert(self, value: object) -> object:
        """`value` in the field's Python type (float for numbers, tuple for lists).

        Raises ValueError('must be <allowed>, got <value>') if the key does not accept it.
        """
        converted: object = None
        if self.kind == "bool" and isinstance(value, bool):
            converted = value
        elif self.kind == "str" and isinstance(value, str) and value:
            converted = value if not self.choices or value in self.choices else None
        elif self.kind == "int" and _is_int(value) and self._in_range(value):
            converted = value
        elif self.kind == "float" and _is_number(value):
            number = _finite_float(value)
            converted = number if number is not None and self._in_range(number) else None
        elif self.kind == "int_list" and isinstance(value, list | tuple) and value:
            items = tuple(value)
            good = all(_is_int(v) and self._in_range(v) for v in items) and len(set(items)) == len(items)
            converted = items if good else None
        if converted is None:
            raise ValueError(f"must be {self.allowed()}, got {toml_repr(value)}")
        return converted

    def _in_range(self, x: float) -> bool:
        return (self.lo is None or x >= self.lo) and (self.hi is None or x <= self.hi)


def _int(key: str, unit: str, lo: int, hi: int | None, doc: str, structural: bool = False) -> FieldSpec:
    return FieldSpec(key, "int", unit, lo, hi, None, structural, doc)


def _float(key: str, unit: str, lo: float, hi: float | None, doc: str) -> FieldSpec:
    return FieldSpec(key, "float", unit, lo, hi, None, False, doc)


def _bool(key: str, doc: str, structural: bool = False) -> FieldSpec:
    return FieldSpec(key, "bool", "", None, None, None, structural, doc)


def _str(key: str, doc: str, choices: tuple[str, ...] | None = None) -> FieldSpec:
    return FieldSpec(key, "str", "", None, None, choices, False, doc)


def _buffer(section: str, what: str, structural: bool = True) -> list[FieldSpec]:
    """The keys of an SRAM buffer; its capacity is structural where code is placed in it."""
    return [
        _int(f"{section}.size_kb", "KB", 1, 1 << 20, f"capacity of the {what}", structural=structural),
        _int(f"{section}.width_bits", "bits", 8, 4096, f"access width of the {what}"),
        _float(f"{section}.e_read_pj", "pJ", 0, None, f"energy of one {what} read access"),
        _float(f"{section}.e_write_pj", "pJ", 0, None, f"energy of one {what} write access"),
        _float(f"{section}.leak_mw", "mW", 0, None, f"leakage power of the {what}"),
        _float(f"{section}.area_mm2", "mm2", 0, None, f"area of the {what}"),
    ]


SCHEMA: tuple[FieldSpec, ...] = (
    _str("chip.name", "configuration name, shown in reports"),
    _int("chip.tech_nm", "nm", 1, 1000, "technology node"),
    _float("chip.vdd_v", "V", 0.1, 5.0, "supply voltage the energies assume"),
    _float("chip.f_clk_mhz", "MHz", 1, 10000, "clock of macros, buffers, NoC and SFUs"),
    _int("chip.tiles", "tiles", 1, 256, "number of tiles (the ISA's tile field holds 0..255)", structural=True),
    _int("chip.macros_per_tile", "macros", 1, 256, "CIM macros per tile (the ISA's macro field holds 0..255)",
         structural=True),
    _str("macro.type", "macro kind; only digital SRAM CIM is modelled", ("digital_sram_cim",)),
    _int("macro.rows", "bitcells", 8, 4096, "macro rows (reduction length of one MVM)", structural=True),
    _int("macro.cols", "bitcells", 8, 4096, "macro columns; a W-bit weight uses W of them", structural=True),
    FieldSpec("macro.weight_bits", "int_list", "bits", 1, 16, None, True, "weight widths the macro stores"),
    _int("macro.act_bits", "bits", 1, 16, "activation width fed to the macro", structural=True),
    _bool("macro.input_bit_serial", "activations enter one bit per step"),
    _int("macro.cycles_per_input_bit", "cycles", 1, 64, "cycles per activation bit"),
    _int("macro.pipeline_cycles", "cycles", 0, 1024, "adder-tree + shift-accumulate latency per MVM"),
    _int("macro.accum_bits", "bits", 8, 64, "partial-sum accumulator width"),
    _float("macro.e_slice_w4_fj", "fJ", 0, None, "energy per 1-bit input x INT4 weight slice"),
    _float("macro.e_slice_w8_fj", "fJ", 0, None, "energy per 1-bit input x INT8 weight slice"),
    _float("macro.area_mm2", "mm2", 0, None, "area of one macro"),
    _float("macro.leak_mw", "mW", 0, None, "leakage power of one macro"),
    _int("macro.write_port_bits", "bits", 1, 65536, "bits written into the macro per cycle"),
    _int("macro.write_cycles_full", "cycles", 1, 1 << 20, "cycles to rewrite the whole macro"),
    _float("macro.e_write_fj_per_bit", "fJ/bit", 0, None, "energy to write one weight bit"),
    _bool("macro.write_while_compute", "a macro can load weights while it computes"),
    *_buffer("buffer.tile_act", "per-tile activation / partial-sum buffer"),
    *_buffer("buffer.global", "global buffer (activations, KV staging)"),
    *_buffer("buffer.instr", "instruction buffer (code fetched from DRAM)", structural=False),
    _str("noc.topology", "interconnect from the DRAM controller and global buffer to the tiles: a shared "
         "bus (a tree, one transfer at a time per direction) or a mesh (XY-routed links)", TOPOLOGIES),
    _int("noc.link_bits", "bits", 8, 65536, "width of a link (and of a tile's ports), bits per NoC cycle"),
    _float("noc.f_clk_mhz", "MHz", 1, 100000, "clock of the links and tile ports"),
    _float("noc.e_pj_per_bit_mm", "pJ/bit/mm", 0, None, "wire energy per bit per mm"),
    _float("noc.hop_mm", "mm", 0, None, "wire length of one hop (tile pitch)"),
    _int("noc.hop_cycles", "cycles", 0, 1024, "latency of one hop"),
    _float("noc.wire_pitch_um", "um", 0, None, "routing pitch of one interconnect wire (for its area)"),
    _str("dram.type", "DRAM standard (label only; the figures below are what is charged)"),
    _int("dram.channels_x16", "channels", 1, 64, "x16 DRAM channels; addresses interleave across them"),
    _int("dram.mts", "MT/s", 1, 100000, "per-pin transfer rate"),
    _float("dram.peak_gbps", "GB/s", 0.001, 100000, "peak DRAM bandwidth of all channels together"),
    _float("dram.efficiency", "", 0.01, 1, "fraction of peak bandwidth achieved when streaming"),
    _float("dram.latency_ns", "ns", 0, 100000, "first-access latency of a transfer (activate + read latency)"),
    _int("dram.max_outstanding", "transfers", 1, 4096, "transfers the controller keeps in flight"),
    _int("dram.burst_bytes", "bytes", 1, 4096, "smallest transfer of a channel; every access is rounded up to it"),
    _int("dram.interleave_bytes", "bytes", 1, 1 << 20, "consecutive bytes mapped to one channel"),
    _float("dram.e_read_pj_per_bit", "pJ/bit", 0, None, "DRAM read energy per bit"),
    _float("dram.e_write_pj_per_bit", "pJ/bit", 0, None, "DRAM write energy per bit"),
    _bool("dram.kv_cache_in_dram", "the KV cache lives in DRAM, not on chip", structural=True),
    _int("sfu.lanes", "lanes", 1, 4096, "vector lanes per tile"),
    _str("sfu.dtype", "SFU arithmetic type", ("fp16", "bf16", "fp32")),
    _float("sfu.e_add_pj", "pJ", 0, None, "add in sfu.dtype"),
    _float("sfu.e_mul_pj", "pJ", 0, None, "multiply in sfu.dtype"),
    _float("sfu.e_exp_pj", "pJ", 0, None, "exp"),
    _float("sfu.e_recip_rsqrt_pj", "pJ", 0, None, "reciprocal or reciprocal square root"),
    _float("sfu.e_int8_add_pj", "pJ", 0, None, "INT8 add"),
    _float("sfu.e_int32_add_pj", "pJ", 0, None, "INT32 add"),
    _float("sfu.e_add_fp32_pj", "pJ", 0, None, "FP32 add (the simulator's fp32 mode)"),
    _float("sfu.e_mul_fp32_pj", "pJ", 0, None, "FP32 multiply (the simulator's fp32 mode)"),
    _int("sfu.cycles_per_op", "cycles", 1, 1024, "issue interval per op per lane"),
    _float("sfu.leak_mw", "mW", 0, None, "leakage power of one SFU"),
)
FIELDS: dict[str, FieldSpec] = {spec.key: spec for spec in SCHEMA}

#: Keys the simulator does not use (yet), and why; `cimc hw show` marks them.
NOT_MODELLED: dict[str, str] = {
    "chip.tech_nm": "label: the energies are given for it",
    "chip.vdd_v": "label: the energies are given for it",
    "macro.act_bits": "integer inputs enter at their type's width (int8: 8 bits); float inputs at 32",
    "buffer.tile_act.size_kb": "activations are staged in the global buffer",
    "dram.type": "label",
    "dram.mts": "label: each channel carries peak_gbps / channels_x16",
    "sfu.dtype": "the SFUs compute in fp32 (activations, scales and rescaled partial sums are f32)",
    "sfu.e_add_pj": "the SFUs compute in fp32: e_add_fp32_pj",
    "sfu.e_mul_pj": "the SFUs compute in fp32: e_mul_fp32_pj",
    "sfu.e_int8_add_pj": "the integer sums of zero-point corrections are priced as INT32 adds",
}
#: Effects no key controls, listed by `cimc hw show` and docs/numerics-and-timing.md.
NOT_MODELLED_EFFECTS: tuple[str, ...] = (
    "DRAM row-buffer hits and misses, bank conflicts and refresh (folded into dram.efficiency); the DRAM "
    "controller's and PHY's own latency (dram.latency_ns is the device's)",
    "reordering in the DRAM controller by bank state: each channel serves transfers as they are ready",
    "multicast: a value sent to several tiles crosses the interconnect once per instruction that reads it",
    "flit-level sharing of a link: a transfer holds each resource for its busy time from its start, so a short "
    "transfer waits behind a long one already crossing, and a resource faster than the transfer's slowest is "
    "shown busy earlier than the bytes pass",
    "bank conflicts inside the buffers; the tile buffer's capacity and port time (activations are staged in "
    "the global buffer; the tile buffer is charged energy per byte)",
    "router and repeater energy and area beyond the wires' pJ/bit/mm and pitch",
    "area of the SFUs and the partial-sum adder; area and leakage of the control unit and the DRAM PHY",
    "scale groups shorter than a macro's rows: the adder tree is taken to be segmented, one accumulator per "
    "group, at no time or energy beyond the SFU's rescaling of every group's partial sums",
)
#: Values the simulator cannot model: asking for them is an error, not a silently ignored knob.
UNSUPPORTED: dict[str, tuple[object, str]] = {
    "macro.write_while_compute": (True, "a tile either loads or computes; ping-pong across tiles overlaps them"),
    "macro.input_bit_serial": (False, "MVM time is bit-serial (act_bits x cycles_per_input_bit)"),
    "dram.kv_cache_in_dram": (False, "the KV cache always lives in DRAM"),
}


@dataclass(frozen=True)
class ChipConfig:
    """[chip]: technology, supply, clock and the tile array."""

    name: str
    tech_nm: int
    vdd_v: float
    f_clk_mhz: float
    tiles: int
    macros_per_tile: int


@dataclass(frozen=True)
class MacroConfig:
    """[macro]: one CIM macro, its compute and weight-write costs."""

    type: str
    rows: int
    cols: int
    weight_bits: tuple[int, ...]
    act_bits: int
    input_bit_serial: bool
    cycles_per_input_bit: int
    pipeline_cycles: int
    accum_bits: int
    e_slice_w4_fj: float
    e_slice_w8_fj: float
    area_mm2: float
    leak_mw: float
    write_port_bits: int
    write_cycles_full: int
    e_write_fj_per_bit: float
    write_while_compute: bool


@dataclass(frozen=True)
class BufferConfig:
    """[buffer.tile_act] or [buffer.global]: an SRAM buffer; energies are per access."""

    size_kb: int
    width_bits: int
    e_read_pj: float
    e_write_pj: float
    leak_mw: float
    area_mm2: float


@dataclass(frozen=True)
class NocConfig:
    """[noc]: the interconnect between the DRAM controller / global buffer and the tiles."""

    topology: str
    link_bits: int
    f_clk_mhz: float
    e_pj_per_bit_mm: float
    hop_mm: float
    hop_cycles: int
    wire_pitch_um: float


@dataclass(frozen=True)
class DramConfig:
    """[dram]: off-chip memory holding the weights (and by default the KV cache)."""

    type: str
    channels_x16: int
    mts: int
    peak_gbps: float
    efficiency: float
    latency_ns: float
    max_outstanding: int
    burst_bytes: int
    interleave_bytes: int
    e_read_pj_per_bit: float
    e_write_pj_per_bit: float
    kv_cache_in_dram: bool


@dataclass(frozen=True)
class SfuConfig:
    """[sfu]: the vector / special-function unit of each tile; energies are per op per lane."""

    lanes: int
    dtype: str
    e_add_pj: float
    e_mul_pj: float
    e_exp_pj: float
    e_recip_rsqrt_pj: float
    e_int8_add_pj: float
    e_int32_add_pj: float
    e_add_fp32_pj: float
    e_mul_fp32_pj: float
    cycles_per_op: int
    leak_mw: float


# (TOML table, HardwareConfig attribute, dataclass), in schema order.
_SECTIONS: tuple[tuple[str, str, type], ...] = (
    ("chip", "chip", ChipConfig),
    ("macro", "macro", MacroConfig),
    ("buffer.tile_act", "tile_buf", BufferConfig),
    ("buffer.global", "global_buf", BufferConfig),
    ("buffer.instr", "instr_buf", BufferConfig),
    ("noc", "noc", NocConfig),
    ("dram", "dram", DramConfig),
    ("sfu", "sfu", SfuConfig),
)
# Every table name a description may open: the sections and their parents ('buffer').
_TABLES = frozenset(".".join(s.split(".")[: i + 1]) for s, _, _ in _SECTIONS for i in range(s.count(".") + 1))


@dataclass(frozen=True)
class HardwareConfig:
    """A validated hardware description. Equality and hashing ignore `sources` and `origin`."""

    chip: ChipConfig
    macro: MacroConfig
    tile_buf: BufferConfig
    global_buf: BufferConfig
    instr_buf: BufferConfig
    noc: NocConfig
    dram: DramConfig
    sfu: SfuConfig
    sources: dict[str, str] = field(compare=False, repr=False)
    origin: str = field(compare=False)

    @property
    def name(self) -> str:
        """The configuration name (`chip.name`)."""
        return self.chip.name

    @property
    def total_macros(self) -> int:
        """Macros on the chip: tiles x macros_per_tile."""
        return self.chip.tiles * self.chip.macros_per_tile

    @property
    def weight_storage_kb(self) -> float:
        """Weight bits the macros hold at once, in KB (1 KB = 1024 bytes)."""
        return self.total_macros * self.macro.rows * self.macro.cols / 8 / 1024

    @property
    def dram_effective_gbps(self) -> float:
        """Sustained DRAM bandwidth: peak_gbps x efficiency."""
        return self.dram.peak_gbps * self.dram.efficiency

    @property
    def grid_side(self) -> int:
        """Tiles per row of the square grid they sit on (the last row may be partial)."""
        return max(1, math.isqrt(self.chip.tiles - 1) + 1)

    @property
    def noc_wire_mm(self) -> float:
        """Length of the interconnect's links, both directions, in mm of `link_bits`-wide link.

        Per direction, a bus is a comb from the controller (at tile 0's corner) through every grid
        position: side x side hops of `hop_mm`; a mesh has 2 x side x (side - 1) links between
        neighbours plus the controller's link to tile 0.
        """
        side = self.grid_side
        hops = side * side if self.noc.topology == "bus" else 2 * side * (side - 1) + 1
        return 2 * hops * self.noc.hop_mm

    @property
    def noc_area_mm2(self) -> float:
        """Routing area of the interconnect's wires: length x link_bits tracks x wire pitch."""
        return self.noc_wire_mm * self.noc.link_bits * self.noc.wire_pitch_um * 1e-3

    @property
    def area_mm2(self) -> float:
        """Area of the macros, buffers and interconnect wires (SFUs, adder, control and DRAM PHY not included)."""
        c = self.chip
        return (c.tiles * (c.macros_per_tile * self.macro.area_mm2 + self.tile_buf.area_mm2)
                + self.global_buf.area_mm2 + self.instr_buf.area_mm2 + self.noc_area_mm2)

    @property
    def leakage_mw(self) -> float:
        """Static power of the chip: macros, buffers and SFUs (one per tile, plus the partial-sum adder's)."""
        c = self.chip
        return (self.total_macros * self.macro.leak_mw + c.tiles * self.tile_buf.leak_mw + self.global_buf.leak_mw
                + self.instr_buf.leak_mw + (c.tiles + 1) * self.sfu.leak_mw)

    @property
    def cycle_ns(self) -> float:
        """Clock period in ns."""
        return 1000.0 / self.chip.f_clk_mhz

    def values(self) -> dict[str, Any]:
        """Every field by dotted key ('macro.rows' -> 128), in schema order."""
        out: dict[str, Any] = {}
        for section, attr, _ in _SECTIONS:
            part = getattr(self, attr)
            for f in dataclasses.fields(part):
                out[f"{section}.{f.name}"] = getattr(part, f.name)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict mirroring the TOML layout, with `sources`; JSON-serialisable."""
        out: dict[str, Any] = {}
        for key, value in self.values().items():
            *tables, name = key.split(".")
            node = out
            for table in tables:
                node = node.setdefault(table, {})
            node[name] = list(value) if isinstance(value, tuple) else value
        out["sources"] = dict(self.sources)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], origin: str) -> HardwareConfig:
        """Validate a complete description in `to_dict` form; `origin` names it in errors."""
        if not isinstance(d, Mapping):
            raise CimcError(f"{origin}: hardware description must be a table, got {toml_repr(d)}")
        layer = _parse_layer(d, origin, allow_extends=False)
        return _merge([layer], [], origin)

    def with_values(self, values: Mapping[str, object], label: str) -> HardwareConfig:
        """This description with the keys of `values` ('macro.rows' -> 256) replaced, validated as a file
        layered over it would be; `label` names the change in errors and source notes."""
        base = _Layer(self.origin, self.values(), dict(self.sources))
        return _merge([base, _parse_layer(values, label, allow_extends=False)], [], self.origin)

    def fingerprint(self) -> str:
        """16 hex digits of sha256 over the structural fields; energies and clocks do not count."""
        structural = {k: v for k, v in self.values().items() if FIELDS[k].structural}
        # json writes floats with repr(), which is exact and the same on every platform.
        canonical = json.dumps(structural, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def list_presets() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_hw(spec: str | Path | None = None, overrides: Sequence[str] = ()) -> HardwareConfig:
    """Load a preset by name or a TOML file by path (None: `edgecim-65nm`), then apply
    `overrides` such as `"macro.rows=256"` or `'dram.type="LPDDR4"'` (values are TOML; a bare
    word is taken as a string). Raises CimcError naming the file and key for any bad input.
    """
    spec = DEFAULT_PRESET if spec is None else spec
    path, label = _resolve(spec, None, "")
    origin = spec if isinstance(spec, str) and spec in list_presets() else str(spec)
    layers = _load_chain(path, label)
    return _merge(layers, [_parse_override(text) for text in overrides], origin)


def render_text(hw: HardwareConfig) -> str:
    """Human-readable listing (`cimc hw show`): every key with value, unit and source note."""
    shown = {key: toml_repr(value) for key, value in hw.values().items()}
    kw = max(len(spec.name) for spec in SCHEMA)
    vw = max(len(text) for text in shown.values())
    uw = max(len(spec.unit) for spec in SCHEMA)
    lines = [f"{hw.name}  (origin: {hw.origin}, fingerprint: {hw.fingerprint()})"]
    for section, _, _ in _SECTIONS:
        lines += ["", f"[{section}]"]
        for spec in SCHEMA:
            if spec.section == section:
                value = shown[spec.key]
                note = f"[not modelled: {NOT_MODELLED[spec.key]}] " if spec.key in NOT_MODELLED else ""
                lines.append(
                    f"  {spec.name:<{kw}} = {value:<{vw}} {spec.unit:<{uw}} # {note}{hw.sources[spec.key]}"
                )
    c, d, n = hw.chip, hw.dram, hw.noc
    macros = c.tiles * c.macros_per_tile * hw.macro.area_mm2
    buffers = c.tiles * hw.tile_buf.area_mm2 + hw.global_buf.area_mm2 + hw.instr_buf.area_mm2
    lines += [
        "",
        "derived:",
        f"  array         {hw.total_macros} macros ({c.tiles} tiles x {c.macros_per_tile}), "
        f"{hw.weight_storage_kb:g} KB of weights at once; clock {c.f_clk_mhz:g} MHz ({hw.cycle_ns:g} ns)",
        f"  DRAM          {d.channels_x16} channels x {d.peak_gbps / d.channels_x16:.4g} GB/s = {d.peak_gbps:g} GB/s "
        f"peak, {hw.dram_effective_gbps:.4g} GB/s sustained; {d.latency_ns:g} ns first access, "
        f"up to {d.max_outstanding} transfers in flight",
        f"  interconnect  {n.topology}, {n.link_bits}-bit links at {n.f_clk_mhz:g} MHz = "
        f"{n.link_bits / 8 * n.f_clk_mhz / 1e3:.4g} GB/s per link; {hw.noc_wire_mm:.4g} mm of links",
        f"  global buffer {hw.global_buf.width_bits}-bit read and write ports = "
        f"{hw.global_buf.width_bits / 8 * c.f_clk_mhz / 1e3:.4g} GB/s each",
        f"  area          {hw.area_mm2:.4g} mm2: macros {macros:.4g}, buffers {buffers:.4g}, "
        f"interconnect wires {hw.noc_area_mm2:.4g} (SFUs, adder, control and DRAM PHY not included)",
        "",
        "not modelled (by any key):",
        *(f"  - {effect}" for effect in NOT_MODELLED_EFFECTS),
    ]
    return "\n".join(lines) + "\n"


@dataclass
class _Layer:
    """The keys one TOML file (or `from_dict` dict) sets, already converted, and its base."""

    label: str
    values: dict[str, object]
    sources: dict[str, str]
    extends: str | None = None


def _resolve(spec: str | Path, base_dir: Path | None, where: str) -> tuple[Path, str]:
    """(path, label for messages) of a preset name or a TOML path relative to `base_dir`."""
    if isinstance(spec, str) and spec in list_presets():
        path = PRESET_DIR / f"{spec}.toml"
        return path, str(path)
    path = Path(spec)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        presets = ", ".join(list_presets())
        raise CimcError(f"{where}no hardware preset or file named '{spec}' (presets: {presets})")
    return path, str(path)


def _load_chain(path: Path, label: str) -> list[_Layer]:
    """The layers from the root preset down to the file at `path`, base first."""
    default = (PRESET_DIR / f"{DEFAULT_PRESET}.toml").resolve()
    chain: list[tuple[Path, str]] = []
    layers: list[_Layer] = []
    while True:
        real = path.resolve()
        if any(real == seen for seen, _ in chain):
            cycle = " -> ".join([seen_label for _, seen_label in chain] + [label])
            raise CimcError(f"{chain[-1][1]}: extends cycle: {cycle}; remove one of the 'extends' keys")
        chain.append((real, label))
        layer = _parse_layer(_read_toml(path, label), label, allow_extends=True)
        layers.append(layer)
        if layer.extends is None and real == default:
            return layers[::-1]
        base = layer.extends if layer.extends is not None else DEFAULT_PRESET
        path, label = _resolve(base, path.parent, f"{label}: key 'extends': ")


def _read_toml(path: Path, label: str) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise CimcError(f"{label}: cannot read file: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise CimcError(f"{label}: not valid TOML: the file is not UTF-8 text") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CimcError(f"{label}: not valid TOML: {e}") from e


def _parse_layer(data: Mapping[str, Any], label: str, *, allow_extends: bool) -> _Layer:
    """Check every key and value of one parsed description."""
    layer = _Layer(label, {}, {})
    for top, value in data.items():
        if top == "extends" and allow_extends:
            if not isinstance(value, str) or not value:
                raise CimcError(
                    f"{label}: key 'extends' must be a preset name or a path to a TOML file, "
                    f"got {toml_repr(value)}"
                )
            layer.extends = value
        elif top == "sources":
            if not isinstance(value, Mapping):
                raise CimcError(f'{label}: \'sources\' must be a table of "section.key" = "note" entries')
            for key, note in _flatten_sources(value, label, ""):
                if not isinstance(note, str):
                    raise CimcError(
                        f"{label}: source note for '{key}' must be a string, got {toml_repr(note)}"
                    )
                layer.sources[key] = note
        else:
            for key, raw in _flatten_values(top, value, label):
                try:
                    layer.values[key] = FIELDS[key].convert(raw)
                except ValueError as e:
                    raise CimcError(f"{label}: key '{key}' {e}") from None
    return layer


def _flatten_values(key: str, value: object, label: str) -> Iterator[tuple[str, object]]:
    if key in _TABLES:
        if not isinstance(value, Mapping):
            raise CimcError(f"{label}: '{key}' must be a table ([{key}]), got {toml_repr(value)}")
        for sub, subvalue in value.items():
            yield from _flatten_values(f"{key}.{sub}", subvalue, label)
    elif key in FIELDS:
        yield key, value
    elif isinstance(value, Mapping):
        raise CimcError(f"{label}: unknown table [{_printable(key)}]{_suggest_table(key)}")
    else:
        raise CimcError(f"{label}: unknown key '{_printable(key)}'{suggest_key(key)}")


def _flatten_sources(table: Mapping[str, Any], label: str, prefix: str) -> Iterator[tuple[str, object]]:
    """Accept both `"macro.rows" = "..."` and nested tables (`[sources.macro]`)."""
    for sub, value in table.items():
        key = prefix + sub
        if isinstance(value, Mapping):
            yield from _flatten_sources(value, label, key + ".")
        elif key in FIELDS:
            yield key, value
        else:
            raise CimcError(f"{label}: source note for unknown key '{_printable(key)}'{suggest_key(key)}")


_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*")


def _parse_override(text: str) -> tuple[str, object]:
    """('macro.rows', 256) from 'macro.rows=256', validated."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise CimcError(f"--set '{_printable(text)}': expected KEY=VALUE, e.g. macro.rows=256")
    if key not in FIELDS:
        raise CimcError(f"--set '{_printable(key)}': unknown key{suggest_key(key)}")
    try:
        doc = tomllib.loads(f"v = {raw}")
        value: object = doc["v"] if len(doc) == 1 else None
    except tomllib.TOMLDecodeError:
        value = raw if _BARE_WORD.fullmatch(raw) else None
    if value is None:
        raise CimcError(
            f"--set '{key}': {toml_repr(raw)} is not a TOML value; write e.g. {key}=\"text\" or {key}=1.5"
        )
    try:
        return key, FIELDS[key].convert(value)
    except ValueError as e:
        raise CimcError(f"--set '{key}': {e}") from None


#: The pairs of keys that `_merge`'s cross-field rules read together (every other rule reads one key):
#: a design space (cimc.dse.space) checks the combinations of exactly these pairs.
CROSS_FIELD_PAIRS: tuple[tuple[str, str], ...] = (
    ("dram.interleave_bytes", "dram.burst_bytes"),
    ("macro.cols", "macro.weight_bits"),
    ("chip.tiles", "chip.macros_per_tile"),
)


def _merge(layers: list[_Layer], overrides: list[tuple[str, object]], origin: str) -> HardwareConfig:
    """Apply layers base first, then overrides; check completeness and cross-field rules."""
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    set_by: dict[str, int] = {}  # key -> index into `labels` of the last layer that set it
    labels = [layer.label for layer in layers] + ["--set"]
    for i, layer in enumerate(layers):
        for key, value in layer.values.items():
            values[key], sources[key], set_by[key] = value, f"set in {layer.label}", i
        sources.update(layer.sources)
    for key, value in overrides:
        values[key], sources[key], set_by[key] = value, "set on the command line", len(layers)

    missing = [key for key in FIELDS if key not in values]
    if missing:
        listed = ", ".join(f"'{key}'" for key in missing)
        raise CimcError(f"{origin}: incomplete hardware description, missing {listed}")

    parts = {
        attr: cls(**{f.name: values[f"{section}.{f.name}"] for f in dataclasses.fields(cls)})
        for section, attr, cls in _SECTIONS
    }
    hw = HardwareConfig(**parts, sources={key: sources[key] for key in FIELDS}, origin=origin)

    def where(*keys: str) -> str:
        return labels[max(set_by[key] for key in keys)]

    # A rule below that reads two keys lists them in CROSS_FIELD_PAIRS.
    for key, (value, why) in UNSUPPORTED.items():
        if values[key] == value:
            raise CimcError(f"{where(key)}: key '{key}' = {toml_repr(value)} is not modelled by this simulator "
                            f"({why}); set it to {toml_repr(not value)}")
    if hw.dram.interleave_bytes % hw.dram.burst_bytes:
        raise CimcError(
            f"{where('dram.interleave_bytes', 'dram.burst_bytes')}: keys 'dram.interleave_bytes' "
            f"({hw.dram.interleave_bytes}) and 'dram.burst_bytes' ({hw.dram.burst_bytes}) do not fit: a channel's "
            "interleave must be a whole number of bursts"
        )
    for key, bits in (("buffer.global.width_bits", hw.global_buf.width_bits),
                      ("buffer.instr.width_bits", hw.instr_buf.width_bits), ("noc.link_bits", hw.noc.link_bits)):
        if bits % 8:
            raise CimcError(f"{where(key)}: key '{key}' ({bits}) must be a whole number of bytes (a multiple of 8)")
    if hw.macro.cols < max(hw.macro.weight_bits):
        raise CimcError(
            f"{where('macro.cols', 'macro.weight_bits')}: key 'macro.cols' ({hw.macro.cols}) must be >= "
            f"every 'macro.weight_bits' value {list(hw.macro.weight_bits)}; raise cols or lower weight_bits"
        )
    if hw.total_macros < 2:
        raise CimcError(
            f"{where('chip.tiles', 'chip.macros_per_tile')}: keys 'chip.tiles' x 'chip.macros_per_tile' "
            f"must give >= 2 macros (one loads weights while another computes), "
            f"got {hw.chip.tiles} x {hw.chip.macros_per_tile}"
        )
    return hw


def suggest_key(key: str) -> str:
    """' (did you mean ...?)', else the keys of the key's table, else the tables."""
    close = difflib.get_close_matches(key, list(FIELDS), n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    table = key.rpartition(".")[0]
    names = [spec.name for spec in SCHEMA if spec.section == table]
    if names:
        return f" (keys of [{table}]: {', '.join(names)})"
    return _suggest_table(table)


def _suggest_table(table: str) -> str:
    """' (did you mean [macro]?)', else the list of tables."""
    close = difflib.get_close_matches(table, sorted(_TABLES | {"sources"}), n=1)
    if close:
        return f" (did you mean [{close[0]}]?)"
    return f" (tables: {', '.join(s for s, _, _ in _SECTIONS)}, sources)"


def _printable(text: str) -> str:
    """`text` with control characters escaped, so that a message stays on one line."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _finite_float(x: float) -> float | None:
    try:
        f = float(x)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _num(x: float) -> str:
    """A bound as written by a person: 8, 4096, 0.01."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def toml_repr(value: object) -> str:
    """A value as TOML would spell it (tables are named, not dumped)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_repr(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "a table"
    return repr(value) if isinstance(value, float) else str(value)


def _check_schema() -> None:
    """SCHEMA and the section dataclasses must list the same keys in the same order."""
    for section, _, cls in _SECTIONS:
        keys = [spec.name for spec in SCHEMA if spec.section == section]
        names = [f.name for f in dataclasses.fields(cls)]
        if keys != names:
            raise RuntimeError(f"isa.hw: SCHEMA [{section}] {keys} != {cls.__name__} fields {names}")
    if {spec.section for spec in SCHEMA} != {section for section, _, _ in _SECTIONS}:
        raise RuntimeError("isa.hw: SCHEMA names a table that HardwareConfig does not have")


_check_schema()
