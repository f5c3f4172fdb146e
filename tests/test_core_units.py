"""Sub-blocks of the HEL core in Amaranth's simulator, each against the golden model.

* tanh unit: exhaustively over the saturated z of the default (iCE40) format, and
  over wide sums (rounding + saturation) for 16- and 18-bit formats, against
  ``HelConfig.tanh_int`` / ``GoldenCore.activations``' arithmetic.
* self-test generator: ``Mix32`` against ``hel_fpga.sim.golden.mix32``.
* MAC lane: force sums of single-bank and interleaved ±ε sequences, against
  ``GoldenCore.kick``.
* accumulator group: random read-modify-write streams with wraps, against the
  golden accumulator semantics (wrap every update, sticky flag).
* lane scheduling in the core: the activations and kicks of every step of a
  forward pass and a centred echo, for P = 1, 2, 3, against ``GoldenCore``'s
  ``operands`` / ``activations`` / ``kick``; the parameter layout of WRITE_PARAMS
  against ``LaneGeometry.param_location``.
* the whole core, bit-exact on all scenarios, for one small configuration (the
  Verilator suite in ``test_core_cocotb.py`` covers more).

``WAVES=1`` writes a VCD per core-level test under ``build/waves/``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from hel_fpga.rtl.core import HELCore, Mix32, Mix32Serial, Op
from hel_fpga.spec.formats import ECP5_OPERAND, HelConfig, rshift_round, saturate, wrap
from hel_fpga.rtl.mac import AccumulatorGroup, LaneGeometry, MacLane
from hel_fpga.rtl.tanh import TanhUnit
from hel_fpga.sim.golden import GoldenCore
from hel_fpga.spec.names import mix32

from cocotb_core.amaranth_tb import run_scenario
from cocotb_core.scenario import ScenarioBuilder, canonical, pack_cmd, standard_scenario


def _run(dut, bench, vcd=None):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    if vcd:
        with sim.write_vcd(str(vcd)):
            sim.run()
    else:
        sim.run()


# ----------------------------------------------------------------------------- tanh
def _tanh_stream(cfg: HelConfig, zs_in: list[int], z_biased: bool = False,
                 pipelined: bool = False) -> list[int]:
    dut = TanhUnit(cfg, LaneGeometry(cfg).z_width, z_biased=z_biased, pipelined=pipelined)
    out = []

    async def bench(ctx):
        for i in range(len(zs_in) + dut.LATENCY):
            if i < len(zs_in):
                ctx.set(dut.z, zs_in[i])
                ctx.set(dut.valid, 1)
            else:
                ctx.set(dut.valid, 0)
            await ctx.tick()
            if ctx.get(dut.a_valid):
                out.append(ctx.get(dut.a))
    _run(dut, bench)
    return out


@pytest.mark.parametrize("pipelined", [False, True], ids=["ice40_form", "ecp5_form"])
def test_tanh_unit_exhaustive_over_z(pipelined):
    cfg = HelConfig()
    zw = cfg.z_width
    zt = np.arange(-(1 << (zw - 1)), 1 << (zw - 1), dtype=np.int64)
    got = _tanh_stream(cfg, [int(z) << cfg.z_shift for z in zt], pipelined=pipelined)
    assert np.array_equal(np.array(got), cfg.tanh_int(zt))


@pytest.mark.parametrize("z_biased", [False, True], ids=["plain", "biased"])
@pytest.mark.parametrize("ops", [{}, ECP5_OPERAND], ids=["ice40", "ecp5"])
def test_tanh_unit_rounds_and_saturates_wide_sums(ops, z_biased):
    """Wide sums; ``z_biased``: the sum already carries the rounding half (as the core's)."""
    cfg = HelConfig(**ops)
    rng = np.random.default_rng(5)
    zw, zs = cfg.z_width, cfg.z_shift
    span = 1 << (zw - 1 + zs)
    z = np.concatenate([rng.integers(-4 * span, 4 * span, 4000),           # saturating
                        rng.integers(-span, span, 4000),                     # in range
                        (np.arange(-200, 200) << zs) + (1 << (zs - 1)),      # rounding ties
                        (np.arange(-200, 200) << zs) + (1 << (zs - 1)) - 1])
    want = cfg.tanh_int(saturate(rshift_round(z, zs), zw))
    bias = (1 << (zs - 1)) if z_biased else 0
    got = _tanh_stream(cfg, [int(x) + bias for x in z], z_biased=z_biased)
    assert np.array_equal(np.array(got), want)


# ----------------------------------------------------------------------------- mix32
@pytest.mark.parametrize("cls", [Mix32, Mix32Serial])
def test_mix32_matches_golden(cls):
    """Arguments offered every cycle (the serial unit takes one when ready); tags kept."""
    dut = cls(tag_width=4)
    rng = random.Random(3)
    n = 500 if cls is Mix32 else 60
    xs = [rng.getrandbits(32) for _ in range(n)] + [0, 0xFFFF_FFFF, 1, 0x8000_0000]
    out = []

    async def bench(ctx):
        k = 0
        for _ in range(200 * len(xs)):
            if k == len(xs) and len(out) == len(xs):
                break
            ctx.set(dut.valid, int(k < len(xs)))
            if k < len(xs):
                ctx.set(dut.x, xs[k])
                ctx.set(dut.tag, k % 16)
            taken = k < len(xs) and ctx.get(dut.ready)
            await ctx.tick()
            k += int(taken)
            if ctx.get(dut.y_valid):
                out.append((ctx.get(dut.y), ctx.get(dut.y_tag)))
    _run(dut, bench)
    assert out == [(mix32(x), n % 16) for n, x in enumerate(xs)]


# ----------------------------------------------------------------------------- MAC lane
@pytest.mark.parametrize("every_phase", [True, False], ids=["every_phase", "force_only"])
@pytest.mark.parametrize("biased", [False, True], ids=["plain", "biased"])
@pytest.mark.parametrize("ops", [{}, ECP5_OPERAND], ids=["ice40", "ecp5"])
def test_mac_lane_force_sums_match_golden_kick(ops, biased, every_phase):
    """One lane computes F_i = (α_i qo_i << alpha_shift) + Σ_j W_ji a_j for a few
    oscillators, single-bank and with the ±ε banks interleaved cycle by cycle;
    ``biased``: with the kick's rounding half as f_bias, as in the core."""
    cfg = HelConfig(n=3, m=7, k=1, **ops)
    rng = np.random.default_rng(1)
    golden = GoldenCore(cfg)
    lo, hi = cfg.param.min_int, cfg.param.max_int
    golden.write_params(W=rng.integers(lo, hi + 1, (cfg.m, cfg.n)),
                        B=np.zeros((cfg.m, cfg.k), dtype=np.int64),
                        b=np.zeros(cfg.m, dtype=np.int64),
                        alpha=rng.integers(lo, hi + 1, cfg.n))
    p = golden.params
    ow = cfg.operand_width
    qo = rng.integers(-(1 << (ow - 1)), 1 << (ow - 1), (2, cfg.n))
    a = rng.integers(cfg.act.min_int, cfg.act.max_int + 1, (2, cfg.m))
    want = golden.kick(qo, a)                 # (banks, n)

    for banks in (1, 2):
        ks = cfg.kick_shift
        dut = MacLane(cfg, f_bias=(1 << (ks - 1)) if biased else 0, every_phase=every_phase)
        got = {}
        # the slots, bank innermost (as the core issues them)
        slots = []
        for i in range(cfg.n):
            for t in range(cfg.m + 1):
                for s in range(banks):
                    if t == 0:
                        slots.append((int(p["alpha"][i]), int(qo[s, i]), i, s, 1, 0))
                    else:
                        slots.append((int(p["W"][t - 1, i]), int(a[s, t - 1]), i, s, 0,
                                      int(t == cfg.m)))

        async def bench(ctx):
            pipe = [None, None]
            for n in range(len(slots) + 4):
                cur = slots[n] if n < len(slots) else None
                if cur:
                    ctx.set(dut.a, cur[0])
                    ctx.set(dut.b, cur[1])
                s3 = pipe[0]          # the slot whose product is in the output register now
                s2 = pipe[1]          # its controls are presented a cycle ahead
                ctx.set(dut.f_en, int(s2 is not None))
                if s2:
                    ctx.set(dut.f_first, s2[4])
                    ctx.set(dut.f_alpha, s2[4])
                    ctx.set(dut.f_last, s2[5])
                    ctx.set(dut.f_slot, s2[3])
                await ctx.tick()
                if s3 and s3[5]:
                    f = ctx.get(dut.kick0)
                    got[(s3[3], s3[2])] = (int(f) >> ks) if biased else rshift_round(int(f), ks)
                pipe = [pipe[1], cur]
        _run(dut, bench)
        for s in range(banks):
            for i in range(cfg.n):
                assert got[(s, i)] == want[s, i], (banks, s, i)


@pytest.mark.parametrize("banks", [1, 2])
def test_mac_lane_kick_chain_presents_sums_in_serializer_order(banks):
    """P chained lanes each finish one force sum per bank (the ±ε banks a cycle
    apart, as the core issues them); lane 0's ``kick0`` then shows (lane 0, +ε),
    (lane 0, −ε), (lane 1, +ε), … one per cycle — the order the core's serializer
    takes them in — and a second row of sums, finished 2P cycles later, follows
    the same way. Reference: the products, shifted by ``alpha_shift``."""
    from amaranth.hdl import Module
    cfg = HelConfig(n=8, m=7, k=1, **ECP5_OPERAND)
    P, ow = 4, cfg.operand_width
    lanes = [MacLane(cfg) for _ in range(P)]
    top = Module()
    for p, lane in enumerate(lanes):
        top.submodules[f"lane{p}"] = lane
        top.d.comb += lane.chain_in.eq(lanes[p + 1].kick0 if p + 1 < P else 0)
    rng = random.Random(banks)
    lim = 1 << (ow - 1)
    rows = [[[(rng.randrange(-lim, lim), rng.randrange(-lim, lim)) for _ in range(banks)]
             for _ in range(P)] for _ in range(2)]
    want = [(a * b) << cfg.alpha_shift for row in rows for lane in row for a, b in lane]
    got = []

    async def bench(ctx):
        for lane in lanes:
            ctx.set(lane.two_banks, banks == 2)
        await ctx.tick()                     # the lanes register two_banks
        period = banks * P                   # a row every 2P (P) cycles: lb = P slots
        cycles = 2 * period + 4
        for n in range(cycles):
            # slot (row, bank) issued at cycle row·period + bank: operands now (S1),
            # controls a cycle later (S2), the sum loaded in S3
            for p, lane in enumerate(lanes):
                ctx.set(lane.a, 0)
                ctx.set(lane.b, 0)
                for r in range(2):
                    for b in range(banks):
                        if n == r * period + b:
                            ctx.set(lane.a, rows[r][p][b][0])
                            ctx.set(lane.b, rows[r][p][b][1])
                ctrl = [(r, b) for r in range(2) for b in range(banks)
                        if n == r * period + b + 1]
                ctx.set(lane.f_en, bool(ctrl))
                for sig in (lane.f_first, lane.f_alpha, lane.f_last):
                    ctx.set(sig, bool(ctrl))
                ctx.set(lane.f_slot, ctrl[0][1] if ctrl else 0)
            await ctx.tick()
            # the head after the first bank's load (S3 of its slot), one sum per cycle
            for r in range(2):
                if r * period + 2 <= n < r * period + 2 + period:
                    got.append(ctx.get(lanes[0].kick0))

    _run(top, bench)
    assert got == want


def test_mac_lane_contrast_terms_are_plus_minus_product_differences():
    """Contrast slots in pairs (+ε then −ε bank, as the core issues them), back to
    back with extreme operands: ``diff`` in the −ε slot's S3 is a⁺b⁺ − a⁻b⁻, exactly
    (the lane's adder subtracting). Reference: Python integers."""
    cfg = HelConfig(n=3, m=7, k=1, **ECP5_OPERAND)
    ow = cfg.operand_width
    lo, hi = -(1 << (ow - 1)), (1 << (ow - 1)) - 1
    rng = random.Random(7)
    pick = lambda: rng.choice([lo, hi, 0, 1, -1, rng.randrange(lo, hi + 1)])
    slots = [(pick(), pick(), b) for _ in range(40) for b in (0, 1)]
    dut = MacLane(cfg, f_bias=1 << (cfg.kick_shift - 1))
    want = [slots[i][0] * slots[i][1] - slots[i + 1][0] * slots[i + 1][1]
            for i in range(0, len(slots), 2)]
    got = []

    async def bench(ctx):
        for n in range(len(slots) + 3):
            if n < len(slots):
                ctx.set(dut.a, slots[n][0])
                ctx.set(dut.b, slots[n][1])
            s2 = slots[n - 1] if 1 <= n <= len(slots) else None
            ctx.set(dut.c_en, s2 is not None)
            ctx.set(dut.f_slot, s2[2] if s2 else 0)
            s3 = n - 2
            if 0 <= s3 < len(slots) and slots[s3][2] == 1:
                got.append(ctx.get(dut.diff))
            await ctx.tick()

    _run(dut, bench)
    assert got == want


# ----------------------------------------------------------------------------- accumulators
@pytest.mark.parametrize("pipelined", [False, True], ids=["rmw2", "rmw3"])
@pytest.mark.parametrize("lanes", [2, 1])
def test_accumulator_group_wraps_and_flags_like_golden(lanes, pipelined):
    """Random contrast terms, big enough to wrap the narrowest legal accumulator; random
    elements, so one element is often updated twice in a row (the pipelined group
    forwards the word it is writing)."""
    cfg = HelConfig(n=3, m=2, k=1, t_max=1, lanes=2)
    cfg = cfg.replace(acc_width=cfg.acc_min_width)
    g = LaneGeometry(cfg)
    dut = AccumulatorGroup(cfg, lanes=lanes, pipelined=pipelined)
    aw, dwid = cfg.acc_width, g.diff_width
    rng = random.Random(lanes)
    ref = np.zeros(g.acc_depth, dtype=object)
    ops = []
    for _ in range(300):
        e = rng.randrange(g.elems)
        d = [rng.randrange(-(1 << (dwid - 1)), 1 << (dwid - 1)) >> rng.choice([0, 0, 8, 20])
             for _ in range(2)]
        en = [rng.random() < 0.9, rng.random() < 0.9]
        ops.append((e, d, en))
    flags = []       # per op: did the golden update wrap?
    for e, d, en in ops:
        wrapped = False
        for li in range(lanes):
            if en[li]:
                addr = e * g.group_lanes + li
                s = ref[addr] + d[li]
                w = wrap(s, aw)
                wrapped |= (w != s)
                ref[addr] = w
        flags.append(wrapped)
    ovf_trace = []
    readback = []

    async def bench(ctx):
        for e, d, en in ops:
            ctx.set(dut.valid, 1)
            ctx.set(dut.elem, e)
            ctx.set(dut.diff0, d[0])
            ctx.set(dut.diff1, d[1])
            ctx.set(dut.en0, int(en[0]))
            ctx.set(dut.en1, int(en[1]))
            for _ in range(2):            # one update every second cycle, as in the core
                await ctx.tick()
                ctx.set(dut.valid, 0)
                ovf_trace.append(ctx.get(dut.overflow))
        for _ in range(4):
            await ctx.tick()
            ovf_trace.append(ctx.get(dut.overflow))
        assert not ctx.get(dut.busy)
        ctx.set(dut.ext, 1)
        for addr in range(g.acc_depth + read_lat - 1):
            ctx.set(dut.ext_raddr, min(addr, g.acc_depth - 1))
            await ctx.tick()
            readback.append(ctx.get(dut.ext_rdata))
    # the pipelined group registers the readout address first: its word comes a tick later
    read_lat = 2 if pipelined else 1
    _run(dut, bench)
    del readback[:read_lat - 1]
    # op n is presented in cycle 2n; its lane-0 update's pulse comes in cycle 2n+1 (lane 1
    # 2n+2), or two cycles later in the pipelined group (a read register, a pulse register)
    off = 2 if pipelined else 0
    got_flags = [bool(ovf_trace[2 * n + off] | ovf_trace[2 * n + off + 1])
                 for n in range(len(ops))]
    assert any(flags), "the test data should wrap at least once"
    assert got_flags == flags
    used = [e * g.group_lanes + li for e in range(g.elems) for li in range(lanes)]
    assert [readback[a] for a in used] == [int(ref[a]) for a in used]


# ----------------------------------------------------------------------------- core-level
def _golden_trace(cfg, params, u, nudges):
    """Per-step (bank, j) → a and (bank, i) → kick of a forward pass and a centred echo,
    from GoldenCore's own step functions."""
    g = GoldenCore(cfg)
    g.write_params(**params)
    trace = []
    q = np.zeros((1, cfg.n), dtype=np.int64)
    w = q.copy()

    def one(q, w, ut):
        qh = wrap(q + w, cfg.state_width)
        qo = g.operands(qh)
        a = g.activations(qo, ut)
        trace.append((a, g.kick(qo, a)))
        return g.step(q, w, ut)[:2]
    for t in range(len(u)):
        q, w = one(q, w, u[t][None])
    lo = cfg.n - cfg.o
    q = np.repeat(q, 2, axis=0)
    w = wrap(-np.repeat(w, 2, axis=0), cfg.state_width)
    signs = np.array([[1], [-1]])
    for s in range(len(u)):
        w[:, lo:] = wrap(w[:, lo:] + signs * nudges[s], cfg.state_width)
        q, w = one(q, w, u[len(u) - 1 - s][None])
    return trace


SCHEDULE_CONFIGS = {
    "p1": dict(n=5, m=4, k=2, o=2, t_max=4, lanes=1, acc_width=46),
    "p2": dict(n=5, m=4, k=2, o=2, t_max=4, lanes=2, acc_width=46),
    "p3": dict(n=5, m=4, k=2, o=2, t_max=4, lanes=3, acc_width=46),
    "p8_u": dict(n=8, m=11, k=3, o=2, t_max=4, lanes=8, acc_width=46),   # U phase (u_mode)
}


@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_lane_schedule_activations_and_kicks_match_golden(name, waves_path):
    cfg = HelConfig(**SCHEDULE_CONFIGS[name])
    assert LaneGeometry(cfg).u_mode == name.endswith("_u")
    sb = ScenarioBuilder(cfg, 20 + cfg.lanes)
    params = sb.random_params()
    t_len = 3
    u = sb.random_inputs(t_len)
    nudges = sb.random_nudges(t_len)
    trace = _golden_trace(cfg, params, u, nudges)
    dut = HELCore(cfg)
    seen_a, seen_k = [], []

    async def bench(ctx):
        pr = dut.probes
        ctx.set(dut.done.ready, 1)
        ctx.set(dut.outputs.ready, 1)
        for op, stream, words in [(Op.WRITE_PARAMS, dut.params_in, canonical(params)),
                                  (Op.LOAD, dut.inputs, [int(x) for x in u.ravel()]),
                                  (Op.FORWARD, None, []),
                                  (Op.ECHO, dut.nudges, [int(x) for x in nudges.ravel()])]:
            ctx.set(dut.cmd.payload.as_value(), pack_cmd(op, length=t_len))
            ctx.set(dut.cmd.valid, 1)
            await ctx.tick().until(dut.cmd.ready)
            ctx.set(dut.cmd.valid, 0)
            words = list(words)
            while not ctx.get(dut.done.valid):
                if stream is not None:
                    ctx.set(stream.valid, int(bool(words)))
                    if words:
                        ctx.set(stream.payload, words[0])
                        if ctx.get(stream.ready):
                            words.pop(0)
                if ctx.get(dut.step_strobe):
                    seen_a.append({})
                    seen_k.append({})
                if ctx.get(pr["a_valid"]):
                    tag = ctx.get(pr["a_tag"])
                    seen_a[-1][(tag & 1, tag >> 1)] = ctx.get(pr["a"])
                if ctx.get(pr["k_valid"]):
                    seen_k[-1][(ctx.get(pr["k_slot"]), ctx.get(pr["k_i"]))] = \
                        ctx.get(pr["k_kick"])
                await ctx.tick()
            if stream is not None:
                ctx.set(stream.valid, 0)
            await ctx.tick()
            if op == Op.WRITE_PARAMS:
                geo = LaneGeometry(cfg)
                for name, arr in params.items():
                    for idx in np.ndindex(arr.shape):
                        kind, lane, addr = geo.param_location(name, idx)
                        mem = pr["bmem"] if kind == "b" else pr["pmem"][lane]
                        assert ctx.get(mem.data[addr]) == arr[idx], (name, idx)

    _run(dut, bench, waves_path.with_suffix(".vcd") if waves_path else None)
    assert len(seen_a) == len(trace) == 2 * t_len
    for s, (a_g, k_g) in enumerate(trace):
        banks = 1 if s < t_len else 2
        for b in range(banks):
            assert [seen_a[s][(b, j)] for j in range(cfg.m)] == list(a_g[b]), (s, b)
            assert [seen_k[s][(b, i)] for i in range(cfg.n)] == list(k_g[b]), (s, b)


def test_geometry_layout_is_a_bijection():
    shapes = [dict(n=7, m=5, k=3, lanes=p) for p in (1, 2, 3, 4, 7)]
    shapes += [dict(n=8, m=11, k=3, lanes=8), dict(n=16, m=5, k=2, lanes=16)]   # u_mode
    for shape in shapes:
        cfg = HelConfig(o=2, t_max=4, acc_width=46, **shape)
        lanes = cfg.lanes
        g = LaneGeometry(cfg)
        seen_p, seen_a = set(), set()
        for name, shape in cfg.param_shapes().items():
            for idx in np.ndindex(shape):
                kind, lane, addr = g.param_location(name, idx)
                assert (kind == "b") == (name == "b")
                assert 0 <= addr < (cfg.m if kind == "b" else g.param_depth) and lane < lanes
                seen_p.add((kind, lane, addr))
                grp, aaddr = g.acc_location(name, idx)
                assert grp < g.groups and 0 <= aaddr < g.acc_depth
                seen_a.add((grp, aaddr))
        total = sum(int(np.prod(s)) for s in cfg.param_shapes().values())
        assert len(seen_p) == len(seen_a) == total


# ----------------------------------------------------------------------------- whole core
@pytest.mark.parametrize("compact", [False, True], ids=["ecp5_form", "ice40_form"])
@pytest.mark.parametrize("n, m", [(5, 3), (6, 5)], ids=["n5m3", "n6m5_packed_contrast"])
def test_core_bit_exact_in_amaranth_sim(waves_path, compact, n, m):
    """All scenarios back to back on small configurations (P = 2, N ≠ M), in both
    forms of the core (``compact``: as elaborated for iCE40, the contrast before the
    force; with O = 1, where the nudges wait in the stream source instead of a
    FIFO). At N = 6, M = 5 the contrast's input columns are packed by row
    (:attr:`LaneGeometry.contrast_packed`), at N = 5, M = 3 they are not."""
    cfg = HelConfig(n=n, m=m, k=2, o=1 if compact else 2, t_max=6, lanes=2, acc_width=46)
    assert LaneGeometry(cfg).contrast_packed == (m == 5)
    steps = standard_scenario(cfg, seed=11, t=4)
    errors = run_scenario(cfg, steps, seed=11, compact=compact,
                          vcd=str(waves_path.with_suffix(".vcd")) if waves_path else None)
    assert not errors, "\n".join(errors[:20])
