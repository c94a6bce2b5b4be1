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


def import_onnx(path: str | os.PathLike, *, max_seq: int = 256, dims: dict[str, int] | None = None
                ) -> tuple[Module, WeightStore]:
    """Lift the model at `path` to an IR module valid for any length up to `max_seq`.

    Returns the module and the store its `weight` ops read from. `dims` binds other named
    dynamic dimensions. Raises CimcError listing every node that cannot be compiled.
    """
    if max_seq < 1:
        raise CimcError(f"--max-seq must be at least 1, got {max_seq}")
    model, weights = open_model(path)
    dims = dict(dims or {})
    # Analyse at two lengths (at least 2, so a sequence axis never has size 1): axes whose size
    # differs follow the length. Constants that vary must agree on their common prefix.
    n1 = max(max_seq, 2)
    n2 = n1 - 1 if n1 > 2 else 3
    f1 = analyze(model, weights, n1, dims)
    f2 = analyze(model, weights, n2, dims)
    module = Lifter(model, f1, f2, max_seq, Path(path).stem).run()
    return module, weights
