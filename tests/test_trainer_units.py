"""The on-chip training units of rtl/trainer.py in Amaranth's simulator, bit for bit
against the golden functions of :mod:`hel_fpga.sim.onchip`.

* :class:`OptimiserUnit` against ``gradient_from_acc`` → ``lion_step`` / ``sgdm_step``
  → ``requantize``: random beats (log-uniform magnitudes over the full widths,
  so that shifts, clamps and saturations all occur) and deliberate corners
  (saturation boundaries of the gradient shift both ways, rounding ties of
  every shift, moment and master extremes, the requantisation saturation), over
  several core formats (default 16-bit, ECP5 18-bit, the iCEBreaker core) and
  settings (both optimisers, every ``batch_log2 − eps_log2`` the settings
  allow, the extreme rates and β).
* :class:`LossUnit` against ``sample_nudges`` (per word and per sample), the
  one-hot targets of ``SampleStore.sample_targets``, the golden argmax and the
  ``Metrics`` sums: regression with random masks, classification with forced
  ties, saturating errors, rounding ties, every ε, and the loss sum's own
  saturation.
* Every run has idle cycles on the input and backpressure on the output, and
  checks that a stalled output holds its payload.
* The optimiser's saturating shifter, exhaustively on small words.
* Both components convert to Verilog; the optimiser has no multiplier, the
  loss unit exactly one.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from amaranth.back import rtlil, verilog
from amaranth.sim import Simulator

from amaranth.hdl import Module, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from hel_fpga.spec.training import BATCH_LOG2_RANGE, BETA_LOG2_RANGE, EPS_LOG2_RANGE, LR_SHIFT_RANGE
from hel_fpga.rtl.trainer import (LossKind, LossUnit, OptimiserUnit, Optimizer,
                                  ParamArray, shift_right_saturate)
from hel_fpga.sim.onchip import (SampleStore, gradient_from_acc, lion_step, requantize,
                                 sample_nudges, sgdm_step)
from hel_fpga.spec.formats import ECP5_OPERAND, ICE40_OPERAND, HelConfig, saturate
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.training import (LOSS_SUM_WIDTH, TrainConfig, TrainFormats, TrainingError)

#: Core formats the units are checked on: the default (16-bit operands), the ECP5
#: boards' 18-bit operands, and the iCEBreaker core (28-bit state, 48-bit accumulators).
CONFIGS = {
    "default16": HelConfig(o=3),
    "ecp5_18": HelConfig(o=4, **ECP5_OPERAND),
    "icebreaker": HelConfig(o=2, acc_width=48, state_width=28, state_frac=20, **ICE40_OPERAND),
}


# ----------------------------------------------------------------------------- stream harness
def run_segments(dut, segments, *, seed, idle=0.3, stall=0.3, before=None, after=None):
    """Drive ``segments`` (each: settings {port: value}, list of input payload dicts)
    through ``dut.sink`` → ``dut.source`` in one simulation, with random idle
    cycles on the input and random backpressure on the output. The settings are
    set while the unit is empty; each segment ends when all its outputs are in.
    A stalled output must keep ``valid`` and its payload until taken.
    ``before(ctx, i)`` / ``after(ctx, i)`` run around segment ``i``.
    Returns the outputs of each segment as dicts of ints."""
    rng = random.Random(seed)
    results = []
    names = list(dut.out_layout.members)

    async def bench(ctx):
        for i, (settings, beats) in enumerate(segments):
            for port, value in settings.items():
                ctx.set(getattr(dut, port), value)
            if before:
                await before(ctx, i)
            outs, sent, held = [], 0, None
            while len(outs) < len(beats):
                offer = sent < len(beats) and rng.random() >= idle
                ctx.set(dut.sink.valid, offer)
                if offer:
                    ctx.set(dut.sink.payload, beats[sent])
                ctx.set(dut.source.ready, rng.random() >= stall)
                _, _, in_rdy, out_v, out_r, pay = await ctx.tick().sample(
                    dut.sink.ready, dut.source.valid, dut.source.ready, dut.source.payload)
                word = {n: int(getattr(pay, n)) for n in names}
                if held is not None:
                    assert out_v and word == held, "a stalled output changed or vanished"
                held = word if out_v and not out_r else None
                sent += int(offer and in_rdy)
                if out_v and out_r:
                    outs.append(word)
            ctx.set(dut.sink.valid, 0)
            ctx.set(dut.source.ready, 0)
            await ctx.tick()
            assert not ctx.get(dut.busy) and not ctx.get(dut.source.valid), "extra output beats"
            if after:
                await after(ctx, i)
            results.append(outs)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return results


def log_uniform(rng: np.random.Generator, width: int, n: int) -> np.ndarray:
    """Signed ``width``-bit integers with log-uniform magnitude (every bit length
    equally likely), so that small, mid-range and extreme values all occur."""
    bits = rng.integers(0, width, n)            # magnitude below 2^bits
    mag = np.array([int(rng.integers(0, 1 << int(b))) if b else 0 for b in bits], dtype=np.int64)
    sign = rng.integers(0, 2, n)
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    return np.clip(np.where(sign == 1, -mag - 1, mag), lo, hi)


# ----------------------------------------------------------------------------- shifter
@pytest.mark.parametrize("width", [3, 6, 12])
def test_shift_right_saturate_exhaustively_on_a_small_word(width):
    """sat(x >> a, width) for every 9-bit x and every a in 0 … 11 (a range that is not
    a power of two), against the integer definition."""
    class Dut(wiring.Component):
        def __init__(self):
            super().__init__({"x": In(signed(9)), "a": In(4), "y": Out(signed(width))})

        def elaborate(self, platform):
            m = Module()
            m.d.comb += self.y.eq(shift_right_saturate(m, self.x, self.a, 11, width, "y_w"))
            return m

    dut = Dut()
    bad = []

    async def bench(ctx):
        for a in range(12):
            ctx.set(dut.a, a)
            for x in range(-256, 256):
                ctx.set(dut.x, x)
                if ctx.get(dut.y) != saturate(x >> a, width):
                    bad.append((x, a, ctx.get(dut.y)))

    sim = Simulator(dut)
    sim.add_testbench(bench)
    sim.run()
    assert not bad, bad[:5]


# ----------------------------------------------------------------------------- optimiser
def opt_settings(tc: TrainConfig, lr_shift: int) -> dict:
    return {"optimizer": Optimizer.LION if tc.optimizer == "lion" else Optimizer.SGDM,
            "eps_log2": tc.eps_log2, "batch_log2": tc.batch_log2, "lr_shift": lr_shift,
            "beta_log2": tc.beta_log2, "beta2_log2": tc.beta2_log2}


def golden_optimiser(cfg: HelConfig, tc: TrainConfig, lr_shift: int, beats) -> list[dict]:
    """The golden path per beat: gradient_from_acc → lion_step / sgdm_step → requantize,
    evaluated array by array as the golden trainer does."""
    fm = TrainFormats(cfg)
    arrays = [b[3] for b in beats]
    acc = {k: np.array([b[0] for b in beats if b[3] == k], dtype=np.int64) for k in PARAM_NAMES}
    th = {k: np.array([b[1] for b in beats if b[3] == k], dtype=np.int64) for k in PARAM_NAMES}
    mo = {k: np.array([b[2] for b in beats if b[3] == k], dtype=np.int64) for k in PARAM_NAMES}
    g = gradient_from_acc(acc, fm, tc)
    out = {}
    for k in PARAM_NAMES:
        if tc.optimizer == "sgdm":
            t2, m2 = sgdm_step(th[k], mo[k], g[k], lr_shift, tc.beta_log2, fm)
        else:
            t2, m2 = lion_step(th[k], mo[k], g[k], lr_shift, tc.beta_log2, tc.beta2_log2, fm)
        out[k] = iter(zip(t2.tolist(), m2.tolist(), requantize(t2, fm).tolist()))
    return [dict(zip(("master", "moment", "param"), next(out[k]))) for k in arrays]


def random_beats(cfg: HelConfig, rng: np.random.Generator, n: int) -> list[tuple]:
    fm = TrainFormats(cfg)
    acc = log_uniform(rng, cfg.acc_width, n)
    th = log_uniform(rng, fm.master.width, n)
    mo = log_uniform(rng, fm.moment.width, n)
    arr = rng.integers(0, len(PARAM_NAMES), n)
    return [(int(a), int(t), int(m), PARAM_NAMES[int(p)]) for a, t, m, p in zip(acc, th, mo, arr)]


def corner_beats(cfg: HelConfig, tc: TrainConfig, rng: np.random.Generator) -> list[tuple]:
    """Forced corners for one setting: the gradient shift's saturation boundaries
    (left shifts: ``hi ≫ k`` and one past it, both signs; right shifts: the last
    value that rounds to the limit and the first past it), rounding ties of the
    gradient and the EMA, extreme accumulators, moments and master weights, and
    master values around the requantisation's saturation."""
    fm = TrainFormats(cfg)
    aw, mw, gw = cfg.acc_width, fm.master.width, fm.moment.width
    alo, ahi = -(1 << (aw - 1)), (1 << (aw - 1)) - 1
    glo, ghi = -(1 << (gw - 1)), (1 << (gw - 1)) - 1
    tlo, thi = -(1 << (mw - 1)), (1 << (mw - 1)) - 1
    out = []

    def add(x, th, mo, name):          # x = −acc, the shifted value
        acc = -x
        if alo <= acc <= ahi:
            out.append((acc, th, mo, name))

    rnd_th = lambda: int(rng.integers(tlo, thi + 1))
    for name in PARAM_NAMES:
        s = fm.grad_shift(name, tc.eps_log2, tc.batch_log2)
        xs = [0, 1, -1, -alo, -ahi]                     # acc = 0, ∓1, min, max
        if s <= 0:
            k = -s
            xs += [ghi >> k, (ghi >> k) + 1, glo >> k, (glo >> k) - 1]
        else:
            h = 1 << (s - 1)
            xs += [ghi * (1 << s) + h - 1, ghi * (1 << s) + h,              # hi / past hi
                   glo * (1 << s) - h, glo * (1 << s) - h - 1]              # lo / past lo
            xs += [j * (1 << s) + h for j in (-3, -1, 0, 1, 2, 1000)]       # ties
        for x in xs:
            add(x, rnd_th(), 0, name)
            add(x, thi, glo, name)
            add(x, tlo, ghi, name)
        # EMA ties: with an exact gradient g (s ≤ 0, or acc a multiple of 2^s), pick m so
        # that g − m = j·2^β + 2^(β−1) for both β.
        for beta in {tc.beta_log2, tc.beta2_log2}:
            for j in (-2, -1, 0, 1):
                r = int(rng.integers(-1000, 1000))
                x, g = (r, r << -s) if s <= 0 else (r << s, r)
                mo = g - (j * (1 << beta) + (1 << (beta - 1)))
                if glo <= mo <= ghi and glo <= g <= ghi:
                    add(x, rnd_th(), mo, name)
    # acc = m = 0: c = 0 (Lion takes no step) and θ' = θ: the requantisation's rounding
    # and its saturation just below the top of the master range.
    extra = fm.master_extra
    for th in [thi, thi - 1, thi - (1 << (extra - 1)) + 1, thi - (1 << (extra - 1)),
               thi - (1 << (extra - 1)) - 1, tlo, tlo + 1, (1 << (extra - 1)),
               (1 << (extra - 1)) - 1, -(1 << (extra - 1)), -(1 << (extra - 1)) - 1, 0]:
        out.append((0, th, 0, "W"))
    return out


