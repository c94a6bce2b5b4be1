"""Quantized benchmark on the LLaMA-3.2-1B-shaped model (not part of the test run).

Uses the cached 1B-shaped ONNX model of benchmarks/scale.py (built once) and measures, in one run:

  1. compile speed: `cimc compile --weights int4` (ONNX -> binary on disk) beside onnxruntime
     creating an InferenceSession on the fp32 file, each in its own process;
  2. decode tokens/s and tokens/J at fp32, INT8 (per channel) and INT4 (group 32), int8
     activations for the integer modes, on each preset (timing-only generation: a prompt, then
     decode steps), with the bits per weight streamed and the fraction of the independent DRAM
     bound each reached;
  3. functional generation of a MatMulNBits graph: onnxruntime's MatMulNBitsQuantizer (RTN, block
     32, symmetric, accuracy_level 0) turns the 1B-shaped model into an int4 graph (built once,
     cached), then onnxruntime and the simulator (compiled from that graph, with numerics) each
     generate the same greedy tokens; the figure is the simulator's time per generated token over
     onnxruntime's on the same graph (which has no KV cache: it recomputes the sequence each token),
     the median (steady state) and the mean (with the simulator's first token, which unpacks every
     weight group once, and its first decode step, which decodes the decode program once).

The last line printed is all figures as JSON.

    python benchmarks/quant.py [--cache DIR] [--prompt 64] [--new-tokens 8] [--presets ...]
                               [--functional-prompt 8] [--functional-tokens 4] [--skip-decode]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scale import CONFIG, DEFAULT_CACHE, _peak_rss_mb, cached_model, step_build, step_ort  # noqa: E402

MODES = {"fp32": {}, "int8": {"weights": "int8"}, "int4": {"weights": "int4"}}


def step_compile(model: Path, binary: Path, max_seq: int) -> dict:
    from cimc.driver import CompileOptions, compile_model
    from isa.binary import write_binary

    t = time.perf_counter()
    program = compile_model(model, CompileOptions(max_seq=max_seq, weights="int4"))
    write_binary(binary, program)
    return {"compile_int4_s": time.perf_counter() - t, "compile_int4_peak_rss_mb": _peak_rss_mb(),
            "binary_int4_mb": binary.stat().st_size / 1e6}


def step_mnb_build(model: Path, out: Path) -> dict:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    t = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(model)), algo_config=DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=True, accuracy_level=None))
    quantizer.process()
    tmp = out.with_name(out.name + ".tmp")
    quantizer.model.save_model_to_file(str(tmp), use_external_data_format=True)
    (tmp.parent / (tmp.name + ".data")).rename(out.parent / (out.name + ".data"))
    onnx_model = onnx.load(str(tmp), load_external_data=False)
    for t_ in onnx_model.graph.initializer:  # the data file was renamed with the model
        for e in t_.external_data:
            if e.key == "location":
                e.value = out.name + ".data"
    onnx.save(onnx_model, str(out))
    tmp.unlink()
    return {"matmulnbits_build_s": time.perf_counter() - t}


def step_mnb_ort(model: Path, prompt: int, new: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ids = [(7 * i + 3) % CONFIG["vocab"] for i in range(prompt)]
    times = []
    for _ in range(new):
        t = time.perf_counter()
        logits = session.run(["logits"], {"input_ids": np.array([ids], np.int64)})[0]
        times.append(time.perf_counter() - t)
        ids.append(int(logits[0, -1].argmax()))
    return {"ort_tokens": ids[prompt:], "ort_s_per_token": sum(times) / len(times),
            "ort_s_per_token_median": float(np.median(times))}


def step_mnb_cimc(model: Path, prompt: int, new: int) -> dict:
    import numpy as np

    from cimc.driver import CompileOptions, compile_model
    from isa.binary import read_binary, write_binary
    from runtime.generate import generate
    from runtime.interpreter import Session

    t0 = time.perf_counter()  # as a user would: cimc compile, then cimc generate on the binary
    binary = model.with_suffix(".cimb")
    write_binary(binary, compile_model(model, CompileOptions(max_seq=prompt, max_ctx=prompt + new)))
    t1 = time.perf_counter()
    program = read_binary(binary)
    session = Session(program)
    ids = [(7 * i + 3) % CONFIG["vocab"] for i in range(prompt)]
    stamps = [time.perf_counter()]
    gen = generate(session, ids, new, progress=lambda done, total: stamps.append(time.perf_counter()))
    steps = np.diff(stamps)
    # the first token is the prefill run, which also unpacks every weight group once per session,
    # and the first decode step decodes the decode program once: the median is the steady state
    return {"cimc_tokens": gen.tokens, "cimc_s_per_token": float(steps.mean()),
            "cimc_s_per_token_median": float(np.median(steps)),
            "cimc_first_token_s": float(steps[0]), "cimc_compile_matmulnbits_s": t1 - t0,
            "cimc_functional_peak_rss_mb": _peak_rss_mb(), "weights": program.meta["weights"]}


def _warm(model: Path) -> None:
    """Read the model and its external data once, so the timed steps start from the same page cache."""
    for path in model.parent.glob(model.name + "*"):
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def _child(step: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--step", step, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_table(model: Path, presets: list[str], prompt: int, new: int) -> dict:
    """Decode tokens/s and tokens/J per preset and weight mode (timing only)."""
    from cimc.driver import CompileOptions, compile_model
    from isa.hw import load_hw
    from runtime.generate import generate
    from runtime.interpreter import Session

    runs = {}
    print(f"{'preset':<14} {'weights':<7} {'bits/w':>6} {'tok/s':>9} {'tok/J':>8} {'bound':>9} {'of bound':>8} "
          f"{'compile s':>9}", flush=True)
    for preset in presets:
        hw = load_hw(preset)
        for mode, opts in MODES.items():
            t0 = time.perf_counter()
            program = compile_model(model, CompileOptions(max_seq=prompt, max_ctx=prompt + new, hw=hw, **opts))
            t1 = time.perf_counter()
            gen = generate(Session(program), [0] * prompt, new, numerics=False)
            d, b = gen.report["decode"], gen.report["bounds"]
            bits = gen.runs[-1].report["weights"]["bits_per_weight_streamed"]
            runs[f"{preset}/{mode}"] = {
                "tokens_per_s": d["tokens_per_s"], "tokens_per_j": d["tokens_per_j"], "bits_per_weight": bits,
                "dram_bound_tokens_per_s": b["dram_bound_tokens_per_s"],
                "fraction_of_dram_bound": b["fraction_of_dram_bound"],
                "energy_per_token_pj": d["energy_per_token_pj"], "compile_s": t1 - t0}
            print(f"{preset:<14} {mode:<7} {bits:>6.2f} {d['tokens_per_s']:>9.2f} {d['tokens_per_j']:>8.3f} "
                  f"{b['dram_bound_tokens_per_s']:>9.2f} {b['fraction_of_dram_bound']:>8.1%} {t1 - t0:>9.1f}",
                  flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens of the decode table (default 64)")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated in the decode table (default 8)")
    ap.add_argument("--presets", default="edgecim-65nm,edgecim-28nm")
    ap.add_argument("--functional-prompt", type=int, default=16, help="prompt of the functional run (default 16)")
    ap.add_argument("--functional-tokens", type=int, default=8, help="tokens the functional run generates (default 8)")
    ap.add_argument("--skip-decode", action="store_true", help="skip the decode table (the slowest part)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step:
        fn = {"build": step_build, "compile": step_compile, "ort": step_ort, "mnb_build": step_mnb_build,
              "mnb_ort": step_mnb_ort, "mnb_cimc": step_mnb_cimc}[a.step]
        conv = [Path(x) if not x.isdigit() else int(x) for x in a.args]
        print(json.dumps(fn(*conv)))
        return
    figures: dict = {"config": CONFIG}
    model = cached_model(a.cache, lambda path: figures.update(_child("build", str(path))))

    print("1. compile with --weights int4, and an onnxruntime session on the fp32 file (each twice, "
          "alternating, after reading the weights once so both find them in the page cache; the faster of each) ...",
          flush=True)
    _warm(model)
    runs = [(_child("compile", str(model), str(model.with_suffix(".int4.cimb")), "256"), _child("ort", str(model)))
            for _ in range(2)]
    figures.update(min((c for c, _ in runs), key=lambda c: c["compile_int4_s"]))
    figures.update(min((o for _, o in runs), key=lambda o: o["ort_session_s"]))
    figures["compile_int4_over_ort_session"] = figures["compile_int4_s"] / figures["ort_session_s"]
    print(f"  cimc compile --weights int4 {figures['compile_int4_s']:.1f} s (peak RSS "
          f"{figures['compile_int4_peak_rss_mb']:,.0f} MB, binary {figures['binary_int4_mb']:,.0f} MB); onnxruntime "
          f"session on the fp32 file {figures['ort_session_s']:.1f} s: ratio "
          f"{figures['compile_int4_over_ort_session']:.2f}", flush=True)

    if not a.skip_decode:
        print(f"\n2. decode, prompt {a.prompt}, {a.new_tokens} new tokens (timing only):", flush=True)
        figures["decode"] = decode_table(model, a.presets.split(","), a.prompt, a.new_tokens)

    print("\n3. functional generation of a MatMulNBits graph (int4, block 32, accuracy_level 0):", flush=True)
    mnb = a.cache / f"{CONFIG['name']}-matmulnbits.onnx"
    if not mnb.is_file():
        print(f"  building {mnb} with onnxruntime's MatMulNBitsQuantizer (once) ...", flush=True)
        figures.update(_child("mnb_build", str(model), str(mnb)))
    p, n = str(a.functional_prompt), str(a.functional_tokens)
    figures.update(_child("mnb_ort", str(mnb), p, n))
    figures.update(_child("mnb_cimc", str(mnb), p, n))
    figures["functional_over_ort"] = figures["cimc_s_per_token"] / figures["ort_s_per_token"]
    figures["functional_over_ort_median"] = figures["cimc_s_per_token_median"] / figures["ort_s_per_token_median"]
    figures["same_tokens"] = figures["cimc_tokens"] == figures["ort_tokens"]
    print(f"  prompt {a.functional_prompt}, {a.functional_tokens} tokens. Per token, median (mean): onnxruntime "
          f"{figures['ort_s_per_token_median']:.3f} ({figures['ort_s_per_token']:.3f}) s (this graph has no KV "
          f"cache: every token recomputes the sequence); simulator {figures['cimc_s_per_token_median']:.3f} "
          f"({figures['cimc_s_per_token']:.3f}) s (its first token, {figures['cimc_first_token_s']:.1f} s, also "
          f"unpacks every weight group once)\n  simulator / onnxruntime per token: "
          f"{figures['functional_over_ort_median']:.2f} (median), {figures['functional_over_ort']:.2f} (mean); same "
          f"greedy tokens: {figures['same_tokens']}; simulator peak RSS "
          f"{figures['cimc_functional_peak_rss_mb']:,.0f} MB", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
