"""What each instruction does to the machine state, in numpy (the macros' integer arithmetic in `runtime.macro`).

One function per row of the ISA table, registered by mnemonic; `SEMANTICS` must cover the table
exactly (checked at import). Functions only compute: timing and energy are charged elsewhere
from the cost model, so semantics and accounting never mix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import numpy as np

from isa.dtypes import elem, unpack
from isa.encoding import Instr
from isa.fields import DTYPES, WEIGHT_TYPES, Dim, Mem
from isa.spec import BY_NAME
from runtime.machine import Group, Machine, SimError
from runtime.macro import abs_sums, float_mvm, partial_sums, rescale, zero_point_sums

Semantics = Callable[[Machine, dict], None]
SEMANTICS: dict[str, Semantics] = {}
F32 = np.float32


def sem(*names: str) -> Callable[[Semantics], Semantics]:
    def deco(fn: Semantics) -> Semantics:
        for n in names:
            SEMANTICS[n] = fn
        return fn
    return deco


def dim(m: Machine, d: Dim) -> int:
    return int(d.imm + m.regs[d.reg])


@sem("halt", "sync")
def _nothing(m: Machine, f: dict) -> None:
    return None


@sem("dma")
def _dma(m: Machine, f: dict) -> None:
    rows, cols = dim(m, f["rows"]), dim(m, f["cols"])
    dt = elem(DTYPES[f["dt"]]).numpy
    src = m.view(f["src"], rows, cols, dtype=dt)
    m.view(f["dst"], rows, cols, dtype=dt, write=True)[...] = src


@sem("gather")
def _gather(m: Machine, f: dict) -> None:
    n, cols, vocab = dim(m, f["n"]), dim(m, f["cols"]), f["vocab"]
    idx = m.view(f["idx"], n, 1, dtype="<i4")[:, 0]
    bad = np.flatnonzero((idx < 0) | (idx >= vocab))
    if bad.size:
        i = int(bad[0])
        raise SimError(f"token id {int(idx[i])} at position {i} is outside the vocabulary [0, {vocab})")
    table = m.view(f["table"], vocab, cols)
    m.view(f["dst"], n, cols, write=True)[...] = table[idx]


@sem("wload")
def _wload(m: Machine, f: dict) -> None:
    k, n, wt, src = f["k"], f["n"], WEIGHT_TYPES[f["wt"]], f["src"]
    group = m.cached_group(src, k, n, wt)
    if group is not None:
        m.load_group(f["tile"], f["m0"], group)
        return
    t = elem(wt)
    if t.is_float:
        weights = m.view(src, k, n, dtype=t.numpy)  # from the read-only image: used in place, not copied
        group = m.group(src, k, n, wt, lambda: weights if m.read_only(src) else np.array(weights, dtype=F32))
    else:
        raw = m.view(src._replace(stride=0), 1, t.packed_bytes(k * n), dtype="u1")[0]
        held = np.int8 if t.signed else np.uint8  # what a 4-bit weight needs; 8-bit ones keep int16 (|-128|)
        group = m.group(src, k, n, wt, lambda: unpack(raw, wt, k * n).reshape(k, n).astype(
            held if t.bits == 4 else np.int16))
    m.load_group(f["tile"], f["m0"], group)


@sem("mvm")
def _mvm(m: Machine, f: dict) -> None:
    k, n, wt, xt = f["k"], f["n"], WEIGHT_TYPES[f["wt"]], DTYPES[f["xt"]]
    group = m.macros.get((f["tile"], f["m0"]))
    if group is None or group.weights.shape != (k, n) or group.wt != wt:
        got = "nothing" if group is None else f"a {group.weights.shape[0]} x {group.weights.shape[1]} {group.wt} group"
        raise SimError(f"mvm on tile {f['tile']} macro {f['m0']} expects a {k} x {n} {wt} weight group, "
                       f"but {got} is loaded there")
    m.touch_macros(f["tile"], f["m0"], group.macros, write=False)
    nvec = dim(m, f["nvec"])
    x_type, w_type = elem(xt), elem(wt)
    if w_type.is_float:
        if not x_type.is_float or x_type.bits != 32:
            raise SimError(f"mvm: f32 weights take f32 inputs, not {xt}")
        dst = m.view(f["dst"], nvec, n, write=True)
        if f["acc"]:
            dst += np.matmul(m.view(f["src"], nvec, k), group.weights)
        else:
            np.matmul(m.view(f["src"], nvec, k), group.weights, out=dst)
        return
    else:
        if xt not in ("f32", "i8", "u8"):
            raise SimError(f"mvm: integer weights take f32, i8 or u8 inputs, not {xt}")
        gk = f["gk"] or k
        groups = -(-k // gk)
        ws, z = _weight_scales(m, f, group, groups, n, w_type.signed)
        x = m.view(f["src"], nvec, k, dtype=x_type.numpy)
        if x_type.is_float:
            y = float_mvm(x, group.weights, gk, z, ws)
        else:
            x = np.array(x)
            if gk not in group.abs_sums:
                group.abs_sums[gk] = abs_sums(group.weights, gk)
            p = partial_sums(x, group.weights, gk, xt, m.accum_bits, group.abs_sums[gk])
            xs, xz = _input_scales(m, f["xs"], nvec, groups, xt)
            y = rescale(zero_point_sums(p, x, group.weights, gk, z, xz), xs, ws)
    dst = m.view(f["dst"], nvec, n, write=True)
    if f["acc"]:
        dst += y
    else:
        dst[...] = y


def _weight_scales(m: Machine, f: dict, group: Group, groups: int, n: int, signed: bool
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """An mvm's weight scales [groups, n] (f32) and zero points (u8; None for signed weights), read
    once per group and shape when they lie in the read-only image at a fixed place (no register
    offsets its rows) and no access is traced."""
    operands = [f["ws"]] + ([] if signed else [f["wz"]])
    fixed = all(m.read_only(x) and not x.roff for x in operands)
    key = (*operands, f["wst"], groups, n)
    if fixed and key in group.scales and m.trace is None:
        return group.scales[key]
    ws = np.array(m.view(f["ws"], groups, n, dtype=elem(DTYPES[f["wst"]]).numpy), dtype=F32)
    z = None if signed else np.array(m.view(f["wz"], groups, n, dtype="u1"))
    if fixed:
        group.scales[key] = ws, z
    return ws, z


def _input_scales(m: Machine, xs: Mem, nvec: int, groups: int, xt: str) -> tuple[np.ndarray, np.ndarray | None]:
    """An integer-input mvm's scales [nvec, groups] and zero points [nvec] (None for i8) from `xs`:
    one scale per vector and group (i8), or each vector's scale and zero point (u8)."""
    if xt == "i8":
        return np.array(m.view(xs, nvec, groups)), None
    sz = np.array(m.view(xs, nvec, 2))
    xz = sz[:, 1]
    if not np.all((xz >= 0) & (xz <= 255) & (xz == np.floor(xz))):
        raise SimError(f"mvm: u8 input zero points must be whole numbers 0..255, got {xz[:4].tolist()}")
    return np.repeat(sz[:, :1], groups, axis=1), xz.astype(np.int64)


