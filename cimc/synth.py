"""Synthetic decoder-only ONNX models shaped like torch-dynamo exports of Hugging Face Llama / Qwen2.

`build_decoder_onnx` writes a random-weight model whose graph mirrors, node for node where it
matters, what ``torch.onnx.export(model, dynamo=True)`` produces for ``LlamaForCausalLM`` /
``Qwen2ForCausalLM`` (transformers 5, SDPA attention, no KV cache): ``input_ids`` int64
[1, seq] -> ``logits`` float [1, seq, vocab], opset 20, default domain only.
The frontend recognises decoder idioms by pattern, so the idioms are spelled as the exporter
spells them:

- RMSNorm: ``Pow(x, 2) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, ·) -> Mul(w, ·)``
- linear: ``MatMul(x, W[in, out])`` (+ ``Add(·, b)`` for Qwen2 q/k/v), then
  ``Reshape([1, -1, n, hd], allowzero=1) -> Transpose([0, 2, 1, 3])``
- RoPE: cos/sin from ``Range`` positions times ``inv_freq``, applied as
  ``x*cos + Concat(Neg(Slice(x, hd/2:)), Slice(x, :hd/2))*sin``
- GQA repeat_kv: ``Unsqueeze -> Expand -> Reshape`` (absent when heads == kv_heads, as in HF)
- attention: ``MatMul(q*s, kT*s)``, s = hd**-0.25, kT via the exporter's Shape/Slice/Reshape/Transpose
  plumbing, additive causal mask, ``Softmax -> IsNaN/Where`` guard, ``MatMul(p, v)``
- SwiGLU: ``Mul(Mul(g, Sigmoid(g)), up)``; tied LM head: ``Transpose(table, [1, 0])``

Only the causal mask is simpler than the export's (which derives it through CumSum/GatherND
from an all-ones attention mask): ``Where(LessOrEqual(kv_pos, q_pos), 0, float32.min)``.
Nodes carry the exporter's ``pkg.torch.onnx.name_scopes`` metadata (module path of each node),
so a weight's Hugging Face name can be recovered from the MatMul that uses it.

Weights are float32, deterministic in ``seed``: each tensor draws from its own generator keyed by
(seed, creation index). Matrices are N(0, 1/fan_in) (the embedding table N(0, 1/hidden), as it is
the LM head when tied), so activations and logits stay O(1) at any size; RMSNorm scales are
1 + 0.1·N(0, 1) and biases 0.05·N(0, 1), far enough from 1 and 0 that dropping one shows.
Large models stream their weights into ``<model>.onnx.data`` one chunk at a time, so peak memory
stays far below the model size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from isa.atomic import atomic_file

OPSET = 20
IR_VERSION = 10
SEQ = "seq"
#: ``external_data=None`` writes external data when the weights exceed this many bytes.
AUTO_EXTERNAL_BYTES = 100 * 2**20

_PROTOBUF_LIMIT = 2**31
_INLINE_MAX_BYTES = 1024  # smaller tensors stay inline even with external data (onnx.save's default)
_ALIGN = 4096  # offset alignment of tensors in the data file
_CHUNK = 1 << 22  # float32 values drawn per generator call: 16 MiB
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min
_FLOAT, _INT64, _BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a Llama / Qwen2-style decoder. ``head_dim=None`` resolves to hidden // heads."""

    name: str = "tiny-llama"
    vocab: int = 256
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int | None = None
    intermediate: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        sizes = (self.vocab, self.hidden, self.layers, self.heads, self.kv_heads, self.intermediate)
        if min(sizes) < 1 or self.head_dim < 2:
            raise ValueError(f"{self.name}: all sizes must be positive and head_dim >= 2")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads ({self.heads}) must be a multiple of kv_heads")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: RoPE needs an even head_dim, got {self.head_dim}")

    @classmethod
    def from_hf_config(cls, d: dict, name: str = "hf-decoder") -> DecoderConfig:
        """Read a Hugging Face ``config.json`` dict (llama, qwen2, qwen3 and alike).

        Qwen2 always has q/k/v biases; other model types take them from ``attention_bias``.
        Not modelled (they would need fields this config lacks): rope_scaling (it changes only
        the inv_freq values), Qwen3's per-head q/k RMSNorm, o_proj and MLP biases.
        """
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{name}: only SiLU-gated MLPs are built, config has hidden_act={act!r}")
        heads = d["num_attention_heads"]
        theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            name=name,
            vocab=d["vocab_size"],
            hidden=d["hidden_size"],
            layers=d["num_hidden_layers"],
            heads=heads,
            kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim"),
            intermediate=d["intermediate_size"],
            rope_theta=float(theta),
            rms_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=d.get("model_type") == "qwen2" or bool(d.get("attention_bias", False)),
        )

    def param_count(self) -> int:
        """Weights and biases, as Hugging Face counts them (the inv_freq buffer excluded)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = (
            2 * self.hidden * q
            + 2 * self.hidden * kv
            + 3 * self.hidden * self.intermediate
            + 2 * self.hidden
            + (q + 2 * kv if self.qkv_bias else 0)
        )
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return embeddings + self.layers * per_layer + self.hidden


def build_decoder_onnx(
    cfg: DecoderConfig, path: str | Path, *, seed: int = 0, external_data: bool | None = None
) -> Path:
    """Write ``cfg`` with random weights to ``path``; return the path.

    ``external_data`` puts every weight of 1 KiB or more into ``<path>.data`` (4 KiB-aligned);
    ``None`` does so when the weights exceed `AUTO_EXTERNAL_BYTES`. Both files are written to a
    temporary name and renamed into place, the data file first.
    """
    path = Path(path)
    weight_bytes = 4 * cfg.param_count()
    if external_data is None:
        external_data = weight_bytes > AUTO_EXTERNAL_BYTES
    if not external_data and weight_bytes >= _PROTOBUF_LIMIT:
        raise ValueError(f"{cfg.name}: {weight_bytes} bytes of weights need external_data=True")
    if external_data:
        data_path = path.with_name(path.name + ".data")
        with atomic_file(data_path) as f:
            graph = _Graph(seed, _DataFile(f, data_path.name))
            _decoder(graph, cfg)
    else:
        graph = _Graph(seed, None)
        _decoder(graph, cfg)
    model = helper.make_model(
        graph.to_proto(cfg),
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="cimc.synth",
    )
    provenance = {"cimc.synth.config": json.dumps(asdict(cfg)), "cimc.synth.seed": str(seed)}
    helper.set_model_props(model, provenance)
    with atomic_file(path) as f:
        f.write(model.SerializeToString())
    return path


def _normal_chunks(rng: np.random.Generator, n: int, std: float, mean: float) -> Iterator[np.ndarray]:
    """N(mean, std²) float32 values, ``_CHUNK`` at a time."""
    for start in range(0, n, _CHUNK):
        buf = rng.standard_normal(min(_CHUNK, n - start), dtype=np.float32)
        buf *= np.float32(std)
        if mean:
            buf += np.float32(mean)
        yield buf


class _DataFile:
    """Appends tensors to an external data file and describes them as EXTERNAL TensorProtos."""

    def __init__(self, f: BinaryIO, location: str) -> None:
        self.f, self.location, self.offset = f, location, 0

    def append(self, name: str, shape: list[int], chunks: Iterator[np.ndarray]) -> TensorProto:
        pad = -self.offset % _ALIGN
        self.f.write(bytes(pad))
        start = self.offset = self.offset + pad
        for chunk in chunks:
            self.f.write(chunk.astype("<f4", copy=False).data)
            self.offset += chunk.nbytes
        tensor = TensorProto(name=name, data_type=_FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", start), ("length", self.offset - start)):
            tensor.external_data.add(key=key, value=str(value))
        return tensor


class _Graph:
    """Accumulates nodes, initializers and value_info with exporter-style names and scopes."""

    def __init__(self, seed: int, data: _DataFile | None) -> None:
        self.seed, self.data = seed, data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self._hints: dict[str, int] = {}
        self._vals = 0
        self._consts: dict[tuple, str] = {}
        self._scopes = ["m"]
        self._weights = 0

    def _val(self) -> tuple[str, int]:
        n = self._vals
        self._vals += 1
        return f"val_{n}", n

    @contextmanager
    def scope(self, module: str) -> Iterator[None]:
        """Nest the module path recorded in the nodes' name_scopes metadata."""
        self._scopes.append(f"{self._scopes[-1]}.{module}")
        try:
            yield
        finally:
            self._scopes.pop()

    def const(self, value: object, dtype: type = np.int64) -> str:
        """An inline constant initializer, shared by every use of the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self._val()[0]
            self.initializers.append(numpy_helper.from_array(arr, self._consts[key]))
        return self._consts[key]

    def buffer(self, name: str, arr: np.ndarray) -> str:
        """A named inline initializer holding ``arr``."""
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, name: str | None, shape: list[int], std: float, mean: float = 0.0) -> str:
        """A random N(mean, std²) float32 initializer, external if a data file is open and it has >= 1 KiB."""
        name = name or self._val()[0]
        rng = np.random.default_rng([self.seed, self._weights])
        self._weights += 1
        n = math.prod(shape)
        chunks = _normal_chunks(rng, n, std, mean)
        if self.data is not None and 4 * n >= _INLINE_MAX_BYTES:
            self.initializers.append(self.data.append(name, shape, chunks))
        else:
            values = np.concatenate(list(chunks)).reshape(shape)
            self.initializers.append(numpy_helper.from_array(values, name))
        return name

    def op(
        self,
        op_type: str,
        inputs: list[str],
        shape: list[int | str],
        *,
        hint: str | None = None,
        out: str | None = None,
        dtype: int = _FLOAT,
        **attrs: object,
    ) -> str:
        """Append a node and the value_info of its single output; return the output name.

        Names follow the exporter: ``hint``, ``hint_1``, ... with node ``node_<output>``, or
        ``val_N`` with node ``node_<op_type>_N``; ``out`` overrides the output name.
        """
        if hint is None:
            name, n = self._val()
            node_name = f"node_{op_type}_{n}"
        else:
            k = self._hints.get(hint, 0)
            self._hints[hint] = k + 1
            name = f"{hint}_{k}" if k else hint
            node_name = f"node_{name}"
        name = out or name
        node = helper.make_node(op_type, inputs, [name], name=node_name, **attrs)
        scopes = ["", *self._scopes, name]
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(scopes))
        self.nodes.append(node)
        if out is None:
            self.value_info.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def to_proto(self, cfg: DecoderConfig) -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes,
            "main_graph",
            [helper.make_tensor_value_info("input_ids", _INT64, [1, SEQ])],
            [helper.make_tensor_value_info("logits", _FLOAT, [1, SEQ, cfg.vocab])],
            initializer=self.initializers,
            value_info=self.value_info,
        )


@dataclass(frozen=True)
class _Shared:
    """Values computed once before the layers and used by all of them."""

    cos: str  # float [1, 1, seq, hd]
    sin: str
    mask: str  # float [1, 1, seq, seq]: 0 where attending is allowed, float32.min elsewhere
    kv_expand_shape: str | None  # int64 [5] for repeat_kv; None when heads == kv_heads


def _decoder(g: _Graph, cfg: DecoderConfig) -> None:
    """Emit the whole model, in the exporter's order of nodes and weights."""
    hd, n_rep = cfg.head_dim, cfg.heads // cfg.kv_heads
    seq_1d = g.op("Shape", ["input_ids"], [1], dtype=_INT64, start=1, end=2)
    seq = g.op("Squeeze", [seq_1d], [], hint="sym_size_int", dtype=_INT64)
    emb_std = cfg.hidden**-0.5  # the table doubles as the LM head when tied: logits stay O(1)
    with g.scope("model"):
        table = g.weight(
            "m.lm_head.weight" if cfg.tie_embeddings else "m.model.embed_tokens.weight",
            [cfg.vocab, cfg.hidden],
            emb_std,
        )
        with g.scope("embed_tokens"):
            x = g.op("Gather", [table, "input_ids"], [1, SEQ, cfg.hidden], hint="embedding", axis=0)
        arange = g.op("Range", [g.const(0), seq, g.const(1)], [SEQ], hint="arange", dtype=_INT64)
        position_ids = g.op("Unsqueeze", [arange, g.const([0])], [1, SEQ], hint="unsqueeze", dtype=_INT64)
        kv_expand_shape = None
        if n_rep > 1:
            dims = [g.const([1]), g.const([cfg.kv_heads]), g.const([n_rep]), seq_1d, g.const([hd])]
            kv_expand_shape = g.op("Concat", dims, [5], dtype=_INT64, axis=0)
        with g.scope("rotary_emb"):
            cos, sin = _rope_tables(g, cfg, position_ids)
        shared = _Shared(cos, sin, _causal_mask(g, arange), kv_expand_shape)
        for i in range(cfg.layers):
            with g.scope(f"layers.{i}"):
                x = _layer(g, cfg, shared, x, f"m.model.layers.{i}")
        with g.scope("norm"):
            x = _rms_norm(g, cfg, x, _norm_weight(g, cfg, "m.model.norm.weight"))
    with g.scope("lm_head"):
        if cfg.tie_embeddings:
            lm_head = g.op("Transpose", [table], [cfg.hidden, cfg.vocab], perm=[1, 0])
        else:
            lm_head = g.weight(None, [cfg.hidden, cfg.vocab], emb_std)
        g.op("MatMul", [x, lm_head], [1, SEQ, cfg.vocab], hint="linear", out="logits")


