"""Print a module in the IR's text form; `cimc.ir.parser` reads it back to the same text.

Values are numbered in definition order, attribute keys are sorted and floats use their
shortest round-tripping repr, so printing is deterministic and `print(parse(t)) == t`.
"""

from __future__ import annotations

import json
import re

from cimc.ir.core import Module, Op

VERSION = 1
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def format_attr(value: object) -> str:
    """One attribute value in text form."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, dict):
        return format_attrs(value)
    raise TypeError(f"attribute value {value!r} has no text form")


def format_attrs(attrs: dict) -> str:
    items = (f"{k if _KEY.match(k) else json.dumps(k)} = {format_attr(attrs[k])}" for k in sorted(attrs))
    return "{" + ", ".join(items) + "}"


def print_op(op: Op, names: dict[int, str]) -> str:
    """One op as a line; `names` maps id(value) to its %N name and is extended with the results
    (results already named, as by `value_names`, keep their names)."""
    for r in op.results:
        names.setdefault(id(r), f"%{len(names)}")
    head = ", ".join(names[id(r)] for r in op.results)
    text = (f"{head} = " if head else "") + op.name
    text += "(" + ", ".join(names.get(id(v), "%?") for v in op.operands) + ")"
    if op.attrs:
        text += " " + format_attrs(op.attrs)
    if op.results:
        text += " : " + ", ".join(str(r.type) for r in op.results)
    return text + f" loc({json.dumps(op.loc)})"


def print_module(module: Module) -> str:
    """The whole module as text, ending with a newline."""
    lines = [f"cimir {VERSION}", f"module {json.dumps(module.name)}"
             + (" " + format_attrs(module.attrs) if module.attrs else "")]
    names: dict[int, str] = {}
    lines += [print_op(op, names) for op in module.ops]
    return "\n".join(lines) + "\n"


def value_names(module: Module) -> dict[int, str]:
    """The %N name each value gets when the module is printed."""
    names: dict[int, str] = {}
    for op in module.ops:
        for r in op.results:
            names[id(r)] = f"%{len(names)}"
    return names

