"""`com.microsoft:GroupQueryAttention` (onnxruntime-genai exports) -> `rope` + KV cache + `attention`.

Accepted form (what the genai model builder emits for a decoder): packed `query` [1, seq,
(num_heads + 2 kv_num_heads) * head_dim] from one projection, `key` and `value` empty, or separate
`query`, `key` and `value` activations (Qwen3: the builder norms q and k between the split and
the attention);
`past_key`/`past_value` graph inputs [batch, kv_heads, past, head_dim] whose presents are graph
outputs; `seqlens_k` and `total_sequence_length` computed from the attention mask (which, like an
optimum export's mask, is assumed all ones with batch 1 and checked at run time, so they must fold
to past + seq - 1 and past + seq); `do_rotary = 1` with `cos_cache`/`sin_cache` initializers
[max_positions, head_dim / 2] in the rotate-half (non-interleaved) form.

The packed projection is split into its q, k and v column blocks (the producing linear, and a
constant bias add after it, become one per block over the same input: its float or integer
weights' `cols`, see cimc.ir.quant), so each block is a whole activation. Then q and k get `rope` with
tables [cos, cos] and [sin, sin] (x*cos + rotate_half(x)*sin per head is onnxruntime's
non-interleaved rotary), k and v are appended to the caches (`kv_append`: the presents hold
positions 0 .. past+seq-1), and `attention` runs causally over the caches with the node's
`scale` (0: 1/sqrt(head_dim)), `local_window_size` L > 0 as a sliding window of L keys (-1:
none) and `softcap` > 0 as the attention's soft cap (0: none).

`sliding_window_cache = 1` (the genai builder's sliding-window layers, past `past_sliding_length`):
past and present are a buffer of L slots holding the last L positions, oldest first (fewer
positions fill the first slots; onnxruntime leaves the rest undefined), which the genai runtime
feeds as L zero slots before the first run. cimc keeps such a layer's whole cache, like any
other layer's (max_ctx positions; the window mask hides the old keys), and a run reads and writes
the buffer as the last L positions of it (runtime.interpreter).

Refused, with the value named: a negative `softcap`, `local_window_size` 0 or below -1,
`sliding_window_cache` without a window, a window buffer whose length is not L or that another node reads,
`rotary_interleaved = 1`, `do_rotary = 0`, `smooth_softmax`, a key without a value or the reverse,
position ids, attention bias or head sinks, caches that are not graph inputs and outputs,
rotary tables that are not initializers of the right shape or shorter than `--max-ctx`.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from cimc.frontend.converters import CacheRoles, Converter, Unsupported, register
from cimc.frontend.lift import Lifter, Static, Term, View
from cimc.frontend.model import Node, OnnxModel
from cimc.frontend.ops.columns import split_columns
from cimc.frontend.views import Axis
from cimc.ir.core import Value


def _ints(node: Node) -> tuple[int, int]:
    at = node.attrs
    for name in ("num_heads", "kv_num_heads"):
        if name not in at:
            raise Unsupported(f"attribute {name} is missing")
    heads, kvh = int(at["num_heads"]), int(at["kv_num_heads"])
    if heads < 1 or kvh < 1 or heads % kvh:
        raise Unsupported(f"num_heads={heads} must be a positive multiple of kv_num_heads={kvh}")
    return heads, kvh


def check(model: OnnxModel, node: Node) -> int:
    """Attributes, inputs and initializer metadata; returns head_dim (from the rotary tables)."""
    _ints(node)
    at = node.attrs
    if not float(at.get("softcap", 0.0)) >= 0.0:
        raise Unsupported(f"softcap={float(at['softcap'])} must be 0 (none) or positive")
    window = int(at.get("local_window_size", -1))
    if window == 0 or window < -1:
        raise Unsupported(f"local_window_size={window} must be -1 (no sliding window) "
                          "or the number of keys a query sees, itself included (onnxruntime attends to none at 0)")
    slide = int(at.get("sliding_window_cache", 0))
    if slide not in (0, 1) or (slide and window < 1):
        raise Unsupported(f"sliding_window_cache={slide} with local_window_size={window} is not supported "
                          "(only 0, or 1 with a window)")
    if int(at.get("rotary_interleaved", 0)) != 0:
        raise Unsupported(f"rotary_interleaved={int(at['rotary_interleaved'])} is not supported (only 0)")
    if int(at.get("do_rotary", 0)) != 1:
        raise Unsupported(f"do_rotary={int(at.get('do_rotary', 0))} is not supported (only 1: rotary inside)")
    for name in ("smooth_softmax", "qk_output"):  # 0 or -1: off
        if int(at.get(name, 0)) not in (0, -1):
            raise Unsupported(f"{name}={int(at[name])} is not supported")
    if len(node.outputs) > 3 and any(node.outputs[3:]):
        raise Unsupported(f"output {node.outputs[3]!r} (the QK matrix) is not supported")
    ins = (node.inputs + [""] * 12)[:12]
    _query, key, value, past_k, past_v, seqlens, total, cos, sin = ins[:9]
    if bool(key) != bool(value):
        raise Unsupported(f"key {key!r} and value {value!r} must be given both (separate q, k, v) or neither "
                          "(packed qkv)")
    for i, what in ((9, "position_ids"), (10, "attention_bias"), (11, "head_sink")):
        if ins[i]:
            raise Unsupported(f"input {what} {ins[i]!r} is not supported")
    outs = ([*node.outputs, "", "", ""])[:3]
    for past, present, what in ((past_k, outs[1], "key"), (past_v, outs[2], "value")):
        if past not in model.inputs or present not in model.outputs:
            raise Unsupported(f"past_{what} {past!r} and present_{what} {present!r} must be a graph input and "
                              "output (the KV cache)")
        if slide and (len(model.consumers.get(past, [])) > 1 or model.consumers.get(present)):
            raise Unsupported(f"the window buffers past_{what} {past!r} and present_{what} {present!r} must be "
                              "read by this node only")
    if not (seqlens and total):
        raise Unsupported("inputs seqlens_k and total_sequence_length are required")
    dims = []
    for name, what in ((cos, "cos_cache"), (sin, "sin_cache")):
        t = model.initializers.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            raise Unsupported(f"{what} {name!r} must be a float32 [positions, head_dim/2] initializer")
        dims.append(list(t.dims))
    if dims[0] != dims[1]:
        raise Unsupported(f"cos_cache {dims[0]} and sin_cache {dims[1]} differ in shape")
    return 2 * dims[0][1]


def window_slots(node: Node) -> int:
    """L for a layer whose past and present are window buffers of L slots, else 0."""
    return int(node.attrs.get("local_window_size", -1)) if int(node.attrs.get("sliding_window_cache", 0)) else 0


def roles(model: OnnxModel, node: Node) -> CacheRoles:
    """The past/present pairs, the mask inputs seqlens_k and total_sequence_length come from, the
    head_dim a symbolic cache dimension stands for, and a window layer's buffers (their length
    symbol is L)."""
    ins = (node.inputs + [""] * 7)[:7]
    outs = ([*node.outputs, "", "", ""])[:3]
    caches = {p: o for p, o in ((ins[3], outs[1]), (ins[4], outs[2])) if p in model.inputs and o}
    lengths = {n for n in ins[5:7] if n}
    masks = sorted({i for nd in model.upstream(lengths) for i in nd.inputs if i in model.inputs
                    and model.inputs[i].type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)})
    dims: dict[str, int] = {}
    windows: dict[str, int] = {}
    try:
        hd = check(model, node)
    except Unsupported:
        return CacheRoles(caches, masks, dims)
    slots = window_slots(node)
    outputs = {o.name: o for o in model.proto.graph.output}
    for past, present in caches.items():
        d = model.inputs[past].type.tensor_type.shape.dim
        if len(d) == 4 and d[3].dim_param:
            dims[d[3].dim_param] = hd
        if slots:
            windows |= {past: slots, present: slots}
            dims |= {x[2].dim_param: slots for x in (d, outputs[present].type.tensor_type.shape.dim)
                     if len(x) == 4 and x[2].dim_param}
    return CacheRoles(caches, masks, dims, windows)


def lazy(model: OnnxModel, node: Node) -> list[str]:
    return [n for n in node.inputs[7:9] if n]


def standin(node: Node) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """output: Gather(query, [heads*hd] indices, -1); presents: Concat(past, Transpose(Gather(query,
    [kv_heads, hd] indices, -1))) along the positions, or the past itself for window buffers.
    head_dim is twice the rotary table's width, so the index tensors are built from cos_cache rows
    (Concat), for shape inference to size."""
    heads, kvh = _ints(node)
    ins = (node.inputs + [""] * 9)[:9]
    outs = ([*node.outputs, "", "", ""])[:3]
    cos, pre = ins[7], f"{node.name}/standin"
    scalar, one = f"{pre}_scalar", f"{pre}_one"
    extra = [helper.make_tensor_value_info(scalar, TensorProto.INT64, []),
             helper.make_tensor_value_info(one, TensorProto.INT64, [1])]

    def mk(op: str, inputs: list[str], out: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [out], name=out, **attrs)

    nodes = [mk("Gather", [cos, scalar], f"{pre}_r", axis=0),  # [hd/2]
             mk("Concat", [f"{pre}_r"] * (2 * heads), f"{pre}_qf", axis=0),  # [heads*hd]
             mk("Cast", [f"{pre}_qf"], f"{pre}_qi", to=TensorProto.INT64),
             mk("Gather", [ins[0], f"{pre}_qi"], outs[0], axis=-1),
             mk("Gather", [cos, one], f"{pre}_r2", axis=0),  # [1, hd/2]
             mk("Concat", [f"{pre}_r2"] * 2, f"{pre}_hd", axis=1),  # [1, hd]
             mk("Concat", [f"{pre}_hd"] * kvh, f"{pre}_kvf", axis=0),  # [kvh, hd]
             mk("Cast", [f"{pre}_kvf"], f"{pre}_kvi", to=TensorProto.INT64),
             mk("Gather", [ins[0], f"{pre}_kvi"], f"{pre}_new", axis=-1),  # [1, seq, kvh, hd]
             mk("Transpose", [f"{pre}_new"], f"{pre}_newt", perm=[0, 2, 1, 3])]
    for past, present in ((ins[3], outs[1]), (ins[4], outs[2])):
        if present:
            nodes.append(mk("Identity", [past], present) if window_slots(node) else
                         mk("Concat", [past, f"{pre}_newt"], present, axis=2))
    return nodes, extra


def _table(lifter: Lifter, name: str) -> Value:
    half = np.asarray(lifter.weights(name), np.float32)
    if half.shape[0] < lifter.max_ctx:
        raise Unsupported(f"{name!r} has {half.shape[0]} positions, fewer than --max-ctx {lifter.max_ctx}")
    full = np.concatenate([half, half], axis=1)
    return lifter.const(Static(name, full, None, True), full, True)


def window_and_softcap(node: Node) -> dict:
    """The IR attention's `window` and `softcap` for onnxruntime's `local_window_size` L (-1: none)
    and `softcap` (0: none). onnxruntime 1.32's CPU kernel lets the query at p see keys p-L+1 .. p
    (L keys, itself included: measured, tests/test_exporters.py), so window = L."""
    window, softcap = int(node.attrs.get("local_window_size", -1)), float(node.attrs.get("softcap", 0.0))
    return ({"window": window} if window > 0 else {}) | ({"softcap": float(np.float32(softcap))} if softcap else {})


def _length(term: Term, name: str, want: tuple[int, int]) -> None:
    if not isinstance(term, Static):
        raise Unsupported(f"{name} does not fold to a constant: the attention mask must be all ones (batch 1)")
    for value, w in ((term.value, want[0]), (term.value2, want[1])):
        if value is not None and np.asarray(value).ravel().tolist() != [w]:
            raise Unsupported(f"{name} is {np.asarray(value).ravel().tolist()}, not [{w}]: the attention mask must "
                              "be all ones with batch 1")


def _qkv(lifter: Lifter, node: Node, args: list, heads: int, kvh: int, hd: int) -> tuple[Value, Value, Value]:
    """q, k and v as whole activations: the separate inputs, or the packed query's column blocks."""
    separate = bool(node.inputs[1:2] and node.inputs[1])
    widths = (heads * hd, kvh * hd, kvh * hd)
    got = []
    for i, what in enumerate(("query", "key", "value") if separate else ("query",)):
        x = lifter.need_view(args[i], what)
        if not lifter.is_plain(x):
            raise Unsupported(f"{what} {node.inputs[i]!r} is not a [tokens, features] activation")
        got.append(x.base)
    if separate:
        for x, what, n in zip(got, ("query", "key", "value"), widths, strict=True):
            if int(x.type.shape[1]) != n:
                raise Unsupported(f"{what} has {int(x.type.shape[1])} features, not {n} (heads * head_dim)")
        return got[0], got[1], got[2]
    p = got[0]
    cols = int(p.type.shape[1])
    if cols != sum(widths):
        raise Unsupported(f"query has {cols} features; packed qkv needs (num_heads + 2*kv_num_heads) * head_dim "
                          f"= {sum(widths)}")
    q, k, v = (split_columns(lifter, p, c0, c1, node.name) for c0, c1 in
               ((0, widths[0]), (widths[0], widths[0] + widths[1]), (widths[0] + widths[1], cols)))
    return q, k, v


