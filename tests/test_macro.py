"""The integer macro datapath (i4/u4/i8/u8 weights, i8/u8 inputs fed bit-serially, a saturating
accumulator, per-group scales, weight zero points and u8 inputs' zero points) and `vquant` (also
asym: onnxruntime's DynamicQuantizeLinear, checked against onnxruntime's own kernel), against a
reference written from the ISA text of `mvm` and `vquant`; weight packing; whole instructions on a
small machine."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from isa.dtypes import elem, pack, unpack
from isa.encoding import Instr
from isa.fields import Mem
from runtime import macro
from runtime.machine import Machine, SimError
from runtime.semantics import execute

F32 = np.float32

# ---- the reference, from the ISA text ------------------------------------------------------------


def ref_groups(k: int, gk: int) -> list[slice]:
    """The rows of each partial-sum group: gk rows each, the last one maybe shorter (gk = 0: all k)."""
    size = gk or k
    return [slice(lo, min(lo + size, k)) for lo in range(0, k, size)]


def ref_accumulate(x: list[int], w: list[int], bits: int, signed: bool, accum_bits: int) -> int:
    """One vector, one group, one column: for each input bit plane b, p_b = sum bit_b(x) * w exactly,
    then acc = sat(acc + 2^b p_b) (-2^b for the top plane of a signed type) in accum_bits bits."""
    lo, hi = -(2 ** (accum_bits - 1)), 2 ** (accum_bits - 1) - 1
    acc = 0
    for b in range(bits):
        p = sum(((xi >> b) & 1) * wi for xi, wi in zip(x, w, strict=True))  # Python ints: two's complement bits
        weight = -(2**b) if signed and b == bits - 1 else 2**b
        acc = min(max(acc + weight * p, lo), hi)
    return acc


def ref_partial_sums(x: np.ndarray, w: np.ndarray, gk: int, xt: str, accum_bits: int) -> np.ndarray:
    """[nvec, G, n]: `ref_accumulate` for every vector, group and column."""
    t = elem(xt)
    groups = ref_groups(w.shape[0], gk)
    out = np.zeros((x.shape[0], len(groups), w.shape[1]), np.int64)
    for r in range(x.shape[0]):
        for g, rows in enumerate(groups):
            xr = [int(v) for v in x[r, rows]]
            for j in range(w.shape[1]):
                out[r, g, j] = ref_accumulate(xr, [int(v) for v in w[rows, j]], t.bits, t.signed, accum_bits)
    return out


def exact_products(x: np.ndarray, w: np.ndarray, gk: int) -> np.ndarray:
    """[nvec, G, n]: the unsaturated integer product of each group."""
    return np.stack([x[:, rows].astype(np.int64) @ w[rows].astype(np.int64) for rows in ref_groups(w.shape[0], gk)],
                    axis=1)


def ref_mvm(x: np.ndarray, w: np.ndarray, gk: int, xt: str, accum_bits: int, xs: np.ndarray, ws: np.ndarray,
            z: np.ndarray | None = None) -> np.ndarray:
    """[nvec, n] f32 of an integer-input mvm. `xs` as in memory: i8 inputs have a scale per vector and
    group [nvec, G] and no zero point; u8 inputs [nvec, 2], each vector's scale and zero point xz.
    Per group, c = acc - z * (sum of the group's inputs) - xz * (sum of the group's stored weights)
    + (rows of the group) * xz * z in integers, then the sum over groups in order of
    f32(c) * (scale * ws[g,j]), in f32."""
    p = ref_partial_sums(x, w, gk, xt, accum_bits)
    groups = ref_groups(w.shape[0], gk)
    scale = xs if xt == "i8" else np.repeat(xs[:, :1], len(groups), axis=1)
    xz = np.zeros(x.shape[0], np.int64) if xt == "i8" else xs[:, 1].astype(np.int64)
    zero = np.zeros((len(groups), w.shape[1]), np.int64) if z is None else z.astype(np.int64)
    for g, rows in enumerate(groups):
        for r in range(x.shape[0]):
            for j in range(w.shape[1]):
                xsum = sum(int(v) for v in x[r, rows])
                wsum = sum(int(v) for v in w[rows, j])
                count = rows.stop - rows.start
                p[r, g, j] += -int(zero[g, j]) * xsum - int(xz[r]) * wsum + count * int(xz[r]) * int(zero[g, j])
    y = np.zeros((x.shape[0], w.shape[1]), F32)
    for g in range(len(groups)):
        y = y + p[:, g].astype(F32) * (scale[:, g:g + 1].astype(F32) * ws[g].astype(F32))
    return y


def input_scales(rng: np.random.Generator, xt: str, nvec: int, groups: int) -> np.ndarray:
    """Random input scales as `xs` holds them: [nvec, G] (i8), or [nvec, 2] scale and zero point (u8)."""
    if xt == "i8":
        return (rng.random((nvec, groups)) * 0.05 + 0.001).astype(F32)
    return np.stack([rng.random(nvec) * 0.05 + 0.001, rng.integers(0, 256, nvec)], axis=1).astype(F32)


def ref_float_mvm(x: np.ndarray, w: np.ndarray, gk: int, ws: np.ndarray, z: np.ndarray | None = None) -> np.ndarray:
    """[nvec, n] float64 of an f32-input mvm: sum over groups of (x_g @ (W - z)_g) * ws[g]."""
    wz = w.astype(np.float64)
    y = np.zeros((x.shape[0], w.shape[1]))
    for g, rows in enumerate(ref_groups(w.shape[0], gk)):
        wg = wz[rows] - (0 if z is None else z[g].astype(np.float64))
        y += (x[:, rows].astype(np.float64) @ wg) * ws[g].astype(np.float64)
    return y


def random_ints(rng: np.random.Generator, t: str, shape: tuple[int, ...]) -> np.ndarray:
    """Uniform integers over the whole range of type `t`."""
    return rng.integers(elem(t).lo, elem(t).hi + 1, shape)


# ---- partial sums: property tests ---------------------------------------------------------------

CASES = list(itertools.product(("i8", "u8"), ("i4", "i8", "u4", "u8"), (0, 16, 32, 64, "partial"),
                               ("saturating", "wide")))


@pytest.mark.parametrize(("seed", "xt", "wt", "gk_case", "accum"), [(i, *c) for i, c in enumerate(CASES)],
                         ids=["-".join(map(str, c)) for c in CASES])
def test_partial_sums_match_the_bit_serial_reference(seed: int, xt: str, wt: str, gk_case: int | str,
                                                     accum: str) -> None:
    rng = np.random.default_rng(1000 + seed)
    if gk_case == "partial":
        gk = int(rng.choice([12, 24, 40]))
        k = gk * int(rng.integers(1, 3)) + int(rng.integers(1, gk))
    else:
        gk = int(gk_case)
        k = int(rng.integers(16, 100)) if gk == 0 else int(rng.integers(gk, 2 * gk + 1))
    nvec, n = int(rng.integers(1, 4)), int(rng.integers(1, 9))
    accum_bits = int(rng.integers(8, 13)) if accum == "saturating" else int(rng.choice([24, 32]))
    x = random_ints(rng, xt, (nvec, k))
    w = random_ints(rng, wt, (k, n))
    small = rng.random(n) < 0.3  # some columns of tiny weights: fewer of them may saturate
    w[:, small] = rng.integers(max(elem(wt).lo, -1), 2, (k, int(small.sum())))
    want = ref_partial_sums(x, w, gk, xt, accum_bits)
    got = macro.partial_sums(x, w, gk or k, xt, accum_bits)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    cached = macro.partial_sums(x, w, gk or k, xt, accum_bits, macro.abs_sums(w, gk or k))
    np.testing.assert_array_equal(cached, want)
    exact = exact_products(x, w, gk)
    if accum == "saturating":
        assert (want != exact).any(), "no step saturated: the case tests nothing"
    else:
        np.testing.assert_array_equal(want, exact)


def test_saturation_by_hand() -> None:
    """Worked examples: the low planes of -1 (all ones) saturate before the negative top plane comes;
    an unsigned input saturates on its last plane."""
    w = np.ones((16, 1), np.int64)
    # planes 0..7 of -1: acc 16, 48, 112, 240 -> 127, ..., then 127 - 128 * 16 -> -128; the exact product is -16
    assert macro.partial_sums(np.full((1, 16), -1), w, 16, "i8", 8)[0, 0, 0] == -128
    assert macro.partial_sums(np.full((1, 16), -1), w, 16, "i8", 16)[0, 0, 0] == -16
    # 255 * 16: acc = 16 * (2^(b+1) - 1) reaches 2032 after plane 6, then 4080 -> 2047
    assert macro.partial_sums(np.full((1, 16), 255), w, 16, "u8", 12)[0, 0, 0] == 2047
    assert macro.partial_sums(np.full((1, 16), 255), w, 16, "u8", 13)[0, 0, 0] == 4080
    # -128 * 8 * 7 = -7168: the low planes are all zero; only the last step goes below -2048
    assert macro.partial_sums(np.full((1, 8), -128), np.full((8, 1), 7), 8, "i8", 12)[0, 0, 0] == -2048


# ---- the fast path and the plane-by-plane path --------------------------------------------------


def plane_by_plane(x: np.ndarray, w: np.ndarray, gk: int, xt: str, accum_bits: int) -> np.ndarray:
    """[nvec, G, n]: `macro._bit_serial` (the plane-by-plane path) on every group and column."""
    t = elem(xt)
    groups = ref_groups(w.shape[0], gk)
    xg = np.zeros((len(groups), x.shape[0], gk), np.int64)
    wg = np.zeros((len(groups), gk, w.shape[1]), np.int64)
    for g, rows in enumerate(groups):
        xg[g, :, :rows.stop - rows.start] = x[:, rows]
        wg[g, :rows.stop - rows.start] = w[rows]
    gs, js = np.divmod(np.arange(len(groups) * w.shape[1]), w.shape[1])
    flat = macro._bit_serial(xg[gs], wg[gs, :, js], t.bits, t.signed, accum_bits)  # [nvec, G * n]
    return flat.reshape(x.shape[0], len(groups), w.shape[1])


@pytest.fixture
def plane_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spies on `macro._bit_serial`: the number of columns of each call."""
    calls: list[int] = []
    real = macro._bit_serial

    def spy(x: np.ndarray, w: np.ndarray, bits: int, signed: bool, accum_bits: int) -> np.ndarray:
        calls.append(w.shape[0])
        return real(x, w, bits, signed, accum_bits)

    monkeypatch.setattr(macro, "_bit_serial", spy)
    return calls


