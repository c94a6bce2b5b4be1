"""Dev-only cross-check: `cimc.synth` graphs compute what Hugging Face's Llama / Qwen2 compute.

For a few tiny configs it builds the ONNX model, loads the very same weights into
``transformers.LlamaForCausalLM`` / ``Qwen2ForCausalLM`` and compares the fp32 logits with those of
onnxruntime on the built file. Weights are matched through the graph: named initializers carry
their Hugging Face name (``m.`` prefix), projection weights ``val_N`` are found through the
``pkg.torch.onnx.name_scopes`` metadata of the MatMul that uses them and are stored transposed.
Also checks that ``DecoderConfig.from_hf_config`` reads the HF config back unchanged and that
``inv_freq`` equals HF's.

Needs torch and transformers (not project dependencies); without them it says so and exits 0.
Usage: ``python benchmarks/check_synth_vs_hf.py`` — exits 1 if any max |error| >= 1e-4.
"""

from __future__ import annotations

import ast
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from cimc.synth import DecoderConfig, build_decoder_onnx

TOLERANCE = 1e-4
CASES = [
    ("llama", DecoderConfig(name="llama-gqa", vocab=320, hidden=64, heads=4, kv_heads=2, intermediate=128)),
    (
        "qwen2",
        DecoderConfig(
            name="qwen2-tied",
            vocab=384,
            hidden=64,
            heads=4,
            kv_heads=2,
            intermediate=160,
            rope_theta=1e6,
            tie_embeddings=True,
            qkv_bias=True,
        ),
    ),
    ("llama", DecoderConfig(name="llama-mha-hd24", vocab=200, hidden=48, heads=4, kv_heads=4, head_dim=24)),
    ("qwen2", DecoderConfig(name="qwen2-gqa4", vocab=256, hidden=96, heads=8, kv_heads=2, qkv_bias=True)),
    (
        "llama",
        DecoderConfig(
            name="llama3-like",
            vocab=512,
            hidden=128,
            layers=3,
            heads=4,
            kv_heads=1,
            head_dim=64,
            intermediate=384,
            rope_theta=5e5,
            rms_eps=1e-5,
            tie_embeddings=True,
        ),
    ),
]


def hf_state_dict(model_path: Path) -> dict[str, np.ndarray]:
    """Hugging Face parameter name -> value, recovered from the built graph."""
    model = onnx.load(str(model_path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = {}
    for node in model.graph.node:
        for name in node.input:
            if name not in inits or inits[name].dtype != np.float32 or inits[name].ndim == 0:
                continue
            if name.startswith("m."):
                state[name.removeprefix("m.")] = inits[name]
            elif node.op_type == "MatMul":
                scopes = {p.key: p.value for p in node.metadata_props}["pkg.torch.onnx.name_scopes"]
                module = ast.literal_eval(scopes)[-2].removeprefix("m.")
                state[f"{module}.weight"] = inits[name].T
    if "lm_head.weight" in state and "model.embed_tokens.weight" not in state:  # tied: one table
        state["model.embed_tokens.weight"] = state["lm_head.weight"]
    return state


def check(arch: str, cfg: DecoderConfig, tmp: Path) -> float:
    """Max |logits_onnxruntime - logits_transformers| for ``cfg``; raises on structural mismatches."""
    import torch
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    hf_config = config_cls(
        vocab_size=cfg.vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=cfg.qkv_bias,
    )
    back = DecoderConfig.from_hf_config(hf_config.to_dict(), name=cfg.name)
    assert back == cfg, f"from_hf_config round trip: {back} != {cfg}"

    path = build_decoder_onnx(cfg, tmp / f"{cfg.name}.onnx", seed=1)
    state = hf_state_dict(path)
    hf = model_cls(hf_config).eval()
    inv_freq = state.pop("model.rotary_emb.inv_freq")
    ulps = np.abs(inv_freq.view(np.int32) - hf.model.rotary_emb.inv_freq.numpy().view(np.int32)).max()
    assert ulps <= 2, f"inv_freq differs from HF's by {ulps} ulp"
    tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert not cfg.tie_embeddings or hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    ids = np.random.default_rng(7).integers(0, cfg.vocab, size=(1, 11), dtype=np.int64)
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["logits"], {"input_ids": ids})
    return float(np.abs(actual - expected).max())


def main() -> int:
    try:
        import torch
        import transformers
    except ImportError as err:
        print(f"skipped: needs torch and transformers ({err})")
        return 0
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, ort {ort.__version__}")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for arch, cfg in CASES:
            err = check(arch, cfg, Path(tmp))
            worst = max(worst, err)
            print(f"{cfg.name:16s} {arch:6s} max|onnxruntime - transformers| = {err:.3g}")
    print(f"worst {worst:.3g} ({'ok' if worst < TOLERANCE else 'FAIL'}, tolerance {TOLERANCE})")
    return 0 if worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
