"""Weight-free decoders from a Hugging Face `config.json`: architecture numbers in, lifted IR out.

`read_config` reads a `config.json` into one validated `Architecture` (an unknown `model_type`,
or a missing or invalid key, is one `HFConfigError` naming the file and the key);
`build_module` turns it into the IR that the ONNX frontend and `lift-idioms` produce for that
family's torch-dynamo export (the `a_dynamo` files of `tests/zoo/`): the same ops, shapes and
attributes in the same order. Its `weight` ops name the Hugging Face tensors but have no data:
such a module compiles and prices (timing and energy) exactly as the export does, and a run
with numerics is refused (`NoWeights`, `Program.meta["weight_free"]`).

What each `model_type` computes is declared once, in `FAMILIES`. Values that do not change the
program's shape are not modelled: RoPE scaling (`rope_scaling` / `rope_parameters` types llama3,
longrope, yarn change only the cos/sin tables' values, which are built with plain RoPE), token
ids, dropout.
"""

from __future__ import annotations

import base64
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cimc.ir.core import CTX, SEQ, Module, Rewriter, TensorType, Value
from cimc.ir.ops import OPS
from cimc.ir.verifier import verify_module
from isa.diag import CimcError
from isa.dtypes import ACT, IDS


class HFConfigError(CimcError):
    """A `config.json` cimc cannot read: names the file and the key."""


@dataclass(frozen=True)
class Family:
    """What a `model_type` computes, beyond the sizes every config gives."""

    norm: str = "rms"  # rms | layer
    mlp: str = "swiglu"  # swiglu (silu(gate) * up) | geglu (gelu(gate) * up) | gelu (up, gelu, down)
    act_key: str = "hidden_act"  # the key naming the MLP activation
    rope: bool = True  # False: learned absolute positions (GPT-2)
    qkv_bias: bool | None = False  # None: from `attention_bias` (which also biases o_proj)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    sandwich: bool = False  # RMSNorm after attention and after the MLP too (Gemma2)
    embed_scale: bool = False  # embeddings times sqrt(hidden) (Gemma)
    fused_qkv: bool = False  # one packed q|k|v projection (and gate|up), sliced by columns (Phi-3, GPT-2)
    windows: str = "none"  # which layers a `sliding_window` applies to: none | all | alternate | qwen
    nope: bool = False  # `no_rope_layers` (SmolLM3): layers marked 0 skip RoPE
    tied: bool = False  # `tie_word_embeddings` when the key is absent (transformers' default)
    #: GPT-2's own key names for the sizes (`Architecture` field -> key)
    keys: tuple[tuple[str, str], ...] = ()


_LLAMA = Family(qkv_bias=None)
#: model_type -> what it computes.
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": Family(windows="all"),
    "qwen2": Family(qkv_bias=True, windows="qwen"),
    "qwen3": Family(qkv_bias=None, qk_norm=True, windows="qwen"),
    "phi3": Family(fused_qkv=True, windows="all"),
    "gemma": Family(mlp="geglu", act_key="hidden_activation", embed_scale=True, tied=True),
    "gemma2": Family(mlp="geglu", act_key="hidden_activation", embed_scale=True, sandwich=True,
                     windows="alternate", tied=True),
    "smollm3": Family(qkv_bias=None, nope=True, windows="qwen", tied=True),
    "gpt2": Family(norm="layer", mlp="gelu", act_key="activation_function", rope=False, qkv_bias=True,
                   fused_qkv=True, tied=True,
                   keys=(("layers", "n_layer"), ("hidden", "n_embd"), ("heads", "n_head"),
                         ("intermediate", "n_inner"), ("positions", "n_positions"), ("eps", "layer_norm_epsilon"))),
}
#: the keys of the other families (`Architecture` field -> key).
KEYS = {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate": "intermediate_size",
        "vocab": "vocab_size", "positions": "max_position_embeddings", "eps": "rms_norm_eps"}
#: activation name in a config -> (what the MLP computes, gelu's `approximate`).
ACTIVATIONS = {"silu": ("silu", ""), "swish": ("silu", ""), "gelu": ("gelu", "none"),
               "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu_fast": ("gelu", "tanh")}


