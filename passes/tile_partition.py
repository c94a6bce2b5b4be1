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
from isa.dtypes import ElemType, elem
from passes.manager import PassContext, register
from passes.tiling import Tiling

#: The largest input magnitude of each integer input scheme (`act`).
INPUT_MAX = {"i8": 127, "u8": 255}


def _worst_sum(act: str | None, t: ElemType, rows: int) -> int:
    """The largest partial sum an accumulator can see: rows x largest input x largest stored weight."""
    if act not in INPUT_MAX or t.is_float:
        return 0
    return rows * INPUT_MAX[act] * max(abs(t.lo), t.hi)


@register
@dataclass(frozen=True)
class TilePartitionPass:
    name: ClassVar[str] = "tile-partition"

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        m, c = ctx.hw.macro, ctx.hw.chip
        wide: list[tuple[str, int]] = []  # linears whose worst-case sums overflow the accumulator
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
            worst = _worst_sum(op.attrs.get("act"), t, min(k, tiling.gk or tiling.group_k))
            if worst >= 1 << (m.accum_bits - 1):
                wide.append((op.loc, worst))
        if wide:
            loc, worst = max(wide, key=lambda lw: lw[1])
            ctx.notes.append(f"{len(wide)} linear(s), e.g. {loc!r}: worst-case partial sums (largest inputs times "
                             f"largest weights over a scale group) can exceed the {m.accum_bits}-bit accumulator, "
                             "which saturates as the hardware would (--set "
                             f"macro.accum_bits={worst.bit_length() + 1} holds the worst case)")
        rw.set_module_attr("hw", {"name": ctx.hw.name, "fingerprint": ctx.hw.fingerprint()})
