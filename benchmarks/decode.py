"""Decode benchmark: balanced ping-pong stages versus the naive schedule, on a 1B-shaped model.

Builds (once, cached; shared with benchmarks/scale.py) the LLaMA-3.2-1B-shaped ONNX model, then
for each hardware preset compiles it twice in memory, with cimc's balanced schedule (weights of
one macro set load while the other computes) and with the naive baseline (one macro set: load,
then compute, no overlap), and prices a greedy generation (prompt, then decode steps) on the
simulator in timing-only mode. It prints decode tokens/s and tokens/J, the independent DRAM bound
(the least bytes a decode step must move, from the IR, over the sustained bandwidth), how close
each schedule came to it, and the compiler's estimate of a decode step beside the simulated one.

Then, for the first preset's balanced binary, it re-prices one decode step under other
interconnects (the preset's bus, a mesh of the same links, and the 256-bit links at the core
clock the presets had before the interconnect was timed) and prints what each costs: decode
rate, interconnect energy per token, wire area. The last line is all figures as JSON.

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

#: Interconnects a decode step is re-priced under: name -> --set overrides of the first preset.
INTERCONNECTS = {
    "preset bus": [],
    "mesh, same links": ["noc.topology=mesh"],
    "256-bit bus at core clock": ["noc.link_bits=256", "noc.f_clk_mhz=200"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (default 64)")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated (default 8)")
    ap.add_argument("--presets", default="edgecim-65nm,edgecim-28nm")
    a = ap.parse_args()
    model = cached_model(a.cache, step_build)
    results: dict = {"config": CONFIG, "prompt": a.prompt, "new_tokens": a.new_tokens, "runs": {}, "interconnect": {}}
    print(f"{'preset':<14} {'schedule':<9} {'tok/s':>8} {'tok/J':>7} {'bound':>8} {'of bound':>8} {'est/sim':>7} "
          f"{'TTFT ms':>8} {'compile s':>9} {'price s':>7}", flush=True)
    first = None
    for preset in a.presets.split(","):
        hw = load_hw(preset)
        rates = {}
        for schedule, pipeline in SCHEDULES.items():
            t0 = time.perf_counter()
            program = compile_model(model, CompileOptions(max_seq=a.prompt, max_ctx=a.prompt + a.new_tokens,
                                                          hw=hw, pipeline=pipeline))
            t1 = time.perf_counter()
            gen = generate(Session(program), [0] * a.prompt, a.new_tokens, numerics=False)
            t2 = time.perf_counter()
            report = gen.report
            d, b = report["decode"], report["bounds"]
            steps = [r.report for r in gen.runs[1:]]
            est = sum(r["estimated_cycles"] for r in steps) / sum(r["cycles"] for r in steps)
            rates[schedule] = d["tokens_per_s"]
            results["runs"][f"{preset}/{schedule}"] = {
                "tokens_per_s": d["tokens_per_s"], "tokens_per_j": d["tokens_per_j"], "ttft_s": report["ttft_s"],
                "dram_bound_tokens_per_s": b["dram_bound_tokens_per_s"],
                "min_dram_bytes_per_token": b["min_dram_bytes_per_token"],
                "fraction_of_dram_bound": b["fraction_of_dram_bound"],
                "compute_bound_tokens_per_s": b["compute_bound_tokens_per_s"],
                "dram_bytes_per_token": d["dram_bytes_per_token"], "dram_overhead": b["dram_overhead"],
                "energy_per_token_pj": d["energy_per_token_pj"], "estimate_over_simulation": est,
                "compile_s": t1 - t0, "price_s": t2 - t1}
            print(f"{preset:<14} {schedule:<9} {d['tokens_per_s']:>8.2f} {d['tokens_per_j']:>7.3f} "
                  f"{b['dram_bound_tokens_per_s']:>8.2f} {b['fraction_of_dram_bound']:>8.1%} {est:>7.3f} "
                  f"{report['ttft_s'] * 1e3:>8.1f} {t1 - t0:>9.1f} {t2 - t1:>7.1f}", flush=True)
            if first is None:
                first = (preset, program)
        results["runs"][f"{preset}/speedup"] = rates["balanced"] / rates["naive"]
        print(f"{preset:<14} balanced / naive decode speed-up: {rates['balanced'] / rates['naive']:.2f}x", flush=True)
    assert first is not None
    preset, program = first
    print(f"\ninterconnect of {preset} (balanced binary, one decode step after {a.prompt} cached positions):")
    print(f"  {'variant':<28} {'tok/s':>8} {'NoC uJ/token':>12} {'NoC share':>9} {'wire mm2':>8} {'area mm2':>8}")
    for name, settings in INTERCONNECTS.items():
        hw = load_hw(preset, settings)
        r = Session(program, hw).run("decode", numerics=False, past=a.prompt).report
        noc = r["energy_pj"]["noc"]
        results["interconnect"][name] = {"settings": settings, "tokens_per_s": 1 / r["seconds"], "noc_pj": noc,
                                         "noc_share": noc * 1e-12 / r["joules"], "wire_area_mm2": hw.noc_area_mm2,
                                         "area_mm2": hw.area_mm2}
        print(f"  {name:<28} {1 / r['seconds']:>8.2f} {noc * 1e-6:>12.1f} {noc * 1e-12 / r['joules']:>9.1%} "
              f"{hw.noc_area_mm2:>8.2f} {hw.area_mm2:>8.2f}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
