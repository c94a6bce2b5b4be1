"""Machine state of the simulator: memories, macro contents, registers, and operand views.

Memories are byte arrays: the global buffer, the read-only DRAM image (memory-mapped from the
binary) and the read-write DRAM region holding inputs, outputs and spills. `view` turns a
memory operand plus a shape into a numpy view, so instruction semantics are plain numpy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from isa.cost import macros_used
from isa.diag import CimcError
from isa.dtypes import elem
from isa.fields import REGS, SPACES, Mem
from isa.program import Program

G = SPACES.index("g")


@functools.cache
def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


class SimError(CimcError):
    """The program did something the machine cannot do (bad address, bad index, ...)."""


@dataclass
class Group:
    """A weight group held in a tile's macros: its values (unpacked), the macros it occupies, its
    type, and what the simulator derives from it once (filled on first use, kept as long as the
    group is): its sums of |w| per partial-sum group size, and the scales and zero points an MVM
    read for it from the read-only image, by their operands."""

    weights: np.ndarray
    macros: int
    wt: str
    abs_sums: dict[int, np.ndarray] = field(default_factory=dict)
    scales: dict[tuple, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)


@dataclass
class Machine:
    """Everything an instruction can read or write."""

    gbuf: np.ndarray
    image: np.ndarray
    rw: np.ndarray
    rw_base: int
    regs: np.ndarray
    array: tuple[int, int, int, int]  # tiles, macros per tile, macro rows, macro cols
    accum_bits: int  # width of a macro's partial-sum accumulator
    macros: dict[tuple[int, int], Group] = field(default_factory=dict)  # (tile, m0) -> the group loaded there
    loaded: dict[int, list[int]] = field(default_factory=dict)  # tile -> the m0 of each group in `macros`
    #: groups unpacked from the read-only DRAM image, by (operand, k, n, type): the image never
    #: changes, so each is unpacked once per machine (a speed-up of the simulator, not a cost)
    decoded: dict[tuple[Mem, int, int, str], Group] = field(default_factory=dict)
    trace: list | None = None  # when set: (instr, space, lo, hi, write, row pitch, row bytes) per access
    current: int = 0

    @classmethod
    def for_program(cls, program: Program) -> Machine:
        """A machine with the program's DRAM image, a zeroed read-write region and global buffer."""
        meta = program.meta
        gbuf = max(int(e.meta["gbuf_bytes"]) for e in program.entries)
        gbuf_cap = int(program.hw["buffer"]["global"]["size_kb"]) * 1024
        if gbuf > gbuf_cap:
            raise SimError(f"program needs {gbuf} bytes of global buffer; the hardware has {gbuf_cap}")
        chip, macro = program.hw["chip"], program.hw["macro"]
        return cls(np.zeros(max(gbuf, 64), np.uint8), program.dram.array(),
                   np.zeros(max(int(meta["rw_bytes"]), 64), np.uint8), int(meta["rw_base"]),
                   np.zeros(len(REGS), np.int64),
                   (int(chip["tiles"]), int(chip["macros_per_tile"]), int(macro["rows"]), int(macro["cols"])),
                   int(macro["accum_bits"]))

    def cached_group(self, src: Mem, k: int, n: int, wt: str) -> Group | None:
        """The group `group` unpacked before from the read-only image, when no access is being
        traced (a traced run reads it again, so the access is recorded)."""
        return self.decoded.get((src, k, n, wt)) if self.trace is None and self._cacheable(src) else None

    def group(self, src: Mem, k: int, n: int, wt: str, unpack: Callable[[], np.ndarray]) -> Group:
        """The k x n group of type `wt` stored at `src`, unpacked by `unpack()`: once per machine
        for groups in the read-only image, every time for groups in the read-write region."""
        key = (src, k, n, wt)
        if not self._cacheable(src) or key not in self.decoded:
            _, rows, cols = self.array[1:]
            group = Group(unpack(), macros_used(k, n, elem(wt).bits, rows, cols), wt)
            if not self._cacheable(src):
                return group
            self.decoded[key] = group
        return self.decoded[key]

    def _cacheable(self, src: Mem) -> bool:
        """A weight group at `src` is always the same: in the read-only image, at a fixed place."""
        return self.read_only(src) and not src.roff

    def read_only(self, m: Mem) -> bool:
        """Whether operand `m` lies in the read-only DRAM image (which no run changes)."""
        return m.space != G and m.addr < self.rw_base

    def load_group(self, tile: int, m0: int, group: Group) -> None:
        """Write a weight group into macros m0.. of a tile; groups it overlaps are overwritten."""
        tiles, per_tile = self.array[:2]
        used = group.macros
        if tile >= tiles or m0 + used > per_tile:
            k, n = group.weights.shape
            raise SimError(f"a {k} x {n} group of {group.wt} weights needs {used} macros from tile {tile} macro "
                           f"{m0}; the chip has {tiles} tiles of {per_tile} macros")
        starts = self.loaded.setdefault(tile, [])
        for start in [s for s in starts if m0 < s + self.macros[(tile, s)].macros and s < m0 + used]:
            del self.macros[(tile, start)]
            starts.remove(start)
        self.macros[(tile, m0)] = group
        starts.append(m0)
        self.touch_macros(tile, m0, used, write=True)

    def _memory(self, m: Mem, write: bool) -> tuple[np.ndarray, int]:
        if m.space == G:
            return self.gbuf, m.addr
        if m.addr >= self.rw_base:
            return self.rw, m.addr - self.rw_base
        if write:
            raise SimError(f"write to the read-only DRAM image at {m.addr:#x}")
        return self.image, m.addr

    def view(self, m: Mem, rows: int, cols: int, *, dtype: str = "<f4", col_bcast: bool = False,
             write: bool = False) -> np.ndarray:
        """The [rows, cols] operand at `m` (row stride m.stride elements; stride 0 broadcasts a row)."""
        esize = _itemsize(dtype)
        mem, off = self._memory(m, write)
        off += int(self.regs[m.roff]) * m.stride * esize
        rstride, cstride = m.stride * esize, 0 if col_bcast else esize
        last = off + (rows - 1) * rstride + (cols - 1) * cstride + esize if rows and cols else off
        if off < 0 or last > mem.size or off % esize:
            where = f"{SPACES[m.space]}:{m.addr:#x}"
            raise SimError(f"operand {where} [{rows} x {cols}, stride {m.stride}] is outside its memory "
                           f"({mem.size} bytes) or misaligned")
        if self.trace is not None and rows and cols:
            base = 0 if m.space == G else (self.rw_base if mem is self.rw else 0)
            width = esize if col_bcast else cols * esize
            self.trace.append((self.current, m.space, base + off, base + last, write, rstride, width))
        arr = np.ndarray((rows, cols), dtype=dtype, buffer=mem, offset=off, strides=(rstride, cstride))
        if write:
            arr.flags.writeable = True
        return arr

    def touch_macros(self, tile: int, m0: int, count: int, write: bool) -> None:
        """Record an access to macros m0 .. m0+count-1 of a tile (space 2) for the hazard checker."""
        if self.trace is not None:
            key = tile * self.array[1] + m0
            self.trace.append((self.current, 2, key, key + count, write, 0, count))
