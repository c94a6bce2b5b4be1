"""Autoregressive generation: prefill + decode with the KV cache, against onnxruntime greedy loops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from model_fixtures import SHARED_MODELS
from model_fixtures import shared_model as shared

from cimc.cli import main
from cimc.driver import CompileOptions, compile_model
from isa.binary import read_binary, write_binary
from isa.diag import CimcError
from runtime.generate import generate
from runtime.interpreter import Session

SHARED = SHARED_MODELS
PROMPT = [1, 5, 9, 2, 77, 14]
NEW = 32
FLOAT_MODELS = ["llama_a_dynamo", "qwen2_a_dynamo", "llama_c_optimum_kv", "qwen2_c_optimum_kv"]


def ort_greedy(path: Path, prompt: list[int], new: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding driven by onnxruntime: with the model's own KV cache when it has one."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    past_names = [n for n in names if n.startswith("past_key_values")]
    tokens, logits = [], []
    if not past_names:
        ids = list(prompt)
        for _ in range(new):
            out = sess.run(["logits"], {"input_ids": np.array([ids], np.int64)})[0][0, -1]
            logits.append(out)
            tokens.append(int(np.argmax(out)))
            ids.append(tokens[-1])
        return tokens, logits
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    past = {n: np.zeros((1, shapes[n][1], 0, shapes[n][3]), np.float32) for n in past_names}
    step_ids, done = list(prompt), 0
    outputs = [o.name for o in sess.get_outputs()]
    for _ in range(new):
        feeds = {"input_ids": np.array([step_ids], np.int64),
                 "attention_mask": np.ones((1, done + len(step_ids)), np.int64),
                 "position_ids": np.arange(done, done + len(step_ids), dtype=np.int64)[None], **past}
        res = dict(zip(outputs, sess.run(outputs, feeds), strict=True))
        logits.append(res["logits"][0, -1])
        tokens.append(int(np.argmax(logits[-1])))
        past = {n: res[n.replace("past_key_values", "present")] for n in past_names}
        done += len(step_ids)
        step_ids = [tokens[-1]]
    return tokens, logits


@pytest.fixture(scope="module")
def programs() -> dict:
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = compile_model(shared(name), CompileOptions(max_seq=8, max_ctx=len(PROMPT) + NEW))
        return cache[name]
    return get


@pytest.fixture(scope="module")
def llama_binary(programs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama_a_dynamo compiled by `programs`, written to a file."""
    binary = tmp_path_factory.mktemp("gen") / "m.cimb"
    write_binary(binary, programs("llama_a_dynamo"))
    return binary


