"""cimc assembly: a text form of a whole `Program`, its assembler and its disassembler.

`disassemble` turns a Program into text and `assemble` turns the text back into a Program that
writes a byte-identical `.cimb` file, so a binary can be inspected, edited and rebuilt
(`cimc asm file.s -o file.cimb`). The grammar is `isa/asm.lark`; every field value is parsed
and printed by its field kind (`isa.fields`), so the syntax follows the ISA table.

A file is the program's directives, then one or more entries, each `.entry`, its own
directives, `.text` and one instruction per line. `;` starts a comment that runs to the end of
the line. Program directives:

* `.format 2 0` — the binary format version (major must match this cimc); must come first.
* `.fingerprint "0123456789abcdef"` — the hardware fingerprint.
* `.hw {...}`, `.meta {...}` — hardware configuration and metadata as one-line JSON objects.
* `.dram size=N` — size of the DRAM image in bytes; bytes not given below are zero.
* `.data 0x<offset> <base64>` — image bytes at an offset, in increasing offset order; or
  `.incbin "<path>" offset=<o> size=<n> crc32=<c>` — the whole image is bytes o..o+n of another
  file (relative paths are relative to the assembly file); size and crc32 are checked.

Entry directives, after `.entry "name" {meta}` and before its `.text`:

* `.symbol {...}` — one per input/output symbol (JSON as `Symbol.to_json`).
* `.op N {...}` — debug op table entries, numbered consecutively from 0.

An instruction line is `mnemonic field=value, field=value, ...` listing every field of the
instruction exactly once (printed in table order; any order is accepted), then optionally
`sig=N` (barrier signalled on completion) and `wait=1|4|7` (barriers waited for), and
optionally `@N`, the index of the `.op` the instruction came from (omitted: same as the
previous instruction, 0 for the first). Example:

    vexp     tile=1, dst=g:0x2000/64, src=g:0x0/64, rows=%seq, cols=64, sig=1, wait=2|3 @4
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import os
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from isa.binary import (
    STRICT_JSON,
    check_fingerprint,
    crc32_file,
    image_chunks,
    read_sections,
    symbol_from_json,
)
from isa.diag import CimcError, SourceError
from isa.encoding import EncodingError, Instr, decode, encode
from isa.fields import FieldError, Kind, U
from isa.program import FORMAT_VERSION, ArraySegment, DebugInfo, DramImage, Entry, Program, Symbol
from isa.spec import BY_NAME, INSTRS, N_BARRIERS, SIG_BITS

#: Images up to this size are written inline as `.data` lines by `dram="auto"`.
INLINE_LIMIT = 64 << 20
#: Raw bytes per `.data` line.
DATA_CHUNK = 3072
_WIDTH = max(len(d.mnemonic) for d in INSTRS)
_COMMENT_COLUMN = 96  # instruction comments line up here unless the instruction is longer
_U32, _U64 = U(32), U(64)
_DIRECTIVES_ONCE = ("format", "fingerprint", "hw", "meta", "dram", "incbin")
_PROGRAM = ("format", "fingerprint", "hw", "meta", "dram", "data", "incbin")
_REQUIRED = ("format", "fingerprint", "hw", "meta", "dram")
_TERMINALS = {"NAME": "a name", "VALUE": "a value", "INT": "an integer", "STRING": 'a "quoted string"',
              "JSON": "a one-line JSON object", "BASE64": "base64 data", "DEBUG": "@N",
              "_NL": "end of line", "$END": "end of file"}


@dataclass(frozen=True)
class _BarrierMask(Kind):
    """A wait mask written as barrier numbers joined by `|` (`1|4|7`); barrier 0 means none."""

    bits: int = N_BARRIERS

    def format(self, value: object) -> str:
        return "|".join(str(b) for b in range(1, N_BARRIERS) if int(value) >> b & 1)  # type: ignore[call-overload]

    def parse(self, text: str) -> int:
        mask = 0
        for part in text.split("|"):
            if not part.isdigit() or not 0 < int(part) < N_BARRIERS:
                raise FieldError(f"expected barriers 1..{N_BARRIERS - 1} joined by '|', got {text!r}")
            mask |= 1 << int(part)
        return mask


#: The operands every instruction may add after its fields (printed only when non-zero).
_EXTRAS: dict[str, Kind] = {"sig": U(SIG_BITS), "wait": _BarrierMask()}


@cache
def _parser() -> Lark:
    grammar = Path(__file__).with_name("asm.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", propagate_positions=True, start=["start", "instr_line"])


# ---- printing --------------------------------------------------------------------------------

def format_instr(instr: Instr, debug: int | None = None) -> str:
    """One instruction as assembly text (mnemonic padded so operands align), `@debug` appended."""
    spec = BY_NAME[instr.op]
    parts = [f"{fd.name}={fd.kind.format(instr.f[fd.name])}" for fd in spec.fields]
    parts += [f"{name}={kind.format(v)}" for name, kind in _EXTRAS.items()
              if (v := getattr(instr, name))]
    text = f"{instr.op:<{_WIDTH}} {', '.join(parts)}".rstrip()
    return text if debug is None else f"{text} @{debug}"


def _json_line(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=True, allow_nan=False)


def _note(op: dict) -> str:
    """A debug op's name and ONNX node, flattened to one ASCII line for a comment."""
    text = " ".join(str(op[k]) for k in ("op", "loc") if k in op)
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")