@pytest.mark.parametrize(("xt", "wt", "gk"), [("i8", "i8", 32), ("u8", "u8", 16), ("i8", "u4", 24), ("u8", "i4", 64)])
def test_fast_path_when_no_column_can_saturate(plane_calls: list[int], xt: str, wt: str, gk: int) -> None:
    rng = np.random.default_rng(gk)
    k, n, nvec = 2 * gk + 5, 6, 3
    x, w = random_ints(rng, xt, (nvec, k)), random_ints(rng, wt, (k, n))
    got = macro.partial_sums(x, w, gk, xt, 24)
    assert plane_calls == []  # sum |w| * max |x| fits 24 bits: one integer matrix product
    np.testing.assert_array_equal(got, exact_products(x, w, gk))
    np.testing.assert_array_equal(got, plane_by_plane(x, w, gk, xt, 24))
    np.testing.assert_array_equal(got, ref_partial_sums(x, w, gk, xt, 24))


def test_only_risky_columns_go_plane_by_plane(plane_calls: list[int]) -> None:
    rng = np.random.default_rng(3)
    k, gk, accum_bits = 40, 16, 12  # groups of 16, 16 and 8 rows
    x = random_ints(rng, "i8", (4, k))
    w = random_ints(rng, "i4", (k, 6))
    w[:, [1, 4]] = 0
    w[::3, 1] = 1  # column 1: sum |w| <= 6 in every group, 6 * 128 <= 2047: never risky
    w[:16, 4] = -1  # column 4: sum |w| = 16 in group 0 only, 16 * 128 > 2047: risky there alone
    sums = np.stack([np.abs(w[rows]).sum(axis=0) for rows in ref_groups(k, gk)])
    risky = int((sums * 128 > 2047).sum())
    assert 0 < risky < sums.size
    got = macro.partial_sums(x, w, gk, "i8", accum_bits)
    assert plane_calls == [risky]
    np.testing.assert_array_equal(got, ref_partial_sums(x, w, gk, "i8", accum_bits))
    np.testing.assert_array_equal(got, plane_by_plane(x, w, gk, "i8", accum_bits))
    assert (got != exact_products(x, w, gk)).any()


