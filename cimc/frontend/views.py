"""Strided views: how an N-D ONNX tensor maps onto a 2-D IR matrix, without copying.

Exporters reshape and transpose activations freely (`[1, seq, H*hd]` -> `[1, H, seq, hd]`, GQA's
unsqueeze/expand/reshape). The frontend follows such layout ops symbolically: an ONNX tensor is a
`View` of an IR value `base` of shape `[rows, cols]`, where ONNX index `i` lives at

    row = r0 + sum_a (i_a // rep_a) * rs_a,   col = c0 + sum_a (i_a // rep_a) * cs_a

A broadcast axis has both strides 0; GQA's repeated KV heads are an axis with `rep` = group size.
Layout ops that leave this form raise `ViewError` and the node is reported as unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

from cimc.ir.core import Value


class ViewError(ValueError):
    """A layout op that a strided view cannot express."""


@dataclass(frozen=True)
class Axis:
    size: int
    rs: int = 0
    cs: int = 0
    rep: int = 1

    @property
    def broadcast(self) -> bool:
        return self.rs == 0 and self.cs == 0


@dataclass(frozen=True)
class View:
    base: Value
    axes: tuple[Axis, ...]
    r0: int = 0
    c0: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    def core(self) -> list[Axis]:
        """Axes of size > 1."""
        return [a for a in self.axes if a.size != 1]


def base_axes(base: Value, rows: int) -> list[Axis]:
    """The axes of a `[rows, cols]` (or `[rows]`) base in row-major order."""
    shape = base.type.shape
    return [Axis(rows, 1, 0)] + ([Axis(int(shape[1]), 0, 1)] if len(shape) == 2 else [])


def canonical(base: Value, rows: int, onnx_rank: int) -> View:
    """The view of a `[rows, cols]` (or `[rows]`) base as an ONNX `[1, .., rows, cols]` tensor."""
    axes = base_axes(base, rows)
    lead = onnx_rank - len(axes)
    if lead < 0:
        raise ViewError(f"rank {onnx_rank} is too small for {base.type}")
    return View(base, tuple([Axis(1)] * lead + axes))


def is_canonical(v: View, rows: int) -> bool:
    """True if the view enumerates its base exactly in row-major order."""
    return v.r0 == 0 and v.c0 == 0 and v.core() == [a for a in base_axes(v.base, rows) if a.size != 1]


def transpose(v: View, perm: list[int]) -> View:
    return replace(v, axes=tuple(v.axes[p] for p in perm))


def _axes_in(axes: list[int], rank: int, op: str) -> set[int]:
    """`axes` of a rank-`rank` tensor, made non-negative; each must be in range, and once."""
    if any(not -rank <= a < rank for a in axes) or len({a % rank for a in axes}) != len(axes):
        raise ViewError(f"{op} axes {axes} are not distinct axes of a rank-{rank} tensor")
    return {a % rank for a in axes}


def unsqueeze(v: View, axes: list[int]) -> View:
    rank = len(v.axes) + len(axes)
    _axes_in(axes, rank, "Unsqueeze")
    out = list(v.axes)
    for a in sorted(x + rank if x < 0 else x for x in axes):
        out.insert(a, Axis(1))
    return replace(v, axes=tuple(out))


def squeeze(v: View, axes: list[int] | None) -> View:
    rank = len(v.axes)
    drop = _axes_in(axes, rank, "Squeeze") if axes else {i for i, a in enumerate(v.axes) if a.size == 1}
    if any(v.axes[a].size != 1 for a in drop):
        raise ViewError("Squeeze of an axis whose size is not 1")
    return replace(v, axes=tuple(a for i, a in enumerate(v.axes) if i not in drop))


def expand(v: View, shape: tuple[int, ...]) -> View:
    axes = [Axis(1)] * (len(shape) - len(v.axes)) + list(v.axes)
    out = []
    for a, s in zip(axes, shape, strict=True):
        if a.size == s:
            out.append(a)
        elif a.size == 1:
            out.append(Axis(s))
        else:
            raise ViewError(f"Expand from {v.shape} to {shape}")
    return replace(v, axes=tuple(out))


def slice_axis(v: View, axis: int, start: int, length: int) -> View:
    a = v.axes[axis]
    if a.rep != 1:
        raise ViewError("Slice of a repeated (GQA) axis")
    axes = list(v.axes)
    axes[axis] = replace(a, size=length)
    return replace(v, axes=tuple(axes), r0=v.r0 + start * a.rs, c0=v.c0 + start * a.cs)


def _merge(group: list[Axis]) -> Axis:
    cur = group[-1]
    for a in reversed(group[:-1]):
        if cur.broadcast and a.broadcast:
            cur = Axis(a.size * cur.size)
        elif cur.broadcast and a.rep == 1:
            cur = Axis(a.size * cur.size, a.rs, a.cs, cur.size)
        elif a.rep == 1 and cur.rep == 1 and (a.rs, a.cs) == (cur.rs * cur.size, cur.cs * cur.size):
            cur = Axis(a.size * cur.size, cur.rs, cur.cs)
        else:
            raise ViewError("Reshape merges axes that are not contiguous")
    return cur


def _split(a: Axis, sizes: list[int]) -> list[Axis]:
    out: list[Axis] = []
    for d in reversed(sizes[1:]):
        if a.broadcast:
            inner, a = Axis(d), Axis(a.size // d)
        elif a.rep == 1:
            inner, a = Axis(d, a.rs, a.cs), Axis(a.size // d, a.rs * d, a.cs * d)
        elif d % a.rep == 0:
            k = d // a.rep
            inner, a = Axis(d, a.rs, a.cs, a.rep), Axis(a.size // d, a.rs * k, a.cs * k)
        elif a.rep % d == 0:
            inner, a = Axis(d), Axis(a.size // d, a.rs, a.cs, a.rep // d)
        else:
            raise ViewError("Reshape splits a repeated (GQA) axis unevenly")
        if inner.rep >= inner.size:  # every index maps to the same place: a broadcast
            inner = Axis(inner.size)
        out.append(inner)
    out.append(a)
    return list(reversed(out))


def reshape(v: View, shape: tuple[int, ...]) -> View:
    """Re-view with a new shape (same element count), grouping axes whose products match."""
    if prod(v.shape) != prod(shape):
        raise ViewError(f"Reshape from {v.shape} to {shape} changes the element count")
    src = v.core()
    dst = [d for d in shape if d != 1]
    out: list[Axis] = []
    i = j = 0
    while i < len(src):
        gs, ps = [src[i]], src[i].size
        gd, pd = [dst[j]], dst[j]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                gs.append(src[i])
                ps *= src[i].size
                i += 1
            else:
                gd.append(dst[j])
                pd *= dst[j]
                j += 1
        out += _split(_merge(gs), gd)
    it = iter(out)
    return replace(v, axes=tuple(Axis(1) if d == 1 else next(it) for d in shape))
