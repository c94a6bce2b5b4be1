"""The committed zoo (tests/zoo) is what zoo.json says: every "ok" record's file exists, is one
self-contained ONNX file, and runs in onnxruntime on its 8-token prompt; no file is unlisted."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from zoo_fixtures import ZOO, ZooModel, zoo_index, zoo_models

MODELS = zoo_models()


def test_zoo_lists_every_file_and_covers_the_matrix() -> None:
    listed = {m.path.name for m in MODELS}
    assert {p.name for p in ZOO.glob("*.onnx")} == listed
    records = zoo_index()["models"]
    cells = {(r["family"], r["flavour"]) for r in records}
    families = {f["family"] for f in zoo_index()["families"]}
    flavours = {r["flavour"] for r in records}
    assert len(cells) == len(records) == len(families) * len(flavours)  # one record per cell, refusals too
    assert all(r["status"] for r in records)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_zoo_model_loads_and_runs(model: ZooModel) -> None:
    proto = onnx.load(str(model.path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == set(model.prefill_shapes)
    feeds = model.prefill_feeds()
    outputs = [o.name for o in session.get_outputs()]
    result = dict(zip(outputs, session.run(outputs, feeds), strict=True))
    logits = result["logits"]
    prompt_len = feeds["input_ids"].shape[1]
    assert logits.shape[:2] == (1, prompt_len) and np.isfinite(logits).all()
    assert len(set(logits[0].argmax(-1).tolist())) > 1  # the tiny models are not degenerate
    if model.kv:
        assert {n.replace("present.", "past_key_values.") for n in outputs if n.startswith("present.")} == {
            n for n in feeds if n.startswith("past_key_values.")}
