"""The compiler's estimate of a run's cycles: the simulator's priced instructions, a coarser timeline.

`balance-stages` picks stage partitions by this estimate, and every run report gives it at the
run's size beside the simulated cycles (`estimated_cycles`). Both price the same instructions
with the same `CostModel`; the estimate differs from the simulation only in how it plays them:

- consecutive instructions of one IR op, one kind (weight loads, a stage's sync, other work) and,
  for other work, one executing unit form an *item*, which starts when the barriers it waits on
  are clear and its executing units (tiles, SFUs) are free;
- resources are pooled: all DRAM channels together, the interconnect into and out of the tiles,
  and the global buffer's read and write ports;
- a work item keeps its unit busy for the sum of its instructions' times (each waits for the one
  before, as the simulator's in-order units do) and books each pool once, for the sum of its
  instructions' demands; the weight loads of an item queue on the pools one after another, each
  holding its tile until its own bytes are written;
- instruction fetch counts only as the wait for the first block of code; the later blocks'
  DRAM traffic (64 bytes an instruction, under 1 % of a decode step's bytes) is left out.

It is one pass over the items (a few per pipeline stage), so `balance-stages` can price every
candidate partition of a 1B-parameter model in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isa.booking import Bookings
from isa.cost import CostModel, InstrCosts
from isa.spec import BY_NAME, N_BARRIERS

#: Item kinds: other work, weight loads, joins (sync and halt, which hold nothing).
WORK, LOAD, JOIN = 0, 1, 2
#: The pooled resources, in `Stream.pools` column order.
POOLS = ("dram", "into tiles", "out of tiles", "buffer read", "buffer write")
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
    pools: np.ndarray  # [n, len(POOLS)] cycles on each pooled resource

    @classmethod
    def priced(cls, cm: CostModel, costs: InstrCosts, opcode: np.ndarray, sig: np.ndarray, wait: np.ndarray,
               op: np.ndarray) -> Stream:
        """The stream of a priced program (`cm.instr_costs`), with its decoded opcode, sig and
        wait columns and the debug map's op per instruction."""
        n = len(costs)
        pool_of = np.full(cm.n_units, -1, dtype=np.int64)
        pool_of[:cm.channels] = 0
        pool_of[cm.port_unit(np.arange(cm.tiles), out=False)] = 1
        pool_of[cm.port_unit(np.arange(cm.tiles), out=True)] = 2
        pool_of[cm.gbuf_rd_unit], pool_of[cm.gbuf_wr_unit] = 3, 4
        pools = np.zeros((n, len(POOLS)))
        which = pool_of[costs.unit]
        keep = which >= 0
        np.add.at(pools, (costs.instr_of()[keep], which[keep]), costs.busy[keep])
        pools[:, 0] /= cm.channels
        kind = np.where(np.isin(opcode, list(_LOAD_OPS)), LOAD, np.where(np.isin(opcode, list(_JOIN_OPS)), JOIN, WORK))
        return cls(np.asarray(op, dtype=np.int64), kind, np.asarray(wait, dtype=np.uint64),
                   np.asarray(sig, dtype=np.int64), costs.main, costs.duration() + costs.latency, pools)

    def take(self, index: np.ndarray) -> Stream:
        """The instructions at `index`, in that order."""
        return Stream(self.op[index], self.kind[index], self.wait[index], self.sig[index], self.unit[index],
                      self.time[index], self.pools[index])


def estimate(stream: Stream, start: float = 0.0) -> float:
    """Estimated cycles of a program whose first instruction can begin at cycle `start`."""
    return max(play(stream, start)[2], default=start)


