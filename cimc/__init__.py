"""cimc: compile decoder-only language models (ONNX) for a compute-in-memory accelerator and
simulate the binaries with cycle and energy accounting.

The Python API, imported on first use (so `import cimc` stays cheap)::

    import cimc
    program = cimc.compile_model("model.onnx", cimc.CompileOptions(max_seq=64, max_ctx=128))
    cimc.write_binary("model.cimb", program)
    result = cimc.simulate(program, {"input_ids": ids})          # outputs, report
    gen = cimc.generate(cimc.Session(program), [1, 5, 9], 16)     # greedy tokens, report
    cimc.check_model("model.onnx")                               # compiles? architecture, or why not
    acc = cimc.measure_accuracy(program, "model.onnx", [1, 5, 9], 16)  # logits vs onnxruntime, teacher-forced
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "CompileOptions": "cimc.driver", "compile_model": "cimc.driver", "check_model": "cimc.driver",
    "load_hw": "isa.hw", "read_binary": "isa.binary", "write_binary": "isa.binary",
    "Session": "runtime.interpreter", "simulate": "runtime.interpreter", "generate": "runtime.generate",
    "measure_accuracy": "cimc.accuracy",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'cimc' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
