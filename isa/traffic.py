"""The least DRAM traffic a run must cause: the compiler's statement, from the IR, that the
simulator's byte counts are checked against.

It comes from the model alone (`passes/traffic.py` builds it before code generation), not from
the instructions or the cost model, so a simulated run that moves fewer bytes has forgotten
traffic, and one that moves more says how much the generated code adds (spills, re-reads,
instruction fetch, rounding to bursts).
"""

from __future__ import annotations

from dataclasses import dataclass

#: The kinds of DRAM traffic the bound covers (a subset of `isa.cost.DRAM_KINDS`; code has none).
BOUND_KINDS = ("weights", "constants", "kv_cache", "io", "spills")


@dataclass(frozen=True)
class MinTraffic:
    """Per kind, bytes = fixed + per_seq x seq + per_past x past for a run of `seq` tokens after
    `past` cached ones; plus, as spills, every activation too large for the global buffer
    (`large`: rows "seq", "ctx" or a count, bytes per row, times it must cross DRAM); plus, as KV
    cache, the cached rows a sliding window of W keys can see (`windows`: W, bytes per row): the
    last min(past, W - 1)."""

    terms: dict[str, tuple[float, float, float]]
    large: tuple[tuple[str, float, float], ...]
    buffer_bytes: int
    windows: tuple[tuple[int, float], ...] = ()

    def at(self, seq: int, past: int) -> dict[str, float]:
        """Bytes per kind for one run."""
        out = {k: fixed + per_seq * seq + per_past * past for k, (fixed, per_seq, per_past) in self.terms.items()}
        for rows, row_bytes, times in self.large:
            count = seq if rows == "seq" else past + seq if rows == "ctx" else float(rows)
            nbytes = count * row_bytes
            if nbytes > self.buffer_bytes:
                out["spills"] = out.get("spills", 0.0) + times * nbytes
        for window, row_bytes in self.windows:
            out["kv_cache"] = out.get("kv_cache", 0.0) + min(past, window - 1) * row_bytes
        return out

    def to_meta(self) -> dict:
        return {"terms": {k: list(v) for k, v in self.terms.items()}, "large": [list(x) for x in self.large],
                "buffer_bytes": self.buffer_bytes, "windows": [list(x) for x in self.windows]}

    @classmethod
    def from_meta(cls, meta: dict) -> MinTraffic:
        return cls({k: (float(a), float(b), float(c)) for k, (a, b, c) in meta["terms"].items()},
                   tuple((str(r), float(b), float(t)) for r, b, t in meta["large"]), int(meta["buffer_bytes"]),
                   tuple((int(w), float(b)) for w, b in meta.get("windows", ())))
