"""The .cimb container: layout, determinism, validation of damaged files, atomic writes."""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from isa_fixtures import BLOB, SECTIONS, make_program

from isa.binary import ENTRY_SIZE, HEADER_SIZE, TAGS, read_binary, read_sections, validate_code, write_binary
from isa.diag import CimcError
from isa.encoding import EncodingError, Instr, code_words, decode_one, encode
from isa.fields import Mem
from isa.program import ArraySegment, DebugInfo, DramImage, Entry, Program
from isa.spec import INSTRS


def expected_image() -> np.ndarray:
    out = np.zeros(0x4000, dtype=np.uint8)
    out[0x40:0x58] = np.arange(6, dtype=np.float32).view(np.uint8)
    out[0x2000:0x2000 + BLOB.size] = BLOB
    return out


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """Run in an empty directory, so files are named `x.cimb` in error messages."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def written(name: str = "x.cimb", program: Program | None = None) -> bytes:
    write_binary(name, program or make_program())
    with open(name, "rb") as f:
        return f.read()


def rewrite(name: str, data: bytes | bytearray) -> None:
    with open(name, "wb") as f:
        f.write(data)


def error(name: str = "x.cimb", **kw) -> str:
    with pytest.raises(CimcError) as e:
        read_binary(name, **kw)
    return e.value.message


def test_deterministic(cwd):
    a = written("a.cimb")
    assert written("b.cimb") == a
    assert written("c.cimb", read_binary("a.cimb")) == a  # a loaded (mapped) binary rewrites identically
    write_binary("a.cimb", read_binary("a.cimb"))  # in place, over the file it maps
    assert open("a.cimb", "rb").read() == a
    assert sorted(os.listdir(cwd)) == ["a.cimb", "b.cimb", "c.cimb"]


def test_layout(cwd):
    data = written()
    magic, major, minor, flags, count, fp = struct.unpack_from("<4sHHII16s", data)
    assert (magic, major, minor, flags, count, fp) == (b"CIMB", 3, 0, 0, len(SECTIONS), b"00112233aabbccdd")
    assert struct.unpack_from("<I", data, 60)[0] == zlib.crc32(data[:60])
    secs = read_sections("x.cimb")
    assert list(secs) == list(SECTIONS) and set(TAGS) <= set(SECTIONS)
    for k, tag in enumerate(SECTIONS):
        entry = struct.unpack_from("<4sQQI", data, HEADER_SIZE + k * ENTRY_SIZE)
        sec = secs[tag]
        assert entry == (tag.encode(), sec.offset, sec.size, sec.crc32)
        assert sec.offset % (4096 if tag == "DRAM" else 64) == 0
        assert zlib.crc32(data[sec.offset:sec.offset + sec.size]) == sec.crc32
    meta = data[secs["META"].offset:secs["META"].offset + secs["META"].size]
    assert meta == '{"model":"t\u00efny","options":{"wbits":8}}'.encode()
    dbix = secs["X000"]
    assert data[dbix.offset:dbix.offset + dbix.size] == struct.pack("<5I", 0, 0, 1, 1, 2)
    ents = data[secs["ENTS"].offset:secs["ENTS"].offset + secs["ENTS"].size]
    assert [e["name"] for e in json.loads(ents)] == ["prefill", "decode"]
    assert len(data) == secs["DRAM"].offset + 0x4000


def test_read_back_equal(cwd):
    p = make_program()
    write_binary("x.cimb", p)
    q = read_binary("x.cimb", verify_dram=True)
    assert [e.name for e in q.entries] == ["prefill", "decode"] and q.n_instrs == 7
    for a, b in zip(q.entries, p.entries, strict=True):
        assert (a.code, a.symbols, a.meta, a.debug.ops) == (b.code, b.symbols, b.meta, b.debug.ops)
        assert a.debug.instr_op.tolist() == b.debug.instr_op.tolist()
    assert q.hw == p.hw and q.meta == p.meta and q.hw_fingerprint == p.hw_fingerprint
    assert q.entry().debug.instr_op.tolist() == [0, 0, 1, 1, 2] and q.entry("decode").n_instrs == 2
    assert q.dram.size == 0x4000 and isinstance(q.dram.mapped, np.memmap)
    assert np.array_equal(q.dram.array(), expected_image())


def test_streams_chunks_of_any_type(cwd):
    @dataclass(frozen=True)
    class Chunky:
        offset: int
        size: int

        def chunks(self):
            yield b"\x01\x02"
            yield memoryview(b"\x03")
            yield np.array([[4, 5], [6, 7]], dtype=np.uint8)[:, ::-1]  # not contiguous
            yield np.zeros(1 << 20, dtype=np.float32)

    dram = DramImage()
    dram.add(Chunky(3, 7 + (4 << 20)))
    dram.size = dram.size + 5
    write_binary("x.cimb", make_program(dram))
    image = read_binary("x.cimb", verify_dram=True).dram.array()
    assert image[:12].tolist() == [0, 0, 0, 1, 2, 3, 5, 4, 7, 6, 0, 0] and image.size == 15 + (4 << 20)
    assert not image[10:].any()


def test_empty_program(cwd):
    entry = Entry("main", b"", [], DebugInfo([], np.zeros(0, np.uint32)), {})
    p = Program([entry], DramImage(), {}, "0" * 16, {})
    data = written(program=p)
    q = read_binary("x.cimb", verify_dram=True)
    assert q.entry().code == b"" and q.dram.size == 0 and q.dram.array().size == 0
    assert len(data) == read_sections("x.cimb")["DRAM"].offset


def test_missing_file(cwd):
    assert error("nope.cimb") == "nope.cimb: cannot read: No such file or directory"


def test_bad_magic(cwd):
    data = written()
    rewrite("x.cimb", b"ELF\x7f" + data[4:])
    assert error() == "x.cimb: not a cimc binary (bad magic)"
    rewrite("x.cimb", b"")
    assert error() == "x.cimb: not a cimc binary (bad magic)"


def test_version(cwd):
    data = bytearray(written())
    data[4:8] = struct.pack("<HH", 4, 0)
    rewrite("x.cimb", data)
    assert error() == ("x.cimb: binary format 4.0 is not supported by this cimc (reads 3.x); "
                       "recompile the model")
    data[4:8] = struct.pack("<HH", 3, 7)  # a newer minor version of the same major reads fine
    data[60:64] = struct.pack("<I", zlib.crc32(data[:60]))
    rewrite("x.cimb", data)
    assert read_binary("x.cimb").n_instrs == 7


def test_truncated(cwd):
    data = written()
    secs = read_sections("x.cimb")
    table_end = HEADER_SIZE + ENTRY_SIZE * len(SECTIONS)
    code_end = secs["C000"].offset + secs["C000"].size
    cases = {
        30: "header needs bytes up to 64 but the file has 30",
        100: f"section table needs bytes up to {table_end} but the file has 100",
        secs["C000"].offset + 10: f"section C000 needs bytes up to {code_end} but the file has "
                                  f"{secs['C000'].offset + 10}",
        len(data) - 1: f"section DRAM needs bytes up to {len(data)} but the file has {len(data) - 1}",
    }
    for cut, message in cases.items():
        rewrite("x.cimb", data[:cut])
        assert error() == f"x.cimb: truncated: {message}"


@pytest.mark.parametrize("tag", ["META", "HWCF", "ENTS", "C000", "X000", "C001", "X001"])
def test_flipped_byte_in_section(cwd, tag):
    data = bytearray(written())
    data[read_sections("x.cimb")[tag].offset + 1] ^= 0x20
    rewrite("x.cimb", data)
    assert error() == f"x.cimb: section {tag} is corrupt (checksum mismatch)"


def test_flipped_byte_in_header_or_table(cwd):
    data = written()
    for pos, what in ((20, "header"), (HEADER_SIZE + ENTRY_SIZE + 5, "section table")):
        damaged = bytearray(data)
        damaged[pos] ^= 1
        rewrite("x.cimb", damaged)
        assert error() == f"x.cimb: {what} is corrupt (checksum mismatch)"


def test_flipped_byte_in_dram_needs_verify(cwd):
    data = bytearray(written())
    data[read_sections("x.cimb")["DRAM"].offset + 0x2001] ^= 0xFF
    rewrite("x.cimb", data)
    assert read_binary("x.cimb").dram.size == 0x4000  # mapped lazily, not checked
    assert error(verify_dram=True) == "x.cimb: section DRAM is corrupt (checksum mismatch)"


def patch(name: str, tag: str, pos: int, new: bytes) -> None:
    """Overwrite bytes inside a section and fix every checksum, as a careful forger would."""
    data = bytearray(open(name, "rb").read())
    k = SECTIONS.index(tag)
    sec = read_sections(name)[tag]
    data[sec.offset + pos:sec.offset + pos + len(new)] = new
    at = HEADER_SIZE + k * ENTRY_SIZE + 20
    data[at:at + 4] = struct.pack("<I", zlib.crc32(data[sec.offset:sec.offset + sec.size]))
    data[32:36] = struct.pack("<I", zlib.crc32(data[HEADER_SIZE:HEADER_SIZE + ENTRY_SIZE * len(SECTIONS)]))
    data[60:64] = struct.pack("<I", zlib.crc32(data[:60]))
    rewrite(name, data)


def section_bytes(name: str, tag: str) -> bytes:
    sec = read_sections(name)[tag]
    with open(name, "rb") as f:
        f.seek(sec.offset)
        return f.read(sec.size)


@pytest.mark.parametrize(("tag", "old", "new", "message"), [
    ("META", b"{", b"[", "section META: invalid JSON: "),
    ("ENTS", b'"input"', b'"inpux"',
     "section ENTS: entry 0: symbol 0: kind must be 'input' or 'output', got 'inpux'"),
    ("ENTS", b'"addr"', b'"adds"', "section ENTS: entry 0: symbol 0: missing key(s) addr"),
    ("ENTS", b'{"layer"', b'["laye"', "section ENTS: invalid JSON: "),
    ("ENTS", b'"decode"', b'"decod\\"', "section ENTS: invalid JSON"),
    ("X000", struct.pack("<I", 1), struct.pack("<I", 99),
     "section X000: instruction 2 refers to debug op 99 but the entry has 3"),
])
def test_invalid_section_contents(cwd, tag, old, new, message):
    written()
    patch("x.cimb", tag, section_bytes("x.cimb", tag).index(old), new)
    assert error().startswith(f"x.cimb: {message}")


def test_section_of_wrong_shape(cwd):
    written()
    size = len(section_bytes("x.cimb", "HWCF"))
    patch("x.cimb", "HWCF", 0, b"[" + b" " * (size - 2) + b"]")
    assert error() == "x.cimb: section HWCF: expected a JSON object, got list"


def test_invalid_code(cwd):
    written()
    patch("x.cimb", "C000", 2 * 64, b"\xee")
    assert error() == "x.cimb: section C000: instruction 2: unknown opcode 0xee"
    written()
    patch("x.cimb", "C000", 3 * 64 + 63, b"\x01")
    assert error() == "x.cimb: section C000: instruction 3 (sync): reserved bits are set"


def test_validate_code_agrees_with_decode_one():
    rng = np.random.default_rng(99)
    specs = [INSTRS[i % len(INSTRS)] for i in range(3 * len(INSTRS))]
    words = code_words(encode([Instr(s.mnemonic, {fd.name: fd.kind.check(0) if fd.kind.name != "mem"
                                                  else Mem(0, 64, 1) for fd in s.fields}) for s in specs]))
    for _ in range(300):
        w = words.copy()
        i, k, bit = int(rng.integers(len(w))), int(rng.integers(8)), int(rng.integers(64))
        w[i, k] ^= np.uint64(1 << bit)
        try:
            decode_one(w[i], i)
            expected = None
        except EncodingError as e:
            expected = str(e)
        try:
            validate_code(w.tobytes())
            got = None
        except EncodingError as e:
            got = str(e)
        assert got == expected, (i, k, bit)


def failing_program() -> Program:
    def boom() -> np.ndarray:
        raise RuntimeError("producer failed")

    dram = DramImage()
    dram.add(ArraySegment(0, 16, lambda: np.zeros(16, np.uint8)))
    dram.add(ArraySegment(64, 16, boom))
    return make_program(dram)


def test_failed_write_leaves_nothing(cwd):
    with pytest.raises(RuntimeError, match="producer failed"):
        write_binary("x.cimb", failing_program())
    assert os.listdir(cwd) == []
    dram = DramImage()
    dram.add(ArraySegment(0, 16, lambda: np.zeros(15, np.uint8)))
    with pytest.raises(ValueError, match="produced 15 bytes, expected 16"):
        write_binary("x.cimb", make_program(dram))
    assert os.listdir(cwd) == []


def test_failed_write_keeps_existing_file(cwd):
    data = written()
    with pytest.raises(RuntimeError):
        write_binary("x.cimb", failing_program())
    assert open("x.cimb", "rb").read() == data
    assert os.listdir(cwd) == ["x.cimb"]


def test_invalid_program_is_not_written(cwd):
    p = make_program()
    p.entries[0].debug.instr_op = np.array([0, 0, 1], dtype=np.uint32)
    with pytest.raises(ValueError, match=r"entry 'prefill': DebugInfo\.instr_op must be 5 integers"):
        write_binary("x.cimb", p)
    p = make_program()
    p.entries[1].name = "prefill"
    with pytest.raises(ValueError, match="entry names must be distinct"):
        write_binary("x.cimb", p)
    p = make_program()
    p.hw_fingerprint = "xyz"
    with pytest.raises(ValueError, match="fingerprint must be 16 hex characters"):
        write_binary("x.cimb", p)
    p = make_program()
    p.meta = {"bad": float("nan")}
    with pytest.raises(ValueError):
        write_binary("x.cimb", p)
    assert os.listdir(cwd) == []


def test_unwritable_destination(cwd):
    with pytest.raises(CimcError, match=r"^cannot write nodir/x.cimb: No such file or directory$"):
        write_binary("nodir/x.cimb", make_program())


def test_meta_json_is_sorted_and_compact(cwd):
    written()
    assert json.loads(section_bytes("x.cimb", "HWCF")) == make_program().hw
    assert section_bytes("x.cimb", "HWCF") == b'{"clock_hz":250000000.0,"name":"edge","tiles":2}'
