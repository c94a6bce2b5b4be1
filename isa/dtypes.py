"""Element types and weight modes, stated once: the IR, the ISA, the cost model and the runtime
read them from here.

An element type has a name (as the IR and the assembly spell it), a width, whether it is a float
and whether it is signed, and the numpy type a value of it is held in once unpacked. Types of 8
bits or more are *memory* types: an instruction operand may hold them, `width / 8` bytes an
element. The 4-bit types exist only as weights in the macros and, packed two to a byte, in DRAM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange


@dataclass(frozen=True)
class ElemType:
    name: str
    bits: int
    is_float: bool
    signed: bool
    numpy: str  # numpy dtype of one unpacked element (little-endian where it matters)
    doc: str

    @property
    def nbytes(self) -> int:
        """Bytes of one element of a memory type."""
        if self.bits % 8:
            raise ValueError(f"{self.name} is not a memory type (it is packed)")
        return self.bits // 8

    @property
    def lo(self) -> int:
        """Smallest value of an integer type."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        """Largest value of an integer type."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def packed_bytes(self, count: int) -> int:
        """Bytes `count` elements take packed (4-bit types two to a byte)."""
        return (count * self.bits + 7) // 8

    def np(self) -> np.dtype:
        return np.dtype(self.numpy)


_TYPES = (
    ElemType("f32", 32, True, True, "<f4", "IEEE binary32"),
    ElemType("i32", 32, False, True, "<i4", "32-bit signed integer (token ids, partial sums)"),
    ElemType("f16", 16, True, True, "<f2", "IEEE binary16 (weight scales)"),
    ElemType("i8", 8, False, True, "i1", "8-bit signed integer (activations, weights)"),
    ElemType("u8", 8, False, False, "u1", "8-bit unsigned integer (activations, weights, zero points)"),
    ElemType("i4", 4, False, True, "i1", "4-bit signed integer (weights)"),
    ElemType("u4", 4, False, False, "u1", "4-bit unsigned integer (weights with a zero point)"),
)
ELEM_TYPES: dict[str, ElemType] = {t.name: t for t in _TYPES}
#: Types an instruction's memory operand may have, in their encoding order.
MEMORY_TYPES: tuple[str, ...] = tuple(t.name for t in _TYPES if t.bits % 8 == 0)
#: Types the CIM macros may hold (a weight load's and an MVM's `wt`), in their encoding order.
WEIGHT_TYPES: tuple[str, ...] = ("f32", "i8", "u8", "i4", "u4")
#: The type of activations between ops, and of token ids.
ACT, IDS = "f32", "i32"


def unpack(raw: np.ndarray, wt: str, count: int) -> np.ndarray:
    """`count` weights of integer type `wt` from their packed bytes (4-bit types two to a byte,
    low nibble first), as int16."""
    t = elem(wt)
    if t.bits == 8:
        return raw[:count].view(t.numpy).astype(np.int16)
    if count > 2 * len(raw):
        raise ValueError(f"{count} {wt} weights need {t.packed_bytes(count)} bytes, got {len(raw)}")
    return _nibbles(np.ascontiguousarray(raw, np.uint8), count, t.signed)


@njit(cache=True)
def _nibbles(raw: np.ndarray, count: int, signed: bool) -> np.ndarray:
    out = np.empty(count, np.int16)
    for i in range(count):
        v = (raw[i >> 1] >> 4) if i & 1 else (raw[i >> 1] & 0x0F)
        out[i] = v - 16 if signed and v > 7 else v
    return out


def pack(values: np.ndarray, wt: str) -> np.ndarray:
    """The packed bytes of integer weights of type `wt` (row-major, 4-bit types two to a byte)."""
    t = elem(wt)
    v = np.asarray(values).reshape(-1).astype(np.int64)
    if v.size and (v.min() < t.lo or v.max() > t.hi):
        raise ValueError(f"values outside the range of {wt} [{t.lo}, {t.hi}]")
    if t.bits == 8:
        return v.astype(t.numpy).view(np.uint8)
    u = (v & 0x0F).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return u[0::2] | (u[1::2] << 4)


def pack_blocks(q: np.ndarray, wt: str, blocks: np.ndarray, out: np.ndarray) -> None:
    """Pack blocks of the integer weights `q` [K, N] of type `wt` into `out` (uint8): each row
    (k0, k1, n0, n1, offset) of `blocks` is q[k0:k1, n0:n1] packed row-major like `pack`, from
    byte `offset`. ValueError if a value is outside the type's range."""
    t = elem(wt)
    bad = _pack_blocks(q, np.asarray(blocks, np.int64), t.bits, t.lo, t.hi, out)
    if bad:
        raise ValueError(f"{bad} value(s) outside the range of {wt} [{t.lo}, {t.hi}]")


@njit(cache=True, parallel=True)
def _pack_blocks(q: np.ndarray, blocks: np.ndarray, bits: int, lo: int, hi: int, out: np.ndarray) -> int:
    bad = 0
    for b in prange(blocks.shape[0]):
        k0, k1, n0, n1, off = blocks[b]
        width = n1 - n0
        for r in range(k0, k1):
            i = (r - k0) * width
            for c in range(n0, n1):
                v = int(q[r, c])
                if v < lo or v > hi:
                    bad += 1
                if bits == 8:
                    out[off + i] = v & 0xFF
                elif i & 1:
                    out[off + (i >> 1)] |= (v & 0x0F) << 4
                else:
                    out[off + (i >> 1)] = v & 0x0F
                i += 1
    return bad


def elem(name: str) -> ElemType:
    """The element type called `name`."""
    try:
        return ELEM_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown element type {name!r} (types: {', '.join(ELEM_TYPES)})") from None


@dataclass(frozen=True)
class WeightMode:
    """A `--weights` choice: the element type the macros hold."""

    name: str
    etype: str
    doc: str

    @property
    def bits(self) -> int:
        return ELEM_TYPES[self.etype].bits


WEIGHT_MODES: dict[str, WeightMode] = {m.name: m for m in (
    WeightMode("fp32", "f32", "float weights, float compute: the exact functional check"),
    WeightMode("int8", "i8", "symmetric 8-bit weights"),
    WeightMode("int4", "i4", "symmetric 4-bit weights"),
)}