def disassemble(program: Program, *, dram: str = "auto", binary_path: str | None = None,
                incbin_name: str | None = None) -> str:
    """The assembly text of `program`; `assemble` turns it back into an identical binary.

    `dram` picks how the DRAM image is written: "inline" as `.data` lines, "incbin" as a
    reference to the DRAM section of the `.cimb` file `binary_path`, "auto" inline up to
    `INLINE_LIMIT` bytes. The reference is written as `incbin_name` (default `binary_path`):
    the assembler resolves it against the folder of the assembly file.
    """
    if dram not in ("auto", "inline", "incbin"):
        raise CimcError(f"unknown DRAM mode {dram!r} (choose auto, inline or incbin)")
    if dram == "auto":
        dram = "inline" if program.dram.size <= INLINE_LIMIT else "incbin"
    out = [
        "; cimc assembly: a compiled program (entries with code, symbols and debug map; the DRAM",
        "; image) as text. Rebuild the binary with:  cimc asm file.s -o file.cimb",
        "; Program directives come first, then each .entry with its directives, .text and one",
        "; instruction per line; `@N` is the instruction's debug op (.op N), `;` starts a comment.",
        f".format {FORMAT_VERSION[0]} {FORMAT_VERSION[1]}",
        f".fingerprint {json.dumps(program.hw_fingerprint)}",
        f".hw {_json_line(program.hw)}",
        f".meta {_json_line(program.meta)}",
        f".dram size={program.dram.size}",
    ]
    if dram == "inline":
        out += _data_lines(program.dram)
    else:
        out.append(_incbin_line(program.dram, binary_path, incbin_name))
    for entry in program.entries:
        out += _entry_lines(entry)
    return "\n".join(out) + "\n"


def _entry_lines(entry: Entry) -> list[str]:
    try:
        instrs = decode(entry.code)
    except EncodingError as e:
        raise CimcError(f"cannot disassemble entry {entry.name!r}: {e}") from None
    ops = entry.debug.ops
    out = [f".entry {json.dumps(entry.name)} {_json_line(entry.meta)}",
           *(f".symbol {_json_line(s.to_json())}" for s in entry.symbols),
           *(f".op {i} {_json_line(op)}" for i, op in enumerate(ops)),
           ".text"]
    lines = [format_instr(ins, int(k)) for ins, k in zip(instrs, entry.debug.instr_op, strict=True)]
    width = min(max(map(len, lines), default=0), _COMMENT_COLUMN)
    out += [f"    {line:<{width}}  ; #{i} {_note(ops[int(k)])}".rstrip()
            for i, (line, k) in enumerate(zip(lines, entry.debug.instr_op, strict=True))]
    return out


