"""Weight-free models from a Hugging Face config.json (`cimc.hfconfig`, `cimc estimate --hf-config`).

The equivalence tests compile a zoo family's dynamo export (tests/zoo/<family>_a_dynamo.onnx,
whose IR the config's is built to equal; it has no KV cache, insert-kv-cache adds it as for
the config) and the same family's config.json with the same options, and price prefill and
decode without numerics: every figure of the two reports must be equal, exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from model_fixtures import REPO
from test_cli import assert_user_error
from zoo_fixtures import ZOO, zoo_prompt

from cimc.driver import CompileOptions, compile_module, load_module
from cimc.hfconfig import FAMILIES, HFConfigError, read_config
from isa.binary import write_binary
from isa.diag import CimcError
from runtime.generate import generate
from runtime.interpreter import Session

CONFIGS = sorted(p.parent.name for p in (ZOO / "configs").glob("*/config.json"))
EXAMPLES = sorted((REPO / "examples" / "configs").glob("*.json"))
NEW_TOKENS = 3


def _price(path: Path, opts: CompileOptions) -> dict:
    """The report of `cimc generate --no-numerics` for a model or config (the prompt's ids do not
    matter without numerics)."""
    module, weights = load_module(path, opts)
    assert weights is not None
    program, _ = compile_module(module, weights, opts)
    return generate(Session(program, opts.hw), [0] * opts.max_seq, NEW_TOKENS, numerics=False).report


def test_every_zoo_family_has_a_config() -> None:
    families = {p.name.split("_")[0] for p in ZOO.glob("*_a_dynamo.onnx")}
    assert families == set(CONFIGS)
    assert {read_config(ZOO / "configs" / f / "config.json").model_type for f in CONFIGS} <= set(FAMILIES)


@pytest.mark.parametrize("weights", ["fp32", "int4"])
@pytest.mark.parametrize("family", CONFIGS)
def test_config_prices_exactly_as_the_export(family: str, weights: str) -> None:
    prompt = len(zoo_prompt(family)) - 1
    opts = CompileOptions(max_seq=prompt, max_ctx=prompt + NEW_TOKENS - 1, weights=weights)
    export = _price(ZOO / f"{family}_a_dynamo.onnx", opts)
    config = _price(ZOO / "configs" / family / "config.json", opts)
    assert config["prefill"] == export["prefill"]  # cycles, seconds, joules, energy by unit, DRAM bytes
    assert config["steps"] == export["steps"] and len(export["steps"]) == NEW_TOKENS - 1
    assert config["decode"] == export["decode"]
    assert {k: v for k, v in config.items() if k != "model"} == {k: v for k, v in export.items() if k != "model"}


def test_numerics_and_binaries_are_refused(tmp_path: Path) -> None:
    path = ZOO / "configs" / "llama" / "config.json"
    opts = CompileOptions(max_seq=4)
    module, weights = load_module(path, opts)
    assert weights is not None
    program, _ = compile_module(module, weights, opts)
    assert program.meta["weight_free"]
    with pytest.raises(CimcError, match=r"without weights.*not run with numerics"):
        Session(program, opts.hw).run("prefill", {"input_ids": [[1, 2]]})
    with pytest.raises(CimcError, match=rf"{re.escape(str(path))}.*without weights.*has no data"):
        write_binary(tmp_path / "x.cimb", program)
    assert not (tmp_path / "x.cimb").exists()


def _write(tmp_path: Path, **changes: object) -> Path:
    d = json.loads((ZOO / "configs" / "qwen3" / "config.json").read_text())
    d.update(changes)
    for k in [k for k, v in changes.items() if v is ...]:
        del d[k]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize(("changes", "needle"), [
    ({"model_type": "bert"}, "model_type: 'bert' is not supported (supported: gemma,"),
    ({"hidden_size": ...}, "missing key 'hidden_size'"),
    ({"num_attention_heads": 0}, "num_attention_heads: expected a positive integer, got 0"),
    ({"num_key_value_heads": 3}, "num_key_value_heads: 3 KV heads do not divide the 4 attention heads"),
    ({"hidden_act": "relu"}, "hidden_act: 'relu' is not an activation qwen3 MLPs are built with"),
    ({"layer_types": ["full_attention"]}, "layer_types: expected 2 entries of full_attention or sliding_attention"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps: expected a non-negative number, got 'small'"),
])
def test_bad_config_is_one_located_error(tmp_path: Path, changes: dict, needle: str) -> None:
    path = _write(tmp_path, **changes)
    with pytest.raises(HFConfigError) as e:
        read_config(path)
    assert str(e.value).startswith(f"{path}: ") and needle in str(e.value), str(e.value)


def test_estimate_cli_gives_the_report_of_generate_no_numerics(cli, tmp_path: Path) -> None:
    ids = ",".join(map(str, zoo_prompt("qwen3")[:-1]))
    n = len(ids.split(","))
    a, b = tmp_path / "estimate.json", tmp_path / "generate.json"
    res = cli("estimate", "--hf-config", ZOO / "configs" / "qwen3" / "config.json", "--weights", "int4",
              "--prompt", n, "--new-tokens", NEW_TOKENS, "--report-json", a)
    assert res.status == 0, res.err
    assert "qwen3 on edgecim-65nm" in res.out and "tokens/s" in res.out
    res = cli("generate", ZOO / "qwen3_a_dynamo.onnx", "--prompt-ids", ids, "--max-new-tokens", NEW_TOKENS,
              "--weights", "int4", "--no-numerics", "--report-json", b, "-q")
    assert res.status == 0, res.err
    est, gen = json.loads(a.read_text()), json.loads(b.read_text())
    assert est.keys() == gen.keys()
    assert {k: v for k, v in est.items() if k != "model"} == {k: v for k, v in gen.items() if k != "model"}


@pytest.mark.parametrize(("argv", "needles"), [
    ([], ["give a model .onnx or --hf-config CONFIG.json"]),
    (["--hf-config", "c.yaml"], ["--hf-config c.yaml: expected a Hugging Face config.json"]),
    (["--hf-config", "missing.json"], ["missing.json: cannot read"]),
    (["--hf-config", "{llama}", "--prompt", "0"], ["--prompt 0: expected a positive number of tokens"]),
    (["--hf-config", "{llama}", "--dim", "x=2"], ["config.json: --dim applies when lifting an .onnx"]),
    (["--hf-config", "{bad}"], ["model_type: 'bert' is not supported"]),
])
def test_estimate_cli_errors(cli, tmp_path: Path, argv: list[str], needles: list[str]) -> None:
    paths = {"{llama}": str(ZOO / "configs" / "llama" / "config.json"),
             "{bad}": str(_write(tmp_path, model_type="bert"))}
    assert_user_error(cli("estimate", *[paths.get(a, a) for a in argv]), needles)


def test_generate_with_numerics_on_a_config_is_refused(cli) -> None:
    res = cli("generate", ZOO / "configs" / "llama" / "config.json", "--prompt-ids", "1,2", "--max-new-tokens", 2,
              "-q")
    assert_user_error(res, ["without weights", "not run with numerics"])


def test_example_configs_are_the_twelve_edgecim_slms() -> None:
    assert len(EXAMPLES) == 12
    readme = (REPO / "examples" / "configs" / "README.md").read_text()
    for path in EXAMPLES:
        arch = read_config(path)
        assert arch.name == path.stem and f"`{path.name}`" in readme


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_builds_ir(path: Path) -> None:
    arch = read_config(path)
    module, _ = load_module(path, CompileOptions(max_seq=4, max_ctx=8))
    attention = list(module.walk("attention"))
    assert len(attention) == arch.layers
    assert {(op.attrs["heads"], op.attrs["kv_heads"], op.attrs["head_dim"]) for op in attention} == \
        {(arch.heads, arch.kv_heads, arch.head_dim)}
    assert len(list(module.walk("rope"))) == 2 * sum(arch.rope_layers)
    linears = sum(1 for _ in module.walk("linear"))
    assert linears == 7 * arch.layers + 1


def test_one_example_config_compiles_and_prices(cli, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = cli("estimate", "--hf-config", REPO / "examples" / "configs" / "qwen2.5-0.5b.json", "--weights", "int4",
              "--prompt", 8, "--new-tokens", 2, "--report-json", out, "-q")
    assert res.status == 0, res.err
    report = json.loads(out.read_text())
    assert report["model"] == "qwen2.5-0.5b" and report["decode"]["tokens_per_s"] > 0
