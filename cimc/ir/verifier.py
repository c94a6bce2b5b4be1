"""Check a module's invariants: SSA order, op declarations, attribute types, type rules.

A failure raises `VerifyError` naming the op (printed, with its ONNX location) and what is wrong,
underlined; the pass manager adds which pass broke it.
"""

from __future__ import annotations

from cimc.ir.core import Module, Op
from cimc.ir.ops import ANNOTATIONS, ATTR_TYPES, OPS, TypeRuleError, from_attr
from cimc.ir.printer import print_op, value_names
from isa.diag import CimcError


class VerifyError(CimcError):
    """The IR breaks an invariant; `op` is the offending op, `detail` its printed line underlined."""

    op: Op | None = None
    reason: str = ""


def _fail(op: Op, names: dict[int, str], message: str) -> None:
    text = print_op(op, names)
    err = VerifyError(f"invalid IR at {op.name} (ONNX node {op.loc!r}): {message}",
                      detail=f"  {text}\n  {'^' * len(text)}")
    err.op, err.reason = op, message
    raise err


def verify_module(module: Module) -> None:
    """Raise VerifyError on the first broken invariant."""
    names = value_names(module)
    defined: set[int] = set()
    for key in ("max_seq", "max_ctx"):
        if key in module.attrs and (not isinstance(module.attrs[key], int) or module.attrs[key] < 1):
            raise VerifyError(f"module {module.name!r}: attribute {key} must be a positive integer")
    if "max_seq" not in module.attrs:
        raise VerifyError(f"module {module.name!r}: attribute max_seq is missing")
    if module.max_ctx < module.max_seq:
        raise VerifyError(f"module {module.name!r}: max_ctx {module.max_ctx} is below max_seq {module.max_seq}")
    for op in module.ops:
        d = OPS.get(op.name)
        if d is None:
            _fail(op, names, f"unknown op {op.name!r}")
        for i, v in enumerate(op.operands):
            if id(v) not in defined:
                _fail(op, names, f"operand {i} is used before it is defined")
            if (op, i) not in v.uses:
                _fail(op, names, f"operand {i} is missing from its value's use list")
        n = len(op.operands)
        most = d.max_operands
        if n < d.min_operands or (most is not None and n > most):
            _fail(op, names, f"takes {d.min_operands}..{'' if most is None else most} operands, got {n}")
        for key in d.attrs:
            if key not in op.attrs:
                _fail(op, names, f"missing attribute {key!r}")
        for key, value in op.attrs.items():
            tname = d.attrs.get(key) or d.optional.get(key) or ANNOTATIONS.get(key)
            if tname is None:
                _fail(op, names, f"unknown attribute {key!r}")
            if not isinstance(value, ATTR_TYPES[tname]) or (tname != "bool" and isinstance(value, bool)):
                _fail(op, names, f"attribute {key!r} must be {tname}, got {value!r}")
        if d.infer is not from_attr:
            try:
                expected = d.infer([v.type for v in op.operands], op.attrs)
            except TypeRuleError as e:
                _fail(op, names, str(e))
            got = [r.type for r in op.results]
            if got != expected:
                _fail(op, names, f"result type {', '.join(map(str, got)) or 'none'} should be "
                                 f"{', '.join(map(str, expected)) or 'none'}")
        elif len(op.results) != 1:
            _fail(op, names, "must have exactly one result")
        for r in op.results:
            defined.add(id(r))
