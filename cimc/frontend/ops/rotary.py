"""Rotary embeddings as single nodes -> `rope`.

- `RotaryEmbedding(X, cos_cache, sin_cache, position_ids?)` (ONNX, opset 23; what torch's
  exporter fuses at opset 23);
- `com.microsoft:RotaryEmbedding(input, position_ids, cos_cache, sin_cache)` (onnxruntime).

X is [batch, heads, seq, head_dim] (a head-split view of a whole activation) or [batch, seq,
hidden] with `num_heads`. The first `rotary_embedding_dim` entries of each head (0: all) are
rotated in the rotate-half form, x1*cos - x2*sin | x2*cos + x1*sin over the halves x1, x2: the
IR's `rope` with tables [cos, cos] and [sin, sin] (and `rotary_dim`); the rest pass through.
The caches are either one row per token of this run ([batch, seq, rd/2], no position ids: what
the exporter computes from the positions) or one row per position ([max_positions, rd/2]) indexed
by position ids that must be the token positions (past .. past+seq-1).

Refused, with the attribute and value: `interleaved = 1` (rope rotates halves), the contrib op's
`is_packed_batching = 1` and a `scale` other than 1, a `num_heads` that does not divide a 3-D
input; position ids that are not the token positions; caches shorter than `--max-ctx` or that
are not a function of the position.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from cimc.frontend.converters import Converter, Unsupported, register
from cimc.frontend.lift import Lazy, Lifter, Static, Term, View
from cimc.frontend.model import Node, OnnxModel
from cimc.frontend.rules.terms import heads_base
from cimc.ir.core import Value


def _check(node: Node, contrib: bool) -> None:
    at = node.attrs
    if int(at.get("interleaved", 0)) != 0:
        raise Unsupported(f"interleaved={int(at['interleaved'])} is not supported (rope rotates halves: only 0)")
    if contrib and int(at.get("is_packed_batching", 0)) != 0:
        raise Unsupported(f"is_packed_batching={int(at['is_packed_batching'])} is not supported (only 0)")
    if contrib and float(at.get("scale", 1.0)) != 1.0:
        raise Unsupported(f"scale={float(at['scale'])} is not supported (only 1)")
    if int(at.get("rotary_embedding_dim", 0)) < 0 or int(at.get("num_heads", 0)) < 0:
        raise Unsupported(f"rotary_embedding_dim={int(at.get('rotary_embedding_dim', 0))} and "
                          f"num_heads={int(at.get('num_heads', 0))} must not be negative")


def check_onnx(model: OnnxModel, node: Node) -> None:
    _check(node, contrib=False)


def check_contrib(model: OnnxModel, node: Node) -> None:
    _check(node, contrib=True)


def standin_contrib(node: Node) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """The output has the input's shape."""
    return [helper.make_node("Identity", node.inputs[:1], node.outputs[:1], name=node.name)], []


def _positions(lifter: Lifter, term: Term, name: str) -> None:
    """Position ids must be the token positions at every binding ([batch, seq], or the contrib
    op's [1] offset: the first position)."""
    if not isinstance(term, Static):
        raise Unsupported(f"position_ids {name!r} must fold to the token positions")
    for value, n in ((term.value, lifter.n), (term.value2, lifter.n + 1)):
        if value is None:
            continue
        got = np.asarray(value).ravel().tolist()
        want = list(range(lifter.past, lifter.past + n))
        if got != want and got != want[:1]:
            raise Unsupported(f"position_ids {name!r} are {got}, not the token positions {want}")


def _tables(lifter: Lifter, cos: Term, sin: Term, names: list[str], rd: int, by_position: bool) -> list[Value]:
    """The [ctx, rd] rope tables [c, c] for each half-width cache c."""
    out = []
    for term, name in zip((cos, sin), names, strict=True):
        if isinstance(term, Lazy):  # an initializer kept on disk
            term = Static(name, np.asarray(lifter.weights(term.init), np.float32), None, True)
        if not isinstance(term, Static):
            raise Unsupported(f"rotary cache {name!r} must be constant (folded from the positions)")
        arr = np.asarray(term.value, np.float32)
        if arr.shape[-1] * 2 != rd:
            raise Unsupported(f"rotary cache {name!r} has {arr.shape[-1]} columns, not rotary_embedding_dim/2 = "
                              f"{rd // 2}")
        if by_position:
            if arr.ndim != 2 or arr.shape[0] < lifter.max_ctx:
                raise Unsupported(f"rotary cache {name!r} {list(arr.shape)} must be [positions, rd/2] with at least "
                                  f"--max-ctx {lifter.max_ctx} positions")
            table = np.concatenate([arr, arr], axis=1)
        else:
            if arr.ndim != 3 or arr.shape[0] != 1:
                raise Unsupported(f"rotary cache {name!r} {list(arr.shape)} is not [1, seq, rd/2] (batch 1)")
            table = lifter.position_table(term, _doubled)
        out.append(lifter.const(term, np.ascontiguousarray(table), True))
    return out


def _doubled(a: np.ndarray) -> np.ndarray:
    """[1, seq, rd/2] per-token cache rows -> [seq, rd] rope table rows [c, c]."""
    a = np.asarray(a, np.float32).reshape(-1, np.shape(a)[-1])
    return np.concatenate([a, a], axis=1)


def _rope(lifter: Lifter, node: Node, x_term: Term, cos: Term, sin: Term, pos: Term | None,
          names: list[str]) -> View:
    x = lifter.need_view(x_term, "input")
    at = node.attrs
    if len(x.shape) == 4:
        base, hd = heads_base(lifter, x, "RotaryEmbedding input")
        if hd != x.shape[-1]:
            raise Unsupported("RotaryEmbedding input is a part of each head, not [batch, heads, seq, head_dim]")
    elif len(x.shape) == 3 and lifter.is_plain(x):
        base, heads = x.base, int(at.get("num_heads", 0))
        cols = int(base.type.shape[1])
        if heads < 1 or cols % heads:
            raise Unsupported(f"num_heads={heads} must divide a 3-D input's {cols} features")
        hd = cols // heads
    else:
        raise Unsupported("RotaryEmbedding input is neither [batch, heads, seq, head_dim] nor a whole "
                          "[batch, seq, hidden] activation")
    rd = int(at.get("rotary_embedding_dim", 0)) or hd
    if rd > hd or rd % 2:
        raise Unsupported(f"rotary_embedding_dim={rd} must be even and at most head_dim {hd}")
    if pos is not None:
        _positions(lifter, pos, names[2])
    tables = _tables(lifter, cos, sin, names[:2], rd, by_position=pos is not None)
    out = lifter.op("rope", [base, *tables], node.name, {"head_dim": hd} | ({"rotary_dim": rd} if rd != hd else {}))
    return View(out, x.axes) if len(x.shape) == 4 else lifter.view_of(out, lifter.shape(node.outputs[0]))


def lift_onnx(lifter: Lifter, node: Node, args: list) -> Term:
    x, cos, sin, pos = [*args, None][:4]
    names = [*node.inputs, ""][:4]
    return _rope(lifter, node, x, cos, sin, pos, names[1:])


def lift_contrib(lifter: Lifter, node: Node, args: list) -> Term:
    x, pos, cos, sin = args[:4]
    return _rope(lifter, node, x, cos, sin, pos, [node.inputs[2], node.inputs[3], node.inputs[1]])


register(Converter("", "RotaryEmbedding", lift_onnx, since=23, check=check_onnx))
register(Converter("com.microsoft", "RotaryEmbedding", lift_contrib, check=check_contrib, standin=standin_contrib))
