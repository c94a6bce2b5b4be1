"""The timeline: when each instruction starts and ends, given unit occupancy and barriers.

Each unit executes its instructions in program order, one at a time. An instruction starts when
its unit(s) are free and every barrier in its wait mask is clear, i.e. every earlier instruction
that signals one of those barriers has finished. A weight load holds its tile and the DRAM
channel at once (the channel for the transfer time, the tile until the macros are written).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isa.cost import InstrCosts
from isa.spec import N_BARRIERS


@dataclass
class Timeline:
    start: np.ndarray
    end: np.ndarray
    total: float  # cycles until the last instruction ends


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(b for b in range(1, N_BARRIERS) if mask >> b & 1)


def schedule(costs: InstrCosts, sig: np.ndarray, wait: np.ndarray, n_units: int) -> Timeline:
    """Play the program forward in program order (the hot loop of timing simulation)."""
    n = len(sig)
    u0, u1 = costs.unit0.tolist(), costs.unit1.tolist()
    b0, b1 = costs.busy0.tolist(), costs.busy1.tolist()
    sigs = sig.tolist()
    masks = wait.tolist()
    bit_cache: dict[int, tuple[int, ...]] = {}
    free = [0.0] * n_units
    bar = [0.0] * N_BARRIERS
    start = [0.0] * n
    end = [0.0] * n
    for i in range(n):
        t = 0.0
        m = masks[i]
        if m:
            bits = bit_cache.get(m)
            if bits is None:
                bits = bit_cache[m] = _bits(m)
            for b in bits:
                if bar[b] > t:
                    t = bar[b]
        a = u0[i]
        if a >= 0 and free[a] > t:
            t = free[a]
        c = u1[i]
        if c >= 0 and free[c] > t:
            t = free[c]
        e = t + b0[i]
        if a >= 0:
            free[a] = e
        if c >= 0:
            e1 = t + b1[i]
            free[c] = e1
            if e1 > e:
                e = e1
        start[i] = t
        end[i] = e
        s = sigs[i]
        if s and e > bar[s]:
            bar[s] = e
    return Timeline(np.array(start), np.array(end), max(end, default=0.0))
