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
- an item starts no earlier than its first instruction is dispatched, nor before every item of
  the code block two before its own has started (the instruction buffer holds two blocks), and
  a DRAM transfer (a weight load, or a work item that touches DRAM, counted as one) waits for
  the one `dram.max_outstanding` places before it to complete, as in the simulator;
- instruction fetch counts as the wait for the first block of code; the later blocks' DRAM
  traffic (64 bytes an instruction, under 1 % of a decode step's bytes) is left out.

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
    time: np.ndarray  # its duration plus latency (what the next instruction on its unit waits for)
    dram_done: np.ndarray  # cycles from its start until its DRAM transfer completes (0: none)
    pools: np.ndarray  # [n, DRAM channels + len(POOLS)] cycles on each DRAM channel and pooled resource
    dispatch: float  # cycles to dispatch one instruction
    max_outstanding: int  # DRAM transfers in flight at most
    per_block: int  # instructions per half of the instruction buffer

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
                   np.asarray(sig, dtype=np.int64), costs.main, costs.duration() + costs.latency, costs.dram_done,
                   pools, float(costs.fetch.dispatch), cm.hw.dram.max_outstanding, costs.fetch.per_block)

    def take(self, index: np.ndarray) -> Stream:
        """The instructions at `index`, in that order."""
        return Stream(self.op[index], self.kind[index], self.wait[index], self.sig[index], self.unit[index],
                      self.time[index], self.dram_done[index], self.pools[index], self.dispatch, self.max_outstanding,
                      self.per_block)


def estimate(stream: Stream, start: float = 0.0) -> float:
    """Estimated cycles of a program whose first instruction can begin at cycle `start`."""
    return float(max(play(stream, start)[2].max(initial=start), start))


def play(stream: Stream, start: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    runs = stream.unit >= 0
    span = int(stream.unit.max(initial=0)) + 1
    keys, inverse = np.unique(item[runs] * span + stream.unit[runs], return_inverse=True)
    eptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // span, minlength=n_items), out=eptr[1:])
    alone = np.bincount(item, weights=np.where(runs, 0.0, stream.time), minlength=n_items)
    # weight loads queue on the pooled resources one after another: they are played one by one
    at = np.flatnonzero(stream.kind == LOAD)
    lptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(np.bincount(item[at], minlength=n_items), out=lptr[1:])
    starts, ends = _play(float(start), first, stream.dispatch, stream.per_block, wptr, wbits, sptr,
                         sbits, eptr, keys % span, np.bincount(inverse, weights=stream.time[runs]), pools, alone,
                         np.maximum.reduceat(stream.dram_done, first), lptr, stream.unit[at], stream.time[at],
                         stream.dram_done[at], stream.pools[at], span,
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
def _play(start, head, dispatch, per_block, wptr, wbits, sptr, sbits, eptr, eunit, etime, pools, alone,
          done, lptr, lunit, ltime, ldone, lpools, n_units, bk, ring):
    n_items, k = len(alone), 0
    window = np.full(head[-1] // per_block + 1 if n_items else 1, start)  # latest start in each code block
    bar = np.full(N_BARRIERS, start)
    free = np.full(n_units, start)
    starts, ends = np.zeros(n_items), np.zeros(n_items)
    units, cycles = np.zeros(pools.shape[1], dtype=np.int64), np.zeros(pools.shape[1])
    for i in range(n_items):
        block = head[i] // per_block
        # dispatched in order, and only once the buffer half it is fetched into has emptied
        t = max(start + head[i] * dispatch, window[block - 2] if block >= 2 else start)
        for j in range(wptr[i], wptr[i + 1]):
            t = max(t, bar[wbits[j]])
        if lptr[i + 1] > lptr[i]:  # weight loads: each queues behind the one before on the pools
            first, e = -1.0, t
            for q in range(lptr[i], lptr[i + 1]):
                s = max(free[lunit[q]], t)
                if ldone[q]:  # a DRAM transfer: waits for one of the controller's slots
                    s = max(s, ring[k % len(ring)])
                c = _demand(lpools[q], units, cycles)
                if c:
                    s = place(bk, s, units, cycles, 0, c)
                    t = s + cycles[:c].max()
                free[lunit[q]] = s + ltime[q]
                if ldone[q]:
                    ring[k % len(ring)] = s + ldone[q]
                    k += 1
                e = max(e, s + ltime[q])
                if first < 0:
                    first = s
            t = first
        else:
            longest = alone[i]
            for j in range(eptr[i], eptr[i + 1]):
                t = max(t, free[eunit[j]])
                longest = max(longest, etime[j])
            if done[i]:
                t = max(t, ring[k % len(ring)])
            c = _demand(pools[i], units, cycles)
            if c:
                t = place(bk, t, units, cycles, 0, c)
                longest = max(longest, cycles[:c].max())
            e = t + longest
            if done[i]:
                ring[k % len(ring)] = t + done[i]
                k += 1
            for j in range(eptr[i], eptr[i + 1]):
                free[eunit[j]] = t + etime[j]
        for j in range(sptr[i], sptr[i + 1]):
            bar[sbits[j]] = max(bar[sbits[j]], e)
        starts[i], ends[i] = t, e
        window[block] = max(window[block], t)
    return starts, ends


def first_fetch(costs: InstrCosts) -> float:
    """When the first block of code has arrived: the earliest an instruction can start."""
    fetch = costs.fetch
    return float(fetch.busy[0].max() + fetch.latency) if len(fetch.busy) else 0.0
