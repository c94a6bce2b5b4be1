"""Assembly text: instruction syntax, whole-program round trips to identical binaries, errors."""

from __future__ import annotations

import numpy as np
import pytest
from isa_fixtures import make_program, random_instr

import isa.asm
from isa.asm import assemble, disassemble, format_instr, parse_instr
from isa.binary import read_binary, read_sections, write_binary
from isa.diag import CimcError, SourceError
from isa.encoding import Instr, encode
from isa.fields import Dim, Mem
from isa.program import DramImage


def test_format_parse_round_trip():
    rng = np.random.default_rng(5)
    for _ in range(1000):
        instr = random_instr(rng)
        text = format_instr(instr)
        back = parse_instr(text)
        assert back == instr, text
        assert encode([back]) == encode([instr]), text  # -0.0 keeps its sign
        assert parse_instr(format_instr(instr, 17) + "  ; comment") == instr


def test_format_instr_text():
    values = {"tile": 3, "dst": Mem(1, 0x1A40, 64, 2), "src": Mem(0, 0, 64), "rows": Dim(1, 0),
              "cols": Dim(3, 1), "alpha": -0.0, "beta": float("-inf")}
    instr = Instr("vaffine", values, sig=2, wait=0b10010)
    assert format_instr(instr, 4) == ("vaffine  tile=3, dst=d:0x1a40/64+%past, src=g:0x0/64, rows=%seq, "
                                      "cols=%ctx+1, alpha=-0.0, beta=-inf, sig=2, wait=1|4 @4")
    assert format_instr(Instr("halt", {})) == "halt"
    # fields in any order, extra spaces, hex integers
    assert parse_instr("vaffine beta=-inf,alpha=-0.0 , cols=%ctx+1, rows=%seq, src=g:0/64, wait=4|1,"
                       " dst=d:0x1A40/64+%past, sig=2, tile=0x3") == instr.validate()


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("mode", ["inline", "incbin", "auto"])
def test_program_round_trip(cwd, mode):
    write_binary("a.cimb", make_program())
    original = open("a.cimb", "rb").read()
    text = disassemble(read_binary("a.cimb"), dram=mode, binary_path="a.cimb")
    assert text.isascii()
    assert (".incbin" in text) == (mode == "incbin") and (".data" in text) == (mode != "incbin")
    (cwd / "sub").mkdir()
    path = "a.s" if mode != "incbin" else "sub/a.s"
    if mode == "incbin":  # relative paths resolve against the assembly file's directory
        text = text.replace('.incbin "a.cimb"', '.incbin "../a.cimb"')
    open(path, "w").write(text)
    write_binary("b.cimb", assemble(open(path).read(), path))
    assert open("b.cimb", "rb").read() == original
    # and the text of the rebuilt binary is the same text
    rebuilt = disassemble(read_binary("b.cimb"), dram="inline")
    assert rebuilt == disassemble(read_binary("a.cimb"), dram="inline")


def test_disassembly_is_readable(cwd):
    text = disassemble(make_program())
    assert text.startswith("; cimc assembly") and "cimc asm file.s -o file.cimb" in text
    body = text.split("\n.text\n")[1].splitlines()
    assert body[0].startswith("    dma      dst=g:0x100/6, src=d:0x40/6, rows=1, cols=6, dt=f32, sig=1 @0")
    assert body[0].endswith("; #0 linear node_linear_3")
    assert body[2].endswith("; #2 affine n\\xe9ud; x")  # one ASCII line, whatever the ONNX name
    assert body[0].index(";") == body[3].index(";") == body[4].index(";")  # comments aligned
    data = [line for line in text.splitlines() if line.startswith(".data")]
    assert [line.split()[1] for line in data] == ["0x0", "0x1800", "0x2400", "0x3000"]  # zero chunks skipped


