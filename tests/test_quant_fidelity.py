"""Fidelity targets of INT8/INT4 compilation, against onnxruntime's own quantizers run live.

On each shared float model and its reference prompt (the .npz inputs, one prefill), the logits
error is 1 - mean cosine similarity of the logit rows against the fp32 onnxruntime logits:

- cimc W8A8 per channel (`weights="int8", group_size=0, act="int8"`) is at most 1.5x the error
  of `onnxruntime.quantization.quantize_dynamic` (default options) on the same model;
- cimc W4 group 32 with int8 activations (`weights="int4", group_size=32, act="int8"`) is at most
  2x the error of `MatMulNBitsQuantizer` (default weight-only config: RTN, block 32, symmetric,
  accuracy_level 0) on the same model.

Both onnxruntime-quantized models are written to a temporary folder and run by onnxruntime here;
nothing is compared with an earlier result.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_fixtures import cosine_error, max_err, ort_logits, shared_model
from onnx import helper, numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits
from onnxruntime.quantization import quantize_dynamic

from cimc.driver import CompileOptions, compile_model
from runtime.interpreter import Session

MODELS = ["llama_a_dynamo", "qwen2_a_dynamo", "llama_c_optimum_kv", "qwen2_c_optimum_kv"]
W8_RATIO = 1.5  # cimc W8A8 error / quantize_dynamic error, at most
W4_RATIO = 2.0  # cimc W4A8 error / MatMulNBitsQuantizer error, at most
BLOCK = 32
#: `MatMulNBitsQuantizer` imports onnx_ir, which onnxruntime does not depend on.
HAVE_ONNX_IR = importlib.util.find_spec("onnx_ir") is not None
CIMC_MODES = {
    "fp32": {},
    "w8a8": {"weights": "int8", "group_size": 0, "act": "int8"},
    "w4a8": {"weights": "int4", "group_size": BLOCK, "act": "int8"},
}


@dataclass
class Fidelity:
    """One model's logits errors (1 - mean cosine vs fp32 onnxruntime) and cimc's logits."""

    name: str
    ort_w8a8: float  # quantize_dynamic
    ort_w4: float  # MatMulNBitsQuantizer
    cimc: dict[str, float]  # by CIMC_MODES key
    logits: dict[str, np.ndarray]  # cimc's, by CIMC_MODES key

    def line(self) -> str:
        """All measured numbers, for assertion messages."""
        return (f"{self.name}: cimc fp32 {self.cimc['fp32']:.3e}, cimc W8A8 {self.cimc['w8a8']:.3e} vs "
                f"ort quantize_dynamic {self.ort_w8a8:.3e} (ratio {self.cimc['w8a8'] / self.ort_w8a8:.2f}), "
                f"cimc W4A8 g{BLOCK} {self.cimc['w4a8']:.3e} vs ort MatMulNBits {self.ort_w4:.3e} "
                f"(ratio {self.cimc['w4a8'] / self.ort_w4:.2f})")


def npz_feeds(path: Path) -> dict[str, np.ndarray]:
    """The reference prompt's inputs (prefill) from the model's .npz."""
    data = np.load(path.with_suffix(".npz"))
    return {key[len("input."):]: data[key] for key in data if key.startswith("input.")}


def nbits_by_kernel(model: onnx.ModelProto) -> onnx.ModelProto:
    """What `MatMulNBitsQuantizer(bits=4, block_size=BLOCK, is_symmetric=True, accuracy_level=0)`
    makes of a model with 2-D MatMul weights, without onnx_ir: every MatMul with an initializer B
    becomes a MatMulNBits whose weights come from the same onnxruntime kernel (quantize_matmul_4bits)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, made = [], {}
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2:
            nodes.append(node)
            continue
        k, n = w.dims
        if w.name not in made:
            blocks = -(-k // BLOCK)
            padded = np.zeros((blocks * BLOCK, n), np.float32)
            padded[:k] = numpy_helper.to_array(w)
            packed = np.zeros((n, blocks, BLOCK // 2), np.uint8)
            scales = np.zeros((n, blocks), np.float32)
            zero = np.zeros((n, (blocks + 1) // 2), np.uint8)
            quantize_matmul_4bits(packed, padded, scales, zero, BLOCK, n, k, True)
            made[w.name] = [numpy_helper.from_array(packed, f"{w.name}_Q4"),
                            numpy_helper.from_array(scales, f"{w.name}_scales")]
        q, s = made[w.name]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], q.name, s.name], list(node.output),
                                      name=f"{node.name}_Q4" if node.name else "", domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=BLOCK))
    used = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("initializer")
    graph.initializer.extend(kept + [t for pair in made.values() for t in pair])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def ort_w4_model(src: Path, dst: Path, *, kernel: bool = not HAVE_ONNX_IR) -> Path:
    """`src` quantized by onnxruntime's MatMulNBitsQuantizer (RTN, block 32, symmetric,
    accuracy_level 0), written to `dst`; `kernel`: by `nbits_by_kernel` instead (no onnx_ir)."""
    model = onnx.load(str(src))  # external data (.onnx.data beside src) loaded into the protos
    if kernel:
        onnx.save_model(nbits_by_kernel(model), str(dst))
        return dst
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=0, bits=4)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