def test_a_risky_column_that_does_not_saturate_is_exact(plane_calls: list[int]) -> None:
    """Large weights flag the column (sum |w| * 128 > 2047), but small non-negative inputs keep every
    step of the accumulator in range: the result is the plain product."""
    rng = np.random.default_rng(5)
    w = rng.integers(4, 8, (32, 3))
    x = rng.integers(0, 3, (5, 32))  # every prefix <= 2 * 224 = 448
    got = macro.partial_sums(x, w, 32, "i8", 12)
    assert plane_calls == [3]
    np.testing.assert_array_equal(got[:, 0], x @ w)


# ---- weight packing -----------------------------------------------------------------------------


@pytest.mark.parametrize("wt", ["i4", "u4", "i8", "u8"])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 8, 33])
def test_pack_round_trip(wt: str, count: int) -> None:
    t = elem(wt)
    rng = np.random.default_rng(count)
    v = rng.integers(t.lo, t.hi + 1, count)
    v[: min(count, 2)] = [t.lo, t.hi][: min(count, 2)]  # the ends of the range
    raw = pack(v, wt)
    assert raw.dtype == np.uint8 and raw.size == t.packed_bytes(count) == (count * t.bits + 7) // 8
    back = unpack(raw, wt, count)
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, v)


def test_pack_nibble_order_and_two_s_complement() -> None:
    np.testing.assert_array_equal(pack(np.array([1, 2, 3]), "u4"), [0x21, 0x03])
    np.testing.assert_array_equal(pack(np.array([-1, -8, 7]), "i4"), [0x8F, 0x07])
    np.testing.assert_array_equal(pack(np.array([[-1, 127], [-128, 0]]), "i8"), [0xFF, 0x7F, 0x80, 0x00])
    np.testing.assert_array_equal(unpack(np.array([0x8F, 0x07], np.uint8), "i4", 3), [-1, -8, 7])
    np.testing.assert_array_equal(unpack(np.array([0x8F, 0x07], np.uint8), "u4", 4), [15, 8, 7, 0])
    np.testing.assert_array_equal(unpack(np.array([0xFF, 0x80], np.uint8), "u8", 2), [255, 128])


