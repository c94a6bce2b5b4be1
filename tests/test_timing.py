"""Timing and energy: hazard-free timelines, estimate vs simulation, and the cost formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_fixtures import EXAMPLE, shared_model

from cimc.driver import CompileOptions, compile_model
from isa.binary import read_binary, write_binary
from isa.cost import COMPONENTS, CostModel
from isa.encoding import decode_columns
from isa.hw import load_hw
from runtime.hazards import find_hazards
from runtime.interpreter import Session, simulate

IDS = np.load(EXAMPLE.with_suffix(".npz"))["input.input_ids"]
SHARED_FLOAT = ["llama_a_dynamo", "llama_c_optimum_kv", "qwen2_a_dynamo", "qwen2_c_optimum_kv"]

HW_VARIANTS = {
    "default": [],
    "spill-to-dram": ["buffer.global.size_kb=4"],
    "two-tiles": ["chip.tiles=2"],
    "one-macro-per-tile": ["chip.tiles=3", "chip.macros_per_tile=1"],
    "mesh-narrow-links": ["noc.topology=mesh", "noc.link_bits=64", "dram.max_outstanding=1"],
    "28nm": None,
}


def _hw(name: str):
    return load_hw("edgecim-28nm") if HW_VARIANTS[name] is None else load_hw(None, HW_VARIANTS[name])


@pytest.mark.parametrize("weights", ["fp32", "int4", "int8"])
@pytest.mark.parametrize("variant", sorted(HW_VARIANTS))
def test_timeline_respects_every_dependency(variant: str, weights: str) -> None:
    """Every memory/macro access conflict in the numeric run is ordered in simulated time (with
    integer weights too: the inputs' quantization, scales and partial sums)."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=16, hw=_hw(variant), weights=weights))
    r = simulate(program, {"input_ids": IDS}, trace_accesses=True)
    assert r.accesses
    hazards = find_hazards(r.accesses, r.timeline)
    assert not hazards, "\n".join(map(str, hazards))


def test_hazard_checker_catches_a_missing_barrier() -> None:
    """Drop every wait mask: the checker must then find violations (so it is not vacuous)."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=16))
    entry = program.entry()
    words = np.frombuffer(entry.code, dtype="<u8").reshape(-1, 8).copy()
    words[:, 1] = 0
    entry.code = words.tobytes()
    r = simulate(program, {"input_ids": IDS}, trace_accesses=True)
    assert find_hazards(r.accesses, r.timeline)


ESTIMATE_POINTS = [("prefill", 1, 0), ("prefill", 8, 0), ("prefill", 64, 0), ("prefill", 256, 0),
                   ("decode", 1, 0), ("decode", 1, 100), ("decode", 1, 1000)]


@pytest.mark.parametrize("model", ["tiny_llama", *SHARED_FLOAT])
def test_compiler_estimate_is_within_5_percent(model: str) -> None:
    """The compiler's estimate (balance-stages' model, in every report) prices the instructions the
    simulator runs with the same cost model, and lands within 5 % of the simulated cycles for
    prefill at 1, 8, 64 and max-seq tokens and decode after 0, 100 and 1000 cached positions."""
    path = EXAMPLE if model == "tiny_llama" else shared_model(model)
    session = Session(compile_model(path, CompileOptions(max_seq=256, max_ctx=1024)))
    for entry, tokens, past in ESTIMATE_POINTS:
        r = session.run(entry, numerics=False, tokens=tokens, past=past).report
        assert r["estimated_cycles"] == pytest.approx(r["cycles"], rel=0.05), (entry, tokens, past)


def test_balance_stages_estimate_is_the_run_estimate() -> None:
    """balance-stages prices its chosen partition with the same instructions, cost model and
    estimate as a run of the compiled program at the size it balanced for (one cost model, two
    uses, same answer)."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=16, max_ctx=64))
    session = Session(program)
    for entry in ("prefill", "decode"):
        balance = session.entry(entry).meta["balance"]
        r = session.run(entry, numerics=False, tokens=balance["rows"], past=balance["past"]).report
        assert balance["est_cycles"] == pytest.approx(r["estimated_cycles"], rel=0.005), entry


