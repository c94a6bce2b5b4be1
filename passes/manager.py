"""Pass registry and pass manager.

A pass is a small frozen dataclass with a kebab-case `name`; its fields are its options, so a
pipeline is a string such as `lift-idioms,tile-partition,balance-stages{sets=2}`. The manager runs
passes in order, verifies the IR after each one (naming the pass that broke it), times them,
and prints or dumps the IR after any of them (`NN-<pass>.cimir` files in a dump directory).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from cimc.ir.core import Module, Rewriter
from cimc.ir.printer import print_module
from cimc.ir.verifier import VerifyError, verify_module
from isa.atomic import atomic_file
from isa.cost import CostModel
from isa.diag import CimcError
from isa.hw import HardwareConfig


@dataclass
class PassContext:
    """What passes may read besides the module: the hardware and its cost model."""

    hw: HardwareConfig
    cost: CostModel
    notes: list[str] = field(default_factory=list)  # near-misses and decisions worth a look


class Pass(Protocol):
    name: ClassVar[str]

    def run(self, module: Module, rw: Rewriter, ctx: PassContext) -> None: ...


def check_hw(module: Module, hw: HardwareConfig, where: str = "the IR") -> None:
    """IR that tile-partition has run on fits only hardware of the same structure."""
    made_for = module.attrs.get("hw")
    if made_for and made_for["fingerprint"] != hw.fingerprint():
        raise CimcError(f"{where} was partitioned for {made_for['name']} (structure {made_for['fingerprint']}), "
                        f"not for {hw.name} (structure {hw.fingerprint()}): its tiles and buffers would not fit; "
                        "run the passes again from the .onnx (or an IR dump from before tile-partition)")


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a pass available by its `name`."""
    REGISTRY[cls.name] = cls
    return cls


_ITEM = re.compile(r"\s*([a-z][a-z0-9-]*)\s*(?:\{([^}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[Pass]:
    """`a,b{x=1,y=fast}` -> pass instances; unknown passes or options are CimcErrors."""
    passes: list[Pass] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise CimcError(f"pipeline {text!r}: cannot parse at column {pos + 1}")
        name, opts = m.group(1), m.group(2)
        cls = REGISTRY.get(name)
        if cls is None:
            raise CimcError(f"pipeline: unknown pass {name!r} (passes: {', '.join(sorted(REGISTRY))})")
        kwargs = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for item in filter(None, (s.strip() for s in (opts or "").split(","))):
            key, _, raw = item.partition("=")
            key = key.strip()
            if key not in fields:
                raise CimcError(f"pipeline: pass {name!r} has no option {key!r} "
                                f"(options: {', '.join(fields) or 'none'})")
            kwargs[key] = _convert(name, key, raw.strip(), fields[key].default)
        passes.append(cls(**kwargs))
        pos = m.end()
    return passes


def _convert(name: str, key: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            if raw not in ("true", "false", "1", "0"):
                raise ValueError
            return raw in ("true", "1")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise CimcError(f"pipeline: option {name}{{{key}}} expects a {type(default).__name__}, got {raw!r}") from None
    return raw


@dataclass
class PassStat:
    name: str
    seconds: float
    summary: str


@dataclass
class PassManager:
    """Runs passes with verification, timing and IR dumps."""

    passes: list[Pass]
    verify: bool = True
    dump_after: set[str] = field(default_factory=set)  # pass names, or {"all"}
    dump_dir: Path | None = None
    on_dump: Callable[[str, str], None] | None = None  # (pass name, IR text) for printing
    stats: list[PassStat] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # the passes' notes (PassContext.notes) of the last run

    def run(self, module: Module, ctx: PassContext) -> Module:
        if self.verify:
            self._verify(module, "the frontend")
        check_hw(module, ctx.hw)
        for i, p in enumerate(self.passes, 1):
            rw = Rewriter(module)
            t0 = time.perf_counter()
            p.run(module, rw, ctx)
            self.stats.append(PassStat(p.name, time.perf_counter() - t0, rw.summary()))
            module.attrs["passes"] = [*module.attrs.get("passes", []), p.name]
            if self.verify:
                self._verify(module, f"pass {p.name!r}")
            if "all" in self.dump_after or p.name in self.dump_after:
                text = print_module(module)
                if self.dump_dir is not None:
                    try:
                        self.dump_dir.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise CimcError(f"cannot create {self.dump_dir}: {e.strerror or e}") from None
                    with atomic_file(self.dump_dir / f"{i:02d}-{p.name}.cimir", "w", encoding="utf-8") as f:
                        f.write(text)
                if self.on_dump is not None:
                    self.on_dump(p.name, text)
        self.notes = ctx.notes
        return module

    def _verify(self, module: Module, who: str) -> None:
        try:
            verify_module(module)
        except VerifyError as e:
            raise VerifyError(f"{who} produced invalid IR: {e.message}", detail=e.detail) from None

    def timing_report(self) -> str:
        width = max((len(s.name) for s in self.stats), default=4)
        return "\n".join(f"  {s.name:<{width}}  {s.seconds * 1000:8.1f} ms  {s.summary}" for s in self.stats)
