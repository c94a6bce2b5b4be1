"""RMS and layer norms: onnxruntime's fused ones (onnxruntime-genai and GPT-2/BERT exports) and
ONNX's opset-23 RMSNormalization -> `rms_norm` / `layer_norm`, and `add` for the skip.

- `SimplifiedLayerNormalization(X, scale) -> (Y, inv_std_var)`: filed under the default domain
  (onnx.checker rejects it; onnxruntime runs it) as `Y = X / sqrt(mean(X^2) + epsilon) * scale`
  over the last axis: `rms_norm(X, scale)`.
- `com.microsoft:SkipSimplifiedLayerNormalization(input, skip, gamma, bias?) -> (output, mean,
  inv_std_var, input_skip_bias_sum)`: `s = input + skip (+ bias)`, `output = rms_norm(s, gamma)`;
  `input_skip_bias_sum` is `s` (the next residual). The mean and inv_std_var outputs are not
  produced (a node using them is refused).
- `com.microsoft:SkipLayerNormalization(input, skip, gamma, beta?, bias?) -> (output, mean,
  inv_std_var, input_skip_bias_sum)`: the same with `output = layer_norm(s, gamma, beta)`
  (onnxruntime's fused GPT-2/BERT residual norm; docs/ContribOperators.md).

- `RMSNormalization(X, scale)` (ONNX, opset 23): the same over the axes from `axis` to the last;
  only the last (`axis = -1`, or rank - 1) is taken: `rms_norm(X, scale)`.

Either over the last axis of a head-split [.., heads, seq, head_dim] view (Qwen3's per-head q/k
norms as one node, at opset 23 or fused by onnxscript) is `rms_norm` with `head_dim`.
A SimplifiedLayerNormalization of a tensor no view expresses (the genai builder's per-head q/k
norms over [1, seq*heads, head_dim]) waits for the per-head RMSNorm rule (rules/norm.py).
Only the last axis (`axis = -1`) and float32 statistics (`stash_type = 1`) are accepted; the
scale must be a constant vector as wide as the features, a bias a constant vector too.
"""

from __future__ import annotations

import onnx
from onnx import helper

from cimc.frontend.converters import Converter, Unsupported, register, standard
from cimc.frontend.lift import Expr, Lifter, Term, View, unproduced
from cimc.frontend.model import Node, OnnxModel
from cimc.frontend.rules.terms import heads_base
from cimc.ir.core import Value

DEFAULT_EPS = 1e-5


def check_attrs(node: Node, rank: int | None = None) -> None:
    """A norm's attributes: `axis` the last one (-1, or rank - 1 once the input's rank is known),
    float32 statistics (`stash_type` 1), a non-negative `epsilon`."""
    axis = int(node.attrs.get("axis", -1))
    if axis != -1 and (rank is None or axis != rank - 1):
        raise Unsupported(f"axis={axis} is not supported (only the last axis, -1)")
    stash = int(node.attrs.get("stash_type", 1))
    if stash != 1:
        raise Unsupported(f"stash_type={stash} is not supported (only 1: float32 statistics)")
    eps = float(node.attrs.get("epsilon", DEFAULT_EPS))
    if not eps >= 0:
        raise Unsupported(f"epsilon={eps} must be non-negative")


def _check(node: Node, inputs: int) -> None:
    check_attrs(node)
    if len([i for i in node.inputs[:inputs] if i]) < inputs:
        raise Unsupported(f"needs {inputs} inputs, got {node.inputs}")


def check_simplified(model: OnnxModel, node: Node) -> None:
    _check(node, 2)


#: The input index of each skip norm's bias (SkipLayerNormalization has beta before it).
SKIP_BIAS = {"SkipSimplifiedLayerNormalization": 3, "SkipLayerNormalization": 4}


def check_skip(model: OnnxModel, node: Node) -> None:
    _check(node, 3)
    for i in range(3, SKIP_BIAS[node.op_type] + 1):
        if len(node.inputs) > i and node.inputs[i] and node.inputs[i] not in model.initializers:
            raise Unsupported(f"{'bias' if i == SKIP_BIAS[node.op_type] else 'beta'} {node.inputs[i]!r} is not an "
                              "initializer")


def _standin(node: Node, x: str, extra: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], list]:
    """The normalized output shaped like X (the statistics are not produced: no shape)."""
    out = node.outputs[0]
    return [*extra, helper.make_node("Identity", [x], [out], name=f"{node.name}/standin")], []


