"""Attention as single nodes -> `attention` (+ `kv_append` for the op's own cache).

- `Attention(Q, K, V, attn_mask?, past_key?, past_value?)` (ONNX, opset 23; what torch's exporter
  makes of sdpa at opset 23): Q, K, V [batch, heads, seq, head_dim] views (K, V may repeat their
  heads: GQA by Expand) or whole [batch, seq, heads*head_dim] activations with `q_num_heads` and
  `kv_num_heads`; `scale` (default 1/sqrt(head_dim)), `softcap` (0: none).
- `com.microsoft:MultiHeadAttention(query, key, value, bias?, key_padding_mask?, attention_bias?)`
  (onnxruntime; onnxscript's ort_fusions make it of sdpa): 3-D query, key, value with `num_heads`
  each, `scale` (0: 1/sqrt(head_dim)), `unidirectional` (causal).

The mask must make the attention causal (maybe with a sliding window), as cimc's `attention`
computes it: `attn_mask`/`attention_bias` folded to a constant at every binding (boolean: True
sees the key; float: added), plus the causal mask `is_causal`/`unidirectional` adds. ONNX's causal
mask is aligned to the bottom right with the op's own past (a query at i sees keys <= past + i) and
to the top left without: over keys that an outside Concat extended with a cache (torch's export
with a KV cache, which masks with attn_mask instead) it is not causal and is refused by the check.
ONNX's past_key/past_value must be graph inputs whose presents are graph outputs (the KV cache:
`kv_append`, as GroupQueryAttention's).

Refused, with the attribute or input and its value: `qk_matmul_output` requested (any
`qk_matmul_output_mode`), `softmax_precision` other than 1 (float), a negative `softcap`, sliding
`left_window_size`/`right_window_size` other than -1, `nonpad_kv_seqlen`, MultiHeadAttention's
`bias`, `key_padding_mask`, past inputs and `past_sequence_length`/`cache_indirection`; attention
with neither a mask nor causal (bidirectional), and masks that are not causal.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from cimc.frontend import views as V
from cimc.frontend.converters import CacheRoles, Converter, Unsupported, register
from cimc.frontend.lift import Expr, Lifter, Static, Term, View
from cimc.frontend.model import Node, OnnxModel
from cimc.frontend.ops.layout import append_cache, is_cache
from cimc.frontend.rules.attention import Mask, attend, bindings, mask_of


def _ins(node: Node, n: int) -> list[str]:
    return (node.inputs + [""] * n)[:n]


def check_onnx(model: OnnxModel, node: Node) -> None:
    at = node.attrs
    outs = _ins_out(node, 4)
    if outs[3]:
        raise Unsupported(f"output qk_matmul_output {outs[3]!r} (qk_matmul_output_mode="
                          f"{int(at.get('qk_matmul_output_mode', 0))}) is not supported")
    if "softmax_precision" in at and int(at["softmax_precision"]) != onnx.TensorProto.FLOAT:
        raise Unsupported(f"softmax_precision={int(at['softmax_precision'])} is not supported (only 1: float)")
    if not float(at.get("softcap", 0.0)) >= 0.0:
        raise Unsupported(f"softcap={float(at['softcap'])} must be 0 (none) or positive")
    for name in ("left_window_size", "right_window_size"):
        if int(at.get(name, -1)) != -1:
            raise Unsupported(f"{name}={int(at[name])} is not supported (only -1)")
    ins = _ins(node, 7)
    if ins[6]:
        raise Unsupported(f"input nonpad_kv_seqlen {ins[6]!r} is not supported")
    if bool(ins[4]) != bool(ins[5]):
        raise Unsupported(f"past_key {ins[4]!r} and past_value {ins[5]!r} must be given both or neither")
    for past, present, what in ((ins[4], outs[1], "key"), (ins[5], outs[2], "value")):
        if past and (past not in model.inputs or present not in model.outputs):
            raise Unsupported(f"past_{what} {past!r} and present_{what} {present!r} must be a graph input and "
                              "output (the KV cache)")


def _ins_out(node: Node, n: int) -> list[str]:
    return ([*node.outputs] + [""] * n)[:n]


def roles_onnx(model: OnnxModel, node: Node) -> CacheRoles:
    """The op's own past/present pairs (the integer mask inputs are found by their shapes)."""
    ins, outs = _ins(node, 6), _ins_out(node, 3)
    caches = {p: o for p, o in ((ins[4], outs[1]), (ins[5], outs[2])) if p in model.inputs and o}
    return CacheRoles(caches, [], {})