@dataclass(frozen=True)
class Architecture:
    """A decoder's architecture, as a `config.json` states it (see `FAMILIES` for the kinds)."""

    name: str
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    positions: int  # max_position_embeddings (GPT-2's learned table has this many rows)
    eps: float
    tied: bool
    norm: str
    mlp: str
    gelu: str  # gelu's `approximate` (none | tanh) for gelu MLPs, else ""
    learned_positions: bool
    rotary_dim: int  # 0 without RoPE; < head_dim for partial rotary (Phi-3)
    rope_theta: float
    rope_layers: tuple[bool, ...]  # per layer: whether it applies RoPE (SmolLM3's NoPE layers do not)
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sandwich: bool
    embed_scale: bool
    fused_qkv: bool
    scale: tuple[float, ...]  # per layer: the attention's score scale
    window: tuple[int, ...]  # per layer: its sliding window (0: full attention)
    attn_softcap: float  # 0: none
    final_softcap: float  # 0: none


class _Reader:
    """Typed access to a config dict; every error names the file and the key."""

    def __init__(self, path: str, d: dict) -> None:
        self.path, self.d = path, d

    def fail(self, key: str, msg: str) -> HFConfigError:
        return HFConfigError(f"{self.path}: {key}: {msg}")

    def get(self, key: str, default: object = ...) -> object:
        v = self.d.get(key)
        if v is None:
            if default is ...:
                raise HFConfigError(f"{self.path}: missing key {key!r}")
            return default
        return v

    def int(self, key: str, default: object = ...) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise self.fail(key, f"expected a positive integer, got {v!r}")
        return v

    def float(self, key: str, default: object = ...) -> float:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise self.fail(key, f"expected a non-negative number, got {v!r}")
        return float(v)

    def bool(self, key: str, default: object = ...) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, f"expected true or false, got {v!r}")
        return v


def _f32(x: float) -> float:
    """`x` rounded to float32, as an export stores it."""
    return float(np.float32(x))


