"""Encode and decode instructions to and from their 64-byte words, driven by `isa.spec`.

`Instr` is the in-memory form (mnemonic, field values, barrier signal and wait mask).
`encode`/`decode` convert one instruction; `decode_columns` decodes a whole code section at once
into per-field numpy columns, which the timing simulator uses to stay fast on programs with
hundreds of thousands of instructions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from isa.fields import FieldError, PackError
from isa.spec import BY_NAME, BY_OPCODE, INSTR_BYTES, INSTR_WORDS, N_BARRIERS, SIG_BITS, SIG_SHIFT, InstrDef


class EncodingError(ValueError):
    """An instruction that cannot be encoded, or bytes that are not a valid instruction."""


@dataclass(slots=True)
class Instr:
    """One instruction: `op` mnemonic, `f` field values, `sig` barrier (0 = none), `wait` mask."""

    op: str
    f: dict[str, object] = field(default_factory=dict)
    sig: int = 0
    wait: int = 0

    @property
    def spec(self) -> InstrDef:
        return BY_NAME[self.op]

    def validate(self) -> Instr:
        """Check mnemonic, field names and ranges; normalise values (e.g. floats to f32)."""
        spec = BY_NAME.get(self.op)
        if spec is None:
            raise EncodingError(f"unknown instruction {self.op!r}")
        missing = [n for n in spec.field_names if n not in self.f]
        extra = [n for n in self.f if n not in spec.field_names]
        if missing or extra:
            raise EncodingError(
                f"{self.op}: " + "; ".join(
                    p for p in (missing and f"missing field(s) {', '.join(missing)}",
                                extra and f"unknown field(s) {', '.join(extra)}") if p)
            )
        for fd in spec.fields:
            try:
                self.f[fd.name] = fd.kind.check(self.f[fd.name])
            except FieldError as e:
                raise EncodingError(f"{self.op}: field {fd.name}: {e}") from None
        if not _sig_ok(self.sig):
            raise EncodingError(f"{self.op}: sig must be a barrier in [0, {N_BARRIERS - 1}]")
        if not _wait_ok(self.wait):
            raise EncodingError(f"{self.op}: wait mask must name barriers 1..{N_BARRIERS - 1}")
        return self


def _sig_ok(sig: int) -> bool:
    return 0 <= sig < N_BARRIERS


def _wait_ok(wait: int) -> bool:
    """A wait mask names barriers 1.. (barrier 0 is "none")."""
    return 0 <= wait < (1 << N_BARRIERS) and not wait & 1


def encode(instrs: list[Instr]) -> bytes:
    """Encode instructions into a code section, checking every field.

    Vectorised per mnemonic and field (a 1B-parameter model has hundreds of thousands of
    instructions); errors are the same as `Instr.validate`'s, prefixed with the index.
    """
    out = np.zeros((len(instrs), INSTR_WORDS), dtype="<u8")
    groups: dict[str, list[int]] = {}
    for i, ins in enumerate(instrs):
        groups.setdefault(ins.op, []).append(i)
    for op, idx in groups.items():
        spec = BY_NAME.get(op)
        sub = [instrs[i] for i in idx]
        names = set(spec.field_names) if spec is not None else set()
        for k, ins in zip(idx, sub, strict=True):
            if spec is None or ins.f.keys() != names or not _sig_ok(ins.sig) or not _wait_ok(ins.wait):
                try:
                    Instr(ins.op, dict(ins.f), ins.sig, ins.wait).validate()
                except EncodingError as e:
                    raise EncodingError(f"instruction {k}: {e}") from None
        rows = np.array(idx)
        out[rows, 0] = np.uint64(spec.opcode) | (np.array([i.sig for i in sub], np.uint64) << np.uint64(SIG_SHIFT))
        out[rows, 1] = np.array([i.wait for i in sub], np.uint64)
        for fd in spec.fields:
            try:
                raw = fd.kind.pack_many([i.f[fd.name] for i in sub])
            except PackError as e:
                raise EncodingError(f"instruction {idx[e.index]}: {op}: field {fd.name}: {e}") from None
            out[rows, fd.word] |= raw << np.uint64(fd.shift)
    return out.tobytes()


def decode_one(words: list[int] | np.ndarray, index: int = 0) -> Instr:
    """Decode one instruction from its eight words; `index` only labels errors."""
    w = [int(x) for x in words]
    spec = BY_OPCODE.get(w[0] & 0xFF)
    if spec is None:
        raise EncodingError(f"instruction {index}: unknown opcode {w[0] & 0xFF:#04x}")
    used = {0: 0xFFFF, 1: (1 << 64) - 1}
    fields: dict[str, object] = {}
    for fd in spec.fields:
        mask = (1 << fd.kind.bits) - 1
        fields[fd.name] = fd.kind.unpack((w[fd.word] >> fd.shift) & mask)
        used[fd.word] = used.get(fd.word, 0) | (mask << fd.shift)
    if (w[0] >> 14) & 3 or any(w[k] & ~used.get(k, 0) for k in range(INSTR_WORDS)):
        raise EncodingError(f"instruction {index} ({spec.mnemonic}): reserved bits are set")
    ins = Instr(spec.mnemonic, fields, (w[0] >> SIG_SHIFT) & (N_BARRIERS - 1), w[1])
    try:
        return ins.validate()
    except EncodingError as e:
        raise EncodingError(f"instruction {index}: {e}") from None


def code_words(code: bytes) -> np.ndarray:
    """View a code section as an (n, 8) array of little-endian 64-bit words."""
    if len(code) % INSTR_BYTES:
        raise EncodingError(f"code section is {len(code)} bytes, not a multiple of {INSTR_BYTES}")
    return np.frombuffer(code, dtype="<u8").reshape(-1, INSTR_WORDS)


def validate_code(code: bytes) -> None:
    """Check that every instruction of a code section decodes (as `decode_one` would accept it).

    Vectorised: reserved bits and field values (`Kind.valid_raw`) are checked per opcode with
    numpy, so large programs are checked in a fraction of a second.
    Raises `EncodingError` naming the first bad instruction's index.
    """
    w = code_words(code)
    opcode = w[:, 0] & np.uint64(0xFF)
    known = np.isin(opcode, np.fromiter(BY_OPCODE, dtype=np.uint64))
    bad = ~known | ((w[:, 1] & np.uint64(1)) != 0)
    for op in np.unique(opcode[known]):
        spec = BY_OPCODE[int(op)]
        rows = np.flatnonzero(opcode == op)
        sub = w[rows]
        used = [(1 << (SIG_SHIFT + SIG_BITS)) - 1, (1 << 64) - 1] + [0] * (INSTR_WORDS - 2)
        row_bad = np.zeros(len(rows), dtype=bool)
        for fd in spec.fields:
            mask = (1 << fd.kind.bits) - 1
            used[fd.word] |= mask << fd.shift
            raw = (sub[:, fd.word] >> np.uint64(fd.shift)) & np.uint64(mask)
            row_bad |= ~fd.kind.valid_raw(raw)
        for k, u in enumerate(used):
            row_bad |= (sub[:, k] & np.uint64(~u & ((1 << 64) - 1))) != 0
        bad[rows] |= row_bad
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        decode_one(w[i], i)  # raises the precise error
        raise AssertionError(f"instruction {i}: validate_code and decode_one disagree")


def decode(code: bytes) -> list[Instr]:
    """Decode a whole code section into instructions (checks every word, vectorised, then builds
    the instructions column by column)."""
    validate_code(code)
    cols = decode_columns(code)
    out: list[Instr | None] = [None] * len(cols.opcode)
    sig, wait = cols.sig.tolist(), cols.wait.tolist()
    for mnemonic, idx in cols.rows.items():
        spec = BY_NAME[mnemonic]
        values = [fd.kind.unpack_many(cols.fields[mnemonic][fd.name]) for fd in spec.fields]
        names = spec.field_names
        for k, i in enumerate(idx.tolist()):
            out[i] = Instr(mnemonic, {n: v[k] for n, v in zip(names, values, strict=True)}, sig[i], wait[i])
    return out  # type: ignore[return-value]


@dataclass
class Columns:
    """A code section decoded column-wise: opcode, sig and wait per instruction, and for each
    mnemonic the indices of its instructions and their raw field values."""

    opcode: np.ndarray
    sig: np.ndarray
    wait: np.ndarray
    rows: dict[str, np.ndarray]
    fields: dict[str, dict[str, np.ndarray]]

    def __len__(self) -> int:
        return len(self.opcode)


def decode_columns(code: bytes) -> Columns:
    """Vectorised decode: raw (packed) field values per mnemonic, without per-instruction objects.

    Memory operands stay packed (use `mem_parts`); sizes stay packed (use `dim_parts`).
    """
    w = code_words(code)
    opcode = (w[:, 0] & 0xFF).astype(np.int64)
    bad = ~np.isin(opcode, np.fromiter(BY_OPCODE, dtype=np.int64))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise EncodingError(f"instruction {i}: unknown opcode {int(opcode[i]):#04x}")
    rows: dict[str, np.ndarray] = {}
    fields: dict[str, dict[str, np.ndarray]] = {}
    for op in np.unique(opcode):
        spec = BY_OPCODE[int(op)]
        idx = np.flatnonzero(opcode == op)
        rows[spec.mnemonic] = idx
        sub = w[idx]
        fields[spec.mnemonic] = {
            fd.name: (sub[:, fd.word] >> np.uint64(fd.shift)) & np.uint64((1 << fd.kind.bits) - 1)
            if fd.kind.bits < 64 else sub[:, fd.word].copy()
            for fd in spec.fields
        }
    sig = ((w[:, 0] >> np.uint64(SIG_SHIFT)) & np.uint64(N_BARRIERS - 1)).astype(np.int64)
    return Columns(opcode, sig, w[:, 1].copy(), rows, fields)


def mem_parts(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split packed memory operands into (space, roff, addr, stride) int64 columns."""
    raw = raw.astype(np.uint64)
    return (
        (raw & np.uint64(3)).astype(np.int64),
        ((raw >> np.uint64(2)) & np.uint64(3)).astype(np.int64),
        ((raw >> np.uint64(4)) & np.uint64((1 << 36) - 1)).astype(np.int64),
        (raw >> np.uint64(40)).astype(np.int64),
    )


def dim_values(raw: np.ndarray, regs: np.ndarray) -> np.ndarray:
    """Resolve packed sizes against register values `regs` (index = register number)."""
    raw = raw.astype(np.int64)
    return (raw >> 2) + regs[raw & 3]


def mask_bits(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The barriers of each 64-bit mask, as (ptr, bits): mask i names bits[ptr[i]:ptr[i+1]]."""
    return _mask_bits(np.ascontiguousarray(masks, dtype=np.uint64))


@njit(cache=True)
def _mask_bits(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(masks) + 1, dtype=np.int64)
    for i in range(len(masks)):
        m, c = masks[i], 0
        while m:
            m &= m - np.uint64(1)
            c += 1
        ptr[i + 1] = ptr[i] + c
    bits = np.empty(ptr[-1], dtype=np.int64)
    for i in range(len(masks)):
        m, j, b = masks[i], ptr[i], 0
        while m:
            if m & np.uint64(1):
                bits[j] = b
                j += 1
            m >>= np.uint64(1)
            b += 1
    return ptr, bits
