"""Autoregressive generation on the simulator: prefill, then decode steps with the KV cache.

`generate` runs the program's `prefill` entry on the prompt (the cache is empty, past = 0), takes
the most likely next token from the last row of the logits, then runs the `decode` entry once
per further token, each time with one more position in the cache. Every run is simulated with
numerics (the tokens are real) and priced by the cost model; the report gives time to first
token, decode tokens per second and per joule, energy per token by component, and how close
decode came to the hardware's bounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from isa.cost import COMPONENTS, DRAM_KINDS
from isa.diag import CimcError
from isa.program import Program
from runtime.interpreter import Session, SimResult
from runtime.report import group_sum


@dataclass
class Generation:
    """The outcome of `generate`: tokens, one SimResult per run, and the summary report."""

    prompt: list[int]
    tokens: list[int]
    runs: list[SimResult] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def check_request(program: Program, prompt: Sequence[int], max_new_tokens: int, name: str = "the binary") -> None:
    """Validate a generation request against the program: one clear error per problem."""
    names = [e.name for e in program.entries]
    if "prefill" not in names or "decode" not in names:
        raise CimcError(f"{name} has no prefill and decode programs (it has {', '.join(names)}); "
                        "recompile it with this cimc")
    if not program.meta.get("kv_cache", False):
        raise CimcError(f"{name} was compiled without a KV cache (insert-kv-cache), so decode steps cannot see "
                        "the earlier tokens; recompile with the default pipeline")
    if not prompt:
        raise CimcError("the prompt is empty: give at least one token id")
    vocab = program.meta.get("vocab")
    for i, t in enumerate(prompt):
        if vocab is not None and not 0 <= t < vocab:
            raise CimcError(f"prompt token {i} is {t}, outside the vocabulary [0, {vocab})")
    if max_new_tokens < 1:
        raise CimcError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    max_seq = int(program.entry("prefill").meta["max_seq"])
    if len(prompt) > max_seq:
        raise CimcError(f"the prompt has {len(prompt)} tokens; this program takes at most {max_seq} "
                        "(recompile with a larger --max-seq)")
    max_ctx = int(program.meta.get("max_ctx", max_seq))
    need = len(prompt) + max_new_tokens - 1
    if need > max_ctx:
        raise CimcError(f"{len(prompt)} prompt + {max_new_tokens} new tokens need {need} cached positions; "
                        f"this program holds {max_ctx} (recompile with --max-ctx {need} or more)")


def _inputs(session: Session, entry: str, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The token ids; the KV cache is already in the machine, and mask and position inputs are
    compiled in (their assumed values are what generation would pass)."""
    needed = [s.name for s in session.entry(entry).symbols
              if s.kind == "input" and not s.check and not s.heads]
    if len(needed) != 1:
        raise CimcError(f"cannot generate: the program takes {', '.join(needed)}, not just token ids")
    return {needed[0]: ids}


def generate(session: Session, prompt: Sequence[int], max_new_tokens: int, *, numerics: bool = True,
             progress: Callable[[int, int], None] | None = None, logits: str = "logits") -> Generation:
    """Greedy generation of `max_new_tokens` tokens after `prompt`.

    Without numerics only the prompt's length matters: every run is priced (time, energy) but no
    values are computed, so no tokens come out; this is how large models are benchmarked."""
    prompt = [int(t) for t in prompt]
    check_request(session.program, prompt, max_new_tokens, session.name)
    gen = Generation(prompt, [])
    for step in range(max_new_tokens):
        entry, past = ("prefill", 0) if step == 0 else ("decode", len(prompt) + step - 1)
        if numerics:
            ids = np.array([prompt if step == 0 else [gen.tokens[-1]]], dtype=np.int64)
            run = session.run(entry, _inputs(session, entry, ids), past=past)
            gen.tokens.append(int(np.argmax(run.outputs[logits][0, -1])))
        else:
            run = session.run(entry, numerics=False, tokens=len(prompt) if step == 0 else 1, past=past)
        gen.runs.append(run)
        if progress is not None:
            progress(step + 1, max_new_tokens)
    gen.report = summarize(session, gen)
    return gen


