"""docs/isa.md is generated from the ISA table and must stay in sync with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import isa.asm
from isa.asm import format_instr, parse_instr
from isa.docs import example, main, render_isa_md
from isa.spec import INSTRS

DOC = Path(__file__).resolve().parents[1] / "docs" / "isa.md"


def test_docs_are_generated():
    assert DOC.read_text(encoding="utf-8") == render_isa_md(), \
        "docs/isa.md is out of date: run python -m isa.docs > docs/isa.md"


def test_check_option(tmp_path, capsys):
    assert main(["--check", str(DOC)]) == 0
    stale = tmp_path / "isa.md"
    stale.write_text(render_isa_md().replace("vadd", "vaddd"), encoding="utf-8")
    assert main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_every_instruction_is_documented():
    text = render_isa_md()
    for instr in INSTRS:
        assert f"### `{instr.mnemonic}`" in text
        assert instr.semantics in text


@pytest.mark.parametrize("instr", INSTRS, ids=lambda i: i.mnemonic)
def test_examples_assemble(instr):
    ins = example(instr)
    assert parse_instr(format_instr(ins)) == ins


def test_syntax_example_in_asm_docstring_assembles():
    line = re.search(r"^    (vexp .*)$", isa.asm.__doc__, re.M).group(1)
    assert format_instr(parse_instr(line), 4) == line
