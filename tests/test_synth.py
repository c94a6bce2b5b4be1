"""Tests of `cimc.synth`: synthetic decoder ONNX models that mirror torch-dynamo exports of HF models."""

from __future__ import annotations

import ast
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_fixtures import REPO, SHARED_MODELS, ort_logits
from onnx import numpy_helper

from cimc.synth import DecoderConfig, build_decoder_onnx

SHARED = SHARED_MODELS.parent  # beside the clone, as in CI

CONFIGS = {
    "llama-gqa": DecoderConfig(name="llama-gqa"),
    "qwen2-tied-bias": DecoderConfig(
        name="qwen2-tied-bias",
        vocab=384,
        intermediate=160,
        rope_theta=1e6,
        tie_embeddings=True,
        qkv_bias=True,
    ),
    "head-dim-24": DecoderConfig(name="head-dim-24", heads=4, kv_heads=1, head_dim=24, layers=1),
}
IDIOM_OPS = {
    "Pow",
    "ReduceMean",
    "Sqrt",
    "Reciprocal",
    "Sigmoid",
    "Softmax",
    "Cos",
    "Sin",
    "Range",
    "Transpose",
}


def float_inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    return {t.name: numpy_helper.to_array(t) for t in floats}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synth")
    paths = {key: build_decoder_onnx(cfg, out / f"{key}.onnx", seed=3) for key, cfg in CONFIGS.items()}
    ext = out / "external.onnx"
    paths["external"] = build_decoder_onnx(CONFIGS["llama-gqa"], ext, seed=3, external_data=True)
    return paths


@pytest.mark.parametrize("key", [*CONFIGS, "external"])
def test_checker_and_onnxruntime(built: dict[str, Path], key: str) -> None:
    cfg = CONFIGS.get(key, CONFIGS["llama-gqa"])
    onnx.checker.check_model(str(built[key]), full_check=True)  # full_check: value_info agrees with inference
    rng = np.random.default_rng(0)
    for seq in (1, 7):
        logits = ort_logits(built[key], rng.integers(0, cfg.vocab, size=(1, seq), dtype=np.int64))
        assert logits.shape == (1, seq, cfg.vocab)
        assert logits.dtype == np.float32 and np.isfinite(logits).all()
        assert 0.1 < logits.std() < 10


@pytest.mark.parametrize("key", CONFIGS)
def test_causal(built: dict[str, Path], key: str) -> None:
    ids = np.random.default_rng(1).integers(0, CONFIGS[key].vocab, size=(1, 7), dtype=np.int64)
    changed = ids.copy()
    changed[0, 4:] = (changed[0, 4:] + 1) % CONFIGS[key].vocab
    before, after = ort_logits(built[key], ids), ort_logits(built[key], changed)
    np.testing.assert_array_equal(before[:, :4], after[:, :4])
    assert not np.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("key", [*CONFIGS, "external"])
def test_graph_form(built: dict[str, Path], key: str) -> None:
    cfg = CONFIGS.get(key, CONFIGS["llama-gqa"])
    model = onnx.load(str(built[key]), load_external_data=False)
    assert model.ir_version == 10 and [(o.domain, o.version) for o in model.opset_import] == [("", 20)]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input_ids" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim] == [1, "seq"]
    assert [d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim] == [1, "seq", cfg.vocab]

    ops = Counter(n.op_type for n in model.graph.node)
    assert IDIOM_OPS <= set(ops)
    assert ops["Expand"] == (2 * cfg.layers if cfg.heads > cfg.kv_heads else 0)
    assert ops["Pow"] == ops["ReduceMean"] == ops["Reciprocal"] == 2 * cfg.layers + 1
    assert ops["Softmax"] == ops["IsNaN"] == ops["Sigmoid"] == cfg.layers
    assert ops["MatMul"] == 9 * cfg.layers + 1
    # a layer: 2 norm eps, 2 RoPE, mask, 2 residuals (+ 3 q/k/v biases); final norm eps
    assert ops["Add"] == (10 if cfg.qkv_bias else 7) * cfg.layers + 1
    lm_head = next(n for n in model.graph.node if n.output[0] == "logits")
    table = next(n for n in model.graph.node if n.op_type == "Gather").input[0]
    producer = next((n for n in model.graph.node if n.output[0] == lm_head.input[1]), None)
    tied = producer is not None and producer.op_type == "Transpose" and producer.input[0] == table
    assert tied == cfg.tie_embeddings

    names = [n.name for n in model.graph.node]
    values = [o for n in model.graph.node for o in n.output] + [t.name for t in model.graph.initializer]
    assert len(set(names)) == len(names) and len(set(values)) == len(values)


@pytest.mark.parametrize("key", CONFIGS)
def test_param_count_matches_initializers(built: dict[str, Path], key: str) -> None:
    inits = float_inits(onnx.load(str(built[key])))
    weights = sum(a.size for name, a in inits.items() if a.ndim >= 1 and not name.endswith("inv_freq"))
    assert weights == CONFIGS[key].param_count()


def test_deterministic(tmp_path: Path, built: dict[str, Path]) -> None:
    cfg = CONFIGS["llama-gqa"]
    again = build_decoder_onnx(cfg, tmp_path / "again.onnx", seed=3)
    assert again.read_bytes() == built["llama-gqa"].read_bytes()
    other = build_decoder_onnx(cfg, tmp_path / "other.onnx", seed=4)
    assert other.read_bytes() != again.read_bytes()
    ext = build_decoder_onnx(cfg, tmp_path / "external.onnx", seed=3, external_data=True)
    assert ext.read_bytes() == built["external"].read_bytes()
    assert Path(f"{ext}.data").read_bytes() == Path(f"{built['external']}.data").read_bytes()