def summarize(session: Session, gen: Generation) -> dict:
    """The generation report: TTFT, decode rate and energy per token, and the decode bounds."""
    hw, cost = session.hw, session.cost
    prefill, steps = gen.runs[0].report, [r.report for r in gen.runs[1:]]
    out: dict = {
        "model": prefill["model"],
        "hardware": prefill["hardware"],
        "prompt_tokens": len(gen.prompt),
        "new_tokens": len(gen.runs),
        "tokens": gen.tokens if gen.tokens else None,
        "ttft_s": prefill["seconds"],
        "prefill": {k: prefill[k] for k in ("cycles", "seconds", "joules", "energy_pj", "dram_bytes")},
        "steps": [{"past": len(gen.prompt) + i, "cycles": r["cycles"], "seconds": r["seconds"],
                   "joules": r["joules"]} for i, r in enumerate(steps)],
    }
    if not steps:
        out["decode"] = out["bounds"] = None
        return out
    n = len(steps)
    seconds = sum(r["seconds"] for r in steps)
    joules = sum(r["joules"] for r in steps)
    dram_bytes = sum(r["dram_bytes"] for r in steps) / n
    by_kind = {k: sum(r["dram_bytes_by_kind"][k] for r in steps) / n for k in steps[0]["dram_bytes_by_kind"]}
    least = {k: sum(r["min_dram_bytes_by_kind"][k] for r in steps) / n for k in steps[0]["min_dram_bytes_by_kind"]}
    min_bytes = sum(least.values())
    compute_s = sum(_compute_bound_cycles(run, cost.channels) for run in gen.runs[1:]) / n / cost.f_hz
    bandwidth = hw.dram.peak_gbps * 1e9 * hw.dram.efficiency
    dram_bound = bandwidth / min_bytes if min_bytes else float("inf")
    rate = n / seconds
    out["decode"] = {
        "steps": n,
        "seconds": seconds,
        "joules": joules,
        "tokens_per_s": rate,
        "tokens_per_j": n / joules,
        "energy_per_token_pj": {c: sum(r["energy_pj"][c] for r in steps) / n for c in (*COMPONENTS, "leakage")},
        "dram_bytes_per_token": {"total": dram_bytes, **by_kind},
    }
    compute_bound = 1 / compute_s if compute_s else float("inf")
    extra = {k: by_kind[k] - least.get(k, 0.0) for k in by_kind}
    out["bounds"] = {
        "min_dram_bytes_per_token": min_bytes,
        "min_dram_bytes_per_token_by_kind": least,
        "dram_bandwidth_gbps": bandwidth / 1e9,
        "dram_bound_tokens_per_s": dram_bound,
        "compute_bound_tokens_per_s": compute_bound,
        "limited_by": "dram" if dram_bound <= compute_bound else "compute",
        "fraction_of_dram_bound": rate / dram_bound,
        "fraction_of_bound": rate / min(dram_bound, compute_bound),
        "dram_overhead": {"bytes_per_token": dram_bytes - min_bytes,
                          "fraction": (dram_bytes - min_bytes) / min_bytes if min_bytes else 0.0,
                          "by_cause": {OVERHEAD_CAUSES[k]: v for k, v in extra.items() if v > 0}},
    }
    return out


#: What simulated DRAM bytes above the minimum of each kind are (the report names the cause).
OVERHEAD_CAUSES = {"weights": "weight padding and bursts", "constants": "constants re-read",
                   "kv_cache": "KV cache re-read", "io": "inputs/outputs rounded to bursts", "spills": "spills",
                   "code": "instruction fetch", "other": "other"}
#: Overhead above the minimum DRAM bytes that the text report spells out.
OVERHEAD_SHOWN = 0.02


def _compute_bound_cycles(run: SimResult, channels: int) -> float:
    """Cycles of the busiest unit other than the DRAM channels (units 0 .. channels-1) if DRAM
    were infinitely fast."""
    c = run.costs
    assert c is not None
    on_chip = c.unit >= channels
    return float(group_sum(c.unit[on_chip], c.compute[on_chip], int(c.unit.max(initial=0)) + 1).max(initial=0.0))


def render_text(report: dict) -> str:
    """The generation report, readable at a glance."""
    hw = report["hardware"]
    tokens = " ".join(map(str, report["tokens"])) if report["tokens"] is not None else "(timing only: not computed)"
    lines = [f"{report['model']} on {hw['name']}: {report['prompt_tokens']} prompt token(s), "
             f"{report['new_tokens']} generated",
             f"  tokens      {tokens}",
             f"  prefill     time to first token {report['ttft_s'] * 1e3:.3f} ms, "
             f"{report['prefill']['joules'] * 1e3:.3f} mJ"]
    d = report.get("decode")
    if d:
        b = report["bounds"]
        e = d["energy_per_token_pj"]
        tot = sum(e.values()) or 1.0
        parts = ", ".join(f"{k.replace('_', ' ')} {v / tot:.1%}" for k, v in e.items() if v > 0)
        by = d["dram_bytes_per_token"]
        kinds = ", ".join(f"{DRAM_KINDS[k]} {v / 1e6:,.3f}" for k, v in by.items() if k != "total" and v > 0)
        lines += [
            f"  decode      {d['tokens_per_s']:,.2f} tokens/s, {d['tokens_per_j']:,.2f} tokens/J "
            f"over {d['steps']} step(s)",
            f"  per token   {tot * 1e-6:,.3f} uJ: {parts}",
            f"  DRAM/token  {by['total'] / 1e6:,.3f} MB ({kinds})",
            f"  bounds      DRAM {b['dram_bound_tokens_per_s']:,.2f} tokens/s "
            f"({b['min_dram_bytes_per_token'] / 1e6:,.3f} MB at least, at {b['dram_bandwidth_gbps']:.1f} GB/s), "
            f"compute {b['compute_bound_tokens_per_s']:,.2f} tokens/s: limited by "
            f"{'DRAM' if b['limited_by'] == 'dram' else 'compute'}, decode reached {b['fraction_of_bound']:.1%}",
        ]
        over = b["dram_overhead"]
        if over["fraction"] > OVERHEAD_SHOWN:
            shown = sorted(((k, v) for k, v in over["by_cause"].items() if v >= 0.05 * over["bytes_per_token"]),
                           key=lambda x: -x[1])
            causes = ", ".join(f"{k} {v / 1e6:,.3f} MB" for k, v in shown)
            lines.append(f"  overhead    {over['fraction']:.1%} more DRAM bytes than the least: {causes}")
    return "\n".join(lines)
