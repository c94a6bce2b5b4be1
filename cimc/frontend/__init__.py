"""ONNX -> IR: open the model, bind the sequence length, fold, and lift decoder idioms."""

from __future__ import annotations

import os
from pathlib import Path

from cimc.frontend.fold import analyze
from cimc.frontend.lift import Lifter
from cimc.frontend.model import OnnxModel, WeightStore, open_model
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
    dims = dict(dims or {})
    # Analyse at two lengths (at least 2, so a sequence axis never has size 1): axes whose size
    # differs follow the length. Constants that vary must agree on their common prefix.
    # Position tables (RoPE) are folded for every position up to max_ctx.
    n1 = max(max_ctx, 2)
    n2 = n1 - 1 if n1 > 2 else 3
    f1 = analyze(model, weights, n1, dims)
    f2 = analyze(model, weights, n2, dims)
    module = Lifter(model, f1, f2, max_seq, max_ctx, Path(path).stem).run()
    return module, weights
