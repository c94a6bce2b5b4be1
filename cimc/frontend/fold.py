"""Bind dynamic dimensions, fold what does not depend on input data, and learn every shape.

A decoder graph computes much from the input's *shape* alone: positions, RoPE tables, the causal
mask, Reshape targets. With the sequence length bound to a number, those are constants. `analyze`
alternates two steps until nothing changes: evaluate every node whose inputs are known (ONNX's
reference evaluator), then run ONNX shape inference with the folded values in place, which
resolves the data tensors' shapes and lets `Shape` nodes of data tensors fold in turn.

The frontend analyzes the graph at several bindings of the token count `seq` and, for exports
that carry a KV cache, of the cached length `past`. Axes whose size follows `seq` are sequence
axes, those following `past` cache axes, and those following both the context (past + seq). A
folded value that varies must be consistent across bindings (row i of a RoPE table cannot
depend on how many rows there are), which is what makes one program valid for every length.

Input roles are found from the graph, not from names: the token ids feed the embedding Gather;
a float input that a Concat extends into a graph output is a past KV cache (its dynamic axis is
`past`); other integer inputs that determine RoPE angles or index learned positions are position
ids (sized by `seq`, assumed past + 0..seq-1), the rest an attention mask (assumed all ones:
batch 1, no padding) sized by the context (past + seq) or, without a cache, by `seq`. A mask
whose length is a symbol of its own in an export with a cache (dynamo's `total`) spans the
context too: HF masks always cover the cached and the new positions. An attention op may say a
cache is a window buffer (onnxruntime-genai's sliding-window layers: W slots holding the last W
positions, its length symbol fixed to W). The assumptions are checked when the program runs. A
graph with neither token ids nor a cache whose inputs all have fixed shapes is not a decoder: it
is lifted in the generic mode (cimc.frontend.generic), every input a fixed-size activation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from cimc.frontend import converters
from cimc.frontend.model import Node, OnnxModel, WeightStore, cannot_compile
from isa.diag import CimcError

#: Ops whose output depends on the input's shape only, never on its values.
SHAPE_OPS = {"Shape", "Size"}
#: Ops that gather embedding rows by token id (input 1): ONNX's, and onnxruntime's int4 table.
EMBEDDING_GATHERS = ("Gather", "GatherBlockQuantized")
#: Ops that only re-view token ids on their way to the embedding (GPT-2's input_ids.view(-1, seq)).
ID_VIEWS = ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity")


@dataclass(frozen=True)
class Binding:
    """Tokens in this run (`seq`) and tokens already cached (`past`)."""

    seq: int
    past: int = 0


@dataclass
class Facts:
    """What is known at one binding."""

    binding: Binding
    shapes: dict[str, tuple[int, ...]]
    elem_types: dict[str, int]
    values: dict[str, np.ndarray]


@dataclass
class Roles:
    """What each graph input is (see the module docstring)."""

    tokens: str | None = None
    caches: dict[str, str] = field(default_factory=dict)  # past input -> present output
    assumed: dict[str, str] = field(default_factory=dict)  # input -> "ones" | "positions" | "empty"
    seq_param: str = ""
    past_param: str = ""
    ctx_params: set[str] = field(default_factory=set)  # names of past + seq (an attention op's mask)
    dims: dict[str, int] = field(default_factory=dict)  # dimensions an op fixes (a symbolic head_dim)
    windows: dict[str, int] = field(default_factory=dict)  # window-buffer past/present -> its W slots
    generic: bool = False  # no token ids, no cache, fixed input shapes: cimc.frontend.generic lifts it


def find_roles(model: OnnxModel) -> Roles:
    """Classify the graph inputs (token ids, KV caches, mask and positions) by their use."""
    roles = Roles()
    # the token ids index the largest embedding table (GPT-2's position ids index wpe, shorter than the vocab)
    rows = {name: _embedding_rows(model, name) for name in model.inputs}
    if max(rows.values(), default=0):
        roles.tokens = max(rows, key=lambda name: rows[name])
        dims = model.inputs[roles.tokens].type.tensor_type.shape.dim
        roles.seq_param = dims[1].dim_param if len(dims) > 1 else ""
    outputs = set(model.outputs)
    for name, vi in model.inputs.items():
        if vi.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            for n in model.consumers.get(name, []):
                if n.op_type == "Concat" and n.inputs and n.inputs[0] == name and n.outputs[0] in outputs \
                        and len(vi.type.tensor_type.shape.dim) == 4:  # [batch, kv_heads, past, head_dim]
                    roles.caches[name] = n.outputs[0]
                    params = [d.dim_param for d in vi.type.tensor_type.shape.dim[1:] if d.dim_param]
                    roles.past_param = params[-1] if params else roles.past_param
    fixed = all(vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
                and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim) for vi in model.inputs.values())
    for n in model.nodes:  # attention ops that keep a cache (GroupQueryAttention); not without token ids
        conv = converters.find(model, n)
        if conv is None or conv.roles is None or (roles.tokens is None and fixed):
            continue
        found = conv.roles(model, n)
        roles.caches.update(found.caches)
        roles.dims.update(found.dims)
        roles.windows.update(found.windows)
        for past in found.caches:
            dims = model.inputs[past].type.tensor_type.shape.dim
            if len(dims) == 4 and dims[2].dim_param and past not in found.windows:
                roles.past_param = dims[2].dim_param
        for mask in found.masks:
            roles.assumed[mask] = "ones"
            dims = model.inputs[mask].type.tensor_type.shape.dim
            if len(dims) == 2 and dims[1].dim_param:
                roles.ctx_params.add(dims[1].dim_param)
    for name, vi in model.inputs.items():
        if name in (roles.tokens, *roles.caches, *roles.assumed) or vi.type.tensor_type.elem_type not in (
                TensorProto.INT64, TensorProto.INT32):
            continue
        dims = vi.type.tensor_type.shape.dim[1:]
        kinds = [_dim_kind(d.dim_param, roles) for d in dims]
        if _feeds_positions(model, name):
            if kinds == ["seq"]:
                roles.assumed[name] = "positions"
        elif kinds in (["ctx"], ["seq"]):
            roles.assumed[name] = "ones"
        elif kinds == [""] and dims[0].dim_param and roles.caches:
            # a mask over the cache and the new tokens, its length a symbol of its own (dynamo's `total`)
            roles.ctx_params.add(dims[0].dim_param)
            roles.assumed[name] = "ones"
    roles.generic = roles.tokens is None and not roles.caches and fixed
    if roles.generic:  # an empty input holds no data: a constant
        roles.assumed.update({name: "empty" for name, vi in model.inputs.items()
                              if any(d.dim_value == 0 for d in vi.type.tensor_type.shape.dim)})
    return roles


#: Where an integer input is a position: RoPE's angles (Cos, Sin), or (op type, input index) of an
#: op taking position ids (a Gather of learned positions is found by its data being an initializer).
_POSITION_OPS = {"Cos", "Sin"}
_POSITION_INPUTS = {("RotaryEmbedding", 1), ("RotaryEmbedding", 3), ("GroupQueryAttention", 9)}


def _feeds_positions(model: OnnxModel, name: str) -> bool:
    """Whether the integer input `name` is used as token positions (not as a mask): something it
    determines computes RoPE angles or indexes a table of learned positions."""
    seen, stack = {name}, [name]
    while stack:
        for n in model.consumers.get(stack.pop(), []):
            hits = [i for i, x in enumerate(n.inputs) if x in seen]
            if n.op_type in _POSITION_OPS or any((n.op_type, i) in _POSITION_INPUTS for i in hits) or (
                    n.op_type in EMBEDDING_GATHERS and 1 in hits and n.inputs[0] in model.initializers):
                return True
            for o in n.outputs:
                if o and o not in seen:
                    seen.add(o)
                    stack.append(o)
    return False


def _embedding_rows(model: OnnxModel, name: str) -> int:
    """The rows of the largest table `name` indexes as an embedding Gather's indices, directly or
    through re-views (0: none)."""
    rows = 0
    for n in model.consumers.get(name, []):
        if n.op_type in EMBEDDING_GATHERS and n.inputs[1:2] == [name]:
            table = model.initializers.get(n.inputs[0])
            rows = max(rows, int(table.dims[0]) if table is not None and table.dims else 1)
        elif n.op_type in ID_VIEWS and n.inputs[:1] == [name]:
            rows = max(rows, _embedding_rows(model, n.outputs[0]))
    return rows


def data_values(model: OnnxModel, roles: Roles) -> set[str]:
    """Names of values that depend on input data (not just on input shapes or assumptions)."""
    data = set(model.inputs) - set(roles.assumed)
    for n in model.nodes:
        if n.op_type not in SHAPE_OPS and any(i in data for i in n.inputs):
            data.update(o for o in n.outputs if o)
    return data


def weight_derived(model: OnnxModel, data: set[str]) -> set[str]:
    """Weight initializers (float matrices, and those a converter keeps on disk) and static
    values computed from them (kept lazy, never folded)."""
    lazy = {name for name in model.initializers if model.is_weight(name)}
    for n in model.nodes:
        conv = converters.find(model, n)
        if conv is not None:
            lazy.update(name for name in conv.lazy(model, n) if name in model.initializers)
    for n in model.nodes:
        if not any(i in data for i in n.inputs) and any(i in lazy for i in n.inputs):
            lazy.update(o for o in n.outputs if o)
    return lazy


def bind_inputs(model: OnnxModel, roles: Roles, b: Binding, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: dynamic axis 0 is the batch (1); the token and cache lengths come
    from the binding (axis 1 of a graph without a cache is the tokens); any other dynamic axis
    must be named in `dims`."""
    shapes = {}
    for name, vi in model.inputs.items():
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            raise CimcError(f"{model.path}: graph input {name!r} has no tensor shape; re-export the "
                            "model with shapes")
        if roles.generic:
            shapes[name] = tuple(d.dim_value for d in tt.shape.dim)
            continue
        out = []
        for axis, d in enumerate(tt.shape.dim):
            p = d.dim_param
            kind = _dim_kind(p, roles)
            if d.HasField("dim_value") and d.dim_value > 0:
                out.append(d.dim_value)
            elif p in dims:
                out.append(dims[p])
            elif kind == "ctx":
                out.append(b.past + b.seq)
            elif kind == "past":
                out.append(b.past)
            elif kind == "seq" or (axis == 1 and not roles.past_param):
                out.append(b.seq)
            elif axis == 0:
                out.append(1)
            else:
                raise CimcError(f"{model.path}: input {name!r} axis {axis} is dynamic "
                                f"({p or 'unnamed'}); bind it with --dim {p or 'NAME'}=N")
        shapes[name] = tuple(out)
    return shapes


