"""Open an ONNX model without loading its weights, and read weights lazily.

Protobuf stays inside the frontend: this module turns the file into a `OnnxModel` (nodes in
topological order, producer/consumer maps, initializer metadata) and a `WeightStore` that maps
external data from disk instead of reading it, so a 5 GB model costs almost no memory until the
backend streams its weights into the binary.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from isa.diag import CimcError

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
#: 4-bit integer types: stored two to a byte, low nibble first (ONNX's packing).
PACKED_4BIT = {TensorProto.INT4, TensorProto.UINT4}
#: Element types cimc reads from external data: whole-byte ones and PACKED_4BIT (not strings, nor
#: the other sub-byte types: 2-bit integers, 4- and 6-bit floats).
_EXTERNAL_TYPES = {v for k, v in TensorProto.DataType.items()
                   if k not in ("UNDEFINED", "STRING", "INT2", "UINT2", "FLOAT4E2M1", "FLOAT6E2M3", "FLOAT6E3M2")}
#: protobuf cannot parse a message of 2 GiB or more: larger models keep their weights in external data.
PROTOBUF_LIMIT = 2**31


@dataclass
class Node:
    """An ONNX node with its attributes decoded to Python values."""

    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict
    proto: onnx.NodeProto  # the node as in the file (named like `name`), for folding and inference


@dataclass
class OnnxModel:
    """The parts of an ONNX model the frontend needs; weights stay on disk."""

    path: Path
    proto: onnx.ModelProto
    nodes: list[Node]
    inputs: dict[str, onnx.ValueInfoProto]
    outputs: list[str]
    initializers: dict[str, TensorProto]
    opsets: dict[str, int]
    producer: dict[str, Node] = field(default_factory=dict)
    consumers: dict[str, list[Node]] = field(default_factory=dict)
    dag: nx.DiGraph = field(default_factory=nx.DiGraph)  # node positions in `nodes`, producer -> consumer

    def upstream(self, values: set[str]) -> list[Node]:
        """The nodes `values` depend on, in topological order."""
        at = {id(n): i for i, n in enumerate(self.nodes)}
        ends = {at[id(self.producer[v])] for v in values if v in self.producer}
        keep = ends.union(*(nx.ancestors(self.dag, i) for i in ends))
        return [self.nodes[i] for i in sorted(keep)]

    def is_weight(self, name: str) -> bool:
        """A float initializer with two or more non-trivial dims: a matrix to stream, not fold."""
        t = self.initializers.get(name)
        return t is not None and t.data_type in FLOAT_TYPES and sum(d > 1 for d in t.dims) >= 2


class CannotCompile(CimcError):
    """The one error listing every node that cannot be compiled; `failures` keeps the nodes and
    reasons (for `cimc check`, which groups them)."""

    def __init__(self, message: str, *, detail: str = "", failures: list[tuple[Node, str]] | None = None) -> None:
        super().__init__(message, detail=detail)
        self.failures = list(failures or [])


def cannot_compile(model: OnnxModel, failures: list[tuple[Node, str]]) -> CannotCompile:
    """The one error listing every node that cannot be compiled, and why."""
    lines = [f"  {n.name} [{n.op_type}" + (f" (domain {n.domain})" if n.domain not in ("", "ai.onnx") else "")
             + f"]: {reason}" for n, reason in failures]
    return CannotCompile(f"{model.path}: cannot compile {len(lines)} node(s); nothing was written",
                         detail="\n".join(lines), failures=failures)


class WeightStore:
    """Reads initializer data by name. External data is memory-mapped, one read-only map per file
    shared by every tensor in it (a map holds a file descriptor; a tensor per map would exhaust them
    on a model with thousands of tensors), so a tensor costs no memory until its bytes are used and
    offsets and sizes past 2 GB are plain integers."""

    def __init__(self, model: OnnxModel) -> None:
        self.model = model
        self._cache: dict[str, np.ndarray] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self._load(name)
        return self._cache[name]

    def _load(self, name: str) -> np.ndarray:
        t = self.model.initializers.get(name)
        if t is None:
            raise CimcError(f"{self.model.path}: no initializer named {name!r}")
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        target, offset, need = self.external(name)
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        if need == 0:
            return np.zeros(tuple(t.dims), dtype=dtype)
        if target not in self._maps:
            with open(target, "rb") as f:
                self._maps[target] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(self._maps[target], np.uint8, count=need, offset=offset)
        if t.data_type in PACKED_4BIT:
            return _unpack_4bit(raw, t)
        return raw.view(dtype).reshape(tuple(t.dims))

    def external(self, name: str) -> tuple[Path, int, int]:
        """(file, offset, bytes) of an initializer stored as external data, all checked against the
        tensor's type and shape and the file's size, so nothing is mapped or allocated for a bad one."""
        t = self.model.initializers[name]
        where = f"{self.model.path}: initializer {name!r}"
        info = {e.key: e.value for e in t.external_data}
        location = info.get("location", "")
        if not location:
            raise CimcError(f"{where} is marked as external data but names no file (location)")
        base = self.model.path.parent.resolve()
        target = (base / location).resolve()
        if Path(location).is_absolute() or ".." in Path(location).parts or base not in target.parents:
            raise CimcError(f"{where} points outside the model's folder ({location!r}); external data must be "
                            "a relative path inside it, without '..' and not through a symlink leaving it")
        if t.data_type not in _EXTERNAL_TYPES:
            kind = TensorProto.DataType.Name(t.data_type) if t.data_type in TensorProto.DataType.values() \
                else f"code {t.data_type}"
            raise CimcError(f"{where} ({location!r}) has element type {kind}, which cimc cannot read from "
                            "external data")
        if any(d < 0 for d in t.dims):
            raise CimcError(f"{where} ({location!r}) has a negative dimension {list(t.dims)}")
        try:
            offset, length = int(info.get("offset", 0)), info.get("length")
            length = None if length is None else int(length)
        except ValueError:
            raise CimcError(f"{where} ({location!r}) has a non-integer external data offset or length") from None
        count = int(np.prod(t.dims, dtype=np.int64))
        need = (count + 1) // 2 if t.data_type in PACKED_4BIT else \
            count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        if offset < 0 or (length is not None and length != need):
            raise CimcError(f"{where} ({location!r}) has offset {offset} and length {length}; expected a length "
                            f"of {need} bytes ({TensorProto.DataType.Name(t.data_type).lower()} x {list(t.dims)})")
        try:
            size = target.stat().st_size if target.is_file() else -1
        except OSError:
            size = -1
        if size < 0:
            raise CimcError(f"{where}: external data file {location!r} is missing")
        if offset + need > size:
            raise CimcError(f"{where}: external data file {location!r} is truncated (needs bytes up to "
                            f"{offset + need}, the file has {size})")
        return target, offset, need

    def check_external(self) -> None:
        """Validate every external-data reference now, not when the weights are first read."""
        for name, t in self.model.initializers.items():
            if t.data_location == TensorProto.EXTERNAL:
                self.external(name)


def _unpack_4bit(raw: np.ndarray, t: TensorProto) -> np.ndarray:
    """A 4-bit initializer's values from its packed bytes, as the ml_dtypes type numpy_helper gives."""
    count = int(np.prod(t.dims, dtype=np.int64))
    values = np.empty(2 * raw.size, np.int8)
    values[0::2], values[1::2] = raw & 0x0F, raw >> 4
    values = values[:count]
    if t.data_type == TensorProto.INT4:
        values = np.where(values > 7, values - 16, values).astype(np.int8)
    return values.astype(helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))


