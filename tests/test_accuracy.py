"""`cimc generate --accuracy` and `cimc.accuracy`: the simulator's logits against onnxruntime, teacher-forced.

Expected values come from onnxruntime (test_generate's independent greedy loop), from arrays
written by hand, or from the simulator's own prefill over the whole sequence (which must give
the rows the teacher-forced decode steps give); never from an earlier measurement.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import EXAMPLE, shared_model
from test_generate import ort_greedy

import cimc
from cimc.accuracy import compare_logits, measure_accuracy, simulated_logits
from cimc.driver import CompileOptions, compile_model
from isa.diag import CimcError
from runtime.interpreter import Session

PROMPT = [1, 5, 9, 2, 77, 14]
NEW = 12
POSITIONS = len(PROMPT) + NEW - 1  # prefill rows, then one decode step per reference token but the last
KEYS = {"reference", "teacher_forced", "positions", "max_abs_error", "mean_abs_error", "mean_cosine",
        "top1_agreement", "prompt_positions", "reference_tokens", "weights"}


def _model(name: str) -> Path:
    return EXAMPLE if name == "tiny_llama" else shared_model(name)


@pytest.fixture(scope="module")
def measured() -> dict:
    """(model, weights) -> (program, accuracy), compiled and measured once per module; prefill
    takes the whole sequence, so one run can check the teacher-forced rows."""
    cache: dict = {}

    def get(name: str, weights: str = "fp32") -> tuple:
        if (name, weights) not in cache:
            program = compile_model(_model(name), CompileOptions(max_seq=POSITIONS, max_ctx=POSITIONS,
                                                                 weights=weights))
            cache[name, weights] = program, measure_accuracy(program, _model(name), PROMPT, NEW)
        return cache[name, weights]
    return get


@pytest.mark.parametrize("name", ["tiny_llama", "llama_c_optimum_kv"])
def test_float_compile_matches_onnxruntime(name: str, measured) -> None:
    _, acc = measured(name)
    assert set(acc) == KEYS
    assert acc["reference"] == f"{name}.onnx" and acc["teacher_forced"] is True and acc["weights"] == "f32"
    assert acc["positions"] == POSITIONS and acc["prompt_positions"] == len(PROMPT)
    assert acc["reference_tokens"] == ort_greedy(_model(name), PROMPT, NEW)[0]
    assert acc["max_abs_error"] < 1e-4 and acc["mean_abs_error"] <= acc["max_abs_error"]
    assert acc["mean_cosine"] > 0.99999
    assert acc["top1_agreement"] == 1.0


def test_int4_weights_are_measurably_worse(measured) -> None:
    _, fp32 = measured("tiny_llama")
    _, int4 = measured("tiny_llama", "int4")
    assert int4["weights"].startswith("i4")
    assert int4["max_abs_error"] > 100 * fp32["max_abs_error"] and int4["max_abs_error"] > 1e-3
    assert int4["mean_abs_error"] > fp32["mean_abs_error"]
    assert int4["mean_cosine"] < 1.0 and int4["mean_cosine"] < fp32["mean_cosine"]
    assert int4["reference_tokens"] == fp32["reference_tokens"]  # the reference is the float model either way


def test_decode_steps_are_fed_the_reference_tokens(measured) -> None:
    """Teacher forcing: the int4 simulator's own greedy tokens leave onnxruntime's, yet its rows
    are those of one prefill over prompt + reference tokens."""
    program, acc = measured("tiny_llama", "int4")
    tokens = acc["reference_tokens"]
    assert cimc.generate(Session(program), PROMPT, NEW).tokens != tokens
    session = Session(program)
    forced = simulated_logits(session, PROMPT, tokens)
    whole = session.run("prefill", {"input_ids": np.array([PROMPT + tokens[:-1]])}).outputs["logits"][0]
    assert forced.shape == (POSITIONS, program.meta["vocab"])
    assert compare_logits(forced, whole)["max_abs_error"] < 1e-4


def test_compare_logits_on_hand_made_rows() -> None:
    want = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    got = np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 0.5]], np.float32)
    m = compare_logits(got[None], want[None])  # leading axes fold into positions
    assert m["positions"] == 2
    assert m["max_abs_error"] == 1.0 and m["mean_abs_error"] == pytest.approx(2.5 / 6)
    assert m["mean_cosine"] == pytest.approx((0.0 + 4.0 / (2.0 * np.sqrt(4.25))) / 2)
    assert m["top1_agreement"] == 0.5
    same = compare_logits(want, want)
    assert same["max_abs_error"] == 0.0 and same["mean_cosine"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0
    assert compare_logits(-want, want)["mean_cosine"] == pytest.approx(-1.0)
    zeros = np.zeros((1, 3))
    assert compare_logits(zeros, zeros)["mean_cosine"] == 1.0
    assert compare_logits(zeros, want[:1])["mean_cosine"] == 0.0
    with pytest.raises(CimcError, match="cannot be compared"):
        compare_logits(want, want[:1])


def test_python_api_takes_a_session_or_a_program(measured) -> None:
    program, acc = measured("tiny_llama")
    again = cimc.measure_accuracy(Session(program, name="m.cimb"), EXAMPLE, PROMPT, NEW)
    assert again == acc


def test_a_reference_of_another_model_is_refused(measured) -> None:
    program, _ = measured("tiny_llama")
    with pytest.raises(CimcError, match="has a vocabulary of 320 but the binary has 512"):
        measure_accuracy(program, shared_model("llama_a_dynamo"), PROMPT, NEW)


# ---- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example compiled in fp32 to a folder without its source model."""
    from cimc.cli import main

    path = tmp_path_factory.mktemp("acc") / "tiny.cimb"
    assert main(["compile", str(EXAMPLE), "-o", str(path), "--max-seq", "8", "--max-ctx", str(POSITIONS), "-q"]) == 0
    return path