def test_timing_only_equals_timing_of_the_numeric_run() -> None:
    program = compile_model(EXAMPLE, CompileOptions(max_seq=16))
    full = simulate(program, {"input_ids": IDS})
    fast = simulate(program, numerics=False, tokens=IDS.shape[1])
    assert fast.report["cycles"] == full.report["cycles"]
    assert fast.report["joules"] == full.report["joules"]
    assert fast.outputs == {}


def test_more_tokens_cost_more_and_energy_adds_up() -> None:
    program = compile_model(EXAMPLE, CompileOptions(max_seq=32))
    one, many = (simulate(program, numerics=False, tokens=n).report for n in (1, 32))
    assert many["cycles"] > one["cycles"] and many["joules"] > one["joules"]
    for r in (one, many):
        assert set(r["energy_pj"]) == {*COMPONENTS, "leakage"}
        assert r["joules"] == pytest.approx(sum(r["energy_pj"].values()) * 1e-12)
        assert r["seconds"] == pytest.approx(r["cycles"] / 200e6)
        assert list(r["layers"]) == ["embed", "layer0", "layer1", "head"]
        layer_energy = sum(d["energy_pj"] for d in r["layers"].values())
        assert layer_energy == pytest.approx(sum(v for k, v in r["energy_pj"].items() if k != "leakage"))