@pytest.mark.parametrize(("wt", "bad"), [("i4", 8), ("i4", -9), ("u4", 16), ("u4", -1), ("i8", 128), ("i8", -129),
                                         ("u8", 256), ("u8", -1)])
def test_pack_refuses_values_out_of_range(wt: str, bad: int) -> None:
    with pytest.raises(ValueError, match=f"outside the range of {wt}"):
        pack(np.array([0, bad, 1]), wt)


# ---- whole instructions -------------------------------------------------------------------------

X, XS, WS, WZ, OUT = 0x0000, 0x2000, 0x3000, 0x4000, 0x5000  # global buffer
WADDR = 0x40  # weights in the DRAM image
TILE = 1


def load(w: np.ndarray, wt: str, accum_bits: int) -> Machine:
    """A machine of 4 tiles of 4 macros (64 rows x 256 bitcells) with w loaded into tile 1, macro 0."""
    raw = w.astype("<f4").view(np.uint8).reshape(-1) if wt == "f32" else pack(w, wt)
    image = np.zeros(WADDR + raw.size + 64, np.uint8)
    image[WADDR:WADDR + raw.size] = raw
    m = Machine(np.zeros(0x6000, np.uint8), image, np.zeros(64, np.uint8), 0x100000, np.zeros(4, np.int64),
                (4, 4, 64, 256), accum_bits)
    run(m, "wload", tile=TILE, m0=0, k=w.shape[0], n=w.shape[1], wt=wt, src=Mem(1, WADDR, w.shape[1]))
    return m