@sem("tred")
def _tred(m: Machine, f: dict) -> None:
    rows, cols = dim(m, f["rows"]), dim(m, f["cols"])
    src = f["src"]
    total = np.array(m.view(src, rows, cols))
    for i in range(1, f["count"]):
        total += m.view(src._replace(addr=src.addr + i * f["pstride"]), rows, cols)
    m.view(f["dst"], rows, cols, write=True)[...] = total


_BIN = {"vadd": np.add, "vsub": np.subtract, "vmul": np.multiply, "vdiv": np.divide, "vmax": np.maximum,
        "vpow": np.power}


def _binary(name: str) -> Semantics:
    fn = _BIN[name]

    def run(m: Machine, f: dict) -> None:
        rows, cols = dim(m, f["rows"]), dim(m, f["cols"])
        a = m.view(f["a"], rows, cols, col_bcast=bool(f["abc"]))
        b = m.view(f["b"], rows, cols, col_bcast=bool(f["bbc"]))
        res = fn(a, b)
        m.view(f["dst"], rows, cols, write=True)[...] = res
    return run


for _n in _BIN:
    SEMANTICS[_n] = _binary(_n)


def _erf(x: np.ndarray) -> np.ndarray:
    """Elementwise erf in float64 (numpy has none; math.erf is exact to double precision)."""
    return np.vectorize(math.erf, otypes=[np.float64])(x)


