"""`cimc demo`: compile and run the bundled example model, and check it against onnxruntime."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from cimc.driver import CompileOptions, compile_model
from cimc.synth import DecoderConfig, build_decoder_onnx
from isa.binary import read_binary, write_binary
from isa.diag import CimcError
from isa.hw import load_hw
from runtime.generate import generate
from runtime.generate import render_text as render_generation
from runtime.interpreter import Session, simulate
from runtime.report import render_text

#: The example model shipped in the repository, and its recipe (examples/make_tiny_model.py
#: builds it from these; a test checks the bundled file is what they build today).
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny_llama.onnx"
EXAMPLE_CONFIG = DecoderConfig(name="tiny-llama", vocab=512, hidden=64, layers=2, heads=4, kv_heads=2,
                               intermediate=128, rope_theta=10000.0, rms_eps=1e-6)
EXAMPLE_SEED = 0


def example_model(cache: Path) -> Path:
    """The bundled example, or the same model rebuilt from its recipe when cimc is installed
    without the repository's examples/ folder."""
    if EXAMPLE.is_file():
        return EXAMPLE
    path = cache / "tiny_llama.onnx"
    build_decoder_onnx(EXAMPLE_CONFIG, path, seed=EXAMPLE_SEED, external_data=False)
    return path


def run_demo(hw_spec: str | None = None, overrides: list[str] | None = None, quiet: bool = False) -> float:
    """Compile, simulate a prompt and a short greedy generation, and compare both with
    onnxruntime; returns the max abs error of the prompt's logits."""
    import onnxruntime as ort

    hw = load_hw(hw_spec, overrides or [])
    new = 8
    with tempfile.TemporaryDirectory(prefix="cimc-demo-") as tmp:
        model = example_model(Path(tmp))
        prompt = [1, 17, 42, 7, 300, 5, 99, 11]
        ids = np.array([prompt], dtype=np.int64)
        program = compile_model(model, CompileOptions(max_seq=64, max_ctx=64 + new, hw=hw))
        binary = Path(tmp) / "tiny_llama.cimb"
        write_binary(binary, program)
        loaded = read_binary(binary, verify_dram=True)
        result = simulate(loaded, {"input_ids": ids})
        gen = generate(Session(loaded), prompt, new)
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        ref = sess.run(["logits"], {"input_ids": ids})[0]
        ref_tokens = list(prompt)
        for _ in range(new):
            step = sess.run(["logits"], {"input_ids": np.array([ref_tokens], np.int64)})[0]
            ref_tokens.append(int(np.argmax(step[0, -1])))
    err = float(np.abs(result.outputs["logits"] - ref).max())
    same = gen.tokens == ref_tokens[len(prompt):]
    if not quiet:
        print(f"cimc demo: {model.name} compiled for {hw.name} (prefill {program.entry('prefill').n_instrs:,} and "
              f"decode {program.entry('decode').n_instrs:,} instructions) and simulated on {len(prompt)} tokens")
        print(render_text(result.report))
        print(f"  logits vs onnxruntime: max abs error {err:.2e} ({'OK' if err <= 1e-4 else 'MISMATCH'})")
        print()
        print(render_generation(gen.report))
        print(f"  tokens vs onnxruntime greedy loop: {'identical' if same else 'DIFFERENT'}")
    if err > 1e-4:
        raise CimcError(f"demo: simulated logits differ from onnxruntime by {err:.2e} (> 1e-4)")
    if not same:
        raise CimcError("demo: generated tokens differ from onnxruntime's greedy loop")
    return err
