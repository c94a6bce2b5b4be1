"""Code generation: a scheduled module becomes a `Program` (instructions + DRAM image).

Order of emission follows the IR, with weight loads interleaved by stage: the loads of the first
`sets` stages are issued at the start, and right after stage s computes, a `sync` joins its MVMs
into the stage's barrier and the loads of stage s + sets (same macro set) are issued waiting on
it. Units run their own instructions in order; across units, every op signals one data barrier
(all its instructions), consumers wait on their producers' barriers, and an op writing memory
that earlier values used waits on the barriers of those values' readers (write-after-read).

The DRAM image is: the weight stream (place-weights' layout), then constants (embedding tables,
norm weights, biases, RoPE tables), then the read-write region for inputs, outputs and spills.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import product

import numpy as np

from cimc.ir.core import CTX, SEQ, Module, Op, Value
from cimc.ir.ops import GELU_FORMS, Piece, traits
from cimc.ir.quant import QuantWeight, materialize, weight_values
from isa.dtypes import ACT, elem, pack_blocks
from isa.encoding import Instr, encode
from isa.fields import REGS, SPACES, Dim, Mem
from isa.hw import HardwareConfig
from isa.program import ArraySegment, DebugInfo, DramImage, Entry, Program, Symbol
from isa.spec import N_BARRIERS
from passes.schedule import attention_shape, last_uses, reads, scratch_bytes, scratch_layout, value_bytes
from passes.tiling import Tiling, align
from passes.traffic import min_traffic

G, D = SPACES.index("g"), SPACES.index("d")  # memory spaces
PAST = REGS.index("past")  # register offsetting the rows of position-indexed operands
SEQ_DIM, PAST_DIM, CTX_DIM = (Dim(REGS.index(r), 0) for r in ("seq", "past", "ctx"))  # sizes from registers
DATA_BARRIERS = range(1, 48)
STAGE_BARRIERS = range(48, N_BARRIERS)
F32 = elem(ACT).nbytes  # activations, partial sums and scales

WeightSource = Callable[[str], np.ndarray]
#: The instruction of each form of `gelu` (its `approximate`, cimc.ir.ops.GELU_FORMS).
GELU_INSTRS = dict(zip(GELU_FORMS, ("vgelu", "vgelut"), strict=True))


def stage_barrier(s: int) -> int:
    """The barrier stage s's sync signals once all its MVMs are done."""
    return STAGE_BARRIERS[s % len(STAGE_BARRIERS)]


def free_barrier(start: int, mask: int) -> int:
    """The data barrier an op signals: the `start`-th in turn, or the next one not in `mask`, the
    barriers it waits on. Barriers are reused round-robin, so an older op may share one; an op
    waiting on its own barrier would wait for its own earlier instructions (its MVMs would run one
    after another)."""
    n = len(DATA_BARRIERS)
    return next((b for j in range(n) if not (mask >> (b := DATA_BARRIERS[(start + j) % n])) & 1),
                DATA_BARRIERS[start % n])


def load_wait(s: int, sets: int) -> int:
    """The wait mask of stage s's weight loads: the sync of the last stage that used their macro set."""
    return 1 << stage_barrier(s - sets) if s >= sets else 0


def group_tile(sets: list[list[int]], s: int, slot0: int, g: int) -> int:
    """The tile that holds group g of a linear (whose first group has slot `slot0`) in stage s."""
    return sets[s % len(sets)][(slot0 + g) % len(sets[0])]


class StageOrder:
    """Where weight loads and stage syncs go among the MVMs, as codegen emits them (balance-stages
    prices its candidates in the same order): the loads of the first `sets` stages before the
    first MVM (after the embedding gather, so it is not queued behind them); after the last MVM
    of stage s, its sync, then the loads of stage s + sets, the next user of its macro set."""

    def __init__(self, sizes: list[int], sets: int) -> None:
        self.left, self.sets, self.started = list(sizes), sets, False

    def first_loads(self) -> list[int]:
        """Before an MVM: the stages to load now (the first `sets`, before the very first MVM)."""
        if self.started:
            return []
        self.started = True
        return list(range(min(self.sets, len(self.left))))

    def after_mvm(self, s: int) -> tuple[bool, list[int]]:
        """After an MVM of stage s: whether stage s's sync follows, and the stages to load then."""
        self.left[s] -= 1
        if self.left[s]:
            return False, []
        return True, [s + self.sets] if s + self.sets < len(self.left) else []


def _space(attr: dict) -> int:
    """The memory space of a `mem` or `scratch` attribute."""
    return G if attr["space"] == "g" else D


