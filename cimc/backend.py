"""cimc as an ONNX backend (`onnx.backend.base.Backend`): `prepare` compiles a model through the
real pipeline (`cimc.driver.compile_model`), `run` simulates the program with numerics.

    rep = CimcBackend.prepare(model)          # raises CimcError (CannotCompile, ...) if cimc cannot
    (y,) = rep.run([x])                       # outputs as numpy arrays, in the graph's output order

It exists so the ONNX backend node test cases can measure which ops cimc compiles correctly
(`benchmarks/conformance.py` writes `docs/conformance.md`). A model cimc cannot compile raises
the same located `CimcError` the CLI prints; nothing else is caught.

Graph inputs that cimc takes as constants (`parameters`: integer ones, which are shapes, axes,
slice bounds and indices in these graphs, and the inputs `BOUND_INPUTS` lists) are bound as
initializers when the first run gives their values: such a model is compiled at its first `run`,
and later runs must give the same values.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.backend.base import Backend, BackendRep, namedtupledict

from cimc.driver import CompileOptions, compile_model
from isa.diag import CimcError
from isa.program import Program
from runtime.interpreter import simulate

#: (op type, input index) of the non-integer inputs the backend binds as initializers -> what they are
#: to cimc (the inputs a compiled model holds as constants).
BOUND_INPUTS = {
    ("MatMul", 1): "the B of MatMul (weights on the macros)",
    ("Gemm", 1): "the B of Gemm (weights on the macros)",
    ("Gemm", 2): "the C of Gemm (a bias)",
    ("LayerNormalization", 1): "the Scale of LayerNormalization",
    ("LayerNormalization", 2): "the B of LayerNormalization",
    ("RMSNormalization", 1): "the scale of RMSNormalization",
    ("Where", 0): "the condition of Where (a mask)",
    ("Attention", 3): "the attn_mask of Attention",
    ("RotaryEmbedding", 1): "the cos_cache of RotaryEmbedding",
    ("RotaryEmbedding", 2): "the sin_cache of RotaryEmbedding",
}
_INTEGERS = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
             TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}


def parameters(model: onnx.ModelProto) -> list[str]:
    """The graph inputs bound as initializers at the first run (see the module docstring)."""
    graph = model.graph
    weights = {n.input[i] for n in graph.node for op, i in BOUND_INPUTS if n.op_type == op and len(n.input) > i}
    inits = {t.name for t in graph.initializer}
    return [i.name for i in graph.input if i.name not in inits and i.type.HasField("tensor_type")
            and (i.type.tensor_type.elem_type in _INTEGERS or i.name in weights)]


def _compile(model: onnx.ModelProto, **kwargs: Any) -> Program:
    with tempfile.TemporaryDirectory(prefix="cimc-backend-") as tmp:
        path = Path(tmp) / f"{model.graph.name or 'model'}.onnx"
        onnx.save_model(model, str(path))
        return compile_model(path, CompileOptions(**kwargs))


class CimcRep(BackendRep):
    """A compiled program (or, with parameters to bind, the model to compile at the first run) and
    the graph's input and output names (in graph order)."""

    def __init__(self, program: Program | None, inputs: list[str], outputs: list[str],
                 model: onnx.ModelProto | None = None, options: dict | None = None) -> None:
        self.program, self.inputs, self.outputs = program, inputs, outputs
        self.model, self.options = model, options or {}
        self.bound: dict[str, np.ndarray] = {}

    def _bind(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compile with the parameters bound (first run) or check they are the bound values; returns
        the other inputs."""
        assert self.model is not None
        names = parameters(self.model)
        if self.program is None:
            missing = [n for n in names if n not in inputs]
            if missing:
                raise CimcError(f"missing input(s): {', '.join(missing)}")
            self.bound = {n: np.asarray(inputs[n]) for n in names}
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
            model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in self.bound.items())
            kept = [i for i in model.graph.input if i.name not in self.bound]
            del model.graph.input[:]
            model.graph.input.extend(kept)
            self.program = _compile(model, **self.options)
        for n, a in self.bound.items():
            if n in inputs and not np.array_equal(np.asarray(inputs[n]), a):
                raise CimcError(f"input {n!r} was bound as a constant at the first run; it must not change")
        return {k: v for k, v in inputs.items() if k not in self.bound}

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
        if self.model is not None:
            inputs = self._bind(dict(inputs))
        assert self.program is not None
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
        """Compile `model` (at the first run if it has `parameters`); keyword arguments are
        `CompileOptions` fields (e.g. max_seq)."""
        if not cls.supports_device(device):
            raise CimcError(f"device {device!r}: cimc simulates on the CPU only")
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in inits]
        outputs = [o.name for o in graph.output]
        if parameters(model):
            return CimcRep(None, inputs, outputs, model, kwargs)
        return CimcRep(_compile(model, **kwargs), inputs, outputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"
