"""Weight tiling arithmetic shared by tile-partition, place-weights, balance-stages and codegen.

A linear's weight `[K, N]` is cut into macro blocks of `rows` x `per_macro` weights (a macro
row holds `cols / wbits` weights). Blocks are grouped per tile: a group is up to
`macros_per_tile` blocks, `kb` along K (summed by the tile's adder tree) by `nb` along N. Groups
stream in N-major order: all K chunks of one output block are consecutive, so the partial sums
of a K split are ready together. Each group is stored in DRAM as a contiguous `k x n` block.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

DRAM_ALIGN = 64
#: Input bits fed serially per weight mode (fp32 inputs are aligned to a 32-bit significand).
ACT_BITS = {32: 32}


def align(x: int, a: int = DRAM_ALIGN) -> int:
    return -(-x // a) * a


def act_bits(wbits: int, hw_act_bits: int) -> int:
    """Input bits an MVM feeds serially for `wbits`-bit weights."""
    return ACT_BITS.get(wbits, hw_act_bits)


@dataclass(frozen=True)
class Tiling:
    """The `tiling` attribute of a linear, as a typed object."""

    k: int
    n: int
    wbits: int
    rows: int
    per_macro: int
    kb: int  # macro blocks along K per group
    nb: int  # macro blocks along N per group

    @classmethod
    def plan(cls, k: int, n: int, wbits: int, rows: int, cols: int, macros_per_tile: int) -> Tiling:
        per_macro = cols // wbits
        kb = min(-(-k // rows), macros_per_tile)
        nb = max(1, min(macros_per_tile // kb, -(-n // per_macro)))
        return cls(k, n, wbits, rows, per_macro, kb, nb)

    @classmethod
    def from_attr(cls, attr: dict) -> Tiling:
        return cls(*(int(attr[f]) for f in ("k", "n", "wbits", "rows", "per_macro", "kb", "nb")))

    def to_attr(self) -> dict:
        return {"k": self.k, "n": self.n, "wbits": self.wbits, "rows": self.rows, "per_macro": self.per_macro,
                "kb": self.kb, "nb": self.nb, "kchunks": self.kchunks, "nchunks": self.nchunks}

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

    def group(self, g: int) -> tuple[int, int, int, int, int]:
        """(kchunk, k0, k1, n0, n1) of group `g` (N-major order)."""
        nc, kc = divmod(g, self.kchunks)
        k0, n0 = kc * self.group_k, nc * self.group_n
        return kc, k0, min(self.k, k0 + self.group_k), n0, min(self.n, n0 + self.group_n)

    def group_bytes(self, g: int) -> int:
        _, k0, k1, n0, n1 = self.group(g)
        return align(((k1 - k0) * (n1 - n0) * self.wbits + 7) // 8)

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
