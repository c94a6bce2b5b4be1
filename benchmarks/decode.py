"""Decode benchmark: balanced ping-pong stages versus the naive schedule, on a 1B-shaped model.

Builds (once, cached; shared with benchmarks/scale.py) the LLaMA-3.2-1B-shaped ONNX model, then
for each hardware preset compiles it twice in memory, with cimc's balanced schedule (weights of
one macro set load while the other computes) and with the naive baseline (one macro set: load,
then compute, no overlap), and prices a greedy generation (prompt, then decode steps) on the
simulator in timing-only mode. It prints decode tokens/s and tokens/J, the DRAM-bandwidth bound
(DRAM bytes per token / effective bandwidth) and how close each schedule came to it. The last
line is all figures as JSON.

    python benchmarks/decode.py [--cache DIR] [--prompt 64] [--new-tokens 8] [--presets edgecim-65nm,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scale import CONFIG, DEFAULT_CACHE, cached_model, step_build  # noqa: E402  (the benchmark scripts share the model builder)

from cimc.driver import SCHEDULES, CompileOptions, compile_model  # noqa: E402
from isa.hw import load_hw  # noqa: E402
from runtime.generate import generate  # noqa: E402
from runtime.interpreter import Session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated (default 8)")
    ap.add_argument("--presets", default="edgecim-65nm,edgecim-28nm")
    a = ap.parse_args()
    model = cached_model(a.cache, step_build)
    results: dict = {"config": CONFIG, "prompt": a.prompt, "new_tokens": a.new_tokens, "runs": {}}
    print(f"{'preset':<14} {'schedule':<9} {'tok/s':>8} {'tok/J':>7} {'DRAM bound':>10} {'of bound':>8} "
          f"{'TTFT ms':>8} {'compile s':>9} {'price s':>7}", flush=True)
    for preset in a.presets.split(","):
        hw = load_hw(preset)
        rates = {}
        for schedule, pipeline in SCHEDULES.items():
            t0 = time.perf_counter()
            program = compile_model(model, CompileOptions(max_seq=a.prompt, max_ctx=a.prompt + a.new_tokens,
                                                          hw=hw, pipeline=pipeline))
            t1 = time.perf_counter()
            report = generate(Session(program), [0] * a.prompt, a.new_tokens, numerics=False).report
            t2 = time.perf_counter()
            d, b = report["decode"], report["bounds"]
            rates[schedule] = d["tokens_per_s"]
            results["runs"][f"{preset}/{schedule}"] = {
                "tokens_per_s": d["tokens_per_s"], "tokens_per_j": d["tokens_per_j"], "ttft_s": report["ttft_s"],
                "dram_bound_tokens_per_s": b["dram_bound_tokens_per_s"],
                "fraction_of_dram_bound": b["fraction_of_dram_bound"],
                "compute_bound_tokens_per_s": b["compute_bound_tokens_per_s"],
                "dram_bytes_per_token": d["dram_bytes_per_token"],
                "energy_per_token_pj": d["energy_per_token_pj"], "compile_s": t1 - t0, "price_s": t2 - t1}
            print(f"{preset:<14} {schedule:<9} {d['tokens_per_s']:>8.2f} {d['tokens_per_j']:>7.3f} "
                  f"{b['dram_bound_tokens_per_s']:>10.2f} {b['fraction_of_dram_bound']:>8.1%} "
                  f"{report['ttft_s'] * 1e3:>8.1f} {t1 - t0:>9.1f} {t2 - t1:>7.1f}", flush=True)
        results["runs"][f"{preset}/speedup"] = rates["balanced"] / rates["naive"]
        print(f"{preset:<14} balanced / naive decode speed-up: {rates['balanced'] / rates['naive']:.2f}x", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
