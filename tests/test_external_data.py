"""Weights in external data files: laid out as onnx's own helpers write them, read lazily (one
memory map per file, nothing read twice, offsets and tensors past 2 GB), and every hostile or
broken reference refused before anything is read, naming the tensor and its location.

Numerics are compared with onnxruntime on the same files. The >2 GB cases use sparse files
(`truncate`), so they cost no disk, and run in a subprocess whose peak RSS is the measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from model_fixtures import max_err, ort_logits, shared_model
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_user_error

from cimc.driver import CompileOptions, compile_model
from cimc.frontend import open_model
from cimc.synth import DecoderConfig, build_decoder_onnx
from runtime.interpreter import simulate

TOL = 1e-4
CFG = DecoderConfig(name="ext", vocab=64, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64)
GB = 1 << 30


def _logits(program, ids: np.ndarray) -> np.ndarray:
    return simulate(program, {"input_ids": ids}).outputs["logits"]


def _ids(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, CFG.vocab, size=(1, n), dtype=np.int64)


def _external_model(folder: Path, *, one_file: bool) -> Path:
    """The synthetic decoder saved by onnx.save_model with every initializer of 1 KiB or more external: all in
    `w.bin` at increasing offsets, or one file per tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    inline = build_decoder_onnx(CFG, folder / "inline.onnx", seed=3, external_data=False)
    model = onnx.load(str(inline))
    inline.unlink()
    path = folder / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=one_file,
                    location="w.bin" if one_file else None, size_threshold=1024)
    return path


def _external_entries(path: Path) -> dict[str, dict[str, str]]:
    model = onnx.load(str(path), load_external_data=False)
    return {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
            if t.data_location == TensorProto.EXTERNAL}


def _edit(path: Path, name: str, **entries: str) -> None:
    """Set external_data keys of initializer `name`."""
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == name)
    info = {e.key: e.value for e in t.external_data} | entries
    del t.external_data[:]
    for k, v in info.items():
        t.external_data.add(key=k, value=v)
    path.write_bytes(model.SerializeToString())


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- layouts onnx writes -----------------------------------------------------------------------


