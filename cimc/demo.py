"""`cimc demo`: compile and run the bundled example model, and check it against onnxruntime."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from cimc.driver import CompileOptions, compile_model
from isa.binary import read_binary, write_binary
from isa.diag import CimcError
from isa.hw import load_hw
from runtime.interpreter import simulate
from runtime.report import render_text

#: The example model shipped in the repository (built by examples/make_tiny_model.py).
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny_llama.onnx"


def example_model(cache: Path) -> Path:
    """The bundled example, or the same model rebuilt from its recipe when cimc is installed
    without the repository's examples/ folder."""
    if EXAMPLE.is_file():
        return EXAMPLE
    from cimc.synth import DecoderConfig, build_decoder_onnx

    path = cache / "tiny_llama.onnx"
    build_decoder_onnx(DecoderConfig(name="tiny-llama", vocab=512, hidden=64, layers=2, heads=4, kv_heads=2,
                                     intermediate=128), path, seed=0)
    return path


def run_demo(hw_spec: str | None = None, overrides: list[str] | None = None, quiet: bool = False) -> float:
    """Compile, simulate and compare; returns the max abs error against onnxruntime."""
    import onnxruntime as ort

    hw = load_hw(hw_spec, overrides or [])
    with tempfile.TemporaryDirectory(prefix="cimc-demo-") as tmp:
        model = example_model(Path(tmp))
        ids = np.array([[1, 17, 42, 7, 300, 5, 99, 11]], dtype=np.int64)
        program = compile_model(model, CompileOptions(max_seq=64, hw=hw))
        binary = Path(tmp) / "tiny_llama.cimb"
        write_binary(binary, program)
        result = simulate(read_binary(binary, verify_dram=True), {"input_ids": ids})
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        ref = sess.run(["logits"], {"input_ids": ids})[0]
    err = float(np.abs(result.outputs["logits"] - ref).max())
    if not quiet:
        print(f"cimc demo: {model.name} compiled for {hw.name} ({program.n_instrs:,} instructions) and simulated "
              f"on 8 tokens")
        print(render_text(result.report))
        print(f"  logits vs onnxruntime: max abs error {err:.2e} ({'OK' if err <= 1e-4 else 'MISMATCH'})")
    if err > 1e-4:
        raise CimcError(f"demo: simulated logits differ from onnxruntime by {err:.2e} (> 1e-4)")
    return err
