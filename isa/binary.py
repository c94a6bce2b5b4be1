"""The `.cimb` binary container: write a `Program` to disk and read it back, validated.

Layout (all integers little-endian):

* Header, 64 bytes: magic `CIMB`, format version major/minor (u16 each), flags (u32, 0), section
  count (u32), hardware fingerprint (16 ASCII hex chars), crc32 of the section table (u32),
  zero padding, and at byte 60 the crc32 of header bytes 0-59.
* Section table, 32 bytes per section: 4-byte ASCII tag, offset (u64), size (u64), crc32 of the
  section's bytes (u32), zero padding.
* Sections, in this order, each at an offset aligned to 64 bytes except DRAM (4096, so it can be
  memory-mapped): `META` JSON of `Program.meta`, `HWCF` JSON of `Program.hw`, `ENTS` a JSON list
  with one object per entry (`name`, `meta`, `symbols`, debug `ops`), then for entry k (three
  digits) `Ckkk` its 64-byte instructions and `Xkkk` one u32 debug-op index per instruction, and
  last `DRAM` the DRAM image. JSON is UTF-8, with sorted keys and compact separators, so the
  same Program always gives a byte-identical file.

The DRAM image may be many gigabytes: the writer streams it segment by segment and the reader
maps it lazily (its checksum is only checked on request). A failed write leaves nothing behind.
A reader accepts any minor version of its major version and ignores sections it does not know.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO, NamedTuple, TypeVar

import numpy as np

from isa.atomic import atomic_file
from isa.diag import CimcError
from isa.encoding import EncodingError, validate_code
from isa.fields import DTYPES
from isa.program import FORMAT_VERSION, DebugInfo, DramImage, Entry, Program, Symbol
from isa.spec import INSTR_BYTES

MAGIC = b"CIMB"
_HEADER = struct.Struct("<4sHHII16sI24xI")  # ..., table crc, padding, header crc (bytes 0-59)
_ENTRY = struct.Struct("<4sQQI8x")
HEADER_SIZE, ENTRY_SIZE = _HEADER.size, _ENTRY.size
TAGS: tuple[str, ...] = ("META", "HWCF", "ENTS", "DRAM")  # always present; plus Ckkk/Xkkk per entry
SECTION_ALIGN, DRAM_ALIGN = 64, 4096
_CHUNK = 1 << 24  # bytes per read/write when streaming the DRAM image
_T = TypeVar("_T")
_SYMBOL_KEYS = frozenset(("name", "kind", "dtype", "mtype", "shape", "addr", "stride", "heads", "check"))
_ENTRY_TAG = re.compile(r"[CX][0-9]{3}")  # per-entry sections: code C000.., debug map X000..


def _entry_tags(k: int) -> tuple[str, str]:
    """The code and debug-map section tags of entry `k`."""
    return f"C{k:03d}", f"X{k:03d}"



class Section(NamedTuple):
    """One entry of the section table: where a section lives in the file and its checksum."""

    tag: str
    offset: int
    size: int
    crc32: int


# ---- shared validation -----------------------------------------------------------------------

def check_fingerprint(value: object) -> str:
    """Return `value` if it is a hardware fingerprint (16 hex chars); raise ValueError otherwise."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{16}", value):
        raise ValueError(f"hardware fingerprint must be 16 hex characters, got {value!r}")
    return value


