"""Every instruction's semantics on a small machine, against plain numpy (and erf from math)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from isa.encoding import Instr
from isa.fields import Dim, Mem
from isa.spec import BY_NAME
from runtime.machine import Machine, SimError
from runtime.semantics import execute

RNG = np.random.default_rng(7)
R, C = 3, 8  # rows, cols of the test operands
A, B, OUT, EXTRA = 0x000, 0x400, 0x800, 0xC00  # byte addresses in the global buffer
RW = 0x10000  # DRAM read-write region base
NONE = Mem(0, 0, 0)
F32_MVM = {"wt": "f32", "xt": "f32", "gk": 0, "wst": "f32", "xs": NONE, "ws": NONE, "wz": NONE}  # float MVM fields


def _machine(seq: int = R) -> Machine:
    image = RNG.standard_normal(256).astype("<f4").view(np.uint8)
    m = Machine(np.zeros(0x1000, np.uint8), image, np.zeros(0x400, np.uint8), RW,
                np.array([0, seq, 0, seq], np.int64), (8, 4, C, 128), 24)
    for addr in (A, B):
        m.view(Mem(0, addr, C), R, C, write=True)[...] = RNG.standard_normal((R, C)).astype(np.float32) + 0.5
    return m


def _get(m: Machine, addr: int, rows: int = R, cols: int = C, stride: int = C) -> np.ndarray:
    return np.array(m.view(Mem(0, addr, stride), rows, cols))


def g(addr: int, stride: int = C) -> Mem:
    return Mem(0, addr, stride)


def run(mach: Machine, op: str, **fields: object) -> None:
    execute(mach, Instr(op, fields).validate())


UNARY = {
    "vcopy": lambda x: x, "vneg": lambda x: -x, "vexp": np.exp, "vsqrt": lambda x: np.sqrt(np.abs(x)),
    "vrsqrt": lambda x: 1 / np.sqrt(np.abs(x)), "vrecip": lambda x: 1 / x,
    "vsigmoid": lambda x: 1 / (1 + np.exp(-x)), "vsilu": lambda x: x / (1 + np.exp(-x)), "vtanh": np.tanh,
    "vgelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "vgelut": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "verf": np.vectorize(math.erf),
}
BINARY = {"vadd": np.add, "vsub": np.subtract, "vmul": np.multiply, "vdiv": np.divide, "vmax": np.maximum,
          "vpow": np.power}
COVERED = {*UNARY, *BINARY, "halt", "sync", "dma", "gather", "wload", "mvm", "tred", "vaffine", "vrsum", "vrmax",
           "vrope", "vmm", "vcausal", "vquant", "vsoftcap"}


def test_every_instruction_has_a_semantics_test() -> None:
    assert set(BY_NAME) == COVERED


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary(op: str) -> None:
    m = _machine()
    x = _get(m, A)
    if op in ("vsqrt", "vrsqrt"):
        m.view(g(A), R, C, write=True)[...] = x = np.abs(x)
    run(m, op, tile=0, dst=g(OUT), src=g(A), rows=Dim(1, 0), cols=C)
    np.testing.assert_allclose(_get(m, OUT), UNARY[op](x), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("op", sorted(BINARY))
@pytest.mark.parametrize(("bstride", "bbc"), [(C, 0), (0, 0), (1, 1)], ids=["full", "row-bcast", "col-bcast"])
def test_binary_with_broadcasts(op: str, bstride: int, bbc: int) -> None:
    m = _machine()
    if op == "vpow":  # a real power needs a positive base (a negative one gives NaN, which would compare equal)
        m.view(g(A), R, C, write=True)[...] = np.abs(_get(m, A)) + 0.1
    a = _get(m, A)
    b_full = _get(m, B)
    b = b_full[0:1, :] if bstride == 0 else (np.array(m.view(g(B, 1), R, 1)) if bbc else b_full)
    run(m, op, tile=2, dst=g(OUT), a=g(A), b=g(B, bstride), rows=R, cols=C, abc=0, bbc=bbc)
    np.testing.assert_allclose(_get(m, OUT), BINARY[op](a, b), rtol=1e-6)


def test_affine_and_row_reductions() -> None:
    m = _machine()
    x = _get(m, A)
    run(m, "vaffine", tile=0, dst=g(OUT), src=g(A), rows=R, cols=C, alpha=0.5, beta=-2.0)
    np.testing.assert_allclose(_get(m, OUT), x * 0.5 - 2, rtol=1e-6)
    run(m, "vrsum", tile=0, dst=g(EXTRA, 1), src=g(A), rows=R, cols=C)
    np.testing.assert_allclose(_get(m, EXTRA, R, 1, 1)[:, 0], x.sum(1), rtol=1e-5)
    run(m, "vrmax", tile=0, dst=g(EXTRA, 1), src=g(A), rows=R, cols=C)
    np.testing.assert_array_equal(_get(m, EXTRA, R, 1, 1)[:, 0], x.max(1))


def test_dma_and_tred_in_dram() -> None:
    m = _machine()
    x = _get(m, A)
    run(m, "dma", dst=Mem(1, RW, C), src=g(A), rows=R, cols=C, dt="f32")
    run(m, "dma", dst=Mem(1, RW + R * C * 4, C), src=g(B), rows=R, cols=C, dt="f32")
    run(m, "tred", dst=g(OUT), src=Mem(1, RW, C), rows=R, cols=C, count=2, pstride=R * C * 4)
    np.testing.assert_allclose(_get(m, OUT), x + _get(m, B), rtol=1e-6)
    with pytest.raises(SimError, match="read-only DRAM image"):
        run(m, "dma", dst=Mem(1, 0, C), src=g(A), rows=R, cols=C, dt="f32")


def test_gather_checks_the_vocabulary() -> None:
    m = _machine()
    table = np.array(m.view(Mem(1, 0, 4), 16, 4))
    m.view(g(EXTRA, 1), R, 1, dtype="<i4", write=True)[:, 0] = [3, 0, 15]
    run(m, "gather", dst=g(OUT, 4), table=Mem(1, 0, 4), idx=g(EXTRA, 1), n=R, cols=4, vocab=16)
    np.testing.assert_array_equal(_get(m, OUT, R, 4, 4), table[[3, 0, 15]])
    m.view(g(EXTRA, 1), R, 1, dtype="<i4", write=True)[:, 0] = [3, 16, 0]
    with pytest.raises(SimError, match="token id 16 at position 1 is outside the vocabulary"):
        run(m, "gather", dst=g(OUT, 4), table=Mem(1, 0, 4), idx=g(EXTRA, 1), n=R, cols=4, vocab=16)


def test_wload_then_mvm_with_accumulate() -> None:
    m = _machine()
    w = np.array(m.view(Mem(1, 0, 4), C, 4))
    run(m, "wload", tile=5, m0=0, k=C, n=4, wt="f32", src=Mem(1, 0, 4))
    x = _get(m, A)
    run(m, "mvm", tile=5, m0=0, k=C, n=4, **F32_MVM, acc=0, dst=g(OUT, 4), src=g(A), nvec=Dim(1, 0))
    np.testing.assert_allclose(_get(m, OUT, R, 4, 4), x @ w, rtol=1e-5)
    run(m, "mvm", tile=5, m0=0, k=C, n=4, **F32_MVM, acc=1, dst=g(OUT, 4), src=g(A), nvec=Dim(1, 0))
    np.testing.assert_allclose(_get(m, OUT, R, 4, 4), 2 * (x @ w), rtol=1e-5)
    with pytest.raises(SimError, match="expects a 8 x 2 f32 weight group"):
        run(m, "mvm", tile=5, m0=0, k=C, n=2, **F32_MVM, acc=0, dst=g(OUT, 4), src=g(A), nvec=R)
    with pytest.raises(SimError, match="but nothing is loaded"):
        run(m, "mvm", tile=6, m0=0, k=C, n=4, **F32_MVM, acc=0, dst=g(OUT, 4), src=g(A), nvec=R)


def test_weight_groups_occupy_macros() -> None:
    """A group takes ceil(k/rows) * ceil(n*wbits/cols) macros: it must fit its tile, and loading
    over part of an earlier group overwrites that group."""
    m = _machine()  # 8 tiles of 4 macros of C rows x 128 columns
    run(m, "wload", tile=1, m0=0, k=C, n=8, wt="f32", src=Mem(1, 0, 8))  # macros 0-1
    run(m, "wload", tile=1, m0=2, k=C, n=8, wt="f32", src=Mem(1, 0, 8))  # macros 2-3
    with pytest.raises(SimError, match="needs 2 macros from tile 1 macro 3; the chip has 8 tiles of 4 macros"):
        run(m, "wload", tile=1, m0=3, k=C, n=8, wt="f32", src=Mem(1, 0, 8))
    with pytest.raises(SimError, match="from tile 8 macro 0"):
        run(m, "wload", tile=8, m0=0, k=C, n=4, wt="f32", src=Mem(1, 0, 4))
    run(m, "wload", tile=1, m0=1, k=C, n=4, wt="f32", src=Mem(1, 0, 4))  # macro 1: overwrites the first group
    with pytest.raises(SimError, match="tile 1 macro 0 expects a 8 x 8 f32 weight group, but nothing is loaded"):
        run(m, "mvm", tile=1, m0=0, k=C, n=8, **F32_MVM, acc=0, dst=g(OUT, 8), src=g(A), nvec=R)
    run(m, "mvm", tile=1, m0=2, k=C, n=8, **F32_MVM, acc=0, dst=g(OUT, 8), src=g(A), nvec=R)


def test_rope_rotates_halves_per_head() -> None:
    m = _machine()
    hd = 4
    x = _get(m, A)
    cos, sin = _get(m, B)[:, :hd], _get(m, B)[:, hd:]
    run(m, "vrope", tile=1, dst=g(OUT), src=g(A), cos=g(B), sin=g(B + hd * 4), rows=R, cols=C, hd=hd, rd=0)
    heads = x.reshape(R, C // hd, hd)
    rot = np.concatenate([-heads[..., 2:], heads[..., :2]], -1)
    want = (heads * cos[:, None] + rot * sin[:, None]).reshape(R, C)
    np.testing.assert_allclose(_get(m, OUT), want, rtol=1e-6)


def test_partial_rope_rotates_the_first_rd_entries_of_each_head() -> None:
    """rd = 2 of hd = 4: entries 0 and 1 of each head rotate as a pair (tables of 2 columns), 2 and 3 pass."""
    m = _machine()
    x = _get(m, A)
    cos, sin = _get(m, B)[:, :2], _get(m, B)[:, 2:4]
    run(m, "vrope", tile=1, dst=g(OUT), src=g(A), cos=g(B), sin=g(B + 2 * 4), rows=R, cols=C, hd=4, rd=2)
    heads = x.reshape(R, 2, 4)
    want = heads.copy()
    want[..., 0] = heads[..., 0] * cos[:, None, 0] - heads[..., 1] * sin[:, None, 0]
    want[..., 1] = heads[..., 1] * cos[:, None, 1] + heads[..., 0] * sin[:, None, 1]
    np.testing.assert_allclose(_get(m, OUT), want.reshape(R, C), rtol=1e-6)
    with pytest.raises(SimError, match="rotated 3 entries"):
        run(m, "vrope", tile=1, dst=g(OUT), src=g(A), cos=g(B), sin=g(B), rows=R, cols=C, hd=4, rd=3)


@pytest.mark.parametrize(("diag", "window", "one"), [(0, 2, 0), (5, 3, 0), (5, 3, 1), (0, 0, 1)])
def test_causal_mask_with_a_window(diag: int, window: int, one: int) -> None:
    """Row r is the query at position diag (+ r unless `one`); it sees columns p-window+1 .. p."""
    m = _machine()
    cols = C
    before = _get(m, A, R, cols)
    run(m, "vcausal", tile=0, dst=g(A), rows=R, cols=cols, diag=diag, window=window, one=one)
    got = _get(m, A, R, cols)
    for r in range(R):
        p = diag + (0 if one else r)
        for c in range(cols):
            hidden = c > p or (window > 0 and c <= p - window)
            assert np.isneginf(got[r, c]) if hidden else got[r, c] == before[r, c], (r, c)


def test_softcap_is_cap_tanh_of_x_over_cap() -> None:
    m = _machine()
    x = _get(m, A) * 40
    m.view(g(A), R, C, write=True)[...] = x
    run(m, "vsoftcap", tile=0, dst=g(OUT), src=g(A), rows=R, cols=C, cap=30.0)
    np.testing.assert_allclose(_get(m, OUT), 30.0 * np.tanh(x / 30.0), rtol=1e-6)
    assert np.abs(_get(m, OUT)).max() < 30.0
    with pytest.raises(SimError, match="cap must be positive"):
        run(m, "vsoftcap", tile=0, dst=g(OUT), src=g(A), rows=R, cols=C, cap=0.0)


def test_vmm_causal_softmax_pieces() -> None:
    m = _machine()
    q, k = _get(m, A), _get(m, B)
    run(m, "vmm", tile=0, dst=g(OUT, R), a=g(A), b=g(B), m=R, k=C, n=R, tb=1, acc=0, alpha=0.25)
    s = _get(m, OUT, R, R, R)
    np.testing.assert_allclose(s, 0.25 * q @ k.T, rtol=1e-5)
    run(m, "vcausal", tile=0, dst=g(OUT, R), rows=R, cols=R, diag=0, window=0, one=0)
    masked = _get(m, OUT, R, R, R)
    assert np.isneginf(masked[np.triu_indices(R, 1)]).all()
    np.testing.assert_array_equal(masked[np.tril_indices(R)], s[np.tril_indices(R)])
    m.view(g(OUT, R), R, R, write=True)[...] = p = np.tril(np.full((R, R), 1.0 / R, np.float32))
    run(m, "vmm", tile=0, dst=g(EXTRA), a=g(OUT, R), b=g(B), m=R, k=R, n=C, tb=0, acc=0, alpha=1.0)
    np.testing.assert_allclose(_get(m, EXTRA), p @ k, rtol=1e-5)
    run(m, "vmm", tile=0, dst=g(EXTRA), a=g(OUT, R), b=g(B), m=R, k=R, n=C, tb=0, acc=1, alpha=0.5)
    np.testing.assert_allclose(_get(m, EXTRA), 1.5 * (p @ k), rtol=1e-5)


def test_vquant_scales_each_row_group() -> None:
    m = _machine()
    x = _get(m, A)
    run(m, "vquant", tile=3, asym=0, dst=g(OUT), sc=g(EXTRA, 2), src=g(A), rows=R, cols=C, group=C // 2)
    s = (np.abs(x).reshape(R, 2, C // 2).max(axis=2) / np.float32(127)).astype(np.float32)
    np.testing.assert_array_equal(_get(m, EXTRA, R, 2, 2), s)
    want = np.clip(np.rint(x * np.repeat(np.float32(1) / s, C // 2, axis=1)), -127, 127)
    np.testing.assert_array_equal(np.array(m.view(g(OUT), R, C, dtype="i1")), want)


def test_vquant_asym_quantizes_the_whole_block() -> None:
    """One scale and zero point for all rows (DynamicQuantizeLinear), written once per row."""
    m = _machine()
    m.view(g(A), R, C, write=True)[...] = x = _get(m, A) - 1.0  # values of both signs
    run(m, "vquant", tile=3, asym=1, dst=g(OUT), sc=g(EXTRA, 2), src=g(A), rows=R, cols=C, group=0)
    lo, hi = np.float32(min(0.0, x.min())), np.float32(max(0.0, x.max()))
    s = (hi - lo) / np.float32(255)
    z = np.rint(np.clip(np.float32(0) - lo / s, 0, 255))
    np.testing.assert_array_equal(_get(m, EXTRA, R, 2, 2), np.tile([s, z], (R, 1)).astype(np.float32))
    want = np.clip(np.rint(x / s) + z, 0, 255)
    np.testing.assert_array_equal(np.array(m.view(g(OUT), R, C, dtype="u1")), want)
    assert want.min() == 0 and want.max() == 255


def test_attention_pieces_over_no_keys() -> None:
    """With nothing cached, the past-key block of an attention has no columns: its row maximum
    is -inf, its row sum 0, and its product adds nothing."""
    m = _machine()
    run(m, "vrmax", tile=0, dst=g(EXTRA, 1), src=g(A), rows=R, cols=0)
    assert np.isneginf(_get(m, EXTRA, R, 1, 1)).all()
    run(m, "vrsum", tile=0, dst=g(EXTRA, 1), src=g(A), rows=R, cols=0)
    assert not _get(m, EXTRA, R, 1, 1).any()
    before = _get(m, OUT).copy()
    run(m, "vmm", tile=0, dst=g(OUT), a=g(A), b=g(B), m=R, k=0, n=C, tb=0, acc=1, alpha=1.0)
    np.testing.assert_array_equal(_get(m, OUT), before)


def test_sizes_follow_the_runtime_length() -> None:
    m = _machine(seq=2)
    before = _get(m, OUT)
    run(m, "vcopy", tile=0, dst=g(OUT), src=g(A), rows=Dim(1, 0), cols=C)
    after = _get(m, OUT)
    np.testing.assert_array_equal(after[:2], _get(m, A)[:2])
    np.testing.assert_array_equal(after[2:], before[2:])


def test_operands_outside_memory_are_errors() -> None:
    m = _machine()
    with pytest.raises(SimError, match="outside its memory"):
        run(m, "vcopy", tile=0, dst=g(0xFF0), src=g(A), rows=R, cols=C)


def test_control_instructions_do_nothing() -> None:
    m = _machine()
    before = m.gbuf.copy()
    run(m, "sync")
    run(m, "halt")
    np.testing.assert_array_equal(m.gbuf, before)
