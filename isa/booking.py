"""Resources shared by several requesters, served by time: bookings with idle gaps.

A DRAM channel, an interconnect link or a buffer port serves whoever is ready, not whichever
instruction comes first in the program: a transfer that is ready early may use idle time left
before a transfer booked for later (a weight load waiting for its stage, say), if it fits there.
`Bookings` keeps, per resource, the end of its last booking and its most recent idle gaps, and
finds the first time at which all the resources of a transfer are free together. The timeline
(`runtime.timing`) and the compiler's estimate (`isa.estimate`) both book through it.
"""

from __future__ import annotations

from bisect import bisect_right

#: Idle gaps remembered per shared resource (the latest), and rounds spent looking for a gap
#: every resource of a transfer shares; beyond them a transfer waits until all its resources are
#: free (pessimistic, and it bounds the work per instruction).
MAX_GAPS = 32
SEARCH_ROUNDS = 8


class Bookings:
    """The bookings of the shared resources: per unit, the end of its last booking and the most
    recent idle gaps [start, end) before it that a later request may still use."""

    def __init__(self, n_units: int) -> None:
        self.horizon = [0.0] * n_units
        self.gap_start: list[list[float]] = [[] for _ in range(n_units)]
        self.gap_end: list[list[float]] = [[] for _ in range(n_units)]

    def earliest(self, u: int, t: float, d: float) -> float:
        """The first time >= t at which unit u is free for d cycles."""
        if t >= self.horizon[u]:
            return t
        starts, ends = self.gap_start[u], self.gap_end[u]
        for g in range(bisect_right(ends, t), len(ends)):
            s = starts[g] if starts[g] > t else t
            if s + d <= ends[g]:
                return s
        return self.horizon[u]

    def add_gap(self, u: int, a: float, b: float) -> None:
        """Remember the idle time [a, b) just before unit u's horizon; when too many are kept,
        forget the oldest."""
        starts, ends = self.gap_start[u], self.gap_end[u]
        starts.append(a)
        ends.append(b)
        if len(ends) > MAX_GAPS:
            del starts[0], ends[0]

    def book(self, u: int, s: float, d: float) -> None:
        """Book [s, s + d) on unit u: after its horizon, or inside a gap `earliest` found."""
        e = s + d
        h = self.horizon[u]
        starts, ends = self.gap_start[u], self.gap_end[u]
        if s >= h:
            if s > h:
                self.add_gap(u, h, s)
            self.horizon[u] = e
            return
        g = bisect_right(ends, s)
        if g == len(ends) or starts[g] > s or e > ends[g]:
            raise AssertionError(f"unit {u}: booking [{s}, {e}) does not fit a gap")
        gs, ge = starts[g], ends[g]
        pieces = [(a, b) for a, b in ((gs, s), (e, ge)) if b > a]
        starts[g:g + 1] = [a for a, _ in pieces]
        ends[g:g + 1] = [b for _, b in pieces]

    def place(self, t: float, uses: list[tuple[int, float]]) -> float:
        """The first time >= t at which every (unit, cycles) of `uses` is free; books them."""
        horizon = self.horizon
        latest = t
        for u, _ in uses:
            if horizon[u] > latest:
                latest = horizon[u]
        if latest > t:  # some unit is booked past t: look for a common gap, else go after them all
            earliest = self.earliest
            for _ in range(SEARCH_ROUNDS):
                moved = False
                for u, d in uses:
                    s = earliest(u, t, d)
                    if s > t:
                        t, moved = s, True
                if not moved:
                    break
            else:
                t = latest
        for u, d in uses:  # book; the common cases (at or after the horizon) inline
            h = horizon[u]
            if t > h:
                starts, ends = self.gap_start[u], self.gap_end[u]
                starts.append(h)
                ends.append(t)
                if len(ends) > MAX_GAPS:
                    del starts[0], ends[0]
                horizon[u] = t + d
            elif t == h:
                horizon[u] = t + d
            else:
                self.book(u, t, d)
        return t