def symbol_from_json(obj: object) -> Symbol:
    """Validate the JSON form of a symbol (as written by `Symbol.to_json`) and build it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object, got {type(obj).__name__}")
    if missing := sorted(_SYMBOL_KEYS - obj.keys()):
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    if extra := sorted(obj.keys() - _SYMBOL_KEYS):
        raise ValueError(f"unknown key(s) {', '.join(extra)}")
    for key in ("name", "dtype"):
        if not isinstance(obj[key], str):
            raise ValueError(f"{key} must be a string")
    if obj["kind"] not in ("input", "output"):
        raise ValueError(f"kind must be 'input' or 'output', got {obj['kind']!r}")
    if obj["mtype"] not in DTYPES:
        raise ValueError(f"mtype must be one of {', '.join(DTYPES)}, got {obj['mtype']!r}")
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(
            isinstance(d, str) or (_is_uint(d)) for d in shape):
        raise ValueError(f"shape must be a list of sizes or names, got {shape!r}")
    if obj["check"] not in ("", "ones", "positions"):
        raise ValueError(f"check must be '', 'ones' or 'positions', got {obj['check']!r}")
    for key in ("addr", "stride", "heads"):
        if not _is_uint(obj[key]):
            raise ValueError(f"{key} must be a non-negative integer, got {obj[key]!r}")
    return Symbol.from_json(obj)


def _is_uint(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


#: A JSON decoder that rejects NaN and Infinity, which the writer never emits.
STRICT_JSON = json.JSONDecoder(parse_constant=_reject_constant)


# ---- DRAM image streaming --------------------------------------------------------------------

def image_chunks(image: DramImage) -> Iterator[memoryview]:
    """Yield the whole DRAM image in order as byte views, zero-filling gaps between segments.

    Each segment is produced once; raises ValueError if segments overlap, run past
    `image.size`, or yield a byte count different from their `size`.
    """
    if image.mapped is not None:
        mapped = image.mapped
        if mapped.dtype != np.uint8 or mapped.shape != (image.size,):
            raise ValueError(f"mapped DRAM image is {mapped.dtype}{mapped.shape}, "
                             f"expected uint8 ({image.size},)")
        for pos in range(0, image.size, _CHUNK):
            yield memoryview(mapped[pos:pos + _CHUNK])
        return
    pos = 0
    for seg in image.segments:
        if seg.offset < pos:
            raise ValueError(f"DRAM segment at {seg.offset:#x} overlaps the previous one")
        yield from _zeros(seg.offset - pos)
        done = 0
        for chunk in seg.chunks():
            view = _bytes_view(chunk)
            done += view.nbytes
            if done > seg.size:
                break
            yield view
        if done != seg.size:
            raise ValueError(f"DRAM segment at {seg.offset:#x}: produced {'more than ' * (done > seg.size)}"
                             f"{done} bytes, expected {seg.size}")
        pos = seg.offset + seg.size
    if pos > image.size:
        raise ValueError(f"DRAM segments end at {pos:#x}, past the image size {image.size:#x}")
    yield from _zeros(image.size - pos)


def _bytes_view(chunk: bytes | memoryview | np.ndarray) -> memoryview:
    if isinstance(chunk, np.ndarray):
        chunk = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
    return memoryview(chunk).cast("B")


def _zeros(n: int) -> Iterator[memoryview]:
    block = memoryview(bytes(min(n, _CHUNK)))
    while n > 0:
        yield block[:min(n, _CHUNK)]
        n -= _CHUNK


def crc32_file(path: str | os.PathLike, offset: int, size: int) -> int:
    """crc32 of `size` bytes of a file from `offset`, read in chunks (never all in memory)."""
    crc, buf = 0, bytearray(min(size, _CHUNK))
    with open(path, "rb") as f:
        f.seek(offset)
        while size > 0:
            view = memoryview(buf)[:min(size, _CHUNK)]
            n = f.readinto(view)
            if not n:
                raise CimcError(f"{os.fspath(path)}: unexpected end of file at byte {f.tell()}")
            crc = zlib.crc32(view[:n], crc)
            size -= n
    return crc


# ---- writing ---------------------------------------------------------------------------------

def _small_sections(program: Program) -> list[tuple[str, bytes]]:
    """Encode and validate everything but the DRAM image (ValueError on an invalid Program)."""
    check_fingerprint(program.hw_fingerprint)
    for name in ("meta", "hw"):
        if not isinstance(getattr(program, name), dict):
            raise ValueError(f"Program.{name} must be a dict")
    if not program.entries or len(program.entries) > 999:
        raise ValueError(f"a program needs 1..999 entries, got {len(program.entries)}")
    names = [e.name for e in program.entries]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"entry names must be distinct non-empty strings, got {names}")
    table, code = [], []
    for k, entry in enumerate(program.entries):
        where = f"entry {entry.name!r}"
        syms = [s.to_json() for s in entry.symbols]
        try:
            _parse_symbols(syms)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        ops = entry.debug.ops
        if not isinstance(ops, list) or not all(isinstance(o, dict) for o in ops):
            raise ValueError(f"{where}: DebugInfo.ops must be a list of dicts")
        if not isinstance(entry.meta, dict):
            raise ValueError(f"{where}: meta must be a dict")
        try:
            validate_code(entry.code)
        except EncodingError as e:
            raise ValueError(f"{where}: invalid code: {e}") from None
        idx = np.asarray(entry.debug.instr_op)
        if idx.ndim != 1 or len(idx) != entry.n_instrs or (len(idx) and idx.dtype.kind not in "iu"):
            raise ValueError(f"{where}: DebugInfo.instr_op must be {entry.n_instrs} integers, "
                             f"got {idx.dtype}{idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= len(ops)):
            raise ValueError(f"{where}: DebugInfo.instr_op has indices outside [0, {len(ops)})")
        table.append({"name": entry.name, "meta": entry.meta, "symbols": syms, "ops": ops})
        ctag, xtag = _entry_tags(k)
        code += [(ctag, bytes(entry.code)), (xtag, idx.astype("<u4").tobytes())]
    return [("META", _dumps(program.meta)), ("HWCF", _dumps(program.hw)), ("ENTS", _dumps(table)), *code]


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def write_binary(path: str | os.PathLike, program: Program) -> None:
    """Write `program` to `path` as a `.cimb` file, atomically.

    The DRAM image is streamed from its segments (or from `dram.mapped` for a loaded binary),
    never held whole in memory. The file is built under a temporary name in the same directory
    and renamed over `path` only when complete; on any failure the temporary file is removed and
    an existing `path` is left untouched. An invalid Program raises ValueError (a compiler bug);
    an I/O failure raises CimcError.
    """
    small = _small_sections(program)
    with atomic_file(path, "wb") as f:
        _write(f, program, small)


def _write(f: BinaryIO, program: Program, small: list[tuple[str, bytes]]) -> None:
    table_end = HEADER_SIZE + ENTRY_SIZE * (len(small) + 1)
    f.write(bytes(table_end))  # header and table are filled in once every crc is known
    entries = []
    for tag, data in small:
        offset = _align(f.tell(), SECTION_ALIGN)
        f.write(bytes(offset - f.tell()))
        f.write(data)
        entries.append(Section(tag, offset, len(data), zlib.crc32(data)))
    offset = _align(f.tell(), DRAM_ALIGN)
    f.write(bytes(offset - f.tell()))
    crc = size = 0
    for view in image_chunks(program.dram):
        f.write(view)
        crc = zlib.crc32(view, crc)
        size += view.nbytes
    entries.append(Section("DRAM", offset, size, crc))
    table = b"".join(_ENTRY.pack(e.tag.encode("ascii"), e.offset, e.size, e.crc32) for e in entries)
    header = _HEADER.pack(MAGIC, *FORMAT_VERSION, 0, len(entries), program.hw_fingerprint.encode("ascii"),
                          zlib.crc32(table), 0)
    f.seek(0)
    f.write(header[:-4] + struct.pack("<I", zlib.crc32(header[:-4])) + table)


# ---- reading ---------------------------------------------------------------------------------

def _read_header(f: BinaryIO, name: str, file_size: int) -> tuple[str, dict[str, Section]]:
    """Validate header and section table; return the fingerprint and the sections by tag."""
    head = f.read(HEADER_SIZE)
    if head[:4] != MAGIC:
        raise CimcError(f"{name}: not a cimc binary (bad magic)")
    _need(name, "header", HEADER_SIZE, file_size)
    _, major, minor, flags, count, fingerprint, table_crc, header_crc = _HEADER.unpack(head)
    if major != FORMAT_VERSION[0]:
        raise CimcError(f"{name}: binary format {major}.{minor} is not supported by this cimc "
                        f"(reads {FORMAT_VERSION[0]}.x); recompile the model")
    if zlib.crc32(head[:-4]) != header_crc:
        raise CimcError(f"{name}: header is corrupt (checksum mismatch)")
    if flags:
        raise CimcError(f"{name}: unsupported header flags {flags:#x}")
    try:
        fp = check_fingerprint(fingerprint.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise CimcError(f"{name}: header has an invalid hardware fingerprint {fingerprint!r}") from None
    table_end = HEADER_SIZE + ENTRY_SIZE * count
    _need(name, "section table", table_end, file_size)
    table = f.read(table_end - HEADER_SIZE)
    if zlib.crc32(table) != table_crc:
        raise CimcError(f"{name}: section table is corrupt (checksum mismatch)")
    sections: dict[str, Section] = {}
    for k in range(count):
        raw_tag, offset, size, crc = _ENTRY.unpack_from(table, k * ENTRY_SIZE)
        tag = raw_tag.decode("ascii", "replace")
        if tag in sections:
            raise CimcError(f"{name}: section table lists {tag} twice")
        if offset < table_end:
            raise CimcError(f"{name}: section {tag} starts inside the section table")
        _need(name, f"section {tag}", offset + size, file_size)
        sections[tag] = Section(tag, offset, size, crc)
    if missing := [t for t in TAGS if t not in sections]:
        raise CimcError(f"{name}: missing section(s) {', '.join(missing)}")
    ordered = sorted(sections.values(), key=lambda s: s.offset)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.offset + a.size:
            raise CimcError(f"{name}: sections {a.tag} and {b.tag} overlap")
    return fp, sections


def _need(name: str, what: str, end: int, file_size: int) -> None:
    if end > file_size:
        raise CimcError(f"{name}: truncated: {what} needs bytes up to {end} but the file has {file_size}")


def read_sections(path: str | os.PathLike) -> dict[str, Section]:
    """The validated section table of a `.cimb` file, by tag (header and table checks only)."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return _read_header(f, name, os.fstat(f.fileno()).st_size)[1]
    except OSError as e:
        raise CimcError(f"{name}: cannot read: {e.strerror or e}") from e


