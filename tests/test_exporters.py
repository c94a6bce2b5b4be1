"""Llama-style exports beyond dynamo-without-cache and optimum (issue 9, exporters): the torch
dynamo export with a KV cache, the TorchScript exporter, and the onnxruntime-genai builder's fp32
graph compile, generate 8 tokens and match onnxruntime on the same zoo file; the roles the
frontend gives their mask and position inputs are found from the graph."""

from __future__ import annotations

import pytest
from zoo_fixtures import ZOO, zoo_index

from cimc.accuracy import measure_accuracy
from cimc.driver import CompileOptions, compile_model
from cimc.frontend import open_model
from cimc.frontend.fold import find_roles
from runtime.generate import generate
from runtime.interpreter import Session

NEW = 8
#: issue 9's bar for fp32 cells: greedy ids equal, logits within 1e-4 of onnxruntime's.
TOL = 1e-4
FAMILIES = ("llama", "smollm", "qwen2")


def _prompt(name: str) -> list[int]:
    """The family's prompt from zoo.json (its prefill tokens)."""
    family = name.split("_")[0]
    record = next(f for f in zoo_index()["families"] if f["family"] == family)
    model = next(m for m in zoo_index()["models"] if m["file"] == f"{name}.onnx")
    return list(record["prompt"][:model["prefill_shapes"]["input_ids"][1]])


def _check_cell(name: str) -> None:
    path = ZOO / f"{name}.onnx"
    prompt = _prompt(name)
    program = compile_model(path, CompileOptions(max_seq=len(prompt), max_ctx=len(prompt) + NEW))
    acc = measure_accuracy(program, path, prompt, NEW)
    assert acc["top1_agreement"] == 1.0 and acc["max_abs_error"] <= TOL, acc
    assert generate(Session(program), prompt, NEW).tokens == acc["reference_tokens"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamo_export_with_a_kv_cache_matches_onnxruntime(family: str) -> None:
    """Its mask [1, total] spans the cache and the new tokens: no --dim total=N needed."""
    _check_cell(f"{family}_b_dynamo_kv")


@pytest.mark.parametrize(("name", "assumed", "ctx"), [
    ("llama_b_dynamo_kv", {"attention_mask": "ones", "position_ids": "positions"}, {"total"}),
    ("llama_c_optimum_kv", {"attention_mask": "ones", "position_ids": "positions"}, set()),
    ("llama_t_torchscript", {"attention_mask": "ones"}, set()),
    ("llama_g_genai_fp32", {"attention_mask": "ones"}, {"total_sequence_length"}),
])
def test_mask_and_positions_are_told_apart_by_their_use(name: str, assumed: dict, ctx: set) -> None:
    """An integer input that computes RoPE angles is positions, any other a mask; the TorchScript
    mask has the token count's symbol, dynamo's a symbol of its own that spans the context."""
    model, _ = open_model(ZOO / f"{name}.onnx")
    roles = find_roles(model)
    assert roles.assumed == assumed and roles.ctx_params == ctx
