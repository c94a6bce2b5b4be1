"""Weight tiling arithmetic shared by tile-partition, place-weights, balance-stages and codegen.

A linear's weight `[K, N]` is cut into macro blocks of `rows` x `per_macro` weights (a macro
row holds `cols / wbits` weights). Blocks are grouped per tile: a group is up to
`macros_per_tile` blocks, `kb` along K (summed by the tile's adder tree) by `nb` along N. Groups
stream in N-major order: all K chunks of one output block are consecutive, so the partial sums
of a K split are ready together. Each group is stored in DRAM as a contiguous `k x n` block of
packed weights, then (integer weights) its scales, one row per `gk` weight rows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

from cimc.ir.quant import groups
from isa.dtypes import elem

DRAM_ALIGN = 64


def align(x: int, a: int = DRAM_ALIGN) -> int:
    return -(-x // a) * a


@dataclass(frozen=True)
class Tiling:
    """The `tiling` attribute of a linear, as a typed object: the weight type `wt`, and for
    integer weights their scale groups (`gk` rows share a scale per column; 0: one scale per
    column over all K) and the scales' type `st`; unsigned types also carry a u8 zero point per
    scale."""

    k: int
    n: int
    wt: str
    rows: int
    per_macro: int
    kb: int  # macro blocks along K per group
    nb: int  # macro blocks along N per group
    gk: int = 0
    st: str = ""

    @classmethod
    def plan(cls, k: int, n: int, wt: str, rows: int, cols: int, macros_per_tile: int, gk: int = 0,
             st: str = "") -> Tiling:
        """Blocks per group as large as a tile allows; with scale groups of gk rows, a group
        along K holds whole scale groups (ValueError if a tile cannot)."""
        per_macro = cols // elem(wt).bits
        kb = min(-(-k // rows), macros_per_tile)
        while gk and kb > 1 and (kb * rows) % gk and kb * rows < k:
            kb -= 1
        if gk and (kb * rows) % gk and kb * rows < k:
            raise ValueError(f"scale groups of {gk} rows do not fit a tile of {macros_per_tile} macro(s) "
                             f"of {rows} rows")
        nb = max(1, min(macros_per_tile // kb, -(-n // per_macro)))
        return cls(k, n, wt, rows, per_macro, kb, nb, gk, st)

    @classmethod
    def from_attr(cls, attr: dict) -> Tiling:
        return cls(int(attr["k"]), int(attr["n"]), str(attr["wt"]), int(attr["rows"]), int(attr["per_macro"]),
                   int(attr["kb"]), int(attr["nb"]), int(attr.get("gk", 0)), str(attr.get("st", "")))

    def to_attr(self) -> dict:
        out = {"k": self.k, "n": self.n, "wt": self.wt, "rows": self.rows, "per_macro": self.per_macro,
               "kb": self.kb, "nb": self.nb, "kchunks": self.kchunks, "nchunks": self.nchunks}
        if self.st:
            out.update(gk=self.gk, st=self.st)
        return out

    @property
    def wbits(self) -> int:
        return elem(self.wt).bits

    @property
    def zero_points(self) -> bool:
        """Unsigned integer weights carry a zero point per scale."""
        t = elem(self.wt)
        return not t.is_float and not t.signed

    @property
    def group_k(self) -> int:
        return self.kb * self.rows

    @property
    def group_n(self) -> int:
        return self.nb * self.per_macro

    @property
    def kchunks(self) -> int:
        return -(-self.k // self.group_k)

    @property
    def nchunks(self) -> int:
        return -(-self.n // self.group_n)

    @property
    def groups(self) -> int:
        return self.kchunks * self.nchunks

    @functools.cache  # noqa: B019 (tilings are few, small and immutable)
    def group(self, g: int) -> tuple[int, int, int, int, int]:
        """(kchunk, k0, k1, n0, n1) of group `g` (N-major order)."""
        nc, kc = divmod(g, self.kchunks)
        k0, n0 = kc * self.group_k, nc * self.group_n
        return kc, k0, min(self.k, k0 + self.group_k), n0, min(self.n, n0 + self.group_n)

    def scale_rows(self, k0: int, k1: int) -> int:
        """Scale rows of the weights k0 .. k1-1 (0 for float weights)."""
        if not self.st:
            return 0
        return groups(k1 - k0, self.gk)

    @functools.cache  # noqa: B019
    def parts(self, g: int) -> tuple[int, int, int]:
        """Byte offsets of group g's scales and zero points from its start, and its size: the
        packed weights, then (integer weights) the scales, then (unsigned) the zero points, each
        part aligned."""
        _, k0, k1, n0, n1 = self.group(g)
        weights = elem(self.wt).packed_bytes((k1 - k0) * (n1 - n0))
        if not self.st:
            return weights, weights, align(weights)
        scales = align(weights)
        zero = align(scales + self.scale_rows(k0, k1) * (n1 - n0) * elem(self.st).nbytes)
        end = zero + (self.scale_rows(k0, k1) * (n1 - n0) if self.zero_points else 0)
        return scales, zero, align(end)

    def group_bytes(self, g: int) -> int:
        return self.parts(g)[2]

    def layout(self, base: int) -> Iterator[tuple[int, int, int, int, int, int]]:
        """(kchunk, k0, k1, n0, n1, dram offset) of every group, packed from `base`."""
        off = base
        for g in range(self.groups):
            kc, k0, k1, n0, n1 = self.group(g)
            yield kc, k0, k1, n0, n1, off
            off += self.group_bytes(g)

    def total_bytes(self) -> int:
        full = self.group_bytes(0)
        if self.k % self.group_k == 0 and self.n % self.group_n == 0:
            return full * self.groups
        return sum(self.group_bytes(g) for g in range(self.groups))

    def least_bytes(self) -> float:
        """The bytes any layout streams: every weight at its width, every scale and zero point
        once (no padding)."""
        scales = self.scale_rows(0, self.k) * self.n
        per_scale = (elem(self.st).nbytes if self.st else 0) + (1 if self.zero_points else 0)
        return self.k * self.n * self.wbits / 8 + scales * per_scale