def read_binary(path: str | os.PathLike, *, verify_dram: bool = False) -> Program:
    """Read and validate a `.cimb` file; the DRAM image is memory-mapped, not read.

    Every section but DRAM is checksummed, parsed and shape-checked, and every instruction
    decoded; the DRAM checksum is checked only with `verify_dram` (it reads the whole image).
    Any problem raises CimcError naming the file.
    """
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            fingerprint, sections = _read_header(f, name, os.fstat(f.fileno()).st_size)
            data = {}
            for tag, sec in sections.items():
                if tag == "DRAM" or not (tag in TAGS or _ENTRY_TAG.fullmatch(tag)):
                    continue
                f.seek(sec.offset)
                data[tag] = f.read(sec.size)
                if zlib.crc32(data[tag]) != sec.crc32:
                    raise CimcError(f"{name}: section {tag} is corrupt (checksum mismatch)")
        dram = sections["DRAM"]
        if verify_dram and crc32_file(path, dram.offset, dram.size) != dram.crc32:
            raise CimcError(f"{name}: section DRAM is corrupt (checksum mismatch)")
        mapped = (np.memmap(path, mode="r", dtype=np.uint8, offset=dram.offset, shape=(dram.size,))
                  if dram.size else np.zeros(0, dtype=np.uint8))
    except OSError as e:
        raise CimcError(f"{name}: cannot read: {e.strerror or e}") from e
    meta = _section(name, "META", _parse_object, data["META"])
    hw = _section(name, "HWCF", _parse_object, data["HWCF"])
    table = _section(name, "ENTS", _parse_entries, data["ENTS"])
    entries = []
    for k, (ename, emeta, symbols, ops) in enumerate(table):
        ctag, xtag = _entry_tags(k)
        if ctag not in data or xtag not in data:
            raise CimcError(f"{name}: entry {ename!r} has no section {ctag if ctag not in data else xtag}")
        code = _section(name, ctag, _parse_code, data[ctag])
        entries.append(Entry(ename, code, symbols, _parse_debug(name, xtag, ops, data[xtag], len(code)), emeta))
    return Program(entries=entries, dram=DramImage(size=dram.size, mapped=mapped), hw=hw,
                   hw_fingerprint=fingerprint, meta=meta)