@pytest.mark.parametrize("name", FLOAT_MODELS)
def test_greedy_generation_matches_onnxruntime(name: str, programs) -> None:
    program = programs(name)
    gen = generate(Session(program), PROMPT, NEW)
    ref_tokens, ref_logits = ort_greedy(shared(name), PROMPT, NEW)
    assert gen.tokens == ref_tokens
    for step, (run, want) in enumerate(zip(gen.runs, ref_logits, strict=True)):
        err = float(np.abs(run.outputs["logits"][0, -1] - want).max())
        assert err <= 1e-4, f"step {step}: max |logits - onnxruntime| = {err:.3g}"
    assert [r.report["entry"] for r in gen.runs] == ["prefill"] + ["decode"] * (NEW - 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_both_model_forms_give_the_same_tokens(arch: str, programs) -> None:
    """cimc's own cache (dynamo export) and the export's cache (optimum) agree."""
    a = generate(Session(programs(f"{arch}_a_dynamo")), PROMPT, 12).tokens
    c = generate(Session(programs(f"{arch}_c_optimum_kv")), PROMPT, 12).tokens
    assert a == c


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_npz_decode_step_reproduces_with_past_tensors(arch: str, programs) -> None:
    name = f"{arch}_c_optimum_kv"
    data = np.load(SHARED / f"{name}.npz")
    program = programs(name)
    session = Session(program)
    first = session.run("prefill", {k[6:]: data[k] for k in data if k.startswith("input.")})
    for key, got in first.outputs.items():
        assert np.abs(got - data[f"output.{key}"]).max() <= 1e-4, key
    step = {k[12:]: data[k] for k in data if k.startswith("step2.input.")}
    second = Session(program).run("decode", step)  # past KV from the inputs, on a fresh machine
    assert set(second.outputs) == {k[13:] for k in data if k.startswith("step2.output.")}
    for key, got in second.outputs.items():
        assert got.shape == data[f"step2.output.{key}"].shape
        assert np.abs(got - data[f"step2.output.{key}"]).max() <= 1e-4, key


def test_assumed_inputs_are_checked(programs) -> None:
    program = programs("llama_c_optimum_kv")
    data = np.load(SHARED / "llama_c_optimum_kv.npz")
    inputs = {k[6:]: data[k] for k in data if k.startswith("input.")}
    bad_mask = dict(inputs, attention_mask=np.zeros_like(inputs["attention_mask"]))
    with pytest.raises(CimcError, match="'attention_mask' must be all ones"):
        Session(program).run("prefill", bad_mask)
    bad_pos = dict(inputs, position_ids=inputs["position_ids"] + 3)
    with pytest.raises(CimcError, match=r"'position_ids' must be 0\.\.7"):
        Session(program).run("prefill", bad_pos)


def test_decode_cannot_read_cache_positions_no_run_wrote(programs) -> None:
    """Without past key/value inputs, a run may only attend to positions earlier runs cached."""
    session = Session(programs("llama_a_dynamo"))
    one = {"input_ids": np.array([[3]], dtype=np.int64)}
    with pytest.raises(CimcError, match="past=4, but the KV cache holds 0 positions"):
        session.run("decode", one, past=4)
    session.run("prefill", {"input_ids": np.array([PROMPT[:4]], dtype=np.int64)})
    session.run("decode", one, past=4)
    with pytest.raises(CimcError, match="past=6, but the KV cache holds 5 positions"):
        session.run("decode", one, past=6)


def test_report_has_the_decode_figures(programs) -> None:
    program = programs("llama_a_dynamo")
    r = generate(Session(program), PROMPT, 6).report
    d, b = r["decode"], r["bounds"]
    assert r["ttft_s"] > 0 and r["new_tokens"] == 6 and len(r["steps"]) == 5
    assert d["tokens_per_s"] == pytest.approx(5 / d["seconds"]) and d["tokens_per_j"] == pytest.approx(5 / d["joules"])
    assert set(d["energy_per_token_pj"]) == {"dram", "macro_write", "mvm", "sfu", "buffer", "noc", "leakage"}
    by = d["dram_bytes_per_token"]
    assert by["weights"] > 0 and by["kv_cache"] > 0 and by["code"] > 0
    assert by["total"] == pytest.approx(sum(v for k, v in by.items() if k != "total"))
    # the independent bound: never above what the simulation moved, kind by kind
    least = b["min_dram_bytes_per_token_by_kind"]
    assert least["weights"] > 0 and all(by[k] >= v for k, v in least.items())
    assert b["min_dram_bytes_per_token"] == pytest.approx(sum(least.values()))
    assert b["min_dram_bytes_per_token"] <= by["total"]
    assert 0 < b["fraction_of_dram_bound"] <= 1.0 and 0 < b["fraction_of_bound"] <= 1.0
    limit = min(b["dram_bound_tokens_per_s"], b["compute_bound_tokens_per_s"])
    assert b[f"{b['limited_by']}_bound_tokens_per_s"] == limit
    one = generate(Session(program), PROMPT, 1).report
    assert one["decode"] is None and one["bounds"] is None and len(one["tokens"]) == 1
    assert b["dram_bound_tokens_per_s"] == pytest.approx(b["dram_bandwidth_gbps"] * 1e9 / b["min_dram_bytes_per_token"])
    # the cache grows: later decode steps read more KV bytes, so they cost at least as much
    cycles = [s["cycles"] for s in r["steps"]]
    assert cycles[-1] >= cycles[0]


@pytest.mark.parametrize(("prompt", "new", "message"), [
    ([], 4, "the prompt is empty"),
    ([1, 999], 4, "prompt token 1 is 999, outside the vocabulary"),
    ([1, 2], 0, "--max-new-tokens must be at least 1"),
    ([1, 2], 100, "need 101 cached positions; this program holds 38"),
    (list(range(9)), 2, "the prompt has 9 tokens; this program takes at most 8"),
])
def test_bad_requests(prompt, new, message, programs) -> None:
    with pytest.raises(CimcError, match=message):
        generate(Session(programs("llama_a_dynamo")), prompt, new)


def test_binary_without_decode_program(programs) -> None:
    program = programs("llama_a_dynamo")
    program = type(program)(program.entries[:1], program.dram, program.hw, program.hw_fingerprint, program.meta)
    with pytest.raises(CimcError, match="has no prefill and decode programs"):
        generate(Session(program), PROMPT, 2)


def test_binary_without_kv_cache_is_refused() -> None:
    """Without insert-kv-cache each entry attends only to its own rows: decode would be wrong."""
    pipeline = "lift-idioms,tile-partition,place-weights,schedule,balance-stages"
    with pytest.raises(CimcError, match="missing insert-kv-cache"):
        compile_model(shared("llama_a_dynamo"), CompileOptions(max_seq=8, pipeline=pipeline))


def test_cli_generate_from_onnx_and_binary(tmp_path: Path, capsys) -> None:
    model = shared("llama_a_dynamo")
    out = tmp_path / "gen.json"
    trace = tmp_path / "gen.trace.json"
    assert main(["generate", str(model), "--prompt-ids", "1,5,9,2", "--max-new-tokens", "5",
                 "--report-json", str(out), "--trace", str(trace)]) == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "time to first token" in text and "bounds" in text
    report = json.loads(out.read_text())
    ref, _ = ort_greedy(model, [1, 5, 9, 2], 5)
    assert report["tokens"] == ref
    events = json.loads(trace.read_text())["traceEvents"]
    tracks = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"dram0", "dram7", "bus.down", "gbuf.rd", "runs"} <= tracks  # a track per DRAM channel
    assert any(t.startswith("tile") for t in tracks) and any(t.startswith("sfu") for t in tracks)
    binary = tmp_path / "m.cimb"
    assert main(["compile", str(model), "-o", str(binary), "--max-seq", "8", "--max-ctx", "16", "-q"]) == 0
    assert main(["generate", str(binary), "--prompt-ids", "1,5,9,2", "--max-new-tokens", "5", "-q"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in ref]


@pytest.mark.parametrize(("args", "message"), [
    (["--prompt-ids", "1,x"], "expected comma-separated token ids"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "40"], "cached positions"),
    (["--prompt-ids", "5000"], "outside the vocabulary"),
])
def test_cli_generate_errors(args: list[str], message: str, llama_binary: Path, capsys) -> None:
    binary = llama_binary
    assert main(["generate", str(binary), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cimc: error: ") and message in err and "Traceback" not in err
    assert read_binary(binary).entry("decode").n_instrs > 0