def read_config(path: str | os.PathLike) -> Architecture:
    """Read and validate a Hugging Face `config.json`."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise HFConfigError(f"{p}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFConfigError(f"{p}: not a JSON file ({e})") from None
    if not isinstance(d, dict):
        raise HFConfigError(f"{p}: expected a JSON object (a Hugging Face config.json)")
    r = _Reader(str(p), d)
    model_type = r.get("model_type")
    fam = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if fam is None:
        raise r.fail("model_type", f"{model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})")
    key = {**KEYS, **dict(fam.keys)}
    layers, hidden, heads = r.int(key["layers"]), r.int(key["hidden"]), r.int(key["heads"])
    kv_heads = r.int(key["kv_heads"], heads) if "kv_heads" in key and not fam.keys else heads
    if heads % kv_heads:
        raise r.fail(key["kv_heads"], f"{kv_heads} KV heads do not divide the {heads} attention heads")
    if d.get("head_dim") is not None and not fam.keys:
        head_dim = r.int("head_dim")
    elif hidden % heads:
        raise r.fail(key["hidden"], f"{hidden} is not a multiple of the {heads} heads (and there is no head_dim)")
    else:
        head_dim = hidden // heads
    intermediate = r.int(key["intermediate"], 4 * hidden if fam.keys else ...)
    act_name = d.get(fam.act_key) or d.get("hidden_act")
    kind, gelu = ACTIVATIONS.get(act_name, ("", "")) if isinstance(act_name, str) else ("", "")
    if kind != ("silu" if fam.mlp == "swiglu" else "gelu"):
        raise r.fail(fam.act_key, f"{act_name!r} is not an activation {model_type} MLPs are built with here "
                                  f"({', '.join(a for a, (k, _) in ACTIVATIONS.items() if k == kind or not kind)})")
    rope = r.get("rope_parameters", {}) or {}
    if not isinstance(rope, dict):
        raise r.fail("rope_parameters", f"expected an object, got {rope!r}")
    theta, factor = 0.0, 1.0
    if fam.rope:
        theta = r.float("rope_theta", rope.get("rope_theta", 10000.0))
        factor = r.float("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    rotary_dim = int(head_dim * factor) if fam.rope else 0
    if fam.rope and (rotary_dim < 2 or rotary_dim % 2 or factor > 1):
        raise r.fail("partial_rotary_factor" if factor != 1 else key["head_dim"],
                     f"RoPE needs an even rotary width of 2 .. head_dim ({head_dim}), got {rotary_dim}")
    bias = r.bool("attention_bias", False) if fam.qkv_bias is None else fam.qkv_bias
    mlp_bias = fam.norm == "layer" or r.bool("mlp_bias", False)
    rope_layers = _rope_layers(r, fam, layers)
    attn_softcap = r.float("attn_logit_softcapping", 0.0)
    final_softcap = r.float("final_logit_softcapping", 0.0)
    return Architecture(
        name=p.parent.name if p.name == "config.json" and p.parent.name else p.stem,
        model_type=model_type, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=intermediate, vocab=r.int("vocab_size"), positions=r.int(key["positions"]),
        eps=_f32(r.float(key["eps"], 1e-5 if fam.keys else ...)), tied=r.bool("tie_word_embeddings", fam.tied),
        norm=fam.norm, mlp=fam.mlp, gelu=gelu, learned_positions=not fam.rope, rotary_dim=rotary_dim,
        rope_theta=theta, rope_layers=rope_layers, qkv_bias=bias,
        o_bias=bias if fam.qkv_bias is None or fam.norm == "layer" else False, mlp_bias=mlp_bias,
        qk_norm=fam.qk_norm, sandwich=fam.sandwich, embed_scale=fam.embed_scale, fused_qkv=fam.fused_qkv,
        scale=_scales(r, fam, layers, head_dim), window=_windows(r, fam, layers),
        attn_softcap=attn_softcap, final_softcap=final_softcap)


def _scales(r: _Reader, fam: Family, layers: int, head_dim: int) -> tuple[float, ...]:
    """The attention score scale of each layer."""
    if fam.sandwich:  # Gemma2 scales by query_pre_attn_scalar, not head_dim
        return (_f32(r.float("query_pre_attn_scalar") ** -0.5),) * layers
    base = head_dim ** -0.5 if r.bool("scale_attn_weights", True) else 1.0
    if r.bool("scale_attn_by_inverse_layer_idx", False):
        return tuple(_f32(base / (i + 1)) for i in range(layers))
    return (_f32(base),) * layers


def _windows(r: _Reader, fam: Family, layers: int) -> tuple[int, ...]:
    """The sliding window of each layer (0: full attention), from `layer_types` when the config
    has it, else as the family's modelling code decides."""
    types = r.get("layer_types", None)
    if types is not None:
        kinds = ("full_attention", "sliding_attention")
        if not isinstance(types, list) or len(types) != layers or any(t not in kinds for t in types):
            raise r.fail("layer_types", f"expected {layers} entries of {' or '.join(kinds)}, got {types!r}")
        sliding = [t == "sliding_attention" for t in types]
    elif fam.windows == "all":
        sliding = [r.get("sliding_window", None) is not None] * layers
    elif fam.windows == "alternate":
        sliding = [i % 2 == 0 for i in range(layers)]
    elif fam.windows == "qwen" and r.bool("use_sliding_window", False):
        first = r.int("max_window_layers", layers)
        sliding = [i >= first for i in range(layers)]
    else:
        sliding = [False] * layers
    if not any(sliding):
        return (0,) * layers
    window = r.int("sliding_window", 4096 if fam.windows == "alternate" else ...)
    return tuple(window if s else 0 for s in sliding)


def _rope_layers(r: _Reader, fam: Family, layers: int) -> tuple[bool, ...]:
    """Whether each layer applies RoPE."""
    if not fam.rope:
        return (False,) * layers
    flags = r.get("no_rope_layers", None) if fam.nope else None
    if flags is None:
        return (True,) * layers
    if not isinstance(flags, list) or len(flags) != layers or any(f not in (0, 1) for f in flags):
        raise r.fail("no_rope_layers", f"expected {layers} entries of 0 or 1, got {flags!r}")
    return tuple(bool(f) for f in flags)


# ---- the IR ----------------------------------------------------------------------------------


