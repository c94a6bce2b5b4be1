"""`lift-idioms`: recognise decoder idioms in elementwise IR and replace them by fused ops.

The frontend lowers what it does not recognise structurally (attention, RoPE) to generic ops;
this pass applies the IR-level idiom rules (level "ir" in `cimc.ir.rules`, defined here) in
registry order, each over every op it is anchored at:

  bias       linear(x, w) + b  ->  linear(x, w, b)
  layer_norm (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) (* w) (+ b)   (the decomposed LayerNorm
             exporters emit below opset 17; also * rsqrt or * reciprocal(sqrt))
  rms_norm   w * (x * 1/sqrt(mean(x*x) + eps))      (rsqrt, sqrt+reciprocal, either operand order)
  swiglu     silu(g) * u, with silu = g * sigmoid(g)
  silu       g * sigmoid(g) (when not part of a swiglu)
  gelu       0.5 * x * (1 + erf(x / sqrt(2)))  ->  gelu(x)                     (factors in any order)
  gelu_tanh  0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))  ->  gelu(x) {approximate = "tanh"}
             (any polynomial form of the tanh argument: GPT-2's gelu_new, FastGelu's decomposition)

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


def _layer_norm(rw: Rewriter, sub: Op) -> Op | NoMatch | None:
    """Anchored at the centring d = x - mean(x); d feeds the variance mean(d*d) and the division."""
    x, m = sub.operands
    mean = _prod(m, "reduce_mean")
    if mean is None or mean.operands[0] is not x:
        return None
    users = sub.result.users
    sq = next((u for u in users if u.name == "mul" and u.operands[0] is u.operands[1]), None)
    normed = [u for u in users if u is not sq]
    if sq is None or len(normed) != 1 or len(users) != 2 or not _single_use(m):
        return NoMatch("x - mean(x) is not used by exactly its square and the normalisation")
    var = _only_user(sq, "reduce_mean")
    aff = _only_user(var, "affine") if var is not None else None
    if aff is None or aff.attrs["alpha"] != 1.0:
        return NoMatch("the square of x - mean(x) is not averaged and added to eps")
    n = normed[0]
    chain = _denominator(aff, n, sub.result)
    if chain is None:
        return NoMatch("x - mean(x) is not divided by sqrt(var + eps) (nor multiplied by its rsqrt)")
    cols = x.type.shape[-1]
    out, operands = n, [x]
    for name in ("mul", "add"):  # the scale, then the bias
        nxt = _only_user(out, name)
        vec = None if nxt is None else next((v for v in nxt.operands if v is not out.result and _vector(v, cols)),
                                            None)
        if vec is None:
            break
        operands.append(vec)
        out = nxt
    if len(operands) == 1:
        return NoMatch("the normalised x is not scaled by a constant vector")
    new = rw.create("layer_norm", operands, [out.result.type], {"eps": float(aff.attrs["beta"])}, out.loc,
                    before=out)
    rw.replace_uses(out.result, new.result)
    rw.erase(out)
    return new


def _only_user(op: Op, name: str) -> Op | None:
    """The one user of op's result, if it is a `name` op."""
    users = op.result.users
    return users[0] if len(users) == 1 and users[0].name == name else None


def _denominator(aff: Op, n: Op, d: Value) -> bool | None:
    """Whether `n` is d / sqrt(aff) or d * rsqrt(aff) or d * reciprocal(sqrt(aff)), each once used."""
    root = _only_user(aff, "sqrt") or _only_user(aff, "rsqrt")
    if root is None:
        return None
    if n.name == "div" and root.name == "sqrt":
        return True if n.operands[0] is d and n.operands[1] is root.result and _single_use(root.result) else None
    inv = root if root.name == "rsqrt" else _only_user(root, "reciprocal")
    if n.name == "mul" and inv is not None and _single_use(inv.result) and \
            {id(o) for o in n.operands} == {id(d), id(inv.result)}:
        return True
    return None


#: sqrt(2/pi) and the cubic coefficient of the tanh GELU, and 1/sqrt(2) of the erf one.
_TANH_C, _TANH_A, _ERF_C = math.sqrt(2 / math.pi), 0.044715, 1 / math.sqrt(2)


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * max(abs(b), 1e-30)


