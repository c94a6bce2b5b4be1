"""Build the bundled example model ``examples/tiny_llama.onnx`` and its reference ``tiny_llama.npz``.

The model is a 2-layer Llama-style decoder with GQA (4 query heads, 2 KV heads) and seeded random
fp32 weights, written by `cimc.synth` in the form a torch-dynamo export takes. The npz holds a fixed
prompt and the logits onnxruntime computes for it, keyed like ``shared/models/*.npz``:
``input.input_ids`` int64 [1, 8] and ``output.logits`` float32 [1, 8, vocab].

Usage: ``python examples/make_tiny_model.py [--out examples/tiny_llama.onnx]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from cimc.demo import EXAMPLE_CONFIG as CONFIG
from cimc.demo import EXAMPLE_SEED as SEED
from cimc.synth import build_decoder_onnx

PROMPT = np.array([[1, 17, 42, 99, 256, 7, 311, 500]], dtype=np.int64)
MAX_BYTES = 1_000_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "tiny_llama.onnx")
    args = parser.parse_args(argv)

    model = build_decoder_onnx(CONFIG, args.out, seed=SEED, external_data=False)
    size = model.stat().st_size
    if size >= MAX_BYTES:
        raise SystemExit(f"{model}: {size} bytes, the bundled example must stay under {MAX_BYTES}")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input_ids": PROMPT})
    ref = model.with_suffix(".npz")
    np.savez(ref, **{"input.input_ids": PROMPT, "output.logits": logits})
    print(f"wrote {model} ({size} bytes, {CONFIG.param_count()} params, seed {SEED}): {CONFIG}")
    print(f"wrote {ref} (input.input_ids {list(PROMPT.shape)}, output.logits {list(logits.shape)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
