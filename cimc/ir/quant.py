"""What a `qweight` op holds, in numbers: integer weights, their scales and zero points.

A `qweight` is a `[K, N]` matrix of an integer type (`i4`, `i8`, or `u4`, `u8` with zero
points) with one scale (and zero point) per group of `group` rows and column (`group = 0`: one
per column over all K). Its `format` says where the numbers come from:

- `rtn`: the float initializer `init` (transposed with `transpose`), quantized at compile time by
  symmetric round-to-nearest: per group and column, m is the value of largest magnitude and
  s = m / -2^(b-1), stored as `scale_type`; q = clip(round_half_even(w / s), lo, hi) with the
  stored s (so the extreme value maps to -2^(b-1) exactly and no level is wasted, as MLAS's
  blockwise quantizer and llama.cpp's Q4_0 do). An all-zero group has s = 0 and q = 0.
- `matmulnbits`: a `com.microsoft:MatMulNBits` node's own initializers, kept as they are: `init`
  is B `[N, K/block, block*bits/8]` (two 4-bit values to a byte, low nibble first), `scales`
  `[N * K/block]`, `zero_points` (optional) packed like B per row of N; without zero points the
  zero point is 2^(bits-1) and the weights are stored exactly as the signed type q - 2^(bits-1).
- `dequantizelinear` (a `DequantizeLinear` of an integer initializer feeding a MatMul or Gemm) and
  `matmulinteger` (the weight `B` of quantize_dynamic's `MatMulInteger` chain): `init` is the ONNX
  int8/uint8/int4/uint4 tensor (`[K, N]`, or `[N, K]` with `transpose`), `scales` and
  `zero_points` (optional, of `init`'s type) a scalar (per tensor: repeated per column), a vector
  `[N]` (per column) or a matrix of `K/group` blocks along K (`[K/group, N]`, transposed with
  `init`). Nothing is requantized: a signed tensor without zero points (or with all-zero ones)
  keeps its type; an unsigned one keeps its type and zero points (0 when absent); a signed one
  with nonzero zero points becomes the unsigned type, q + 2^(b-1) with zero points z + 2^(b-1),
  which stands for the same q - z.

A float `weight` op with `format = dequantize` is a DequantizeLinear of an integer initializer
computed at compile time (`dequantize`): (q - z) * s in f32 with the scale per tensor, per `axis`
or in blocks of `block` along it, as ONNX defines it (a quantized embedding table). With `format =
gatherblockquantized` it is a `com.microsoft:GatherBlockQuantized` table (`gather_blocks`): `init`
holds `bits`-bit values packed two to a uint8 (low nibble first), one row per table row, `scales`
one per `block` columns of a row, `zero_points` (optional) packed like the values, else 2^(bits-1).

A `qweight` or float `weight` with `cols = [c0, c1, n]` holds columns c0 .. c1-1 of the `[K, n]`
weights its other attributes define (one of the q, k and v blocks of a packed projection).

`materialize` turns an op's attributes into a `QuantWeight`; codegen streams it into DRAM and
the tests compare it with onnxruntime's own dequantization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from isa.dtypes import elem, unpack

#: Integer weight types a `qweight` may have, and the formats it may come from.
QUANT_TYPES = ("i4", "i8", "u4", "u8")
FORMATS = ("rtn", "matmulnbits", "dequantizelinear", "matmulinteger")
#: Formats of a float `weight` whose numbers are computed at compile time.
WEIGHT_FORMATS = ("dequantize", "gatherblockquantized")
#: numpy names of the ONNX integer types whose values a `qweight` may take as they are (a signed
#: one with nonzero zero points shifts to the unsigned type of its width).
ONNX_INTS = {"int8": "i8", "uint8": "u8", "int4": "i4", "uint4": "u4"}


@dataclass(frozen=True)
class QuantWeight:
    """q [K, N] (int8, or uint8 for the unsigned types: values of `wt`), scales [G, N] (of
    `scale_type`) and zero points [G, N] (uint8; None for a signed `wt`), G = ceil(K / group)
    (1 for group 0)."""

    q: np.ndarray
    scales: np.ndarray
    zero: np.ndarray | None
    group: int

    def dequantize(self) -> np.ndarray:
        """The float weights these stand for: (q - zero) * scale, in f32."""
        k = self.q.shape[0]
        rows = np.repeat(np.arange(self.scales.shape[0]), self.group or k)[:k]
        w = self.q.astype(np.float32)
        if self.zero is not None:
            w = w - self.zero[rows].astype(np.float32)
        return w * self.scales[rows].astype(np.float32)


def groups(k: int, group: int) -> int:
    """Scale groups along K."""
    return -(-k // group) if group else 1


def rtn(w: np.ndarray, wt: str, group: int, scale_type: str) -> QuantWeight:
    """Symmetric round-to-nearest quantization of a float [K, N] matrix (see the module doc).
    Two passes of compiled loops over the weights (a transposed view is walked in its own memory
    order): a 1B-parameter model quantizes in seconds."""
    t = elem(wt)
    k = w.shape[0]
    size = group or k
    trans = not w.flags.c_contiguous and w.T.flags.c_contiguous
    a = np.ascontiguousarray(w.T if trans else w, dtype=np.float32)
    m = _extremes(a, trans, size, groups(k, group))
    scales = (m / np.float32(t.lo)).astype(elem(scale_type).np())
    q = _levels(a, trans, size, scales.astype(np.float32), t.lo, t.hi)
    return QuantWeight(q.T if trans else q, scales, None, group)


@njit(cache=True, parallel=True)
def _extremes(a: np.ndarray, trans: bool, size: int, g: int) -> np.ndarray:
    """[G, N]: per group of `size` rows and column, the value of largest magnitude (the first on
    ties) of the [K, N] matrix `a` (`a.T` with `trans`)."""
    k, n = (a.shape[1], a.shape[0]) if trans else a.shape
    m = np.zeros((g, n), np.float32)
    best = np.full((g, n), -1.0, np.float32)
    if trans:
        for c in prange(n):
            for r in range(k):
                v = a[c, r]
                if abs(v) > best[r // size, c]:
                    best[r // size, c], m[r // size, c] = abs(v), v
    else:
        for gi in prange(g):
            for r in range(gi * size, min(k, gi * size + size)):
                for c in range(n):
                    v = a[r, c]
                    if abs(v) > best[gi, c]:
                        best[gi, c], m[gi, c] = abs(v), v
    return m


@njit(cache=True, parallel=True)
def _levels(a: np.ndarray, trans: bool, size: int, s: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """int8, laid out like `a`: clip(round_half_even(w / s), lo, hi) per element, 0 where the
    scale is 0."""
    q = np.empty(a.shape, np.int8)
    for i in prange(a.shape[0]):
        for j in range(a.shape[1]):
            d = s[j // size, i] if trans else s[i // size, j]
            q[i, j] = 0 if d == 0 else min(max(np.rint(a[i, j] / d), lo), hi)
    return q


def _unsigned(raw: np.ndarray, rows: int, bits: int) -> np.ndarray:
    """Every unsigned `bits`-bit value packed in each of `rows` rows of bytes (4 bits: low nibble
    first), [rows, values] int16."""
    raw = np.ascontiguousarray(raw, np.uint8).reshape(rows, -1)
    return unpack(raw.reshape(-1), f"u{bits}", raw.size * 8 // bits).reshape(rows, -1)


def matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int, bits: int,
                block: int) -> QuantWeight:
    """A MatMulNBits node's weights as a QuantWeight (see the module doc)."""
    g = groups(k, block)
    q = _unsigned(b, n, bits)[:, :k].T
    s = np.asarray(scales).reshape(n, g).T
    # q stays in B's (column-major) order: the packer reads any layout, and a 1B-parameter
    # model's transposed copy would cost seconds
    if zero_points is None:
        return QuantWeight((q - (1 << (bits - 1))).astype(np.int8), np.ascontiguousarray(s), None, block)
    z = _unsigned(zero_points, n, bits)[:, :g].T.astype(np.uint8)
    return QuantWeight(q.astype(np.uint8), np.ascontiguousarray(s), np.ascontiguousarray(z), block)


