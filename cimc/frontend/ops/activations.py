"""ONNX Gelu (opset 20+) -> `gelu`, the erf form or with `approximate = "tanh"` the tanh one.

Exporters below opset 20 spell GELU out (Erf, Tanh, Pow, Mul, Add); the `gelu` and `gelu_tanh` IR
rules (passes/lift_idioms.py) fuse those chains. onnxruntime's contrib GELUs are in
contrib_activations.py.
"""

from __future__ import annotations

from cimc.frontend.converters import Unsupported, standard
from cimc.frontend.lift import Lifter, Term, View
from cimc.frontend.model import Node
from cimc.ir.core import Value
from cimc.ir.ops import GELU_FORMS


def gelu(lifter: Lifter, node: Node, x: Value, form: str) -> View:
    """`gelu(x)` of form `form` (cimc.ir.ops.GELU_FORMS) for `node`, whose first output it becomes."""
    attrs = {"approximate": "tanh"} if form == "tanh" else {}
    return lifter.view_of(lifter.op("gelu", [x], node.name, attrs), lifter.shape(node.outputs[0]))


def lift(lifter: Lifter, node: Node, args: list) -> Term:
    form = node.attrs.get("approximate", "none")
    if isinstance(form, bytes):
        form = form.decode()
    if form not in GELU_FORMS:
        raise Unsupported(f"approximate={form!r} is not a Gelu form (one of {', '.join(GELU_FORMS)})")
    x = lifter.plain(args[0])
    if x is None:
        raise Unsupported("Gelu input must be a whole [tokens, features] activation")
    return gelu(lifter, node, x.base, form)


standard("Gelu", lift, since=20)
