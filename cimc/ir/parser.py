"""Parse the IR text form (grammar.lark) back into a `Module`.

Errors are `SourceError`s: `file:line:col: message` with the line and a caret.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources

from lark import Lark, Token, Transformer, Tree, UnexpectedInput, v_args

from cimc.ir.core import CTX, SEQ, Module, Op, TensorType, Value
from cimc.ir.printer import VERSION
from cimc.ir.verifier import VerifyError, verify_module
from isa.diag import SourceError
from isa.dtypes import ELEM_TYPES


@cache
def _parser() -> Lark:
    grammar = resources.files("cimc.ir").joinpath("grammar.lark").read_text()
    types = " | ".join(f'"{t}"' for t in sorted(ELEM_TYPES, key=len, reverse=True))
    grammar = re.sub(r"^DTYPE:.*$", f"DTYPE: {types}", grammar, flags=re.M)
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


@v_args(inline=True)
class _Attrs(Transformer):
    def int(self, tok: Token) -> int:
        return int(tok)

    def float(self, tok: Token) -> float:
        return float(tok)

    def string(self, tok: Token) -> str:
        return json.loads(tok)

    def true(self) -> bool:
        return True

    def false(self) -> bool:
        return False

    def list(self, *items: object) -> list:
        return [i for i in items if i is not None]

    def dict(self, attrs: dict) -> dict:
        return attrs

    def attr(self, key: Token, value: object) -> tuple[str, object]:
        return (json.loads(key) if key.startswith('"') else str(key)), value

    def attrs(self, *items: tuple[str, object] | None) -> dict:
        return dict(i for i in items if i is not None)

    def dim_int(self, tok: Token) -> int:
        return int(tok)

    def dim_seq(self) -> str:
        return SEQ

    def dim_ctx(self) -> str:
        return CTX


def parse_module(text: str, path: str = "<ir>", verify: bool = True) -> Module:
    """Parse IR text; raises SourceError pointing at the first problem (syntax, undefined
    values, and with `verify` any broken IR invariant, at the op's line)."""
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise SourceError(path, text, e.line, e.column, f"syntax error: {_explain(e)}") from None
    tree = _Attrs().transform(tree)
    header, mod, *stmts = tree.children
    version = int(header.children[0])
    if version != VERSION:
        raise SourceError(path, text, header.meta.line, header.meta.column,
                          f"IR text version {version} is not supported (this cimc reads {VERSION})")
    module = Module(json.loads(mod.children[0]), mod.children[1] or {})
    env: dict[str, Value] = {}
    where: dict[int, tuple[int, int]] = {}
    for st in stmts:
        op = _stmt(st, env, text, path)
        module.ops.append(op)
        where[id(op)] = (st.meta.line, st.meta.column)
    if verify:
        try:
            verify_module(module)
        except VerifyError as e:
            if e.op is None:
                raise SourceError(path, text, mod.meta.line, mod.meta.column, e.message) from None
            line, col = where[id(e.op)]
            raise SourceError(path, text, line, col, f"{e.op.name}: {e.reason}") from None
    return module


def _stmt(st: Tree, env: dict[str, Value], text: str, path: str) -> Op:
    results_tree, opname, *rest = st.children
    operands = [c for c in rest if isinstance(c, Token) and c.type == "VALUE_ID"]
    attrs = next((c for c in rest if isinstance(c, dict)), {})
    types = [c for c in rest if isinstance(c, Tree) and c.data == "type"]
    loc = json.loads(rest[-1])
    values = []
    for tok in operands:
        if tok not in env:
            raise SourceError(path, text, tok.line, tok.column, f"use of undefined value {tok}")
        values.append(env[tok])
    result_names = list(results_tree.children) if results_tree is not None else []
    if len(result_names) != len(types):
        raise SourceError(path, text, st.meta.line, st.meta.column,
                          f"{len(result_names)} result(s) but {len(types)} type(s)")
    try:
        rtypes = [TensorType(str(t.children[0]), tuple(d for d in t.children[1:] if d is not None))
                  for t in types]
    except ValueError as e:
        raise SourceError(path, text, st.meta.line, st.meta.column, str(e)) from None
    op = Op(str(opname), values, rtypes, attrs, loc)
    for tok, r in zip(result_names, op.results, strict=True):
        if tok in env:
            raise SourceError(path, text, tok.line, tok.column, f"value {tok} is defined twice")
        env[str(tok)] = r
    return op


def _explain(e: UnexpectedInput) -> str:
    tok = getattr(e, "token", None)
    if tok is not None:
        if tok.type == "$END":
            return "unexpected end of input"
        expected = sorted(getattr(e, "expected", ()) or ())
        hint = f" (expected {', '.join(expected[:6])})" if expected else ""
        return f"unexpected {tok.value!r}{hint}"
    char = getattr(e, "char", None)
    return f"unexpected character {char!r}" if char is not None else "unexpected input"