def _ints(a: np.ndarray) -> np.ndarray:
    """ONNX integers (int8/uint8, or ml_dtypes int4/uint4) as int16."""
    return np.asarray(a).astype(np.int16)


def _per_column(a: np.ndarray, transpose: bool, n: int) -> np.ndarray:
    """Scales or zero points as [G, N]: a scalar repeated per column, a vector [N], or blocks along K
    ([G, N], [N, G] with `transpose`)."""
    a = np.asarray(a)
    if a.size == 1:
        return np.full((1, n), a.reshape(-1)[0], a.dtype)
    if a.ndim == 1:
        return a.reshape(1, n)
    return np.ascontiguousarray(a.T if transpose else a)


def held_type(dtype: str, zero_points: np.ndarray | None) -> str:
    """The `qweight` type that holds ONNX integers of numpy type `dtype` (int8, uint8, int4, uint4)
    with these zero points exactly: their own type, or for a signed one with a nonzero zero point
    the unsigned type of its width (see the module doc)."""
    t = elem(ONNX_INTS[dtype])
    if t.signed and zero_points is not None and _ints(zero_points).any():
        return f"u{t.bits}"
    return t.name


def onnx_integer(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, wt: str, group: int,
                 transpose: bool) -> QuantWeight:
    """An ONNX integer weight tensor with its scales and zero points as a QuantWeight of type `wt`
    (see the module doc: formats `dequantizelinear` and `matmulinteger`)."""
    t, src = elem(wt), elem(ONNX_INTS[np.asarray(q).dtype.name])
    q = _ints(q).T if transpose else _ints(q)
    n = q.shape[1]
    s = _per_column(scales, transpose, n)
    z = np.zeros(s.shape, np.int16) if zero_points is None else _ints(_per_column(zero_points, transpose, n))
    if src.bits != t.bits or (t.signed and not src.signed):
        raise ValueError(f"{src.name} weights cannot be held as {wt}")
    shift = 1 << (t.bits - 1) if src.signed and not t.signed else 0
    if t.signed:
        if z.any():
            raise ValueError(f"{src.name} weights with nonzero zero points cannot be held as {wt}")
        return QuantWeight(np.ascontiguousarray(q, dtype=np.int8), s, None, group)
    return QuantWeight(np.ascontiguousarray(q + shift, dtype=np.uint8), s, np.ascontiguousarray(z + shift, np.uint8),
                       group)


