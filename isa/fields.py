"""Field kinds of the CIM instruction set: bit width, value type, range check, assembly text.

Every instruction operand is one of these kinds. The table in `isa.spec` lists, per instruction,
which fields it has; the packer there lays them out in 64-bit words, and encoder, decoder,
assembler and disassembler all go through the methods below, so a kind is defined once.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np

from isa.dtypes import MEMORY_TYPES, WEIGHT_TYPES, elem

#: Runtime registers a size or a row offset may refer to. `seq` is the number of tokens in this
#: call, `past` the tokens already in the KV cache, `ctx` = past + seq.
REGS: tuple[str, ...] = ("zero", "seq", "past", "ctx")

#: Memory spaces an operand may live in: on-chip global buffer, DRAM.
SPACES: tuple[str, ...] = ("g", "d")

#: Element types a memory operand may have (index = encoding), and their sizes.
DTYPES: tuple[str, ...] = MEMORY_TYPES
DTYPE_BYTES: dict[str, int] = {t: elem(t).nbytes for t in DTYPES}


class FieldError(ValueError):
    """A field value that does not fit its kind (raised by `check` and `parse`)."""


class PackError(FieldError):
    """A bad value among many packed at once; `index` says which."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class Dim(NamedTuple):
    """A size: `imm + R[reg]` where R is a runtime register (`zero` makes it a constant)."""

    reg: int
    imm: int

    @classmethod
    def of(cls, value: int | Dim) -> Dim:
        return value if isinstance(value, Dim) else cls(0, int(value))


class Mem(NamedTuple):
    """A 2-D operand: element (r, c) lives at `addr + (r + R[roff]) * stride * esize + c * esize`.

    `space` indexes SPACES, `addr` is a byte address, `stride` the row pitch in elements; a row
    stride of 0 broadcasts one row over all rows. `roff` names a register that offsets the rows
    (the KV-cache append uses `past`).
    """

    space: int
    addr: int
    stride: int
    roff: int = 0


@dataclass(frozen=True)
class Kind:
    """Base class: an unsigned integer field of `bits` bits."""

    bits: int
    name: ClassVar[str] = "uint"

    def check(self, value: object) -> object:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << self.bits):
            raise FieldError(f"expected an integer in [0, {(1 << self.bits) - 1}], got {value!r}")
        return value

    def pack(self, value: object) -> int:
        return int(value)  # type: ignore[call-overload]

    def unpack(self, raw: int) -> object:
        return raw

    def unpack_many(self, raw: np.ndarray) -> list:
        """Vectorised `unpack` of packed values (uint64 array)."""
        return raw.astype(np.int64).tolist() if self.bits < 63 else [self.unpack(int(r)) for r in raw]

    def valid_raw(self, raw: np.ndarray) -> np.ndarray:
        """Vectorised: which packed values (uint64 array) decode to a valid value."""
        return np.ones(raw.shape, dtype=bool)

    def pack_many(self, values: list) -> np.ndarray:
        """Vectorised `check` + `pack` of many values (uint64 array); PackError names the first bad one.
        Kinds override `_pack_fast` for their common value types; anything else goes one by one."""
        fast = self._pack_fast(values)
        if fast is None:
            raw = np.zeros(len(values), np.uint64)
            for i, v in enumerate(values):
                try:
                    raw[i] = self.pack(self.check(v))
                except FieldError as e:
                    raise PackError(i, str(e)) from None
            return raw
        raw, ok = fast
        if ok.all():
            return raw
        bad = int(np.flatnonzero(~ok)[0])
        try:
            self.check(values[bad])
        except FieldError as e:
            raise PackError(bad, str(e)) from None
        raise PackError(bad, f"invalid value {values[bad]!r}")

    def _pack_fast(self, values: list) -> tuple[np.ndarray, np.ndarray] | None:
        if {type(v) for v in values} <= {int} and self.bits < 63:
            a = np.array(values, dtype=np.int64)
            return a.astype(np.uint64), (a >= 0) & (a < (1 << self.bits))
        return None

    def format(self, value: object) -> str:
        return str(value)

    def parse(self, text: str) -> object:
        try:
            value = int(text, 0)
        except ValueError:
            raise FieldError(f"expected an integer, got {text!r}") from None
        return self.check(value)


@dataclass(frozen=True)
class BoolKind(Kind):
    """A one-bit flag written 0 or 1."""

    bits: int = 1
    name: ClassVar[str] = "flag"


