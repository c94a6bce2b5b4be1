"""Converters for operators outside the standard ONNX domain, found by (domain, op type).

A converter states in one place everything the frontend must know about its op: the `check`
made before any folding (attributes and initializer metadata only, so a bad node is reported
with every other node that cannot be compiled and no weight is read), the initializers it keeps
on disk (`lazy`: never folded nor given to shape inference, read by the backend), a `standin` of
standard ONNX nodes with the op's output shapes for ONNX shape inference (which does not know
the op), and `lift`, which builds its IR. Modules that define converters register them on
import (`cimc/frontend/__init__.py` imports them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from cimc.frontend.lift import Lifter, Term
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
    lazy: Callable[[Node], list[str]]
    standin: Callable[[Node], tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]]
    lift: Callable[[Lifter, Node, list], Term]  # raises Unsupported


CONVERTERS: dict[tuple[str, str], Converter] = {}


def register(conv: Converter) -> Converter:
    """Add a converter to the registry (one per domain and op type)."""
    key = (conv.domain, conv.op_type)
    assert key not in CONVERTERS, key
    CONVERTERS[key] = conv
    return conv


def find(node: Node) -> Converter | None:
    """The converter for a node's domain and op type, if any."""
    return CONVERTERS.get((node.domain or "", node.op_type))
