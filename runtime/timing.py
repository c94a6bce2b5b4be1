"""The timeline: when each instruction starts and ends, given the resources it holds and barriers.

Instructions are dispatched in program order from the instruction buffer, one per
`fetch.dispatch` cycles, once they have been fetched from DRAM (a block is one DRAM transfer;
its instructions arrive in order at the pace of its slowest channel). An instruction
stays in the buffer until it starts (units keep no queues of their own), so block b + 1 is
fetched into the half block b - 1 used once every instruction of block b - 1 has started
(blocks 0 and 1 at the start). An instruction is ready when it is dispatched, every barrier in its wait
mask is clear (every earlier instruction that signals one of them has ended), the unit that
executes it (a tile or an SFU; an MVM of integer weights also uses its tile's SFU) has finished
its previous instruction, and, if it touches DRAM,
one of the controller's `dram.max_outstanding` transfer slots is free (a slot frees when its
transfer has completed: its data moved and its first-access latency passed).

It then starts at the first time from then on at which every resource it moves data through
(DRAM channels, links, ports) is free for as long as it needs that resource. Those resources are
shared by several requesters, so they serve transfers by time, not by program order: a transfer
that is ready early uses the idle time left before transfers booked later (a weight load
waiting for its stage, say), if it fits there (`isa.booking`). It holds each resource for that
resource's busy time and ends when the slowest is done plus its latency (DRAM first access,
interconnect hops); its executing units are held until it ends, so units run their instructions
in program order. The loop is compiled with numba.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from isa.booking import Bookings, place
from isa.cost import InstrCosts
from isa.encoding import mask_bits
from isa.spec import N_BARRIERS


@dataclass
class Timeline:
    start: np.ndarray
    end: np.ndarray
    total: float  # cycles until the last instruction (or fetch) ends
    fetch_start: np.ndarray  # per code block
    fetch_end: np.ndarray


def schedule(costs: InstrCosts, sig: np.ndarray, wait: np.ndarray, n_units: int, max_outstanding: int) -> Timeline:
    """Play the program forward in program order."""
    fetch = costs.fetch
    blocks, chans = np.nonzero(fetch.busy)
    fptr = np.zeros(len(fetch.busy) + 1, dtype=np.int64)
    np.cumsum(np.bincount(blocks, minlength=len(fetch.busy)), out=fptr[1:])
    wptr, wbits = mask_bits(wait)
    start, end, f_start, f_end = _play(
        costs.ptr, costs.unit, costs.busy, costs.main, costs.also, costs.latency, costs.dram_done,
        np.asarray(sig, dtype=np.int64), wptr, wbits, fptr, chans.astype(np.int64), fetch.busy[blocks, chans],
        float(fetch.latency), int(fetch.per_block), float(fetch.dispatch), Bookings.empty(n_units),
        int(max_outstanding))
    total = max(float(end.max(initial=0.0)), float(f_end.max(initial=0.0)))
    return Timeline(start, end, total, f_start, f_end)


@njit(cache=True)
def _fetch(bk, b, ready, fptr, funit, fbusy, flat, slots, f_start, f_end):
    slot = np.argmin(slots)
    t = place(bk, max(ready, slots[slot]), funit, fbusy, fptr[b], fptr[b + 1])
    longest = 0.0
    for j in range(fptr[b], fptr[b + 1]):
        longest = max(longest, fbusy[j])
    f_start[b] = t
    f_end[b] = slots[slot] = t + longest + flat


@njit(cache=True)
def _play(ptr, unit, busy, main, also, lat, dram_done, sig, wptr, wbits, fptr, funit, fbusy, flat, per_block,
          dispatch, bk, max_outstanding):
    n, n_blocks = len(main), len(fptr) - 1
    done = np.zeros(len(bk.horizon))  # executing units: when their last instruction ends
    bar = np.zeros(N_BARRIERS)
    slots = np.zeros(max_outstanding)  # the controller's transfer slots: when each is free again
    start, end = np.zeros(n), np.zeros(n)
    f_start, f_end = np.zeros(n_blocks), np.zeros(n_blocks)
    moves_u = np.empty(max(1, int(np.max(np.diff(ptr))) if n else 1), dtype=np.int64)
    moves_d = np.empty(len(moves_u))
    for b in range(min(2, n_blocks)):
        _fetch(bk, b, 0.0, fptr, funit, fbusy, flat, slots, f_start, f_end)
    dispatched = -dispatch
    block = 0
    for i in range(n):
        if i == (block + 1) * per_block:
            block += 1
            if block + 1 < n_blocks:  # into the half block - 1 held, once all of it has started
                ready = max(dispatched, np.max(start[(block - 1) * per_block:block * per_block]))
                _fetch(bk, block + 1, ready, fptr, funit, fbusy, flat, slots, f_start, f_end)
        # the block streams in at its slowest channel's pace: an instruction has arrived once
        # the bytes of its block up to it have
        count = min(per_block, n - block * per_block)
        streaming = f_end[block] - f_start[block] - flat
        t = max(dispatched + dispatch, f_end[block] - streaming * (count - 1 - (i - block * per_block)) / count)
        dispatched = t
        for j in range(wptr[i], wptr[i + 1]):
            t = max(t, bar[wbits[j]])
        if dram_done[i]:
            slot = np.argmin(slots)
            t = max(t, slots[slot])
        u0, u1 = main[i], also[i]
        if u0 >= 0:
            t = max(t, done[u0])
        if u1 >= 0:
            t = max(t, done[u1])
        longest = 0.0
        c = 0
        for j in range(ptr[i], ptr[i + 1]):
            longest = max(longest, busy[j])
            if unit[j] != u0 and unit[j] != u1:
                moves_u[c], moves_d[c] = unit[j], busy[j]
                c += 1
        if c:
            t = place(bk, t, moves_u, moves_d, 0, c)
        e = t + longest + lat[i]
        if u0 >= 0:
            done[u0] = e
        if u1 >= 0:
            done[u1] = e
        if dram_done[i]:  # its slot frees when its data has come, not when it ends
            slots[slot] = t + dram_done[i]
        start[i], end[i] = t, e
        if sig[i]:
            bar[sig[i]] = max(bar[sig[i]], e)
    return start, end, f_start, f_end