def standin_simplified(node: Node) -> tuple[list[onnx.NodeProto], list]:
    return _standin(node, node.inputs[0], [])


def standin_skip(node: Node) -> tuple[list[onnx.NodeProto], list]:
    total = node.outputs[3] if len(node.outputs) > 3 and node.outputs[3] else f"{node.name}/standin_sum"
    add = helper.make_node("Add", node.inputs[:2], [total], name=f"{node.name}/standin_add")
    return _standin(node, total, [add])


def _per_head(lifter: Lifter, node: Node, term: Term, scale: Term) -> View | None:
    """A norm over the last axis of a head-split view [.., heads, seq, head_dim] (Qwen3's q/k
    norms as one node: RMSNormalization at opset 23, onnxscript's fused SimplifiedLayerNormalization):
    `rms_norm` with head_dim over the whole activation, else None."""
    if not (isinstance(term, View) and len(term.shape) == 4) or lifter.is_plain(term):
        return None
    try:
        base, hd = heads_base(lifter, term, "input X")
    except Unsupported:
        return None
    if hd != term.shape[-1]:
        return None
    w = lifter.vector(scale, "scale", hd)
    out = lifter.op("rms_norm", [base, w], node.name,
                    {"eps": float(node.attrs.get("epsilon", DEFAULT_EPS)), "head_dim": hd})
    return View(out, term.axes)


def _norm(lifter: Lifter, node: Node, x: Value, scale: Term) -> Value:
    cols = int(x.type.shape[1])
    w = lifter.vector(scale, "scale", cols)
    return lifter.op("rms_norm", [x, w], node.name, {"eps": float(node.attrs.get("epsilon", DEFAULT_EPS))})


def lift_simplified(lifter: Lifter, node: Node, args: list) -> Term | tuple[Term, ...]:
    if isinstance(args[0], Expr):  # a per-head norm over a deferred Reshape (rules/norm.py)
        return Expr(node, args)
    head = _per_head(lifter, node, args[0], args[1])
    if head is not None:
        return head, unproduced(node, 1, "inv_std_var")
    x = lifter.activation(args[0], "input X")
    y = _norm(lifter, node, x.base, args[1])
    return lifter.view_of(y, lifter.shape(node.outputs[0])), unproduced(node, 1, "inv_std_var")


def layer_norm(lifter: Lifter, node: Node, x: Value, scale: Term, bias: Term | None) -> Value:
    """`layer_norm(x, scale (, bias))` with the node's epsilon."""
    cols = int(x.type.shape[1])
    operands = [x, lifter.vector(scale, "scale", cols)]
    if bias is not None:
        operands.append(lifter.vector(bias, "bias", cols))
    return lifter.op("layer_norm", operands, node.name, {"eps": float(node.attrs.get("epsilon", DEFAULT_EPS))})


def lift_skip(lifter: Lifter, node: Node, args: list) -> tuple[Term, ...]:
    x = lifter.activation(args[0], "input")
    skip = lifter.activation(args[1], "skip")
    if x.base.type != skip.base.type:
        raise Unsupported(f"input {x.base.type} and skip {skip.base.type} differ in shape")
    total = lifter.op("add", [x.base, skip.base], node.name)
    b = SKIP_BIAS[node.op_type]
    if len(args) > b and args[b] is not None:
        total = lifter.op("add", [total, lifter.vector(args[b], "bias", int(x.base.type.shape[1]))], node.name)
    if node.op_type == "SkipLayerNormalization":
        y = layer_norm(lifter, node, total, args[2], args[3] if len(args) > 3 else None)
    else:
        y = _norm(lifter, node, total, args[2])
    shape = lifter.shape(node.inputs[0])
    return lifter.view_of(y, shape), unproduced(node, 1, "mean"), unproduced(node, 2, "inv_std_var"), \
        lifter.view_of(total, shape)


def lift_rms(lifter: Lifter, node: Node, args: list) -> Term:
    check_attrs(node, len(lifter.shape(node.inputs[0])))
    head = _per_head(lifter, node, args[0], args[1])
    if head is not None:
        return head
    x = lifter.activation(args[0], "input X")
    return lifter.view_of(_norm(lifter, node, x.base, args[1]), lifter.shape(node.outputs[0]))


standard("RMSNormalization", lift_rms, since=23)
register(Converter("", "SimplifiedLayerNormalization", lift_simplified,
                   check=check_simplified, standin=standin_simplified))
for _op in SKIP_BIAS:
    register(Converter("com.microsoft", _op, lift_skip, check=check_skip, standin=standin_skip))