@dataclass(frozen=True)
class GroupSegment:
    """A linear's weight groups in stream order, produced one group at a time: each group's
    weights (f32, or packed integers followed by their scales and zero points, `Tiling.parts`)."""

    offset: int
    size: int
    tiling: Tiling
    matrix: Callable[[], np.ndarray | QuantWeight]  # the [K, N] weight (may be a transposed memory map)

    def chunks(self) -> Iterator[np.ndarray]:
        w = self.matrix()
        t = self.tiling
        if isinstance(w, QuantWeight):
            yield self._quantized(w)
            return
        pos = 0
        for _, k0, k1, n0, n1, off in t.layout(self.offset):
            if off > self.offset + pos:
                yield np.zeros(off - self.offset - pos, np.uint8)
                pos = off - self.offset
            block = np.ascontiguousarray(w[k0:k1, n0:n1], dtype="<f4")
            yield block
            pos += block.nbytes
        if pos < self.size:
            yield np.zeros(self.size - pos, np.uint8)

    def _quantized(self, w: QuantWeight) -> np.ndarray:
        """The whole segment: every group's packed weights, scales and zero points."""
        t = self.tiling
        out = np.zeros(self.size, np.uint8)
        layout = list(t.layout(0))
        pack_blocks(w.q, t.wt, np.array([(k0, k1, n0, n1, off) for _, k0, k1, n0, n1, off in layout]), out)
        stype = elem(t.st).np()
        for g, (_, k0, k1, n0, n1, off) in enumerate(layout):
            scales_at, zero_at, _ = t.parts(g)
            g0, g1 = (k0 // t.gk, -(-k1 // t.gk)) if t.gk else (0, 1)
            scales = np.ascontiguousarray(w.scales[g0:g1, n0:n1], dtype=stype).view(np.uint8).reshape(-1)
            out[off + scales_at:off + scales_at + len(scales)] = scales
            if w.zero is not None:
                zero = np.ascontiguousarray(w.zero[g0:g1, n0:n1], dtype=np.uint8).reshape(-1)
                out[off + zero_at:off + zero_at + len(zero)] = zero
        return out


@dataclass
class _Codegen:
    module: Module
    hw: HardwareConfig
    weight: WeightSource
    name: str = "prefill"
    instrs: list[Instr] = field(default_factory=list)
    dbg: list[int] = field(default_factory=list)
    op_index: int = 0
    const_addr: dict[int, int] = field(default_factory=dict)
    barrier: dict[int, int] = field(default_factory=dict)  # id(op) -> its data barrier
    readers: dict[int, int] = field(default_factory=dict)  # id(value) -> mask of reader barriers
    retired: list[tuple[int, int, int, int]] = field(default_factory=list)  # (space, lo, hi, mask)
    layouts: dict[int, list[tuple[int, int, int, int, int, int]]] = field(default_factory=dict)
    tilings: dict[int, Tiling] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.max_seq = self.module.max_seq
        self.bounds = self.module.bounds
        self.rw_base = 0
        self.tiles = self.hw.chip.tiles

    # ---- emission helpers ----------------------------------------------------------------

    def emit(self, op: str, sig: int = 0, wait: int = 0, **fields: object) -> None:
        self.instrs.append(Instr(op, fields, sig, wait))
        self.dbg.append(self.op_index)

    def dim(self, d: object) -> Dim:
        if d == SEQ:
            return SEQ_DIM
        return CTX_DIM if d == CTX else Dim(0, int(d))  # type: ignore[call-overload]

    def rows(self, v: Value) -> Dim:
        return self.dim(v.type.shape[0]) if v.type.rank >= 1 else Dim(0, 1)

    def bound_rows(self, v: Value) -> int:
        return v.type.bound_shape(self.bounds)[0]

    @staticmethod
    def cols(v: Value) -> int:
        return int(v.type.shape[1]) if v.type.rank == 2 else (int(v.type.shape[0]) if v.type.rank == 1 else 1)

    def mem(self, v: Value, col: int = 0, stride: int | None = None) -> Mem:
        """The memory operand of value `v`, starting at column `col`."""
        op = v.owner
        assert op is not None
        if traits(op).constant:
            base, space, st = self.const_addr[id(v)], D, self.cols(v)
        else:
            m = op.attrs["mem"]
            space = _space(m)
            base = m["addr"] + (self.rw_base if space == D else 0)
            st = m["stride"]
        return Mem(space, base + col * F32, st if stride is None else stride)

    def scratch(self, op: Op, name: str, col: int = 0) -> Mem:
        s = op.attrs["scratch"]
        space = _space(s)
        base = s["addr"] + (self.rw_base if space == D else 0)
        for n, off, _, cols, esize in scratch_layout(op, self.bounds):
            if n == name:
                return Mem(space, base + off + col * esize, cols)
        raise KeyError(name)

    def waits(self, op: Op) -> int:
        """Barriers an op waits on: its producers (RAW) and the readers of memory it reuses (WAR)."""
        mask = 0
        for v in reads(op):
            if v.owner is not None and id(v.owner) in self.barrier:
                mask |= 1 << self.barrier[id(v.owner)]
        for space, lo, hi in self._regions(op):
            for s2, lo2, hi2, m in self.retired:
                if s2 == space and lo < hi2 and lo2 < hi:
                    mask |= m
        return mask

    def _regions(self, op: Op) -> list[tuple[int, int, int]]:
        """(space, lo, hi) of the memory an op writes: its result and its scratch."""
        out = []
        if "mem" in op.attrs and op.results:
            m = op.attrs["mem"]
            out.append((_space(m), m["addr"], m["addr"] + value_bytes(op.results[0], self.bounds)))
        scratch = self._scratch_region(op)
        return out + ([scratch] if scratch is not None else [])

    def _scratch_region(self, op: Op) -> tuple[int, int, int] | None:
        if "scratch" not in op.attrs:
            return None
        s = op.attrs["scratch"]
        size = scratch_bytes(op, self.bounds)
        return (_space(s), s["addr"], s["addr"] + size)

    # ---- driver --------------------------------------------------------------------------

    def run(self) -> tuple[Entry, DramImage]:
        """Emit this module's code; returns the entry and the DRAM image it expects."""
        image = DramImage()
        self._layout_weights(image)
        self._layout_consts(image)
        self.rw_base = align(image.size, 4096)
        self.op_pos = {id(op): i for i, op in enumerate(self.module.ops)}
        self.stage_ops: dict[int, set[int]] = {}
        self.n_sets = len(self.module.attrs["macro_sets"])
        self.op_groups: dict[int, list[tuple[int, int, int]]] = {}  # id(linear) -> its (stage, group, tile)
        self.stages = self._plan_stages()
        self.order = StageOrder([len(s) for s in self.stages], self.n_sets)
        last = last_uses(self.module)
        dying: dict[int, list[Value]] = {}
        for op in self.module.ops:
            for v in op.results:
                dying.setdefault(last[id(v)], []).append(v)
        for i, op in enumerate(self.module.ops):
            self.op_index = i
            if traits(op).unit != "none":
                self.op_wait = self.waits(op)  # fixed while the op is emitted (nothing retires meanwhile)
                self.barrier[id(op)] = free_barrier(i, self.op_wait)
                getattr(self, f"_op_{op.name}")(op)
                bit = 1 << self.barrier[id(op)]
                for v in reads(op):
                    self.readers[id(v)] = self.readers.get(id(v), 0) | bit
                scratch = self._scratch_region(op)
                if scratch is not None:
                    self._retire_region(*scratch, bit)
            for v in dying.get(i, []):
                self._retire(v)
        self.op_index = len(self.module.ops) - 1
        self.emit("halt")
        return self._entry(), image

    def _retire(self, v: Value) -> None:
        """Remember that v's memory is free, and which barriers its last accesses signal."""
        owner = v.owner
        if owner is None or "mem" not in owner.attrs or owner.name == "input":
            return
        mask = self.readers.get(id(v), 0) | (1 << self.barrier[id(owner)] if id(owner) in self.barrier else 0)
        m = owner.attrs["mem"]
        self._retire_region(_space(m), m["addr"], m["addr"] + value_bytes(v, self.bounds), mask)

    def _retire_region(self, space: int, lo: int, hi: int, mask: int) -> None:
        """Record that [lo, hi) is free once the barriers in `mask` are clear. Earlier records inside
        it are dropped: whoever wrote this region last already waited for their readers, so waiting
        for this record orders a later writer after them too (keeping them would only pile every old
        barrier into later wait masks, until an op waited on all of them, its own included)."""
        self.retired = [r for r in self.retired if not (r[0] == space and lo <= r[1] and r[2] <= hi)]
        self.retired.append((space, lo, hi, mask))

    # ---- DRAM image ----------------------------------------------------------------------

    def _layout_weights(self, image: DramImage) -> None:
        for op in self.module.walk("linear"):
            t = self.tilings[id(op)] = Tiling.from_attr(op.attrs["tiling"])
            w = op.operands[1].owner
            assert w is not None
            base = op.attrs["dram"]["base"]
            self.layouts[id(op)] = list(t.layout(base))
            image.add(GroupSegment(base, op.attrs["dram"]["bytes"], t, self._matrix(w)))

    def _matrix(self, w: Op) -> Callable[[], np.ndarray | QuantWeight]:
        if w.name == "qweight":
            k, n = (int(d) for d in w.result.type.shape)
            return lambda: materialize(w.attrs, w.result.type.dtype, (k, n), self.weight)
        return lambda: weight_values(w.attrs, self.weight)

    def _layout_consts(self, image: DramImage) -> None:
        addr = self.const_base = align(image.size, 4096)
        for op in self.module.ops:
            if not traits(op).constant:
                continue
            users = op.result.users
            if users and all(u.name == "linear" and u.operands[1] is op.result for u in users):
                continue  # streamed through the macros, already in the weight region
            v = op.result
            size = value_bytes(v, self.bounds)
            self.const_addr[id(v)] = addr
            if op.name == "const":
                data = np.frombuffer(base64.b64decode(op.attrs["data"]), dtype="<f4")
                if data.size * F32 != size:
                    raise ValueError(f"const {op.loc}: {data.size} values for shape {v.type.bound_shape(self.bounds)}")
                image.add(ArraySegment(addr, size, lambda d=data: d))
            else:
                image.add(ArraySegment(addr, size, self._matrix(op)))
            addr = align(addr + size)

    # ---- stages --------------------------------------------------------------------------

    def _plan_stages(self) -> list[list[tuple[Op, int, int]]]:
        """Per stage, its (linear, group, tile) in order; tiles from place-weights' slots. Also
        fills `op_groups`, the same per linear."""
        sets = self.module.attrs["macro_sets"]
        stages: dict[int, list[tuple[Op, int, int]]] = {}
        for op in self.module.walk("linear"):
            slot0 = op.attrs["dram"]["slot0"]
            groups = self.op_groups[id(op)] = [(s, g, group_tile(sets, s, slot0, g))
                                               for s, g0, n in op.attrs["stages"] for g in range(g0, g0 + n)]
            for s, g, tile in groups:
                stages.setdefault(s, []).append((op, g, tile))
        return [stages[s] for s in sorted(stages)]

    def _emit_loads(self, s: int) -> None:
        wait = load_wait(s, self.n_sets)
        saved = self.op_index
        for op, g, tile in self.stages[s]:
            self.op_index = self.op_pos[id(op)]
            t = self.tilings[id(op)]
            _, k0, k1, n0, n1, off = self.layouts[id(op)][g]
            self.emit("wload", wait=wait, tile=tile, m0=0, k=k1 - k0, n=n1 - n0, wt=t.wt,
                      src=Mem(D, off, n1 - n0))
        self.op_index = saved

    def _finish_group(self, s: int, op: Op) -> None:
        self.stage_ops.setdefault(s, set()).add(self.barrier[id(op)])
        sync, loads = self.order.after_mvm(s)
        if sync:
            mask = 0
            for b in self.stage_ops.pop(s):
                mask |= 1 << b
            self.emit("sync", sig=stage_barrier(s), wait=mask)
        for s2 in loads:
            self._emit_loads(s2)

    # ---- ops -----------------------------------------------------------------------------

    def _op_embedding(self, op: Op) -> None:
        ids, table = op.operands
        out = op.result
        self.emit("gather", sig=self.barrier[id(op)], wait=self.op_wait, dst=self.mem(out),
                  table=self.mem(table), idx=self.mem(ids), n=self.rows(out), cols=self.cols(out),
                  vocab=int(table.type.shape[0]))

    def _op_linear(self, op: Op) -> None:
        for s in self.order.first_loads():
            self._emit_loads(s)
        x, out = op.operands[0], op.result
        t = self.tilings[id(op)]
        sig, wait = self.barrier[id(op)], self.op_wait
        rows = self.bound_rows(out)
        layout, nvec = self.layouts[id(op)], self.rows(out)
        dst0, src0 = self.mem(out), self.mem(x)
        xt, xs0, none = op.attrs.get("act", ACT), Mem(G, 0, 0), Mem(G, 0, 0)
        if xt in ("i8", "u8"):  # the tile's SFU quantizes the inputs once, for every group
            src0, xs0 = self.scratch(op, "xq"), self.scratch(op, "xs")
            asym = int(xt == "u8")  # DynamicQuantizeLinear: one scale and zero point for the whole input
            # its own barrier, so that each MVM waits for it alone, not for the MVMs before it (a
            # barrier shared with an older op only adds a wait that has long been met)
            quantized = free_barrier(self.op_index + len(DATA_BARRIERS) // 2, wait | 1 << sig)
            self.emit("vquant", sig=quantized, wait=wait, tile=op.attrs["sfu"], asym=asym, dst=src0, sc=xs0,
                      src=self.mem(x), rows=nvec, cols=t.k, group=0 if asym else t.gk)
            wait |= 1 << quantized
        xsize = elem(xt).nbytes
        psum = self.scratch(op, "psum") if t.kchunks > 1 else None
        for s, g, tile in self.op_groups[id(op)]:
            kc, k0, k1, n0, n1, off = layout[g]
            if psum is None:
                dst = dst0._replace(addr=dst0.addr + n0 * F32)
            else:
                dst = Mem(psum.space, psum.addr + (kc * rows * t.n + n0) * F32, t.n)
            scaled = {}
            if t.st:
                scales_at, zero_at, _ = t.parts(g)
                g0 = k0 // t.gk if t.gk else 0
                scaled = {"wst": t.st, "ws": Mem(D, off + scales_at, n1 - n0),
                          "wz": Mem(D, off + zero_at, n1 - n0) if t.zero_points else none,
                          "xs": xs0._replace(addr=xs0.addr + g0 * F32) if xt == "i8" else xs0}
            self.emit("mvm", sig=sig, wait=wait, tile=tile, m0=0, k=k1 - k0, n=n1 - n0, wt=t.wt, xt=xt, gk=t.gk,
                      acc=0, nvec=nvec, dst=dst, src=src0._replace(addr=src0.addr + k0 * xsize),
                      **({"wst": ACT, "ws": none, "wz": none, "xs": none} | scaled))
            self._finish_group(s, op)
        own = 1 << sig
        if psum is not None:
            self.emit("tred", sig=sig, wait=own | wait, dst=dst0, src=psum, rows=nvec, cols=t.n, count=t.kchunks,
                      pstride=rows * t.n * F32)
        if len(op.operands) == 3:
            self.emit("vadd", sig=sig, wait=own | wait, tile=op.attrs.get("sfu", 0), dst=dst0, a=dst0,
                      b=self.mem(op.operands[2], stride=0), rows=nvec, cols=self.cols(out), abc=0, bbc=0)

    def _vec(self, op: Op, mnemonic: str, **fields: object) -> None:
        self.emit(mnemonic, sig=self.barrier[id(op)], wait=self.op_wait | (1 << self.barrier[id(op)]),
                  tile=op.attrs["sfu"], **fields)

    def _operand(self, v: Value, rows: int | str, cols: int) -> tuple[Mem, int]:
        """(memory operand, column-broadcast flag) for `v` broadcast to [rows, cols]; a
        position table (ctx rows) is read from row `past` on."""
        vrows = v.type.shape[0] if v.type.rank == 2 else 1
        vcols = self.cols(v)
        stride = 0 if vrows == 1 and rows != 1 else None
        mem = self.mem(v, stride=stride)
        if vrows == CTX and rows != CTX:
            mem = mem._replace(roff=PAST)
        return mem, int(vcols == 1 and cols != 1)

    def _binary(self, op: Op) -> None:
        out = op.result
        rows, cols = out.type.shape[0], self.cols(out)
        (a, abc), (b, bbc) = (self._operand(v, rows, cols) for v in op.operands)
        self._vec(op, "v" + op.name, dst=self.mem(out), a=a, b=b, rows=self.dim(rows), cols=cols, abc=abc, bbc=bbc)

    _op_add = _op_sub = _op_mul = _op_div = _op_max = _op_pow = _binary

    def _unary(self, op: Op, mnemonic: str | None = None) -> None:
        x, out = op.operands[0], op.result
        self._vec(op, mnemonic or "v" + op.name, dst=self.mem(out), src=self.mem(x), rows=self.rows(out),
                  cols=self.cols(out))

    _op_neg = _op_exp = _op_sqrt = _op_rsqrt = _op_sigmoid = _op_silu = _op_tanh = _op_erf = _unary

    def _op_gelu(self, op: Op) -> None:
        self._unary(op, GELU_INSTRS[op.attrs.get("approximate", "none")])

    def _op_reciprocal(self, op: Op) -> None:
        self._unary(op, "vrecip")

    def _op_affine(self, op: Op) -> None:
        x, out = op.operands[0], op.result
        self._vec(op, "vaffine", dst=self.mem(out), src=self.mem(x), rows=self.rows(out), cols=self.cols(out),
                  alpha=op.attrs["alpha"], beta=op.attrs["beta"])

    def _op_reduce_sum(self, op: Op, mnemonic: str = "vrsum") -> None:
        x, out = op.operands[0], op.result
        self._vec(op, mnemonic, dst=self.mem(out), src=self.mem(x), rows=self.rows(out), cols=self.cols(x))

    def _op_reduce_max(self, op: Op) -> None:
        self._op_reduce_sum(op, "vrmax")

    def _op_reduce_mean(self, op: Op) -> None:
        self._op_reduce_sum(op)
        out = op.result
        self._vec(op, "vaffine", dst=self.mem(out), src=self.mem(out), rows=self.rows(out), cols=1,
                  alpha=1.0 / self.cols(op.operands[0]), beta=0.0)

    @staticmethod
    def _softmax_rows(vec: Callable[..., None], s: Mem, m: Mem, l_: Mem, rows: Dim, cols: Dim | int) -> None:
        """In-place row softmax of s using column scratch m and l; `vec(mnemonic, **fields)` emits."""
        vec("vrmax", dst=m, src=s, rows=rows, cols=cols)
        vec("vsub", dst=s, a=s, b=m, rows=rows, cols=cols, abc=0, bbc=1)
        vec("vexp", dst=s, src=s, rows=rows, cols=cols)
        vec("vrsum", dst=l_, src=s, rows=rows, cols=cols)
        vec("vrecip", dst=l_, src=l_, rows=rows, cols=1)
        vec("vmul", dst=s, a=s, b=l_, rows=rows, cols=cols, abc=0, bbc=1)

    def _op_softmax(self, op: Op) -> None:
        x, out = op.operands[0], op.result
        rows, cols = self.rows(out), self.cols(out)
        self._vec(op, "vcopy", dst=self.mem(out), src=self.mem(x), rows=rows, cols=cols)
        self._softmax_rows(partial(self._vec, op), self.mem(out), self.scratch(op, "t"), self.scratch(op, "s"), rows,
                           cols)

    def _op_rms_norm(self, op: Op) -> None:
        x, w = op.operands
        out = op.result
        rows = self.rows(out)
        hd = op.attrs.get("head_dim", self.cols(out))
        t, s = self.scratch(op, "t"), self.scratch(op, "s")
        for c in range(0, self.cols(out), hd):  # one column block (head) at a time
            xc, oc = self.mem(x, col=c), self.mem(out, col=c)
            self._vec(op, "vmul", dst=t, a=xc, b=xc, rows=rows, cols=hd, abc=0, bbc=0)
            self._vec(op, "vrsum", dst=s, src=t, rows=rows, cols=hd)
            self._vec(op, "vaffine", dst=s, src=s, rows=rows, cols=1, alpha=1.0 / hd, beta=op.attrs["eps"])
            self._vec(op, "vrsqrt", dst=s, src=s, rows=rows, cols=1)
            self._vec(op, "vmul", dst=oc, a=xc, b=s, rows=rows, cols=hd, abc=0, bbc=1)
            self._vec(op, "vmul", dst=oc, a=oc, b=self.mem(w, stride=0), rows=rows, cols=hd, abc=0, bbc=0)

    def _op_layer_norm(self, op: Op) -> None:
        x, w, *b = op.operands
        out = op.result
        rows, cols = self.rows(out), self.cols(out)
        t, s = self.scratch(op, "t"), self.scratch(op, "s")
        self._vec(op, "vrsum", dst=s, src=self.mem(x), rows=rows, cols=cols)
        self._vec(op, "vaffine", dst=s, src=s, rows=rows, cols=1, alpha=1.0 / cols, beta=0.0)
        self._vec(op, "vsub", dst=t, a=self.mem(x), b=s, rows=rows, cols=cols, abc=0, bbc=1)
        self._vec(op, "vmul", dst=self.mem(out), a=t, b=t, rows=rows, cols=cols, abc=0, bbc=0)
        self._vec(op, "vrsum", dst=s, src=self.mem(out), rows=rows, cols=cols)
        self._vec(op, "vaffine", dst=s, src=s, rows=rows, cols=1, alpha=1.0 / cols, beta=op.attrs["eps"])
        self._vec(op, "vrsqrt", dst=s, src=s, rows=rows, cols=1)
        self._vec(op, "vmul", dst=self.mem(out), a=t, b=s, rows=rows, cols=cols, abc=0, bbc=1)
        for v, mn in ((w, "vmul"), *((v, "vadd") for v in b)):
            self._vec(op, mn, dst=self.mem(out), a=self.mem(out), b=self.mem(v, stride=0), rows=rows, cols=cols,
                      abc=0, bbc=0)

    def _op_rope(self, op: Op) -> None:
        x, cos, sin = op.operands
        out = op.result
        hd = op.attrs["head_dim"]
        self._vec(op, "vrope", dst=self.mem(out), src=self.mem(x), cos=self.mem(cos)._replace(roff=PAST),
                  sin=self.mem(sin)._replace(roff=PAST), rows=self.rows(out), cols=self.cols(out), hd=hd,
                  rd=op.attrs.get("rotary_dim", hd))

    def _op_swiglu(self, op: Op) -> None:
        g, u = op.operands
        out = op.result
        rows, cols = self.rows(out), self.cols(out)
        self._vec(op, "vsilu", dst=self.mem(out), src=self.mem(g), rows=rows, cols=cols)
        self._vec(op, "vmul", dst=self.mem(out), a=self.mem(out), b=self.mem(u), rows=rows, cols=cols, abc=0, bbc=0)

    def _op_relayout(self, op: Op) -> None:
        """Each piece as SFU copies of 2-D blocks: columns along its last axis where both sides are
        contiguous there (else one column), rows along the innermost other axis whose strides are
        not negative, one copy per index of the remaining axes."""
        out = op.result
        dst = self.mem(out)
        assert dst.stride == self.cols(out), "relayout writes its result as one flat row-major block"
        for p in map(Piece.decode, op.attrs["pieces"]):
            if not all(p.sizes):
                continue
            src = self.mem(op.operands[p.of])
            ss = [r * src.stride + c for r, c in zip(p.rs, p.cs, strict=True)]
            axes = list(range(len(p.sizes)))
            col = axes[-1] if axes and p.sizes[-1] > 1 and ss[-1] == 1 and p.ds[-1] == 1 else None
            row = next((a for a in reversed(axes) if a != col and p.sizes[a] > 1 and ss[a] >= 0 and p.ds[a] >= 0),
                       None)
            rest = [a for a in axes if a not in (col, row)]
            for idx in product(*(range(p.sizes[a]) for a in rest)):
                s0 = p.r0 * src.stride + p.c0 + sum(i * ss[a] for i, a in zip(idx, rest, strict=True))
                d0 = p.d0 + sum(i * p.ds[a] for i, a in zip(idx, rest, strict=True))
                dstride, sstride, rows = (0, 0, 1) if row is None else (p.ds[row], ss[row], p.sizes[row])
                self._vec(op, "vcopy", dst=dst._replace(addr=dst.addr + d0 * F32, stride=dstride),
                          src=src._replace(addr=src.addr + s0 * F32, stride=sstride), rows=self.dim(rows),
                          cols=1 if col is None else p.sizes[col])

    def _op_matmul(self, op: Op) -> None:
        a, b = op.operands
        out = op.result
        self._vec(op, "vmm", dst=self.mem(out), a=self.mem(a), b=self.mem(b), m=self.rows(out), k=self.cols(a),
                  n=self.cols(out), tb=int(op.attrs.get("tb", False)), acc=0, alpha=op.attrs.get("alpha", 1.0))

    def _op_kv_append(self, op: Op) -> None:
        cache, x = op.operands
        self.emit("dma", sig=self.barrier[id(op)], wait=self.op_wait, dst=self.mem(cache)._replace(roff=PAST),
                  src=self.mem(x), rows=self.rows(x), cols=self.cols(x), dt=ACT)

    def _op_attention(self, op: Op) -> None:
        """Softmax attention per KV group (one token) or per query head, over the run's new keys
        (still on chip) and the cached ones (positions 0 .. past-1, read from DRAM); the two
        score blocks share one row maximum and one row sum, as one softmax over all keys. Each
        block's scores are soft-capped, then masked: the new keys causally (a grouped step's one
        new key is its own position), and with a window the cached keys too, by absolute position."""
        q, k, v = op.operands
        out = op.result
        h, kvh, hd = op.attrs["heads"], op.attrs["kv_heads"], op.attrs["head_dim"]
        group = h // kvh
        grouped, *_ = attention_shape(op, self.bounds)
        cached = k.type.shape[0] == CTX
        new_k, new_v = (x.owner.operands[1] if cached else x for x in (k, v))  # type: ignore[union-attr]
        rows = self.rows(out)
        slots = op.attrs["slots"]
        # Jobs are independent: each runs in order on its own SFU, waiting only on q, k, v and on
        # memory reuse; a job that reuses a score slot runs on the same SFU as its previous user.
        sig, wait = self.barrier[id(op)], self.op_wait
        for job in range(kvh if grouped else h):
            slot, kv = job % slots, (job if grouped else job // group)
            tile = (op.attrs["sfu"] + slot) % self.tiles

            def vec(mn: str, **f: object) -> None:
                self.emit(mn, sig=sig, wait=wait, tile=tile, **f)  # noqa: B023

            if grouped:  # the group's query heads are consecutive hd-wide blocks of the one row
                qm, m = self.mem(q, kv * group * hd, stride=hd), Dim(0, group)
                om = self.mem(out, kv * group * hd, stride=hd)
            else:
                qm, m, om = self.mem(q, job * hd), rows, self.mem(out, job * hd)
            blocks = [(self.mem(new_k, kv * hd), self.mem(new_v, kv * hd), rows, "sml")]
            if cached:  # second, so that with nothing cached its products have nothing to do
                blocks.append((self.mem(k, kv * hd), self.mem(v, kv * hd), PAST_DIM, "pnk"))
            # per block of keys: keys, values, key count, scores, row maximum, row sum
            parts = [(keys, vals, n, *(self.scratch(op, f"{c}{slot}") for c in names))
                     for keys, vals, n, names in blocks]
            for keys, _, n, s, _, _ in parts:
                vec("vmm", dst=s, a=qm, b=keys, m=m, k=hd, n=n, tb=1, acc=0, alpha=op.attrs["scale"])
                if "softcap" in op.attrs:
                    vec("vsoftcap", dst=s, src=s, rows=m, cols=n, cap=op.attrs["softcap"])
            window = op.attrs.get("window", 0)
            if op.attrs["causal"] and not grouped:  # new key c is position past + c, query r past + r
                vec("vcausal", dst=parts[0][3], rows=rows, cols=rows, diag=Dim(0, 0), window=window, one=0)
            if window and cached:  # cached key c is position c; the query rows are at past (+ r)
                vec("vcausal", dst=parts[1][3], rows=m, cols=PAST_DIM, diag=PAST_DIM, window=window,
                    one=int(grouped))
            mx, total = parts[0][4], parts[0][5]
            for i, (_, _, n, s, mi, _) in enumerate(parts):
                vec("vrmax", dst=mi, src=s, rows=m, cols=n)
                if i:
                    vec("vmax", dst=mx, a=mx, b=mi, rows=m, cols=1, abc=0, bbc=0)
            for i, (_, _, n, s, _, li) in enumerate(parts):
                vec("vsub", dst=s, a=s, b=mx, rows=m, cols=n, abc=0, bbc=1)
                vec("vexp", dst=s, src=s, rows=m, cols=n)
                vec("vrsum", dst=li, src=s, rows=m, cols=n)
                if i:
                    vec("vadd", dst=total, a=total, b=li, rows=m, cols=1, abc=0, bbc=0)
            vec("vrecip", dst=total, src=total, rows=m, cols=1)
            for i, (_, vals, n, s, _, _) in enumerate(parts):
                vec("vmul", dst=s, a=s, b=total, rows=m, cols=n, abc=0, bbc=1)
                vec("vmm", dst=om, a=s, b=vals, m=m, k=n, n=hd, tb=0, acc=int(i > 0), alpha=1.0)

    # ---- program -------------------------------------------------------------------------

    def _dram_map(self) -> list[list]:
        """[start, kind] regions of DRAM (isa.cost.DramMap): weights, constants, then the
        read-write region, where KV caches and graph inputs and outputs sit for good and spills
        take the rest."""
        io_values = {id(o.operands[0]) for o in self.module.outputs()}
        kinds: dict[int, str] = {0: "weights", self.const_base: "constants", self.rw_base: "spills"}
        fixed = []
        for op in self.module.ops:
            m = op.attrs.get("mem")
            if m is None or m["space"] != "rw" or op.name == "kv_append":
                continue
            kind = "kv_cache" if op.name == "kv_cache" else \
                "io" if op.name == "input" or id(op.result) in io_values else None
            if kind is not None:
                lo = self.rw_base + m["addr"]
                fixed.append((lo, lo + value_bytes(op.result, self.bounds), kind))
        for _, hi, _ in fixed:
            kinds.setdefault(hi, "spills")
        for lo, _, kind in fixed:
            kinds[lo] = kind
        return [[start, kinds[start]] for start in sorted(kinds)]

    def _entry(self) -> Entry:
        symbols = []
        for op in self.module.ops:
            a = op.attrs
            if op.name == "input" or (op.name == "kv_cache" and "onnx_shape" in a):
                v = op.result
                symbols.append(Symbol(a["name"], "input", a["onnx_dtype"], v.type.dtype, tuple(a["onnx_shape"]),
                                      self.mem(v).addr, self.mem(v).stride, a.get("heads", 0), a.get("assume", "")))
            elif op.name == "output":
                v = op.operands[0]
                if v.owner is None or v.owner.name == "input" or traits(v.owner).constant:
                    raise ValueError(f"graph output {a['name']!r} is not computed by the model")
                symbols.append(Symbol(a["name"], "output", a["onnx_dtype"], v.type.dtype, tuple(a["onnx_shape"]),
                                      self.mem(v).addr, self.mem(v).stride, a.get("heads", 0)))
        ops = [{"op": op.name, "loc": op.loc, "layer": op.attrs.get("layer", "")} for op in self.module.ops]
        mem = self.module.attrs.get("memory", {})
        meta = {"max_seq": self.max_seq, "gbuf_bytes": mem.get("gbuf_bytes", 0), "rw_bytes": mem.get("rw_bytes", 0),
                "stages": len(self.stages), "balance": self.module.attrs.get("balance", {}),
                "dram_map": self._dram_map(), "min_dram": min_traffic(self.module, self.hw).to_meta()}
        return Entry(self.name, encode(self.instrs), symbols, DebugInfo(ops, np.array(self.dbg, dtype=np.uint32)),
                     meta)


def weights_summary(module: Module) -> str:
    """How the linears' weights and inputs are held, e.g. `i4 group 32 (f16 scales), i8 inputs`;
    the distinct kinds joined by ` + ` with their counts when they differ."""
    kinds: dict[str, int] = {}
    for op in module.walk("linear"):
        t = Tiling.from_attr(op.attrs["tiling"])
        text = ACT if not t.st else (f"{t.wt} " + (f"group {t.gk}" if t.gk else "per channel")
                                       + f" ({t.st} scales{', zero points' if t.zero_points else ''})"
                                       + f", {op.attrs.get('act', ACT)} inputs")
        kinds[text] = kinds.get(text, 0) + 1
    if len(kinds) == 1:
        return next(iter(kinds))
    return " + ".join(f"{n} x {text}" for text, n in kinds.items())


def emit_program(modules: dict[str, Module], weight: WeightSource, hw: HardwareConfig) -> Program:
    """Generate a program with one entry per module (each through the whole pass pipeline).

    The modules are specialisations of one model (say, prefill and decode), so they must lay
    out the DRAM image identically; the image of the first is the program's.
    """
    entries, images = [], []
    for name, module in modules.items():
        entry, image = _Codegen(module, hw, weight, name).run()
        entries.append(entry)
        images.append(image)
    first = images[0]
    for name, image in zip(modules, images, strict=True):
        if [(s.offset, s.size) for s in image.segments] != [(s.offset, s.size) for s in first.segments]:
            raise ValueError(f"entry {name!r} lays out DRAM differently from {next(iter(modules))!r}")
    rw_base, rw_bytes = align(first.size, 4096), max(e.meta["rw_bytes"] for e in entries)
    code = align(rw_base + rw_bytes, 4096)  # the code sits after the data, one entry after another
    for entry in entries:
        entry.meta["code_base"] = code
        code = align(code + len(entry.code), 4096)
    module = next(iter(modules.values()))
    embedding = next(module.walk("embedding"), None)
    cached = all(att.operands[1].type.shape[0] == CTX for att in module.walk("attention"))
    linears = list(module.walk("linear"))
    meta = {"model": module.name, "source": module.attrs.get("source", ""),
            "vocab": int(embedding.operands[1].type.shape[0]) if embedding is not None else None,
            "kv_cache": cached, "weights": weights_summary(module),
            "weight_count": sum(int(op.attrs["tiling"]["k"]) * int(op.attrs["tiling"]["n"]) for op in linears),
            "max_ctx": module.max_ctx,
            "rw_base": rw_base, "rw_bytes": rw_bytes}
    if module.attrs.get("weight_free"):
        meta["weight_free"] = True  # built from a config.json (cimc.hfconfig): timing and energy only
    return Program(entries, first, hw.to_dict(), hw.fingerprint(), meta)
