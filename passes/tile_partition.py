"""`tile-partition`: cut every linear's weight matrix into macro-sized blocks, grouped per tile.

Adds a `tiling` attribute to each `linear` (see `passes.tiling.Tiling`): the weight type (f32,
or the integer type of its `qweight` with its scale groups and scale type), the block shape
`rows x per_macro`, how many blocks a tile group holds along K and N, and the resulting number
of K and N chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cimc.ir.core import Module, Rewriter
from isa.diag import CimcError
from isa.dtypes import elem
from passes.manager import PassContext, register
from passes.tiling import Tiling


@register
@dataclass(frozen=True)
class TilePartitionPass:
    name: ClassVar[str] = "tile-partition"

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        m, c = ctx.hw.macro, ctx.hw.chip
        for op in module.walk("linear"):
            w = op.operands[1]
            k, n = (int(d) for d in w.type.shape)
            t = elem(w.type.dtype)
            if not t.is_float and t.bits not in m.weight_bits:
                raise CimcError(f"linear {op.loc!r}: {t.bits}-bit weights do not fit the macros, which store "
                                f"{', '.join(map(str, m.weight_bits))}-bit weights (macro.weight_bits)")
            if t.bits > m.cols:
                raise CimcError(f"linear {op.loc!r}: {t.bits}-bit weights do not fit a macro row of {m.cols} columns")
            q = w.owner.attrs if w.owner is not None and w.owner.name == "qweight" else {}
            try:
                tiling = Tiling.plan(k, n, w.type.dtype, m.rows, m.cols, c.macros_per_tile, q.get("group", 0),
                                     q.get("scale_type", ""))
            except ValueError as e:
                raise CimcError(f"linear {op.loc!r}: {e}") from None
            rw.set_attr(op, "tiling", tiling.to_attr())
            rows = min(k, tiling.gk or tiling.group_k)
            if op.attrs.get("act") == "u8" and not t.signed and rows * 255 * t.hi >= 1 << (m.accum_bits - 1):
                ctx.notes.append(f"linear {op.loc!r}: uint8 inputs times {w.type.dtype} weights over {rows} rows can "
                                 f"exceed the {m.accum_bits}-bit accumulator, which saturates as the hardware "
                                 f"would (--set macro.accum_bits={m.accum_bits + 8} gives the exact product)")
        rw.set_module_attr("hw", {"name": ctx.hw.name, "fingerprint": ctx.hw.fingerprint()})
