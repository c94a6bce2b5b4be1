"""The CIM macros' integer arithmetic, bit-exact, and the packing of weights in DRAM.

A digital SRAM CIM macro multiplies bit-serially: input bit plane b of every row enters the
adder tree, which sums bit_b(x[k]) * w[k] over the rows exactly, and a shift-and-add
accumulator of `accum_bits` bits adds 2^b times that sum, the top plane of a signed input
negated (two's complement). The accumulator saturates at every step. `partial_sums` computes
exactly that. Every intermediate sum is bounded by sum |w| times the largest input magnitude
(2^(bits-1) signed, 2^bits - 1 unsigned; the low-bit prefixes stay below it), so where that
bound fits the accumulator, checked per column, no step saturates and the result is the plain
integer product: computed as one matrix product in float64 (exact: every value is far below
2^53). Only the columns that could saturate are computed plane by plane.

Zero points (`zero_point_sums`): the SFU makes the partial sums exact over the weights' zero
points z and the inputs' zero point xz (u8 inputs), with integer sums of the stored values.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from isa.dtypes import elem


def _row_groups(w: np.ndarray, gk: int, dtype: type) -> np.ndarray:
    """w [k, n] as [G, gk, n] of `dtype`, the last group padded with zero rows."""
    k, n = w.shape
    out = np.zeros((-(-k // gk) * gk, n), dtype)
    out[:k] = w
    return out.reshape(-1, gk, n)


def _col_groups(x: np.ndarray, gk: int, dtype: type) -> np.ndarray:
    """x [nvec, k] as [nvec, G, gk] of `dtype`, the last group padded with zero columns."""
    nvec, k = x.shape
    out = np.zeros((nvec, -(-k // gk) * gk), dtype)
    out[:, :k] = x
    return out.reshape(nvec, -1, gk)


def abs_sums(w: np.ndarray, gk: int) -> np.ndarray:
    """[G, n] sum of |w| over each group of gk rows."""
    return _row_groups(np.abs(w), gk, np.int64).sum(axis=1)


def partial_sums(x: np.ndarray, w: np.ndarray, gk: int, xt: str, accum_bits: int,
                 sums: np.ndarray | None = None) -> np.ndarray:
    """[nvec, G, n] int64: per group of gk rows, the macros' saturating bit-serial products of
    the integer inputs x [nvec, k] (type xt) with the integer weights w [k, n]. `sums` is
    `abs_sums(w, gk)`, if known."""
    t = elem(xt)
    xg = _col_groups(x, gk, np.int64).transpose(1, 0, 2)  # [G, nvec, gk]
    wg = _row_groups(w, gk, np.int64)  # [G, gk, n]
    out = np.matmul(xg.astype(np.float64), wg.astype(np.float64)).transpose(1, 0, 2)  # [nvec, G, n], exact
    hi = (1 << (accum_bits - 1)) - 1
    if sums is None:
        sums = abs_sums(w, gk)
    largest = (1 << (t.bits - 1)) if t.signed else (1 << t.bits) - 1  # |x| and every low-bit prefix
    risky = sums * largest > hi  # [G, n]: columns some step of which could saturate
    if risky.any():
        gs, js = np.nonzero(risky)
        out[:, gs, js] = _bit_serial(xg[gs], wg[gs, :, js], t.bits, t.signed, accum_bits)
    return out.astype(np.int64)


def float_mvm(x: np.ndarray, w: np.ndarray, gk: int, z: np.ndarray | None, ws: np.ndarray) -> np.ndarray:
    """[nvec, n] f32: f32 inputs x [nvec, k] times the integer weights w [k, n] minus their zero
    points z [G, n] (if any), per group of gk rows, each group's sums times its scales ws [G, n]
    added in group order, all in f32."""
    ws = np.ascontiguousarray(ws, np.float32)
    if x.shape[0] < 4:  # a few vectors: one pass of compiled loops
        zero = _NO_ZERO if z is None else np.ascontiguousarray(z, np.uint8)
        return _float_mvm(np.ascontiguousarray(x, np.float32), w, gk, zero, ws)
    # many vectors (a prompt): each group's products as one matrix product, then scaled in order
    wg = _row_groups(w, gk, np.float32)
    if z is not None:
        wg -= z[:, None, :].astype(np.float32)
    part = np.matmul(_col_groups(x, gk, np.float32).transpose(1, 0, 2), wg)  # [G, nvec, n]
    return _scaled_sum(np.ascontiguousarray(part), ws)


_NO_ZERO = np.zeros((0, 0), np.uint8)


@njit(cache=True)
def _scaled_sum(part: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """[nvec, n]: the sum over groups g, in order, of part[g] * ws[g], in f32."""
    groups, nvec, n = part.shape
    y = np.zeros((nvec, n), np.float32)
    for g in range(groups):
        for r in range(nvec):
            for j in range(n):
                y[r, j] += part[g, r, j] * ws[g, j]
    return y


@njit(cache=True)
def _float_mvm(x: np.ndarray, w: np.ndarray, gk: int, z: np.ndarray, ws: np.ndarray) -> np.ndarray:
    nvec, k = x.shape
    n = w.shape[1]
    y = np.zeros((nvec, n), np.float32)
    part = np.empty(n, np.float32)
    for r in range(nvec):
        for g in range(ws.shape[0]):
            part[:] = 0
            for kk in range(g * gk, min(k, g * gk + gk)):
                xv = x[r, kk]
                for j in range(n):
                    wv = np.float32(w[kk, j]) - (np.float32(z[g, j]) if z.shape[0] else np.float32(0))
                    part[j] += xv * wv
            for j in range(n):
                y[r, j] += part[j] * ws[g, j]
    return y


def group_sums(x: np.ndarray, gk: int) -> np.ndarray:
    """[nvec, G] int64: the sum of the integer inputs x [nvec, k] over each group of gk rows."""
    return _col_groups(x, gk, np.int64).sum(axis=2)


def column_sums(w: np.ndarray, gk: int) -> np.ndarray:
    """[G, n] int64: the sum of the stored weights w [k, n] over each group of gk rows (what one
    all-ones input plane gives through the adder tree)."""
    return _row_groups(w, gk, np.int64).sum(axis=1)


def zero_point_sums(p: np.ndarray, x: np.ndarray, w: np.ndarray, gk: int, z: np.ndarray | None,
                    xz: np.ndarray | None) -> np.ndarray:
    """[nvec, G, n] int64: the partial sums p of the stored inputs x [nvec, k] and weights w [k, n]
    made exact over the weights' zero points z [G, n] and the inputs' xz [nvec] (None: 0):
    p - z * sum_k x - xz * sum_k w + K_g * xz * z, K_g the rows of group g."""
    if z is not None:
        p = p - z[None].astype(np.int64) * group_sums(x, gk)[:, :, None]
    if xz is not None:
        xz = xz.astype(np.int64)[:, None, None]
        p = p - xz * column_sums(w, gk)[None]
        if z is not None:
            k = w.shape[0]
            rows = np.minimum(gk, k - gk * np.arange(-(-k // gk)))  # K_g: the last group may be shorter
            p = p + xz * (rows[:, None] * z.astype(np.int64))[None]
    return p


def _bit_serial(x: np.ndarray, w: np.ndarray, bits: int, signed: bool, accum_bits: int) -> np.ndarray:
    """x [m, nvec, gk], w [m, gk] (integers; one column each): the accumulator, plane by plane -> [nvec, m]."""
    lo, hi = -(1 << (accum_bits - 1)), (1 << (accum_bits - 1)) - 1
    xi = x & ((1 << bits) - 1)  # two's complement bit patterns
    w = w.astype(np.float64)
    acc = np.zeros((x.shape[1], x.shape[0]), np.int64)
    for b in range(bits):
        plane = ((xi >> b) & 1).astype(np.float64)  # [m, nvec, gk]
        p = np.einsum("mvk,mk->vm", plane, w).astype(np.int64)
        step = -(p << b) if signed and b == bits - 1 else p << b
        acc = np.clip(acc + step, lo, hi)
    return acc


def rescale(p: np.ndarray, xs: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """[nvec, n] f32: sum over groups g, in order, of f32(p[:, g]) * (xs[:, g] * ws[g]) (p [nvec, G, n]
    integer, xs [nvec, G], ws [G, n]), in f32."""
    return _rescale(np.ascontiguousarray(p, np.int64), np.ascontiguousarray(xs, np.float32),
                    np.ascontiguousarray(ws, np.float32))


@njit(cache=True)
def _rescale(p: np.ndarray, xs: np.ndarray, ws: np.ndarray) -> np.ndarray:
    nvec, groups, n = p.shape
    y = np.zeros((nvec, n), np.float32)
    for r in range(nvec):
        for g in range(groups):
            for j in range(n):
                y[r, j] += np.float32(p[r, g, j]) * (xs[r, g] * ws[g, j])
    return y
