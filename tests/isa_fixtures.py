"""Shared test data for the ISA tests: random valid instructions and a small hand-built program."""

from __future__ import annotations

import struct

import numpy as np

from isa.encoding import Instr, encode
from isa.fields import REGS, SPACES, Dim, DimKind, EnumKind, F32Kind, Kind, Mem, MemKind
from isa.program import ArraySegment, DebugInfo, DramImage, Entry, Program, Symbol
from isa.spec import INSTRS, N_BARRIERS


def random_value(kind: Kind, rng: np.random.Generator) -> object:
    """A random valid value of a field kind."""
    if isinstance(kind, MemKind):
        return Mem(int(rng.integers(len(SPACES))), int(rng.integers(1 << kind.ADDR_BITS)),
                   int(rng.integers(1 << kind.STRIDE_BITS)), int(rng.integers(len(REGS))))
    if isinstance(kind, DimKind):
        return Dim(int(rng.integers(len(REGS))), int(rng.integers(1 << kind.IMM_BITS)))
    if isinstance(kind, F32Kind):
        if rng.random() < 0.2:
            return float(rng.choice([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4028234663852886e38]))
        value = struct.unpack("<f", struct.pack("<I", int(rng.integers(1 << 32))))[0]
        return value if value == value else 1.0  # no NaN
    if isinstance(kind, EnumKind):
        return kind.names[int(rng.integers(len(kind.names)))]
    return int(rng.integers(1 << kind.bits))


def random_instr(rng: np.random.Generator) -> Instr:
    """A random valid instruction (any mnemonic, random fields, barriers)."""
    spec = INSTRS[int(rng.integers(len(INSTRS)))]
    sig = int(rng.integers(N_BARRIERS)) if rng.random() < 0.5 else 0
    wait = int(rng.integers(1 << 63)) << 1 if rng.random() < 0.5 else 0
    values = {fd.name: random_value(fd.kind, rng) for fd in spec.fields}
    return Instr(spec.mnemonic, values, sig, wait).validate()


BLOB = np.random.default_rng(7).integers(0, 256, 7000, dtype=np.uint8)


#: Section tags of `make_program()`'s binary, in file order.
SECTIONS = ("META", "HWCF", "ENTS", "C000", "X000", "C001", "X001", "DRAM")


def make_program(dram: DramImage | None = None) -> Program:
    """A small program: entry "prefill" with five instructions of different kinds and two
    symbols, entry "decode" with two instructions, and a DRAM image with gaps."""
    if dram is None:
        dram = DramImage()
        dram.add(ArraySegment(0x40, 24, lambda: np.arange(6, dtype=np.float32)))
        dram.add(ArraySegment(0x2000, BLOB.size, lambda: BLOB))
        dram.size = 0x4000
    instrs = [
        Instr("dma", {"dst": Mem(0, 0x100, 6), "src": Mem(1, 0x40, 6), "rows": Dim(0, 1), "cols": Dim(0, 6),
                      "dt": "f32"}, sig=1),
        Instr("mvm", {"tile": 1, "m0": 2, "k": 6, "n": 8, "wt": "i8", "xt": "i8", "gk": 0, "acc": 0,
                      "wst": "f16", "dst": Mem(0, 0x200, 8), "src": Mem(0, 0x100, 6), "nvec": Dim(1, 0),
                      "xs": Mem(0, 0x300, 1), "ws": Mem(1, 0x400, 8), "wz": Mem(0, 0, 0)},
              sig=2, wait=1 << 1),
        Instr("vaffine", {"tile": 1, "dst": Mem(1, 0x3800, 8, 2), "src": Mem(0, 0x200, 8), "rows": Dim(1, 0),
                          "cols": Dim(0, 8), "alpha": -0.0, "beta": float("inf")}, wait=1 << 2),
        Instr("sync", {}, sig=3, wait=0b1100),
        Instr("halt", {}),
    ]
    ops = [{"op": "linear", "loc": "node_linear_3", "layer": "layer0"},
           {"op": "affine", "loc": "n\u00e9ud;\nx", "layer": "layer0"}, {"op": "halt"}]
    symbols = [Symbol("input_ids", "input", "int64", "i32", (1, "seq"), 0x3000, 1),
               Symbol("logits", "output", "float32", "f32", (1, "seq", 8), 0x3800, 8)]
    prefill = Entry("prefill", encode(instrs), symbols, DebugInfo(ops, np.array([0, 0, 1, 1, 2], dtype=np.uint32)),
                    {"max_seq": 32})
    decode = Entry("decode", encode(instrs[2:3] + instrs[4:]), symbols[:1],
                   DebugInfo(ops[1:], np.array([0, 1], dtype=np.uint32)), {"max_seq": 1})
    return Program([prefill, decode], dram, {"tiles": 2, "name": "edge", "clock_hz": 2.5e8}, "00112233aabbccdd",
                   {"model": "t\u00efny", "options": {"wbits": 8}})
