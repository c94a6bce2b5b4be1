"""ONNX -> IR: open the model, bind the sequence length, fold, and lift decoder idioms."""

from __future__ import annotations

import os
from pathlib import Path

from cimc.frontend import ops, rules  # noqa: F401  (their modules register converters and idiom rules)
from cimc.frontend.converters import refusal
from cimc.frontend.fold import Binding, analyze, find_roles, mask_probe, mask_values, position_tables, prepare
from cimc.frontend.generic import GENERIC, GenericLifter
from cimc.frontend.lift import Lifter
from cimc.frontend.model import OnnxModel, WeightStore, cannot_compile, open_model
from cimc.ir.core import Module
from isa.diag import CimcError

__all__ = ["OnnxModel", "WeightStore", "import_onnx", "open_model"]


def import_onnx(path: str | os.PathLike, *, max_seq: int = 256, max_ctx: int | None = None,
                dims: dict[str, int] | None = None) -> tuple[Module, WeightStore]:
    """Lift the model at `path` to an IR module taking up to `max_seq` tokens per run, with
    positions (prompt plus generated tokens) up to `max_ctx` (default: `max_seq`).

    Returns the module and the store its `weight` ops read from. `dims` binds other named
    dynamic dimensions. Raises CimcError listing every node that cannot be compiled.
    """
    max_ctx = max_seq if max_ctx is None else max_ctx
    if max_seq < 1:
        raise CimcError(f"--max-seq must be at least 1, got {max_seq}")
    if max_ctx < max_seq:
        raise CimcError(f"--max-ctx ({max_ctx}) must be at least --max-seq ({max_seq})")
    model, weights = open_model(path)
    roles = find_roles(model)
    refused = [(n, why) for n in model.nodes if (why := refusal(model, n, GENERIC if roles.generic else None))]
    if refused:
        raise cannot_compile(model, refused)
    dims = roles.dims | dict(dims or {})
    # The graph is lifted at small, distinct lengths (no axis of interest has size 1), compared
    # with one more token and, with a cache, more cached tokens; position tables (RoPE) are
    # folded at max_ctx tokens so they cover every position, masks where a sliding window shows.
    past = 7 if roles.caches else 0
    bindings = {"main": Binding(5, past), "seq": Binding(6, past)}
    if roles.caches:
        bindings["past"] = Binding(5, past + 4)
    prep = prepare(model, weights, roles)
    facts = {k: analyze(model, prep, b, dims, roles) for k, b in bindings.items()}
    tables = position_tables(model, facts["main"], facts["seq"])
    facts["table"] = analyze(model, prep, Binding(max(max_ctx, past + 6), 0), dims, roles, only=tables)
    masks = mask_values(model, facts["main"], facts["seq"])
    if masks:
        facts["mask"] = analyze(model, prep, mask_probe(max_ctx, bool(roles.caches)), dims, roles, only=masks)
    lifter = GenericLifter if roles.generic else Lifter
    module = lifter(model, facts, roles, max_seq, max_ctx, Path(path).stem, weights.get).run()
    return module, weights