def run_optimiser(cfg, cases, seed, idle=0.3, stall=0.3):
    """``cases``: list of (TrainConfig, lr_shift, beats); checks every output beat."""
    dut = OptimiserUnit(cfg)
    segments = [(opt_settings(tc, lr), [{"acc": a, "master": t, "moment": mo,
                                         "array": ParamArray[name]} for a, t, mo, name in beats])
                for tc, lr, beats in cases]
    got = run_segments(dut, segments, seed=seed, idle=idle, stall=stall)
    for (tc, lr, beats), outs in zip(cases, got):
        want = golden_optimiser(cfg, tc, lr, beats)
        for i, (w, o, b) in enumerate(zip(want, outs, beats)):
            assert o == w, f"{tc.optimizer} lr_shift={lr} {tc}: beat {i} {b}: got {o}, want {w}"
        assert len(outs) == len(want)


def _settings_cases(cfg: HelConfig) -> list[tuple[TrainConfig, int]]:
    mf = TrainFormats(cfg).master.frac
    lr_max = LR_SHIFT_RANGE[1]
    return [
        (TrainConfig(), 7),                                                   # defaults (Lion)
        (TrainConfig(optimizer="sgdm", lr_log2=2), 2),
        (TrainConfig(loss="onehot", eps_log2=2, batch_log2=4), 10),           # halved 3×
        (TrainConfig(loss="onehot", optimizer="sgdm", eps_log2=2, batch_log2=4, lr_log2=-2), -2),
        (TrainConfig(optimizer="sgdm", eps_log2=16, batch_log2=0, beta_log2=1,
                     lr_log2=-8), -8),                                        # largest left shift
        (TrainConfig(eps_log2=0, batch_log2=12, beta_log2=16, beta2_log2=16), min(mf, lr_max)),
        (TrainConfig(beta_log2=1, beta2_log2=1, lr_log2=0), 0),               # Lion's largest step
        (TrainConfig(optimizer="sgdm", beta_log2=16, lr_log2=24, halvings=8), lr_max),
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_optimiser_equals_golden_step_on_random_and_corner_beats(name):
    """Both optimisers at the default, the one-hot and the extreme settings (largest
    left and right gradient shifts, β = 1/2 and 1 − 2^−16, lr_shift −8 … 32):
    random beats and every forced corner, bit for bit."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(11)
    cases = [(tc, lr, random_beats(cfg, rng, 250) + corner_beats(cfg, tc, rng))
             for tc, lr in _settings_cases(cfg)]
    run_optimiser(cfg, cases, seed=1)


@pytest.mark.parametrize("name", ["default16", "ecp5_18"])
def test_optimiser_gradient_shift_covers_every_eps_and_batch_setting(name):
    """Every value of batch_log2 − eps_log2 the settings allow (each array's shift
    from its largest left to its largest right shift), random optimiser, β and rate."""
    cfg = CONFIGS[name]
    mf = TrainFormats(cfg).master.frac
    rng = np.random.default_rng(12)
    pr = random.Random(12)
    cases = []
    for diff in range(BATCH_LOG2_RANGE[0] - EPS_LOG2_RANGE[1],
                      BATCH_LOG2_RANGE[1] - EPS_LOG2_RANGE[0] + 1):
        batch = pr.randint(max(BATCH_LOG2_RANGE[0], diff + EPS_LOG2_RANGE[0]),
                           min(BATCH_LOG2_RANGE[1], diff + EPS_LOG2_RANGE[1]))
        eps = batch - diff
        if pr.random() < 0.5:
            tc, lr = TrainConfig(optimizer="sgdm", eps_log2=eps, batch_log2=batch,
                                 beta_log2=pr.randint(*BETA_LOG2_RANGE), lr_log2=0), \
                pr.randint(*LR_SHIFT_RANGE)
        else:
            tc, lr = TrainConfig(eps_log2=eps, batch_log2=batch,
                                 beta_log2=pr.randint(*BETA_LOG2_RANGE),
                                 beta2_log2=pr.randint(*BETA_LOG2_RANGE)), pr.randint(0, mf)
        cases.append((tc, lr, random_beats(cfg, rng, 40) + corner_beats(cfg, tc, rng)[::2]))
    run_optimiser(cfg, cases, seed=2)


def random_train_config(pr: random.Random, cfg: HelConfig) -> tuple[TrainConfig, int]:
    """Any valid setting: optimiser, loss, ε, B, β1, β2, and an lr_shift the schedule
    can reach (Lion's at most MF, as TrainConfig.check_for requires)."""
    mf = TrainFormats(cfg).master.frac
    opt = pr.choice(["lion", "sgdm"])
    tc = TrainConfig(loss=pr.choice(["mse", "onehot"]), optimizer=opt,
                     eps_log2=pr.randint(*EPS_LOG2_RANGE), batch_log2=pr.randint(*BATCH_LOG2_RANGE),
                     beta_log2=pr.randint(*BETA_LOG2_RANGE),
                     beta2_log2=pr.randint(*BETA_LOG2_RANGE), lr_log2=0)
    lr = pr.randint(*LR_SHIFT_RANGE) if opt == "sgdm" else pr.randint(0, min(mf, LR_SHIFT_RANGE[1]))
    return tc, lr


@pytest.mark.parametrize("name", list(CONFIGS))
def test_optimiser_equals_golden_step_under_random_settings(name):
    """Thirty random settings in a row (the unit drained between them), random beats."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(14)
    pr = random.Random(14)
    cases = [(*random_train_config(pr, cfg), random_beats(cfg, rng, 40)) for _ in range(30)]
    run_optimiser(cfg, cases, seed=4, idle=0.5, stall=0.5)


def test_optimiser_streams_back_to_back_without_idle_or_backpressure():
    """One beat per cycle when the output is always ready: latency LATENCY, no bubbles."""
    cfg = CONFIGS["default16"]
    dut = OptimiserUnit(cfg)
    tc = TrainConfig()
    rng = np.random.default_rng(13)
    beats = random_beats(cfg, rng, 40)
    want = golden_optimiser(cfg, tc, 7, beats)
    seen = []

    async def bench(ctx):
        for port, value in opt_settings(tc, 7).items():
            ctx.set(getattr(dut, port), value)
        ctx.set(dut.source.ready, 1)
        names = list(dut.out_layout.members)
        for cycle in range(len(beats) + dut.LATENCY + 2):
            ctx.set(dut.sink.valid, cycle < len(beats))
            if cycle < len(beats):
                a, t, mo, name = beats[cycle]
                ctx.set(dut.sink.payload, {"acc": a, "master": t, "moment": mo,
                                           "array": ParamArray[name]})
            _, _, rdy, v, pay = await ctx.tick().sample(dut.sink.ready, dut.source.valid,
                                                        dut.source.payload)
            assert rdy
            if v:
                seen.append((cycle, {n: int(getattr(pay, n)) for n in names}))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert [w for _, w in seen] == want
    # beat i is accepted at edge i and its result is sampled at edge i + LATENCY
    assert [c for c, _ in seen] == list(range(dut.LATENCY, dut.LATENCY + len(beats)))


@pytest.mark.parametrize("cls", [OptimiserUnit, LossUnit])
def test_stalled_output_lets_the_pipeline_fill_then_it_drains_one_beat_per_cycle(cls):
    """With the output stalled and beats offered every other cycle, the unit still
    takes exactly LATENCY beats (every stage fills: bubbles are squeezed out); once
    the output is ready it delivers a beat every cycle while it takes one every cycle."""
    cfg = CONFIGS["default16"]
    dut = cls(cfg)
    taken, given = [], []

    async def bench(ctx):
        if cls is OptimiserUnit:
            for port, value in opt_settings(TrainConfig(), 7).items():
                ctx.set(getattr(dut, port), value)
        stall = 3 * dut.LATENCY
        for cycle in range(stall + dut.LATENCY + 10):
            ctx.set(dut.sink.valid, cycle >= stall or cycle % 2 == 0)
            ctx.set(dut.source.ready, cycle >= stall)
            _, _, vi, rdy, v, r = await ctx.tick().sample(dut.sink.valid, dut.sink.ready,
                                                          dut.source.valid, dut.source.ready)
            taken.append(int(vi and rdy))
            given.append(int(v and r))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    stall = 3 * dut.LATENCY
    assert sum(taken[:stall]) == dut.LATENCY
    assert taken[stall:] == [1] * (len(taken) - stall)
    assert given[:stall] == [0] * stall and given[stall:] == [1] * (len(given) - stall)


def test_unit_setting_ranges_are_the_train_config_ranges():
    """The shifters are sized for these ranges; TrainConfig must accept exactly them."""
    for field, (lo, hi) in [("eps_log2", EPS_LOG2_RANGE), ("batch_log2", BATCH_LOG2_RANGE),
                            ("beta_log2", BETA_LOG2_RANGE), ("beta2_log2", BETA_LOG2_RANGE)]:
        TrainConfig(**{field: lo}), TrainConfig(**{field: hi})
        for bad in (lo - 1, hi + 1):
            with pytest.raises(TrainingError):
                TrainConfig(**{field: bad})
    lo = TrainConfig(optimizer="sgdm", lr_log2=LR_SHIFT_RANGE[0])
    hi = TrainConfig(optimizer="sgdm", lr_log2=LR_SHIFT_RANGE[1] - 8, halvings=8)
    assert (lo.lr_log2, hi.lr_log2 + hi.halvings) == LR_SHIFT_RANGE
    for bad in (dict(lr_log2=LR_SHIFT_RANGE[0] - 1), dict(lr_log2=LR_SHIFT_RANGE[1] - 7),
                dict(halvings=9)):
        with pytest.raises(TrainingError):
            TrainConfig(optimizer="sgdm", **bad)


# ----------------------------------------------------------------------------- loss unit
def loss_beats(cfg: HelConfig, kind: str, outputs, targets, mask, label, rng) -> list[dict]:
    """A sample's input beats in the core's order (step-major, outputs ascending). For
    one-hot, ``target`` and ``mask`` carry garbage the unit must ignore."""
    t_len, o_n = outputs.shape
    beats = []
    for t in range(t_len):
        for o in range(o_n):
            if kind == "mse":
                tg, mk = int(targets[t, o]), int(mask[t])
            else:
                tg, mk = int(rng.integers(-(1 << 15), 1 << 15)), int(rng.integers(0, 2))
            beats.append({"output": int(outputs[t, o]), "target": tg, "mask": mk,
                          "last": int(t == t_len - 1), "label": int(label)})
    return beats


def make_samples(cfg: HelConfig, kind: str, eps_log2: int, rng, count: int,
                 o: int | None = None):
    """Random samples (T = 1 … 5) with the golden results: per sample the nudges in
    forward order, the per-word squared errors, their sum, and correct (one-hot).
    ``o`` (default O) is the data's outputs: the loss uses outputs 0 … o−1 (the
    beats of the others carry garbage targets); one-hot labels are drawn from
    0 … O−1, so some are no class."""
    o_n = cfg.o if o is None else o
    fm = TrainFormats(cfg)
    sw, sf = cfg.state_width, cfg.state_frac
    ts = fm.target_shift
    samples = []
    for i in range(count):
        t_len = int(rng.integers(1, 6))
        tg = log_uniform(rng, cfg.operand_width, t_len * cfg.o).reshape(t_len, cfg.o)
        mode = i % 4
        if mode == 0:            # near the targets: rounding, small errors
            out = (tg << ts) + log_uniform(rng, sf - 2, tg.size).reshape(tg.shape)
        elif mode == 1:          # anywhere in the state range: saturating errors
            out = log_uniform(rng, sw, tg.size).reshape(tg.shape)
        elif mode == 2:          # rounding ties of ν and e
            shift = fm.nudge_shift(eps_log2) if rng.integers(0, 2) else ts
            h = 1 << (shift - 1)
            j = rng.integers(-50, 50, tg.shape)
            out = (tg << ts) + j * (2 * h) + h
        else:                    # ties in the final step's maximum (argmax: first wins)
            out = rng.integers(-5, 5, tg.shape) << (sf - 2)
            out[-1, :] = rng.integers(0, 2, cfg.o) * (1 << sf)
        out = np.clip(out, -(1 << (sw - 1)), (1 << (sw - 1)) - 1)
        mask = rng.integers(0, 2, t_len).astype(bool)
        if kind == "onehot":
            label = int(rng.integers(0, cfg.o if o_n < cfg.o else o_n))
            store = SampleStore("onehot", np.zeros((1, t_len, cfg.k), np.int64),
                                labels=np.array([label]), classes=o_n)
            y, mk = store.sample_targets(cfg, 0)
            correct = bool(int(np.argmax(out[-1, :o_n])) == label)
        else:
            label, y, mk, correct = 0, tg[:, :o_n], mask, None
        nu, sq = sample_nudges(cfg, out, y, mk, eps_log2)
        # per word: the same golden function on the single word (outputs ≥ o: none)
        words = [sample_nudges(cfg, out[t:t + 1, o:o + 1], y[t:t + 1, o:o + 1], mk[t:t + 1],
                               eps_log2) if o < o_n else (np.zeros((1, 1), np.int64), 0)
                 for t in range(t_len) for o in range(cfg.o)]
        samples.append(dict(beats=loss_beats(cfg, kind, out, tg, mask, label, rng),
                            nudges=nu[::-1].reshape(-1).tolist(),
                            word_sq=[w[1] for w in words],
                            word_nu=[int(w[0][0, 0]) for w in words],
                            sq=sq, correct=correct, argmax=int(np.argmax(out[-1, :o_n]))))
    return samples


def run_loss(cfg, cases, seed, preset=None):
    """``cases``: list of (kind, eps_log2, samples[, outputs]); one segment each, metrics
    cleared before and read after every segment; ``preset`` loads loss_sum after the
    clear. ``outputs`` (default O) is set with the clear."""
    dut = LossUnit(cfg)
    metrics = []

    async def before(ctx, i):
        ctx.set(dut.outputs, cases[i][3] if len(cases[i]) > 3 else cfg.o)
        ctx.set(dut.clear, 1)
        await ctx.tick()
        ctx.set(dut.clear, 0)
        if preset is not None:
            ctx.set(dut.loss_sum, preset)

    async def after(ctx, i):
        metrics.append((ctx.get(dut.loss_sum), ctx.get(dut.correct_count),
                        ctx.get(dut.samples)))

    segments = [({"kind": LossKind.ONEHOT if kind == "onehot" else LossKind.MSE,
                  "eps_log2": eps}, [b for s in samples for b in s["beats"]])
                for kind, eps, samples, *_ in cases]
    got = run_segments(dut, segments, seed=seed, before=before, after=after)
    for (kind, eps, samples, *_), outs, (loss_sum, correct, count) in zip(cases, got, metrics):
        k = 0
        for s in samples:
            n = len(s["beats"])
            word = outs[k:k + n]
            k += n
            assert [w["nudge"] for w in word] == s["nudges"] == s["word_nu"], (kind, eps)
            assert [w["sq"] for w in word] == s["word_sq"], (kind, eps)
            assert sum(w["sq"] for w in word) == s["sq"]
            assert [w["end"] for w in word] == [0] * (n - 1) + [1]
            assert word[-1]["argmax"] == s["argmax"]
            assert word[-1]["correct"] == (s["correct"] is True)
        assert k == len(outs)
        total = sum(s["sq"] for s in samples) + (preset or 0)
        assert loss_sum == min(total, (1 << (LOSS_SUM_WIDTH - 1)) - 1)
        assert count == len(samples)
        assert correct == (sum(bool(s["correct"]) for s in samples) if kind == "onehot" else 0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_unit_equals_sample_nudges_and_metrics(name):
    """Regression (random masks) and one-hot (ignored target/mask fields, argmax ties),
    outputs near the targets, across the state range (saturating errors) and on
    rounding ties, at the default ε of both losses and the smallest and largest ε."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(21)
    eps_hi = min(EPS_LOG2_RANGE[1], cfg.state_width - cfg.dt_log2 - 2)   # check_for's limit
    cases = [(kind, eps, make_samples(cfg, kind, eps, rng, 12))
             for kind, eps in [("mse", 5), ("onehot", 2), ("mse", 0), ("onehot", eps_hi),
                               ("mse", eps_hi)]]
    run_loss(cfg, cases, seed=3)


@pytest.mark.parametrize("name", ["default16", "ecp5_18"])
def test_loss_unit_on_fewer_outputs_than_the_core_equals_sample_nudges(name):
    """``outputs`` = o < O: outputs o … O−1 get zero nudges and no squared error
    whatever their targets, the argmax is over 0 … o−1 (a larger output beyond
    them does not win), labels o … O−1 are never correct; segments of every o
    alternate with the full width, so the setting changes between passes."""
    cfg = CONFIGS[name]
    rng = np.random.default_rng(25)
    cases = []
    for o in [*range(1, cfg.o), cfg.o]:
        for kind in ("mse", "onehot"):
            if kind == "onehot" and o < 2:
                continue
            cases.append((kind, 4, make_samples(cfg, kind, 4, rng, 8, o=o), o))
    assert any(len(c) > 3 and c[3] < cfg.o for c in cases)
    run_loss(cfg, cases, seed=7)


def test_loss_unit_nudge_shift_for_every_eps():
    """Every ε of the settings' range, alternating the loss kind."""
    cfg = CONFIGS["default16"]
    rng = np.random.default_rng(22)
    cases = []
    for eps in range(EPS_LOG2_RANGE[0], EPS_LOG2_RANGE[1] + 1):
        kind = ("mse", "onehot")[eps % 2]
        cases.append((kind, eps, make_samples(cfg, kind, eps, rng, 4)))
    run_loss(cfg, cases, seed=4)


def test_loss_sum_saturates_at_the_metric_width():
    """The loss sum is preset just below 2^63 − 1 (the testbench writes the register
    after the clear); a pass including saturated errors (e² = 2^(2·OW−2)) must end
    at exactly the sum when it fits and at 2^63 − 1 when it does not, as Metrics."""
    cfg = CONFIGS["ecp5_18"]
    rng = np.random.default_rng(23)
    samples = make_samples(cfg, "mse", 5, rng, 8) + [saturating_sample(cfg, rng)]
    top = (1 << (LOSS_SUM_WIDTH - 1)) - 1
    total = sum(s["sq"] for s in samples)
    for preset in (top - total, top - total + 1, top - total // 2, top):   # reach, pass, …
        run_loss(cfg, [("mse", 5, samples)], seed=5, preset=preset)


def saturating_sample(cfg: HelConfig, rng) -> dict:
    """One step with outputs at the state limits against targets at the opposite
    limits: e saturates to −2^(OW−1) and 2^(OW−1) − 1 (sq 2^(2·OW−2) and
    (2^(OW−1) − 1)²); the other outputs are 0 against 0."""
    sw, ow = cfg.state_width, cfg.operand_width
    out = np.zeros((1, cfg.o), dtype=np.int64)
    tg = np.zeros((1, cfg.o), dtype=np.int64)
    out[0, :2] = [-(1 << (sw - 1)), (1 << (sw - 1)) - 1]
    tg[0, :2] = [(1 << (ow - 1)) - 1, -(1 << (ow - 1))]
    nu, sq = sample_nudges(cfg, out, tg, np.array([True]), 5)
    word_sq = [1 << (2 * ow - 2), ((1 << (ow - 1)) - 1) ** 2] + [0] * (cfg.o - 2)
    assert sq == sum(word_sq)
    return dict(beats=loss_beats(cfg, "mse", out, tg, np.array([True]), 0, rng),
                nudges=nu[::-1].reshape(-1).tolist(), word_nu=nu.reshape(-1).tolist(),
                word_sq=word_sq, sq=sq, correct=None, argmax=1)


def test_loss_unit_errors_saturate_at_both_ends():
    cfg = CONFIGS["default16"]
    run_loss(cfg, [("mse", 5, [saturating_sample(cfg, np.random.default_rng(24))])], seed=6)


def test_loss_unit_rejects_a_nudge_that_cannot_fit_the_state():
    with pytest.raises(ValueError):
        LossUnit(HelConfig(state_width=20, state_frac=19, operand_width=16, operand_frac=1,
                           act_frac=14, param_frac=12))


# ----------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("name", ["default16", "ecp5_18"])
def test_units_convert_to_verilog_with_one_multiplier_in_the_loss_unit(name):
    cfg = CONFIGS[name]
    for cls, muls in ((OptimiserUnit, 0), (LossUnit, 1)):
        dut = cls(cfg)
        text = verilog.convert(dut, name=cls.__name__)
        assert f"module {cls.__name__}" in text
        assert rtlil.convert(cls(cfg)).count("cell $mul ") == muls, cls.__name__
