"""The timeline: when each instruction starts and ends, given the resources it holds and barriers.

Instructions are dispatched in program order from the instruction buffer, one per
`fetch.dispatch` cycles, once the block holding them has been fetched from DRAM (block b + 1 is
fetched into the buffer half that block b - 1 used, when block b starts to dispatch; blocks 0
and 1 at the start). An instruction is ready when it is dispatched, every barrier in its wait
mask is clear (every earlier instruction that signals one of them has ended), the unit that
executes it (a tile or an SFU) has finished its previous instruction, and, if it touches DRAM,
fewer than `dram.max_outstanding` earlier DRAM transfers are still in flight.

It then starts at the first time from then on at which every resource it moves data through
(DRAM channels, links, ports) is free for as long as it needs that resource. Those resources are
shared by several requesters, so they serve transfers by time, not by program order: a transfer
that is ready early uses the idle time left before transfers booked later (a weight load
waiting for its stage, say), if it fits there. It holds each resource for that resource's busy
time and ends when the slowest is done plus its latency (DRAM first access, interconnect hops);
its executing unit is held until it ends, so units run their instructions in program order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isa.booking import Bookings
from isa.cost import InstrCosts
from isa.spec import N_BARRIERS


@dataclass
class Timeline:
    start: np.ndarray
    end: np.ndarray
    total: float  # cycles until the last instruction (or fetch) ends
    fetch_start: np.ndarray  # per code block
    fetch_end: np.ndarray


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(b for b in range(1, N_BARRIERS) if mask >> b & 1)


def schedule(costs: InstrCosts, sig: np.ndarray, wait: np.ndarray, n_units: int, max_outstanding: int) -> Timeline:
    """Play the program forward in program order (the hot loop of timing simulation)."""
    n = len(sig)
    ptr = costs.ptr.tolist()
    unit, busy = costs.unit.tolist(), costs.busy.tolist()
    lat, dram, main = costs.latency.tolist(), costs.uses_dram.tolist(), costs.main.tolist()
    sigs, masks = sig.tolist(), wait.tolist()
    fetch = costs.fetch
    per_block, dispatch_cycles = fetch.per_block, fetch.dispatch
    fbusy = [[(c, b) for c, b in enumerate(row) if b] for row in fetch.busy.tolist()]
    n_blocks = len(fbusy)
    bit_cache: dict[int, tuple[int, ...]] = {}
    done = [0.0] * n_units  # executing units: when their last instruction ends
    bar = [0.0] * N_BARRIERS
    ring = [0.0] * max_outstanding  # end times of the last DRAM transfers
    k = 0
    start = [0.0] * n
    end = [0.0] * n
    f_start = [0.0] * n_blocks
    f_end = [0.0] * n_blocks

    place = Bookings(n_units).place

    def fetch_block(b: int, ready: float) -> None:
        nonlocal k
        t = place(max(ready, ring[k % max_outstanding]), fbusy[b])
        f_start[b] = t
        f_end[b] = ring[k % max_outstanding] = t + max(d for _, d in fbusy[b]) + fetch.latency
        k += 1

    for b in range(min(2, n_blocks)):
        fetch_block(b, 0.0)
    dispatched = -dispatch_cycles
    block = 0
    for i in range(n):
        if i == (block + 1) * per_block:
            block += 1
            if block + 1 < n_blocks:
                fetch_block(block + 1, dispatched)
        t = dispatched + dispatch_cycles
        if f_end[block] > t:
            t = f_end[block]
        dispatched = t
        m = masks[i]
        if m:
            bits = bit_cache.get(m)
            if bits is None:
                bits = bit_cache[m] = _bits(m)
            for b in bits:
                if bar[b] > t:
                    t = bar[b]
        uses = dram[i]
        if uses and ring[k % max_outstanding] > t:
            t = ring[k % max_outstanding]
        u0 = main[i]
        if u0 >= 0 and done[u0] > t:
            t = done[u0]
        lo, hi = ptr[i], ptr[i + 1]
        longest = 0.0
        moves = []
        for j in range(lo, hi):
            d = busy[j]
            if d > longest:
                longest = d
            if unit[j] != u0:
                moves.append((unit[j], d))
        if moves:
            t = place(t, moves)
        e = t + longest + lat[i]
        if u0 >= 0:
            done[u0] = e
        if uses:
            ring[k % max_outstanding] = e
            k += 1
        start[i] = t
        end[i] = e
        s = sigs[i]
        if s and e > bar[s]:
            bar[s] = e
    total = max(max(end, default=0.0), max(f_end, default=0.0))
    return Timeline(np.array(start), np.array(end), total, np.array(f_start), np.array(f_end))