def _head_split(lifter: Lifter, t: Term, what: str, heads: int) -> View:
    """A [batch, heads, seq, head_dim] view of a 4-D operand, or of a 3-D [batch, seq,
    heads*head_dim] one split into `heads` (also the Reshape flattening repeated heads, which no
    view expresses and so waits for its consumer)."""
    if isinstance(t, Expr) and t.node.op_type == "Reshape" and isinstance(t.args[0], View):
        x = t.args[0]  # a deferred Reshape: [.., seq, heads, hd] with repeated (GQA) heads flattened
        shape = lifter.shape(t.node.outputs[0])
    else:
        x = lifter.need_view(t, what)
        shape = x.shape
    if len(shape) == 4:
        return x
    if len(shape) != 3:
        raise Unsupported(f"{what} is neither 3-D nor 4-D")
    if heads < 1 or shape[2] % heads:
        raise Unsupported(f"{what} has {shape[2]} features, not a multiple of its {heads} heads")
    b, s, f = shape
    return V.transpose(V.reshape(x, (b, s, heads, f // heads)), [0, 2, 1, 3])


def _causal(lifter: Lifter, keys: int, past: bool) -> list[tuple[np.ndarray, int, int]]:
    """ONNX's causal mask at each binding: bottom-right aligned over the op's own past (query i
    sees keys <= past + i), top-left over `keys` keys without one (query i sees keys <= i)."""
    out = []
    for bn in bindings(lifter)[:2]:
        assert bn is not None
        n, p = bn
        total = p + n if past else keys + n - lifter.n  # keys beyond the queries do not grow with them
        offset = p if past else 0
        seen = np.arange(total)[None, :] <= offset + np.arange(n)[:, None]
        out.append((np.where(seen, 0.0, -np.inf), n, p))
    return out


def _mask(lifter: Lifter, node: Node, term: Term | None, name: str, causal: bool, keys: int, past: bool) -> Mask | None:
    """The attention's additive mask at each binding: the mask operand, plus the causal mask."""
    if term is not None and not isinstance(term, Static):
        raise Unsupported(f"mask {name!r} does not fold to a constant (cimc masks causally; the attention "
                          "mask input must be all ones)")
    given = mask_of(lifter, term) if term is not None else None
    if not causal:
        return given
    causal_values = _causal(lifter, keys, past)
    if given is None:
        return Mask(f"{node.name} (causal)", causal_values)
    values = []
    for (m, n, p), (c, n2, p2) in zip(given.values, causal_values, strict=False):
        if (n, p) != (n2, p2):
            break
        try:
            values.append((m + c, n, p))
        except ValueError:
            raise Unsupported(f"mask {name!r} {list(np.shape(m))} does not broadcast to the scores") from None
    return Mask(name, values)


def lift_onnx(lifter: Lifter, node: Node, args: list) -> tuple[Term, ...]:
    at = node.attrs
    q_in, k_in, v_in, mask_t, past_k = (args + [None] * 5)[:5]
    q = _head_split(lifter, q_in, "Q", int(at.get("q_num_heads", 0)))
    k = _head_split(lifter, k_in, "K", int(at.get("kv_num_heads", 0)))
    v = _head_split(lifter, v_in, "V", int(at.get("kv_num_heads", 0)))
    presents: tuple[Term, ...] = ()
    if past_k is not None:  # the op's own cache
        for term, name in ((args[4], node.inputs[4]), (args[5], node.inputs[5])):
            if not is_cache(term):
                raise Unsupported(f"past {name!r} is not a KV cache input")
        k, v = append_cache(lifter, args[4], k, node.name), append_cache(lifter, args[5], v, node.name)
        presents = (k, v)
    causal = bool(int(at.get("is_causal", 0)))
    mask = _mask(lifter, node, mask_t, _ins(node, 4)[3], causal, k.shape[2], past_k is not None)
    if mask is None:
        raise Unsupported("is_causal=0 without attn_mask is bidirectional attention, which is not supported")
    scale = float(at["scale"]) if "scale" in at else None
    softcap = float(at.get("softcap", 0.0)) or None
    out = attend(lifter, node.name, q, k, v, mask, scale, softcap)
    shape = lifter.shape(node.outputs[0])
    if len(shape) == 3:
        out = V.reshape(V.transpose(out, [0, 2, 1, 3]), shape)
    return (out, *presents)


def check_mha(model: OnnxModel, node: Node) -> None:
    at = node.attrs
    if int(at.get("num_heads", 0)) < 1:
        raise Unsupported(f"num_heads={int(at.get('num_heads', 0))} must be positive")
    if int(at.get("unidirectional", 0)) not in (0, 1):
        raise Unsupported(f"unidirectional={int(at['unidirectional'])} must be 0 or 1")
    ins = _ins(node, 10)
    for i, what in ((3, "bias"), (4, "key_padding_mask"), (6, "past_key"), (7, "past_value"),
                    (8, "past_sequence_length"), (9, "cache_indirection")):
        if ins[i]:
            raise Unsupported(f"input {what} {ins[i]!r} is not supported")
    if not ins[1] or not ins[2]:
        raise Unsupported("key and value inputs are required (packed qkv in query is not supported)")
    if any(_ins_out(node, 4)[1:]):
        raise Unsupported("outputs present_key, present_value and qk are not supported")


def standin_mha(node: Node) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """The output has the query's shape (every form `check_mha` and `attend` accept has value heads
    as wide as the query's)."""
    return [helper.make_node("Identity", node.inputs[:1], node.outputs[:1], name=node.name)], []


def lift_mha(lifter: Lifter, node: Node, args: list) -> Term:
    at = node.attrs
    heads = int(at["num_heads"])
    if any(len(lifter.shape(name)) != 3 for name in node.inputs[:3]):
        raise Unsupported("query, key and value must be 3-D [batch, seq, hidden]")
    q = _head_split(lifter, args[0], "query", heads)
    k = _head_split(lifter, args[1], "key", heads)
    v = _head_split(lifter, args[2], "value", heads)
    bias = args[5] if len(args) > 5 else None
    mask = _mask(lifter, node, bias, _ins(node, 6)[5], bool(int(at.get("unidirectional", 0))), k.shape[2], False)
    if mask is None:
        raise Unsupported("unidirectional=0 without attention_bias is bidirectional attention, which is not "
                          "supported")
    scale = float(at.get("scale", 0.0)) or None
    out = attend(lifter, node.name, q, k, v, mask, scale, None)
    return V.reshape(V.transpose(out, [0, 2, 1, 3]), lifter.shape(node.outputs[0]))


register(Converter("", "Attention", lift_onnx, since=23, check=check_onnx, roles=roles_onnx))
register(Converter("com.microsoft", "MultiHeadAttention", lift_mha, check=check_mha, standin=standin_mha))