def _dim_kind(param: str, roles: Roles) -> str:
    """Whether a symbolic dim is the token count, the cached length, or their sum ('ctx')."""
    if param and param in roles.ctx_params:
        return "ctx"
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", param or ""))
    seq = bool(roles.seq_param) and roles.seq_param in names
    past = bool(roles.past_param) and roles.past_param in names
    return "ctx" if seq and past else "past" if past else "seq" if seq else ""


def assumed_values(roles: Roles, shapes: dict[str, tuple[int, ...]], b: Binding,
                   types: dict[str, int]) -> dict[str, np.ndarray]:
    """The values generation feeds the mask and position inputs (checked at run time)."""
    out = {}
    for name, kind in roles.assumed.items():
        dtype = helper.tensor_dtype_to_np_dtype(types[name])
        if kind == "ones":
            out[name] = np.ones(shapes[name], dtype)
        elif kind == "empty":
            out[name] = np.zeros(shapes[name], dtype)
        else:
            out[name] = np.broadcast_to(b.past + np.arange(b.seq, dtype=dtype), shapes[name]).astype(dtype)
    return out


@dataclass
class Folding:
    """What folding needs that no binding changes: the data-dependent values, the lazy
    (weight-derived) ones, and the initializers folding may read."""

    data: set[str]
    lazy: set[str]
    consts: dict[str, np.ndarray]