def _poly(v: Value, leaf: list[Value], depth: int = 0) -> dict[int, float] | None:
    """v as a polynomial (degree -> coefficient) in one leaf value (found into `leaf`) through
    single-use add, sub, mul, neg and affine ops; None if it is not one of degree <= 3."""
    op = v.owner
    if depth and (op is None or op.name not in ("add", "sub", "mul", "neg", "affine") or not _single_use(v)):
        if leaf and leaf[0] is not v:
            return None
        leaf[:] = [v]
        return {1: 1.0}
    if op is None or op.name not in ("add", "sub", "mul", "neg", "affine") or not _single_use(v):
        return None
    parts = [_poly(o, leaf, depth + 1) for o in op.operands]
    if any(p is None for p in parts):
        return None
    out: dict[int, float] = {}
    if op.name == "affine":
        out = {d: c * op.attrs["alpha"] for d, c in parts[0].items()}
        out[0] = out.get(0, 0.0) + op.attrs["beta"]
    elif op.name == "neg":
        out = {d: -c for d, c in parts[0].items()}
    elif op.name == "mul":
        for d1, c1 in parts[0].items():
            for d2, c2 in parts[1].items():
                out[d1 + d2] = out.get(d1 + d2, 0.0) + c1 * c2
    else:
        sign = 1.0 if op.name == "add" else -1.0
        out = dict(parts[0])
        for d, c in parts[1].items():
            out[d] = out.get(d, 0.0) + sign * c
    return None if max(out) > 3 else out


def _factors(v: Value) -> tuple[float, list[Value]]:
    """v as scalar * product of values, through single-use muls and scalings."""
    op = v.owner
    if op is not None and _single_use(v) and op.name == "mul":
        s1, f1 = _factors(op.operands[0])
        s2, f2 = _factors(op.operands[1])
        return s1 * s2, f1 + f2
    if op is not None and _single_use(v) and op.name == "affine" and op.attrs["beta"] == 0.0:
        s, f = _factors(op.operands[0])
        return s * op.attrs["alpha"], f
    return 1.0, [v]


def _gelu_product(rw: Rewriter, act: Op, x: Value, form: str) -> Op | NoMatch:
    """From `act` (erf or tanh of x's argument): 1 + act, times 0.5 and x in any order -> gelu(x)."""
    one = _only_user(act, "affine")
    if one is None or (one.attrs["alpha"], one.attrs["beta"]) != (1.0, 1.0):
        return NoMatch(f"{act.name} is not followed by 1 + {act.name}")
    cur, scale, factors = one, 1.0, []
    for _ in range(4):
        if _close(scale, 0.5) and len(factors) == 1 and factors[0] is x:
            attrs = {"approximate": "tanh"} if form == "tanh" else {}
            new = rw.create("gelu", [x], [cur.result.type], attrs, cur.loc, before=cur)
            rw.replace_uses(cur.result, new.result)
            rw.erase(cur)
            return new
        users = cur.result.users
        if len(users) != 1 or users[0].name not in ("mul", "affine"):
            break
        nxt = users[0]
        if nxt.name == "affine":
            if nxt.attrs["beta"] != 0.0:
                break
            scale *= nxt.attrs["alpha"]
        else:
            other = nxt.operands[1] if nxt.operands[0] is cur.result else nxt.operands[0]
            s, f = _factors(other)
            scale, factors = scale * s, factors + f
        cur = nxt
    return NoMatch(f"1 + {act.name}(...) is not multiplied by exactly 0.5 * x")


def _gelu_erf(rw: Rewriter, erf: Op) -> Op | NoMatch | None:
    arg = erf.operands[0].owner
    if arg is None or arg.name != "affine" or arg.attrs["beta"] != 0.0 or not _single_use(erf.operands[0]):
        return None
    if not _close(arg.attrs["alpha"], _ERF_C):
        return NoMatch(f"erf of x * {arg.attrs['alpha']}, not x / sqrt(2)")
    return _gelu_product(rw, erf, arg.operands[0], "none")


def _gelu_tanh(rw: Rewriter, tanh: Op) -> Op | NoMatch | None:
    leaf: list[Value] = []
    poly = _poly(tanh.operands[0], leaf)
    if poly is None or 3 not in poly:
        return None
    want = {0: 0.0, 1: _TANH_C, 2: 0.0, 3: _TANH_C * _TANH_A}
    if any(abs(poly.get(d, 0.0) - c) > 1e-5 * _TANH_C for d, c in want.items()):
        return NoMatch("tanh of a cubic that is not sqrt(2/pi) * (x + 0.044715 x^3)")
    return _gelu_product(rw, tanh, leaf[0], "tanh")


register_rule(Rule("bias", "ir", "add", "linear(x, w) + b -> linear(x, w, b)", _bias))
register_rule(Rule("layer_norm", "ir", "sub", "(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * w + b -> "
                   "layer_norm(x, w, b)", _layer_norm))
register_rule(Rule("rms_norm", "ir", "mul", "w * (x * rsqrt(mean(x*x) + eps)) -> rms_norm(x, w)", _rms_norm))
register_rule(Rule("swiglu", "ir", "mul", "(g * sigmoid(g)) * u -> swiglu(g, u)", _swiglu))
register_rule(Rule("silu", "ir", "mul", "g * sigmoid(g) -> silu(g) (not part of a swiglu)", _silu))
register_rule(Rule("gelu", "ir", "erf", "0.5 * x * (1 + erf(x / sqrt(2))) -> gelu(x)", _gelu_erf))
register_rule(Rule("gelu_tanh", "ir", "tanh", "0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) -> "
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