def lift(lifter: Lifter, node: Node, args: list) -> tuple[Term, ...]:
    hd = check(lifter.model, node)
    heads, kvh = _ints(node)
    q, k, v = _qkv(lifter, node, args, heads, kvh, hd)
    ctx = lifter.n + lifter.past
    _length(args[5], "seqlens_k", (ctx - 1, ctx))
    _length(args[6], "total_sequence_length", (ctx, ctx + 1))
    slots = window_slots(node)
    caches = []
    for term, name in ((args[3], node.inputs[3]), (args[4], node.inputs[4])):
        if slots and lifter.shape(name)[2] != slots:
            raise Unsupported(f"window buffer {name!r} has {lifter.shape(name)[2]} slots, not local_window_size "
                              f"= {slots}")
        if not (isinstance(term, View) and term.base.owner is not None and term.base.owner.name == "kv_cache"):
            raise Unsupported(f"past {name!r} is not a KV cache input")
        if term.base.type.shape[1] != kvh * hd:
            raise Unsupported(f"past {name!r} has {term.base.type.shape[1]} columns, not kv_num_heads*head_dim "
                              f"= {kvh * hd}")
        caches.append(term.base)
    cos, sin = (_table(lifter, name) for name in node.inputs[7:9])
    q = lifter.op("rope", [q, cos, sin], node.name, {"head_dim": hd})
    k = lifter.op("rope", [k, cos, sin], node.name, {"head_dim": hd})
    kc = lifter.op("kv_append", [caches[0], k], node.name)
    vc = lifter.op("kv_append", [caches[1], v], node.name)
    scale = float(node.attrs.get("scale", 0.0)) or 1.0 / math.sqrt(hd)
    attrs = {"heads": heads, "kv_heads": kvh, "head_dim": hd, "scale": float(np.float32(scale)), "causal": True}
    attrs |= window_and_softcap(node)
    out = lifter.op("attention", [q, kc, vc], node.name, attrs)
    present = (Axis(1), Axis(kvh, 0, hd), Axis(slots or ctx, 1, 0), Axis(hd, 0, 1))
    return lifter.view_of(out, lifter.shape(node.outputs[0])), View(kc, present), View(vc, present)


register(Converter("com.microsoft", "GroupQueryAttention", lift, check=check, lazy=lazy, standin=standin, roles=roles))
