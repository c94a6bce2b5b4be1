"""Run reports: totals, energy by component, time by unit, breakdowns by model layer and op.

`build_report` turns the per-instruction costs and the timeline into a plain dict (the
`--report-json` content); `render_text` formats it so a person can read it at a glance.
"""

from __future__ import annotations

import numpy as np

from isa.cost import COMPONENTS, DRAM_KINDS, CostModel, InstrCosts
from isa.program import Entry, Program
from isa.spec import BY_NAME
from isa.traffic import MinTraffic
from runtime.timing import Timeline

#: Unit kinds (CostModel.unit_kinds) in report order, with what one unit of each is.
UNIT_KINDS = {"dram": "channels", "noc": "links", "gbuf": "ports", "reduce": "adder", "tile": "tiles",
              "sfu": "SFUs", "port": "tile ports"}
LABELS = {"dram": "DRAM", "macro_write": "macro writes", "mvm": "MVM", "sfu": "SFU", "buffer": "buffers",
          "noc": "NoC", "leakage": "leakage"}


def group_sum(keys: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Sum of `values` per key 0..n-1."""
    return np.bincount(keys, weights=values, minlength=n)[:n] if len(keys) else np.zeros(n)


def build_report(program: Program, entry: Entry, cost: CostModel, costs: InstrCosts, tl: Timeline,
                 opcode: np.ndarray, seq: int, past: int, estimated: float) -> dict:
    """All figures of one run of `seq` tokens after `past` cached ones, as JSON-able data
    (cycles, seconds, picojoules, bytes). `opcode` is the entry's decoded opcode column;
    `estimated` the compiler's estimate of the run's cycles (`isa.estimate`)."""
    hw = cost.hw
    least = MinTraffic.from_meta(entry.meta["min_dram"]).at(seq, past)
    cycles = float(tl.total)
    seconds = cycles / cost.f_hz
    leak_pj = cost.leakage_mw * 1e-3 * seconds * 1e12
    energy = {c: float(costs.energy[c].sum()) for c in COMPONENTS}
    energy["leakage"] = leak_pj
    total_pj = sum(energy.values())
    per_instr = sum(costs.energy[c] for c in COMPONENTS)

    names = cost.unit_names()
    busy = group_sum(costs.unit, costs.busy, len(names))
    units = {name: {"busy_cycles": float(b), "utilization": float(b / cycles) if cycles else 0.0}
             for name, b in zip(names, busy, strict=True)}

    ops = entry.debug.ops
    op_idx = entry.debug.instr_op.astype(np.int64)
    # weight loads are issued ahead (prefetch) and halt/sync wait for everything: a layer's span
    # starts at its first other (compute) instruction
    not_work = np.isin(opcode, [BY_NAME[m].opcode for m in ("wload", "halt", "sync")])
    layers: dict[str, dict] = {}
    kinds: dict[str, dict] = {}
    for key, table in (("layer", layers), ("op", kinds)):
        labels = sorted({o[key] for o in ops}, key=_layer_order) if key == "layer" else sorted({o[key] for o in ops})
        lab_of_op = np.array([labels.index(o[key]) for o in ops], dtype=np.int64)
        lab = lab_of_op[op_idx] if len(op_idx) else np.zeros(0, np.int64)
        e = group_sum(lab, per_instr, len(labels))
        cnt = np.bincount(lab, minlength=len(labels))
        for i, name in enumerate(labels):
            if not cnt[i]:
                continue
            mask = lab == i
            work = mask & ~not_work if (mask & ~not_work).any() else mask
            table[name or "-"] = {
                "instructions": int(cnt[i]), "energy_pj": float(e[i]),
                "start_cycle": float(tl.start[work].min()), "end_cycle": float(tl.end[mask].max()),
                "dram_bytes": float(costs.dram_bytes[mask].sum()),
            }
    return {
        "model": program.meta.get("model", ""),
        "entry": entry.name,
        "hardware": {"name": hw.name, "fingerprint": hw.fingerprint(), "f_clk_mhz": hw.chip.f_clk_mhz,
                     "tiles": hw.chip.tiles, "macros_per_tile": hw.chip.macros_per_tile},
        "tokens": seq,
        "past": past,
        "instructions": len(costs),
        "cycles": cycles,
        "seconds": seconds,
        "joules": total_pj * 1e-12,
        "energy_pj": energy,
        "dram_bytes": float(costs.dram_bytes.sum()),
        "dram_bytes_by_kind": {k: float(v.sum()) for k, v in costs.dram_kind_bytes.items()},
        "min_dram_bytes_by_kind": least,
        "min_dram_bytes": sum(least.values()),
        "macs": float(costs.macs.sum()),
        "weights": _weights(program, costs),
        "units": units,
        "unit_kinds": dict(zip(names, cost.unit_kinds(), strict=True)),
        "layers": layers,
        "ops": kinds,
        "estimated_cycles": estimated,
    }


def _weights(program: Program, costs: InstrCosts) -> dict:
    """How the weights are held, and the bits per weight this run streamed from DRAM (weights,
    scales, zero points and padding, over the number of weights)."""
    count = int(program.meta.get("weight_count") or 0)
    streamed = float(costs.dram_kind_bytes["weights"].sum())
    return {"kind": program.meta.get("weights", ""), "count": count,
            "bits_per_weight_streamed": streamed * 8 / count if count else 0.0}


def _layer_order(name: str) -> tuple:
    if name == "embed":
        return (0, 0)
    if name.startswith("layer") and name[5:].isdigit():
        return (1, int(name[5:]))
    return (2, 0) if name == "head" else (3, name)


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1, ""), (1e-3, "m"), (1e-6, "u"), (1e-9, "n"), (1e-12, "p")):
        if abs(x) >= scale or scale == 1e-12:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _weights_line(r: dict) -> list[str]:
    w = r.get("weights") or {}
    if not w.get("count"):
        return []
    return [f"  weights {w['kind']}: {w['bits_per_weight_streamed']:.2f} bits per weight streamed"]


def render_text(r: dict) -> str:
    """A compact human-readable report."""
    hw = r["hardware"]
    est = r.get("estimated_cycles")
    tot = r["joules"] * 1e12 or 1.0
    lines = [
        f"{r['model']} on {hw['name']} ({hw['tiles']} tiles x {hw['macros_per_tile']} macros, "
        f"{hw['f_clk_mhz']:g} MHz): {r['entry']}, {r['tokens']} token(s)"
        + (f" after {r['past']:,} cached" if r.get("past") else "") + f", {r['instructions']:,} instructions",
        f"  time    {r['cycles']:,.0f} cycles = {_si(r['seconds'], 's')}"
        + (f"   (compiler's estimate {est:,.0f}, {est / r['cycles'] - 1:+.1%})" if est and r["cycles"] else ""),
        f"  energy  {_si(r['joules'], 'J')}   DRAM traffic {r['dram_bytes'] / 1e6:,.2f} MB   "
        f"MACs {r['macs']:,.0f}",
        "          " + ", ".join(f"{LABELS[k]} {v / tot:.1%}" for k, v in r["energy_pj"].items() if v > 0),
        "  DRAM    " + ", ".join(f"{DRAM_KINDS[k]} {v / 1e6:,.3f} MB" for k, v in r["dram_bytes_by_kind"].items()
                                 if v > 0),
        *_weights_line(r),
        "  units   busy cycles   utilization",
    ]
    kinds = r["unit_kinds"]
    for kind, label in UNIT_KINDS.items():
        group = [u for n, u in r["units"].items() if kinds[n] == kind]
        if not group:
            continue
        used = sum(u["busy_cycles"] > 0 for u in group)
        util = [u["utilization"] for u in group]
        note = "" if used == len(group) else " (none used)" if not used else f" ({used} used)"
        lines.append(f"    {kind:<8}{sum(u['busy_cycles'] for u in group):>12,.0f}   {np.mean(util):>6.1%} mean, "
                     f"{max(util):.1%} max over {len(group)} {label}{note}")
    lines.append("  layer     from cycle   to cycle       energy   share   DRAM MB   instrs")
    for name, d in r["layers"].items():
        lines.append(f"    {name:<8}{d['start_cycle']:>10,.0f} {d['end_cycle']:>10,.0f}  "
                     f"{_si(d['energy_pj'] * 1e-12, 'J'):>11}  {d['energy_pj'] / tot:>6.1%}  "
                     f"{d['dram_bytes'] / 1e6:>8.2f}  {d['instructions']:>7,}")
    return "\n".join(lines)


def render_accuracy(gen: dict) -> str:
    """The `accuracy` entry of a generation report (see `cimc.accuracy`) as two lines under the
    generation report; empty when the report has none."""
    acc = gen.get("accuracy")
    if not acc:
        return ""
    tokens, ref = gen.get("tokens") or [], acc["reference_tokens"]
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref, strict=False)) if a != b), min(len(tokens), len(ref)))
    greedy = ("greedy tokens identical to onnxruntime's" if same == len(tokens) == len(ref)
              else f"greedy tokens depart from onnxruntime's at token {same + 1} of {len(ref)}")
    weights = f"weights {acc['weights']}; " if acc.get("weights") else ""
    return (f"  accuracy    vs onnxruntime ({acc['reference']}), teacher-forced over {acc['positions']} position(s): "
            f"top-1 {acc['top1_agreement']:.1%}, cosine {acc['mean_cosine']:.6f}, "
            f"|logit error| max {acc['max_abs_error']:.3g}, mean {acc['mean_abs_error']:.3g}\n"
            f"              {weights}{greedy}" + (f"\n              note: {acc['note']}" if acc.get("note") else ""))
