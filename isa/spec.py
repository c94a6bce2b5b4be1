"""The instruction set of the cimc CIM accelerator, as one table.

Each `InstrDef` row gives the mnemonic, opcode, operand fields, the unit that executes it, the
cost class the cost model charges, the semantics (pseudo-code) and a one-line doc. The encoder
and decoder (`isa.encoding`), assembler and disassembler (`isa.asm`), the interpreter's dispatch
(`runtime.semantics` must implement every row), the cost model (`isa.cost`) and `docs/isa.md`
are all driven from `INSTRS`; checks at import keep opcodes unique and fields inside the word.

Machine model (see docs/isa.md): `tiles` tiles of `macros_per_tile` SRAM CIM macros, each tile
with its own vector/special-function unit (SFU); a global buffer `g` for activations; DRAM `d`
holding the weight/constant image, inputs, outputs and spilled activations; one interconnect.
Every instruction is 64 bytes. Word 0 holds the opcode (bits 0-7) and the barrier it signals on
completion (`sig`, bits 8-13, 0 = none); word 1 is the mask of barriers it waits for (`wait`).
Units execute their instructions in program order; across units, only barriers order work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from isa.fields import DIM, DTYPE, F32, FLAG, MEM, WTYPE, Kind, U

WORD_BITS = 64
INSTR_WORDS = 8
INSTR_BYTES = INSTR_WORDS * 8
OPCODE_BITS = 8
SIG_SHIFT, SIG_BITS = 8, 6
HEADER_BITS = 16  # opcode + sig + 2 spare bits in word 0; word 1 is the wait mask
N_BARRIERS = 1 << SIG_BITS  # barrier 0 means "none"

#: Units an instruction may run on. `tile` and `sfu` are replicated per tile (the `tile` field
#: picks one); `ctrl` instructions take no unit time.
UNITS: tuple[str, ...] = ("ctrl", "dram", "reduce", "tile", "sfu")


@dataclass(frozen=True)
class FieldDef:
    """One operand: its name, kind, and placement (word index, bit shift) filled by the packer."""

    name: str
    kind: Kind
    doc: str
    word: int = -1
    shift: int = -1


@dataclass(frozen=True, eq=False)
class InstrDef:
    """One row of the ISA table."""

    mnemonic: str
    opcode: int
    fields: tuple[FieldDef, ...]
    unit: str
    cost: str
    semantics: str
    doc: str
    #: SFU primitive operations per output element (for `cost == "sfu"`): add, mul, exp, recip.
    sfu_ops: dict[str, float] = field(default_factory=dict)

    def field(self, name: str) -> FieldDef:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @functools.cached_property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


def _f(name: str, kind: Kind, doc: str) -> FieldDef:
    return FieldDef(name, kind, doc)


TILE = _f("tile", U(8), "tile index (its macros, or its SFU)")
DT = _f("dt", DTYPE, "element type of the operands")
ROWS = _f("rows", DIM, "rows")
COLS = _f("cols", DIM, "columns")


def _dst(doc: str = "destination") -> FieldDef:
    return _f("dst", MEM, doc)


def _vbin(mnemonic: str, opcode: int, op: str, sem: str, ops: dict[str, float]) -> InstrDef:
    return InstrDef(
        mnemonic, opcode,
        (TILE, _dst(), _f("a", MEM, "left operand"), _f("b", MEM, "right operand"), ROWS, COLS,
         _f("abc", FLAG, "a is one column broadcast across columns"),
         _f("bbc", FLAG, "b is one column broadcast across columns")),
        "sfu", "sfu", f"dst[r,c] = {sem}", f"elementwise {op} of two 2-D operands on a tile's SFU",
        ops,
    )


def _vun(mnemonic: str, opcode: int, sem: str, doc: str, ops: dict[str, float]) -> InstrDef:
    return InstrDef(
        mnemonic, opcode, (TILE, _dst(), _f("src", MEM, "source"), ROWS, COLS),
        "sfu", "sfu", f"dst[r,c] = {sem}", doc, ops,
    )


_ROWS_DOC = "rows (tokens) to process"

_TABLE: tuple[InstrDef, ...] = (
    # ---- control -------------------------------------------------------------------------
    InstrDef("halt", 0x00, (), "ctrl", "ctrl", "stop; the program's outputs are final",
             "end of program"),
    InstrDef("sync", 0x01, (), "ctrl", "ctrl",
             "wait until every barrier in `wait` is clear, then signal `sig`",
             "stage synchronisation: join barriers into one (no unit time)"),
    # ---- data movement -------------------------------------------------------------------
    InstrDef("dma", 0x10, (_dst(), _f("src", MEM, "source"), ROWS, COLS, DT), "dram", "dma",
             "dst[r,c] = src[r,c]",
             "copy a 2-D region between DRAM and the global buffer (or within the buffer, through its "
             "ports)"),
    InstrDef("gather", 0x11,
             (_dst(), _f("table", MEM, "row table in DRAM"), _f("idx", MEM, "i32 row indices"),
              _f("n", DIM, "number of indices"), COLS, _f("vocab", U(24), "rows in the table")),
             "dram", "gather",
             "for i < n: assert 0 <= idx[i] < vocab; dst[i,:] = table[idx[i], :cols]",
             "embedding lookup: gather table rows from DRAM by index"),
    InstrDef("wload", 0x12,
             (TILE, _f("m0", U(8), "first macro of the group in the tile"),
              _f("k", U(16), "weight rows (reduction length)"),
              _f("n", U(16), "weight columns (outputs)"),
              _f("wt", WTYPE, "weight type: f32, or an integer type of `macro.weight_bits`"),
              _f("src", MEM, "weight group in DRAM, k x n row-major, packed (4-bit types two to a byte, "
                 "low nibble first)")),
             "tile", "macro_write",
             "W[tile, m0] = src[0:k, 0:n]   (macros m0 .. m0 + ceil(k/rows)*ceil(n*bits(wt)/cols) - 1)",
             "load a weight group from DRAM into a tile's CIM macros (uses the DRAM channel too)"),
    InstrDef("mvm", 0x13,
             (TILE, _f("m0", U(8), "first macro of the loaded group"),
              _f("k", U(16), "weight rows"), _f("n", U(16), "weight columns"),
              _f("wt", WTYPE, "weight type of the loaded group"),
              _f("xt", DTYPE, "input type, fed bit-serially: bits(xt) input bits (f32: 32, float compute; u8: "
                 "with a zero point per vector)"),
              _f("gk", U(16), "rows per partial-sum group with its own scales (0: all k rows)"),
              _f("acc", FLAG, "accumulate into dst instead of overwriting"),
              _f("nvec", DIM, _ROWS_DOC), _f("wst", DTYPE, "element type of the weight scales"),
              _dst("results, nvec x n f32"), _f("src", MEM, "input vectors, nvec x k of type xt"),
              _f("xs", MEM, "input scales: nvec x G f32 (i8 inputs), or nvec x 2 f32, each vector's scale and "
                 "zero point (u8 inputs)"),
              _f("ws", MEM, "weight scales, G x n of type wst (integer weights)"),
              _f("wz", MEM, "weight zero points, G x n u8 (unsigned weight types)")),
             "tile", "mvm",
             "G = ceil(k/gk) groups of gk rows (gk = 0: one group of all k rows).\n"
             "f32 weights (f32 inputs): dst (+)= src @ W.\n"
             "integer weights: a signed type holds W = Q as stored (z = 0); an unsigned one stands for\n"
             "W = Q - z with a zero point z[g,j] = wz[g,j] per group and column.\n"
             "integer inputs (i8, u8): for each vector r, group g, column j the macros feed the input bit\n"
             "planes b = 0 .. bits(xt)-1 of src[r, rows of g] (two's complement: the top plane of a signed\n"
             "type counts -2^b) through the adder tree, p_b = sum_k bit_b(src[r,k]) * Q[k,j] (exact; Q the\n"
             "stored weights), and accumulate acc = sat(acc + 2^b p_b) in macro.accum_bits bits, saturating\n"
             "at every step. i8 inputs have scale s[r,g] = xs[r,g] and zero point xz[r] = 0; u8 inputs have\n"
             "s[r,g] = xs[r,0] for every g and xz[r] = xs[r,1] (a whole number 0..255). The tile's SFU makes\n"
             "acc exact over the zero points (integers; K_g rows in group g; sum_k Q[k,j] is one all-ones\n"
             "input plane through the adder tree):\n"
             "c = acc - z[g,j] * sum_k src[r,k] - xz[r] * sum_k Q[k,j] + K_g * xz[r] * z[g,j],\n"
             "which is sum_k (src[r,k] - xz[r]) * (Q[k,j] - z[g,j]) when nothing saturated; then it adds\n"
             "f32(c) * (s[r,g] * ws[g,j]) over g in order, in f32: dst[r,j] (+)= that sum.\n"
             "f32 inputs: dst[r,j] (+)= sum over g in order of (src[r, rows of g] @ (W - z)[rows of g, j]) * ws[g,j],\n"
             "in f32",
             "matrix-vector multiply in a tile's macros, one input vector after another; integer partial sums "
             "are rescaled to f32 by the tile's SFU as they leave the macros"),
    InstrDef("tred", 0x14,
             (_dst(), _f("src", MEM, "first partial-sum slice"), ROWS, COLS,
              _f("count", U(8), "number of partial-sum slices"),
              _f("pstride", U(32), "bytes between slices")),
             "reduce", "reduce",
             "dst[r,c] = sum_i src_i[r,c],  src_i at src.addr + i*pstride",
             "add the partial sums of a K split (from several tiles) in the adder next to the global buffer"),
    # ---- vector / special function -------------------------------------------------------
    _vbin("vadd", 0x20, "add", "a[r,c] + b[r,c]", {"add": 1}),
    _vbin("vsub", 0x21, "subtract", "a[r,c] - b[r,c]", {"add": 1}),
    _vbin("vmul", 0x22, "multiply", "a[r,c] * b[r,c]", {"mul": 1}),
    _vbin("vdiv", 0x23, "divide", "a[r,c] / b[r,c]", {"recip": 1, "mul": 1}),
    _vbin("vmax", 0x24, "maximum", "max(a[r,c], b[r,c])", {"add": 1}),
    _vbin("vpow", 0x25, "power", "a[r,c] ** b[r,c]   (exp(b * log a), priced as two exponentials)",
          {"exp": 2, "mul": 1}),
    _vun("vcopy", 0x30, "src[r,c]", "copy a 2-D operand (layout change) on an SFU", {}),
    _vun("vneg", 0x31, "-src[r,c]", "negate", {"add": 1}),
    _vun("vexp", 0x32, "exp(src[r,c])", "exponential", {"exp": 1}),
    _vun("vsqrt", 0x33, "sqrt(src[r,c])", "square root", {"recip": 1}),
    _vun("vrsqrt", 0x34, "1/sqrt(src[r,c])", "reciprocal square root", {"recip": 1}),
    _vun("vrecip", 0x35, "1/src[r,c]", "reciprocal", {"recip": 1}),
    _vun("vsigmoid", 0x36, "1/(1+exp(-src[r,c]))", "logistic sigmoid", {"exp": 1, "add": 1, "recip": 1}),
    _vun("vsilu", 0x37, "src[r,c]/(1+exp(-src[r,c]))", "SiLU (swish)",
         {"exp": 1, "add": 1, "recip": 1, "mul": 1}),
    _vun("vtanh", 0x38, "tanh(src[r,c])", "hyperbolic tangent", {"exp": 1, "add": 2, "recip": 1, "mul": 1}),
    _vun("vgelu", 0x39, "0.5*src*(1+erf(src/sqrt(2)))", "GELU (exact, erf form)",
         {"exp": 1, "add": 2, "recip": 1, "mul": 3}),
    _vun("vgelut", 0x3B, "0.5*src*(1+tanh(sqrt(2/pi)*(src+0.044715*src^3)))",
         "GELU, tanh approximation (ONNX Gelu approximate=tanh, GPT-2's gelu_new, FastGelu)",
         {"exp": 1, "add": 4, "recip": 1, "mul": 7}),
    _vun("verf", 0x3D, "erf(src[r,c])", "error function (ONNX Erf; GELU's erf form is vgelu)",
         {"exp": 1, "add": 1, "recip": 1, "mul": 2}),
    InstrDef("vsoftcap", 0x3C,
             (TILE, _dst(), _f("src", MEM, "source"), ROWS, COLS, _f("cap", F32, "the cap, > 0")),
             "sfu", "sfu", "dst[r,c] = cap * tanh(src[r,c] / cap)",
             "soft-capping (Gemma2's attention-logit and final-logit capping, GroupQueryAttention's softcap)",
             {"exp": 1, "add": 2, "recip": 1, "mul": 3}),
    InstrDef("vaffine", 0x3A,
             (TILE, _dst(), _f("src", MEM, "source"), ROWS, COLS,
              _f("alpha", F32, "scale"), _f("beta", F32, "offset")),
             "sfu", "sfu", "dst[r,c] = src[r,c] * alpha + beta", "scale and offset by immediates",
             {"mul": 1, "add": 1}),
    InstrDef("vrsum", 0x40, (TILE, _dst("one column, rows x 1"), _f("src", MEM, "source"), ROWS, COLS),
             "sfu", "sfu", "dst[r,0] = sum_c src[r,c]", "row sum", {"add": 1}),
    InstrDef("vrmax", 0x41, (TILE, _dst("one column, rows x 1"), _f("src", MEM, "source"), ROWS, COLS),
             "sfu", "sfu", "dst[r,0] = max_c src[r,c]   (-inf over no columns)", "row maximum", {"add": 1}),
    InstrDef("vrope", 0x42,
             (TILE, _dst(), _f("src", MEM, "source, heads x hd columns per row"),
              _f("cos", MEM, "cos table, rd columns, one row per position"), _f("sin", MEM, "sin table"),
              ROWS, COLS, _f("hd", U(16), "head dimension"),
              _f("rd", U(16), "rotated entries at the start of each head, in halves (0: all hd)")),
             "sfu", "sfu",
             "d = rd or hd; for each head h, i < d/2: x1 = src[r, h*hd+i], x2 = src[r, h*hd+i+d/2];\n"
             "dst[r, h*hd+i] = x1*cos[r,i] - x2*sin[r,i];  "
             "dst[r, h*hd+i+d/2] = x2*cos[r,i+d/2] + x1*sin[r,i+d/2];\n"
             "dst[r, h*hd+i] = src[r, h*hd+i] for d <= i < hd   (priced as a copy)",
             "rotary position embedding (rotate-half form) on every head of a row, or on its first rd entries",
             {"mul": 2, "add": 1}),
    InstrDef("vmm", 0x43,
             (TILE, _dst("m x n"), _f("a", MEM, "m x k"), _f("b", MEM, "k x n, or n x k if tb"),
              _f("m", DIM, "rows of a"), _f("k", DIM, "reduction length"), _f("n", DIM, "columns"),
              _f("tb", FLAG, "b is stored transposed (n x k)"),
              _f("acc", FLAG, "accumulate into dst instead of overwriting"),
              _f("alpha", F32, "scale of the product")),
             "sfu", "sfu", "dst (+)= alpha * (a @ (b.T if tb else b))",
             "small matrix product of two activations on an SFU (attention scores, P@V)",
             {"mul": 1, "add": 1}),
    InstrDef("vquant", 0x45,
             (TILE, _f("asym", FLAG, "onnxruntime's DynamicQuantizeLinear: asymmetric u8 over the whole block"),
              _dst("quantized values, rows x cols i8 (u8 with asym)"),
              _f("sc", MEM, "scales, rows x G f32 (asym: rows x 2, each row's scale and zero point)"),
              _f("src", MEM, "source, rows x cols f32"), ROWS, COLS,
              _f("group", U(16), "columns per scale (0: the whole row; asym: must be 0)")),
             "sfu", "sfu",
             "asym = 0: for each row r and group g of `group` columns: s = max |src[r, g]| / 127; sc[r,g] = s;\n"
             "dst[r,c] = clip(round_half_even(src[r,c] * (s ? 1/s : 0)), -127, 127)   (i8, f32 arithmetic)\n"
             "asym = 1: one scale and zero point for the whole rows x cols block (group = 0):\n"
             "lo = min(0, min src), hi = max(0, max src); s = hi == lo ? 1 : (hi - lo) / 255;\n"
             "z = round_half_even(clip(0 - lo / s, 0, 255));\n"
             "dst[r,c] = clip(round_half_even(src[r,c] / s) + z, 0, 255)   (u8, f32 arithmetic);\n"
             "sc[r,0] = s, sc[r,1] = z for every row r   (priced at add 3, mul 1, recip 1 per element,\n"
             "src read twice: its range, then its values)",
             "dynamic quantization of activations: symmetric int8 per row and group, or (asym) asymmetric uint8 "
             "over the whole block",
             {"add": 2, "mul": 1}),
    InstrDef("vcausal", 0x44, (TILE, _dst("scores, updated in place"), ROWS, COLS,
                               _f("diag", DIM, "column offset of the diagonal"),
                               _f("window", U(32), "keys each query sees, itself included (0: all before it)"),
                               _f("one", FLAG, "every row is the same query (the heads of one token)")),
             "sfu", "sfu",
             "p = diag + (0 if one else r);  dst[r,c] = -inf where c > p or (window > 0 and c <= p - window)\n"
             "(priced at one compare per element, two with a window)",
             "causal mask, optionally sliding-window: hide future positions, and those `window` or more "
             "behind, from each query row", {"add": 1}),
)


def _pack(instr: InstrDef) -> InstrDef:
    """Place each field in the first word (in order) with room, never straddling words."""
    word, used = 0, HEADER_BITS
    placed = []
    for f in instr.fields:
        if used + f.kind.bits > WORD_BITS:
            word, used = (2 if word == 0 else word + 1), 0
        if word >= INSTR_WORDS:
            raise AssertionError(f"{instr.mnemonic}: fields do not fit in {INSTR_BYTES} bytes")
        placed.append(FieldDef(f.name, f.kind, f.doc, word, used))
        used += f.kind.bits
    return InstrDef(instr.mnemonic, instr.opcode, tuple(placed), instr.unit, instr.cost,
                    instr.semantics, instr.doc, instr.sfu_ops)


INSTRS: tuple[InstrDef, ...] = tuple(_pack(i) for i in _TABLE)
BY_NAME: dict[str, InstrDef] = {i.mnemonic: i for i in INSTRS}
BY_OPCODE: dict[int, InstrDef] = {i.opcode: i for i in INSTRS}

COST_CLASSES = ("ctrl", "dma", "gather", "macro_write", "mvm", "reduce", "sfu")
SFU_OPS = ("add", "mul", "exp", "recip")


def _check_table() -> None:
    assert len(BY_NAME) == len(INSTRS), "duplicate mnemonic"
    assert len(BY_OPCODE) == len(INSTRS), "duplicate opcode"
    for i in INSTRS:
        assert 0 <= i.opcode < (1 << OPCODE_BITS), i.mnemonic
        assert i.unit in UNITS and i.cost in COST_CLASSES, i.mnemonic
        assert set(i.sfu_ops) <= set(SFU_OPS), i.mnemonic
        assert (i.unit in ("tile", "sfu")) == ("tile" in i.field_names), i.mnemonic
        names = i.field_names
        assert len(set(names)) == len(names) and not {"sig", "wait"} & set(names), i.mnemonic
        for f in i.fields:
            assert f.word != 1 and f.shift + f.kind.bits <= WORD_BITS, (i.mnemonic, f.name)


_check_table()