def test_incbin_from_unmapped_program(cwd):
    p = make_program()
    write_binary("a.cimb", p)
    text = disassemble(p, dram="incbin", binary_path="a.cimb")
    sec = read_sections("a.cimb")["DRAM"]
    assert f'.incbin "a.cimb" offset={sec.offset} size={0x4000} crc32={sec.crc32:#010x}' in text
    write_binary("b.cimb", assemble(text))
    assert open("b.cimb", "rb").read() == open("a.cimb", "rb").read()
    other = make_program()
    other.dram = DramImage(size=0x4000, mapped=np.ones(0x4000, dtype=np.uint8))
    with pytest.raises(CimcError, match=r"^a\.cimb: its DRAM section differs from the program's image$"):
        disassemble(other, dram="incbin", binary_path="a.cimb")


def test_auto_needs_binary_for_large_images(monkeypatch):
    monkeypatch.setattr(isa.asm, "INLINE_LIMIT", 100)
    with pytest.raises(CimcError, match="too large to inline"):
        disassemble(make_program())
    with pytest.raises(CimcError, match="unknown DRAM mode 'zip'"):
        disassemble(make_program(), dram="zip")


def test_incbin_checks_the_file(cwd):
    write_binary("a.cimb", make_program())
    data = open("a.cimb", "rb").read()
    text = disassemble(read_binary("a.cimb"), dram="incbin", binary_path="a.cimb")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith(".incbin"))

    def fails(message: str) -> None:
        with pytest.raises(SourceError) as e:
            assemble(text.replace('"a.cimb"', '"b.cimb"'), "t.s")
        assert e.value.message.startswith(f"t.s:{line}:9: {message}")

    fails("cannot read b.cimb: No such file or directory")
    open("b.cimb", "wb").write(data[:-10])
    fails(f"b.cimb has {len(data) - 10} bytes, fewer than offset+size = {len(data)}")
    open("b.cimb", "wb").write(data[:-1] + bytes([data[-1] ^ 1]))
    fails("b.cimb changed since it was disassembled")


HEAD = """\
.format 3 0
.fingerprint "0123456789abcdef"
.hw {}
.meta {}
.dram size=16
.entry "main" {}
.op 0 {"op": "x"}
.text
"""


def check_error(text: str, line: int, col: int, message: str) -> None:
    """Assembling `text` fails with `t.s:line:col: message` and a caret under that column."""
    with pytest.raises(SourceError) as e:
        assemble(text, "t.s")
    rendered = e.value.render().splitlines()
    assert rendered[0] == f"t.s:{line}:{col}: {message}"
    source_line = text.splitlines()[line - 1]
    assert rendered[1] == f"  {source_line}"
    assert rendered[2] == "  " + " " * (col - 1) + "^"