def _section(name: str, tag: str, parse: Callable[[bytes], _T], raw: bytes) -> _T:
    """Run `parse(raw)`, turning its ValueError (JSON or shape) into a CimcError for the file."""
    try:
        return parse(raw)
    except (ValueError, EncodingError) as e:
        raise CimcError(f"{name}: section {tag}: {e}") from None


def _parse_object(raw: bytes) -> dict:
    obj = _parse_json(raw)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_json(raw: bytes) -> object:
    try:
        return STRICT_JSON.decode(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8: {e}") from None
    except ValueError as e:
        raise ValueError(f"invalid JSON: {e}") from None


def _parse_each(items: list, parse: Callable[[object], _T], what: str) -> list[_T]:
    """`parse` applied to each item; an error names the item (`what` i)."""
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse(item))
        except ValueError as e:
            raise ValueError(f"{what} {i}: {e}") from None
    return out


def _parse_symbols(items: object) -> list[Symbol]:
    """Validate a JSON list of symbols."""
    if not isinstance(items, list):
        raise ValueError(f"expected a JSON list, got {type(items).__name__}")
    return _parse_each(items, symbol_from_json, "symbol")


def _parse_entry_header(obj: object) -> tuple[str, dict, list[Symbol], list[dict]]:
    """Validate one entry of the ENTS table: (name, meta, symbols, debug ops)."""
    if not isinstance(obj, dict) or set(obj) != {"name", "meta", "symbols", "ops"}:
        raise ValueError("expected an object with keys name, meta, symbols, ops")
    if not isinstance(obj["name"], str) or not obj["name"]:
        raise ValueError("name must be a non-empty string")
    if not isinstance(obj["meta"], dict):
        raise ValueError("meta must be an object")
    return obj["name"], obj["meta"], _parse_symbols(obj["symbols"]), _parse_ops(obj["ops"])


