"""Resources shared by several requesters, served by time: bookings with idle gaps.

A DRAM channel, an interconnect link or a buffer port serves whoever is ready, not whichever
instruction comes first in the program: a transfer that is ready early may use idle time left
before a transfer booked for later (a weight load waiting for its stage, say), if it fits there.
`Bookings` keeps, per resource, the end of its last booking (its horizon) and its most recent
idle gaps, and `place` finds the first time at which all the resources of a transfer are free
together and books them. The timeline (`runtime.timing`) and the compiler's estimate
(`isa.estimate`) both book through it, in loops compiled with numba (they run once per
instruction of programs with hundreds of thousands of them, thousands of times in a design
search).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

#: Idle gaps remembered per shared resource (the latest), and rounds spent looking for a gap
#: every resource of a transfer shares; beyond them a transfer waits until all its resources are
#: free (pessimistic, and it bounds the work per instruction).
MAX_GAPS = 32
SEARCH_ROUNDS = 8


class Bookings(NamedTuple):
    """Per unit: `horizon` (end of its last booking), gaps [start, end) in time order (`count`
    of them), and the longest gap (`widest`), so a transfer too long for every gap skips them."""

    horizon: np.ndarray
    start: np.ndarray
    end: np.ndarray
    count: np.ndarray
    widest: np.ndarray

    @classmethod
    def empty(cls, n_units: int) -> Bookings:
        return cls(np.zeros(n_units), np.zeros((n_units, MAX_GAPS)), np.zeros((n_units, MAX_GAPS)),
                   np.zeros(n_units, np.int64), np.zeros(n_units))


@njit(cache=True)
def earliest(bk: Bookings, u: int, t: float, d: float) -> float:
    """The first time >= t at which unit u is free for d cycles."""
    if t >= bk.horizon[u]:
        return t
    if d > bk.widest[u]:
        return bk.horizon[u]
    lo, hi = 0, bk.count[u]
    while lo < hi:  # the first gap that ends after t
        mid = (lo + hi) // 2
        if bk.end[u, mid] <= t:
            lo = mid + 1
        else:
            hi = mid
    for g in range(lo, bk.count[u]):
        s = max(bk.start[u, g], t)
        if s + d <= bk.end[u, g]:
            return s
    return bk.horizon[u]


@njit(cache=True)
def _widen(bk: Bookings, u: int) -> None:
    w = 0.0
    for g in range(bk.count[u]):
        w = max(w, bk.end[u, g] - bk.start[u, g])
    bk.widest[u] = w


@njit(cache=True)
def _insert(bk: Bookings, u: int, g: int, a: float, b: float) -> None:
    """Insert gap [a, b) at index g (dropping the oldest when full)."""
    k = bk.count[u]
    if k == MAX_GAPS:
        for j in range(k - 1):
            bk.start[u, j], bk.end[u, j] = bk.start[u, j + 1], bk.end[u, j + 1]
        k -= 1
        g -= 1
        if g < 0:
            bk.count[u] = k
            return
    for j in range(k, g, -1):
        bk.start[u, j], bk.end[u, j] = bk.start[u, j - 1], bk.end[u, j - 1]
    bk.start[u, g], bk.end[u, g] = a, b
    bk.count[u] = k + 1


@njit(cache=True)
def book(bk: Bookings, u: int, s: float, d: float) -> None:
    """Book [s, s + d) on unit u: at or after its horizon, or inside a gap `earliest` found."""
    e = s + d
    h = bk.horizon[u]
    if s >= h:
        if s > h:
            _insert(bk, u, bk.count[u], h, s)
            _widen(bk, u)
        bk.horizon[u] = e
        return
    g = 0
    while bk.end[u, g] <= s:
        g += 1
    a, b = bk.start[u, g], bk.end[u, g]
    if s > a and b > e:  # split the gap in two
        bk.end[u, g] = s
        _insert(bk, u, g + 1, e, b)
    elif s > a:
        bk.end[u, g] = s
    elif b > e:
        bk.start[u, g] = e
    else:
        for j in range(g, bk.count[u] - 1):
            bk.start[u, j], bk.end[u, j] = bk.start[u, j + 1], bk.end[u, j + 1]
        bk.count[u] -= 1
    _widen(bk, u)


@njit(cache=True)
def place(bk: Bookings, t: float, units: np.ndarray, cycles: np.ndarray, lo: int, hi: int) -> float:
    """The first time >= t at which every unit units[lo:hi] is free for cycles[lo:hi]; books them."""
    latest = t
    for j in range(lo, hi):
        latest = max(latest, bk.horizon[units[j]])
    if latest > t:  # some unit is booked past t: look for a common gap, else go after them all
        settled = False
        for _ in range(SEARCH_ROUNDS):
            moved = False
            for j in range(lo, hi):
                s = earliest(bk, units[j], t, cycles[j])
                if s > t:
                    t, moved = s, True
            if not moved:
                settled = True
                break
        if not settled:
            t = latest
    for j in range(lo, hi):
        book(bk, units[j], t, cycles[j])
    return t
