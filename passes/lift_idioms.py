"""`lift-idioms`: recognise decoder idioms in elementwise IR and replace them by fused ops.

The frontend lowers what it does not recognise structurally (attention, RoPE) to generic ops;
this pass applies the IR-level idiom rules (level "ir" in `cimc.ir.rules`, defined here) in
registry order, each over every op it is anchored at:

  bias       linear(x, w) + b  ->  linear(x, w, b)
  rms_norm   w * (x * 1/sqrt(mean(x*x) + eps))      (rsqrt, sqrt+reciprocal, either operand order)
  swiglu     silu(g) * u, with silu = g * sigmoid(g)
  silu       g * sigmoid(g) (when not part of a swiglu)
  gelu_tanh  0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  ->  gelu(x) {approximate = "tanh"}
             (exporters below opset 20 spell Gemma's and GPT-2's tanh GELU out; the 0.5 on x or on the product)

A candidate that almost matches (say, an intermediate also used elsewhere) is left alone and
the reason goes to the pass notes. Finally every op gets a `layer` label (embed, layer0..N-1,
head), found from where each attention block's input norm starts, for per-layer reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from cimc.ir.core import Module, Op, Rewriter, Value
from cimc.ir.ops import traits
from cimc.ir.rules import NoMatch, Rule, register_rule, rules
from passes.manager import PassContext, register


def _prod(v: Value, name: str) -> Op | None:
    return v.owner if v.owner is not None and v.owner.name == name else None


def _vector(v: Value, cols: object) -> bool:
    return v.owner is not None and traits(v.owner).constant and v.type.shape == (cols,)


def _single_use(v: Value) -> bool:
    return len(v.uses) == 1


@register
@dataclass(frozen=True)
class LiftIdiomsPass:
    name: ClassVar[str] = "lift-idioms"

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        for rule in rules("ir"):
            for op in list(module.ops):
                if op in module.ops and op.name == rule.anchor:
                    got = rule.match(rw, op)
                    if isinstance(got, NoMatch):
                        ctx.notes.append(f"{rule.name}: {op.loc}: {got.reason}")
        _dead_code(module, rw)
        assign_layers(module, rw)


# ---- rules -------------------------------------------------------------------------------


def _bias(rw: Rewriter, add: Op) -> Op | NoMatch | None:
    for lin_v, b in (add.operands, add.operands[::-1]):
        lin = _prod(lin_v, "linear")
        if lin is None or len(lin.operands) != 2 or not _vector(b, lin_v.type.shape[1]):
            continue
        if not _single_use(lin_v):
            return NoMatch("linear result is used elsewhere; bias not fused")
        new = rw.create("linear", [*lin.operands, b], [lin_v.type], dict(lin.attrs), add.loc, before=add)
        rw.replace_uses(add.result, new.result)
        rw.erase_many([add, lin])
        return new
    return None


def _rms_norm(rw: Rewriter, op: Op) -> Op | NoMatch | None:
    for w, y in (op.operands, op.operands[::-1]):
        if not _vector(w, y.type.shape[-1]):
            continue
        m = _match_norm(y)
        if isinstance(m, NoMatch):
            return m
        x, eps, inner = m
        new = rw.create("rms_norm", [x, w], [op.result.type], {"eps": eps}, op.loc, before=op)
        rw.replace_uses(op.result, new.result)
        rw.erase_many([op, *inner])
        return new
    return None


def _match_norm(y: Value) -> tuple[Value, float, list[Op]] | NoMatch:
    scale = _prod(y, "mul")
    if scale is None:
        return NoMatch("not x * rsqrt(...)")
    for x, r in (scale.operands, scale.operands[::-1]):
        inner: list[Op] = [scale]
        rs = _prod(r, "rsqrt")
        if rs is None:
            rec = _prod(r, "reciprocal")
            rs = _prod(rec.operands[0], "sqrt") if rec is not None else None
            if rs is None:
                continue
            inner.append(rec)
        inner.append(rs)
        aff = _prod(rs.operands[0], "affine")
        if aff is None or aff.attrs["alpha"] != 1.0:
            return NoMatch("no `mean + eps` under the square root")
        mean = _prod(aff.operands[0], "reduce_mean")
        sq = _prod(mean.operands[0], "mul") if mean is not None else None
        if sq is None or sq.operands[0] is not x or sq.operands[1] is not x:
            return NoMatch("the mean is not of x*x for the same x")
        inner += [aff, mean, sq]
        if any(not _single_use(o.result) for o in inner):
            return NoMatch("an intermediate of the norm is used elsewhere")
        return x, float(aff.attrs["beta"]), inner
    return NoMatch("not x * rsqrt(...)")


def _silu_of(op: Op) -> tuple[Value, Op] | None:
    """(g, the sigmoid) if `op` is g * sigmoid(g)."""
    for g, s in (op.operands, op.operands[::-1]):
        sig = _prod(s, "sigmoid")
        if sig is not None and sig.operands[0] is g:
            return g, sig
    return None


def _swiglu(rw: Rewriter, op: Op) -> Op | None:
    """Anchored at the silu's mul, g * sigmoid(g), whose one user multiplies it by u."""
    silu = _silu_of(op)
    users = op.result.users
    if silu is None or len(users) != 1 or users[0].name != "mul":
        return None
    (g, sig), mul = silu, users[0]
    a, b = mul.operands
    up = b if a is op.result else a
    if up is op.result or up.type != g.type or not _single_use(sig.result):
        return None
    new = rw.create("swiglu", [g, up], [mul.result.type], {}, mul.loc, before=mul)
    rw.replace_uses(mul.result, new.result)
    rw.erase_many([mul, op, sig])
    return new


