"""The one registry of decoder idiom rules (RoPE, attention, RMSNorm, SwiGLU, ...).

A rule is recognised where its idiom ends (its `anchor`) and either returns the replacement or a
`NoMatch` saying why a candidate almost matched (as onnxscript's rewriter and xDSL's
PatternRewriter do), so "why did my model not lift" is answered by the rule that nearly matched.
Each rule works at one level (see docs/ir.md, "Where an idiom lives"):

- `"onnx"`: needs ONNX facts (shapes, head splits, folded tables); run by the frontend's lifter
  at an ONNX op type, on its deferred expressions. Near misses go to the cannot-compile error.
- `"ir"`: a rewrite of IR ops; run by the `lift-idioms` pass at an IR op name, in registry order.
  Near misses go to the pass notes.

Rules register on import: the frontend's (`cimc/frontend/rules/`, converter modules) when the
frontend is imported, the IR's (`passes/lift_idioms.py`) when the passes are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Level = Literal["onnx", "ir"]


@dataclass(frozen=True)
class NoMatch:
    """A near miss: the candidate at the anchor is not this idiom, because of `reason`. `parts`
    names other nodes of the candidate the reason also explains (frontend rules)."""

    reason: str
    parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """One decoder idiom. `match(context, anchor)` returns the replacement (frontend: the lifted
    term; IR: the new op, created through the context's rewriter), a `NoMatch`, or None when the
    anchor is no candidate at all."""

    name: str
    level: Level
    anchor: str  # the ONNX op type ("onnx") or IR op name ("ir") where the idiom ends
    doc: str  # one line: the pattern
    match: Callable[[Any, Any], Any]


RULES: list[Rule] = []


def register_rule(rule: Rule) -> Rule:
    """Add a rule to the registry (names are unique; order is the order rules are tried in)."""
    assert all(r.name != rule.name for r in RULES), rule.name
    RULES.append(rule)
    return rule


def rules(level: Level, anchor: str | None = None) -> list[Rule]:
    """The registered rules of `level` (anchored at `anchor`, if given), in registry order."""
    return [r for r in RULES if r.level == level and anchor in (None, r.anchor)]
