"""`place-weights`: lay weights out in DRAM for streaming and assign groups to tile slots.

The macro array is split into `sets` equal sets of tiles (2 = ping-pong: one set computes while
the other is loaded). Weight groups stream through the sets in program order; the group that is
the i-th of the whole stream sits in tile slot `i mod tiles_per_set` of whichever set its stage
uses (balance-stages picks stages), so any run of up to `tiles_per_set` consecutive groups
occupies distinct tiles. DRAM holds the groups back to back in stream order, each contiguous,
so every weight load is one sequential DRAM read.

Adds `dram = {base, bytes, slot0}` to each `linear` and `macro_sets` to the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cimc.ir.core import Module, Rewriter
from isa.diag import CimcError
from passes.manager import PassContext, register
from passes.tiling import Tiling, align


@register
@dataclass(frozen=True)
class PlaceWeightsPass:
    name: ClassVar[str] = "place-weights"
    sets: int = 2

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        tiles = ctx.hw.chip.tiles
        if self.sets < 1:
            raise CimcError(f"place-weights: sets must be at least 1, got {self.sets}")
        sets = min(self.sets, tiles)
        if sets < self.sets:
            ctx.notes.append(f"place-weights: {tiles} tile(s) cannot form {self.sets} macro sets; using {sets}")
        per = tiles // sets
        rw.set_module_attr("macro_sets", [list(range(s * per, (s + 1) * per)) for s in range(sets)])
        offset, stream = 0, 0
        for op in module.walk("linear"):
            if "tiling" not in op.attrs:
                raise CimcError(f"place-weights needs tile-partition first ({op.loc} has no tiling)")
            t = Tiling.from_attr(op.attrs["tiling"])
            size = t.total_bytes()
            rw.set_attr(op, "dram", {"base": offset, "bytes": size, "slot0": stream % per})
            offset = align(offset + size, 4096)
            stream += t.groups
        rw.set_module_attr("weight_bytes", offset)
