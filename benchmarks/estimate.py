"""Estimate benchmark: the compiler's estimate against the simulation on the 1B-shaped model.

Builds (once, cached; shared with benchmarks/scale.py) the LLaMA-3.2-1B-shaped ONNX model,
compiles it for each preset (max-seq 256, max-ctx 1024) and runs, timing-only, prefill at 1, 8,
64 and 256 tokens and decode after 0, 100 and 1000 cached positions. For each run it prints the
simulated cycles, the compiler's estimate (`estimated_cycles`, the model balance-stages
minimises) and their ratio; the last line is all figures as JSON and the worst ratio.

    python benchmarks/estimate.py [--cache DIR] [--presets edgecim-65nm,edgecim-28nm]
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

from cimc.driver import CompileOptions, compile_model  # noqa: E402
from isa.hw import load_hw  # noqa: E402
from runtime.interpreter import Session  # noqa: E402

MAX_SEQ, MAX_CTX = 256, 1024
POINTS = [("prefill", 1, 0), ("prefill", 8, 0), ("prefill", 64, 0), ("prefill", MAX_SEQ, 0),
          ("decode", 1, 0), ("decode", 1, 100), ("decode", 1, 1000)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--presets", default="edgecim-65nm,edgecim-28nm")
    a = ap.parse_args()
    model = cached_model(a.cache, step_build)
    results: dict = {"config": CONFIG, "runs": []}
    print(f"{'preset':<14} {'entry':<8} {'tokens':>6} {'past':>5} {'simulated':>14} {'estimated':>14} {'est/sim':>7}",
          flush=True)
    for preset in a.presets.split(","):
        t = time.perf_counter()
        session = Session(compile_model(model, CompileOptions(max_seq=MAX_SEQ, max_ctx=MAX_CTX, hw=load_hw(preset))))
        print(f"{preset:<14} compiled in {time.perf_counter() - t:.1f} s", flush=True)
        for entry, tokens, past in POINTS:
            r = session.run(entry, numerics=False, tokens=tokens, past=past).report
            ratio = r["estimated_cycles"] / r["cycles"]
            results["runs"].append({"preset": preset, "entry": entry, "tokens": tokens, "past": past,
                                    "cycles": r["cycles"], "estimated_cycles": r["estimated_cycles"], "ratio": ratio})
            print(f"{preset:<14} {entry:<8} {tokens:>6} {past:>5} {r['cycles']:>14,.0f} "
                  f"{r['estimated_cycles']:>14,.0f} {ratio:>7.3f}", flush=True)
    results["worst_deviation"] = max(abs(x["ratio"] - 1) for x in results["runs"])
    print(f"worst deviation of the estimate from the simulation: {results['worst_deviation']:.1%}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