def run(m: Machine, op: str, **fields: object) -> None:
    execute(m, Instr(op, fields).validate())


def mvm(m: Machine, x: np.ndarray, k: int, n: int, wt: str, xt: str, gk: int = 0, *, acc: int = 0,
        xs: np.ndarray | None = None, ws: np.ndarray | None = None, wst: str = "f32",
        z: np.ndarray | None = None) -> np.ndarray:
    """Write the operands into the global buffer, run one mvm and return its nvec x n result."""
    groups = len(ref_groups(k, gk))
    xcols = 2 if xt == "u8" else groups  # u8: each vector's scale and zero point
    nvec = x.shape[0]
    m.view(Mem(0, X, k), nvec, k, dtype=elem(xt).numpy, write=True)[...] = x
    if xs is not None:
        m.view(Mem(0, XS, xcols), nvec, xcols, write=True)[...] = xs
    if ws is not None:
        m.view(Mem(0, WS, n), groups, n, dtype=elem(wst).numpy, write=True)[...] = ws
    if z is not None:
        m.view(Mem(0, WZ, n), groups, n, dtype="u1", write=True)[...] = z
    run(m, "mvm", tile=TILE, m0=0, k=k, n=n, wt=wt, xt=xt, gk=gk, acc=acc, nvec=nvec, wst=wst, dst=Mem(0, OUT, n),
        src=Mem(0, X, k), xs=Mem(0, XS, xcols), ws=Mem(0, WS, n), wz=Mem(0, WZ, n))
    return np.array(m.view(Mem(0, OUT, n), nvec, n))


@pytest.mark.parametrize(("xt", "wt", "k", "gk", "wst", "accum_bits"), [
    ("i8", "i4", 48, 0, "f32", 24),
    ("i8", "i8", 80, 32, "f16", 12),  # partial last group, saturating
    ("u8", "u4", 40, 16, "f16", 16),
    ("i8", "u8", 64, 0, "f32", 32),
    ("u8", "i8", 100, 64, "f32", 10),  # saturating
    ("i8", "u4", 13, 4, "f32", 9),  # odd count of nibbles, saturating
    ("u8", "u8", 72, 32, "f32", 24),  # both zero points, a partial last group
    ("u8", "i4", 50, 0, "f16", 24),
    ("u8", "u8", 40, 0, "f32", 14),  # saturating
])
def test_integer_mvm_is_bit_exact(xt: str, wt: str, k: int, gk: int, wst: str, accum_bits: int) -> None:
    rng = np.random.default_rng(k + gk)
    n, nvec, groups = 7, 3, len(ref_groups(k, gk))
    w = random_ints(rng, wt, (k, n))
    m = load(w, wt, accum_bits)
    np.testing.assert_array_equal(m.macros[(TILE, 0)].weights, w)
    z = None if elem(wt).signed else rng.integers(0, elem(wt).hi + 1, (groups, n))
    ws = (rng.random((groups, n)) * 0.1 + 0.01).astype(elem(wst).numpy)
    y = np.zeros((nvec, n), F32)
    for acc in (0, 1):  # the second product accumulates onto the first
        x = random_ints(rng, xt, (nvec, k))
        xs = input_scales(rng, xt, nvec, groups)
        want = ref_mvm(x, w, gk, xt, accum_bits, xs, ws, z)
        y = y + want if acc else want
        np.testing.assert_array_equal(mvm(m, x, k, n, wt, xt, gk, acc=acc, xs=xs, ws=ws, wst=wst, z=z), y)
    if accum_bits <= 12:
        assert (ref_partial_sums(x, w, gk, xt, accum_bits) != exact_products(x, w, gk)).any(), "nothing saturated"