def ort_w8a8_model(src: Path, dst: Path) -> Path:
    """`src` quantized by onnxruntime's quantize_dynamic with its default options, written to `dst`."""
    quantize_dynamic(str(src), str(dst))
    return dst


def cimc_logits(path: Path, feeds: dict[str, np.ndarray], mode: str) -> np.ndarray:
    """cimc's prefill logits for the prompt in `feeds`, compiled in one of CIMC_MODES."""
    seq = int(feeds["input_ids"].shape[1])
    program = compile_model(path, CompileOptions(max_seq=seq, max_ctx=seq, **CIMC_MODES[mode]))
    return Session(program).run("prefill", feeds).outputs["logits"]


@pytest.fixture(scope="module")
def fidelity(tmp_path_factory: pytest.TempPathFactory):
    """`fidelity(name)`: the model's Fidelity, measured once per module."""
    cache: dict[str, Fidelity] = {}

    def get(name: str) -> Fidelity:
        if name not in cache:
            path = shared_model(name, with_npz=True)
            feeds = npz_feeds(path)
            want = ort_logits(path, feeds)
            ref = np.load(path.with_suffix(".npz"))["output.logits"]
            assert max_err(want, ref) <= 1e-4, f"{name}: onnxruntime no longer reproduces the .npz logits"
            tmp = tmp_path_factory.mktemp(name)
            logging.disable(logging.INFO)  # the quantizers log every node
            try:
                w8 = ort_w8a8_model(path, tmp / "w8a8.onnx")
                w4 = ort_w4_model(path, tmp / "w4.onnx")
            finally:
                logging.disable(logging.NOTSET)
            logits = {mode: cimc_logits(path, feeds, mode) for mode in CIMC_MODES}
            cache[name] = Fidelity(
                name,
                ort_w8a8=cosine_error(ort_logits(w8, feeds), want),
                ort_w4=cosine_error(ort_logits(w4, feeds), want),
                cimc={mode: cosine_error(got, want) for mode, got in logits.items()},
                logits=logits,
            )
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODELS)
def test_w8a8_per_channel_within_1_5x_of_quantize_dynamic(fidelity, name: str) -> None:
    f = fidelity(name)
    assert f.ort_w8a8 > 0, f"quantize_dynamic changed nothing? {f.line()}"
    assert f.cimc["w8a8"] <= W8_RATIO * f.ort_w8a8, f.line()


@pytest.mark.parametrize("name", MODELS)
def test_w4_group32_within_2x_of_matmulnbits(fidelity, name: str) -> None:
    f = fidelity(name)
    assert f.ort_w4 > 0, f"MatMulNBitsQuantizer changed nothing? {f.line()}"
    assert f.cimc["w4a8"] <= W4_RATIO * f.ort_w4, f.line()


@pytest.mark.parametrize("name", MODELS)
def test_integer_modes_are_not_the_float_path(fidelity, name: str) -> None:
    """A silently float INT8/INT4 compilation gives the fp32 logits; these must differ."""
    f = fidelity(name)
    for mode in ("w8a8", "w4a8"):
        assert not np.array_equal(f.logits[mode], f.logits["fp32"]), f"{mode} logits equal fp32's: {f.line()}"
    assert not np.array_equal(f.logits["w8a8"], f.logits["w4a8"]), f.line()


def test_error_grows_as_bits_shrink(fidelity) -> None:
    """int4 error > int8 error > fp32 error, on at least one model."""
    measured = [fidelity(name) for name in MODELS]
    ordered = [f.name for f in measured if f.cimc["w4a8"] > f.cimc["w8a8"] > f.cimc["fp32"]]
    assert ordered, "\n".join(f.line() for f in measured)


@pytest.mark.skipif(not HAVE_ONNX_IR, reason="MatMulNBitsQuantizer needs onnx_ir, which is not installed")
def test_kernel_fallback_is_matmulnbits_quantizer(tmp_path: Path) -> None:
    """`nbits_by_kernel` (used when onnx_ir is missing) gives the quantizer's logits bit for bit."""
    path = shared_model("llama_a_dynamo", with_npz=True)
    feeds = npz_feeds(path)
    logging.disable(logging.INFO)
    try:
        real = ort_w4_model(path, tmp_path / "real.onnx", kernel=False)
    finally:
        logging.disable(logging.NOTSET)
    ours = ort_w4_model(path, tmp_path / "kernel.onnx", kernel=True)
    assert np.array_equal(ort_logits(ours, feeds), ort_logits(real, feeds))
