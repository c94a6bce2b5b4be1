"""Which decoder family a lifted model looks like, from the idioms its IR shows (`cimc check`).

The features are read off the IR after `lift-idioms`; the family is the first row of `FAMILIES`
whose required features are all present. It names the architecture the graph computes, not the
checkpoint: a Phi-3 export with full rotary computes a Llama, and is reported as one.
"""

from __future__ import annotations

from cimc.ir.core import Module, Op

#: feature -> one-line description (the order they are listed in).
FEATURES = {
    "layer_norm": "LayerNorm",
    "rms_norm": "RMSNorm",
    "qk_norm": "per-head q/k RMSNorm",
    "swiglu": "SwiGLU MLP",
    "gelu_mlp": "GELU MLP",
    "rope": "RoPE",
    "partial_rotary": "partial rotary",
    "learned_positions": "learned positions",
    "qkv_bias": "qkv bias",
    "sliding_window": "sliding-window attention",
    "softcap": "attention soft-capping",
    "gqa": "grouped-query attention",
}

#: (family, features it requires), most specific first.
FAMILIES: tuple[tuple[str, frozenset[str]], ...] = (
    ("GPT-2", frozenset({"layer_norm", "gelu_mlp", "learned_positions"})),
    ("Gemma2", frozenset({"rms_norm", "gelu_mlp", "softcap"})),
    ("Gemma", frozenset({"rms_norm", "gelu_mlp", "rope"})),
    ("Qwen3", frozenset({"qk_norm", "swiglu", "rope"})),
    ("Phi-3", frozenset({"rms_norm", "swiglu", "partial_rotary"})),
    ("Mistral", frozenset({"rms_norm", "swiglu", "sliding_window"})),
    ("Qwen2", frozenset({"rms_norm", "swiglu", "rope", "qkv_bias"})),
    ("Llama", frozenset({"rms_norm", "swiglu", "rope"})),
)


def _feeds(op: Op, name: str) -> bool:
    """Whether `op`'s result reaches an op called `name` through at most two ops."""
    frontier = [op]
    for _ in range(3):
        frontier = [u for o in frontier for r in o.results for u in r.users]
        if any(u.name == name for u in frontier):
            return True
    return False


def features(module: Module) -> set[str]:
    """The `FEATURES` the IR of a lifted (and idiom-fused) decoder shows."""
    found: set[str] = set()
    norms = list(module.walk("rms_norm"))
    if any(op.attrs.get("head_dim") for op in norms):
        found.add("qk_norm")
    if any(not op.attrs.get("head_dim") for op in norms):
        found.add("rms_norm")
    if next(module.walk("layer_norm"), None) is not None:
        found.add("layer_norm")
    if next(module.walk("swiglu"), None) is not None:
        found.add("swiglu")
    if next(module.walk("gelu"), None) is not None:
        found.add("gelu_mlp")
    attn = list(module.walk("attention"))
    ropes = list(module.walk("rope"))
    if ropes:
        found.add("rope")
    if any(op.attrs.get("rotary_dim", op.attrs["head_dim"]) < op.attrs["head_dim"] for op in ropes):
        found.add("partial_rotary")
    if any(op.attrs.get("window") for op in attn):
        found.add("sliding_window")
    if any(op.attrs.get("softcap") for op in attn):
        found.add("softcap")
    if any(op.attrs["kv_heads"] < op.attrs["heads"] for op in attn):
        found.add("gqa")
    embeddings = list(module.walk("embedding"))
    if len(embeddings) > 1 or (attn and not ropes and embeddings):
        found.add("learned_positions")
    if any(len(op.operands) > 2 and (_feeds(op, "rope") or _feeds(op, "attention")) for op in module.walk("linear")):
        found.add("qkv_bias")
    return found


def recognise(module: Module) -> tuple[str | None, list[str]]:
    """The family the model computes (None if no row of `FAMILIES` fits) and its features, described."""
    found = features(module)
    family = next((name for name, need in FAMILIES if need <= found), None)
    return family, [desc for key, desc in FEATURES.items() if key in found]
