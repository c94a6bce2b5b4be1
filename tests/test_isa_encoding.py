"""Instruction encoding: a golden 64-byte vector per mnemonic, bit placement, round trips, errors."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from isa_fixtures import random_instr

from isa.encoding import EncodingError, Instr, code_words, decode, decode_columns, decode_one, encode
from isa.fields import Dim, Mem
from isa.spec import BY_NAME, INSTRS, N_BARRIERS

G, D = 0, 1
SEQ, PAST, CTX = 1, 2, 3

#: One hand-chosen instance per mnemonic (distinct values, so misplaced bits show).
CASES = [
    Instr("halt", {}),
    Instr("sync", {}, sig=5, wait=(1 << 1) | (1 << 4) | (1 << 63)),
    Instr("dma", {"dst": Mem(G, 0x1A40, 64), "src": Mem(D, 0x123456789, 4096, PAST), "rows": Dim(SEQ, 0),
                  "cols": Dim(0, 64), "dt": "f32"}, sig=1),
    Instr("gather", {"dst": Mem(G, 0x0, 576), "table": Mem(D, 0x40000, 576), "idx": Mem(D, 0x100, 1),
                     "n": Dim(SEQ, 0), "cols": Dim(0, 576), "vocab": 49152}, sig=2, wait=1 << 3),
    Instr("wload", {"tile": 3, "m0": 4, "k": 576, "n": 1536, "wt": "i8", "src": Mem(D, 0x8000000, 1536)}),
    Instr("mvm", {"tile": 7, "m0": 12, "k": 256, "n": 128, "wt": "u4", "xt": "i8", "gk": 32, "acc": 1,
                  "nvec": Dim(SEQ, 0), "wst": "f16", "dst": Mem(G, 0x20000, 128), "src": Mem(G, 0x10000, 256),
                  "xs": Mem(G, 0x30000, 8), "ws": Mem(D, 0x8100000, 128), "wz": Mem(D, 0x8100800, 128)}, sig=9),
    Instr("tred", {"dst": Mem(G, 0x3000, 64), "src": Mem(G, 0x40000, 64), "rows": Dim(CTX, 1),
                   "cols": Dim(0, 64), "count": 4, "pstride": 0x10000}, wait=1 << 9),
    Instr("vadd", {"tile": 0, "dst": Mem(G, 0x100, 32), "a": Mem(G, 0x200, 32), "b": Mem(G, 0x300, 0),
                   "rows": Dim(SEQ, 0), "cols": Dim(0, 32), "abc": 0, "bbc": 1}),
    Instr("vsub", {"tile": 1, "dst": Mem(G, 0x400, 16), "a": Mem(G, 0x500, 16), "b": Mem(G, 0x600, 1),
                   "rows": Dim(0, 8), "cols": Dim(0, 16), "abc": 0, "bbc": 1}),
    Instr("vmul", {"tile": 2, "dst": Mem(G, 0x700, 8), "a": Mem(D, 0x800, 8, PAST), "b": Mem(G, 0x900, 8),
                   "rows": Dim(PAST, 2), "cols": Dim(0, 8), "abc": 1, "bbc": 0}, sig=63),
    Instr("vdiv", {"tile": 3, "dst": Mem(G, 0xA00, 4), "a": Mem(G, 0xB00, 4), "b": Mem(G, 0xC00, 1),
                   "rows": Dim(0, 3), "cols": Dim(0, 4), "abc": 0, "bbc": 1}),
    Instr("vmax", {"tile": 4, "dst": Mem(G, 0xD00, 2), "a": Mem(G, 0xE00, 2), "b": Mem(G, 0xF00, 2),
                   "rows": Dim(0, 1), "cols": Dim(0, 2), "abc": 1, "bbc": 1}),
    Instr("vpow", {"tile": 6, "dst": Mem(G, 0x1100, 3), "a": Mem(G, 0x1200, 3), "b": Mem(G, 0x1300, 0),
                   "rows": Dim(0, 5), "cols": Dim(0, 3), "abc": 0, "bbc": 0}),
    Instr("vcopy", {"tile": 5, "dst": Mem(D, 0x100000, 64, PAST), "src": Mem(G, 0x1000, 64),
                    "rows": Dim(SEQ, 0), "cols": Dim(0, 64)}),
    Instr("vneg", {"tile": 6, "dst": Mem(G, 0x10, 1), "src": Mem(G, 0x20, 1), "rows": Dim(0, 1),
                   "cols": Dim(0, 1)}),
    Instr("vexp", {"tile": 7, "dst": Mem(G, 0x30, 128), "src": Mem(G, 0x40, 128), "rows": Dim(SEQ, 0),
                   "cols": Dim(CTX, 0)}),
    Instr("vsqrt", {"tile": 8, "dst": Mem(G, 0x50, 1), "src": Mem(G, 0x60, 1), "rows": Dim(SEQ, 0),
                    "cols": Dim(0, 1)}),
    Instr("vrsqrt", {"tile": 9, "dst": Mem(G, 0x70, 1), "src": Mem(G, 0x80, 1), "rows": Dim(SEQ, 0),
                     "cols": Dim(0, 1)}),
    Instr("vrecip", {"tile": 10, "dst": Mem(G, 0x90, 1), "src": Mem(G, 0xA0, 1), "rows": Dim(SEQ, 0),
                     "cols": Dim(0, 1)}),
    Instr("vsigmoid", {"tile": 11, "dst": Mem(G, 0xB0, 1536), "src": Mem(G, 0xC0, 1536), "rows": Dim(SEQ, 0),
                       "cols": Dim(0, 1536)}),
    Instr("vsilu", {"tile": 12, "dst": Mem(G, 0xD0, 1536), "src": Mem(G, 0xE0, 1536), "rows": Dim(SEQ, 0),
                    "cols": Dim(0, 1536)}),
    Instr("vtanh", {"tile": 13, "dst": Mem(G, 0xF0, 64), "src": Mem(G, 0x110, 64), "rows": Dim(0, 7),
                    "cols": Dim(0, 64)}),
    Instr("vgelu", {"tile": 14, "dst": Mem(G, 0x120, 64), "src": Mem(G, 0x130, 64), "rows": Dim(SEQ, 0),
                    "cols": Dim(0, 64)}),
    Instr("vaffine", {"tile": 15, "dst": Mem(G, 0x140, 64), "src": Mem(G, 0x150, 64), "rows": Dim(SEQ, 0),
                      "cols": Dim(0, 64), "alpha": 0.125, "beta": -1.5}),
    Instr("vrsum", {"tile": 16, "dst": Mem(G, 0x160, 1), "src": Mem(G, 0x170, 576), "rows": Dim(SEQ, 0),
                    "cols": Dim(0, 576)}),
    Instr("vrmax", {"tile": 17, "dst": Mem(G, 0x180, 1), "src": Mem(G, 0x190, 0), "rows": Dim(SEQ, 0),
                    "cols": Dim(CTX, 0)}),
    Instr("vrope", {"tile": 18, "dst": Mem(G, 0x1A0, 576), "src": Mem(G, 0x1B0, 576),
                    "cos": Mem(D, 0x1C0, 64, PAST), "sin": Mem(D, 0x1D0, 64, PAST), "rows": Dim(SEQ, 0),
                    "cols": Dim(0, 576), "hd": 64, "rd": 32}),
    Instr("vmm", {"tile": 19, "dst": Mem(G, 0x1E0, 256), "a": Mem(G, 0x1F0, 64), "b": Mem(D, 0x200, 64),
                  "m": Dim(SEQ, 0), "k": Dim(0, 64), "n": Dim(CTX, 0), "tb": 1, "acc": 1, "alpha": 0.125}),
    Instr("vquant", {"tile": 21, "asym": 1, "dst": Mem(G, 0x220, 576), "sc": Mem(G, 0x230, 2),
                     "src": Mem(G, 0x240, 576), "rows": Dim(SEQ, 0), "cols": Dim(0, 576), "group": 0}, sig=6),
    Instr("vcausal", {"tile": 20, "dst": Mem(G, 0x210, 256), "rows": Dim(SEQ, 0), "cols": Dim(CTX, 0),
                      "diag": Dim(PAST, 0), "window": 4096, "one": 1}, sig=4, wait=1 << 2),
    Instr("vgelut", {"tile": 22, "dst": Mem(G, 0x250, 64), "src": Mem(G, 0x260, 64), "rows": Dim(SEQ, 0),
                     "cols": Dim(0, 64)}),
    Instr("vsoftcap", {"tile": 23, "dst": Mem(G, 0x270, 256), "src": Mem(G, 0x270, 256), "rows": Dim(SEQ, 0),
                       "cols": Dim(CTX, 0), "cap": 50.0}),
    Instr("verf", {"tile": 24, "dst": Mem(G, 0x280, 64), "src": Mem(G, 0x290, 64), "rows": Dim(SEQ, 0),
                   "cols": Dim(0, 64)}),]

#: Their encodings, computed once and frozen: 8 little-endian words per instruction, as hex bytes.
GOLDEN = {
    "halt": "0000000000000000 0000000000000000 0000000000000000 0000000000000000"
            " 0000000000000000 0000000000000000 0000000000000000 0000000000000000",
    "sync": "0105000000000000 1200000000000080 0000000000000000 0000000000000000"
            " 0000000000000000 0000000000000000 0000000000000000 0000000000000000",
    "dma": "1001000000000000 0000000000000000 00a4010000400000 9978563412001000"
           " 0100000001000000 0000000000000000 0000000000000000 0000000000000000",
    "gather": "1102000000000000 0800000000000000 0000000000400200 0100400000400200"
              " 0110000000010000 0100000009000000 00c0000000000000 0000000000000000",
    "wload": "1200030440020006 0000000000000000 0100000000000000 0100008000000600"
             " 0000000000000000 0000000000000000 0000000000000000 0000000000000000",
    "mvm": "1309070c00018000 0000000000000000 1c08c00000000100 0000200000800000"
           " 0000100000000100 0000300000080000 0100008100800000 0180008100800000",
    "vquant": "4506150100000000 0000000000000000 0022000000400200 0023000000020000"
              " 0024000000400200 0100000009000000 0000000000000000 0000000000000000",
    "tred": "1400000000000000 0002000000000000 0000030000400000 0000400000400000"
            " 0700000001000400 0000010000000000 0000000000000000 0000000000000000",
    "vadd": "2000000000000000 0000000000000000 0010000000200000 0020000000200000"
            " 0030000000000000 0100008000000200 0000000000000000 0000000000000000",
    "vsub": "2100010000000000 0000000000000000 0040000000100000 0050000000100000"
            " 0060000000010000 2000004000000200 0000000000000000 0000000000000000",
    "vmul": "223f020000000000 0000000000000000 0070000000080000 0980000000080000"
            " 0090000000080000 0a00002000000100 0000000000000000 0000000000000000",
    "vdiv": "2300030000000000 0000000000000000 00a0000000040000 00b0000000040000"
            " 00c0000000010000 0c00001000000200 0000000000000000 0000000000000000",
    "vmax": "2400040000000000 0000000000000000 00d0000000020000 00e0000000020000"
            " 00f0000000020000 0400000800000300 0000000000000000 0000000000000000",
    "vpow": "2500060000000000 0000000000000000 0010010000030000 0020010000030000"
            " 0030010000000000 1400000c00000000 0000000000000000 0000000000000000",
    "vcopy": "3000050000000000 0000000000000000 0900000100400000 0000010000400000"
             " 0100000001000000 0000000000000000 0000000000000000 0000000000000000",
    "vneg": "3100060000000000 0000000000000000 0001000000010000 0002000000010000"
            " 0400000400000000 0000000000000000 0000000000000000 0000000000000000",
    "vexp": "3200070000000000 0000000000000000 0003000000800000 0004000000800000"
            " 0100000300000000 0000000000000000 0000000000000000 0000000000000000",
    "vsqrt": "3300080000000000 0000000000000000 0005000000010000 0006000000010000"
             " 0100000400000000 0000000000000000 0000000000000000 0000000000000000",
    "vrsqrt": "3400090000000000 0000000000000000 0007000000010000 0008000000010000"
              " 0100000400000000 0000000000000000 0000000000000000 0000000000000000",
    "vrecip": "35000a0000000000 0000000000000000 0009000000010000 000a000000010000"
              " 0100000400000000 0000000000000000 0000000000000000 0000000000000000",
    "vsigmoid": "36000b0000000000 0000000000000000 000b000000000600 000c000000000600"
                " 0100000018000000 0000000000000000 0000000000000000 0000000000000000",
    "vsilu": "37000c0000000000 0000000000000000 000d000000000600 000e000000000600"
             " 0100000018000000 0000000000000000 0000000000000000 0000000000000000",
    "vtanh": "38000d0000000000 0000000000000000 000f000000400000 0011000000400000"
             " 1c00000001000000 0000000000000000 0000000000000000 0000000000000000",
    "vgelu": "39000e0000000000 0000000000000000 0012000000400000 0013000000400000"
             " 0100000001000000 0000000000000000 0000000000000000 0000000000000000",
    "vaffine": "3a000f0000000000 0000000000000000 0014000000400000 0015000000400000"
               " 0100000001000000 0000003e0000c0bf 0000000000000000 0000000000000000",
    "vrsum": "4000100000000000 0000000000000000 0016000000010000 0017000000400200"
             " 0100000009000000 0000000000000000 0000000000000000 0000000000000000",
    "vrmax": "4100110000000000 0000000000000000 0018000000010000 0019000000000000"
             " 0100000300000000 0000000000000000 0000000000000000 0000000000000000",
    "vrope": "4200120000000000 0000000000000000 001a000000400200 001b000000400200"
             " 091c000000400000 091d000000400000 0100000009004000 2000000000000000",
    "vmm": "4300130000000000 0000000000000000 001e000000000100 001f000000400000"
           " 0120000000400000 0100000001000000 030000030000f800 0000000000000000",
    "vcausal": "4404140000000000 0400000000000000 0021000000000100 0100000300000000"
               " 0200000010000001 0000000000000000 0000000000000000 0000000000000000",
    "vgelut": "3b00160000000000 0000000000000000 0025000000400000 0026000000400000"
              " 0100000001000000 0000000000000000 0000000000000000 0000000000000000",
    "vsoftcap": "3c00170000000000 0000000000000000 0027000000000100 0027000000000100"
                " 0100000300000000 0000484200000000 0000000000000000 0000000000000000",
    "verf": "3d00180000000000 0000000000000000 0028000000400000 0029000000400000"
            " 0100000001000000 0000000000000000 0000000000000000 0000000000000000",
}


def case(mnemonic: str) -> Instr:
    """A fresh copy of the hand-chosen instance (validation normalises field values in place)."""
    c = next(c for c in CASES if c.op == mnemonic)
    return Instr(c.op, dict(c.f), c.sig, c.wait)


def test_every_table_row_has_a_golden_vector():
    names = [i.mnemonic for i in INSTRS]
    assert sorted(GOLDEN) == sorted(names)
    assert sorted(c.op for c in CASES) == sorted(names)


@pytest.mark.parametrize("mnemonic", sorted(GOLDEN))
def test_golden_encoding(mnemonic):
    instr = case(mnemonic)
    expected = bytes.fromhex(GOLDEN[mnemonic])
    assert len(expected) == 64
    assert encode([instr]) == expected
    assert decode(expected) == [instr.validate()]


def _word(code: bytes, k: int) -> int:
    return int.from_bytes(code[8 * k:8 * k + 8], "little")


def test_header_bits_by_hand():
    # sync: opcode 0x01 in byte 0, sig 5 in bits 8-13 (byte 1), wait mask = word 1 (bytes 8-15).
    code = encode([Instr("sync", {}, sig=5, wait=(1 << 1) | (1 << 4) | (1 << 63))])
    assert code[0] == 0x01 and code[1] == 0x05
    assert code[8] == 0b0001_0010 and code[15] == 0x80 and code[9:15] == bytes(6)
    # the largest barrier fills bits 8-13 and leaves the two spare bits 14-15 clear
    code = encode([Instr("halt", {}, sig=N_BARRIERS - 1)])
    assert code[1] == 0b0011_1111 and _word(code, 0) == 63 << 8


def test_mem_operand_bits_by_hand():
    # dma: word 0 has 48 free bits, too few for a 64-bit memory operand, so dst takes word 2 and
    # src word 3; a memory word is space (bits 0-1), roff (2-3), addr (4-39), stride (40-63).
    dma = BY_NAME["dma"]
    assert (dma.field("dst").word, dma.field("dst").shift) == (2, 0)
    assert (dma.field("src").word, dma.field("src").shift) == (3, 0)
    code = encode([case("dma")])  # dst g:0x1a40/64, src d:0x123456789/4096+%past
    assert _word(code, 2) == (0x1A40 << 4) | (64 << 40)
    src = _word(code, 3)
    assert src & 0b11 == 1 and (src >> 2) & 0b11 == 2
    assert (src >> 4) & ((1 << 36) - 1) == 0x123456789 and src >> 40 == 4096
    assert code[24] == 0x01 | (2 << 2) | (0x9 << 4)  # space d, roff %past, low address nibble 9


def test_vquant_asym_flag_by_hand():
    # vquant: tile in byte 2, the asym flag right after it (bit 24 = byte 3, bit 0); sc (word 3) holds
    # each row's scale and zero point (stride 2); group (0) in bits 48-63 of word 5
    vq = BY_NAME["vquant"]
    assert (vq.field("asym").word, vq.field("asym").shift) == (0, 24)
    code = encode([case("vquant")])
    assert code[2] == 21 and code[3] == 0x01 and code[4:8] == bytes(4)
    assert _word(code, 3) == (0x230 << 4) | (2 << 40)
    assert _word(code, 5) >> 48 == 0
    sym = case("vquant")
    sym.f["asym"] = 0
    assert encode([sym])[3] == 0


def test_field_packing_by_hand():
    # vaffine: tile right after the header in word 0 (bit 16 = byte 2); dst, src words 2, 3;
    # rows, cols (24 bits each) in word 4; alpha no longer fits there, so alpha, beta fill word 5.
    code = encode([case("vaffine")])
    assert code[0] == 0x3A and code[2] == 15
    assert _word(code, 4) == (SEQ | (0 << 2)) | ((0 | (64 << 2)) << 24)
    assert code[40:44] == struct.pack("<f", 0.125) == bytes.fromhex("0000003e")
    assert code[44:48] == struct.pack("<f", -1.5) == bytes.fromhex("0000c0bf")


def test_encode_checks_every_field_with_its_index():
    """The vectorised encoder rejects exactly what validate() rejects, naming the instruction."""
    rng = np.random.default_rng(3)
    good = [random_instr(rng) for _ in range(50)] + CASES  # the cases: every field, whatever the draw
    encode(good)
    bad_cases = [
        ("tile", 256, "field tile: expected an integer in [0, 255], got 256"),
        ("dst", Mem(0, 1 << 40, 1), "field dst: memory operand out of range"),
        ("rows", Dim(0, 1 << 22), "field rows: expected a size below"),
        ("alpha", float("nan"), "field alpha:"),
        ("alpha", 1e39, "field alpha: 1e+39 does not fit a 32-bit float"),
        ("dt", "f64", None),
    ]
    for field, value, message in bad_cases:
        victim = next((k, i) for k, i in enumerate(good) if field in i.f)
        k, ins = victim
        broken = list(good)
        broken[k] = Instr(ins.op, {**ins.f, field: value}, ins.sig, ins.wait)
        with pytest.raises(EncodingError) as e:
            encode(broken)
        assert str(e.value).startswith(f"instruction {k}: {ins.op}: field {field}:")
        if message:
            assert message in str(e.value)


def test_random_round_trips_and_columns():
    rng = np.random.default_rng(1234)
    instrs = [random_instr(rng) for _ in range(2000)]
    code = encode(instrs)
    assert len(code) == 64 * len(instrs)
    decoded = decode(code)
    assert decoded == instrs
    assert encode(decoded) == code  # also catches -0.0 vs 0.0
    cols = decode_columns(code)
    assert len(cols) == len(instrs)
    assert cols.opcode.tolist() == [BY_NAME[i.op].opcode for i in instrs]
    assert cols.sig.tolist() == [i.sig for i in instrs]
    assert [int(w) for w in cols.wait] == [i.wait for i in instrs]
    for op, rows in cols.rows.items():
        for j, row in enumerate(rows):
            ins = instrs[row]
            assert ins.op == op
            for fd in ins.spec.fields:
                assert int(cols.fields[op][fd.name][j]) == fd.kind.pack(ins.f[fd.name]), (row, fd.name)


def _words(instr: Instr) -> np.ndarray:
    return code_words(encode([instr])).copy()


def test_decode_unknown_opcode():
    w = _words(Instr("halt", {}))
    w[0, 0] = 0xFF
    with pytest.raises(EncodingError, match=r"^instruction 7: unknown opcode 0xff$"):
        decode_one(w[0], 7)
    code = encode([Instr("halt", {})]) + w.tobytes()
    with pytest.raises(EncodingError, match=r"^instruction 1: unknown opcode 0xff$"):
        decode(code)
    with pytest.raises(EncodingError, match=r"^instruction 1: unknown opcode 0xff$"):
        decode_columns(code)


@pytest.mark.parametrize(("word", "bit"), [(0, 14), (0, 15), (4, 60), (7, 0), (6, 63)])
def test_decode_reserved_bits(word, bit):
    # dma uses words 0 (header), 1 (wait), 2-3 (dst, src) and bits 0-50 of word 4
    w = _words(case("dma"))
    w[0, word] |= np.uint64(1 << bit)
    with pytest.raises(EncodingError, match=r"^instruction 0 \(dma\): reserved bits are set$"):
        decode_one(w[0])


def test_decode_invalid_values():
    w = _words(case("dma"))
    w[0, 2] |= np.uint64(3)  # memory space 3 does not exist
    with pytest.raises(EncodingError, match=r"^instruction 0: dma: field dst: memory operand out of range"):
        decode_one(w[0])
    w = _words(case("dma"))
    w[0, 1] |= np.uint64(1)  # barrier 0 is "none", it cannot be waited for
    with pytest.raises(EncodingError, match=r"wait mask must name barriers 1\.\.63"):
        decode_one(w[0])
    w = _words(case("vaffine"))
    w[0, 5] |= np.uint64(0x7FC00000)  # alpha = NaN
    with pytest.raises(EncodingError, match=r"^instruction 0: vaffine: field alpha:"):
        decode_one(w[0])


def test_decode_wrong_length():
    with pytest.raises(EncodingError, match=r"^code section is 63 bytes, not a multiple of 64$"):
        decode(bytes(63))
    with pytest.raises(EncodingError, match="not a multiple of 64"):
        decode_columns(bytes(65))
    assert decode(b"") == []


def test_decode_builds_what_decode_one_builds():
    """`decode` checks a code section at once and builds its instructions column by column: the
    same instructions (fields, values and their types) as decoding each one on its own."""
    code = encode(CASES)
    whole = decode(code)
    single = [decode_one(w, i) for i, w in enumerate(code_words(code))]
    assert whole == single
    for a, b in zip(whole, single, strict=True):
        assert [type(v) for v in a.f.values()] == [type(v) for v in b.f.values()], a.op
    bad = bytearray(code)
    bad[64 * 3 + 7] |= 0x80  # a reserved bit of the fourth instruction
    with pytest.raises(EncodingError, match="instruction 3"):
        decode(bytes(bad))