def _silu(rw: Rewriter, op: Op) -> Op | None:
    silu = _silu_of(op)
    if silu is None:
        return None
    g, sig = silu
    new = rw.create("silu", [g], [op.result.type], {}, op.loc, before=op)
    rw.replace_uses(op.result, new.result)
    rw.erase_many([op, sig] if _single_use(sig.result) else [op])
    return new


#: The tanh GELU's constants: tanh(K * (x + C * x^3)).
_GELU_K, _GELU_C = math.sqrt(2 / math.pi), 0.044715


def _scaling(v: Value, alpha: float) -> Op | None:
    """The op making `v` if it is affine(x) {alpha (to float32 precision), beta = 0}."""
    aff = _prod(v, "affine")
    ok = aff is not None and aff.attrs["beta"] == 0.0 and abs(aff.attrs["alpha"] - alpha) <= 1e-6 * alpha
    return aff if ok else None


def _gelu_tanh(rw: Rewriter, th: Op) -> Op | NoMatch | None:
    """Anchored at the tanh: K * (x + C * x*x*x) below it, (1 + tanh) * x * 0.5 above it."""
    inner = _scaling(th.operands[0], _GELU_K)
    add = _prod(inner.operands[0], "add") if inner is not None else None
    if add is None:
        return None
    for x, t in (add.operands, add.operands[::-1]):
        cube_c = _scaling(t, _GELU_C)
        cube = _prod(cube_c.operands[0], "mul") if cube_c is not None else None
        sq = next((_prod(v, "mul") for v in cube.operands if _prod(v, "mul")), None) if cube is not None else None
        if sq is not None and list(sq.operands) == [x, x] and x in cube.operands:
            break
    else:
        return NoMatch("tanh(sqrt(2/pi) * (x + 0.044715 * x^3)) without x*x*x")
    chain = [th, inner, add, cube_c, cube, sq]
    one_plus = th.result.users[0] if _single_use(th.result) else None
    if one_plus is None or one_plus.name != "affine" or (one_plus.attrs["alpha"], one_plus.attrs["beta"]) != (1, 1):
        return NoMatch("the tanh is not used once, as 1 + tanh")
    prod = one_plus.result.users[0] if _single_use(one_plus.result) else None
    if prod is None or prod.name != "mul":
        return NoMatch("1 + tanh is not multiplied by x")
    other = next((v for v in prod.operands if v is not one_plus.result), None)
    half = _scaling(other, 0.5) if other is not x else None
    if half is not None and half.operands[0] is x and _single_use(other):
        end, chain = prod, [*chain, one_plus, half]  # (0.5 * x) * (1 + tanh)
    elif other is x and _single_use(prod.result) and _scaling(prod.result.users[0].result, 0.5) is not None:
        end, chain = prod.result.users[0], [*chain, one_plus, prod]  # 0.5 * (x * (1 + tanh))
    else:
        return NoMatch("x * (1 + tanh) is not halved")
    if any(not _single_use(o.result) for o in chain):
        return NoMatch("an intermediate of the GELU is used elsewhere")
    new = rw.create("gelu", [x], [end.result.type], {"approximate": "tanh"}, end.loc, before=end)
    rw.replace_uses(end.result, new.result)
    rw.erase_many([end, *reversed(chain)])
    return new


