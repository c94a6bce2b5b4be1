"""GELU: ONNX Gelu (opset 20+; `approximate` "none" is the erf form, "tanh" the tanh form) on a
[tokens, features] activation -> `gelu`. Exporters at older opsets spell the tanh form out in
elementwise ops; the IR rule `gelu_tanh` (passes/lift_idioms.py) lifts that chain.
"""

from __future__ import annotations

from cimc.frontend.converters import Unsupported, standard
from cimc.frontend.lift import Lifter, Term
from cimc.frontend.model import Node
from cimc.ir.ops import GELU_FORMS


def gelu(lifter: Lifter, node: Node, args: list) -> Term:
    p = lifter.activation(args[0], "input")
    form = node.attrs.get("approximate", "none")
    form = form.decode() if isinstance(form, bytes) else form
    if form not in GELU_FORMS:
        raise Unsupported(f"Gelu approximate={form!r} is not one of {', '.join(GELU_FORMS)}")
    attrs = {"approximate": form} if form != "none" else None
    return lifter.view_of(lifter.op("gelu", [p.base], node.name, attrs), lifter.shape(node.outputs[0]))


standard("Gelu", gelu, since=20)