@pytest.mark.parametrize(("text", "line", "col", "message"), [
    # syntax (lark)
    (HEAD + "    vexp tile=0 $\n", 9, 17, "unexpected character '$'"),
    (".format 3\n", 1, 10, "unexpected end of line; expected an integer"),
    (HEAD + "    vexp tile=0 dst=g:0x0/4\n", 9, 17, "unexpected 'dst'; expected ',', @N, end of line"),
    # instructions
    (HEAD + "    vad tile=0\n", 9, 5, "unknown instruction 'vad' (did you mean vadd?)"),
    (HEAD + "    xyz\n", 9, 5, "unknown instruction 'xyz'"),
    (HEAD + "    halt x=1\n", 9, 10, "halt: unknown field 'x' (fields: sig, wait)"),
    (HEAD + "    vexp tile=0, tile=1\n", 9, 18, "vexp: duplicate field tile"),
    (HEAD + "    vexp tile=0, dst=g:0x0/4\n", 9, 5, "vexp: missing field(s) src, rows, cols"),
    (HEAD + "    vexp tile=0, dst=q:0x0/4, src=g:0x0/4, rows=1, cols=1\n", 9, 22,
     "vexp: field dst: unknown memory space 'q' (spaces: g, d)"),
    (HEAD + "    vexp tile=256, dst=g:0x0/4, src=g:0x0/4, rows=1, cols=1\n", 9, 15,
     "vexp: field tile: expected an integer in [0, 255], got 256"),
    (HEAD + "    halt wait=0|2\n", 9, 15,
     "halt: field wait: expected barriers 1..63 joined by '|', got '0|2'"),
    (HEAD + "    halt sig=2 @5\n", 9, 16, "debug op @5 out of range (the .op table has 1 entries)"),
    ("    halt\n", 1, 5, "instruction before .text"),
    # directives
    (HEAD.replace(".hw {}", '.hw {"a": }'), 3, 11, "bad JSON: Expecting value"),
    (HEAD.replace(".hw {}", '.hw {"a": 1} x'), 3, 14, "unexpected text after the JSON object"),
    (HEAD.replace('.op 0 {"op": "x"}', '.op 0 {}\n.op 2 {}'), 8, 5,
     ".op numbering gap: expected .op 1, got .op 2"),
    (HEAD.replace(".text\n", ""), 7, 18, "entry 'main': missing .text (the instructions section)"),
    (HEAD + ".entry \"b\" {}\n", 9, 14, "entry 'b': missing .text (the instructions section)"),
    (HEAD.replace(".entry \"main\" {}\n", ""), 6, 1, ".op before .entry (it belongs to an entry)"),
    (HEAD.split(".entry")[0], 5, 14, "missing .entry (a program needs at least one entry)"),
    (HEAD.replace(".meta {}\n", ""), 5, 1, "missing .meta directive before the first .entry"),
    (HEAD + ".entry \"main\" {}\n", 9, 8, "entry name 'main' is empty or used twice"),
    (HEAD.replace(".meta {}\n", ".meta {}\n.meta {}\n"), 5, 1, "duplicate .meta directive (first on line 4)"),
    (HEAD + "    halt\n.hw {}\n", 10, 1, ".hw after an .entry (program directives come first)"),
    (HEAD + "    halt\n.op 1 {}\n", 10, 1, ".op after .text (directives come before the instructions)"),
    (HEAD.replace(".format 3 0", ".format 4 0"), 1, 9,
     "assembly format 4.0 is not supported by this cimc (reads 3.x)"),
    (HEAD.replace("0123456789abcdef", "0123"), 2, 14,
     "hardware fingerprint must be 16 hex characters, got '0123'"),
    (HEAD.replace('.op 0 {"op": "x"}', '.symbol {"name": "x"}'), 7, 9,
     "bad symbol: missing key(s) addr, check, dtype, heads, kind, mtype, shape, stride"),
    (HEAD.replace("size=16\n", "size=16 sizes=3\n"), 5, 15,
     ".dram: unknown argument 'sizes' (arguments: size)"),
    (HEAD + ".data 0x0 AAAA\n", 9, 1, ".data after an .entry (program directives come first)"),
    (HEAD.replace("size=16\n", "size=16\n.data 0x0 AAAA\n.data 0x1 AAAA\n"), 7, 7,
     ".data at 0x1 overlaps the previous .data (ends at 0x3)"),
    (HEAD.replace("size=16\n", "size=16\n.data 0xf AAAA\n"), 6, 7,
     ".data at 0xf runs past the DRAM image size 0x10 (.dram size=)"),
    (HEAD.replace("size=16\n", "size=16\n.data 0x0 AAA\n"), 6, 11, "bad base64 data: Incorrect padding"),
    (HEAD.replace("size=16\n", "size=16\n.data 0x0 AAAA\n.incbin \"x\" offset=0 size=16 crc32=0\n"), 7, 1,
     ".incbin cannot be combined with .data"),
    (HEAD.replace(".dram size=16\n", ".data 0x0 AAAA\n.dram size=16\n"), 5, 1,
     ".data before .dram (the image size)"),
    (HEAD.replace(".fingerprint", ".hw {}\n.fingerprint"), 4, 1, "duplicate .hw directive (first on line 2)"),
])
def test_errors(text, line, col, message):
    check_error(text, line, col, message)


def test_minimal_hand_written_program():
    text = HEAD.replace("size=16\n", "size=16\n.data 0x4 AQID ; three bytes\n") + (
        "    ; a comment line\n"
        "    sync sig=3 ; no @N: debug op 0\n"
        "\n"
        "    halt wait=3 @0\n")
    p = assemble(text)
    assert p.n_instrs == 2 and p.entry("main").debug.instr_op.tolist() == [0, 0]
    assert p.dram.array().tolist() == [0, 0, 0, 0, 1, 2, 3] + [0] * 9
    assert parse_instr("sync sig=3").sig == 3