def dequantize(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    """ONNX DequantizeLinear of a 2-D integer tensor, in f32: (q - z) * s, computed as onnxruntime
    does (the integer difference converted to f32, times the scale), the scale and zero point
    per tensor (one value), per `axis` (a vector) or in blocks of `block` along `axis`."""
    q = _ints(q).astype(np.int32)
    s = np.asarray(scales, np.float32)
    z = np.zeros(s.shape, np.int32) if zero_points is None else _ints(zero_points).astype(np.int32)
    if s.size == 1:
        s, z = s.reshape(1, 1), z.reshape(1, 1)
    elif block:
        s, z = (np.repeat(a, block, axis=axis).take(range(q.shape[axis]), axis=axis) for a in (s, z))
    else:
        shape = (-1, 1) if axis == 0 else (1, -1)
        s, z = s.reshape(shape), z.reshape(shape)
    return (q - z).astype(np.float32) * s


def gather_blocks(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                  block: int) -> np.ndarray:
    """A GatherBlockQuantized table in f32: (q - z) * s per `block` columns of each row, as
    onnxruntime computes it (z = 2^(bits-1) without zero points)."""
    rows = np.asarray(scales).shape[0]
    s = np.asarray(scales, np.float32).reshape(rows, -1)
    vals = _unsigned(q, rows, bits)
    cols = vals.shape[1]
    z = np.full(s.shape, 1 << (bits - 1), np.int32) if zero_points is None else \
        _unsigned(zero_points, rows, bits)[:, :s.shape[1]]
    rep = np.repeat(np.arange(s.shape[1]), block)[:cols]
    return (vals - z[:, rep]).astype(np.float32) * s[:, rep]


def weight_values(attrs: dict, get: Callable[[str], np.ndarray]) -> np.ndarray:
    """The float matrix a `weight` op stands for: its initializer (the matrix at `index` of its
    leading axes, transposed with `transpose`), or with `format = dequantize` that initializer
    dequantized (`dequantize`); with `cols`, of that its columns c0 .. c1-1."""
    w = get(attrs["init"])
    if attrs.get("format") == "gatherblockquantized":
        zp = attrs.get("zero_points", "")
        w = gather_blocks(w, get(attrs["scales"]), get(zp) if zp else None, attrs["bits"], attrs["block"])
    elif attrs.get("format") == "dequantize":
        zp = attrs.get("zero_points", "")
        w = dequantize(w, get(attrs["scales"]), get(zp) if zp else None, attrs["axis"], attrs.get("block", 0))
    elif attrs.get("format", ""):
        raise ValueError(f"unknown weight format {attrs['format']!r} (formats: {', '.join(WEIGHT_FORMATS)})")
    if "index" in attrs:
        w = w[tuple(attrs["index"])]
    w = w.T if attrs.get("transpose", False) else w
    if "cols" in attrs:
        c0, c1, _ = attrs["cols"]
        w = np.ascontiguousarray(w[:, c0:c1])
    return w


def materialize(attrs: dict, wt: str, shape: tuple[int, int], get: Callable[[str], np.ndarray]) -> QuantWeight:
    """The numbers of a `qweight` with these attributes, type and [K, N] shape; `get` reads an
    initializer by name."""
    if "cols" in attrs:
        c0, c1, full = attrs["cols"]
        inner = materialize({k: v for k, v in attrs.items() if k != "cols"}, wt, (shape[0], full), get)
        return QuantWeight(inner.q[:, c0:c1], np.ascontiguousarray(inner.scales[:, c0:c1]),
                           None if inner.zero is None else np.ascontiguousarray(inner.zero[:, c0:c1]), inner.group)
    k, n = shape
    fmt = attrs["format"]
    if fmt == "rtn":
        w = get(attrs["init"])
        w = w.T if attrs.get("transpose", False) else w
        return rtn(np.asarray(w, np.float32), wt, attrs["group"], attrs["scale_type"])
    if fmt == "matmulnbits":
        zp = attrs.get("zero_points", "")
        return matmulnbits(get(attrs["init"]), get(attrs["scales"]), get(zp) if zp else None, k, n,
                           elem(wt).bits, attrs["group"])
    if fmt in ("dequantizelinear", "matmulinteger"):
        zp = attrs.get("zero_points", "")
        return onnx_integer(get(attrs["init"]), get(attrs["scales"]), get(zp) if zp else None, wt, attrs["group"],
                            attrs.get("transpose", False))
    raise ValueError(f"unknown qweight format {fmt!r} (formats: {', '.join(FORMATS)})")