@pytest.mark.parametrize("wt", ["i8", "u8", "i4", "u4"])
def test_input_zero_points_give_the_exact_integer_product(wt: str) -> None:
    """u8 inputs with zero point xz stand for x - xz: when nothing saturates the result is
    f32(sum (x - xz)(w - z)) * (scale * ws), as onnxruntime's MatMulInteger then Mul computes it."""
    rng = np.random.default_rng(len(wt))
    k, n, gk, nvec = 96, 5, 32, 3
    w = random_ints(rng, wt, (k, n))
    z = None if elem(wt).signed else rng.integers(0, elem(wt).hi + 1, (3, n))
    x = random_ints(rng, "u8", (nvec, k))
    xz = rng.integers(0, 256, nvec)
    xs = np.stack([np.full(nvec, 0.03125), xz], axis=1).astype(F32)
    ws = np.full((3, n), 0.5, F32)
    got = mvm(load(w, wt, 32), x, k, n, wt, "u8", gk, xs=xs, ws=ws, z=z)
    wz = w - (0 if z is None else np.repeat(z, gk, axis=0))
    exact = (x - xz[:, None]).astype(np.int64) @ wz.astype(np.int64)
    np.testing.assert_array_equal(got, exact.astype(F32) * F32(0.015625))  # powers of two: the f32 sum is exact


def test_u8_zero_points_must_be_whole_numbers() -> None:
    rng = np.random.default_rng(4)
    m = load(random_ints(rng, "i8", (8, 4)), "i8", 24)
    x = random_ints(rng, "u8", (2, 8))
    with pytest.raises(SimError, match=r"u8 input zero points must be whole numbers 0\.\.255"):
        mvm(m, x, 8, 4, "i8", "u8", xs=np.array([[0.5, 3.5], [0.5, 1]], F32), ws=np.ones((1, 4), F32))
    with pytest.raises(SimError, match=r"u8 input zero points must be whole numbers 0\.\.255"):
        mvm(m, x, 8, 4, "i8", "u8", xs=np.array([[0.5, 256], [0.5, 1]], F32), ws=np.ones((1, 4), F32))


def test_zero_points_are_subtracted_exactly() -> None:
    """u4 weights with their zero points stand for W - z: the same result as the i4 weights W - 8
    with no zero point, when nothing saturates."""
    rng = np.random.default_rng(11)
    k, n, gk = 40, 5, 16
    w = rng.integers(0, 16, (k, n))
    x = random_ints(rng, "i8", (2, k))
    xs, ws = np.full((2, 3), 0.5, F32), np.full((3, n), 0.25, F32)
    unsigned = mvm(load(w, "u4", 24), x, k, n, "u4", "i8", gk, xs=xs, ws=ws, z=np.full((3, n), 8))
    signed = mvm(load(w - 8, "i4", 24), x, k, n, "i4", "i8", gk, xs=xs, ws=ws)
    np.testing.assert_array_equal(unsigned, signed)
    np.testing.assert_array_equal(signed, (x @ (w - 8)).astype(F32) * F32(0.125))


@pytest.mark.parametrize(("wt", "wst"), [("i4", "f32"), ("u4", "f16"), ("i8", "f16"), ("u8", "f32")])
def test_float_inputs_with_integer_weights(wt: str, wst: str) -> None:
    rng = np.random.default_rng(len(wt + wst))
    k, n, gk = 40, 6, 16
    groups = 3
    w = random_ints(rng, wt, (k, n))
    z = None if elem(wt).signed else rng.integers(0, elem(wt).hi + 1, (groups, n))
    m = load(w, wt, 12)  # the accumulator width plays no part in float compute
    # quarters and powers of two: every sum is exact in f32, whatever the order
    x = (rng.integers(-16, 17, (3, k)) / 4).astype(F32)
    ws = (2.0 ** -rng.integers(0, 4, (groups, n))).astype(elem(wst).numpy)
    got = mvm(m, x, k, n, wt, "f32", gk, ws=ws, wst=wst, z=z)
    np.testing.assert_array_equal(got, ref_float_mvm(x, w, gk, ws, z).astype(F32))
    x = rng.standard_normal((3, k)).astype(F32)
    ws = (rng.random((groups, n)) * 0.1).astype(elem(wst).numpy)
    np.testing.assert_allclose(mvm(m, x, k, n, wt, "f32", gk, ws=ws, wst=wst, z=z), ref_float_mvm(x, w, gk, ws, z),
                               rtol=1e-5, atol=1e-3)
    before = mvm(m, x, k, n, wt, "f32", gk, ws=ws, wst=wst, z=z)
    np.testing.assert_array_equal(mvm(m, x, k, n, wt, "f32", gk, acc=1, ws=ws, wst=wst, z=z), before + before)