@pytest.mark.parametrize("one_file", [True, False], ids=["one-file-with-offsets", "one-file-per-tensor"])
def test_external_layouts_match_onnxruntime(tmp_path: Path, one_file: bool) -> None:
    path = _external_model(tmp_path / "model", one_file=one_file)
    entries = _external_entries(path)
    files = {e["location"] for e in entries.values()}
    assert len(entries) >= 8 and len(files) == (1 if one_file else len(entries)), files
    if one_file:
        assert len({int(e.get("offset", 0)) for e in entries.values()}) == len(entries)
    program = compile_model(path, CompileOptions(max_seq=8))
    for n in (3, 8):
        ids = _ids(n)
        err = max_err(_logits(program, ids), ort_logits(path, ids))
        assert err <= TOL, f"length {n}: max |err| {err:.3g}"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_one_map_per_file_not_per_tensor(tmp_path: Path) -> None:
    """Reading every tensor of a one-file model holds one file open, not one per tensor (a map per
    tensor exhausts the descriptors of a model with thousands of tensors)."""
    path = _external_model(tmp_path / "model", one_file=True)
    model, store = open_model(path)
    before = _open_fds()
    arrays = [store.get(name) for name in model.initializers]
    assert len(arrays) >= 8
    assert _open_fds() - before <= 1
    want = {t.name: numpy_helper.to_array(t, base_dir=str(path.parent))
            for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    for name, arr in zip(model.initializers, arrays, strict=True):
        np.testing.assert_array_equal(arr, want[name])


def test_shared_dynamo_export_with_data_file_matches_onnxruntime() -> None:
    path = shared_model("llama_a_dynamo")
    assert path.with_name(path.name + ".data").is_file() and _external_entries(path)
    program = compile_model(path, CompileOptions(max_seq=8))
    vocab = onnx.load(str(path), load_external_data=False).graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    ids = np.random.default_rng(0).integers(0, vocab, size=(1, 8), dtype=np.int64)
    err = max_err(_logits(program, ids), ort_logits(path, ids))
    assert err <= TOL, f"max |err| {err:.3g}"


# ---- hostile and broken references -------------------------------------------------------------

#: name -> edit of the first tensor's entries (run in the model folder) and the words the error holds
HOSTILE = {
    "absolute-inside-folder": (lambda d, e: {"location": str(d / e["location"])}, "outside the model's folder"),
    "dotdot-back-inside": (lambda d, e: {"location": f"../{d.name}/{e['location']}"}, "outside the model's folder"),
    "dotdot-outside": (lambda d, e: {"location": "../x.bin"}, "outside the model's folder"),
    "symlink-outside": (lambda d, e: {"location": "link.bin"}, "outside the model's folder"),
    "missing-file": (lambda d, e: {"location": "nope.bin"}, "is missing"),
    "offset-past-end": (lambda d, e: {"offset": str((d / e["location"]).stat().st_size + 4096)}, "truncated"),
    "length-past-end": (lambda d, e: {"offset": str((d / e["location"]).stat().st_size - 4)}, "truncated"),
    "length-not-dtype-x-shape": (lambda d, e: {"length": str(int(e["length"]) - 4)}, "expected a length of"),
}


@pytest.fixture
def hostile(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str, str, str]:
    """A one-file model whose first external tensor is edited as HOSTILE[param] says: (model, tensor
    name, its new location, words of the error)."""
    edit, words = HOSTILE[request.param]
    path = _external_model(tmp_path / "model", one_file=True)
    (tmp_path / "x.bin").write_bytes(bytes(1 << 20))  # exists and is big enough: must still be refused
    path.with_name("link.bin").symlink_to(tmp_path / "x.bin")
    name, entry = next(iter(_external_entries(path).items()))
    new = edit(path.parent, entry)
    _edit(path, name, **new)
    return path, name, new.get("location", entry["location"]), words


@pytest.mark.parametrize("hostile", list(HOSTILE), indirect=True)
@pytest.mark.parametrize("command", ["check", "compile"])
def test_hostile_external_data_is_one_user_error(cli, hostile: tuple[Path, str, str, str], command: str) -> None:
    path, name, location, words = hostile
    out = path.with_name("out.cimb")
    argv = ["check", path] if command == "check" else ["compile", path, "-o", out, "-q"]
    assert_user_error(cli(*argv), [str(path), f"initializer {name!r}", repr(location), words])
    assert not out.exists()


def test_model_file_over_protobuf_limit_is_refused_unread(tmp_path: Path, cli) -> None:
    path = tmp_path / "huge.onnx"
    with path.open("wb") as f:
        f.truncate(2 * GB + 1)  # sparse: no disk, and reading it would take 2 GB of memory
    assert_user_error(cli("check", path), [str(path), "2 GB limit", "external data"])


# ---- past 2 GB, lazily ---------------------------------------------------------------------------

_BIG_SCRIPT = """
import json, resource, sys
import numpy as np
from cimc.driver import CompileOptions, compile_model
from cimc.frontend import open_model
from runtime.interpreter import simulate

model_path, big_path, ids_path = sys.argv[1:4]
program = compile_model(model_path, CompileOptions(max_seq=8))
logits = simulate(program, {"input_ids": np.load(ids_path)}).outputs["logits"]
np.save(ids_path.replace("ids", "logits"), logits)
_, store = open_model(big_path)
big = store.get("big")
out = {"shape": list(big.shape), "corners": [float(big[0, 0]), float(big[-1, -1]), float(big[-1, -2])],
       "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
print(json.dumps(out))
"""


def _offset_by(path: Path, shift: int) -> int:
    """Move the one data file's contents `shift` bytes further (a sparse hole before them) and
    every tensor's offset with them; returns the new file size."""
    entries = _external_entries(path)
    data = path.parent / "w.bin"
    raw = data.read_bytes()
    with data.open("r+b") as f:
        f.truncate(0)
        f.seek(shift)
        f.write(raw)
    for name, e in entries.items():
        _edit(path, name, offset=str(int(e.get("offset", 0)) + shift))
    return data.stat().st_size


def _big_tensor_model(folder: Path) -> tuple[Path, tuple[int, int]]:
    """A model with one float32 initializer of 2.5 GB in a sparse file: zeros but for its last 16
    values, 1 to 16."""
    shape = (5, GB // 8)  # 5 * 2**27 floats = 2.5 GB
    folder.mkdir()
    row = np.arange(1, 17, dtype="<f4")
    with (folder / "big.bin").open("wb") as f:
        f.truncate(shape[0] * shape[1] * 4)
        f.seek(shape[0] * shape[1] * 4 - row.nbytes)
        f.write(row.tobytes())
    t = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=shape, data_location=TensorProto.EXTERNAL)
    big.external_data.add(key="location", value="big.bin")
    graph = helper.make_graph([helper.make_node("Identity", ["big"], ["y"], name="id")], "big", [], [t], [big])
    path = folder / "big.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path, shape


def test_offsets_and_tensors_past_2gb_load_lazily(tmp_path: Path) -> None:
    """Weights at offset 3 GB of a sparse file compile and match onnxruntime, and a 2.5 GB tensor
    opens with its values in place, with the compiler's peak memory far below either file."""
    path = _external_model(tmp_path / "model", one_file=True)
    data_size = _offset_by(path, 3 * GB)
    big, shape = _big_tensor_model(tmp_path / "bigmodel")
    ids = _ids(6)
    np.save(tmp_path / "ids.npy", ids)
    script = tmp_path / "measure.py"
    script.write_text(textwrap.dedent(_BIG_SCRIPT))
    res = subprocess.run([sys.executable, str(script), str(path), str(big), str(tmp_path / "ids.npy")],
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["shape"] == list(shape)
    assert got["corners"] == [0.0, 16.0, 15.0]
    peak = got["maxrss_kb"] * 1024
    assert peak < min(data_size, 2 * GB) // 3, f"peak RSS {peak / GB:.2f} GB for files of {data_size / GB:.1f} GB"
    err = max_err(np.load(tmp_path / "logits.npy"), ort_logits(path, ids))
    assert err <= TOL, f"max |err| {err:.3g}"
