"""Scale benchmark: compile and simulate a LLaMA-3.2-1B-shaped model (not part of the test run).

Builds (once, cached) an ONNX file of the 1B shape with random weights: 16 layers, hidden 2048,
intermediate 8192, 32 heads / 8 KV heads, vocab 128256, tied embeddings, ~1.24 B parameters,
~5 GB of external data. Then, each step in its own process so peak memory is its own, it
measures on this machine in one run:

  - cimc compile time and peak RSS (ONNX -> binary on disk),
  - onnxruntime InferenceSession creation time on the same file (the ratio is the figure),
  - cimc timing-only simulation of one decode-sized step (1 token) and of loading the binary.

The last line printed is all figures as JSON.

    python benchmarks/scale.py [--cache DIR] [--max-seq N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = dict(name="llama-3.2-1b-shape", vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64,
              intermediate=8192, rope_theta=500000.0, rms_eps=1e-5, tie_embeddings=True)


DEFAULT_CACHE = Path(os.environ.get("CIMC_BENCH_CACHE", HERE / ".cache"))


def cached_model(cache: Path, build: Callable[[Path], object]) -> Path:
    """The 1B-shaped model in `cache`, built once (by `build(path)`) when it is not there."""
    cache.mkdir(parents=True, exist_ok=True)
    model = cache / f"{CONFIG['name']}.onnx"
    if not model.is_file():
        print(f"building {model} (once; ~5 GB) ...", flush=True)
        build(model)
    return model


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_build(model: Path) -> dict:
    from cimc.synth import DecoderConfig, build_decoder_onnx

    t = time.perf_counter()
    cfg = DecoderConfig(**CONFIG)
    build_decoder_onnx(cfg, model, seed=1, external_data=True)
    return {"build_s": time.perf_counter() - t, "params": cfg.param_count()}


def step_compile(model: Path, binary: Path, max_seq: int) -> dict:
    from cimc.driver import CompileOptions, compile_model
    from isa.binary import write_binary

    t = time.perf_counter()
    program = compile_model(model, CompileOptions(max_seq=max_seq))
    write_binary(binary, program)
    return {"compile_s": time.perf_counter() - t, "compile_peak_rss_mb": _peak_rss_mb(),
            "instructions": program.n_instrs, "binary_mb": binary.stat().st_size / 1e6}


def step_ort(model: Path) -> dict:
    import onnxruntime as ort

    t = time.perf_counter()
    ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return {"ort_session_s": time.perf_counter() - t, "ort_peak_rss_mb": _peak_rss_mb()}


def step_simulate(binary: Path) -> dict:
    from isa.binary import read_binary
    from runtime.interpreter import simulate

    t0 = time.perf_counter()
    program = read_binary(binary)
    t1 = time.perf_counter()
    result = simulate(program, numerics=False, tokens=1, entry="decode")
    t2 = time.perf_counter()
    r = result.report
    return {"load_binary_s": t1 - t0, "timing_step_s": t2 - t1, "sim_peak_rss_mb": _peak_rss_mb(),
            "step_cycles": r["cycles"], "step_seconds": r["seconds"], "step_joules": r["joules"],
            "tokens_per_s": 1 / r["seconds"], "tokens_per_j": 1 / r["joules"]}


def _child(step: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--step", step, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--max-seq", type=int, default=256)
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step:
        fn = {"build": step_build, "compile": step_compile, "ort": step_ort, "simulate": step_simulate}[a.step]
        conv = [Path(x) if i < 2 else int(x) for i, x in enumerate(a.args)]
        print(json.dumps(fn(*conv)))
        return
    figures: dict = {"config": CONFIG, "max_seq": a.max_seq}
    model = cached_model(a.cache, lambda path: figures.update(_child("build", str(path))))
    binary = model.with_suffix(".cimb")
    print("compiling with cimc ...", flush=True)
    figures.update(_child("compile", str(model), str(binary), str(a.max_seq)))
    print(f"  compile {figures['compile_s']:.1f} s, peak RSS {figures['compile_peak_rss_mb']:,.0f} MB, "
          f"{figures['instructions']:,} instructions, binary {figures['binary_mb']:,.0f} MB", flush=True)
    print("creating an onnxruntime InferenceSession on the same file ...", flush=True)
    figures.update(_child("ort", str(model)))
    print(f"  onnxruntime session {figures['ort_session_s']:.1f} s, peak RSS {figures['ort_peak_rss_mb']:,.0f} MB",
          flush=True)
    figures["compile_over_ort"] = figures["compile_s"] / figures["ort_session_s"]
    print(f"  cimc compile / ORT session creation = {figures['compile_over_ort']:.2f}", flush=True)
    print("simulating one decode-sized step, timing only ...", flush=True)
    figures.update(_child("simulate", str(binary)))
    print(f"  load binary {figures['load_binary_s']:.2f} s, timing-only step {figures['timing_step_s']:.2f} s; "
          f"simulated {figures['tokens_per_s']:.1f} tokens/s, {figures['tokens_per_j']:.2f} tokens/J", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