def test_mvm_refuses_mismatched_types_and_groups() -> None:
    rng = np.random.default_rng(2)
    x = random_ints(rng, "i8", (2, 8))
    m = load(rng.standard_normal((8, 4)).astype(F32), "f32", 24)
    with pytest.raises(SimError, match="f32 weights take f32 inputs, not i8"):
        mvm(m, x, 8, 4, "f32", "i8")
    m = load(random_ints(rng, "i4", (8, 4)), "i4", 24)
    with pytest.raises(SimError, match="expects a 8 x 4 i8 weight group, but a 8 x 4 i4 group is loaded there"):
        mvm(m, x, 8, 4, "i8", "i8", xs=np.ones((2, 1), F32), ws=np.ones((1, 4), F32))
    with pytest.raises(SimError, match="expects a 8 x 3 i4 weight group, but a 8 x 4 i4 group"):
        mvm(m, x, 8, 3, "i4", "i8", xs=np.ones((2, 1), F32), ws=np.ones((1, 3), F32))
    with pytest.raises(SimError, match="integer weights take f32, i8 or u8 inputs, not i32"):
        mvm(m, x.astype(np.int32), 8, 4, "i4", "i32")


# ---- vquant -------------------------------------------------------------------------------------

Q, SC = 0x1000, 0x2000


