"""Gemma2's onnxruntime-genai exports: a sliding-window layer's past and present are buffers of
`local_window_size` L slots (`past_sliding_length`, GroupQueryAttention `sliding_window_cache=1`)
holding the last L positions, fed as L zero slots before the first run (measured: an onnxruntime
loop fed so matches the onnxruntime-genai 0.18 runtime's logits on this model within 4e-7). cimc
keeps the layer's whole cache and masks it to the window; its presents are the buffers the export
promises, its pasts are read as such, and decoding past the window (9 + 8 positions > 4) matches
onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from zoo_fixtures import ZOO, zoo_index

from cimc.accuracy import measure_accuracy
from cimc.driver import CompileOptions, compile_model
from cimc.frontend import import_onnx
from cimc.frontend.ops import contrib_attention
from runtime.generate import generate
from runtime.interpreter import Session

FP32 = ZOO / "gemma2_g_genai_fp32.onnx"
NEW = 8
WINDOW = 4
#: docs/matrix.md's bars: fp32 logits within 1e-4; int4 at a mean cosine of 0.999 (cimc reproduces
#: MatMulNBits, so the int4 cell is held to the fp32 bar here too).
TOL = 1e-4
OPTIONS = CompileOptions(max_seq=16, max_ctx=32)


def _prompt() -> list[int]:
    return list(next(f["prompt"] for f in zoo_index()["families"] if f["family"] == "gemma2"))


@pytest.fixture(scope="module")
def fp32_program():
    return compile_model(FP32, OPTIONS)


class OrtLoop:
    """onnxruntime on the export, its presents fed back as the next past (L zero slots first)."""

    def __init__(self, path: Path) -> None:
        self.sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.pasts = [i.name for i in self.sess.get_inputs() if i.name.startswith("past_key_values")]

    def empty(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, 2, WINDOW if n.startswith("past_key_values.0.") else 0, 16), np.float32)
                for n in self.pasts}

    def run(self, ids: list[int], done: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, done + len(ids)), np.int64)}
        return dict(zip(self.outputs, self.sess.run(self.outputs, feeds | past), strict=True))

    def next_past(self, res: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: res[n.replace("past_key_values", "present")] for n in self.pasts}


def _presents(res: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in res.items() if k.startswith("present.")}


@pytest.mark.parametrize("name", ["gemma2_g_genai_fp32", "gemma2_d_genai_int4"])
def test_gemma2_genai_cells_match_onnxruntime(name: str) -> None:
    """Layer 0 attends through a window of 4 with a soft cap of 0.5, layer 1 over everything; a
    9-token prompt and 8 new tokens decode well past the window."""
    path = ZOO / f"{name}.onnx"
    module, _ = import_onnx(path, max_seq=16, max_ctx=32)
    assert [(op.attrs.get("window", 0), op.attrs.get("softcap")) for op in module.walk("attention")] == \
        [(WINDOW, 0.5), (0, 0.5)]
    program = compile_model(path, OPTIONS)
    prompt = _prompt()
    acc = measure_accuracy(program, path, prompt, NEW)
    assert acc["top1_agreement"] == 1.0 and acc["max_abs_error"] <= TOL, acc
    assert generate(Session(program), prompt, NEW).tokens == acc["reference_tokens"]


def test_the_window_bites(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled without the window (the soft cap kept), the same file misses onnxruntime by far."""
    monkeypatch.setattr(contrib_attention, "window_and_softcap",
                        lambda node: {"softcap": float(np.float32(node.attrs["softcap"]))})
    acc = measure_accuracy(compile_model(FP32, OPTIONS), FP32, _prompt(), NEW)
    assert acc["max_abs_error"] > 100 * TOL, acc


@pytest.mark.parametrize("prompt_len", [2, 9])
def test_presents_are_the_exports_window_buffers(fp32_program, prompt_len: int) -> None:
    """After the prompt and after each decode step the window layer's presents are onnxruntime's
    L slots (the last L positions, oldest first); while fewer than L positions are cached only the
    first ones are defined (onnxruntime leaves the rest undefined, cimc zeros them). The full
    layer's presents are the whole context."""
    ids = [*_prompt()[:prompt_len], 50, 60, 70, 80, 90, 100]
    ref, session = OrtLoop(FP32), Session(fp32_program)
    past, done = ref.empty(), 0
    steps = [ids[:prompt_len], *([t] for t in ids[prompt_len:])]
    for step in steps:
        want = ref.run(step, done, past)
        got = session.run("prefill" if not done else "decode", {"input_ids": np.array([step], np.int64)},
                          past=done).outputs
        done += len(step)
        for name, w in _presents(want).items():
            g = got[name]
            assert g.shape == w.shape, name
            valid = min(done, WINDOW) if name.startswith("present.0.") else done
            assert np.abs(g[:, :, :valid] - w[:, :, :valid]).max() <= 1e-5, (name, done)
            assert not g[:, :, valid:].any()
        assert np.abs(got["logits"][0, -1] - want["logits"][0, -1]).max() <= TOL
        past = ref.next_past(want)


@pytest.mark.parametrize("prompt_len", [2, 9])
def test_window_buffers_given_as_past_are_read_as_the_last_positions(fp32_program, prompt_len: int) -> None:
    """A fresh machine given onnxruntime's presents as the past (the undefined slots of a short
    buffer poisoned with NaN) continues like onnxruntime, past the window."""
    prompt = _prompt()[:prompt_len]
    ref = OrtLoop(FP32)
    first = ref.run(prompt, 0, ref.empty())
    past = ref.next_past(first)
    for n in past:
        if n.startswith("past_key_values.0."):
            past[n][:, :, prompt_len:] = np.nan
    session, done = Session(fp32_program), prompt_len
    for token in (50, 60, 70, 80, 90):
        want = ref.run([token], done, past)
        got = session.run("decode", {"input_ids": np.array([[token]], np.int64), **past}).outputs
        assert np.abs(got["logits"] - want["logits"]).max() <= TOL, done
        done += 1
        past = {n: got[n.replace("past_key_values", "present")] for n in past}


def _edited(tmp_path: Path, **attrs: object) -> tuple[Path, str]:
    model = onnx.load(str(FP32))
    node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
    kept = [a for a in node.attribute if a.name not in attrs]
    del node.attribute[:]
    node.attribute.extend([*kept, *(onnx.helper.make_attribute(k, v) for k, v in attrs.items())])
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path, node.name


@pytest.mark.parametrize(("attrs", "needle"), [
    ({"local_window_size": -1}, "sliding_window_cache=1 with local_window_size=-1"),
    ({"sliding_window_cache": 2}, "sliding_window_cache=2"),
])
def test_a_window_buffer_without_a_window_is_refused(attrs: dict, needle: str, cli, tmp_path: Path) -> None:
    path, node = _edited(tmp_path, **attrs)
    res = cli("compile", path, "-o", tmp_path / "x.cimb", "-q", "--max-seq", "8")
    assert res.status == 2 and "internal error" not in res.err
    lines = [line for line in res.err.splitlines() if node in line]
    assert len(lines) == 1 and needle in lines[0], res.err
