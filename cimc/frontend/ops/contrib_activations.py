"""onnxruntime's contrib GELUs (docs/ContribOperators.md) -> `gelu`, with `add` for a bias.

- `com.microsoft:Gelu(X)`: 0.5 * X * (1 + erf(X / sqrt(2))): `gelu(X)`.
- `com.microsoft:BiasGelu(A, B)`: Gelu(A + B), B a constant vector: `gelu(add(A, B))`.
- `com.microsoft:FastGelu(X, bias?)`: the tanh approximation of GELU of X (+ bias):
  `gelu(X (+ bias)) {approximate = tanh}`.

A bias must be an initializer (checked before any folding) holding one value per feature.
"""

from __future__ import annotations

import onnx
from onnx import helper

from cimc.frontend.converters import Converter, Unsupported, register
from cimc.frontend.lift import Lifter, Term
from cimc.frontend.model import Node, OnnxModel

#: op type -> (GELU form, the input index of its bias (None: none), whether the bias is required).
GELUS = {"Gelu": ("none", None, False), "BiasGelu": ("none", 1, True), "FastGelu": ("tanh", 1, False)}


def _bias(node: Node) -> str:
    i = GELUS[node.op_type][1]
    return node.inputs[i] if i is not None and len(node.inputs) > i else ""


def check(model: OnnxModel, node: Node) -> None:
    _, index, required = GELUS[node.op_type]
    bias = _bias(node)
    if required and not bias:
        raise Unsupported(f"input {index} (the bias) is required")
    if bias and bias not in model.initializers:
        raise Unsupported(f"bias {bias!r} is not an initializer")
    if len(node.inputs) > (1 if index is None else index + 1):
        raise Unsupported(f"takes at most {1 if index is None else index + 1} inputs, got {node.inputs}")


def standin(node: Node) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """X (+ bias): the output's shape."""
    bias = _bias(node)
    op, inputs = ("Add", [node.inputs[0], bias]) if bias else ("Identity", [node.inputs[0]])
    return [helper.make_node(op, inputs, [node.outputs[0]], name=f"{node.name}/standin")], []


def lift(lifter: Lifter, node: Node, args: list) -> Term:
    x = lifter.activation(args[0], "input").base
    if _bias(node):
        term = args[GELUS[node.op_type][1]]
        b = lifter.vector(term, "bias", int(x.type.shape[1]))
        x = lifter.op("add", [x, b], node.name)
    attrs = {"approximate": "tanh"} if GELUS[node.op_type][0] == "tanh" else None
    return lifter.view_of(lifter.op("gelu", [x], node.name, attrs), lifter.shape(node.outputs[0]))


for _op in GELUS:
    register(Converter("com.microsoft", _op, lift, check=check, standin=standin))