def prepare(model: OnnxModel, weights: WeightStore, roles: Roles) -> Folding:
    data = data_values(model, roles)
    lazy = weight_derived(model, data)
    consts = {name: np.asarray(weights.get(name)) for name in model.initializers if name not in lazy}
    return Folding(data, lazy, consts)


def analyze(model: OnnxModel, prep: Folding, b: Binding, dims: dict[str, int], roles: Roles,
            only: set[str] | None = None) -> Facts:
    """Fold static values and infer all shapes at binding `b`; with `only`, just the nodes those
    values depend on (a long binding would otherwise fold every [seq, seq] mask too)."""
    nodes = model.nodes if only is None else model.upstream(only)
    data, lazy = prep.data, prep.lazy
    values: dict[str, np.ndarray] = dict(prep.consts)
    input_shapes = bind_inputs(model, roles, b, dims)
    shapes: dict[str, tuple[int, ...]] = dict(input_shapes)
    types: dict[str, int] = {k: v.type.tensor_type.elem_type for k, v in model.inputs.items()}
    values.update(assumed_values(roles, input_shapes, b, types))
    for name, t in model.initializers.items():
        shapes[name], types[name] = tuple(t.dims), t.data_type
    pending = [nd for nd in nodes if not any(i in data or i in lazy for i in nd.inputs
                                                    if nd.op_type not in SHAPE_OPS)]
    for _ in range(32):
        progress = _fold_ready(model, pending, values, shapes)
        inferred = _infer_shapes(model, nodes, values, shapes, types, lazy)
        progress |= inferred
        if not progress:
            break
    for name, v in values.items():
        shapes[name] = v.shape
        types.setdefault(name, helper.np_dtype_to_tensor_dtype(v.dtype))
    return Facts(b, shapes, types, values)


