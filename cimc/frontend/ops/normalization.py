"""ONNX LayerNormalization (opset 17+) -> `layer_norm`.

`LayerNormalization(X, Scale, B?) -> (Y, Mean?, InvStdDev?)` normalises over the axes from `axis`
to the last; cimc takes `axis` = the last axis (-1, as every decoder exports it) with float32
statistics (`stash_type = 1`), Scale and B constant vectors as wide as the features. The Mean
and InvStdDev outputs are not produced (a node using them is refused). Exporters that decompose
the norm (ReduceMean, Sub, Pow, Sqrt, Div) are lifted by the `layer_norm` IR rule instead.
"""

from __future__ import annotations

from cimc.frontend.converters import standard
from cimc.frontend.lift import Lifter, Term, unproduced
from cimc.frontend.model import Node
from cimc.frontend.ops.contrib_norms import check_attrs, layer_norm


def lift(lifter: Lifter, node: Node, args: list) -> tuple[Term, ...]:
    check_attrs(node, len(lifter.shape(node.inputs[0])))
    x = lifter.activation(args[0], "input X")
    y = layer_norm(lifter, node, x.base, args[1], args[2] if len(args) > 2 else None)
    return lifter.view_of(y, lifter.shape(node.outputs[0])), unproduced(node, 1, "Mean"), \
        unproduced(node, 2, "InvStdDev")


standard("LayerNormalization", lift, since=17)
