"""Pass manager, pipeline strings, verification naming the guilty pass, and IR text errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from model_fixtures import EXAMPLE

from cimc.driver import CompileOptions, load_module, run_pipeline
from cimc.ir.core import Module, Rewriter, TensorType
from cimc.ir.parser import parse_module
from cimc.ir.printer import print_module
from cimc.ir.verifier import VerifyError, verify_module
from isa.diag import CimcError, SourceError
from passes.manager import REGISTRY, PassContext, PassManager, parse_pipeline, register


def _module() -> Module:
    return load_module(EXAMPLE, CompileOptions(max_seq=8))[0]


def test_pipeline_string_with_options() -> None:
    passes = parse_pipeline("lift-idioms, place-weights{sets=4},balance-stages{rows=1}")
    assert [p.name for p in passes] == ["lift-idioms", "place-weights", "balance-stages"]
    assert passes[1].sets == 4 and passes[2].rows == 1


@pytest.mark.parametrize(("text", "fragment"), [
    ("lift-idioms,no-such-pass", "unknown pass 'no-such-pass'"),
    ("place-weights{setz=2}", "has no option 'setz'"),
    ("place-weights{sets=two}", "expects a int"),
    ("lift-idioms;;", "cannot parse"),
])
def test_pipeline_errors(text: str, fragment: str) -> None:
    with pytest.raises(CimcError, match=fragment):
        parse_pipeline(text)


@register
@dataclass(frozen=True)
class _BreakTypes:
    """A deliberately broken pass: gives a linear a wrong result type."""

    name: ClassVar[str] = "test-break-types"

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None:
        op = next(module.walk("linear"))
        op.results[0].type = TensorType("f32", (3, 3))


def test_verifier_names_the_pass_and_underlines_the_op() -> None:
    opts = CompileOptions(max_seq=8, pipeline="lift-idioms,test-break-types")
    module = _module()
    with pytest.raises(VerifyError) as e:
        run_pipeline(module, opts)
    assert "pass 'test-break-types' produced invalid IR" in e.value.message
    assert "linear" in e.value.message and "node_" in e.value.message
    lines = e.value.detail.splitlines()
    assert "linear(" in lines[0] and set(lines[1].strip()) == {"^"}
    assert lines[0].strip() in print_module(module).splitlines()  # the op as the dump prints it, same %names
    REGISTRY.pop("test-break-types")


def test_dump_dir_and_timing(tmp_path: Path) -> None:
    opts = CompileOptions(max_seq=8, dump_after={"all"}, dump_dir=tmp_path)
    pm = run_pipeline(_module(), opts)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["01-lift-idioms.cimir", "02-insert-kv-cache.cimir", "03-tile-partition.cimir",
                     "04-place-weights.cimir", "05-schedule.cimir", "06-balance-stages.cimir"]
    for path in tmp_path.iterdir():
        assert print_module(parse_module(path.read_text())) == path.read_text()
    report = pm.timing_report()
    assert all(n in report for n in ("lift-idioms", "schedule", "ms"))


def test_pass_manager_verifies_frontend_output() -> None:
    m = _module()
    next(m.walk("rope")).attrs["head_dim"] = 7
    with pytest.raises(VerifyError, match="the frontend produced invalid IR"):
        PassManager([]).run(m, None)  # type: ignore[arg-type]


def test_verifier_catches_use_before_def() -> None:
    m = _module()
    verify_module(m)
    emb = next(m.walk("embedding"))
    m.ops.remove(emb)
    m.ops.append(emb)
    with pytest.raises(VerifyError, match="used before it is defined"):
        verify_module(m)


@pytest.mark.parametrize(("edit", "fragment", "line"), [
    (lambda t: t.replace("embedding(%0, %1)", "embedding(%0, %99)"), "use of undefined value %99", 5),
    (lambda t: t.replace("cimir 1", "cimir 9"), "version 9 is not supported", 1),
    (lambda t: t.replace('loc("node_embedding")', "loc(node_embedding)"), "syntax error", 5),
])
def test_ir_parse_errors_have_file_line_column(edit, fragment: str, line: int) -> None:
    text = edit(print_module(_module()))
    with pytest.raises(SourceError) as e:
        parse_module(text, "model.cimir")
    assert e.value.message.startswith(f"model.cimir:{line}:")
    assert fragment in e.value.message
    assert e.value.detail.splitlines()[1].strip() == "^"
