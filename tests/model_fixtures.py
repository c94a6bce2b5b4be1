"""Shared test data: where the repository, the bundled example and the shared model zoo live,
and onnxruntime as the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny_llama.onnx"
#: The shared model zoo sits beside the clone (also in CI): <repo>/../shared/models.
SHARED_MODELS = REPO.parent / "shared" / "models"


def shared_model(name: str, *, with_npz: bool = False) -> Path:
    """`<name>.onnx` of the shared zoo (and its reference .npz, with `with_npz`); skips the test
    when it is not there."""
    path = SHARED_MODELS / f"{name}.onnx"
    if not path.is_file() or (with_npz and not path.with_suffix(".npz").is_file()):
        pytest.skip(f"shared model {path}{' (or its .npz)' if with_npz else ''} is not available")
    return path


def ort_logits(path: Path, feeds: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
    """onnxruntime's `logits` for token ids (an array) or for a dict of inputs."""
    if isinstance(feeds, np.ndarray):
        feeds = {"input_ids": feeds.astype(np.int64)}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


def max_err(got: np.ndarray, want: np.ndarray) -> float:
    """Max abs difference (in float64) of two same-shaped arrays; `got` must be finite."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


def cosine_error(got: np.ndarray, want: np.ndarray) -> float:
    """1 - mean cosine similarity (in float64) of the last-axis rows of two same-shaped arrays
    (logit rows); `got` must be finite."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    a = got.reshape(-1, got.shape[-1]).astype(np.float64)
    b = want.reshape(-1, want.shape[-1]).astype(np.float64)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(1.0 - cos.mean())
