"""`quantize`: integer weights (and activations) for the CIM macros.

Every `linear` whose weight is a float matrix gets a `qweight` of `bits`-bit signed integers in
its place: symmetric round-to-nearest (`cimc.ir.quant.rtn`) with one `scale`-typed scale per
group of `group` rows along the reduction axis and output column (`group=0`: one per output
channel). Its `act` says how inputs enter the macros: `i8` (dynamic symmetric int8, one scale
per token and weight scale group, computed on chip by `vquant`) or `f32` (float compute on the
exact dequantized weights). Linears that already have integer weights (an imported quantized
graph) keep them; `act`, when given, applies to them too (otherwise they keep the scheme their
format implies). With `bits=0` no weight is quantized (only `act` is applied).

A group that does not divide the reduction axis, or a width the macros cannot store
(`macro.weight_bits`), is an error naming the linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cimc.ir.core import Module, Rewriter, TensorType, Value
from cimc.ir.ops import ACTS
from isa.diag import CimcError
from isa.dtypes import ACT, WEIGHT_MODES
from passes.manager import PassContext, register

#: Bits -> the integer weight type the pass makes (the integer `--weights` modes).
BITS = {m.bits: m.etype for m in WEIGHT_MODES.values() if m.etype != ACT}
GROUPS = (0, 16, 32, 64, 128, 256)
SCALE_TYPES = ("f16", "f32")


@register
@dataclass(frozen=True)
class QuantizePass:
    name: ClassVar[str] = "quantize"
    bits: int = 4
    group: int = 32
    act: str = ""
    scale: str = "f16"

    def check(self, weight_bits: tuple[int, ...]) -> None:
        """The options, checked (errors name the option and what is allowed)."""
        if self.bits and self.bits not in BITS:
            raise CimcError(f"quantize: bits must be 4 or 8 (or 0: keep float weights), got {self.bits}")
        if self.bits and self.bits not in weight_bits:
            raise CimcError(f"quantize: {self.bits}-bit weights do not fit the macros, which store "
                            f"{', '.join(map(str, weight_bits))}-bit weights (macro.weight_bits)")
        if self.group not in GROUPS:
            raise CimcError(f"quantize: group must be one of {', '.join(map(str, GROUPS))} (0: per output channel), "
                            f"got {self.group}")
        if self.act and self.act not in ACTS:
            raise CimcError(f"quantize: act must be one of {', '.join(ACTS)}, got {self.act!r}")
        if self.scale not in SCALE_TYPES:
            raise CimcError(f"quantize: scale must be one of {', '.join(SCALE_TYPES)}, got {self.scale!r}")

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        self.check(ctx.hw.macro.weight_bits)
        if not self.bits and self.act and all(op.operands[1].type.dtype == ACT for op in module.walk("linear")):
            raise CimcError(f"quantize: act {self.act} applies to integer weights, and this model has none; "
                            "add --weights int8 or int4")
        made: dict[int, Value] = {}
        for op in list(module.walk("linear")):
            w = op.operands[1]
            if w.type.dtype == ACT and self.bits:
                if w.owner is None or w.owner.name != "weight":
                    raise CimcError(f"quantize: the weight of linear {op.loc!r} is not an initializer")
                k, n = (int(d) for d in w.type.shape)
                if self.group and k % self.group:
                    raise CimcError(f"quantize: group {self.group} does not divide the {k} rows of the weight of "
                                    f"linear {op.loc!r}; use another --group-size or channel")
                if id(w) not in made:
                    attrs = {"init": w.owner.attrs["init"], "format": "rtn", "group": self.group,
                             "scale_type": self.scale}
                    attrs |= {k: w.owner.attrs[k] for k in ("transpose", "cols") if k in w.owner.attrs}
                    made[id(w)] = rw.create("qweight", [], [TensorType(BITS[self.bits], (k, n))], attrs, w.owner.loc,
                                            before=w.owner).result
                rw.set_operand(op, 1, made[id(w)])
                rw.set_attr(op, "act", self.act or "i8")
                if not w.uses:
                    rw.erase(w.owner)
            elif self.act and w.type.dtype != ACT:
                rw.set_attr(op, "act", self.act)