def open_model(path: str | os.PathLike) -> tuple[OnnxModel, WeightStore]:
    """Parse an ONNX file (not its external data) and index it; clear errors for bad files."""
    p = Path(path)
    if not p.is_file():
        raise CimcError(f"{p}: no such file")
    if p.stat().st_size >= PROTOBUF_LIMIT:
        raise CimcError(f"{p}: {p.stat().st_size} bytes is over protobuf's 2 GB limit, so it is not a valid ONNX "
                        "file; save the weights as external data (onnx.save(..., save_as_external_data=True))")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else "parse failed"
        raise CimcError(f"{p}: not an ONNX model ({type(e).__name__}: {why})") from None
    g = proto.graph
    if not g.node:
        raise CimcError(f"{p}: not an ONNX model (no graph nodes); is this the right file?")
    inits = {t.name: t for t in g.initializer}
    inputs = {i.name: i for i in g.input if i.name not in inits}
    nodes = []
    for i, n in enumerate(g.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        n.name = n.name or f"{n.op_type}_{i}"
        nodes.append(Node(n.name, n.op_type, n.domain or "", list(n.input), list(n.output), attrs, n))
    model = OnnxModel(p, proto, nodes, inputs, [o.name for o in g.output], inits,
                      {o.domain or "": o.version for o in proto.opset_import})
    _index(model)
    store = WeightStore(model)
    store.check_external()
    return model, store


def _index(model: OnnxModel) -> None:
    """Fill producer/consumer maps; put nodes in topological order (ONNX requires it, some
    hand-edited graphs break it) keeping the file's order where it is already valid."""
    graph_in = set(model.initializers) | set(model.inputs) | {""}
    for n in model.nodes:
        for name in n.outputs:
            if name:
                if name in model.producer or name in graph_in:
                    raise CimcError(f"{model.path}: value {name!r} is produced twice (node {n.name!r})")
                model.producer[name] = n
    missing = [(n.name, i) for n in model.nodes for i in n.inputs if i not in graph_in and i not in model.producer]
    if missing:
        node, name = missing[0]
        raise CimcError(f"{model.path}: node {node!r} uses {name!r}, which is neither a graph input, an "
                        "initializer nor produced by a node")
    g = nx.DiGraph()
    order = {id(n): i for i, n in enumerate(model.nodes)}
    g.add_nodes_from(order.values())
    for n in model.nodes:
        for name in n.inputs:
            if name:
                model.consumers.setdefault(name, []).append(n)
            if name in model.producer:
                g.add_edge(order[id(model.producer[name])], order[id(n)])
    try:
        ranks = list(nx.lexicographical_topological_sort(g))
    except nx.NetworkXUnfeasible:
        cycle = [model.nodes[u].name for u, _ in nx.find_cycle(g)]
        raise CimcError(f"{model.path}: the graph has a cycle through nodes {', '.join(cycle)}") from None
    model.nodes = [model.nodes[i] for i in ranks]
    model.dag = nx.relabel_nodes(g, {old: new for new, old in enumerate(ranks)})
    for name in model.outputs:
        if name not in model.producer and name not in graph_in:
            raise CimcError(f"{model.path}: graph output {name!r} is not produced by any node")
