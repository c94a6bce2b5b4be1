"""The cost model: cycles and picojoules of every instruction on a given hardware description.

One `CostModel` object serves both the compiler (stage balancing estimates load and compute time
with the scalar helpers) and the simulator (`instr_costs` prices a whole decoded program at once,
vectorised with numpy). Both go through the same formulas, so the compiler's estimate and the
simulator's measurement can be compared.

Units are numbered: 0 = DRAM channel, 1 = interconnect, 2.. = tiles (macro arrays), then one SFU
per tile. An instruction occupies its main unit for `busy0` cycles, and the DRAM channel for
`busy1` cycles when it moves bytes to or from DRAM as a side effect (weight loads, operands
spilled to DRAM).

Energy components: `dram` (DRAM reads and writes), `macro_write` (writing weights into CIM
cells), `mvm` (bit-serial multiply-accumulate in the macros), `sfu` (vector unit arithmetic),
`buffer` (global and tile buffer accesses), `noc` (bits moved times distance). Leakage is
charged by the simulator: `leakage_mw` times elapsed time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from isa.encoding import Columns, dim_values, mem_parts
from isa.fields import DTYPE_BYTES, DTYPES
from isa.hw import HardwareConfig
from isa.spec import BY_NAME

COMPONENTS = ("dram", "macro_write", "mvm", "sfu", "buffer", "noc")
DRAM_SPACE = 1
FLOAT_BYTES = 4


def macros_used(k: int, n: int, wbits: int, rows: int, cols: int) -> int:
    """CIM macros of `rows` x `cols` bitcells a k x n group of `wbits`-bit weights occupies."""
    return -(-k // rows) * -(-(n * wbits) // cols)


@dataclass
class InstrCosts:
    """Per-instruction costs of a program (arrays indexed by instruction)."""

    unit0: np.ndarray
    busy0: np.ndarray
    unit1: np.ndarray
    busy1: np.ndarray
    energy: dict[str, np.ndarray]  # component -> pJ
    dram_bytes: np.ndarray
    macs: np.ndarray
    #: cycles on unit0 if DRAM were infinitely fast (a weight load's macro writes; 0 on the DRAM
    #: channel itself): the basis of the compute bound
    compute0: np.ndarray

class CostModel:
    """Cycle and energy formulas for one hardware description."""

    def __init__(self, hw: HardwareConfig) -> None:
        self.hw = hw
        c, m, d = hw.chip, hw.macro, hw.dram
        self.f_hz = c.f_clk_mhz * 1e6
        self.tiles = c.tiles
        self.dram_bpc = d.peak_gbps * 1e9 * d.efficiency / self.f_hz  # bytes per cycle
        self.noc_bpc = hw.noc.link_bits / 8
        self.side = max(1, math.ceil(math.sqrt(c.tiles)))
        self.e_dram_rd = d.e_read_pj_per_bit * 8  # pJ per byte
        self.e_dram_wr = d.e_write_pj_per_bit * 8
        self.e_gbuf_rd = hw.global_buf.e_read_pj / (hw.global_buf.width_bits / 8)
        self.e_gbuf_wr = hw.global_buf.e_write_pj / (hw.global_buf.width_bits / 8)
        self.e_tbuf = (hw.tile_buf.e_read_pj + hw.tile_buf.e_write_pj) / (hw.tile_buf.width_bits / 8)
        self.e_noc_byte_hop = hw.noc.e_pj_per_bit_mm * 8 * hw.noc.hop_mm
        self.e_sfu = {"add": hw.sfu.e_add_fp32_pj, "mul": hw.sfu.e_mul_fp32_pj, "exp": hw.sfu.e_exp_pj,
                      "recip": hw.sfu.e_recip_rsqrt_pj}
        self.macro_rows, self.macro_cols = m.rows, m.cols
        self.leakage_mw = (c.tiles * c.macros_per_tile * m.leak_mw + c.tiles * hw.tile_buf.leak_mw
                           + hw.global_buf.leak_mw + c.tiles * hw.sfu.leak_mw)

    # ---- units ---------------------------------------------------------------------------

    @property
    def n_units(self) -> int:
        return 2 + 2 * self.tiles

    def unit_names(self) -> list[str]:
        return ["dram", "noc"] + [f"tile{t}" for t in range(self.tiles)] + [f"sfu{t}" for t in range(self.tiles)]

    def tile_unit(self, tile: np.ndarray | int) -> np.ndarray | int:
        return 2 + tile

    def sfu_unit(self, tile: np.ndarray | int) -> np.ndarray | int:
        return 2 + self.tiles + tile

    def hops(self, tile: np.ndarray | int) -> np.ndarray | int:
        """Mesh hops from the global buffer / DRAM port (at tile 0's corner) to a tile."""
        return 1 + tile % self.side + tile // self.side

    # ---- formulas shared by compiler and simulator (work on scalars or arrays) -----------

    def dram_cycles(self, nbytes):
        return nbytes / self.dram_bpc

    def write_cycles(self, k, n, wbits):
        """Cycles to write a weight group into its macros (macros of a tile write in parallel):
        `write_cycles_full` for a whole macro, scaled by the rows and write-port beats used."""
        m = self.hw.macro
        beats = np.minimum(k, self.macro_rows) * -(-np.minimum(n * wbits, self.macro_cols) // m.write_port_bits)
        full = self.macro_rows * -(-self.macro_cols // m.write_port_bits)
        return np.ceil(beats * (m.write_cycles_full / full))

    def mvm_cycles(self, nvec, abits):
        """Bit-serial MVM: one input bit per cycle per vector, pipelined across vectors."""
        m = self.hw.macro
        return nvec * abits * m.cycles_per_input_bit + m.pipeline_cycles

    def sfu_cycles(self, elements, ops_per_element: float):
        """SFU lanes each do one primitive op per cycle."""
        work = elements * max(ops_per_element, 1.0)
        return np.ceil(work / self.hw.sfu.lanes) * self.hw.sfu.cycles_per_op

    def e_slice_fj(self, wbits):
        """Energy of one input bit times one `wbits` weight (scaled from the INT4 slice)."""
        m = self.hw.macro
        return np.where(wbits == 8, m.e_slice_w8_fj, m.e_slice_w4_fj * np.asarray(wbits) / 4.0)

    def sfu_energy_per_element(self, mnemonic: str) -> float:
        return sum(self.e_sfu[op] * k for op, k in BY_NAME[mnemonic].sfu_ops.items())

    # ---- whole programs ------------------------------------------------------------------

    def instr_costs(self, cols: Columns, regs: np.ndarray) -> InstrCosts:
        """Price every instruction of a decoded program, with runtime registers `regs`."""
        n = len(cols)
        out = InstrCosts(np.full(n, -1), np.zeros(n), np.full(n, -1), np.zeros(n),
                         {c: np.zeros(n) for c in COMPONENTS}, np.zeros(n), np.zeros(n), np.zeros(n))
        for mnemonic, idx in cols.rows.items():
            spec = BY_NAME[mnemonic]
            f = cols.fields[mnemonic]
            fn = getattr(self, f"_cost_{spec.cost}")
            fn(mnemonic, idx, f, regs, out)
        out.compute0 = np.where(out.unit0 == 0, 0.0, np.where(out.compute0 > 0, out.compute0, out.busy0))
        return out

    def _dim(self, f: dict, name: str, regs: np.ndarray) -> np.ndarray:
        return dim_values(f[name], regs).astype(np.float64)

    def _io(self, out: InstrCosts, idx: np.ndarray, raw: np.ndarray, nbytes: np.ndarray, write: bool) -> None:
        """Charge an operand of `nbytes` in its memory space: DRAM (channel time) or buffer."""
        in_dram = mem_parts(raw)[0] == DRAM_SPACE
        out.busy1[idx] += np.where(in_dram, nbytes / self.dram_bpc, 0.0)
        out.unit1[idx] = np.where(in_dram | (out.unit1[idx] >= 0), 0, -1)
        out.dram_bytes[idx] += np.where(in_dram, nbytes, 0.0)
        e_dram, e_buf = (self.e_dram_wr, self.e_gbuf_wr) if write else (self.e_dram_rd, self.e_gbuf_rd)
        out.energy["dram"][idx] += np.where(in_dram, nbytes * e_dram, 0.0)
        out.energy["buffer"][idx] += np.where(in_dram, 0.0, nbytes * e_buf)

    def _cost_ctrl(self, mnemonic, idx, f, regs, out) -> None:
        return None

    def _cost_dma(self, mnemonic, idx, f, regs, out) -> None:
        esize = np.array([DTYPE_BYTES[d] for d in DTYPES])[f["dt"].astype(np.int64)]
        nbytes = self._dim(f, "rows", regs) * self._dim(f, "cols", regs) * esize
        any_d = (mem_parts(f["src"])[0] == DRAM_SPACE) | (mem_parts(f["dst"])[0] == DRAM_SPACE)
        self._io(out, idx, f["src"], nbytes, False)
        self._io(out, idx, f["dst"], nbytes, True)
        # With DRAM on either side the channel is the unit: it carries each DRAM side once (a
        # DRAM -> DRAM copy reads and writes); buffer -> buffer copies go over the NoC.
        out.unit0[idx] = np.where(any_d, 0, 1)
        out.busy0[idx] = np.where(any_d, out.busy1[idx], nbytes / self.noc_bpc + self.hw.noc.hop_cycles)
        out.unit1[idx], out.busy1[idx] = -1, 0.0
        out.energy["noc"][idx] += nbytes * self.e_noc_byte_hop

    def _cost_gather(self, mnemonic, idx, f, regs, out) -> None:
        rows = self._dim(f, "n", regs)
        nbytes = rows * self._dim(f, "cols", regs) * FLOAT_BYTES
        out.dram_bytes[idx] += nbytes
        out.energy["dram"][idx] += nbytes * self.e_dram_rd
        self._io(out, idx, f["idx"], rows * 4, False)
        self._io(out, idx, f["dst"], nbytes, True)
        # The channel reads the table rows, plus any index or destination spilled to DRAM.
        out.unit0[idx] = 0
        out.busy0[idx] = nbytes / self.dram_bpc + out.busy1[idx]
        out.unit1[idx], out.busy1[idx] = -1, 0.0
        out.energy["noc"][idx] += nbytes * self.e_noc_byte_hop

    def _cost_macro_write(self, mnemonic, idx, f, regs, out) -> None:
        k, n, wbits = (f[x].astype(np.float64) for x in ("k", "n", "wbits"))
        tile = f["tile"].astype(np.int64)
        nbytes = k * n * wbits / 8
        dram = nbytes / self.dram_bpc
        out.unit0[idx] = self.tile_unit(tile)
        out.compute0[idx] = self.write_cycles(k, n, wbits)
        out.busy0[idx] = np.maximum(dram, out.compute0[idx])
        out.unit1[idx], out.busy1[idx] = 0, dram
        out.dram_bytes[idx] += nbytes
        out.energy["dram"][idx] += nbytes * self.e_dram_rd
        out.energy["macro_write"][idx] += k * n * wbits * self.hw.macro.e_write_fj_per_bit / 1000
        out.energy["noc"][idx] += nbytes * self.e_noc_byte_hop * self.hops(tile)

    def _cost_mvm(self, mnemonic, idx, f, regs, out) -> None:
        k, n, wbits, abits = (f[x].astype(np.float64) for x in ("k", "n", "wbits", "abits"))
        tile = f["tile"].astype(np.int64)
        nvec = self._dim(f, "nvec", regs)
        out.unit0[idx] = self.tile_unit(tile)
        out.busy0[idx] = self.mvm_cycles(nvec, abits)
        out.macs[idx] += nvec * k * n
        out.energy["mvm"][idx] += nvec * abits * k * n * self.e_slice_fj(wbits) / 1000
        in_b, out_b = nvec * k * FLOAT_BYTES, nvec * n * FLOAT_BYTES
        acc = f["acc"].astype(bool)
        self._io(out, idx, f["src"], in_b, False)
        self._io(out, idx, f["dst"], out_b, True)
        self._io(out, idx, np.where(acc, f["dst"], np.uint64(0)), np.where(acc, out_b, 0.0), False)
        out.energy["buffer"][idx] += (in_b + out_b) * self.e_tbuf
        out.energy["noc"][idx] += (in_b + out_b) * self.e_noc_byte_hop * self.hops(tile)

    def _cost_reduce(self, mnemonic, idx, f, regs, out) -> None:
        elems = self._dim(f, "rows", regs) * self._dim(f, "cols", regs)
        count = f["count"].astype(np.float64)
        moved = elems * count * FLOAT_BYTES
        out.unit0[idx] = 1
        out.busy0[idx] = moved / self.noc_bpc + self.hw.noc.hop_cycles
        self._io(out, idx, f["src"], moved, False)
        self._io(out, idx, f["dst"], elems * FLOAT_BYTES, True)
        out.energy["noc"][idx] += moved * self.e_noc_byte_hop
        out.energy["sfu"][idx] += elems * np.maximum(count - 1, 0) * self.e_sfu["add"]

    def _cost_sfu(self, mnemonic, idx, f, regs, out) -> None:
        spec = BY_NAME[mnemonic]
        tile = f["tile"].astype(np.int64)
        if mnemonic == "vmm":
            m, k, n = (self._dim(f, x, regs) for x in ("m", "k", "n"))
            elems, reads = m * k * n, [("a", m * k), ("b", k * n)]
            written = m * n
            out.macs[idx] += elems
        else:
            rows, cols = self._dim(f, "rows", regs), self._dim(f, "cols", regs)
            elems = rows * cols
            written = rows if mnemonic in ("vrsum", "vrmax") else elems
            reads = [(name, elems) for name in ("a", "b", "src", "cos", "sin") if name in spec.field_names]
            if mnemonic == "vcausal":
                reads = [("dst", elems)]
        ops = float(sum(spec.sfu_ops.values()))
        out.unit0[idx] = self.sfu_unit(tile)
        out.busy0[idx] = self.sfu_cycles(elems, ops)
        out.energy["sfu"][idx] += elems * self.sfu_energy_per_element(mnemonic)
        for name, count in reads:
            self._io(out, idx, f[name], count * FLOAT_BYTES, False)
        self._io(out, idx, f["dst"], written * FLOAT_BYTES, True)
        out.energy["noc"][idx] += (sum(c for _, c in reads) + written) * FLOAT_BYTES * self.e_noc_byte_hop \
            * self.hops(tile)
