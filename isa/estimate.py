"""The compiler's estimate of a run's cycles: the simulator's priced instructions, a coarser timeline.

`balance-stages` picks stage partitions by this estimate, and every run report gives it at the
run's size beside the simulated cycles (`estimated_cycles`). Both price the same instructions
with the same `CostModel`; the estimate differs from the simulation only in how it plays them:

- consecutive instructions of one IR op, one kind (weight loads, a stage's sync, other work) and,
  for other work, one executing unit form an *item*, which starts when the barriers it waits on
  are clear and its executing units (tiles, SFUs) are free;
- the DRAM channels are kept apart; the other shared resources are pooled: the interconnect
  into and out of the tiles (whatever its links), and the global buffer's read and write ports;
- a work item keeps its unit busy for the sum of its instructions' times (each waits for the one
  before, as the simulator's in-order units do) and books each pool once, for the sum of its
  instructions' demands; the weight loads of an item queue on the pools one after another, each
  holding its tile until its own bytes are written;
- code is fetched as in the simulator: block b + 1 on the DRAM channels once every item of
  block b - 1 has started (the instruction buffer holds two blocks), its instructions arriving
  in order at the pace of its slowest channel; an item starts no earlier than its first
  instruction has arrived and is dispatched, and a DRAM transfer (a code block, a weight load,
  or a work item that touches DRAM, counted as one) waits for one of the controller's
  `dram.max_outstanding` slots, as in the simulator.

It is one pass over the items (a few per pipeline stage), so `balance-stages` can price every
candidate partition of a 1B-parameter model in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from isa.booking import Bookings, place
from isa.cost import CostModel, InstrCosts
from isa.encoding import mask_bits
from isa.spec import BY_NAME, N_BARRIERS

#: Item kinds: other work, weight loads, joins (sync and halt, which hold nothing).
WORK, LOAD, JOIN = 0, 1, 2
#: The pooled resources after the DRAM channels (each its own pool), in `Stream.pools` column order.
POOLS = ("into tiles", "out of tiles", "buffer read", "buffer write")
_LOAD_OPS = {BY_NAME["wload"].opcode}
_JOIN_OPS = {BY_NAME["sync"].opcode, BY_NAME["halt"].opcode}


@dataclass
class Stream:
    """Per instruction, what the estimate needs (arrays indexed by instruction, program order)."""

    op: np.ndarray  # IR op (debug map index)
    kind: np.ndarray  # WORK, LOAD or JOIN
    wait: np.ndarray  # uint64 barrier masks
    sig: np.ndarray  # barrier signalled (0: none)
    unit: np.ndarray  # executing unit, or -1
    also: np.ndarray  # a second executing unit (an MVM's SFU), or -1
    time: np.ndarray  # its duration plus latency (what the next instruction on its unit waits for)
    dram_done: np.ndarray  # cycles from its start until its DRAM transfer completes (0: none)
    pools: np.ndarray  # [n, DRAM channels + len(POOLS)] cycles on each DRAM channel and pooled resource
    dispatch: float  # cycles to dispatch one instruction
    max_outstanding: int  # DRAM transfers in flight at most
    per_block: int  # instructions per half of the instruction buffer
    fetch: np.ndarray  # [code blocks, DRAM channels] cycles each block's fetch holds each channel
    fetch_latency: float  # first-access latency of a block's fetch

    @classmethod
    def priced(cls, cm: CostModel, costs: InstrCosts, opcode: np.ndarray, sig: np.ndarray, wait: np.ndarray,
               op: np.ndarray) -> Stream:
        """The stream of a priced program (`cm.instr_costs`), with its decoded opcode, sig and
        wait columns and the debug map's op per instruction."""
        n = len(costs)
        c = cm.channels
        pool_of = np.full(cm.n_units, -1, dtype=np.int64)
        pool_of[:c] = np.arange(c)
        pool_of[cm.port_unit(np.arange(cm.tiles), out=False)] = c
        pool_of[cm.port_unit(np.arange(cm.tiles), out=True)] = c + 1
        pool_of[cm.gbuf_rd_unit], pool_of[cm.gbuf_wr_unit] = c + 2, c + 3
        pools = np.zeros((n, c + len(POOLS)))
        which = pool_of[costs.unit]
        keep = which >= 0
        np.add.at(pools, (costs.instr_of()[keep], which[keep]), costs.busy[keep])
        kind = np.where(np.isin(opcode, list(_LOAD_OPS)), LOAD, np.where(np.isin(opcode, list(_JOIN_OPS)), JOIN, WORK))
        return cls(np.asarray(op, dtype=np.int64), kind, np.asarray(wait, dtype=np.uint64),
                   np.asarray(sig, dtype=np.int64), costs.main, costs.also, costs.duration() + costs.latency,
                   costs.dram_done,
                   pools, float(costs.fetch.dispatch), cm.hw.dram.max_outstanding, costs.fetch.per_block,
                   costs.fetch.busy, float(costs.fetch.latency))

    def take(self, index: np.ndarray) -> Stream:
        """The instructions at `index`, in that order (fetched as the program's blocks were; a
        longer program repeats its last block's fetch)."""
        blocks = -(-len(index) // self.per_block)
        fetch = self.fetch[np.minimum(np.arange(blocks), len(self.fetch) - 1)]
        return Stream(self.op[index], self.kind[index], self.wait[index], self.sig[index], self.unit[index],
                      self.also[index], self.time[index], self.dram_done[index], self.pools[index], self.dispatch,
                      self.max_outstanding, self.per_block, fetch, self.fetch_latency)


def estimate(stream: Stream) -> float:
    """Estimated cycles of a program."""
    return float(play(stream)[2].max(initial=0.0))


def play(stream: Stream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The estimate's timeline: the first instruction of every item, and each item's start and end."""
    n = len(stream.op)
    if not n:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
    cut = np.ones(n, dtype=bool)
    cut[1:] = (stream.op[1:] != stream.op[:-1]) | (stream.kind[1:] != stream.kind[:-1]) | (stream.kind[1:] == JOIN) \
        | ((stream.kind[1:] == WORK) & (stream.unit[1:] != stream.unit[:-1]))
    first = np.flatnonzero(cut)
    item = np.cumsum(cut) - 1
    n_items = len(first)
    wptr, wbits = mask_bits(np.bitwise_or.reduceat(stream.wait, first))
    sig_bits = np.where(stream.sig > 0, np.left_shift(np.uint64(1), stream.sig.astype(np.uint64)), np.uint64(0))
    sptr, sbits = mask_bits(np.bitwise_or.reduceat(sig_bits, first))
    pools = np.add.reduceat(stream.pools, first, axis=0)
    # per item: time each executing unit is busy; instructions without one add up on their own
    runs, seconds = stream.unit >= 0, stream.also >= 0
    span = int(max(stream.unit.max(initial=0), stream.also.max(initial=0))) + 1
    pairs = np.concatenate([item[runs] * span + stream.unit[runs], item[seconds] * span + stream.also[seconds]])
    keys, inverse = np.unique(pairs, return_inverse=True)
    eptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // span, minlength=n_items), out=eptr[1:])
    alone = np.bincount(item, weights=np.where(runs, 0.0, stream.time), minlength=n_items)
    busy = np.bincount(inverse, weights=np.concatenate([stream.time[runs], stream.time[seconds]]))
    # weight loads queue on the pooled resources one after another: they are played one by one
    at = np.flatnonzero(stream.kind == LOAD)
    lptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(item[at], minlength=n_items), out=lptr[1:])
    starts, ends = _play(n, first, stream.dispatch, stream.per_block, stream.fetch, stream.fetch_latency, wptr,
                         wbits, sptr, sbits, eptr, keys % span, busy, pools, alone,
                         np.maximum.reduceat(stream.dram_done, first), lptr, stream.unit[at],
                         stream.time[at], stream.dram_done[at], stream.pools[at], span,
                         Bookings.empty(stream.pools.shape[1]), np.zeros(stream.max_outstanding))
    return first, starts, ends


@njit(cache=True)
def _demand(row, units, cycles):
    """The pools a row of demands uses, into units/cycles; returns how many."""
    c = 0
    for p in range(len(row)):
        if row[p] > 0:
            units[c], cycles[c] = p, row[p]
            c += 1
    return c


@njit(cache=True)
def _fetch(bk, fetch, b, ready, flat, slots, units, cycles, f_start, f_end):
    """Fetch code block b once `ready`: a DRAM transfer on the channels, in one of the slots."""
    c = _demand(fetch[b], units, cycles)
    slot = np.argmin(slots)
    t = max(ready, slots[slot])
    if c:
        t = place(bk, t, units, cycles, 0, c)
    f_start[b] = t
    f_end[b] = slots[slot] = t + (cycles[:c].max() if c else 0.0) + flat


@njit(cache=True)
def _play(n, head, dispatch, per_block, fetch, flat, wptr, wbits, sptr, sbits, eptr, eunit, etime, pools, alone,
          done, lptr, lunit, ltime, ldone, lpools, n_units, bk, slots):
    n_items, n_blocks = len(alone), len(fetch)
    window = np.zeros(n_blocks)  # latest start of an item in each code block
    f_start, f_end = np.zeros(n_blocks), np.zeros(n_blocks)
    bar = np.zeros(N_BARRIERS)
    free = np.zeros(n_units)
    starts, ends = np.zeros(n_items), np.zeros(n_items)
    units, cycles = np.zeros(pools.shape[1], dtype=np.int64), np.zeros(pools.shape[1])
    fetched = -1
    for i in range(n_items):
        block = head[i] // per_block
        # block b + 1 is fetched into the half block b - 1 held once all of that has started
        while fetched < min(block + 1, n_blocks - 1):
            fetched += 1
            ready = 0.0 if fetched < 2 else max(window[fetched - 2], (fetched - 1) * per_block * dispatch)
            _fetch(bk, fetch, fetched, ready, flat, slots, units, cycles, f_start, f_end)
        # dispatched in order, once its instruction has arrived
        count = min(per_block, n - block * per_block)
        streaming = f_end[block] - f_start[block] - flat
        arrived = f_end[block] - streaming * (count - 1 - (head[i] - block * per_block)) / count
        t = max(head[i] * dispatch, arrived)
        for j in range(wptr[i], wptr[i + 1]):
            t = max(t, bar[wbits[j]])
        if lptr[i + 1] > lptr[i]:  # weight loads: each queues behind the one before on the pools
            first, e = -1.0, t
            for q in range(lptr[i], lptr[i + 1]):
                s = max(free[lunit[q]], t)
                slot = np.argmin(slots)
                if ldone[q]:  # a DRAM transfer: waits for one of the controller's slots
                    s = max(s, slots[slot])
                c = _demand(lpools[q], units, cycles)
                if c:
                    s = place(bk, s, units, cycles, 0, c)
                free[lunit[q]] = s + ltime[q]
                if ldone[q]:
                    slots[slot] = s + ldone[q]
                e = max(e, s + ltime[q])
                if first < 0:
                    first = s
            t = first
        else:
            longest = alone[i]
            for j in range(eptr[i], eptr[i + 1]):
                t = max(t, free[eunit[j]])
                longest = max(longest, etime[j])
            slot = np.argmin(slots)
            if done[i]:
                t = max(t, slots[slot])
            c = _demand(pools[i], units, cycles)
            if c:
                t = place(bk, t, units, cycles, 0, c)
                longest = max(longest, cycles[:c].max())
            e = t + longest
            if done[i]:
                slots[slot] = t + done[i]
            for j in range(eptr[i], eptr[i + 1]):
                free[eunit[j]] = t + etime[j]
        for j in range(sptr[i], sptr[i + 1]):
            bar[sbits[j]] = max(bar[sbits[j]], e)
        starts[i], ends[i] = t, e
        last = ((head[i + 1] if i + 1 < n_items else n) - 1) // per_block
        for b in range(block, last + 1):
            window[b] = max(window[b], t)
    return starts, ends