def position_tables(model: OnnxModel, main: Facts, seq: Facts) -> set[str]:
    """Static values that may be per-position tables (RoPE cos/sin): exactly one axis grows with
    the tokens, and a node combines them with data. A mask has two such axes and is left out."""
    return _token_values(model, main, seq, 1)


def mask_values(model: OnnxModel, main: Facts, seq: Facts) -> set[str]:
    """Static values that may be attention masks (or their boolean conditions): two axes grow with
    the tokens (queries and keys), and a node combines them with data."""
    return _token_values(model, main, seq, 2)


def mask_probe(max_ctx: int, cached: bool) -> Binding:
    """The binding a mask is also folded at, to see a sliding window wider than the small
    bindings show: a decode step at the last position (one row of max_ctx keys) for exports with a
    KV cache; for the others every position up to max_ctx, at most MASK_PROBE (a [seq, seq] mask
    of a long context would take gigabytes), so a window wider than MASK_PROBE goes unseen there."""
    return Binding(1, max_ctx - 1) if cached else Binding(min(max_ctx, MASK_PROBE), 0)


#: Most positions a mask of an export without a KV cache is folded at (see `mask_probe`).
MASK_PROBE = 2048


def _token_values(model: OnnxModel, main: Facts, seq: Facts, growing: int) -> set[str]:
    out = set()
    for name, v in main.values.items():
        w = seq.values.get(name)
        if w is None or v.ndim != w.ndim or sum(a != b for a, b in zip(v.shape, w.shape, strict=True)) != growing:
            continue
        if any(i not in main.values for nd in model.consumers.get(name, []) for i in nd.inputs if i):
            out.add(name)
    return out


def _fold_ready(model: OnnxModel, pending: list[Node], values: dict[str, np.ndarray],
                shapes: dict[str, tuple[int, ...]]) -> bool:
    """Evaluate, in one reference-evaluator run, every pending node whose inputs are known."""
    batch: list[Node] = []
    available = set(values)
    for nd in pending:
        if all(o in values for o in nd.outputs if o):
            continue
        if nd.op_type in SHAPE_OPS and nd.inputs[0] in shapes and nd.inputs[0] not in values:
            values.update(_shape_op(nd, shapes[nd.inputs[0]]))
            available.update(nd.outputs)
            continue
        if all(i in available or not i for i in nd.inputs):
            batch.append(nd)
            available.update(o for o in nd.outputs if o)
    if not batch:
        return False
    produced = [o for nd in batch for o in nd.outputs if o]
    try:
        results = _evaluate(model, batch, values)
    except Exception as e:  # the reference evaluator raises many types for unsupported input
        _blame(model, batch, values)
        names = ", ".join(nd.name for nd in batch[:5])
        more = " ..." if len(batch) > 5 else ""
        raise CimcError(f"{model.path}: cannot evaluate the shape-only subgraph ({names}{more}): "
                        f"{type(e).__name__}: {e}") from None
    for name, value in zip(produced, results, strict=True):
        values[name] = np.asarray(value)
        shapes[name] = values[name].shape
    return True