@dataclass(frozen=True)
class DimKind(Kind):
    """A size `imm + R[reg]`: 2 register bits and 22 immediate bits; text `16`, `%seq`, `%ctx+1`."""

    bits: int = 24
    name: ClassVar[str] = "dim"
    IMM_BITS: ClassVar[int] = 22

    def check(self, value: object) -> Dim:
        dim = Dim.of(value) if isinstance(value, (int, Dim)) and not isinstance(value, bool) else None
        if dim is None or not 0 <= dim.reg < len(REGS) or not 0 <= dim.imm < (1 << self.IMM_BITS):
            raise FieldError(f"expected a size below {1 << self.IMM_BITS} or %reg[+n], got {value!r}")
        return dim

    def pack(self, value: object) -> int:
        dim = Dim.of(value)  # type: ignore[arg-type]
        return dim.reg | (dim.imm << 2)

    def unpack(self, raw: int) -> Dim:
        return Dim(raw & 3, raw >> 2)

    def unpack_many(self, raw: np.ndarray) -> list:
        r = raw.astype(np.int64)
        return list(map(Dim, (r & 3).tolist(), (r >> 2).tolist()))

    def _pack_fast(self, values: list) -> tuple[np.ndarray, np.ndarray] | None:
        types = {type(v) for v in values}
        if types <= {Dim}:
            a = np.array(values, dtype=np.int64).reshape(-1, 2)
        elif types <= {int}:
            a = np.stack([np.zeros(len(values), np.int64), np.array(values, dtype=np.int64)], 1)
        else:
            return None
        ok = (a[:, 0] >= 0) & (a[:, 0] < len(REGS)) & (a[:, 1] >= 0) & (a[:, 1] < (1 << self.IMM_BITS))
        return (a[:, 0] | (a[:, 1] << 2)).astype(np.uint64), ok

    def format(self, value: object) -> str:
        dim = Dim.of(value)  # type: ignore[arg-type]
        if dim.reg == 0:
            return str(dim.imm)
        return f"%{REGS[dim.reg]}" + (f"+{dim.imm}" if dim.imm else "")

    def parse(self, text: str) -> Dim:
        m = re.fullmatch(r"%(\w+)(?:\+(\d+))?", text)
        if m:
            if m.group(1) not in REGS[1:]:
                raise FieldError(f"unknown register %{m.group(1)} (registers: %{', %'.join(REGS[1:])})")
            return self.check(Dim(REGS.index(m.group(1)), int(m.group(2) or 0)))
        return Kind.parse(self, text)  # type: ignore[return-value]  # int -> self.check -> Dim


@dataclass(frozen=True)
class MemKind(Kind):
    """A memory operand in one 64-bit word: space(2) roff(2) addr(36) stride(24).

    Text: `g:0x1a40/64` (space:address/row-stride), with `+%past` after the stride when rows
    are offset by a register.
    """

    bits: int = 64
    name: ClassVar[str] = "mem"
    ADDR_BITS: ClassVar[int] = 36
    STRIDE_BITS: ClassVar[int] = 24

    def check(self, value: object) -> Mem:
        if not isinstance(value, Mem):
            raise FieldError(f"expected a memory operand, got {value!r}")
        ok = (
            0 <= value.space < len(SPACES)
            and 0 <= value.roff < len(REGS)
            and 0 <= value.addr < (1 << self.ADDR_BITS)
            and 0 <= value.stride < (1 << self.STRIDE_BITS)
        )
        if not ok:
            raise FieldError(f"memory operand out of range: {value!r}")
        return value

    def pack(self, value: object) -> int:
        m: Mem = value  # type: ignore[assignment]
        return m.space | (m.roff << 2) | (m.addr << 4) | (m.stride << 40)

    def _pack_fast(self, values: list) -> tuple[np.ndarray, np.ndarray] | None:
        if not {type(v) for v in values} <= {Mem}:
            return None
        a = np.array(values, dtype=np.int64).reshape(-1, 4)  # space, addr, stride, roff
        ok = ((a[:, 0] >= 0) & (a[:, 0] < len(SPACES)) & (a[:, 3] >= 0) & (a[:, 3] < len(REGS))
              & (a[:, 1] >= 0) & (a[:, 1] < (1 << self.ADDR_BITS))
              & (a[:, 2] >= 0) & (a[:, 2] < (1 << self.STRIDE_BITS)))
        u = a.astype(np.uint64)
        return u[:, 0] | (u[:, 3] << np.uint64(2)) | (u[:, 1] << np.uint64(4)) | (u[:, 2] << np.uint64(40)), ok

    def unpack(self, raw: int) -> Mem:
        return Mem(raw & 3, (raw >> 4) & ((1 << self.ADDR_BITS) - 1), raw >> 40, (raw >> 2) & 3)

    def unpack_many(self, raw: np.ndarray) -> list:
        r = raw.astype(np.uint64)
        space, roff = (r & np.uint64(3)).tolist(), ((r >> np.uint64(2)) & np.uint64(3)).tolist()
        addr = ((r >> np.uint64(4)) & np.uint64((1 << self.ADDR_BITS) - 1)).tolist()
        return list(map(Mem, space, addr, (r >> np.uint64(40)).tolist(), roff))

    def valid_raw(self, raw: np.ndarray) -> np.ndarray:
        return (raw & np.uint64(3)) < len(SPACES)

    def format(self, value: object) -> str:
        m: Mem = value  # type: ignore[assignment]
        text = f"{SPACES[m.space]}:{m.addr:#x}/{m.stride}"
        return text + (f"+%{REGS[m.roff]}" if m.roff else "")

    def parse(self, text: str) -> Mem:
        m = re.fullmatch(r"(\w+):(0x[0-9a-fA-F]+|\d+)/(\d+)(?:\+%(\w+))?", text)
        if not m:
            raise FieldError(f"expected a memory operand like g:0x100/64, got {text!r}")
        space, addr, stride, reg = m.groups()
        if space not in SPACES:
            raise FieldError(f"unknown memory space {space!r} (spaces: {', '.join(SPACES)})")
        if reg is not None and reg not in REGS[1:]:
            raise FieldError(f"unknown register %{reg}")
        return self.check(Mem(SPACES.index(space), int(addr, 0), int(stride), REGS.index(reg) if reg else 0))