def test_energy_figures_follow_the_hardware_description() -> None:
    """Doubling DRAM pJ/bit doubles DRAM energy exactly; the 28 nm preset is cheaper and faster."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=8))
    base = simulate(program, numerics=False, tokens=8).report
    dear = simulate(program, numerics=False, tokens=8,
                    hw=load_hw(None, ["dram.e_read_pj_per_bit=16", "dram.e_write_pj_per_bit=16"])).report
    assert dear["energy_pj"]["dram"] == pytest.approx(2 * base["energy_pj"]["dram"])
    assert dear["cycles"] == base["cycles"]
    fine = simulate(program, numerics=False, tokens=8, hw=load_hw("edgecim-28nm")).report
    assert fine["seconds"] < base["seconds"] and fine["joules"] < base["joules"]


def _priced(instrs: list, hw=None, regs=(0, 1, 0, 1)):
    """Costs and timeline of a hand-written program on `hw` (default: the 65 nm preset)."""
    from isa.encoding import encode
    from runtime.timing import schedule

    hw = hw or load_hw()
    cm = CostModel(hw)
    cols = decode_columns(encode(instrs))
    costs = cm.instr_costs(cols, np.array(regs))
    return cm, costs, schedule(costs, cols.sig, cols.wait, cm.n_units, hw.dram.max_outstanding)


def _wload(tile: int = 5, k: int = 128, n: int = 64, addr: int = 0):
    from isa.encoding import Instr
    from isa.fields import Mem
    return Instr("wload", {"tile": tile, "m0": 0, "k": k, "n": n, "wt": "f32", "src": Mem(1, addr, n)})


def _uses(cm: CostModel, costs, i: int) -> dict[str, float]:
    lo, hi = costs.ptr[i], costs.ptr[i + 1]
    return {cm.names[u]: float(b) for u, b in zip(costs.unit[lo:hi], costs.busy[lo:hi], strict=True)}


def test_weight_load_holds_every_resource_on_its_path() -> None:
    """A wload of k*n*wbits/8 bytes holds each DRAM channel for its interleaved share, the bus
    and the tile's port for bytes / link width, its tile until the last byte is written; it
    ends one DRAM first-access latency plus its hops after its slowest resource."""
    hw = load_hw()
    cm, costs, tl = _priced([_wload()], hw)
    nbytes = 128 * 64 * 4
    uses = _uses(cm, costs, 0)
    chan = nbytes / hw.dram.channels_x16 / (hw.dram.peak_gbps * 1e9 * hw.dram.efficiency / hw.dram.channels_x16
                                           / (hw.chip.f_clk_mhz * 1e6))
    assert [uses[f"dram{c}"] for c in range(8)] == pytest.approx([chan] * 8)  # 32 KB over 8 x 256 B stripes
    link = nbytes / (hw.noc.link_bits / 8 * hw.noc.f_clk_mhz / hw.chip.f_clk_mhz)
    assert uses["bus.down"] == pytest.approx(link) and uses["port5.in"] == pytest.approx(link)
    write = float(cm.write_cycles(128, 64, 32))
    assert uses["tile5"] == pytest.approx(max(write, chan, link))
    assert costs.dram_bytes[0] == nbytes + 64  # + its own 64-byte instruction word, fetched
    assert costs.energy["dram"][0] == pytest.approx((nbytes + 64) * 8 * hw.dram.e_read_pj_per_bit)
    hops = 1 + 5 % 4 + 5 // 4
    latency = hw.dram.latency_ns * hw.chip.f_clk_mhz / 1e3 + hops * hw.noc.hop_cycles * 200 / 800
    assert costs.latency[0] == pytest.approx(latency)
    assert tl.end[0] - tl.start[0] == pytest.approx(max(uses.values()) + latency)
    assert tl.start[0] >= tl.fetch_end[0] > 0  # it could not start before its code arrived


def _mvm(src_space: int, tile: int = 5, k: int = 128, n: int = 64, nvec: int = 4, acc: int = 0):
    from isa.encoding import Instr
    from isa.fields import Dim, Mem
    none = Mem(0, 0, 0)
    return Instr("mvm", {"tile": tile, "m0": 0, "k": k, "n": n, "wt": "f32", "xt": "f32", "gk": 0, "acc": acc,
                         "nvec": Dim(0, nvec), "wst": "f32", "dst": Mem(0, 1 << 16, n), "src": Mem(src_space, 0, k),
                         "xs": none, "ws": none, "wz": none})


@pytest.mark.parametrize("src_space", [0, 1])
def test_mvm_waits_for_its_first_input_and_last_result(src_space: int) -> None:
    """A bit-serial MVM needs all of its first input vector before its first bit plane, and its
    last result leaves after the last: one vector's transfer each way adds to the macros' time,
    at the pace of the slowest resource on its way (the DRAM channels holding it, or the
    buffer's port; the link). Data moves into and out of the tile: its hops count both ways."""
    hw = load_hw(None, ["noc.link_bits=64", "noc.f_clk_mhz=200"])
    cm, costs, tl = _priced([_mvm(src_space)], hw)
    k_bytes, n_bytes = 128 * 4, 64 * 4
    link = hw.noc.link_bits / 8
    if src_space == 1:  # 512 bytes from address 0: two 256-byte stripes, on two channels
        first_in = max(256 / cm.chan_bpc, k_bytes / link)
    else:
        first_in = max(k_bytes / cm.gbuf_bpc, k_bytes / link)
    first_out = max(n_bytes / cm.gbuf_bpc, n_bytes / link)
    assert _uses(cm, costs, 0)["tile5"] == pytest.approx(cm.mvm_cycles(4, 32) + first_in + first_out)
    hops = cm.hops(5) * cm.hop_latency
    latency = 2 * hops + (cm.dram_latency if src_space == 1 else 0.0)
    assert costs.latency[0] == pytest.approx(latency)
    assert tl.end[0] - tl.start[0] == pytest.approx(max(_uses(cm, costs, 0).values()) + latency)


def test_partial_sums_are_added_next_to_the_buffer() -> None:
    """`tred` of `count` slices holds the adder for ceil(elements x (count - 1) / lanes) x
    cycles_per_op, and the buffer's ports for the bytes read and written; it crosses no wire."""
    from isa.encoding import Instr
    from isa.fields import Dim, Mem
    hw = load_hw()
    rows, cols, count = 3, 200, 4
    ins = Instr("tred", {"dst": Mem(0, 0, cols), "src": Mem(0, 1 << 16, cols), "rows": Dim(0, rows),
                         "cols": Dim(0, cols), "count": count, "pstride": rows * cols * 4})
    cm, costs, _ = _priced([ins], hw)
    uses = _uses(cm, costs, 0)
    adds = rows * cols * (count - 1)
    assert uses["reduce"] == pytest.approx(-(-adds // hw.sfu.lanes) * hw.sfu.cycles_per_op)
    assert uses["gbuf.rd"] == pytest.approx(rows * cols * 4 * count / cm.gbuf_bpc)
    assert uses["gbuf.wr"] == pytest.approx(rows * cols * 4 / cm.gbuf_bpc)
    assert costs.energy["noc"][0] == 0 and costs.energy["sfu"][0] == pytest.approx(adds * hw.sfu.e_add_fp32_pj)


def test_a_transfer_slot_frees_when_its_data_has_come() -> None:
    """With one transfer slot, a second DRAM transfer starts when the first one's data and
    first-access latency are done, not when the first instruction ends (a weight load ends
    when its macros are written, later than its data arrives)."""
    hw = load_hw(None, ["dram.max_outstanding=1", "macro.write_cycles_full=100000"])
    _, costs, tl = _priced([_wload(tile=1), _wload(tile=2, addr=1 << 16)], hw)
    assert costs.dram_done[0] < tl.end[0] - tl.start[0]
    assert tl.start[1] == pytest.approx(tl.start[0] + costs.dram_done[0])


def test_embedding_rows_are_priced_as_consecutive_rows() -> None:
    """A gather's row addresses depend on the token ids: it is priced as n consecutive table rows."""
    from isa.encoding import Instr
    from isa.fields import Dim, Mem
    cm = CostModel(load_hw())
    ins = Instr("gather", {"dst": Mem(0, 0, 100), "table": Mem(1, 4096, 100), "idx": Mem(1, 0, 1),
                           "n": Dim(0, 5), "cols": Dim(0, 100), "vocab": 50})
    _, costs, _ = _priced([ins])
    table = cm.channel_bytes(np.array([4096]), np.array([5]), np.array([400]), np.array([400])).sum()
    ids = cm.channel_bytes(np.array([0]), np.array([5]), np.array([4]), np.array([4])).sum()
    assert costs.dram_bytes[0] == table + ids + 64  # and its own instruction word


def test_an_attention_product_over_no_cached_keys_holds_nothing() -> None:
    """At past 0 the product over the cached keys has no columns: it moves and computes nothing."""
    from isa.encoding import Instr
    from isa.fields import Dim, Mem
    past = Dim(2, 0)  # %past
    ins = Instr("vmm", {"tile": 0, "dst": Mem(0, 0, 16), "a": Mem(0, 4096, 16), "b": Mem(1, 0, 16),
                        "m": Dim(0, 4), "k": Dim(0, 16), "n": past, "tb": 1, "acc": 0, "alpha": 1.0})
    _, costs, _ = _priced([ins], regs=(0, 1, 0, 1))
    assert costs.ptr[1] == costs.ptr[0] and costs.dram_bytes[0] == 64


def test_a_larger_instruction_buffer_is_never_slower() -> None:
    """Instructions are dispatched as they arrive, so a buffer that holds the whole program
    does not wait for all of it."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=8, max_ctx=64))
    cycles = [simulate(program, numerics=False, entry="decode", past=20,
                       hw=load_hw(None, [f"buffer.instr.size_kb={kb}"])).report["cycles"] for kb in (2, 16, 1024)]
    assert cycles[0] >= cycles[1] >= cycles[2]


def test_narrow_link_takes_longer_by_exactly_its_share() -> None:
    """Once a link is the slowest resource of a transfer, the transfer takes bytes / link rate."""
    ends = {}
    for bits in (32, 64):
        hw = load_hw(None, [f"noc.link_bits={bits}", "noc.f_clk_mhz=200"])
        _, _, tl = _priced([_wload()], hw)
        ends[bits] = tl.end[0] - tl.start[0]
    nbytes = 128 * 64 * 4
    assert ends[32] - ends[64] == pytest.approx(nbytes / 4 - nbytes / 8)


@pytest.mark.parametrize("topology", ["bus", "mesh"])
def test_transfers_sharing_a_link_serialise(topology: str) -> None:
    """Two loads to different tiles share the link out of the controller (the bus, or the mesh's
    injection link): the second starts when the first has crossed it. On a mesh, a farther tile
    also holds the links between the tiles."""
    hw = load_hw(None, [f"noc.topology={topology}", "noc.link_bits=64", "noc.f_clk_mhz=200"])
    cm, costs, tl = _priced([_wload(tile=1), _wload(tile=6, addr=1 << 16)], hw)
    first = 128 * 64 * 4 / 8
    assert tl.start[1] == pytest.approx(tl.start[0] + first)
    links = {u for u in _uses(cm, costs, 1) if u.startswith(("bus", "link"))}
    assert links == ({"bus.down"} if topology == "bus" else
                     {"link ctrl>x0y0", "link x0y0>x1y0", "link x1y0>x2y0", "link x2y0>x2y1"})


def test_dram_channels_interleave_and_round_to_bursts() -> None:
    """Addresses interleave over the channels every dram.interleave_bytes; each row of a strided
    read is rounded out to whole bursts, so a column slice can land on one channel."""
    cm = CostModel(load_hw())
    one = cm.channel_bytes(np.array([256]), np.array([1]), np.array([8]), np.array([8]))
    assert one.tolist() == [[0, 32, 0, 0, 0, 0, 0, 0]]  # 8 bytes in channel 1's stripe: one burst
    spread = cm.channel_bytes(np.array([0]), np.array([1]), np.array([4096]), np.array([4096]))
    assert spread.tolist() == [[512] * 8]
    # 100 rows of 256 bytes, 2048 apart: every row in channel 3
    column = cm.channel_bytes(np.array([768]), np.array([100]), np.array([256]), np.array([2048]))
    assert column.tolist() == [[0, 0, 0, 25600, 0, 0, 0, 0]]
    # rows 1536 apart cycle through channels 3, 1, 7, 5 (period 4)
    cycle = cm.channel_bytes(np.array([768]), np.array([6]), np.array([256]), np.array([1536]))
    assert cycle.tolist() == [[0, 512, 0, 512, 0, 256, 0, 256]]
    # any pattern, aligned or not, long or short: the bursts each row touches, on their channels
    for settings, (base, rows, nbytes, pitch) in [([], (8, 40, 28, 20)), ([], (4, 300, 48, 112)),
                                                  ([], (96, 3, 5000, 5004)),
                                                  (["dram.interleave_bytes=1048576"], (0, 1000, 256, 512)),
                                                  (["dram.interleave_bytes=65536"], (40, 700, 100, 4000))]:
        model = CostModel(load_hw(None, settings))
        got = model.channel_bytes(np.array([base]), np.array([rows]), np.array([nbytes]), np.array([pitch]))
        assert got.tolist() == [_brute_channels(model, base, rows, nbytes, pitch)]
    # rows 512 apart in 1 MB stripes all sit on channel 0 however many there are
    coarse = CostModel(load_hw(None, ["dram.interleave_bytes=1048576"]))
    assert coarse.channel_bytes(np.array([0]), np.array([1000]), np.array([256]), np.array([512])).tolist() == \
        [[256000.0] + [0.0] * 7]


def _brute_channels(cm: CostModel, base: int, rows: int, nbytes: int, pitch: int) -> list[float]:
    """Bytes per channel, burst by burst: every burst a row touches, on the channel holding it."""
    d = cm.hw.dram
    out = [0.0] * cm.channels
    for r in range(rows):
        start = base + r * pitch
        for b in range(start // d.burst_bytes, -(-(start + nbytes) // d.burst_bytes)):
            out[b * d.burst_bytes // d.interleave_bytes % cm.channels] += d.burst_bytes
    return out


def test_dram_latency_and_transfers_in_flight() -> None:
    """A first-access latency per DRAM transfer makes a decode step slower; with more transfers
    in flight the controller hides the part that is not a chain of dependent accesses."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=8, max_ctx=32))

    def cycles(*settings: str) -> float:
        return simulate(program, numerics=False, entry="decode", past=10, hw=load_hw(None, list(settings))
                        ).report["cycles"]

    none = cycles("dram.latency_ns=0")
    slow = cycles("dram.latency_ns=100", "dram.max_outstanding=1")
    hidden = cycles("dram.latency_ns=100", "dram.max_outstanding=64")
    assert cycles("dram.latency_ns=100") > cycles() > none
    assert slow > hidden > none
    assert hidden - none < 0.25 * (slow - none)


@pytest.mark.parametrize(("setting", "factor"), [("noc.link_bits=32", 2.0), ("buffer.global.width_bits=64", 1.2),
                                                  ("buffer.instr.width_bits=16", 2.0)])
def test_narrow_interconnect_and_ports_make_decode_slower(setting: str, factor: float) -> None:
    """The interconnect, the global buffer's ports and instruction dispatch are timed resources."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=8, max_ctx=32))
    base = simulate(program, numerics=False, entry="decode", past=10).report["cycles"]
    narrow = simulate(program, numerics=False, entry="decode", past=10, hw=load_hw(None, [setting])).report
    assert narrow["cycles"] > factor * base


def test_code_is_fetched_from_dram() -> None:
    """Every instruction a run executes is fetched: 64 bytes each on the DRAM channels, in blocks
    of half the instruction buffer."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=8))
    r = simulate(program, numerics=False, tokens=8)
    n = r.report["instructions"]
    assert r.report["dram_bytes_by_kind"]["code"] == 64 * n
    fetch = r.costs.fetch
    assert fetch.per_block == 16 * 1024 // 2 // 64 and len(fetch.busy) == -(-n // fetch.per_block)
    assert fetch.busy.sum() * CostModel(load_hw()).chan_bpc == pytest.approx(64 * n)
    small = simulate(program, numerics=False, tokens=8, hw=load_hw(None, ["buffer.instr.size_kb=1"]))
    per, tl = small.costs.fetch.per_block, small.timeline
    assert per == 8
    # a block streams in: its instructions arrive in order, the last when the fetch ends
    streaming = tl.fetch_end - tl.fetch_start - small.costs.fetch.latency
    block = np.arange(n) // per
    count = np.minimum(per, n - block * per)
    arrived = tl.fetch_end[block] - streaming[block] * (count - 1 - np.arange(n) % per) / count
    assert np.all(tl.start >= arrived - 1e-9) and np.all(arrived[np.minimum(per - 1 + block * per, n - 1)]
                                                         == tl.fetch_end[block])


def test_instructions_wait_in_the_buffer_until_they_start() -> None:
    """Units keep no queues of their own: a block is fetched only once the instructions of the
    block two before it have all started, so a buffer too small for the program's window of
    waiting instructions slows it down."""
    program = compile_model(EXAMPLE, CompileOptions(max_seq=8, max_ctx=256))

    def decode(kb: int):
        return simulate(program, numerics=False, entry="decode", past=200,
                        hw=load_hw(None, [f"buffer.instr.size_kb={kb}"]))

    big, small = decode(16), decode(1)
    assert small.report["cycles"] > 1.1 * big.report["cycles"]
    per = small.costs.fetch.per_block
    for b in range(2, len(small.timeline.fetch_start)):
        assert small.timeline.fetch_start[b] >= small.timeline.start[(b - 2) * per:(b - 1) * per].max()


def test_binaries_are_deterministic(tmp_path: Path) -> None:
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.cimb")
        write_binary(paths[-1], compile_model(EXAMPLE, CompileOptions(max_seq=16)))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert read_binary(paths[0], verify_dram=True).n_instrs > 0


def test_balanced_schedule_decodes_faster_than_naive() -> None:
    """Ping-pong stages overlap weight loads with compute; one macro set cannot (same bytes moved)."""
    from cimc.driver import SCHEDULES
    from runtime.generate import generate
    from runtime.interpreter import Session

    reports = {}
    for name, pipeline in SCHEDULES.items():
        program = compile_model(EXAMPLE, CompileOptions(max_seq=8, max_ctx=16, pipeline=pipeline))
        reports[name] = generate(Session(program), [1] * 8, 6, numerics=False).report
    fast, slow = reports["balanced"]["decode"], reports["naive"]["decode"]
    data = {k: (fast["dram_bytes_per_token"][k], slow["dram_bytes_per_token"][k]) for k in ("weights", "kv_cache")}
    assert all(a == b for a, b in data.values())  # the same data moved (their code differs a little)
    assert fast["tokens_per_s"] > slow["tokens_per_s"]


def test_dram_traffic_of_copies_and_gathers() -> None:
    """The DRAM channels carry every DRAM side of a copy (a DRAM -> DRAM copy twice) and a
    gather's table rows plus its destination when that is spilled to DRAM."""
    from isa.encoding import Instr
    from isa.fields import Dim, Mem
    buf, dram = 0, 1
    rows, cols = 4, 64
    nbytes = rows * cols * 4

    def copy(dst: int, src: int) -> Instr:
        return Instr("dma", {"dst": Mem(dst, 0x100, cols), "src": Mem(src, 0x4000, cols), "rows": Dim(0, rows),
                             "cols": Dim(0, cols), "dt": "f32"})

    def gather(dst: int) -> Instr:
        return Instr("gather", {"dst": Mem(dst, 0x100, cols), "table": Mem(dram, 0x8000, cols),
                                "idx": Mem(buf, 0x2000, 1), "n": Dim(0, rows), "cols": Dim(0, cols), "vocab": 16})

    cm, costs, _ = _priced([copy(buf, dram), copy(dram, buf), copy(dram, dram), gather(buf), gather(dram)])
    data = costs.dram_bytes[:5] - 64  # less each instruction's own code word
    assert list(data) == [nbytes, nbytes, 2 * nbytes, nbytes, 2 * nbytes]
    channel_cycles = [sum(b for u, b in _uses(cm, costs, i).items() if u.startswith("dram")) for i in range(5)]
    assert channel_cycles == pytest.approx(list(data / cm.chan_bpc))
    assert set(_uses(cm, costs, 0)) == {"dram0", "dram1", "dram2", "dram3", "gbuf.wr"}  # 1 KB from 0x4000, no link


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_no_mvm_waits_for_its_own_barrier(weights: str) -> None:
    """Barriers are reused round-robin; an op must not signal one it waits on, or its MVMs wait for
    each other and run one after another (the IR has more ops than there are barriers)."""
    from isa.encoding import decode

    program = compile_model(shared_model("qwen2_a_dynamo"), CompileOptions(max_seq=4, weights=weights))
    for entry in program.entries:
        code = decode(entry.code)
        mvms = [ins for ins in code if ins.op == "mvm"]
        assert not [ins for ins in mvms if ins.wait >> ins.sig & 1], entry.name


@pytest.mark.parametrize("weights", ["fp32", "int4"])
@pytest.mark.parametrize("variant", ["default", "spill-to-dram"])
def test_long_program_timeline_respects_every_dependency(tmp_path, variant: str, weights: str) -> None:
    """A program with more ops than barriers (memory reused many times over, so the write-after-read
    bookkeeping is pruned as it goes): every access conflict is still ordered in simulated time."""
    from cimc.synth import DecoderConfig, build_decoder_onnx

    path = build_decoder_onnx(DecoderConfig(layers=6, hidden=128, intermediate=256), tmp_path / "six.onnx")
    program = compile_model(path, CompileOptions(max_seq=8, max_ctx=16, hw=_hw(variant), weights=weights))
    ids = np.arange(1, 7, dtype=np.int64)[None]
    session = Session(program)
    for entry, inputs in (("prefill", {"input_ids": ids}), ("decode", {"input_ids": ids[:, :1]})):
        r = session.run(entry, inputs, trace_accesses=True)
        assert len(r.accesses) > 1000
        hazards = find_hazards(r.accesses, r.timeline)
        assert not hazards, "\n".join(map(str, hazards[:5]))