def _generate(cli, model: Path, tmp_path: Path, *extra: object) -> tuple:
    out = tmp_path / "gen.json"
    res = cli("generate", model, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", NEW,
              "--report-json", out, *extra)
    return res, (json.loads(out.read_text()) if res.status == 0 else None)


def _user_error(res, *needles: str) -> None:
    assert res.status == 2 and res.out == "" and "Traceback" not in res.err
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cimc: error: "), res.err
    assert all(n in lines[0] for n in needles), lines[0]


def test_cli_binary_with_explicit_reference(cli, binary: Path, tmp_path: Path) -> None:
    res, report = _generate(cli, binary, tmp_path, "--accuracy", "--reference", EXAMPLE)
    assert res.status == 0, res.err
    acc = report["accuracy"]
    assert set(acc) == KEYS and acc["reference"] == "tiny_llama.onnx" and acc["teacher_forced"] is True
    assert acc["positions"] == POSITIONS and acc["max_abs_error"] < 1e-4 and acc["top1_agreement"] == 1.0
    assert report["tokens"] == acc["reference_tokens"]  # the normal generation still runs
    assert report["decode"]["tokens_per_s"] > 0
    assert "teacher-forced over 17 position(s): top-1 100.0%" in res.out
    assert "greedy tokens identical to onnxruntime's" in res.out


def test_cli_finds_the_recorded_source_next_to_the_binary(cli, binary: Path, tmp_path: Path) -> None:
    here = tmp_path / "here"
    here.mkdir()
    shutil.copy(binary, here / "m.cimb")
    shutil.copy(EXAMPLE, here / EXAMPLE.name)
    res, report = _generate(cli, here / "m.cimb", tmp_path, "--accuracy")
    assert res.status == 0, res.err
    assert report["accuracy"]["reference"] == "tiny_llama.onnx" and report["accuracy"]["max_abs_error"] < 1e-4


def test_cli_onnx_with_int4_weights(cli, tmp_path: Path) -> None:
    res, report = _generate(cli, EXAMPLE, tmp_path, "--weights", "int4", "--accuracy")
    assert res.status == 0, res.err
    acc = report["accuracy"]
    assert acc["weights"].startswith("i4") and acc["max_abs_error"] > 1e-3 and acc["mean_cosine"] < 1.0
    assert "  accuracy    vs onnxruntime (tiny_llama.onnx), teacher-forced" in res.out


@pytest.mark.parametrize(("extra", "needles"), [
    (["--accuracy"], ["tiny.cimb", "'tiny_llama.onnx' is not next to it", "--reference"]),
    (["--accuracy", "--reference", "missing.onnx"], ["--reference missing.onnx: no such file"]),
    (["--accuracy", "--no-numerics"], ["--accuracy", "--no-numerics"]),
    (["--reference", str(EXAMPLE)], ["--reference", "add --accuracy"]),
])
def test_cli_errors(cli, binary: Path, tmp_path: Path, extra: list[str], needles: list[str]) -> None:
    res, _ = _generate(cli, binary, tmp_path, *extra)
    _user_error(res, *needles)
    assert not (tmp_path / "gen.json").exists()
