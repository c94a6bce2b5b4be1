"""Golden IR dumps after every pass, for the bundled example and the shared real exports.

Each golden file is the exact `cimc ir MODEL --after PASS` text (max-seq 16, default hardware).
A change in lifting, tiling, placement, stage balancing or scheduling shows up as a diff here;
regenerate deliberately with `CIMC_UPDATE_GOLDEN=1 pytest tests/test_golden_ir.py` and review it.
Every golden file must also parse back and print identically.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from model_fixtures import EXAMPLE, REPO, SHARED_MODELS

from cimc.driver import DEFAULT_PIPELINE, CompileOptions, load_module, run_pipeline
from cimc.ir.parser import parse_module
from cimc.ir.printer import print_module

GOLDEN = REPO / "tests" / "golden"
MODELS = {"tiny_llama": EXAMPLE,
          "llama_a_dynamo": SHARED_MODELS / "llama_a_dynamo.onnx",
          "qwen2_a_dynamo": SHARED_MODELS / "qwen2_a_dynamo.onnx"}
PASSES = ["frontend", *(p.split("{")[0] for p in DEFAULT_PIPELINE.split(","))]


def _dumps(model: Path, **options: object) -> dict[str, str]:
    opts = CompileOptions(max_seq=16, **options)  # type: ignore[arg-type]
    module, _ = load_module(model, opts)
    out = {"frontend": print_module(module)}
    opts.dump_after = {"all"}
    opts.on_dump = lambda name, text: out.__setitem__(name, text)
    run_pipeline(module, opts)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_golden_dumps(name: str) -> None:
    model = MODELS[name]
    if not model.is_file():
        pytest.skip(f"{model} not available")
    dumps = _dumps(model)
    assert list(dumps) == PASSES
    for i, (step, text) in enumerate(dumps.items()):
        path = GOLDEN / f"{name}.{i:02d}-{step}.cimir"
        if os.environ.get("CIMC_UPDATE_GOLDEN"):
            path.write_text(text)
        assert path.is_file(), f"missing golden file {path.name}; run with CIMC_UPDATE_GOLDEN=1"
        assert text == path.read_text(), f"IR after {step} differs from {path.name}"


def test_golden_quantized_dumps() -> None:
    """`--weights int4` (group 32, int8 activations): the quantize pass and what it changes after it."""
    dumps = _dumps(EXAMPLE, weights="int4")
    want = ["frontend", "lift-idioms", "insert-kv-cache", "quantize", "tile-partition", "place-weights"]
    assert list(dumps)[: len(want)] == want
    for i, step in enumerate(want[3:], 3):
        path = GOLDEN / f"tiny_llama_int4.{i:02d}-{step}.cimir"
        if os.environ.get("CIMC_UPDATE_GOLDEN"):
            path.write_text(dumps[step])
        assert path.is_file(), f"missing golden file {path.name}; run with CIMC_UPDATE_GOLDEN=1"
        assert dumps[step] == path.read_text(), f"IR after {step} differs from {path.name}"
    quantized = dumps["quantize"]
    matrices = re.findall(r"= weight\(\).*: f32\[\d+,\d+\]", quantized)
    assert quantized.count("qweight()") == 15 and len(matrices) == 1, matrices  # only the embedding table is left
    assert quantized.count('act = "i8"') == 15 and quantized.count('format = "rtn", group = 32, init') == 15


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.cimir")), ids=lambda p: p.name)
def test_golden_round_trip(path: Path) -> None:
    text = path.read_text()
    assert print_module(parse_module(text, str(path))) == text


def test_goldens_show_the_idioms() -> None:
    """The lifted example really has the decoder idioms (a golden of nonsense would still 'pass')."""
    text = (GOLDEN / "tiny_llama.01-lift-idioms.cimir").read_text()
    for op in ("embedding(", "rms_norm(", "rope(", "attention(", "swiglu(", "linear("):
        assert op in text
    assert "sigmoid(" not in text and "reduce_mean(" not in text
    assert text.count("attention(") == 2 and "kv_heads = 2" in text
