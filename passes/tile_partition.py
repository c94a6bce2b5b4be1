"""`tile-partition`: cut every linear's weight matrix into macro-sized blocks, grouped per tile.

Adds a `tiling` attribute to each `linear` (see `passes.tiling.Tiling`): the weight bits (32 in
fp32 mode), the block shape `rows x per_macro`, how many blocks a tile group holds along K and N,
and the resulting number of K and N chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cimc.ir.core import Module, Rewriter
from isa.diag import CimcError
from passes.manager import PassContext, register
from passes.tiling import Tiling

WEIGHT_BITS = {"fp32": 32}


@register
@dataclass(frozen=True)
class TilePartitionPass:
    name: ClassVar[str] = "tile-partition"

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        mode = module.attrs.get("weights", "fp32")
        if mode not in WEIGHT_BITS:
            raise CimcError(f"weights mode {mode!r} is not supported yet (supported: {', '.join(WEIGHT_BITS)})")
        wbits = WEIGHT_BITS[mode]
        m, c = ctx.hw.macro, ctx.hw.chip
        if wbits > m.cols:
            raise CimcError(f"{wbits}-bit weights do not fit a macro row of {m.cols} columns")
        for op in module.walk("linear"):
            k, n = op.operands[1].type.shape
            t = Tiling.plan(int(k), int(n), wbits, m.rows, m.cols, c.macros_per_tile)
            rw.set_attr(op, "tiling", t.to_attr())
        rw.set_module_attr("hw", {"name": ctx.hw.name, "fingerprint": ctx.hw.fingerprint()})
