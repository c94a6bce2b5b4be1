"""The family × exporter test-model zoo in tests/zoo (made by dev/zoo/make_zoo.py, listed in
tests/zoo/zoo.json): which models there are, and the onnxruntime feeds for one step of each."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from model_fixtures import REPO

ZOO = REPO / "tests" / "zoo"


@dataclass(frozen=True)
class ZooModel:
    """One zoo.json record that the generator made ("ok")."""

    family: str
    flavour: str
    path: Path
    precision: str  # fp32, int4, int8
    exporter: str
    kv: bool  # has past_key_values inputs and present outputs
    prefill_shapes: dict[str, list[int]]  # input name -> shape of the generator's prefill step
    prompt: tuple[int, ...]  # the family's prompt: prefill tokens, then one decode token

    @property
    def name(self) -> str:
        return self.path.stem

    def prefill_feeds(self) -> dict[str, np.ndarray]:
        """onnxruntime inputs for the prefill of the family's prompt (an empty past for KV models)."""
        n = self.prefill_shapes["input_ids"][1]
        return self.step_feeds(np.array(self.prompt[:n], np.int64), 0, None)

    def step_feeds(self, ids: np.ndarray, past_len: int,
                   presents: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """onnxruntime inputs for `ids` after `past_len` cached tokens; `presents` (by output name)
        become the past, else the past is empty."""
        feeds: dict[str, np.ndarray] = {}
        for name, shape in self.prefill_shapes.items():
            if name == "input_ids":
                feeds[name] = ids[None].astype(np.int64)
            elif name == "attention_mask":
                feeds[name] = np.ones((1, past_len + len(ids)), np.int64)
            elif name == "position_ids":
                feeds[name] = np.arange(past_len, past_len + len(ids), dtype=np.int64)[None]
            elif name.startswith("past_key_values."):
                feeds[name] = (presents[name.replace("past_key_values.", "present.")] if presents is not None
                               else np.zeros(shape, np.float32))
            else:
                raise ValueError(f"{self.name}: no feed rule for input {name!r}")
        return feeds


@cache
def zoo_index() -> dict[str, Any]:
    """tests/zoo/zoo.json."""
    return json.loads((ZOO / "zoo.json").read_text())


def zoo_prompt(name: str) -> list[int]:
    """The prompt in zoo.json of the family of `name` (a family, or a zoo model such as
    "gpt2_a_dynamo"); the generator prefills all of it but the last token, its decode step."""
    family = name.split("_")[0]
    return list(next(f["prompt"] for f in zoo_index()["families"] if f["family"] == family))


def zoo_models() -> list[ZooModel]:
    """Every model the generator made, in zoo.json's order (family, then flavour)."""
    prompts = {f["family"]: tuple(f["prompt"]) for f in zoo_index()["families"]}
    return [ZooModel(r["family"], r["flavour"], ZOO / r["file"], r["precision"], r["exporter"], r["kv"],
                     r["prefill_shapes"], prompts[r["family"]])
            for r in zoo_index()["models"] if r["status"] == "ok"]