_UN: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "vcopy": lambda x: x,
    "vneg": np.negative,
    "vexp": np.exp,
    "vsqrt": np.sqrt,
    "vrsqrt": lambda x: F32(1) / np.sqrt(x),
    "vrecip": lambda x: F32(1) / x,
    "vsigmoid": lambda x: F32(1) / (F32(1) + np.exp(-x)),
    "vsilu": lambda x: x / (F32(1) + np.exp(-x)),
    "vtanh": np.tanh,
    "vgelu": lambda x: (0.5 * x * (1.0 + _erf(x.astype(np.float64) / np.sqrt(2.0)))).astype(F32),
    "verf": lambda x: _erf(x.astype(np.float64)).astype(F32),
    "vgelut": lambda x: F32(0.5) * x * (F32(1) + np.tanh(F32(math.sqrt(2 / math.pi)) * (x + F32(0.044715) * x ** 3))),
}


def _unary(name: str) -> Semantics:
    fn = _UN[name]

    def run(m: Machine, f: dict) -> None:
        rows, cols = dim(m, f["rows"]), dim(m, f["cols"])
        res = fn(np.array(m.view(f["src"], rows, cols)))
        m.view(f["dst"], rows, cols, write=True)[...] = res
    return run


for _n in _UN:
    SEMANTICS[_n] = _unary(_n)


@sem("vaffine")
def _vaffine(m: Machine, f: dict) -> None:
    rows, cols = dim(m, f["rows"]), dim(m, f["cols"])
    x = m.view(f["src"], rows, cols)
    m.view(f["dst"], rows, cols, write=True)[...] = x * F32(f["alpha"]) + F32(f["beta"])


@sem("vsoftcap")
def _vsoftcap(m: Machine, f: dict) -> None:
    rows, cols, cap = dim(m, f["rows"]), dim(m, f["cols"]), F32(f["cap"])
    if not cap > 0:
        raise SimError(f"vsoftcap: the cap must be positive, got {f['cap']}")
    x = m.view(f["src"], rows, cols)
    m.view(f["dst"], rows, cols, write=True)[...] = cap * np.tanh(x / cap)


def _reduce(fn: Callable) -> Semantics:
    def run(m: Machine, f: dict) -> None:
        rows, cols = dim(m, f["rows"]), dim(m, f["cols"])
        res = fn(m.view(f["src"], rows, cols), axis=1, keepdims=True)
        m.view(f["dst"], rows, 1, write=True)[...] = res
    return run


SEMANTICS["vrsum"] = _reduce(np.sum)
SEMANTICS["vrmax"] = _reduce(partial(np.max, initial=-np.inf))  # over no columns: -inf


