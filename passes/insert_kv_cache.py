"""`insert-kv-cache`: give every attention a KV cache, so one program can continue another.

The frontend lifts attention over the tokens of one run (`attention(q, k, v)` with k and v of
`seq` rows). This pass puts each layer's keys and values into a cache that lives in DRAM across
runs: `kv_append` writes the run's rows at positions past .. past+seq-1 and attention reads
positions 0 .. past+seq-1. With past = 0 the program computes exactly what the model does; with
past > 0 it is the decode step of autoregressive generation. Exports that already carry a cache
(past_key_values inputs) arrive with `kv_cache` ops and are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cimc.ir.core import CTX, Module, Rewriter, TensorType
from isa.dtypes import ACT
from passes.manager import PassContext, register


@register
@dataclass(frozen=True)
class InsertKvCachePass:
    name: ClassVar[str] = "insert-kv-cache"

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        for index, att in enumerate(list(module.walk("attention"))):
            q, k, v = att.operands
            if k.type.shape[0] == CTX:
                continue
            layer = {"layer": att.attrs["layer"]} if "layer" in att.attrs else {}
            cached = []
            for kind, x in (("key", k), ("value", v)):
                t = TensorType(ACT, (CTX, x.type.shape[1]))
                cache = rw.create("kv_cache", [], [t], {"name": f"layer{index}.{kind}", **layer}, att.loc, before=att)
                cached.append(rw.create("kv_append", [cache.result, x], [t], dict(layer), att.loc, before=att).result)
            new = rw.create("attention", [q, *cached], [att.result.type], dict(att.attrs), att.loc, before=att)
            rw.replace_uses(att.result, new.result)
            rw.erase(att)