@dataclass(frozen=True)
class F32Kind(Kind):
    """An IEEE binary32 immediate; text is the shortest repr that round-trips (`inf` allowed)."""

    bits: int = 32
    name: ClassVar[str] = "f32"

    def check(self, value: object) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise FieldError(f"expected a finite or infinite number, got {value!r}")
        try:
            return struct.unpack("<f", struct.pack("<f", value))[0]
        except OverflowError:
            raise FieldError(f"{value!r} does not fit a 32-bit float") from None

    def pack(self, value: object) -> int:
        return struct.unpack("<I", struct.pack("<f", value))[0]  # type: ignore[arg-type]

    def unpack(self, raw: int) -> float:
        return struct.unpack("<f", struct.pack("<I", raw))[0]

    def unpack_many(self, raw: np.ndarray) -> list:
        return raw.astype(np.uint32).view(np.float32).astype(np.float64).tolist()

    def valid_raw(self, raw: np.ndarray) -> np.ndarray:
        return ~np.isnan(raw.astype(np.uint32).view(np.float32))

    def _pack_fast(self, values: list) -> tuple[np.ndarray, np.ndarray] | None:
        if not {type(v) for v in values} <= {float, int}:
            return None
        wide = np.array(values, dtype=np.float64)
        with np.errstate(over="ignore"):
            narrow = wide.astype(np.float32)
        ok = ~np.isnan(wide) & ~(np.isinf(narrow) & np.isfinite(wide))
        return narrow.view(np.uint32).astype(np.uint64), ok

    def format(self, value: object) -> str:
        return repr(float(value))  # type: ignore[arg-type]

    def parse(self, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise FieldError(f"expected a number, got {text!r}") from None
        return self.check(value)


@dataclass(frozen=True)
class EnumKind(Kind):
    """A small enumeration written by name (element types)."""

    names: tuple[str, ...] = DTYPES
    bits: int = 3
    name: ClassVar[str] = "enum"

    def check(self, value: object) -> int:
        if isinstance(value, str) and value in self.names:
            return self.names.index(value)
        if isinstance(value, int) and value < len(self.names):
            return Kind.check(self, value)  # type: ignore[return-value]
        return self._bad(value)

    def valid_raw(self, raw: np.ndarray) -> np.ndarray:
        return raw < len(self.names)

    def pack(self, value: object) -> int:
        return self.check(value)

    def _pack_fast(self, values: list) -> tuple[np.ndarray, np.ndarray] | None:
        if not {type(v) for v in values} <= {str}:
            return None
        codes = np.array([self.names.index(v) if v in self.names else -1 for v in values], dtype=np.int64)
        return codes.astype(np.uint64), codes >= 0

    def _bad(self, value: object) -> int:
        raise FieldError(f"expected one of {', '.join(self.names)}, got {value!r}")

    def format(self, value: object) -> str:
        return self.names[value]  # type: ignore[index]

    def parse(self, text: str) -> int:
        return self.check(text)


U = Kind
FLAG = BoolKind()
DIM = DimKind()
MEM = MemKind()
F32 = F32Kind()
DTYPE = EnumKind()
WTYPE = EnumKind(names=WEIGHT_TYPES)