def test_external_data_layout(built: dict[str, Path]) -> None:
    path = built["external"]
    data = Path(f"{path}.data")
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == 1 + 7 * CONFIGS["llama-gqa"].layers + 1  # table, 7 matrices a layer, lm_head
    end = 0
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info["offset"]), int(info["length"])
        assert info["location"] == data.name and offset % 4096 == 0 and offset >= end
        assert length == 4 * int(np.prod(t.dims))
        end = offset + length
    assert end == data.stat().st_size
    # same weights, hence same logits, as the inline build with the same seed
    ids = np.arange(5, dtype=np.int64)[None]
    np.testing.assert_array_equal(ort_logits(path, ids), ort_logits(built["llama-gqa"], ids))


def test_config_validation_and_head_dim() -> None:
    assert DecoderConfig(hidden=64, heads=4).head_dim == 16
    assert DecoderConfig(hidden=64, heads=4, head_dim=16) == DecoderConfig(hidden=64, heads=4)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        DecoderConfig(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="even head_dim"):
        DecoderConfig(hidden=60, heads=4)


def slm_configs() -> dict[str, dict]:
    path = SHARED / "design" / "slm-configs.json"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def test_from_hf_config_llama_3_2_1b() -> None:
    entry = slm_configs()["llama3.2-1b"]
    cfg = DecoderConfig.from_hf_config(entry, name="llama3.2-1b")
    shape = (cfg.layers, cfg.hidden, cfg.intermediate, cfg.heads, cfg.kv_heads, cfg.head_dim)
    assert shape == (16, 2048, 8192, 32, 8, 64)
    assert cfg.vocab == 128256 and cfg.tie_embeddings and not cfg.qkv_bias and cfg.rope_theta == 500000.0
    assert cfg.param_count() == entry["params_computed"] == 1_235_814_400


def test_from_hf_config_catalogue() -> None:
    """Every catalogued model's count matches, less Qwen3's q/k norms, which are not modelled."""
    for key, entry in slm_configs().items():
        cfg = DecoderConfig.from_hf_config(entry, name=key)
        assert cfg.qkv_bias == entry["qkv_bias"], key
        qk_norm = 2 * cfg.head_dim * cfg.layers if entry["qk_norm"] else 0
        assert cfg.param_count() + qk_norm == entry["params_computed"], key


@pytest.mark.parametrize(
    ("export", "cfg"),
    [
        ("llama_a_dynamo", DecoderConfig(vocab=320)),
        ("qwen2_a_dynamo", CONFIGS["qwen2-tied-bias"]),
    ],
)
def test_matches_real_export(tmp_path: Path, export: str, cfg: DecoderConfig) -> None:
    """With the export's weights swapped in, the synthetic graph reproduces the export's logits."""
    export_path = SHARED / "models" / f"{export}.onnx"
    if not export_path.exists():
        pytest.skip(f"{export_path} not found")

    def roles(model: onnx.ModelProto) -> dict[object, str]:
        """Weight initializer name by role: its HF name, or the module scope of the MatMul using it."""
        inits, found = float_inits(model), {}
        for node in model.graph.node:
            for name in node.input:
                if name in inits and inits[name].ndim >= 1:
                    scopes = {p.key: p.value for p in node.metadata_props}["pkg.torch.onnx.name_scopes"]
                    role = name if name.startswith("m.") else (ast.literal_eval(scopes)[-2], node.op_type)
                    found[role] = name
        return found

    reference = onnx.load(str(export_path))
    ours = onnx.load(str(build_decoder_onnx(cfg, tmp_path / "ours.onnx")))
    ref_inits, ref_roles, our_roles = float_inits(reference), roles(reference), roles(ours)
    assert our_roles.keys() == ref_roles.keys()
    by_name = {t.name: t for t in ours.graph.initializer}
    for role, name in our_roles.items():
        value = ref_inits[ref_roles[role]]
        assert list(by_name[name].dims) == list(value.shape), role
        by_name[name].CopyFrom(numpy_helper.from_array(value, name))
    onnx.save(ours, tmp_path / "swapped.onnx")

    expected = np.load(SHARED / "models" / f"{export}.npz")
    logits = ort_logits(tmp_path / "swapped.onnx", expected["input.input_ids"])
    np.testing.assert_allclose(logits, expected["output.logits"], atol=1e-5, rtol=0)


def test_bundled_example_is_current(tmp_path: Path) -> None:
    """examples/tiny_llama.onnx is what make_tiny_model.py builds today, and its npz what ORT computes."""
    script = REPO / "examples" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "tiny_llama.onnx")]) == 0
    bundled = REPO / "examples" / "tiny_llama.onnx"
    assert (tmp_path / "tiny_llama.onnx").read_bytes() == bundled.read_bytes()
    assert bundled.stat().st_size < 1_000_000
    ref = np.load(bundled.with_suffix(".npz"))
    assert set(ref) == {"input.input_ids", "output.logits"} and ref["input.input_ids"].shape == (1, 8)
    logits = ort_logits(bundled, ref["input.input_ids"])
    np.testing.assert_allclose(logits, ref["output.logits"], atol=1e-5, rtol=0)