def _parse_entries(raw: bytes) -> list[tuple[str, dict, list[Symbol], list[dict]]]:
    items = _parse_json(raw)
    if not isinstance(items, list) or not items:
        raise ValueError("expected a non-empty JSON list of entries")
    out = _parse_each(items, _parse_entry_header, "entry")
    if len({e[0] for e in out}) != len(out):
        raise ValueError("entry names are not distinct")
    return out


def _parse_code(raw: bytes) -> bytes:
    validate_code(raw)
    return raw


def _parse_ops(ops: object) -> list[dict]:
    """Validate a JSON list of debug ops."""
    if not isinstance(ops, list):
        raise ValueError(f"expected a JSON list, got {type(ops).__name__}")
    for i, op in enumerate(ops):
        if not isinstance(op, dict):
            raise ValueError(f"op {i}: expected an object, got {type(op).__name__}")
    return ops


def _parse_debug(name: str, tag: str, ops: list[dict], raw: bytes, code_bytes: int) -> DebugInfo:
    n_instrs = code_bytes // INSTR_BYTES
    if len(raw) != 4 * n_instrs:
        raise CimcError(f"{name}: section {tag}: {len(raw)} bytes for {n_instrs} instructions "
                        f"(expected {4 * n_instrs})")
    idx = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
    if len(idx) and int(idx.max()) >= len(ops):
        i = int(np.flatnonzero(idx >= len(ops))[0])
        raise CimcError(f"{name}: section {tag}: instruction {i} refers to debug op {int(idx[i])} "
                        f"but the entry has {len(ops)}")
    return DebugInfo(ops, idx)