def _data_lines(image: DramImage) -> list[str]:
    """`.data` lines for every chunk of the image that is not all zero (streamed)."""
    out, pos, carry = [], 0, b""
    for view in image_chunks(image):
        data = carry + bytes(view) if carry else view
        full = len(data) - len(data) % DATA_CHUNK
        for k in range(0, full, DATA_CHUNK):
            out += _data_line(pos, bytes(data[k:k + DATA_CHUNK]))
            pos += DATA_CHUNK
        carry = bytes(data[full:])
    return out + _data_line(pos, carry)


def _data_line(offset: int, chunk: bytes) -> list[str]:
    if chunk.count(0) == len(chunk):
        return []
    return [f".data {offset:#x} {base64.b64encode(chunk).decode('ascii')}"]


def _incbin_line(image: DramImage, binary_path: str | None, name: str | None) -> str:
    if binary_path is None:
        raise CimcError(f"the DRAM image is {image.size} bytes, too large to inline: give the .cimb "
                        "file to reference it with .incbin")
    sec = read_sections(binary_path)["DRAM"]
    if sec.size != image.size:
        raise CimcError(f"{binary_path}: its DRAM section is {sec.size} bytes, "
                        f"the program's image {image.size}")
    m = image.mapped
    same_file = (isinstance(m, np.memmap) and m.offset == sec.offset and m.filename is not None
                 and os.path.samefile(m.filename, binary_path))
    if not same_file:
        crc = 0
        for view in image_chunks(image):
            crc = zlib.crc32(view, crc)
        if crc != sec.crc32:
            raise CimcError(f"{binary_path}: its DRAM section differs from the program's image")
    return f".incbin {json.dumps(name or binary_path)} offset={sec.offset} size={sec.size} crc32={sec.crc32:#010x}"


# ---- parsing ---------------------------------------------------------------------------------

def assemble(text: str, path: str = "<asm>") -> Program:
    """Build a Program from assembly text; errors are SourceErrors at `path:line:col`."""
    return _Assembler(text, path).run()


def parse_instr(line: str) -> Instr:
    """Parse one instruction line (a trailing `@N` is accepted and ignored)."""
    asm = _Assembler(line, "<instr>")
    return asm.instr(asm.parse("instr_line").children[0])[0]