def vquant(x: np.ndarray, group: int, asym: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Run vquant on x (rows x cols f32) with `group` columns per scale: (the i8 values, the scales);
    with asym (group 0), (the u8 values, each row's scale and zero point)."""
    rows, cols = x.shape
    groups = 2 if asym else len(ref_groups(cols, group))
    m = Machine(np.zeros(0x3000, np.uint8), np.zeros(64, np.uint8), np.zeros(64, np.uint8), 0x100000,
                np.zeros(4, np.int64), (1, 1, 64, 64), 24)
    m.view(Mem(0, 0, cols), rows, cols, write=True)[...] = x
    run(m, "vquant", tile=0, asym=asym, dst=Mem(0, Q, cols), sc=Mem(0, SC, groups), src=Mem(0, 0, cols), rows=rows,
        cols=cols, group=group)
    q = np.array(m.view(Mem(0, Q, cols), rows, cols, dtype="u1" if asym else "i1"))
    return q, np.array(m.view(Mem(0, SC, groups), rows, groups))


@pytest.mark.parametrize(("cols", "group"), [(32, 8), (20, 8), (17, 0), (24, 24)])
def test_vquant_values_and_scales(cols: int, group: int) -> None:
    rng = np.random.default_rng(cols + group)
    x = (rng.standard_normal((3, cols)) * rng.choice([0.01, 1, 100], (3, 1))).astype(F32)
    q, sc = vquant(x, group)
    for r in range(3):
        for g, cs in enumerate(ref_groups(cols, group)):
            s = F32(np.abs(x[r, cs]).max()) / F32(127)
            assert sc[r, g] == s
            want = np.clip(np.rint(x[r, cs] * (F32(1) / s)), -127, 127)
            np.testing.assert_array_equal(q[r, cs], want)
            assert np.abs(q[r, cs]).max() == 127  # the largest magnitude maps to +-127
            assert (np.abs(q[r, cs] * s - x[r, cs]) <= 0.5 * s * 1.0001).all()


def test_vquant_rounds_ties_to_even() -> None:
    x = np.array([[127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -4.5]], F32)  # max 127: s = 1, 1/s = 1
    q, sc = vquant(x, 0)
    assert sc[0, 0] == 1
    np.testing.assert_array_equal(q[0], [127, 0, 2, 2, 0, -2, -2, 4, 126, -4])


def test_vquant_all_zero_group() -> None:
    x = np.array([[0, 0, 0, 0, -15.875, 1, 0.5, 0], [0, 0, 0, 0, 0, 0, 0, 0]], F32)  # 15.875 / 127 = 1/8
    with np.errstate(all="raise"):  # no division by zero reaches the values, no invalid operation
        q, sc = vquant(x, 4)
    np.testing.assert_array_equal(sc, [[0, 0.125], [0, 0]])
    np.testing.assert_array_equal(q, [[0, 0, 0, 0, -127, 8, 4, 0], [0] * 8])


def test_vquant_clips_at_127() -> None:
    """x * (1/s) only leaves [-127, 127] when 1/s overflows (s subnormal): then +-inf clips to +-127."""
    x = np.array([[1e-39, -1e-39, 1e-39, -1e-39, 3.0, -3.0, 1.0, 0]], F32)
    with np.errstate(over="ignore"):
        q, sc = vquant(x, 4)
        assert 0 < sc[0, 0] < np.finfo(F32).smallest_normal and np.isinf(F32(1) / sc[0, 0])
    np.testing.assert_array_equal(q[0], [127, -127, 127, -127, 127, -127, 42, 0])


# ---- vquant asym: onnxruntime's DynamicQuantizeLinear ----------------------------------------------


@pytest.fixture(scope="module")
def dynamic_quantize() -> ort.InferenceSession:
    """onnxruntime's DynamicQuantizeLinear CPU kernel on an f32 [rows, cols] input."""
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    graph = helper.make_graph([node], "dql", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", "c"])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, ["r", "c"]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
                               helper.make_tensor_value_info("z", TensorProto.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


ASYM_INPUTS = {
    "normal": lambda rng: rng.standard_normal((5, 48)).astype(F32),
    "wide": lambda rng: (rng.standard_normal((3, 70)) * rng.choice([1e-3, 1, 1e3], (3, 1))).astype(F32),
    "positive": lambda rng: np.abs(rng.standard_normal((4, 16))).astype(F32) + 0.25,  # lo = 0: z = 0
    "negative": lambda rng: -np.abs(rng.standard_normal((4, 16))).astype(F32) - 0.25,  # hi = 0: z = 255
    "zeros": lambda rng: np.zeros((2, 8), F32),  # hi == lo: s = 1, z = 0
    "one-row": lambda rng: rng.standard_normal((1, 33)).astype(F32),
    "ties": lambda rng: np.array([[-1.0, 254.0 / 255 * 2.5, 0.5, 1.5, 2.5, 3.5, 254.0, -0.5]], F32),
}


@pytest.mark.parametrize("case", ASYM_INPUTS)
def test_vquant_asym_is_onnxruntimes_dynamic_quantize_linear(case: str, dynamic_quantize) -> None:
    """Bit for bit: the u8 values, the scale and the zero point of onnxruntime's CPU kernel."""
    x = ASYM_INPUTS[case](np.random.default_rng(len(case)))
    want_q, want_s, want_z = dynamic_quantize.run(None, {"x": x})
    q, sc = vquant(x, 0, asym=1)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(sc[:, 0], np.full(x.shape[0], want_s, F32))
    np.testing.assert_array_equal(sc[:, 1], np.full(x.shape[0], want_z, F32))


def test_vquant_asym_by_hand() -> None:
    """[-1, 0.5, 3]: lo = -1, hi = 3, s = 4/255, z = rne(255/4) = 64; q = clip(rne(x / s) + 64)."""
    q, sc = vquant(np.array([[-1.0, 0.5, 3.0], [0.0, 2.0, -0.25]], F32), 0, asym=1)
    s = F32(4) / F32(255)
    assert sc[0, 0] == sc[1, 0] == s and sc[0, 1] == sc[1, 1] == 64
    want = np.clip(np.rint(np.array([[-1.0, 0.5, 3.0], [0.0, 2.0, -0.25]], F32) / s) + 64, 0, 255)
    np.testing.assert_array_equal(q, want)
    assert q[0, 0] == 0 and q[0, 2] == 255  # the ends of the range land on the ends of u8


def test_vquant_asym_takes_no_groups() -> None:
    with pytest.raises(SimError, match="asym quantizes the whole block, so group must be 0, not 8"):
        vquant(np.ones((2, 16), F32), 8, asym=1)
