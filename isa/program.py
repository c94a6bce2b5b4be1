"""A compiled program: entry points, a shared DRAM image, and the hardware it targets.

This is the in-memory form of a `.cimb` binary (`isa.binary` reads and writes it). A program has
one or more entries (for a language model: `prefill`, which takes a prompt, and `decode`, which
takes one token): each has its own code, I/O symbols and debug map, and all share the DRAM image
(weights, constants) and the DRAM read-write region (the KV cache lives there, so one entry can
continue where another left off). The DRAM image can be far larger than memory (a 1B-parameter
model in fp32 is ~5 GB), so it is a list of segments written out piece by piece, and a loaded
binary maps it from the file instead of reading it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

#: Version of the binary container and of the program semantics; bump on incompatible change.
FORMAT_VERSION = (3, 0)


class Segment(Protocol):
    """A piece of the DRAM image at a fixed offset, produced on demand in chunks."""

    offset: int
    size: int

    def chunks(self) -> Iterator[bytes | memoryview | np.ndarray]: ...


@dataclass(frozen=True)
class ArraySegment:
    """A segment whose bytes come from an array-producing callable (called once, when written).

    The array may be a memory map of a GB-sized table: it is copied out in row blocks of at most
    `CHUNK_BYTES`, never whole.
    """

    offset: int
    size: int
    produce: Callable[[], np.ndarray]

    CHUNK_BYTES: ClassVar[int] = 64 << 20

    def chunks(self) -> Iterator[np.ndarray]:
        data = self.produce()
        if data.nbytes != self.size:
            raise ValueError(f"DRAM segment at {self.offset:#x}: produced {data.nbytes} bytes, "
                             f"expected {self.size}")
        rows = data.reshape(1, -1) if data.ndim < 2 else data
        step = max(1, self.CHUNK_BYTES // max(1, rows[0:1].nbytes))
        for r in range(0, rows.shape[0], step):
            yield np.ascontiguousarray(rows[r:r + step])


@dataclass
class DramImage:
    """The read-only part of DRAM (weights and constants) as non-overlapping segments.

    Gaps between segments are zero. After loading a binary, `mapped` holds the whole image as a
    read-only uint8 array backed by the file.
    """

    size: int = 0
    segments: list[Segment] = field(default_factory=list)
    mapped: np.ndarray | None = None

    def add(self, segment: Segment) -> None:
        if segment.offset < self.size:
            raise ValueError(f"DRAM segment at {segment.offset:#x} overlaps the previous one")
        self.segments.append(segment)
        self.size = segment.offset + segment.size

    def array(self) -> np.ndarray:
        """The whole image as uint8 (maps the file when loaded; builds it in memory otherwise)."""
        if self.mapped is not None:
            return self.mapped
        out = np.zeros(self.size, dtype=np.uint8)
        for seg in self.segments:
            pos = seg.offset
            for chunk in seg.chunks():
                if not memoryview(chunk).nbytes:  # an empty tensor (memoryview cannot cast it)
                    continue
                raw = np.frombuffer(memoryview(chunk).cast("B"), dtype=np.uint8)
                out[pos:pos + raw.size] = raw
                pos += raw.size
        return out


@dataclass(frozen=True)
class Symbol:
    """An input or output of the program, placed in DRAM.

    `shape` is the ONNX shape, its runtime sizes written `"seq"` (tokens this run), `"past"`
    (tokens already in the KV cache) or `"ctx"` (their sum); `dtype` is the ONNX element type the
    user sees (e.g. "int64"), `mtype` the machine's ("i32", "f32"). Row r of the (rows x
    features) matrix is at `addr + r * stride * 4` bytes. With `heads` > 0 the ONNX tensor is
    `[1, heads, rows, head_dim]` over that matrix (a KV cache); a number W for `rows` makes it a
    window buffer: its W slots are the last W cached positions, oldest first (with fewer, they
    fill the first slots and the rest read as zeros). With `check` ("ones" or
    "positions") the input is not read: generation relies on that value (attention mask all ones,
    position ids past + 0..seq-1), and a run checks it. A shape without runtime sizes (a fixed-size
    tensor, see `fixed_matrix`) is the row-major [prod(shape[:-1]), shape[-1]] matrix.
    """

    name: str
    kind: str  # "input" | "output"
    dtype: str
    mtype: str
    shape: tuple[int | str, ...]
    addr: int
    stride: int
    heads: int = 0
    check: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "mtype": self.mtype,
                "shape": list(self.shape), "addr": self.addr, "stride": self.stride, "heads": self.heads,
                "check": self.check}

    def rows(self, seq: int) -> int:
        """Matrix rows of the tensor in a run of `seq` tokens (not for a KV cache: see `heads`)."""
        if any(isinstance(d, str) for d in self.shape):
            return seq
        return fixed_matrix(self.shape)[0]  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, d: dict) -> Symbol:
        return cls(str(d["name"]), str(d["kind"]), str(d["dtype"]), str(d["mtype"]),
                   tuple(d["shape"]), int(d["addr"]), int(d["stride"]), int(d["heads"]), str(d["check"]))


def fixed_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """The [rows, cols] matrix holding a fixed-size tensor row-major: [prod(shape[:-1]), shape[-1]],
    a scalar or vector as one row."""
    if len(shape) < 2:
        return 1, int(shape[0]) if shape else 1
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


@dataclass
class DebugInfo:
    """Which IR op each instruction came from, and each op's ONNX node and model layer."""

    ops: list[dict]  # per IR op: {"op": "linear", "loc": "node_linear_3", "layer": "layer0"}
    instr_op: np.ndarray  # uint32 per instruction: index into `ops`


@dataclass
class Entry:
    """One entry point: its code, inputs/outputs, debug map and metadata (max_seq, gbuf use...)."""

    name: str
    code: bytes
    symbols: list[Symbol]
    debug: DebugInfo
    meta: dict

    @property
    def n_instrs(self) -> int:
        return len(self.code) // 64

    def symbol(self, name: str) -> Symbol:
        for s in self.symbols:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass
class Program:
    """Everything a `.cimb` file holds."""

    entries: list[Entry]
    dram: DramImage
    hw: dict  # the hardware configuration compiled for (HardwareConfig.to_dict())
    hw_fingerprint: str
    meta: dict  # JSON-able: model name, source, options, max_ctx, rw_base, rw_bytes, caches, ...

    def entry(self, name: str | None = None) -> Entry:
        """The entry called `name`, or the first one (the default for `cimc run`)."""
        for e in self.entries:
            if name is None or e.name == name:
                return e
        raise KeyError(name)

    @property
    def n_instrs(self) -> int:
        return sum(e.n_instrs for e in self.entries)
