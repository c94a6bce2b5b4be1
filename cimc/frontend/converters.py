"""Converters for operators the lifter's own handlers do not take, found by (domain, op type):
contrib ops, and the standard quantization ops (whose checks need the graph around them).

A converter states in one place everything the frontend must know about its op: the `check`
made before any folding (attributes, initializer metadata and the graph's structure only, so a
bad node is reported with every other node that cannot be compiled and no weight is read), the
initializers it keeps on disk (`lazy`: never folded nor given to shape inference, read by the
backend), a `standin` of standard ONNX nodes with the op's output shapes for ONNX shape
inference (which does not know a contrib op; a standard op stands for itself), and `lift`, which
builds its IR (a term, or a tuple of terms, one per output). An op that keeps a KV cache also says
which graph inputs are its past caches, presents and attention mask (`roles`, see fold.Roles).
`IDIOMS` are rules anchored at a standard op where a chain of nodes ends (like RoPE's final Add in
the lifter): each takes the lifter and the deferred expression and returns the lifted value,
or None. Modules that define converters and idioms register them on import (`cimc/frontend/__init__.py` imports them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from cimc.frontend.lift import Expr, Lifter, Term
    from cimc.frontend.model import Node, OnnxModel


class Unsupported(Exception):
    """This node cannot be compiled, for the given reason."""


#: ONNX's own domain, under both of its names.
STANDARD = ("", "ai.onnx")


@dataclass(frozen=True)
class Converter:
    """How the frontend imports one non-standard op (see the module docstring)."""

    domain: str
    op_type: str
    check: Callable[[OnnxModel, Node], object]  # raises Unsupported
    lazy: Callable[[OnnxModel, Node], list[str]]
    standin: Callable[[Node], tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]]
    lift: Callable[[Lifter, Node, list], Term | tuple[Term, ...]]  # raises Unsupported
    roles: Callable[[OnnxModel, Node], CacheRoles] | None = None


@dataclass(frozen=True)
class CacheRoles:
    """What an attention op with a KV cache tells the role finder: past input -> present output,
    the integer graph inputs that are its attention mask (assumed all ones, checked at run time),
    and named dimensions it fixes (a symbolic head_dim)."""

    caches: dict[str, str]
    masks: list[str]
    dims: dict[str, int]


CONVERTERS: dict[tuple[str, str], Converter] = {}
IDIOMS: dict[str, list[Callable[[Lifter, Expr], Term | None]]] = {}


def register(conv: Converter) -> Converter:
    """Add a converter to the registry (one per domain and op type)."""
    key = (conv.domain, conv.op_type)
    assert key not in CONVERTERS, key
    CONVERTERS[key] = conv
    return conv


def register_idiom(op_type: str, rule: Callable[[Lifter, Expr], Term | None]) -> None:
    """Add a rule tried where a deferred expression of a standard `op_type` node is made."""
    IDIOMS.setdefault(op_type, []).append(rule)


def find(node: Node) -> Converter | None:
    """The converter for a node's domain and op type, if any."""
    return CONVERTERS.get(("" if node.domain in STANDARD else node.domain, node.op_type))
