"""The registry of op converters: every op the frontend lifts, found by (domain, op type, opset).

A converter states in one place everything the frontend must know about one version range of an
op (`since` <= the model's opset for the op's domain < `until`, as ONNX's since_version; see the
reference evaluator's `onnx/reference/ops/op_*.py`):
- `lift` builds its IR from the input terms (a term, or a tuple of terms, one per output);
- `weights`, for ops that may apply to weights left on disk (every input an initializer or a
  constant that is never folded): how it does (a Transpose of a weight matrix, say); None means
  `lift` takes every case;
- `materialize`, for elementwise ops the lifter defers (they may be part of an idiom): how to
  lower a deferred node once its operands are whole activations;
- for non-standard ops: the `check` made before any folding (attributes, initializer metadata and
  the graph's structure only, so a bad node is reported with every other node that cannot be
  compiled and no weight is read), the initializers it keeps on disk (`lazy`: never folded nor
  given to shape inference, read by the backend), a `standin` of standard ONNX nodes with the
  op's output shapes for ONNX shape inference (which does not know a contrib op; a standard op
  stands for itself), and, for an op that keeps a KV cache, which graph inputs are its past
  caches, presents and attention mask (`roles`, see fold.Roles).

Converter modules (`cimc/frontend/ops/`, one per op family) register on import. A standard op
with no converter may still be folded away (Shape, Range, ...); one that reaches the lifter is
reported as not supported on activations. `refusal` is the check `import_onnx` and `cimc check`
make of every node before any work: an opset import for its domain, a converter for its opset
(if its op has any), the converter's `check`, and a standard op's schema (onnx.checker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx

if TYPE_CHECKING:
    from cimc.frontend.lift import Lifter, Term
    from cimc.frontend.model import Node, OnnxModel
    from cimc.frontend.views import View


class Unsupported(Exception):
    """This node cannot be compiled, for the given reason."""


#: ONNX's own domain, under both of its names.
STANDARD = ("", "ai.onnx")

Lift = Callable[["Lifter", "Node", list], "Term | tuple[Term, ...]"]


def _no_check(model: OnnxModel, node: Node) -> None:
    return None


def _nothing_lazy(model: OnnxModel, node: Node) -> list[str]:
    return []


def itself(node: Node) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]:
    """A standard op's stand-in for shape inference: the node itself (ONNX knows it)."""
    return [node.proto], []


def no_weights(lifter: Lifter, node: Node, args: list) -> Term:
    """The `weights` of a standard op that does not apply to weights left on disk."""
    raise Unsupported(f"{node.op_type} of a weight matrix is not supported (only Transpose)")


@dataclass(frozen=True)
class CacheRoles:
    """What an attention op with a KV cache tells the role finder: past input -> present output,
    the integer graph inputs that are its attention mask (assumed all ones, checked at run time),
    named dimensions it fixes (a symbolic head_dim, a window buffer's length), and the past inputs
    and present outputs that hold only the last W positions (a sliding-window layer's buffer of W
    slots) -> W."""

    caches: dict[str, str]
    masks: list[str]
    dims: dict[str, int]
    windows: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Converter:
    """How the frontend imports one op over an opset range (see the module docstring)."""

    domain: str
    op_type: str
    lift: Lift
    since: int = 1
    until: int | None = None  # the first opset this converter no longer covers (None: all later)
    check: Callable[[OnnxModel, Node], object] = _no_check  # raises Unsupported
    lazy: Callable[[OnnxModel, Node], list[str]] = _nothing_lazy
    standin: Callable[[Node], tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto]]] = itself
    roles: Callable[[OnnxModel, Node], CacheRoles] | None = None
    weights: Callable[[Lifter, Node, list], Term] | None = None
    materialize: Callable[[Lifter, Node, list], View] | None = None

    def covers(self, opset: int) -> bool:
        return self.since <= opset and (self.until is None or opset < self.until)

    def span(self) -> str:
        return f"{self.since}+" if self.until is None else f"{self.since}-{self.until - 1}"


CONVERTERS: dict[tuple[str, str], list[Converter]] = {}


def register(conv: Converter) -> Converter:
    """Add a converter to the registry; ranges of one domain and op type may not overlap."""
    versions = CONVERTERS.setdefault((conv.domain, conv.op_type), [])
    end = conv.until or 1 << 30
    assert all(end <= c.since or (c.until is not None and c.until <= conv.since) for c in versions), \
        (conv.domain, conv.op_type, conv.span())
    versions.append(conv)
    versions.sort(key=lambda c: c.since)
    return conv


def standard(op_types: str | Iterable[str], lift: Lift, *, since: int = 1, until: int | None = None,
             weights: Callable[[Lifter, Node, list], Term] = no_weights,
             materialize: Callable[[Lifter, Node, list], View] | None = None) -> None:
    """Register `lift` for standard ONNX ops (one name or several) over opsets [since, until)."""
    for op_type in [op_types] if isinstance(op_types, str) else op_types:
        register(Converter("", op_type, lift, since, until, weights=weights, materialize=materialize))


def _key(node: Node) -> tuple[str, str]:
    return ("" if node.domain in STANDARD else node.domain, node.op_type)


def opset(model: OnnxModel, node: Node) -> int | None:
    """The opset the model imports for the node's domain (None if it imports none)."""
    domain = _key(node)[0]
    version = model.opsets.get(domain)
    return model.opsets.get("ai.onnx") if version is None and domain == "" else version


def find(model: OnnxModel, node: Node, registry: dict[tuple[str, str], list[Converter]] | None = None
         ) -> Converter | None:
    """The converter for a node's domain, op type and opset in `registry` (default CONVERTERS), if any."""
    version = opset(model, node)
    versions = (CONVERTERS if registry is None else registry).get(_key(node), [])
    return next((c for c in versions if version is not None and c.covers(version)), None)


def refusal(model: OnnxModel, node: Node, first: dict[tuple[str, str], list[Converter]] | None = None) -> str:
    """Why `node` cannot be compiled, from its op, opset and attributes alone ("" if it may be);
    a converter in `first` (the generic mode's) is checked in place of the registry's."""
    domain, version = _key(node)[0], opset(model, node)
    if version is None:
        return f"the model imports no opset for its domain {node.domain or 'ai.onnx'!r} (opset_import)"
    versions = CONVERTERS.get(_key(node), [])
    conv = (find(model, node, first) if first else None) or find(model, node)
    if versions and conv is None:
        spans = ", ".join(c.span() for c in versions)
        return f"{node.op_type} at opset {version} is not supported (cimc converts it at opsets {spans})"
    if conv is not None:
        try:
            conv.check(model, node)
        except Unsupported as e:
            return str(e)
    elif domain:
        return "operator not supported yet"
    if domain or not onnx.defs.has(node.op_type):
        return "" if conv is not None else "not a standard ONNX operator"
    try:  # its inputs, outputs and attributes against the op's schema at the model's opset
        onnx.checker.check_node(node.proto, _checker_context(model))
    except (onnx.checker.ValidationError, onnx.defs.SchemaError) as e:
        return f"not valid ONNX: {str(e).splitlines()[0]}"
    return ""


def _checker_context(model: OnnxModel) -> onnx.checker.C.CheckerContext:
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.proto.ir_version
    ctx.opset_imports = dict(model.opsets)
    return ctx