def play(stream: Stream, start: float = 0.0) -> tuple[np.ndarray, list[float], list[float]]:
    """The estimate's timeline: the first instruction of every item, and each item's start and end."""
    n = len(stream.op)
    if not n:
        return np.zeros(0, dtype=np.int64), [], []
    cut = np.ones(n, dtype=bool)
    cut[1:] = (stream.op[1:] != stream.op[:-1]) | (stream.kind[1:] != stream.kind[:-1]) | (stream.kind[1:] == JOIN) \
        | ((stream.kind[1:] == WORK) & (stream.unit[1:] != stream.unit[:-1]))
    first = np.flatnonzero(cut)
    item = np.cumsum(cut) - 1
    waits = np.bitwise_or.reduceat(stream.wait, first).tolist()
    sig_bits = np.where(stream.sig > 0, np.left_shift(np.uint64(1), stream.sig.astype(np.uint64)), np.uint64(0))
    sigs = np.bitwise_or.reduceat(sig_bits, first).tolist()
    pools = np.add.reduceat(stream.pools, first, axis=0).tolist()
    # per item: time each executing unit is busy; instructions without one add up on their own
    runs = stream.unit >= 0
    key = item[runs] * (int(stream.unit.max(initial=0)) + 1) + stream.unit[runs]
    keys, inverse = np.unique(key, return_inverse=True)
    per_unit = np.bincount(inverse, weights=stream.time[runs])
    busy: list[list[tuple[int, float]]] = [[] for _ in first]
    span = int(stream.unit.max(initial=0)) + 1
    for k, t in zip(keys.tolist(), per_unit.tolist(), strict=True):
        busy[k // span].append((k % span, t))
    alone = np.bincount(item, weights=np.where(runs, 0.0, stream.time), minlength=len(first)).tolist()
    # weight loads queue on the pooled resources one after another: play them one by one
    loads: dict[int, list[tuple[int, float, list[tuple[int, float]], float]]] = {}
    at = np.flatnonzero(stream.kind == LOAD)
    used = np.flatnonzero(stream.pools[at].any(axis=0)).tolist()
    for j, u, time, row in zip(item[at].tolist(), stream.unit[at].tolist(), stream.time[at].tolist(),
                               stream.pools[at][:, used].tolist(), strict=True):
        demand = [(p, d) for p, d in zip(used, row, strict=True) if d]
        loads.setdefault(j, []).append((u, time, demand, max(row, default=0.0)))

    cache: dict[int, tuple[int, ...]] = {}

    def bits(mask: int) -> tuple[int, ...]:
        b = cache.get(mask)
        if b is None:
            b = cache[mask] = tuple(x for x in range(1, N_BARRIERS) if mask >> x & 1)
        return b

    bar = [start] * N_BARRIERS
    free = [start] * (span + 1)
    place = Bookings(len(POOLS)).place
    starts, ends = [0.0] * len(first), [0.0] * len(first)
    for i in range(len(first)):
        t = start
        if waits[i]:
            for x in bits(waits[i]):
                if bar[x] > t:
                    t = bar[x]
        queue = loads.get(i)
        if queue is not None:
            t0, e = None, t
            for u, time, demand, bottleneck in queue:
                s = free[u] if free[u] > t else t
                if demand:
                    s = place(s, demand)
                    t = s + bottleneck  # the next one queues behind this one
                free[u] = s + time
                if s + time > e:
                    e = s + time
                if t0 is None:
                    t0 = s
            t = t0 if t0 is not None else t
        else:
            longest = alone[i]
            for u, d in busy[i]:
                if free[u] > t:
                    t = free[u]
                if d > longest:
                    longest = d
            demand = [(p, d) for p, d in enumerate(pools[i]) if d > 0]
            if demand:
                t = place(t, demand)
                longest = max(longest, max(d for _, d in demand))
            e = t + longest
            for u, d in busy[i]:
                free[u] = t + d
        if sigs[i]:
            for x in bits(sigs[i]):
                if e > bar[x]:
                    bar[x] = e
        starts[i], ends[i] = t, e
    return first, starts, ends


def first_fetch(costs: InstrCosts) -> float:
    """When the first block of code has arrived: the earliest an instruction can start."""
    fetch = costs.fetch
    return float(fetch.busy[0].max() + fetch.latency) if len(fetch.busy) else 0.0