def _rope_tables(g: _Graph, cfg: DecoderConfig, position_ids: str) -> tuple[str, str]:
    """cos/sin [1, 1, seq, hd] of positions × inv_freq.

    inv_freq follows HF's float32 recipe, 1 / theta ** (arange(0, hd, 2) / hd), with the power
    rounded from float64: that matches torch's float32 pow to 2 ulp (torch's vectorised powf is
    not correctly rounded), where numpy's float32 power is off more often.
    """
    hd = cfg.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    power = (np.float64(cfg.rope_theta) ** exponent.astype(np.float64)).astype(np.float32)
    inv_freq = g.buffer("m.model.rotary_emb.inv_freq", np.float32(1.0) / power)
    pos = g.op("Unsqueeze", [position_ids, g.const([2])], [1, SEQ, 1], hint="unsqueeze", dtype=_INT64)
    pos = g.op("Cast", [pos], [1, SEQ, 1], hint="_to_copy", to=_FLOAT)
    freqs = g.op("Mul", [pos, inv_freq], [1, SEQ, hd // 2], hint="mul")
    angles = g.op("Concat", [freqs, freqs], [1, SEQ, hd], hint="cat", axis=-1)
    cos = g.op("Cos", [angles], [1, SEQ, hd], hint="cos")
    sin = g.op("Sin", [angles], [1, SEQ, hd], hint="sin")
    axis = g.const([1])
    cos = g.op("Unsqueeze", [cos, axis], [1, 1, SEQ, hd], hint="unsqueeze")
    return cos, g.op("Unsqueeze", [sin, axis], [1, 1, SEQ, hd], hint="unsqueeze")


def _causal_mask(g: _Graph, arange: str) -> str:
    """Additive mask [1, 1, seq, seq]: 0 where key position <= query position, float32.min above."""
    pos = g.op("Unsqueeze", [arange, g.const([0, 1])], [1, 1, SEQ], hint="unsqueeze", dtype=_INT64)
    q_pos = g.op("Unsqueeze", [pos, g.const([3])], [1, 1, SEQ, 1], hint="unsqueeze", dtype=_INT64)
    kv_pos = g.op("Unsqueeze", [pos, g.const([2])], [1, 1, 1, SEQ], hint="unsqueeze", dtype=_INT64)
    allowed = g.op("LessOrEqual", [kv_pos, q_pos], [1, 1, SEQ, SEQ], hint="le", dtype=_BOOL)
    zero, lowest = g.const(0.0, np.float32), g.const(np.finfo(np.float32).min, np.float32)
    return g.op("Where", [allowed, zero, lowest], [1, 1, SEQ, SEQ])


def _layer(g: _Graph, cfg: DecoderConfig, shared: _Shared, x: str, prefix: str) -> str:
    """One pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(·))."""
    shape = [1, SEQ, cfg.hidden]
    with g.scope("input_layernorm"):
        h = _rms_norm(g, cfg, x, _norm_weight(g, cfg, f"{prefix}.input_layernorm.weight"))
    with g.scope("self_attn"):
        x = g.op("Add", [x, _attention(g, cfg, shared, h, f"{prefix}.self_attn")], shape, hint="add")
    with g.scope("post_attention_layernorm"):
        h = _rms_norm(g, cfg, x, _norm_weight(g, cfg, f"{prefix}.post_attention_layernorm.weight"))
    with g.scope("mlp"):
        return g.op("Add", [x, _mlp(g, cfg, h)], shape, hint="add")


def _norm_weight(g: _Graph, cfg: DecoderConfig, name: str) -> str:
    """RMSNorm scale [hidden] ~ 1 + 0.1·N(0, 1)."""
    return g.weight(name, [cfg.hidden], 0.1, 1.0)


def _rms_norm(g: _Graph, cfg: DecoderConfig, x: str, weight: str) -> str:
    """w * (x / sqrt(mean(x², -1) + eps)), spelled with Pow/ReduceMean/Sqrt/Reciprocal as exported."""
    shape, reduced = [1, SEQ, cfg.hidden], [1, SEQ, 1]
    sq = g.op("Pow", [x, g.const(2.0, np.float32)], shape, hint="pow")
    mean = g.op("ReduceMean", [sq, g.const([-1])], reduced, hint="mean", keepdims=1, noop_with_empty_axes=0)
    var = g.op("Add", [mean, g.const(cfg.rms_eps, np.float32)], reduced, hint="add")
    rsqrt = g.op("Reciprocal", [g.op("Sqrt", [var], reduced)], reduced, hint="rsqrt")
    normed = g.op("Mul", [x, rsqrt], shape, hint="mul")
    return g.op("Mul", [weight, normed], shape, hint="mul")


def _linear(g: _Graph, x: str, n_in: int, n_out: int, bias: str | None = None) -> str:
    """x @ W with W [n_in, n_out] ~ N(0, 1/n_in); with a bias, MatMul then Add(·, bias) as Qwen2 exports."""
    w = g.weight(None, [n_in, n_out], n_in**-0.5)
    if bias is None:
        return g.op("MatMul", [x, w], [1, SEQ, n_out], hint="linear")
    y = g.op("MatMul", [x, w], [1, SEQ, n_out])
    return g.op("Add", [y, g.weight(bias, [n_out], 0.05)], [1, SEQ, n_out], hint="linear")


def _project_heads(g: _Graph, cfg: DecoderConfig, x: str, proj: str, n_heads: int, prefix: str) -> str:
    """q/k/v projection viewed as [1, n_heads, seq, hd]."""
    hd = cfg.head_dim
    with g.scope(proj):
        bias = f"{prefix}.{proj}.bias" if cfg.qkv_bias else None
        y = _linear(g, x, cfg.hidden, n_heads * hd, bias)
    y = g.op("Reshape", [y, g.const([1, -1, n_heads, hd])], [1, SEQ, n_heads, hd], hint="view", allowzero=1)
    return g.op("Transpose", [y], [1, n_heads, SEQ, hd], hint="transpose", perm=[0, 2, 1, 3])


def _apply_rope(g: _Graph, cfg: DecoderConfig, shared: _Shared, x: str, n_heads: int) -> str:
    """x*cos + rotate_half(x)*sin with rotate_half(x) = Concat(-x[..., hd/2:], x[..., :hd/2])."""
    hd, half = cfg.head_dim, cfg.head_dim // 2
    shape, half_shape = [1, n_heads, SEQ, hd], [1, n_heads, SEQ, half]
    axis, step = g.const([3]), g.const([1])
    x_cos = g.op("Mul", [x, shared.cos], shape, hint="mul")
    x1 = g.op("Slice", [x, g.const([0]), g.const([half]), axis, step], half_shape, hint="slice")
    x2 = g.op("Slice", [x, g.const([half]), g.const([_INT64_MAX]), axis, step], half_shape, hint="slice")
    rotated = g.op("Concat", [g.op("Neg", [x2], half_shape, hint="neg"), x1], shape, hint="cat", axis=-1)
    return g.op("Add", [x_cos, g.op("Mul", [rotated, shared.sin], shape, hint="mul")], shape, hint="add")


def _repeat_kv(g: _Graph, cfg: DecoderConfig, shared: _Shared, x: str) -> str:
    """[1, kv_heads, seq, hd] -> [1, heads, seq, hd], each kv head repeated heads/kv_heads times."""
    if shared.kv_expand_shape is None:
        return x
    kv, hd, n_rep = cfg.kv_heads, cfg.head_dim, cfg.heads // cfg.kv_heads
    x = g.op("Unsqueeze", [x, g.const([2])], [1, kv, 1, SEQ, hd], hint="unsqueeze")
    x = g.op("Expand", [x, shared.kv_expand_shape], [1, kv, n_rep, SEQ, hd], hint="expand")
    shape = g.const([1, cfg.heads, -1, hd])
    return g.op("Reshape", [x, shape], [1, cfg.heads, SEQ, hd], hint="_unsafe_view", allowzero=1)


def _transpose_keys(g: _Graph, cfg: DecoderConfig, k: str) -> str:
    """[1, H, seq, hd] -> [1, H, hd, seq] through the exporter's rank-3 Reshape/Transpose/Reshape."""
    heads, hd = cfg.heads, cfg.head_dim
    shape = g.op("Shape", [k], [4], dtype=_INT64, start=0)
    last = g.op("Slice", [shape, g.const([-1]), g.const([_INT64_MAX])], [1], dtype=_INT64)
    second = g.op("Slice", [shape, g.const([-2]), g.const([-1])], [1], dtype=_INT64)
    lead = g.op("Slice", [shape, g.const([_INT64_MIN]), g.const([-2])], [2], dtype=_INT64)
    flat_shape = g.op("Concat", [g.const([-1]), second, last], [3], dtype=_INT64, axis=0)
    k3 = g.op("Reshape", [k, flat_shape], [heads, SEQ, hd], allowzero=0)
    k3 = g.op("Transpose", [k3], [heads, hd, SEQ], perm=[0, 2, 1])
    out_shape = g.op("Concat", [lead, last, second], [4], dtype=_INT64, axis=0)
    return g.op("Reshape", [k3, out_shape], [1, heads, hd, SEQ], allowzero=0)


def _attention(g: _Graph, cfg: DecoderConfig, shared: _Shared, x: str, prefix: str) -> str:
    """Causal GQA self-attention with RoPE, lowered the way the exporter lowers HF's SDPA path."""
    heads, hd = cfg.heads, cfg.head_dim
    q = _project_heads(g, cfg, x, "q_proj", heads, prefix)
    k = _project_heads(g, cfg, x, "k_proj", cfg.kv_heads, prefix)
    v = _project_heads(g, cfg, x, "v_proj", cfg.kv_heads, prefix)
    q = _apply_rope(g, cfg, shared, q, heads)
    k = _repeat_kv(g, cfg, shared, _apply_rope(g, cfg, shared, k, cfg.kv_heads))
    v = _repeat_kv(g, cfg, shared, v)
    k_t = _transpose_keys(g, cfg, k)
    scale = g.const(math.sqrt(1.0 / math.sqrt(hd)), np.float32)
    q = g.op("Mul", [q, scale], [1, heads, SEQ, hd])
    k_t = g.op("Mul", [k_t, scale], [1, heads, hd, SEQ])
    scores_shape = [1, heads, SEQ, SEQ]
    scores = g.op("Add", [g.op("MatMul", [q, k_t], scores_shape), shared.mask], scores_shape)
    probs = g.op("Softmax", [scores], scores_shape, axis=-1)
    is_nan = g.op("IsNaN", [probs], scores_shape, dtype=_BOOL)
    probs = g.op("Where", [is_nan, g.const(0.0, np.float32), probs], scores_shape)
    o = g.op("MatMul", [probs, v], [1, heads, SEQ, hd], hint="scaled_dot_product_attention")
    o = g.op("Transpose", [o], [1, SEQ, heads, hd], hint="transpose", perm=[0, 2, 1, 3])
    o = g.op("Reshape", [o, g.const([1, -1, heads * hd])], [1, SEQ, heads * hd], hint="view", allowzero=1)
    with g.scope("o_proj"):
        return _linear(g, o, heads * hd, cfg.hidden)


def _mlp(g: _Graph, cfg: DecoderConfig, x: str) -> str:
    """SwiGLU: down(silu(gate(x)) * up(x)), SiLU spelled Mul(g, Sigmoid(g))."""
    inter = [1, SEQ, cfg.intermediate]
    with g.scope("gate_proj"):
        gate = _linear(g, x, cfg.hidden, cfg.intermediate)
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], inter)], inter, hint="silu")
    with g.scope("up_proj"):
        up = _linear(g, x, cfg.hidden, cfg.intermediate)
    with g.scope("down_proj"):
        return _linear(g, g.op("Mul", [silu, up], inter, hint="mul"), cfg.intermediate, cfg.hidden)