def _evaluate(model: OnnxModel, batch: list[Node], values: dict[str, np.ndarray]) -> list:
    """The outputs of `batch` (in order) from one reference-evaluator run on the known `values`."""
    needed = {i for nd in batch for i in nd.inputs if i in values}
    produced = [o for nd in batch for o in nd.outputs if o]
    graph = helper.make_graph(
        [nd.proto for nd in batch], "fold", [],
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in produced],
        [numpy_helper.from_array(values[i], i) for i in sorted(needed)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in model.opsets.items()])
    return ReferenceEvaluator(proto).run(None, {})


def _blame(model: OnnxModel, batch: list[Node], values: dict[str, np.ndarray]) -> None:
    """The batch failed to evaluate: evaluate its nodes one at a time (in order, on copies) and
    refuse the first that fails, naming it; returns if each node alone evaluates."""
    known = dict(values)
    for nd in batch:
        try:
            out = _evaluate(model, [nd], known)
        except Exception as e:  # as in _fold_ready: any error of the evaluator is this node's
            why = str(e).splitlines()[0] if str(e) else "no message"
            raise cannot_compile(model, [(nd, f"cannot be evaluated at compile time ({type(e).__name__}: "
                                              f"{why})")]) from None
        known.update(zip([o for o in nd.outputs if o], map(np.asarray, out), strict=True))


def _shape_op(nd: Node, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    if nd.op_type == "Size":
        return {nd.outputs[0]: np.array(int(np.prod(shape)), dtype=np.int64)}
    rank = len(shape)
    start, end = nd.attrs.get("start", 0), nd.attrs.get("end", rank)
    start, end = (s + rank if s < 0 else s for s in (start, end))
    return {nd.outputs[0]: np.array(shape[max(0, start):min(rank, end)], dtype=np.int64)}


def _infer_shapes(model: OnnxModel, among: list[Node], values: dict[str, np.ndarray],
                  shapes: dict[str, tuple[int, ...]], types: dict[str, int], lazy: set[str]) -> bool:
    """Run ONNX shape inference over the unfolded nodes of `among`; record new shapes. True if any."""
    nodes = [nd for nd in among if not all(o in values for o in nd.outputs if o)]
    if not nodes:
        return False
    inputs = [helper.make_tensor_value_info(k, types[k], shapes[k]) for k in model.inputs]
    inputs += [helper.make_tensor_value_info(k, model.initializers[k].data_type, shapes[k])
               for k in model.initializers if k in lazy]
    protos: list[onnx.NodeProto] = []
    for nd in nodes:
        conv = converters.find(model, nd)
        if conv is None:
            protos.append(nd.proto)
            continue
        standin, extra = conv.standin(nd)  # ONNX does not know the op: standard nodes with its shapes
        protos += standin
        inputs += extra
    consumed = {i for p in protos for i in p.input}
    inits = [numpy_helper.from_array(v, k) for k, v in values.items() if k in consumed]
    produced = [o for nd in nodes for o in nd.outputs if o]
    outputs = [o for o in model.outputs if o in set(produced)] or produced[-1:]
    graph = helper.make_graph(protos, "infer", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in model.opsets.items()],
                              ir_version=model.proto.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises InferenceError and others for inconsistent graphs
        raise CimcError(f"{model.path}: ONNX shape inference failed: {str(e).splitlines()[0]}") from None
    new = False
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape") or vi.name in shapes:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if None in dims:
            continue
        shapes[vi.name] = tuple(dims)  # type: ignore[arg-type]
        types[vi.name] = tt.elem_type
        new = True
    return new
