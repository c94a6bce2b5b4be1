"""How far the simulator's logits are from onnxruntime's on the ONNX model a binary was compiled from.

The measurement is teacher-forced: onnxruntime (CPU) generates `new_tokens` tokens greedily after
the prompt (the reference tokens), then one full-sequence onnxruntime call on the prompt and the
reference tokens gives the reference logits of every position. The simulator runs the same
tokens: prefill on the prompt (one logit row per prompt position), then one decode step per
reference token but the last, each fed the reference token rather than its own argmax — the runs
`generate` makes, within the same `--max-ctx`. So the two sides always see the same context, and
one early disagreement cannot snowball into unrelated continuations.

    acc = measure_accuracy(program, "model.onnx", [1, 5, 9, 2], 32)
    acc["max_abs_error"], acc["mean_cosine"], acc["top1_agreement"]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from isa.diag import CimcError
from isa.program import Program
from runtime.generate import check_request
from runtime.interpreter import Session

#: Graph inputs a KV-cache export may take besides `input_ids` and `past_key_values.*`.
CACHE_INPUTS = ("attention_mask", "position_ids")


def compare_logits(got: np.ndarray, want: np.ndarray) -> dict:
    """Compare logit rows (`[positions, vocab]`, any leading axes flattened into positions; at
    least one): max and mean absolute error, mean cosine similarity of the rows, fraction of
    positions whose argmax agrees, and the number of positions. Computed in float64."""
    if got.shape != want.shape or not got.size:
        raise CimcError(f"logits of shape {list(got.shape)} cannot be compared with {list(want.shape)}")
    a = got.reshape(-1, got.shape[-1]).astype(np.float64)
    b = want.reshape(-1, want.shape[-1]).astype(np.float64)
    diff = np.abs(a - b)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    # a zero row is as similar to another zero row as can be, and not at all to anything else
    both_zero = ~a.any(axis=1) & ~b.any(axis=1)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), both_zero.astype(np.float64))
    return {
        "positions": len(a),
        "max_abs_error": float(diff.max()),
        "mean_abs_error": float(diff.mean()),
        "mean_cosine": float(cosine.mean()),
        "top1_agreement": float((a.argmax(axis=1) == b.argmax(axis=1)).mean()),
    }


def reference_logits(path: str | os.PathLike, prompt: Sequence[int], new_tokens: int
                     ) -> tuple[list[int], np.ndarray]:
    """onnxruntime's greedy tokens after `prompt` (`new_tokens` of them, with the export's own KV
    cache when it has one) and its logits `[positions, vocab]` for prompt + tokens but the last,
    from one full-sequence call. The first run's past is empty, except a window buffer (a past
    whose length the graph's attention fixes, see cimc.frontend.ops.contrib_attention), which is
    that many zero slots, as the genai runtime feeds it."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        raise CimcError(f"{path}: onnxruntime cannot load it ({_first_line(e)})") from None
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values")]
    unknown = sorted(set(inputs) - {"input_ids", *CACHE_INPUTS, *past_names})
    if "input_ids" not in inputs or unknown:
        raise CimcError(f"{path}: cannot drive it as a reference: it takes {', '.join(inputs)} (expected input_ids, "
                        "and for a KV-cache export attention_mask, position_ids, past_key_values.*)")
    outputs = [o.name for o in sess.get_outputs()]
    if "logits" not in outputs:
        raise CimcError(f"{path}: has no 'logits' output (it has {', '.join(outputs)})")
    empty: dict[str, np.ndarray] = {}
    fixed = _fixed_dims(path) if past_names else {}
    for name in past_names:
        shape = [fixed.get(d, d) if isinstance(d, str) else d for d in inputs[name].shape]
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            raise CimcError(f"{path}: past input {name!r} has shape {shape}; expected [batch, heads, past, head_dim] "
                            "with fixed heads and head_dim")
        # nothing cached: no positions, or a window buffer's slots as zeros (what onnxruntime-genai feeds)
        empty[name] = np.zeros((1, shape[1], shape[2] if isinstance(shape[2], int) else 0, shape[3]), np.float32)

    def run(ids: list[int], done: int, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.array([ids], np.int64), **past}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones((1, done + len(ids)), np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(done, done + len(ids), dtype=np.int64)[None]
        try:
            return dict(zip(outputs, sess.run(outputs, feeds), strict=True))
        except Exception as e:  # onnxruntime's own exception types
            raise CimcError(f"{path}: onnxruntime failed ({_first_line(e)})") from None

    prompt = [int(t) for t in prompt]
    tokens: list[int] = []
    step_ids, done, past = list(prompt), 0, empty
    for _ in range(new_tokens):
        res = run(step_ids if past_names else prompt + tokens, done, past)
        tokens.append(int(np.argmax(res["logits"][0, -1])))
        if past_names:
            past = {n: res[n.replace("past_key_values", "present")] for n in past_names}
            done += len(step_ids)
            step_ids = [tokens[-1]]
    full = run(prompt + tokens[:-1], 0, empty)["logits"]
    return tokens, np.asarray(full[0], np.float32)


def _fixed_dims(path: str | os.PathLike) -> dict[str, int]:
    """Named dimensions the graph's own ops fix (a genai export's symbolic head_dim is its
    GroupQueryAttention's), as the frontend finds them; {} if it cannot read the model."""
    from cimc.frontend import open_model
    from cimc.frontend.fold import find_roles

    try:
        model, _ = open_model(path)
        return find_roles(model).dims
    except CimcError:
        return {}


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def simulated_logits(session: Session, prompt: Sequence[int], tokens: Sequence[int],
                     progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """The simulator's logits `[positions, vocab]` teacher-forced on `tokens`: prefill on the
    prompt, then one decode step fed each of `tokens` but the last. `progress(done, total)` is
    called after every run."""
    ids_input = _token_input(session)
    rows = []
    total = len(tokens)
    run = session.run("prefill", {ids_input: np.array([list(prompt)], np.int64)}, past=0)
    rows.extend(run.outputs["logits"][0])
    if progress is not None:
        progress(1, total)
    for i, token in enumerate(tokens[:-1]):
        run = session.run("decode", {ids_input: np.array([[token]], np.int64)}, past=len(prompt) + i)
        rows.append(run.outputs["logits"][0, -1])
        if progress is not None:
            progress(i + 2, total)
    return np.stack(rows)


def _token_input(session: Session) -> str:
    """The token-id input of the program's entries (the cache is in the machine; mask and
    positions are compiled in)."""
    needed = {s.name for e in ("prefill", "decode") for s in session.entry(e).symbols
              if s.kind == "input" and not s.check and not s.heads}
    if len(needed) != 1:
        raise CimcError(f"cannot measure accuracy: the program takes {', '.join(sorted(needed))}, not just token ids")
    return needed.pop()


def measure_accuracy(session: Session | Program, reference: str | os.PathLike, prompt: Sequence[int],
                     new_tokens: int, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Teacher-forced fidelity of the simulator against onnxruntime on `reference` (the ONNX model
    the program was compiled from), over the prompt and `new_tokens` greedy reference tokens.

    Returns the `accuracy` entry of a generation report: the `compare_logits` figures over every
    position (the prompt's, then one per decode step), the reference file name, `teacher_forced`,
    the number of prompt positions, the reference tokens and the program's weight format. A given
    Session's KV cache is overwritten (prefill starts it afresh)."""
    if not isinstance(session, Session):
        session = Session(session)
    program = session.program
    prompt = [int(t) for t in prompt]
    check_request(program, prompt, new_tokens, session.name)
    tokens, want = reference_logits(reference, prompt, new_tokens)
    vocab = program.meta.get("vocab")
    if vocab is not None and want.shape[-1] != vocab:
        raise CimcError(f"{reference}: has a vocabulary of {want.shape[-1]} but {session.name} has {vocab}; "
                        "give the model the binary was compiled from")
    got = simulated_logits(session, prompt, tokens, progress)
    out = {"reference": Path(reference).name, "teacher_forced": True, **compare_logits(got, want),
           "prompt_positions": len(prompt), "reference_tokens": tokens, "weights": program.meta.get("weights")}
    if whole_input_quantized(program):
        out["note"] = (f"{Path(reference).name}'s logits come from one run over the whole sequence, which quantizes "
                       "its uint8 inputs (DynamicQuantizeLinear) over every position at once; the simulator quantizes "
                       "the prompt, then each token, as a generation does: the two are not like for like")
    return out


def whole_input_quantized(program: Program) -> bool:
    """Whether the program quantizes linears' inputs to uint8 over the whole input at once
    (onnxruntime's DynamicQuantizeLinear), so per-token runs are not like for like with one run
    over the whole sequence."""
    return "u8 inputs" in str(program.meta.get("weights"))


def find_reference(model: str | os.PathLike, program: Program, reference: str | os.PathLike | None = None) -> Path:
    """The ONNX reference for `model` (an .onnx, or the .cimb `program` was read from): `reference`
    when given, the .onnx itself, else the source model recorded in the binary, next to it."""
    if reference is not None:
        path = Path(reference)
        if not path.is_file():
            raise CimcError(f"--reference {reference}: no such file")
        return path
    model = Path(model)
    if model.suffix == ".onnx":
        return model
    source = str(program.meta.get("source", ""))
    path = model.parent / source
    if not source or not path.is_file():
        recorded = f"its source model {source!r} is not next to it" if source else "it records no source model"
        raise CimcError(f"{model}: {recorded}; give the ONNX model it was compiled from with --reference FILE.onnx")
    return path
