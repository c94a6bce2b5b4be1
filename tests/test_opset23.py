"""Opset-23 operators exporters emit: RMSNormalization compiled from a tiny graph, simulated and
compared with onnxruntime on the same file; the forms cimc does not take are refused with the
reason, naming the node."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from graph_fixtures import matches_onnxruntime, refusals, xy_model
from onnx import helper

from cimc.frontend import import_onnx

D = 16


def rms_model(path: Path, **attrs: object) -> Path:
    """x [1, seq, D] -> RMSNormalization(x, scale) -> y, at opset 23."""
    scale = np.random.default_rng(0).uniform(0.5, 1.5, D).astype(np.float32)
    node = helper.make_node("RMSNormalization", ["x", "scale"], ["y"], name="rms", **attrs)
    return xy_model(path, [node], {"scale": scale}, cols=D, opset=23)


@pytest.mark.parametrize("attrs", [{}, {"epsilon": 0.3, "axis": 2}])
def test_rms_normalization_matches_onnxruntime(attrs: dict, tmp_path: Path) -> None:
    """A large epsilon shows whether it is honoured."""
    path = rms_model(tmp_path / "rms.onnx", **attrs)
    module, _ = import_onnx(path, max_seq=8)
    assert [op.attrs["eps"] for op in module.walk("rms_norm")] == [pytest.approx(attrs.get("epsilon", 1e-5))]
    matches_onnxruntime(path, np.random.default_rng(1).standard_normal((1, 5, D)).astype(np.float32))


@pytest.mark.parametrize(("attrs", "needle"), [({"axis": 1}, "axis=1"), ({"stash_type": 10}, "stash_type=10")])
def test_rms_normalization_forms_not_taken_are_refused(attrs: dict, needle: str, tmp_path: Path) -> None:
    reasons = refusals(rms_model(tmp_path / "rms.onnx", **attrs))
    assert list(reasons) == ["rms"] and needle in reasons["rms"], reasons
