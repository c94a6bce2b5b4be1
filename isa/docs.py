"""Generate `docs/isa.md`, the instruction set reference, from the ISA table.

Everything comes from code: the machine model from the `isa.spec` docstring, word layout from
its constants, operand kinds from `isa.fields`, the assembly syntax from the `isa.asm`
docstring and one section per `InstrDef`. `tests/test_isa_docs.py` keeps the file in sync.

    python -m isa.docs > docs/isa.md          # regenerate
    python -m isa.docs --check docs/isa.md    # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

from isa import asm, fields, spec
from isa.encoding import Instr
from isa.fields import REGS, SPACES, Dim, DimKind, EnumKind, F32Kind, Kind, Mem, MemKind
from isa.spec import INSTRS, InstrDef


def _body(module: ModuleType) -> str:
    """A module docstring without its summary line."""
    return inspect.cleandoc(module.__doc__ or "").split("\n", 1)[1].strip()


def _attr_doc(module: ModuleType, name: str) -> str:
    """The `#:` comment lines just above `name = ...` in a module's source."""
    lines = inspect.getsource(module).splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(rf"{name}\b.*=", line))
    doc: list[str] = []
    while at > 0 and lines[at - 1].startswith("#:"):
        at -= 1
        doc.insert(0, lines[at][2:].strip())
    return " ".join(doc)


def _example_value(kind: Kind, nth: int) -> object:
    """A plausible value of a field kind; `nth` is the field's position among fields of its kind."""
    if isinstance(kind, MemKind):
        return Mem(SPACES.index("g"), 0x1000 * nth, 64)
    if isinstance(kind, DimKind):
        return Dim(REGS.index("seq"), 0) if nth == 0 else Dim(0, 64)
    if isinstance(kind, F32Kind):
        return 1.0
    if isinstance(kind, EnumKind):
        return kind.names[0]
    return 0 if kind.bits == 1 else 1


def example(instr: InstrDef) -> Instr:
    """A valid instance of an instruction, for its documentation."""
    seen: dict[type, int] = {}
    values = {}
    for fd in instr.fields:
        nth = seen[type(fd.kind)] = seen.get(type(fd.kind), -1) + 1
        values[fd.name] = _example_value(fd.kind, nth)
    return Instr(instr.mnemonic, values).validate()


def _kind_name(kind: Kind) -> str:
    return f"enum ({', '.join(kind.names)})" if isinstance(kind, EnumKind) else kind.name


def _word_layout() -> list[str]:
    sig_end = spec.SIG_SHIFT + spec.SIG_BITS
    sync_example = " ".join(asm.format_instr(Instr("sync", {}, sig=3, wait=0b110)).split())
    return [
        "## Instruction word",
        "",
        f"Every instruction is {spec.INSTR_BYTES} bytes: {spec.INSTR_WORDS} little-endian "
        f"{spec.WORD_BITS}-bit words.",
        "",
        "| word | bits | contents |",
        "|---|---|---|",
        f"| 0 | 0-{spec.OPCODE_BITS - 1} | opcode |",
        f"| 0 | {spec.SIG_SHIFT}-{sig_end - 1} | `sig`: barrier signalled on completion (0 = none) |",
        f"| 0 | {sig_end}-{spec.HEADER_BITS - 1} | reserved, 0 |",
        f"| 0 | {spec.HEADER_BITS}-{spec.WORD_BITS - 1} | fields |",
        f"| 1 | 0-{spec.WORD_BITS - 1} | `wait`: bit b set = wait for barrier b (bit 0 reserved) |",
        f"| 2-{spec.INSTR_WORDS - 1} | 0-{spec.WORD_BITS - 1} | fields |",
        "",
        f"Field packing: {inspect.cleandoc(spec._pack.__doc__ or '')} Each field is stored at "
        "its word and bit offset (`word:bit` in the tables below); every bit no field uses is "
        "reserved and must be 0 (the decoder rejects it).",
        "",
        f"There are {spec.N_BARRIERS - 1} barriers (1..{spec.N_BARRIERS - 1}). In assembly, `sig` "
        f"and `wait` follow the fields and are omitted when 0: `{sync_example}`.",
        "",
    ]


def _kinds() -> list[str]:
    kinds: dict[str, Kind] = {}
    for instr in INSTRS:
        for fd in instr.fields:
            kinds.setdefault(_kind_name(fd.kind), fd.kind)
    out = [
        "## Operand kinds",
        "",
        f"Registers (for sizes and row offsets): {', '.join(f'`%{r}`' for r in REGS[1:])}. "
        f"{_attr_doc(fields, 'REGS')}",
        "",
        f"Memory spaces: {', '.join(f'`{s}`' for s in SPACES)}. {_attr_doc(fields, 'SPACES')}",
        "",
        "| kind | bits | meaning | example |",
        "|---|---|---|---|",
    ]
    for name, kind in kinds.items():
        bits = "n" if type(kind) is Kind else str(kind.bits)
        doc = " ".join(inspect.cleandoc(type(kind).__doc__ or "").split())
        out.append(f"| {name} | {bits} | {doc} | `{kind.format(kind.check(_example_value(kind, 1)))}` |")
    return [*out, ""]


def _instr_section(instr: InstrDef) -> list[str]:
    facts = [f"opcode `{instr.opcode:#04x}`", f"unit `{instr.unit}`", f"cost class `{instr.cost}`"]
    if instr.sfu_ops:
        facts.append("SFU ops per element: " + ", ".join(f"{k} {v:g}" for k, v in instr.sfu_ops.items()))
    out = [f"### `{instr.mnemonic}`", "", f"{instr.doc[0].upper()}{instr.doc[1:]}.", "",
           "; ".join(facts) + ".", "", "```", instr.semantics, "```", ""]
    if instr.fields:
        out += ["| field | kind | bits | word:bit | doc |", "|---|---|---|---|---|"]
        out += [f"| `{fd.name}` | {_kind_name(fd.kind)} | {fd.kind.bits} | {fd.word}:{fd.shift} | {fd.doc} |"
                for fd in instr.fields]
        out.append("")
    return [*out, "Example:", "", "```", asm.format_instr(example(instr)), "```", ""]


def render_isa_md() -> str:
    """The full text of `docs/isa.md`."""
    out = [
        "# The cimc instruction set",
        "",
        "<!-- Generated from isa/spec.py by `python -m isa.docs`; do not edit by hand. -->",
        "",
        inspect.cleandoc(spec.__doc__ or "").split("\n", 1)[0],
        "",
        _body(spec),
        "",
        *_word_layout(),
        *_kinds(),
        "## Assembly syntax",
        "",
        _body(asm),
        "",
        "## Instructions",
        "",
        "| mnemonic | opcode | unit | cost | doc |",
        "|---|---|---|---|---|",
        *(f"| [`{i.mnemonic}`](#{i.mnemonic}) | `{i.opcode:#04x}` | {i.unit} | {i.cost} | {i.doc} |"
          for i in INSTRS),
        "",
    ]
    for instr in INSTRS:
        out += _instr_section(instr)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print the reference, or with `--check PATH` report whether PATH is up to date."""
    parser = argparse.ArgumentParser(prog="python -m isa.docs", description=__doc__.split("\n")[0])
    parser.add_argument("--check", metavar="PATH", help="exit 1 if PATH differs from the generated text")
    args = parser.parse_args(argv)
    text = render_isa_md()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.check)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        print(f"{path} is out of date; regenerate it with: python -m isa.docs > {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
