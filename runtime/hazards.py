"""Check that the timeline respects every data dependency the numerics actually had.

The compiler orders work across units with barriers; if it forgot one, the simulated time
would be too optimistic while the numbers stay right (numerics run in program order). This
checker replays the memory accesses recorded during a numeric run (byte ranges per memory,
and macro groups) and reports any pair of conflicting accesses (at least one a write) where
the later instruction started before the earlier one finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.timing import Timeline

SPACE_NAMES = {0: "global buffer", 1: "DRAM", 2: "macros"}


@dataclass(frozen=True)
class Hazard:
    first: int
    second: int
    space: str
    kind: str  # RAW, WAR or WAW

    def __str__(self) -> str:
        return f"{self.kind} on {self.space}: instruction {self.second} starts before instruction {self.first} ends"


def find_hazards(accesses: list[tuple], tl: Timeline, limit: int = 20) -> list[Hazard]:
    """Conflicting access pairs that overlap in time (at most `limit` of them).

    An access is (instr, space, lo, hi, write, row pitch, row bytes): rows of `row bytes` every
    `row pitch` bytes from `lo`. Two accesses with the same pitch conflict only if their row
    ranges and their column bands overlap (heads writing interleaved column blocks do not).
    """
    if not accesses:
        return []
    a = np.array(accesses, dtype=np.int64)
    instr, space, lo, hi, write = a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4].astype(bool)
    pitch, width = a[:, 5], a[:, 6]
    banded = (pitch > 0) & (width < pitch)
    col = np.where(banded, lo % np.maximum(pitch, 1), 0)
    out: list[Hazard] = []
    for j in range(len(a)):
        prev = instr < instr[j]
        box = (lo < hi[j]) & (lo[j] < hi)
        same_band = banded & banded[j] & (pitch == pitch[j])
        cols_meet = (col < col[j] + width[j]) & (col[j] < col + width)
        conflict = prev & (space == space[j]) & box & (~same_band | cols_meet) & (write | write[j])
        late = conflict & (tl.end[instr] > tl.start[instr[j]] + 1e-9)
        for i in np.flatnonzero(late)[:limit - len(out)]:
            kind = "WAW" if write[i] and write[j] else ("RAW" if write[i] else "WAR")
            out.append(Hazard(int(instr[i]), int(instr[j]), SPACE_NAMES[int(space[j])], kind))
        if len(out) >= limit:
            break
    return out
