"""Core IR objects: tensor types, SSA values, ops, the module, and the one rewriter.

The IR is a single list of ops in SSA form (each value defined once, before its uses). Every
op carries `loc`, the name of the ONNX node (or initializer, or graph input) it came from, so
every later error can point back into the model. All mutation goes through `Rewriter`, which
keeps use lists right and counts what passes did.

Activation tensors are matrices `[rows, cols]`: rows are tokens (the runtime length `seq`,
bounded by the module's `max_seq`, or a fixed count), cols are features. Rows of `ctx` are
absolute positions, bounded by `max_ctx`: the KV cache and position tables (RoPE) have them,
and row r of a `seq` tensor is position `past + r`, where `past` is the number of tokens
already cached when the program runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from isa.dtypes import ELEM_TYPES

#: The runtime sequence length, written in shapes as this string.
SEQ = "seq"
#: Absolute positions 0 .. past + seq - 1 (the context), written in shapes as this string.
CTX = "ctx"
DTYPES = tuple(ELEM_TYPES)

Dim = int | str


@dataclass(frozen=True)
class TensorType:
    """Element type and shape; a dim is an int or `SEQ`. Validated on construction."""

    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown element type {self.dtype!r}")
        for d in self.shape:
            if not (d in (SEQ, CTX) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)):
                raise ValueError(f"bad dimension {d!r} in shape {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def bound_shape(self, bounds: dict[str, int]) -> tuple[int, ...]:
        """The shape with `seq` and `ctx` replaced by their bounds (`Module.bounds`)."""
        return tuple(bounds.get(d, d) if isinstance(d, str) else d for d in self.shape)  # type: ignore[misc]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"


class Value:
    """An SSA value: its type, the op defining it, and the (op, operand index) pairs using it."""

    __slots__ = ("index", "owner", "type", "uses")

    def __init__(self, type_: TensorType, owner: Op | None = None, index: int = 0) -> None:
        self.type = type_
        self.owner = owner
        self.index = index
        self.uses: list[tuple[Op, int]] = []

    @property
    def users(self) -> list[Op]:
        seen: dict[int, Op] = {}
        for op, _ in self.uses:
            seen.setdefault(id(op), op)
        return list(seen.values())

    def __repr__(self) -> str:
        owner = self.owner.name if self.owner else "?"
        return f"<Value {self.type} from {owner}>"


class Op:
    """An operation: name, operands, results, attributes and source location."""

    __slots__ = ("attrs", "loc", "name", "operands", "results")

    def __init__(self, name: str, operands: Iterable[Value], result_types: Iterable[TensorType],
                 attrs: dict | None = None, loc: str = "") -> None:
        self.name = name
        self.operands: list[Value] = []
        self.results = [Value(t, self, i) for i, t in enumerate(result_types)]
        self.attrs: dict = dict(attrs or {})
        self.loc = loc
        for v in operands:
            self._add_operand(v)

    def _add_operand(self, v: Value) -> None:
        v.uses.append((self, len(self.operands)))
        self.operands.append(v)

    @property
    def result(self) -> Value:
        if len(self.results) != 1:
            raise ValueError(f"{self.name} has {len(self.results)} results")
        return self.results[0]

    def __repr__(self) -> str:
        return f"<Op {self.name} @{self.loc}>"


@dataclass
class Module:
    """A model: name, module attributes (max_seq, source, ...) and ops in program order."""

    name: str
    attrs: dict = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)

    @property
    def max_seq(self) -> int:
        return int(self.attrs["max_seq"])

    @property
    def max_ctx(self) -> int:
        return int(self.attrs.get("max_ctx", self.attrs["max_seq"]))

    @property
    def bounds(self) -> dict[str, int]:
        return {SEQ: self.max_seq, CTX: self.max_ctx}

    def walk(self, name: str | None = None) -> Iterator[Op]:
        return (op for op in self.ops if name is None or op.name == name)

    def inputs(self) -> list[Op]:
        return list(self.walk("input"))

    def outputs(self) -> list[Op]:
        return list(self.walk("output"))


class Rewriter:
    """The only way passes change a module; counts ops created, erased and attributes set."""

    def __init__(self, module: Module) -> None:
        self.module = module
        self.created = self.erased = self.attrs_set = self.replaced = 0

    def create(self, name: str, operands: Iterable[Value], result_types: Iterable[TensorType],
               attrs: dict | None = None, loc: str = "", before: Op | None = None) -> Op:
        """Create an op and insert it before `before` (or at the end)."""
        op = Op(name, operands, result_types, attrs, loc)
        ops = self.module.ops
        ops.insert(ops.index(before) if before is not None else len(ops), op)
        self.created += 1
        return op

    def replace_uses(self, old: Value, new: Value) -> None:
        """Make every user of `old` use `new`."""
        for op, i in old.uses:
            op.operands[i] = new
            new.uses.append((op, i))
        self.replaced += len(old.uses)
        old.uses = []

    def set_operand(self, op: Op, i: int, new: Value) -> None:
        """Make operand i of `op` be `new`."""
        old = op.operands[i]
        old.uses.remove((op, i))
        op.operands[i] = new
        new.uses.append((op, i))
        self.replaced += 1

    def erase(self, op: Op) -> None:
        """Remove an op whose results are unused."""
        for r in op.results:
            if r.uses:
                raise ValueError(f"cannot erase {op.name} at {op.loc}: its result is still used")
        for i, v in enumerate(op.operands):
            v.uses.remove((op, i))
        self.module.ops.remove(op)
        self.erased += 1

    def erase_many(self, ops: Iterable[Op]) -> None:
        """Erase a set of ops, users before producers (their results must be dead outside the set)."""
        doomed = {id(o) for o in ops}
        for op in reversed([o for o in self.module.ops if id(o) in doomed]):
            self.erase(op)

    def set_attr(self, op: Op, key: str, value: object) -> None:
        op.attrs[key] = value
        self.attrs_set += 1

    def set_module_attr(self, key: str, value: object) -> None:
        self.module.attrs[key] = value
        self.attrs_set += 1

    def summary(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.created, "created"), (self.erased, "erased"),
                                               (self.replaced, "uses replaced"), (self.attrs_set, "attrs set")) if n]
        return ", ".join(parts) or "no change"