register_rule(Rule("bias", "ir", "add", "linear(x, w) + b -> linear(x, w, b)", _bias))
register_rule(Rule("rms_norm", "ir", "mul", "w * (x * rsqrt(mean(x*x) + eps)) -> rms_norm(x, w)", _rms_norm))
register_rule(Rule("swiglu", "ir", "mul", "(g * sigmoid(g)) * u -> swiglu(g, u)", _swiglu))
register_rule(Rule("silu", "ir", "mul", "g * sigmoid(g) -> silu(g) (not part of a swiglu)", _silu))
register_rule(Rule("gelu_tanh", "ir", "tanh", "0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) -> "
                   "gelu(x) {approximate = tanh}", _gelu_tanh))


def _dead_code(module: Module, rw: Rewriter) -> None:
    """Erase ops without side effects whose results are unused (iterates to a fixpoint)."""
    for op in reversed(list(module.ops)):
        t = traits(op)
        if not (t.interface or t.effect) and op.results and all(not r.uses for r in op.results):
            rw.erase(op)


def assign_layers(module: Module, rw: Rewriter) -> None:
    """Label ops embed / layerK / head by the positions where each decoder block starts."""
    pos = {id(op): i for i, op in enumerate(module.ops)}
    starts = []
    for att in module.walk("attention"):
        starts.append(_block_start(att.operands[0], pos))
    head = None
    for out in module.outputs():
        lin = out.operands[0].owner
        if lin is not None and lin.name == "linear":
            head = _block_start(lin.result, pos)
    bounds = sorted(set(starts))
    for i, op in enumerate(module.ops):
        if _given(op):
            continue
        if head is not None and i >= head:
            label = "head"
        else:
            k = sum(1 for b in bounds if b <= i)
            label = "embed" if k == 0 else f"layer{k - 1}"
        if op.attrs.get("layer") != label:
            rw.set_attr(op, "layer", label)
    for op in module.ops:
        if _given(op):
            users = [u for r in op.results for u in r.users]
            label = users[0].attrs.get("layer", "embed") if users else "embed"
            if op.attrs.get("layer") != label:
                rw.set_attr(op, "layer", label)


def _given(op: Op) -> bool:
    """A value the program is given (a weight, a constant, an input), labelled by its first user."""
    t = traits(op)
    return t.unit == "none" and not (t.state or t.effect)


def _block_start(v: Value, pos: dict[int, int]) -> int:
    """Position of the norm feeding the projection that produces `v` (or of the projection)."""
    op = v.owner
    while op is not None and op.name in ("rope", "add") and op.operands:
        op = op.operands[0].owner
    if op is None:
        return 0
    if op.name == "linear":
        src = op.operands[0].owner
        if src is not None and traits(src).norm:
            return pos[id(src)]
    return pos[id(op)]