class _Assembler:
    """One pass over the parse tree, collecting directives and instructions in order."""

    def __init__(self, text: str, path: str) -> None:
        self.text, self.path = text, path
        self.seen: dict[str, Tree] = {}
        self.hw: dict = {}
        self.meta: dict = {}
        self.fingerprint = ""
        self.dram_size = 0
        self.runs: list[tuple[int, bytearray]] = []  # contiguous .data runs: (offset, bytes)
        self.mapped: np.ndarray | None = None
        self.entries: list[Entry] = []
        self._reset_entry()

    def _reset_entry(self) -> None:
        """State of the entry being read (its `.entry` clears it)."""
        self.entry_name = ""  # "" until a .entry opens one (entry names are non-empty)
        self.entry_meta: dict = {}
        self.symbols: list[Symbol] = []
        self.ops: list[dict] = []
        self.in_text = False
        self.instrs: list[Instr] = []
        self.debug: list[int] = []

    # -- errors and parsing
    def error(self, at: Token | Tree | tuple[int, int], message: str) -> SourceError:
        if isinstance(at, Token):
            line, col = at.line, at.column
        elif isinstance(at, Tree):
            line, col = at.meta.line, at.meta.column
        else:
            line, col = at
        return SourceError(self.path, self.text, line, col, message)

    def parse(self, start: str) -> Tree:
        try:
            return _parser().parse(self.text + "\n", start=start)
        except UnexpectedInput as e:
            raise self._syntax_error(e) from None

    def _syntax_error(self, e: UnexpectedInput) -> SourceError:
        line, col = (e.line, e.column) if isinstance(e.line, int) and e.line > 0 else self._end()
        if isinstance(e, UnexpectedCharacters):
            return self.error((line, col), f"unexpected character {e.char!r}")
        if isinstance(e, UnexpectedToken):
            what = _TERMINALS[e.token.type] if e.token.type in ("_NL", "$END") else repr(str(e.token))
            names = set(e.expected) - {"$END"} if "_NL" in e.expected else set(e.expected)
            expected = ", ".join(sorted(_describe(t) for t in names))
            return self.error((line, col), f"unexpected {what}; expected {expected}")
        return self.error((line, col), "unexpected end of file")

    def _end(self) -> tuple[int, int]:
        lines = self.text.split("\n")
        if len(lines) > 1 and not lines[-1]:
            lines.pop()
        return len(lines), len(lines[-1]) + 1

    # -- the file
    def run(self) -> Program:
        for item in self.parse("start").children:
            if item.data == "instr":
                self._instr_line(item)
            else:
                self._directive(item)
        self._close_entry(self._end())
        if not self.entries:
            raise self.error(self._end(), "missing .entry (a program needs at least one entry)")
        image = DramImage()
        for offset, data in self.runs:
            image.add(ArraySegment(offset, len(data), lambda b=bytes(data): np.frombuffer(b, dtype=np.uint8)))
        image.size, image.mapped = self.dram_size, self.mapped
        return Program(entries=self.entries, dram=image, hw=self.hw, hw_fingerprint=self.fingerprint,
                       meta=self.meta)

    def _close_entry(self, at: Tree | tuple[int, int]) -> None:
        if not self.entry_name:
            return
        if not self.in_text:
            raise self.error(at, f"entry {self.entry_name!r}: missing .text (the instructions section)")
        self.entries.append(Entry(self.entry_name, encode(self.instrs), self.symbols,
                                  DebugInfo(self.ops, np.array(self.debug, dtype=np.uint32)), self.entry_meta))
        self._reset_entry()

    def _directive(self, tree: Tree) -> None:
        name = str(tree.data)
        if name != "format" and "format" not in self.seen:
            raise self.error(tree, "expected .format as the first directive")
        if name in _PROGRAM and "entry" in self.seen:
            raise self.error(tree, f".{name} after an .entry (program directives come first)")
        if name not in _PROGRAM and name != "entry" and not self.entry_name:
            raise self.error(tree, f".{name} before .entry (it belongs to an entry)")
        if self.in_text and name != "entry":
            raise self.error(tree, f".{name} after .text (directives come before the instructions)")
        if name in _DIRECTIVES_ONCE and name in self.seen:
            prev = self.seen[name].meta.line
            raise self.error(tree, f"duplicate .{name} directive (first on line {prev})")
        self.seen.setdefault(name, tree)
        getattr(self, f"_{name}")(tree, *tree.children)

    def _entry(self, tree: Tree, name_tok: Token, meta_tok: Token) -> None:
        self._close_entry(tree)
        for name in _REQUIRED:
            if name not in self.seen:
                raise self.error(tree, f"missing .{name} directive before the first .entry")
        name = self._string(name_tok)
        if not name or name in (e.name for e in self.entries):
            raise self.error(name_tok, f"entry name {name!r} is empty or used twice")
        self.entry_name, self.entry_meta = name, self._json(meta_tok)

    def _format(self, tree: Tree, major: Token, minor: Token) -> None:
        if _int(major) != FORMAT_VERSION[0]:
            raise self.error(major, f"assembly format {_int(major)}.{_int(minor)} is not supported "
                                    f"by this cimc (reads {FORMAT_VERSION[0]}.x)")

    def _fingerprint(self, tree: Tree, tok: Token) -> None:
        try:
            self.fingerprint = check_fingerprint(self._string(tok))
        except ValueError as e:
            raise self.error(tok, str(e)) from None

    def _hw(self, tree: Tree, tok: Token) -> None:
        self.hw = self._json(tok)

    def _meta(self, tree: Tree, tok: Token) -> None:
        self.meta = self._json(tok)

    def _symbol(self, tree: Tree, tok: Token) -> None:
        try:
            self.symbols.append(symbol_from_json(self._json(tok)))
        except ValueError as e:
            raise self.error(tok, f"bad symbol: {e}") from None

    def _op(self, tree: Tree, index: Token, tok: Token) -> None:
        if _int(index) != len(self.ops):
            raise self.error(index, f".op numbering gap: expected .op {len(self.ops)}, got .op {index}")
        self.ops.append(self._json(tok))

    def _dram(self, tree: Tree, *kvs: Tree) -> None:
        self.dram_size = self._kvs(".dram", tree, kvs, {"size": _U64}, {}, "argument")["size"]

    def _data(self, tree: Tree, offset_tok: Token, payload: Token) -> None:
        self._needs_dram(tree)
        if "incbin" in self.seen:
            raise self.error(tree, ".data cannot be combined with .incbin")
        try:
            data = base64.b64decode(str(payload), validate=True)
        except binascii.Error as e:
            raise self.error(payload, f"bad base64 data: {e}") from None
        offset = _int(offset_tok)
        end = self.runs[-1][0] + len(self.runs[-1][1]) if self.runs else 0
        if offset < end:
            raise self.error(offset_tok, f".data at {offset:#x} overlaps the previous .data "
                                         f"(ends at {end:#x})")
        if offset + len(data) > self.dram_size:
            raise self.error(offset_tok, f".data at {offset:#x} runs past the DRAM image size "
                                         f"{self.dram_size:#x} (.dram size=)")
        if self.runs and offset == end:
            self.runs[-1][1].extend(data)
        else:
            self.runs.append((offset, bytearray(data)))

    def _incbin(self, tree: Tree, path_tok: Token, *kvs: Tree) -> None:
        self._needs_dram(tree)
        if self.runs:
            raise self.error(tree, ".incbin cannot be combined with .data")
        args = self._kvs(".incbin", tree, kvs, {"offset": _U64, "size": _U64, "crc32": _U32}, {}, "argument")
        offset, size, crc = args["offset"], args["size"], args["crc32"]
        if size != self.dram_size:
            raise self.error(tree, f".incbin size={size} differs from .dram size={self.dram_size}")
        name = self._string(path_tok)
        file = os.path.join(os.path.dirname(self.path), name)
        try:
            have = os.path.getsize(file)
            if offset + size > have:
                raise self.error(path_tok, f"{name} has {have} bytes, fewer than offset+size = "
                                           f"{offset + size} (it changed since it was disassembled)")
            if crc32_file(file, offset, size) != crc:
                raise self.error(path_tok, f"{name} changed since it was disassembled "
                                           f"(crc32 of bytes {offset}..{offset + size} is not {crc:#010x})")
            self.mapped = (np.memmap(file, mode="r", dtype=np.uint8, offset=offset, shape=(size,))
                           if size else np.zeros(0, dtype=np.uint8))
        except OSError as e:
            raise self.error(path_tok, f"cannot read {name}: {e.strerror or e}") from None

    def _needs_dram(self, tree: Tree) -> None:
        if "dram" not in self.seen:
            raise self.error(tree, f".{tree.data} before .dram (the image size)")

    def _text(self, tree: Tree) -> None:
        self.in_text = True

    def _string(self, tok: Token) -> str:
        try:
            return json.loads(tok)
        except json.JSONDecodeError as e:
            raise self.error((tok.line, tok.column + e.pos), f"bad string: {e.msg}") from None

    def _json(self, tok: Token) -> dict:
        """Decode a one-line JSON object token; the rest of the line may only be a comment."""
        text = str(tok)
        try:
            value, end = STRICT_JSON.raw_decode(text)
        except json.JSONDecodeError as e:
            raise self.error((tok.line, tok.column + e.pos), f"bad JSON: {e.msg}") from None
        except ValueError as e:
            raise self.error(tok, f"bad JSON: {e}") from None
        rest = text[end:].lstrip()
        if rest and not rest.startswith(";"):
            raise self.error((tok.line, tok.column + len(text) - len(rest)),
                             "unexpected text after the JSON object")
        return value

    # -- instructions
    def _instr_line(self, tree: Tree) -> None:
        if not self.in_text:
            raise self.error(tree, "instruction before .text")
        instr, debug = self.instr(tree)
        index = int(debug[1:]) if debug is not None else (self.debug[-1] if self.debug else 0)
        if index >= len(self.ops):
            raise self.error(debug if debug is not None else tree,
                             f"debug op @{index} out of range (the .op table has {len(self.ops)} entries)")
        self.instrs.append(instr)
        self.debug.append(index)

    def instr(self, tree: Tree) -> tuple[Instr, Token | None]:
        """Build and validate one instruction; also return its `@N` token if present."""
        mnemonic, *rest = tree.children
        kvs = next((c.children for c in rest if isinstance(c, Tree)), [])
        debug = next((c for c in rest if isinstance(c, Token)), None)
        spec = BY_NAME.get(str(mnemonic))
        if spec is None:
            close = difflib.get_close_matches(str(mnemonic), BY_NAME, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise self.error(mnemonic, f"unknown instruction {str(mnemonic)!r}{hint}")
        values = self._kvs(spec.mnemonic, mnemonic, kvs, {fd.name: fd.kind for fd in spec.fields},
                           _EXTRAS, "field")
        instr = Instr(spec.mnemonic, {n: values[n] for n in spec.field_names},
                      values.get("sig", 0), values.get("wait", 0))
        try:
            return instr.validate(), debug
        except EncodingError as e:
            raise self.error(mnemonic, str(e)) from None

    def _kvs(self, owner: str, at: Token | Tree, kvs: list[Tree] | tuple[Tree, ...],
             required: dict[str, Kind], optional: dict[str, Kind], word: str) -> dict:
        """Parse `name=value` pairs: each required name exactly once, optional ones at most once."""
        values: dict[str, object] = {}
        for kv in kvs:
            name_tok, value_tok = kv.children
            name = str(name_tok)
            kind = required.get(name) or optional.get(name)
            if kind is None:
                known = ", ".join([*required, *optional]) or "none"
                raise self.error(name_tok, f"{owner}: unknown {word} {name!r} ({word}s: {known})")
            if name in values:
                raise self.error(name_tok, f"{owner}: duplicate {word} {name}")
            try:
                values[name] = kind.parse(str(value_tok))
            except FieldError as e:
                raise self.error(value_tok, f"{owner}: {word} {name}: {e}") from None
        if missing := [n for n in required if n not in values]:
            raise self.error(at, f"{owner}: missing {word}(s) {', '.join(missing)}")
        return values


def _int(tok: Token) -> int:
    """An INT token (decimal, leading zeros allowed, or 0x hex)."""
    return int(tok, 16) if tok.startswith("0x") else int(tok)


def _describe(terminal: str) -> str:
    """A terminal's name as a reader would say it: `'.format'`, `an integer`, `end of line`."""
    if terminal in _TERMINALS:
        return _TERMINALS[terminal]
    pattern = _parser().get_terminal(terminal).pattern
    return repr(pattern.value) if pattern.type == "str" else terminal
