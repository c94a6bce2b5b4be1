"""cimc as an ONNX backend (`onnx.backend.base.Backend`): `prepare` compiles a model through the
real pipeline (`cimc.driver.compile_model`), `run` simulates the program with numerics.

    rep = CimcBackend.prepare(model)          # raises CimcError (CannotCompile, ...) if cimc cannot
    (y,) = rep.run([x])                       # outputs as numpy arrays, in the graph's output order

It exists so the ONNX backend node test cases can measure which ops cimc compiles correctly
(`benchmarks/conformance.py` writes `docs/conformance.md`). A model cimc cannot compile raises
the same located `CimcError` the CLI prints; nothing else is caught.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.backend.base import Backend, BackendRep, namedtupledict

from cimc.driver import CompileOptions, compile_model
from isa.diag import CimcError
from isa.program import Program
from runtime.interpreter import simulate


class CimcRep(BackendRep):
    """A compiled program and the graph's input and output names (in graph order)."""

    def __init__(self, program: Program, inputs: list[str], outputs: list[str]) -> None:
        self.program, self.inputs, self.outputs = program, inputs, outputs

    def run(self, inputs: Sequence[np.ndarray] | Mapping[str, np.ndarray] | np.ndarray, **kwargs: Any
            ) -> tuple[np.ndarray, ...]:
        """Simulate the program's prefill entry on `inputs` (positional in graph input order, or by
        name); returns the outputs named and ordered as the graph's, in their ONNX element types."""
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if not isinstance(inputs, Mapping):
            if len(inputs) != len(self.inputs):
                raise CimcError(f"{len(inputs)} input(s) given; the model takes {len(self.inputs)} "
                                f"({', '.join(self.inputs)})")
            inputs = dict(zip(self.inputs, inputs, strict=True))
        result = simulate(self.program, inputs, entry="prefill")
        dtypes = {s.name: helper.tensor_dtype_to_np_dtype(TensorProto.DataType.Value(s.dtype.upper()))
                  for s in self.program.entry("prefill").symbols if s.kind == "output"}
        missing = [n for n in self.outputs if n not in result.outputs]
        if missing:
            raise CimcError(f"the program has no output(s) {', '.join(missing)}")
        values = [np.asarray(result.outputs[n]).astype(dtypes[n], copy=False) for n in self.outputs]
        return namedtupledict("Outputs", self.outputs)(*values)


class CimcBackend(Backend):
    """Compile with cimc, run on cimc's simulator (the host CPU computes the numerics)."""

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> CimcRep:
        """Compile `model`; keyword arguments are `CompileOptions` fields (e.g. max_seq)."""
        if not cls.supports_device(device):
            raise CimcError(f"device {device!r}: cimc simulates on the CPU only")
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in inits]
        with tempfile.TemporaryDirectory(prefix="cimc-backend-") as tmp:
            path = Path(tmp) / f"{graph.name or 'model'}.onnx"
            onnx.save_model(model, str(path))
            program = compile_model(path, CompileOptions(**kwargs))
        return CimcRep(program, inputs, [o.name for o in graph.output])

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"