class NoWeights:
    """The weight source of a weight-free module: any read is refused, naming the config."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, name: str) -> np.ndarray:
        raise CimcError(f"{self.path} describes an architecture without weights (tensor {name} has no data): "
                        "it can be priced (timing and energy, e.g. cimc estimate), not run with numerics or "
                        "written as a binary")


class _Builder:
    """Appends ops to a module with the `layer` annotation the frontend gives them."""

    def __init__(self, module: Module) -> None:
        self.rw = Rewriter(module)
        self.layer = "embed"

    def op(self, name: str, operands: list[Value], loc: str, **attrs: object) -> Value:
        attrs["layer"] = self.layer
        types = OPS[name].infer([v.type for v in operands], attrs)
        return self.rw.create(name, operands, types, attrs, loc).result

    def leaf(self, op: str, type_: TensorType, loc: str, **attrs: object) -> Value:
        attrs["layer"] = self.layer
        return self.rw.create(op, [], [type_], attrs, loc).result

    def weight(self, init: str, *shape: int | str, **attrs: object) -> Value:
        return self.leaf("weight", TensorType(ACT, shape), init, init=init, **attrs)

    def linear(self, x: Value, init: str, k: int, n: int, bias: str | None = None, **attrs: object) -> Value:
        w = self.weight(f"{init}.weight", k, n, **attrs)
        operands = [x, w] if bias is None else [x, w, self.weight(bias, n)]
        return self.op("linear", operands, init)

    def norm(self, arch: Architecture, x: Value, init: str, **attrs: object) -> Value:
        w = self.weight(f"{init}.weight", attrs.get("head_dim", arch.hidden))
        if arch.norm == "layer":
            return self.op("layer_norm", [x, w, self.weight(f"{init}.bias", arch.hidden)], init, eps=arch.eps)
        return self.op("rms_norm", [x, w], init, eps=arch.eps, **attrs)


def _rope_tables(arch: Architecture, max_ctx: int) -> tuple[str, str]:
    """cos and sin of plain RoPE, `max_ctx` rows of rotary_dim (rotate-half layout), base64 f32."""
    half = arch.rotary_dim // 2
    inv_freq = 1.0 / arch.rope_theta ** (np.arange(half, dtype=np.float32) * 2 / arch.rotary_dim)
    angles = np.outer(np.arange(max_ctx, dtype=np.float32), inv_freq.astype(np.float32))
    angles = np.concatenate([angles, angles], axis=1)
    return tuple(base64.b64encode(f(angles).astype("<f4").tobytes()).decode() for f in (np.cos, np.sin))  # type: ignore[return-value]


def build_module(arch: Architecture, max_seq: int, max_ctx: int | None = None, source: str = "") -> Module:
    """The lifted IR of `arch` for prompts of up to `max_seq` tokens and a context of `max_ctx`
    positions (default max_seq), as `cimc ir EXPORT.onnx --after lift-idioms` prints it for the
    family's dynamo export; weights have shapes, no data (`NoWeights`)."""
    max_ctx = max_ctx or max_seq
    module = Module(arch.name, {"max_seq": max_seq, "max_ctx": max_ctx, "passes": ["lift-idioms"],
                                "source": source, "weight_free": True})
    b = _Builder(module)
    h, hd, nq, nkv = arch.hidden, arch.head_dim, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    gpt2 = arch.learned_positions
    prefix = "transformer" if gpt2 else "model"
    embed = f"{prefix}.wte.weight" if gpt2 else f"{prefix}.embed_tokens.weight"
    ids = b.leaf("input", TensorType(IDS, (SEQ,)), "input_ids", name="input_ids", onnx_dtype="int64",
                 onnx_shape=[1, SEQ])
    x = b.op("embedding", [ids, b.weight(embed, arch.vocab, h)], "embed_tokens")
    if gpt2:
        x = b.op("add", [x, b.weight(f"{prefix}.wpe.weight", CTX, h)], "wpe")
    if arch.embed_scale:
        x = b.op("affine", [x], "embed_scale", alpha=_f32(math.sqrt(h)), beta=0.0)
    tables: list[Value] = []
    for i in range(arch.layers):
        b.layer = f"layer{i}"
        at = f"{prefix}.h.{i}" if gpt2 else f"{prefix}.layers.{i}"
        attn, mlp = (f"{at}.attn", f"{at}.mlp") if gpt2 else (f"{at}.self_attn", f"{at}.mlp")
        y = b.norm(arch, x, f"{at}.ln_1" if gpt2 else f"{at}.input_layernorm")
        qkv = []
        for j, (what, lo, hi) in enumerate((("q", 0, nq), ("k", nq, nq + nkv), ("v", nq + nkv, nq + 2 * nkv))):
            if arch.fused_qkv:
                init = f"{attn}.c_attn" if gpt2 else f"{attn}.qkv_proj"
                bias = f"{init}.bias" if arch.qkv_bias else None
                v = b.linear(y, init, h, hi - lo, bias, cols=[lo, hi, nq + 2 * nkv])
            else:
                init = f"{attn}.{what}_proj"
                v = b.linear(y, init, h, hi - lo, f"{init}.bias" if arch.qkv_bias else None)
            if arch.qk_norm and j < 2:
                v = b.norm(arch, v, f"{attn}.{what}_norm", head_dim=hd)
            qkv.append(v)
        if arch.rope_layers[i]:
            if not tables:
                cos, sin = _rope_tables(arch, max_ctx)
                tables = [b.leaf("const", TensorType(ACT, (CTX, arch.rotary_dim)), f"rotary_emb.{name}", data=data)
                          for name, data in (("cos", cos), ("sin", sin))]
            extra = {"rotary_dim": arch.rotary_dim} if arch.rotary_dim < hd else {}
            qkv[:2] = [b.op("rope", [v, *tables], f"{attn}.rotary_emb", head_dim=hd, **extra) for v in qkv[:2]]
        extra = {"window": arch.window[i]} if 0 < arch.window[i] < max_ctx else {}
        if arch.attn_softcap:
            extra["softcap"] = arch.attn_softcap
        a = b.op("attention", qkv, attn, causal=True, head_dim=hd, heads=arch.heads, kv_heads=arch.kv_heads,
                 scale=arch.scale[i], **extra)
        out = f"{attn}.c_proj" if gpt2 else f"{attn}.o_proj"
        a = b.linear(a, out, nq, h, f"{out}.bias" if arch.o_bias else None)
        if arch.sandwich:
            a = b.norm(arch, a, f"{at}.post_attention_layernorm")
        x = b.op("add", [a, x] if gpt2 else [x, a], f"{at}.residual_attn")
        y = b.norm(arch, x, f"{at}.ln_2" if gpt2 else
                   f"{at}.pre_feedforward_layernorm" if arch.sandwich else f"{at}.post_attention_layernorm")
        y = _mlp(b, arch, y, mlp)
        if arch.sandwich:
            y = b.norm(arch, y, f"{at}.post_feedforward_layernorm")
        x = b.op("add", [x, y], f"{at}.residual_mlp")
    b.layer = "head"
    x = b.norm(arch, x, f"{prefix}.ln_f" if gpt2 else f"{prefix}.norm")
    if arch.tied:
        head = b.weight(embed, h, arch.vocab, transpose=True)
        logits = b.op("linear", [x, head], "lm_head")
    else:
        logits = b.linear(x, "lm_head", h, arch.vocab)
    if arch.final_softcap:
        c = arch.final_softcap
        if c != 1.0:
            logits = b.op("affine", [logits], "final_softcap", alpha=_f32(1 / c), beta=0.0)
        logits = b.op("tanh", [logits], "final_softcap")
        if c != 1.0:
            logits = b.op("affine", [logits], "final_softcap", alpha=_f32(c), beta=0.0)
    b.rw.create("output", [logits], [], {"layer": b.layer, "name": "logits", "onnx_dtype": "float",
                                         "onnx_shape": [1, SEQ, arch.vocab]}, "logits")
    verify_module(module)
    return module