@sem("vrope")
def _vrope(m: Machine, f: dict) -> None:
    rows, cols, hd = dim(m, f["rows"]), dim(m, f["cols"]), f["hd"]
    rd = f["rd"] or hd
    if hd == 0 or cols % hd or rd % 2 or rd > hd:
        raise SimError(f"vrope: head dimension {hd} must divide {cols} columns, and the rotated {rd} entries be "
                       "even and at most that")
    x = np.array(m.view(f["src"], rows, cols)).reshape(rows, cols // hd, hd)
    cos = np.array(m.view(f["cos"], rows, rd))[:, None, :]
    sin = np.array(m.view(f["sin"], rows, rd))[:, None, :]
    half = rd // 2
    part = x[..., :rd]
    rot = np.concatenate([-part[..., half:], part[..., :half]], axis=-1)
    x[..., :rd] = part * cos + rot * sin
    m.view(f["dst"], rows, cols, write=True)[...] = x.reshape(rows, cols)


@sem("vmm")
def _vmm(m: Machine, f: dict) -> None:
    mm, k, n = dim(m, f["m"]), dim(m, f["k"]), dim(m, f["n"])
    a = m.view(f["a"], mm, k)
    b = m.view(f["b"], n, k).T if f["tb"] else m.view(f["b"], k, n)
    res = np.matmul(a, b)
    if f["alpha"] != 1.0:
        res = res * F32(f["alpha"])
    dst = m.view(f["dst"], mm, n, write=True)
    if f["acc"]:
        dst += res
    else:
        dst[...] = res


@sem("vquant")
def _vquant(m: Machine, f: dict) -> None:
    rows, cols = dim(m, f["rows"]), dim(m, f["cols"])
    if f["asym"]:
        _vquant_asym(m, f, rows, cols)
        return
    g = f["group"] or cols
    groups = -(-cols // g)
    x = np.zeros((rows, groups * g), F32)
    x[:, :cols] = m.view(f["src"], rows, cols)
    x = x.reshape(rows, groups, g)
    scale = (np.abs(x).max(axis=2, initial=F32(0)) / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, F32(1) / scale, F32(0)).astype(F32)
    q = np.clip(np.rint(x * inv[:, :, None]), -127, 127).astype(np.int8).reshape(rows, groups * g)[:, :cols]
    m.view(f["sc"], rows, groups, write=True)[...] = scale
    m.view(f["dst"], rows, cols, dtype="i1", write=True)[...] = q


def _vquant_asym(m: Machine, f: dict, rows: int, cols: int) -> None:
    """onnxruntime's DynamicQuantizeLinear (its CPU kernel's f32 arithmetic) over the whole block."""
    if f["group"]:
        raise SimError(f"vquant: asym quantizes the whole block, so group must be 0, not {f['group']}")
    x = np.array(m.view(f["src"], rows, cols))
    lo, hi = x.min(initial=F32(0)), x.max(initial=F32(0))  # the range, widened to hold 0
    s = F32(1) if hi == lo else F32(hi - lo) / F32(255)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = np.rint(np.clip(F32(0) - lo / s, F32(0), F32(255)))
        q = np.clip(np.rint(x / s) + z, 0, 255)
    m.view(f["sc"], rows, 2, write=True)[...] = np.array([s, z], F32)
    m.view(f["dst"], rows, cols, dtype="u1", write=True)[...] = q.astype(np.uint8)


@sem("vcausal")
def _vcausal(m: Machine, f: dict) -> None:
    rows, cols, diag, window = dim(m, f["rows"]), dim(m, f["cols"]), dim(m, f["diag"]), f["window"]
    s = m.view(f["dst"], rows, cols, write=True)
    p = diag + (np.zeros((rows, 1), np.int64) if f["one"] else np.arange(rows)[:, None])  # each row's query
    c = np.arange(cols)[None, :]
    s[(c > p) | ((window > 0) & (c <= p - window))] = -np.inf


def execute(m: Machine, ins: Instr) -> None:
    SEMANTICS[ins.op](m, ins.f)


def _check() -> None:
    missing = set(BY_NAME) - set(SEMANTICS)
    extra = set(SEMANTICS) - set(BY_NAME)
    assert not missing and not extra, f"semantics out of sync with the ISA table: {missing or ''} {extra or ''}"


_check()
