"""The cost model: what every instruction holds, for how long, and its picojoules.

One `CostModel` object serves both the compiler (`balance-stages` prices the code it would
generate, for its estimate) and the simulator: `instr_costs` prices a whole decoded program at
once, vectorised with numpy, so the compiler's estimate and the simulator's measurement come
from the same figures.

Resources ("units"), each serving one thing at a time, in program order:

- `dram0 ..`: the DRAM channels. Byte addresses interleave across them every
  `dram.interleave_bytes`; each carries `peak_gbps / channels x efficiency`. Every access is
  rounded up to whole bursts (`dram.burst_bytes`) per contiguous row.
- the interconnect from the DRAM controller and global buffer (at tile 0's corner) to the tiles:
  a `bus` (one unit per direction) or a `mesh` (one unit per directed link, XY-routed), links of
  `noc.link_bits` at `noc.f_clk_mhz`;
- `gbuf.rd`, `gbuf.wr`: the global buffer's ports, `buffer.global.width_bits` per cycle each;
  `reduce`: the adder next to the buffer that sums partial sums (`sfu.lanes` adds per cycle);
- per tile: `tile<t>` (its macros), `sfu<t>` (its vector unit), `port<t>.in` and `port<t>.out`
  (its ports on the interconnect, `noc.link_bits` wide).

A transfer holds every resource on its path, each for the time it needs (bytes over its width);
the slowest sets its duration, and `runtime.timing` serialises transfers that share a resource.
A transfer that touches DRAM completes `dram.latency_ns` later, one that crosses the interconnect
`hops x noc.hop_cycles` later each way; the controller keeps up to `dram.max_outstanding` DRAM
transfers in flight. An MVM's macros also wait for its first input vector to arrive and for its last result
to leave (a bit-serial MVM needs every input's bit plane before it starts).

Code is fetched from DRAM into the instruction buffer (`buffer.instr`, two halves: one is
dispatched while the other is refilled) in blocks of half its size, each one DRAM transfer whose
instructions arrive in order; dispatch takes one instruction per `64 B / buffer.instr.width_bits`
cycles.

Energy components: `dram` (bytes moved, including code), `macro_write` (weight bits written into
CIM cells), `mvm` (bit-serial multiply-accumulate in the macros), `sfu` (vector arithmetic),
`buffer` (global, tile and instruction buffer accesses), `noc` (bits x distance, between the
controller or the global buffer and a tile, and over the wire between the controller and the
buffer). Leakage is
charged by the simulator: `leakage_mw` times elapsed time. DRAM bytes are also counted by kind
(`DRAM_KINDS`), from where each address lies in the program's DRAM layout (`DramMap`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from isa.dtypes import ACT, WEIGHT_TYPES, elem
from isa.encoding import Columns, dim_values, mem_parts
from isa.fields import DTYPES
from isa.hw import HardwareConfig
from isa.spec import BY_NAME, INSTR_BYTES

COMPONENTS = ("dram", "macro_write", "mvm", "sfu", "buffer", "noc")
#: What DRAM bytes are for (key) and how reports name it; `code` is instruction fetch, `other`
#: bytes outside the program's map.
DRAM_KINDS: dict[str, str] = {"weights": "weights", "constants": "constants", "kv_cache": "KV cache",
                              "io": "inputs/outputs", "spills": "spills", "code": "code", "other": "other"}
_KIND_INDEX = {k: i for i, k in enumerate(DRAM_KINDS)}
#: The formulas take scalars or arrays alike.
Num = float | np.ndarray
DRAM_SPACE = 1
ELEM_BYTES = elem(ACT).nbytes  # activations, scales and partial sums are f32
_WBITS = np.array([elem(t).bits for t in WEIGHT_TYPES], dtype=np.float64)  # by `wt` code
_WFLOAT = np.array([elem(t).is_float for t in WEIGHT_TYPES])
_WSIGNED = np.array([elem(t).signed for t in WEIGHT_TYPES])
_DBITS = np.array([elem(t).bits for t in DTYPES], dtype=np.float64)  # by `dt`/`xt` code
_DBYTES = np.array([elem(t).nbytes for t in DTYPES], dtype=np.float64)
_DFLOAT = np.array([elem(t).is_float for t in DTYPES])
_U8 = DTYPES.index("u8")  # `xt` code of u8 inputs, which carry a zero point
#: SFU operations per element of `vquant` with asym (DynamicQuantizeLinear): the block's minimum and
#: maximum, a division by the scale, adding the zero point and clipping.
VQUANT_ASYM_OPS = {"add": 3, "mul": 1, "recip": 1}


def macros_used(k: int, n: int, wbits: int, rows: int, cols: int) -> int:
    """CIM macros of `rows` x `cols` bitcells a k x n group of `wbits`-bit weights occupies."""
    return -(-k // rows) * -(-(n * wbits) // cols)


@dataclass(frozen=True)
class DramMap:
    """Where a program keeps what in DRAM: `kinds[i]` from byte `starts[i]` (sorted) to the
    next start, and the code (fetched by the control unit) from `code_base`."""

    starts: tuple[int, ...]
    kinds: tuple[str, ...]
    code_base: int

    @classmethod
    def from_meta(cls, meta: dict) -> DramMap:
        """The map a program records in its metadata (`dram_map`, `code_base`)."""
        regions = meta.get("dram_map") or [[0, "other"]]
        return cls(tuple(int(s) for s, _ in regions), tuple(str(k) for _, k in regions),
                   int(meta.get("code_base", 0)))

    def kind_index(self, addr: np.ndarray) -> np.ndarray:
        """Index into DRAM_KINDS of the region holding each address."""
        codes = np.array([_KIND_INDEX[k] for k in self.kinds], dtype=np.int64)
        at = np.searchsorted(np.array(self.starts, dtype=np.int64), addr, side="right") - 1
        return np.where(at >= 0, codes[np.maximum(at, 0)], _KIND_INDEX["other"])


@dataclass
class InstrCosts:
    """Per-instruction costs of a program run (arrays indexed by instruction).

    `ptr`, `unit`, `busy`, `compute` list the resources each instruction holds: instruction i
    holds unit[ptr[i]:ptr[i+1]] for busy[...] cycles; `compute` is that time if DRAM were
    infinitely fast (0 on DRAM channels, a weight load's macro writes on its tile). The unit
    that executes an instruction (`main`) is held until the instruction completes, so the next
    instruction it runs sees the results.
    """

    ptr: np.ndarray
    unit: np.ndarray
    busy: np.ndarray
    compute: np.ndarray
    main: np.ndarray  # the unit that executes the instruction (held until it completes), or -1
    also: np.ndarray  # a second executing unit (an MVM's SFU rescaling its partial sums), or -1
    latency: np.ndarray  # cycles from the last resource's release to completion
    dram_done: np.ndarray  # cycles from its start until its DRAM transfer completes (frees its slot)
    energy: dict[str, np.ndarray]  # component -> pJ
    dram_bytes: np.ndarray
    dram_kind_bytes: dict[str, np.ndarray]  # DRAM_KINDS -> bytes per instruction
    macs: np.ndarray
    fetch: FetchCosts

    def __len__(self) -> int:
        return len(self.latency)

    def instr_of(self) -> np.ndarray:
        """The instruction of every (unit, busy) entry."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.ptr))

    def duration(self) -> np.ndarray:
        """Per instruction: its slowest resource's time (0 if it holds none)."""
        out = np.zeros(len(self))
        if len(self.busy):
            np.maximum.at(out, self.instr_of(), self.busy)
        return out


@dataclass
class FetchCosts:
    """Instruction fetch of a run: block b holds instructions [b*per_block, (b+1)*per_block) and
    occupies DRAM channel c for `busy[b, c]` cycles; `dispatch` is the cycles per instruction."""

    per_block: int
    busy: np.ndarray  # [blocks, channels]
    latency: float
    dispatch: float


class CostModel:
    """Cycle and energy formulas for one hardware description."""

    def __init__(self, hw: HardwareConfig) -> None:
        self.hw = hw
        c, m, d, noc = hw.chip, hw.macro, hw.dram, hw.noc
        self.f_hz = c.f_clk_mhz * 1e6
        self.tiles = c.tiles
        self.channels = d.channels_x16
        self.dram_bpc = d.peak_gbps * 1e9 * d.efficiency / self.f_hz  # bytes per cycle, all channels
        self.chan_bpc = self.dram_bpc / self.channels
        self.dram_latency = d.latency_ns * c.f_clk_mhz / 1e3
        self.link_bpc = noc.link_bits / 8 * noc.f_clk_mhz / c.f_clk_mhz
        self.hop_latency = noc.hop_cycles * c.f_clk_mhz / noc.f_clk_mhz
        self.gbuf_bpc = hw.global_buf.width_bits / 8
        self.side = hw.grid_side
        self.e_dram_rd = d.e_read_pj_per_bit * 8  # pJ per byte
        self.e_dram_wr = d.e_write_pj_per_bit * 8
        self.e_gbuf_rd = hw.global_buf.e_read_pj / (hw.global_buf.width_bits / 8)
        self.e_gbuf_wr = hw.global_buf.e_write_pj / (hw.global_buf.width_bits / 8)
        self.e_tbuf = (hw.tile_buf.e_read_pj + hw.tile_buf.e_write_pj) / (hw.tile_buf.width_bits / 8)
        ib = hw.instr_buf
        self.e_fetch = INSTR_BYTES * (self.e_dram_rd + (ib.e_read_pj + ib.e_write_pj) / (ib.width_bits / 8))
        self.e_noc_byte_hop = noc.e_pj_per_bit_mm * 8 * noc.hop_mm
        self.e_sfu = {"add": hw.sfu.e_add_fp32_pj, "mul": hw.sfu.e_mul_fp32_pj, "exp": hw.sfu.e_exp_pj,
                      "recip": hw.sfu.e_recip_rsqrt_pj}
        self.macro_rows, self.macro_cols = m.rows, m.cols
        self.leakage_mw = hw.leakage_mw
        self._build_units()

    # ---- units ---------------------------------------------------------------------------

    def _build_units(self) -> None:
        """Name every unit and the interconnect path between the controller and each tile."""
        names = [f"dram{ch}" for ch in range(self.channels)]
        side, tiles = self.side, self.tiles
        xy = [(t % side, t // side) for t in range(tiles)]
        if self.hw.noc.topology == "bus":
            names += ["bus.down", "bus.up"]
            down = [[self.channels] for _ in range(tiles)]
            up = [[self.channels + 1] for _ in range(tiles)]
        else:
            links: dict[tuple, int] = {}

            def link(a: tuple, b: tuple) -> int:
                if (a, b) not in links:
                    links[(a, b)] = len(names)
                    label = "ctrl" if a == "ctrl" else f"x{a[0]}y{a[1]}"
                    to = "ctrl" if b == "ctrl" else f"x{b[0]}y{b[1]}"
                    names.append(f"link {label}>{to}")
                return links[(a, b)]

            down, up = [], []
            for x, y in xy:  # XY routing out of the corner; back along the row first, then the column
                path = [link("ctrl", (0, 0))]
                path += [link((i, 0), (i + 1, 0)) for i in range(x)] + [link((x, j), (x, j + 1)) for j in range(y)]
                down.append(path)
                back = [link((i, y), (i - 1, y)) for i in range(x, 0, -1)]
                back += [link((0, j), (0, j - 1)) for j in range(y, 0, -1)] + [link((0, 0), "ctrl")]
                up.append(back)
        self.gbuf_rd_unit, self.gbuf_wr_unit, self.reduce_unit = len(names), len(names) + 1, len(names) + 2
        names += ["gbuf.rd", "gbuf.wr", "reduce"]
        self.tile0 = len(names)
        names += [f"tile{t}" for t in range(tiles)] + [f"sfu{t}" for t in range(tiles)]
        names += [f"port{t}.in" for t in range(tiles)] + [f"port{t}.out" for t in range(tiles)]
        self.names = names
        width = max(len(p) for p in down + up)
        self.down_path = np.array([p + [-1] * (width - len(p)) for p in down], dtype=np.int64)
        self.up_path = np.array([p + [-1] * (width - len(p)) for p in up], dtype=np.int64)
        self.hop_count = np.array([1 + x + y for x, y in xy], dtype=np.float64)

    @property
    def n_units(self) -> int:
        return len(self.names)

    def unit_names(self) -> list[str]:
        return list(self.names)

    def unit_kinds(self) -> list[str]:
        """Per unit: dram, noc, gbuf, reduce, tile, sfu or port (the report groups units by kind)."""
        return ["dram"] * self.channels + ["noc"] * (self.gbuf_rd_unit - self.channels) + ["gbuf"] * 2 + \
            ["reduce"] + [k for k in ("tile", "sfu", "port", "port") for _ in range(self.tiles)]

    def tile_unit(self, tile: np.ndarray | int) -> np.ndarray | int:
        return self.tile0 + tile

    def sfu_unit(self, tile: np.ndarray | int) -> np.ndarray | int:
        return self.tile0 + self.tiles + tile

    def port_unit(self, tile: np.ndarray | int, out: bool) -> np.ndarray | int:
        return self.tile0 + (3 if out else 2) * self.tiles + tile

    def hops(self, tile: np.ndarray | int) -> np.ndarray | float:
        """Hops from the controller / global buffer (at tile 0's corner) to a tile."""
        return self.hop_count[tile]

    # ---- formulas (work on scalars or arrays) ---------------------------------------------

    def write_cycles(self, k: Num, n: Num, wbits: Num) -> np.ndarray:
        """Cycles to write a weight group into its macros (macros of a tile write in parallel):
        `write_cycles_full` for a whole macro, scaled by the rows and write-port beats used."""
        m = self.hw.macro
        beats = np.minimum(k, self.macro_rows) * -(-np.minimum(n * wbits, self.macro_cols) // m.write_port_bits)
        full = self.macro_rows * -(-self.macro_cols // m.write_port_bits)
        return np.ceil(beats * (m.write_cycles_full / full))

    def mvm_cycles(self, nvec: Num, abits: Num) -> Num:
        """Bit-serial MVM: one input bit per cycle per vector, pipelined across vectors."""
        m = self.hw.macro
        return nvec * abits * m.cycles_per_input_bit + m.pipeline_cycles

    def sfu_cycles(self, elements: Num, ops_per_element: Num) -> np.ndarray:
        """SFU lanes each do one primitive op per cycle."""
        work = elements * np.maximum(ops_per_element, 1.0)
        return np.ceil(work / self.hw.sfu.lanes) * self.hw.sfu.cycles_per_op

    def e_slice_fj(self, wbits: Num) -> np.ndarray:
        """Energy of one input bit times one `wbits` weight (scaled from the INT4 slice)."""
        m = self.hw.macro
        return np.where(wbits == 8, m.e_slice_w8_fj, m.e_slice_w4_fj * np.asarray(wbits) / 4.0)

    def sfu_energy_per_element(self, mnemonic: str) -> float:
        return sum(self.e_sfu[op] * k for op, k in BY_NAME[mnemonic].sfu_ops.items())

    def channel_bytes(self, base: np.ndarray, rows: np.ndarray, row_bytes: np.ndarray,
                      pitch: np.ndarray) -> np.ndarray:
        """Bytes each DRAM channel moves ([n, channels]) for `rows` rows of `row_bytes` bytes,
        `pitch` bytes apart from byte address `base`: every row rounded out to the bursts it
        touches, then split by the channel interleaving. Rows a pitch apart repeat their channel
        and burst pattern every `interleave x channels / gcd(pitch, interleave x channels)` rows,
        so each transfer is priced row by row over at most that many rows, exactly."""
        d = self.hw.dram
        stripe = d.interleave_bytes * self.channels
        base, rows, row_bytes, pitch = (np.asarray(a, dtype=np.int64) for a in (base, rows, row_bytes, pitch))
        whole = (rows <= 1) | (pitch == row_bytes)
        span = np.where(whole, rows * row_bytes, row_bytes)
        nrow = np.where(whole, (rows > 0).astype(np.int64), rows)
        step = np.where(whole, 0, pitch)
        period = stripe // np.gcd(step % stripe, stripe)
        return _channel_bytes(base, nrow, span, step, period, d.burst_bytes, d.interleave_bytes, self.channels)

    # ---- whole programs ------------------------------------------------------------------

    def instr_costs(self, cols: Columns, regs: np.ndarray, dram_map: DramMap | None = None) -> InstrCosts:
        """Price every instruction of a decoded program, with runtime registers `regs`."""
        acc = _Acc(self, len(cols), regs, dram_map or DramMap((0,), ("other",), 0))
        for mnemonic, idx in cols.rows.items():
            spec = BY_NAME[mnemonic]
            getattr(self, f"_cost_{spec.cost}")(mnemonic, idx, cols.fields[mnemonic], acc)
        return acc.finish()

    def _dim(self, f: dict, name: str, acc: _Acc) -> np.ndarray:
        return dim_values(f[name], acc.regs).astype(np.float64)

    def _cost_ctrl(self, mnemonic, idx, f, acc: _Acc) -> None:
        return None

    def _cost_dma(self, mnemonic, idx, f, acc: _Acc) -> None:
        esize = _DBYTES[f["dt"].astype(np.int64)]
        rows, cols = self._dim(f, "rows", acc), self._dim(f, "cols", acc)
        acc.move(idx, f["src"], rows, cols * esize, write=False)
        acc.move(idx, f["dst"], rows, cols * esize, write=True)
        # the wire between the controller and the buffer (as wide as the buffer's port, which
        # times it); a copy inside the buffer crosses no wire
        crosses = (mem_parts(f["src"])[0] == DRAM_SPACE) != (mem_parts(f["dst"])[0] == DRAM_SPACE)
        acc.energy["noc"][idx] += np.where(crosses, rows * cols * esize * self.e_noc_byte_hop, 0.0)

    def _cost_gather(self, mnemonic, idx, f, acc: _Acc) -> None:
        rows, cols = self._dim(f, "n", acc), self._dim(f, "cols", acc)
        acc.move(idx, f["idx"], rows, np.full(len(idx), 4.0), write=False)
        # the rows' addresses depend on the ids: they are priced as that many consecutive rows
        acc.move(idx, f["table"], rows, cols * ELEM_BYTES, write=False)
        acc.move(idx, f["dst"], rows, cols * ELEM_BYTES, write=True)
        acc.energy["noc"][idx] += rows * cols * ELEM_BYTES * self.e_noc_byte_hop

    def _cost_macro_write(self, mnemonic, idx, f, acc: _Acc) -> None:
        k, n = (f[x].astype(np.float64) for x in ("k", "n"))
        wbits = _WBITS[f["wt"].astype(np.int64)]
        tile = f["tile"].astype(np.int64)
        nbytes = np.ceil(k * n * wbits / 8)
        acc.move(idx, f["src"], np.ones(len(idx)), nbytes, write=False, tile=tile)
        write = self.write_cycles(k, n, wbits)
        # the macros are written as the bytes arrive: the tile is held until the last of them
        acc.main(idx, self.tile_unit(tile), write, hold_transfer=True)
        acc.energy["macro_write"][idx] += k * n * wbits * self.hw.macro.e_write_fj_per_bit / 1000

    def _cost_mvm(self, mnemonic, idx, f, acc: _Acc) -> None:
        k, n = (f[x].astype(np.float64) for x in ("k", "n"))
        wt, xt = f["wt"].astype(np.int64), f["xt"].astype(np.int64)
        wbits, abits, xsize = _WBITS[wt], _DBITS[xt], _DBYTES[xt]
        tile = f["tile"].astype(np.int64)
        nvec = self._dim(f, "nvec", acc)
        # the first input vector must have arrived before its bit planes start, and the last
        # result leaves after they end: a vector's transfer each way adds to the compute time
        fill = (acc.first_row_cycles(f["src"], k * xsize, xsize)
                + acc.first_row_cycles(f["dst"], n * ELEM_BYTES))
        # u8 inputs carry a zero point: the weights' column sums take one more, all-ones, input plane
        planes = np.where((xt == _U8) & ~_WFLOAT[wt], 1.0, 0.0)
        macro = self.mvm_cycles(nvec, abits) + planes * self.hw.macro.cycles_per_input_bit
        acc.main(idx, self.tile_unit(tile), macro + np.where(nvec > 0, fill, 0.0))
        acc.macs[idx] += nvec * k * n
        acc.energy["mvm"][idx] += (nvec * abits + planes) * k * n * self.e_slice_fj(wbits) / 1000
        acc.move(idx, f["src"], nvec, k * xsize, write=False, tile=tile, esize=xsize)
        acc.move(idx, f["dst"], nvec, n * ELEM_BYTES, write=True, tile=tile)
        accumulate = f["acc"].astype(bool)
        if accumulate.any():
            acc.move(idx[accumulate], f["dst"][accumulate], nvec[accumulate], n[accumulate] * ELEM_BYTES,
                     write=False, tile=tile[accumulate])
        acc.energy["buffer"][idx] += nvec * (k * xsize + n * ELEM_BYTES) * self.e_tbuf
        scaled = np.flatnonzero(~_WFLOAT[wt])
        if len(scaled):  # integer weights: the tile's SFU rescales every group's partial sums
            self._rescale(idx[scaled], {name: v[scaled] for name, v in f.items()}, acc, k[scaled], n[scaled],
                          nvec[scaled], tile[scaled], ~_DFLOAT[xt[scaled]], xt[scaled] == _U8)

    def _rescale(self, idx, f, acc: _Acc, k, n, nvec, tile, int_inputs, asym) -> None:
        """The tile's SFU turns each group's partial sums into f32 and adds them up with their
        scales: `nvec x G x n` elements, each a multiply by the weight scale (and by the input
        scale, for integer inputs) and an add; unsigned weights add the zero-point correction
        (a multiply and an add per element, after summing each vector's inputs per group), and
        u8 inputs (`asym`) their zero point's: xz times the weights' column sum (a multiply and an
        add per element) and, with unsigned weights too, K_g * xz * z (another). It reads the
        weight scales (and zero points) once and the input scales (u8: scale and zero point) of
        every vector."""
        gk = f["gk"].astype(np.float64)
        groups = np.where(gk > 0, np.ceil(k / np.maximum(gk, 1)), 1.0)
        elems = nvec * groups * n
        zero = ~_WSIGNED[f["wt"].astype(np.int64)]
        both = asym & zero
        muls = np.where(int_inputs, 2.0, 1.0) + zero + asym + both
        # integer adds: the inputs summed per group, then each correction subtracted (or added)
        sums = np.where(zero, nvec * k + elems, 0.0) + np.where(asym, elems, 0.0) + np.where(both, elems, 0.0)
        work = elems * (muls + 1.0) + sums
        acc.also(idx, self.sfu_unit(tile), np.ceil(work / self.hw.sfu.lanes) * self.hw.sfu.cycles_per_op)
        acc.energy["sfu"][idx] += (elems * (muls * self.e_sfu["mul"] + self.e_sfu["add"])
                                   + sums * self.hw.sfu.e_int32_add_pj)
        wsize = _DBYTES[f["wst"].astype(np.int64)]
        acc.move(idx, f["ws"], groups, n * wsize, write=False, tile=tile, esize=wsize)
        zp = np.flatnonzero(zero)
        if len(zp):
            acc.move(idx[zp], f["wz"][zp], groups[zp], n[zp], write=False, tile=tile[zp], esize=1)
        ints = np.flatnonzero(int_inputs)
        if len(ints):
            per_vector = np.where(asym, 2.0, groups)  # u8: one scale and one zero point per vector
            acc.move(idx[ints], f["xs"][ints], nvec[ints], per_vector[ints] * ELEM_BYTES, write=False,
                     tile=tile[ints])

    def _cost_reduce(self, mnemonic, idx, f, acc: _Acc) -> None:
        """Partial sums are added where they are stored, by an adder next to the global buffer
        (a vector unit like a tile's SFU, `sfu.lanes` wide): through the buffer's ports, over no
        wire (the sums paid for the interconnect on their way from the tiles)."""
        rows, cols = self._dim(f, "rows", acc), self._dim(f, "cols", acc)
        count = f["count"].astype(np.int64)
        acc.main(idx, np.full(len(idx), self.reduce_unit), self.sfu_cycles(rows * cols * np.maximum(count - 1, 0), 1.0))
        pstride = f["pstride"].astype(np.int64)
        for i in range(int(count.max(initial=0))):
            sel = np.flatnonzero(count > i)
            acc.move(idx[sel], f["src"][sel], rows[sel], cols[sel] * ELEM_BYTES, write=False, offset=i * pstride[sel])
        acc.move(idx, f["dst"], rows, cols * ELEM_BYTES, write=True)
        acc.energy["sfu"][idx] += rows * cols * np.maximum(count - 1, 0) * self.e_sfu["add"]

    def _cost_sfu(self, mnemonic, idx, f, acc: _Acc) -> None:
        spec = BY_NAME[mnemonic]
        tile = f["tile"].astype(np.int64)
        ones = np.ones(len(idx))
        ops: Num = float(sum(spec.sfu_ops.values()))
        per_element: Num = self.sfu_energy_per_element(mnemonic)
        if mnemonic == "vmm":
            m, k, n = (self._dim(f, x, acc) for x in ("m", "k", "n"))
            elems = m * k * n
            tb, accumulate = f["tb"].astype(bool), f["acc"].astype(bool)
            # no output, or nothing to add to it: the unit has nothing to move (sizes are known
            # when the instruction issues)
            m = np.where((m * n == 0) | ((k == 0) & accumulate), 0.0, m)
            reads = [("a", m, k), ("b", np.where(tb, np.where(m > 0, n, 0.0), np.where(m > 0, k, 0.0)),
                                   np.where(tb, k, n))]
            if accumulate.any():
                reads.append(("dst", np.where(accumulate, m, 0.0), n))
            written = (m, n)
            acc.macs[idx] += elems
        else:
            rows, cols = self._dim(f, "rows", acc), self._dim(f, "cols", acc)
            elems = rows * cols
            written = (rows, ones) if mnemonic in ("vrsum", "vrmax") else (rows, cols)
            if mnemonic == "vcausal":  # a window adds a second compare per element
                reads = [("dst", rows, cols)]
                ops = np.where(f["window"] > 0, 2.0 * ops, ops)
                per_element = np.where(f["window"] > 0, 2.0 * per_element, per_element)
            elif mnemonic == "vquant":  # 8-bit values out, one f32 scale per row and group (asym: scale, zero point)
                group = f["group"].astype(np.float64)
                asym = f["asym"].astype(bool)
                groups = np.where(asym, 2.0, np.where(group > 0, np.ceil(cols / np.maximum(group, 1)), 1.0))
                # asym reads the block twice: its range first, then the values to quantize
                reads = [("src", rows, cols), ("src", np.where(asym, rows, 0.0), cols)]
                acc.move(idx, f["sc"], rows, groups * ELEM_BYTES, write=True, tile=tile)
                acc.move(idx, f["dst"], rows, cols, write=True, tile=tile, esize=1)
                written = None
                ops = np.where(asym, sum(VQUANT_ASYM_OPS.values()), ops)
                per_element = np.where(asym, sum(self.e_sfu[o] * c for o, c in VQUANT_ASYM_OPS.items()),
                                       per_element)
            elif mnemonic == "vrope":  # one table row of rd entries per row, not per head
                hd = f["hd"].astype(np.float64)
                rd = np.where(f["rd"] > 0, f["rd"], hd).astype(np.float64)
                reads = [("src", rows, cols), ("cos", rows, rd), ("sin", rows, rd)]
                # the rd rotated entries of each head cost `sfu_ops`; the others are copied (one lane cycle,
                # no arithmetic)
                rotated = elems * rd / np.maximum(hd, 1.0)
                ops = np.where(elems > 0, (rotated * ops + (elems - rotated)) / np.maximum(elems, 1.0), ops)
                per_element = per_element * rotated / np.maximum(elems, 1.0)
            else:
                reads = []
                for name in ("a", "b", "src"):
                    if name in spec.field_names:
                        bcast = f[name[0] + "bc"].astype(bool) if name in ("a", "b") else np.zeros(len(idx), bool)
                        reads.append((name, rows, np.where(bcast, 1.0, cols)))
        acc.main(idx, self.sfu_unit(tile), self.sfu_cycles(elems, ops))
        acc.energy["sfu"][idx] += elems * per_element
        for name, r, c in reads:
            _, _, _, stride = mem_parts(f[name])
            r = np.where(stride == 0, np.minimum(r, 1.0), r)  # a broadcast row is read once
            acc.move(idx, f[name], r, c * ELEM_BYTES, write=False, tile=tile)
        if written is not None:
            acc.move(idx, f["dst"], written[0], written[1] * ELEM_BYTES, write=True, tile=tile)

    # ---- instruction fetch ---------------------------------------------------------------

    def fetch_costs(self, n_instrs: int, code_base: int) -> FetchCosts:
        """Blocks of half the instruction buffer, fetched from `code_base` on the DRAM channels."""
        ib = self.hw.instr_buf
        per = max(1, ib.size_kb * 1024 // 2 // INSTR_BYTES)
        blocks = -(-n_instrs // per)
        first = np.arange(blocks, dtype=np.int64) * per
        nbytes = np.minimum(per, n_instrs - first) * INSTR_BYTES
        busy = self.channel_bytes(code_base + first * INSTR_BYTES, np.ones(blocks), nbytes, nbytes) / self.chan_bpc
        return FetchCosts(per, busy, self.dram_latency, math.ceil(INSTR_BYTES * 8 / ib.width_bits))


class _Acc:
    """Accumulates one program's costs: dense per-resource bytes and cycles, then `finish`
    turns them into the per-instruction resource lists of `InstrCosts`."""

    def __init__(self, cm: CostModel, n: int, regs: np.ndarray, dram_map: DramMap) -> None:
        self.cm, self.n, self.regs, self.map = cm, n, regs, dram_map
        self.main_unit = np.full(n, -1, dtype=np.int64)
        self.main_busy = np.zeros(n)
        self.also_unit = np.full(n, -1, dtype=np.int64)
        self.also_busy = np.zeros(n)
        self.hold = np.zeros(n, dtype=bool)
        self.chan = np.zeros((n, cm.channels))  # bytes
        self.gbuf = np.zeros((n, 2))  # bytes read, written
        self.down = np.zeros(n)  # bytes into the instruction's tile
        self.up = np.zeros(n)  # bytes out of it
        self.tile = np.full(n, -1, dtype=np.int64)
        self.energy = {c: np.zeros(n) for c in COMPONENTS}
        self.kind_bytes = np.zeros((n, len(DRAM_KINDS)))
        self.macs = np.zeros(n)

    def also(self, idx: np.ndarray, unit: np.ndarray, cycles: np.ndarray) -> None:
        """A second unit that executes part of the instructions (in program order with its own
        instructions, held until they complete), for `cycles`."""
        self.also_unit[idx] = unit
        self.also_busy[idx] = cycles

    def main(self, idx: np.ndarray, unit: np.ndarray, cycles: np.ndarray, hold_transfer: bool = False) -> None:
        """The unit that executes the instructions, for `cycles`; with `hold_transfer`, also until
        the instruction's transfers end."""
        self.main_unit[idx] = unit
        self.main_busy[idx] = cycles
        self.hold[idx] = hold_transfer

    def move(self, idx: np.ndarray, raw: np.ndarray, rows: np.ndarray, row_bytes: np.ndarray, *, write: bool,
             tile: np.ndarray | None = None, offset: np.ndarray | int = 0, esize: Num = ELEM_BYTES) -> None:
        """Charge moving `rows` rows of `row_bytes` between the memory operand `raw` (plus `offset`
        bytes; elements of `esize` bytes) and the instruction's tile (or, without `tile`, the
        controller / global buffer side). `idx` holds each instruction at most once."""
        cm = self.cm
        space, base, pitch = self._where(raw, offset, esize)
        rows = np.asarray(rows, dtype=np.float64) * np.ones(len(idx))
        row_bytes = np.asarray(row_bytes, dtype=np.float64) * np.ones(len(idx))
        nbytes = rows * row_bytes
        in_dram = space == DRAM_SPACE
        if in_dram.any():
            d = np.flatnonzero(in_dram)
            per_chan = cm.channel_bytes(base[d], rows[d], np.ceil(row_bytes[d]), pitch[d])
            self.chan[idx[d]] += per_chan
            moved = per_chan.sum(axis=1)
            self.kind_bytes[idx[d], self.map.kind_index(base[d])] += moved
            self.energy["dram"][idx[d]] += moved * (cm.e_dram_wr if write else cm.e_dram_rd)
        g = np.flatnonzero(~in_dram)
        self.gbuf[idx[g], int(write)] += nbytes[g]
        self.energy["buffer"][idx[g]] += nbytes[g] * (cm.e_gbuf_wr if write else cm.e_gbuf_rd)
        if tile is not None:
            self.tile[idx] = tile
            (self.up if write else self.down)[idx] += nbytes
            self.energy["noc"][idx] += nbytes * cm.e_noc_byte_hop * cm.hops(tile)

    def _where(self, raw: np.ndarray, offset: np.ndarray | int = 0, esize: Num = ELEM_BYTES
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Memory space, byte address of the first row and row pitch of memory operands (row
        strides count elements of `esize` bytes)."""
        space, roff, addr, stride = mem_parts(raw)
        pitch = (stride * np.asarray(esize)).astype(np.int64)
        return space, addr + self.regs[roff] * pitch + offset, pitch

    def first_row_cycles(self, raw: np.ndarray, row_bytes: np.ndarray, esize: Num = ELEM_BYTES) -> np.ndarray:
        """Cycles the first row of the memory operands `raw` takes to or from a tile: its slowest
        resource on the way (the DRAM channels holding it, or the buffer's port; the interconnect)."""
        cm = self.cm
        space, base, pitch = self._where(raw, 0, esize)
        row_bytes = np.asarray(row_bytes, dtype=np.float64) * np.ones(len(space))
        out = row_bytes / cm.gbuf_bpc
        d = np.flatnonzero(space == DRAM_SPACE)
        if len(d):
            per_chan = cm.channel_bytes(base[d], np.ones(len(d)), np.ceil(row_bytes[d]), pitch[d])
            out[d] = per_chan.max(axis=1) / cm.chan_bpc
        return np.maximum(out, row_bytes / cm.link_bpc)

    def finish(self) -> InstrCosts:
        cm, n = self.cm, self.n
        chan_busy = self.chan / cm.chan_bpc
        port_busy = np.stack([self.down, self.up], axis=1) / cm.link_bpc
        gbuf_busy = self.gbuf / cm.gbuf_bpc
        transfer = np.maximum.reduce([chan_busy.max(axis=1, initial=0.0), port_busy.max(axis=1),
                                      gbuf_busy.max(axis=1)])
        busy_main = np.where(self.hold, np.maximum(self.main_busy, transfer), self.main_busy)
        # (instr, unit, busy, compute) entries, class by class
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

        def add(instr: np.ndarray, unit: np.ndarray, busy: np.ndarray, compute: np.ndarray) -> None:
            keep = busy > 0
            parts.append((instr[keep], unit[keep], busy[keep], compute[keep]))

        ar = np.arange(n, dtype=np.int64)
        has_main = self.main_unit >= 0
        add(ar[has_main], self.main_unit[has_main], busy_main[has_main],
            np.where(self.hold, self.main_busy, busy_main)[has_main])
        has_also = self.also_unit >= 0
        add(ar[has_also], self.also_unit[has_also], self.also_busy[has_also], self.also_busy[has_also])
        rows, chans = np.nonzero(chan_busy)
        add(rows, chans, chan_busy[rows, chans], np.zeros(len(rows)))
        for j, unit in ((0, cm.gbuf_rd_unit), (1, cm.gbuf_wr_unit)):
            add(ar, np.full(n, unit), gbuf_busy[:, j], gbuf_busy[:, j])
        for j, paths in ((0, cm.down_path), (1, cm.up_path)):
            sel = np.flatnonzero((port_busy[:, j] > 0) & (self.tile >= 0))
            add(sel, cm.port_unit(self.tile[sel], out=bool(j)), port_busy[sel, j], port_busy[sel, j])
            links = paths[self.tile[sel]]
            r, c = np.nonzero(links >= 0)
            add(sel[r], links[r, c], port_busy[sel[r], j], port_busy[sel[r], j])
        instr = np.concatenate([p[0] for p in parts])
        order = np.argsort(instr, kind="stable")
        unit, busy, compute = (np.concatenate([p[k] for p in parts])[order] for k in (1, 2, 3))
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(instr, minlength=n), out=ptr[1:])
        chan_max = chan_busy.max(axis=1, initial=0.0)
        latency = np.where(chan_max > 0, cm.dram_latency, 0.0)
        dram_done = np.where(chan_max > 0, chan_max + cm.dram_latency, 0.0)
        ways = (self.tile >= 0) * ((self.down > 0).astype(np.float64) + (self.up > 0))  # into and out of the tile
        latency += ways * cm.hop_latency * cm.hop_count[np.maximum(self.tile, 0)]
        kinds = {k: self.kind_bytes[:, i] for i, k in enumerate(DRAM_KINDS)}
        kinds["code"] = np.full(n, float(INSTR_BYTES))
        self.energy["dram"] += INSTR_BYTES * cm.e_dram_rd
        self.energy["buffer"] += cm.e_fetch - INSTR_BYTES * cm.e_dram_rd
        return InstrCosts(ptr, unit, busy, compute, self.main_unit, self.also_unit, latency, dram_done, self.energy,
                          self.kind_bytes.sum(axis=1) + INSTR_BYTES, kinds, self.macs,
                          cm.fetch_costs(n, self.map.code_base))


@njit(cache=True)
def _channel_bytes(base, nrow, span, step, period, burst, interleave, channels):
    """`CostModel.channel_bytes` row by row: one pattern period per transfer, each row weighted by
    how many rows share its place in the pattern."""
    out = np.zeros((len(base), channels))
    stripe = interleave * channels
    for i in range(len(base)):
        if span[i] <= 0:
            continue
        for k in range(min(nrow[i], period[i])):
            weight = nrow[i] // period[i] + (1 if k < nrow[i] % period[i] else 0)
            start = base[i] + k * step[i]
            lo = start // burst * burst
            hi = -(-(start + span[i]) // burst) * burst
            full = (hi - lo) // stripe  # whole stripes put `interleave` bytes on every channel
            if full:
                for c in range(channels):
                    out[i, c] += full * interleave * weight
                lo += full * stripe
            while lo < hi:
                chunk = lo // interleave
                end = min(hi, (chunk + 1) * interleave)
                out[i, chunk % channels] += (end - lo) * weight
                lo = end
    return out