def _mlp(b: _Builder, arch: Architecture, y: Value, at: str) -> Value:
    """The MLP block of one layer."""
    h, n = arch.hidden, arch.intermediate
    if arch.mlp == "gelu":
        bias = f"{at}.c_fc.bias" if arch.mlp_bias else None
        up = b.op("gelu", [b.linear(y, f"{at}.c_fc", h, n, bias)], f"{at}.act", approximate=arch.gelu)
        return b.linear(up, f"{at}.c_proj", n, h, f"{at}.c_proj.bias" if arch.mlp_bias else None)

    def proj(x: Value, name: str, k: int, m: int, cols: list[int] | None = None) -> Value:
        init = f"{at}.gate_up_proj" if cols else f"{at}.{name}_proj"
        bias = f"{init}.bias" if arch.mlp_bias else None
        return b.linear(x, init, k, m, bias, **({"cols": cols} if cols else {}))

    fused = arch.fused_qkv
    gate = proj(y, "gate", h, n, [0, n, 2 * n] if fused else None)
    if arch.mlp == "geglu":
        gate = b.op("gelu", [gate], f"{at}.act_fn", approximate=arch.gelu)
    up = proj(y, "up", h, n, [n, 2 * n, 2 * n] if fused else None)
    act = b.op("swiglu" if arch.mlp == "swiglu" else "mul", [gate, up], f"{at}.act_fn")
    return proj(act, "down", n, h)
