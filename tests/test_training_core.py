"""TrainingCore (rtl/training.py) in Amaranth's simulator, bit for bit against the golden
on-chip trainer (:class:`hel_fpga.sim.onchip.OnChipTrainer`).

Each simulation drives the device as the command unit does: one command at a time
on ``cmd`` with random idle before it, its words on ``inputs`` / ``wide_in`` with
random idle cycles, replies on ``acc_out`` / ``params_out`` and the ``done`` word
with random backpressure. Scenarios on tiny cores:

* WRITE_MASTER (random master weights, a few beyond the master range; random
  moments, a few beyond the moment width), TRAIN_SETUP, STORE of a random set
  (the store image packed here from :class:`~hel_fpga.spec.training.StoreLayout`),
  TRAIN of epoch e: READ_MASTER of both banks equals the golden trainer's master
  weights and moments after ``train_epoch`` with ``epoch = e``, the metrics equal
  its :class:`~hel_fpga.sim.onchip.Metrics`; READ_PARAMS equals ``requantize``;
  EVAL of the test set and of the training set equal ``evaluate``.
* Both losses, both optimisers, a batch that leaves a partial last batch, a
  batch of one, P = 2 lanes, batches skipped after an overflow flag.
* One-hot labels outside 0 … O−1 against a hand-written reference store (the
  label is the target of no output and never correct).
* ``setup_ok`` for bad setups (one test per refused property) and random setups
  against :func:`~hel_fpga.spec.training.unpack_setup`.
* A reset in the middle of a pass; operations 0 … 9 pass through; conversion of
  an ECP5-sized TrainingCore.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
from amaranth.back import rtlil
from amaranth.hdl import ResetInserter
from amaranth.sim import Simulator

from hel_fpga.rtl.core import Op, Result
from hel_fpga.rtl.training import MetricsLayout, TrainingCore
from hel_fpga.sim.onchip import (OnChipTrainer, SampleStore, clamp_master, requantize)
from hel_fpga.spec.formats import ECP5_OPERAND, HelConfig, saturate
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.protocol import Pass
from hel_fpga.spec.training import (SETUP_FIELDS, SETUP_WORDS, StoreLayout, TrainConfig,
                                    TrainFormats, TrainingError, pack_setup, record_words,
                                    unpack_setup)

from amaranth_sim import CLOCK_PERIOD, vcd_dump


# ----------------------------------------------------------------------------- data
def store_image(cfg: HelConfig, layout: StoreLayout, sets, rng) -> list[int]:
    """The store words of ``sets`` (training set, then test set) in ``layout``: per
    sample the inputs (T×K), then targets (T×O) and one mask word per step (a random
    non-zero word for a loss step), or the label."""
    words = []
    lo, hi = cfg.operand.min_int, cfg.operand.max_int
    for st in sets:
        for i in range(st.count):
            rec = [int(v) for v in np.asarray(st.inputs[i]).reshape(-1)]
            if layout.loss == "mse":
                rec += [int(v) for v in st.targets[i].reshape(-1)]
                for bit in st.mask[i]:
                    w = 0
                    while bit and w == 0:
                        w = int(rng.integers(lo, hi + 1))
                    rec.append(w)
            else:
                rec.append(int(st.labels[i]))
            assert len(rec) == layout.record
            words += rec
    assert len(words) == layout.words
    return words


def random_store(cfg: HelConfig, loss: str, count: int, steps: int, rng,
                 scale: float = 0.7, mask_p: float = 0.7) -> SampleStore:
    f = cfg.operand
    u = np.clip(np.rint(rng.normal(0, scale, (count, steps, cfg.k)) * f.scale),
                f.min_int, f.max_int).astype(np.int64)
    if loss == "onehot":
        return SampleStore.classification(cfg, u, rng.integers(0, cfg.o, count))
    y = np.clip(np.rint(rng.normal(0, scale, (count, steps, cfg.o)) * f.scale),
                f.min_int, f.max_int).astype(np.int64)
    mask = rng.random((count, steps)) < mask_p
    return SampleStore.regression(cfg, u, y, mask)


def random_master(cfg: HelConfig, rng, scale: float = 0.4, wild: int = 3) -> dict:
    """Master weights (normal, ``scale`` in parameter units) with ``wild`` elements
    beyond the master range (WRITE_MASTER clamps them)."""
    fm = TrainFormats(cfg)
    out = {}
    for k, shp in cfg.param_shapes().items():
        a = np.rint(rng.normal(0, scale, shp) * fm.master.scale).astype(np.int64)
        out[k] = a
    flat = [(k, i) for k in PARAM_NAMES for i in range(out[k].size)]
    lim = 1 << (cfg.acc_width - 2)
    for j in rng.choice(len(flat), wild, replace=False):
        k, i = flat[j]
        out[k].reshape(-1)[i] = int(rng.integers(-lim, lim))
    return out


def random_moment(cfg: HelConfig, rng, scale: float = 0.01, wild: int = 2) -> dict:
    fm = TrainFormats(cfg)
    out = {k: np.rint(rng.normal(0, scale, shp) * fm.master.scale).astype(np.int64)
           for k, shp in cfg.param_shapes().items()}
    flat = [(k, i) for k in PARAM_NAMES for i in range(out[k].size)]
    lim = 1 << (cfg.acc_width - 2)
    for j in rng.choice(len(flat), wild, replace=False):
        k, i = flat[j]
        out[k].reshape(-1)[i] = int(rng.integers(-lim, lim))
    return out


def flat(d: dict) -> list[int]:
    return [int(v) for k in PARAM_NAMES for v in np.asarray(d[k]).reshape(-1)]


# ----------------------------------------------------------------------------- driver
class Driver:
    """The command unit's side of a TrainingCore, in one testbench process: commands
    one at a time, random idle on every source, random backpressure on every sink."""

    def __init__(self, ctx, dut, rng, idle=0.3, stall=0.3):
        self.ctx, self.dut, self.rng = ctx, dut, rng
        self.idle, self.stall = idle, stall
        self.cycles = 0

    async def tick(self, n=1):
        for _ in range(n):
            await self.ctx.tick()
        self.cycles += n

    async def _idle(self):
        while self.rng.random() < self.idle:
            await self.tick()

    async def send(self, port, words):
        ctx = self.ctx
        for w in words:
            await self._idle()
            ctx.set(port.payload, int(w))
            ctx.set(port.valid, 1)
            await ctx.tick().until(port.ready)
            self.cycles += 1
            ctx.set(port.valid, 0)

    async def receive(self, port, n):
        ctx, got = self.ctx, []
        while len(got) < n:
            ctx.set(port.ready, int(self.rng.random() >= self.stall))
            _, _, v, r, p = await ctx.tick().sample(port.valid, port.ready, port.payload)
            self.cycles += 1
            if v and r:
                got.append(int(p))
        ctx.set(port.ready, 0)
        return got

    async def command(self, op, *, length=0, bank=0, seed=0, kick=0, skip=0, one_sided=0,
                      send=None, port=None, receive=0, out=None):
        """One command: its words (``send`` on ``port``), its reply words (``receive``
        from ``out``), its done word's result."""
        ctx, dut = self.ctx, self.dut
        await self._idle()
        c = dut.cmd.payload
        ctx.set(c.op, op)
        ctx.set(c.length, length)
        ctx.set(c.bank, bank)
        ctx.set(c.seed, seed)
        ctx.set(c.kick, kick)
        ctx.set(c.skip, skip)
        ctx.set(c.one_sided, one_sided)
        ctx.set(c.no_acc, 0)
        ctx.set(dut.cmd.valid, 1)
        await ctx.tick().until(dut.cmd.ready)
        self.cycles += 1
        ctx.set(dut.cmd.valid, 0)
        got = None
        if send is not None:
            await self.send(port, send)
        if receive:
            got = await self.receive(out, receive)
        while True:
            ctx.set(dut.done.ready, int(self.rng.random() >= self.stall))
            _, _, v, r, res = await ctx.tick().sample(dut.done.valid, dut.done.ready,
                                                      dut.done.payload.result)
            self.cycles += 1
            if v and r:
                break
        ctx.set(dut.done.ready, 0)
        return Result(res), got

    # ---- the training operations
    async def setup(self, words):
        res, _ = await self.command(Op.TRAIN_SETUP, send=words, port=self.dut.inputs)
        assert res == Result.OK
        return self.ctx.get(self.dut.setup_ok)

    async def store(self, words, start=0, chunk=None):
        chunk = chunk or len(words)
        for a in range(0, len(words), chunk):
            part = words[a:a + chunk]
            res, _ = await self.command(Op.STORE, length=len(part), seed=start + a, send=part,
                                        port=self.dut.inputs)
            assert res == Result.OK

    async def write_master(self, which, words):
        res, _ = await self.command(Op.WRITE_MASTER, bank=which, send=words,
                                    port=self.dut.wide_in)
        assert res == Result.OK

    async def read_master(self, which, n):
        res, got = await self.command(Op.READ_MASTER, bank=which, receive=n,
                                      out=self.dut.acc_out)
        assert res == Result.OK
        return got

    async def read_params(self, n):
        res, got = await self.command(Op.READ_PARAMS, receive=n, out=self.dut.params_out)
        assert res == Result.OK
        return got

    async def run_pass(self, op, **kw):
        """TRAIN or EVAL: done at once with ``training`` high and counters zero; then
        wait for the pass to end. Returns (metrics dict, cycles of the pass)."""
        ctx, dut = self.ctx, self.dut
        res, _ = await self.command(op, **kw)
        assert res == Result.OK
        mt = dut.metrics
        assert ctx.get(dut.training) == 1
        running = ctx.get(mt.running)
        assert running == (Pass.TRAIN if op == Op.TRAIN else Pass.EVAL)
        t0 = self.cycles
        while ctx.get(dut.training):
            await self.tick()
        assert ctx.get(mt.running) == Pass.NONE
        return ({f: ctx.get(getattr(mt, f)) for f in ("samples", "loss_sum", "correct", "skipped")},
                self.cycles - t0)


def run(dut, bench, max_cycles=2_000_000):
    """Simulate ``bench(ctx)`` to its end (a watchdog fails a hung handshake)."""
    sim = Simulator(dut)
    sim.add_clock(CLOCK_PERIOD)
    sim.add_testbench(bench)

    async def watchdog(ctx):
        await ctx.delay(max_cycles * CLOCK_PERIOD)
        raise AssertionError(f"simulation still running after {max_cycles} cycles")

    sim.add_testbench(watchdog, background=True)
    with vcd_dump(sim):
        sim.run()


# ----------------------------------------------------------------------------- scenarios
def train_scenario(cfg: HelConfig, tc: TrainConfig, *, n_train: int, n_test: int, steps: int,
                   epochs=(0,), seed: int = 0, moments: bool = True, store_fn=None,
                   stats: dict | None = None):
    """WRITE_MASTER both banks, TRAIN_SETUP, STORE, then per epoch e in ``epochs``:
    TRAIN e, READ_MASTER both banks, READ_PARAMS, and EVAL of both sets; all against
    the golden trainer. ``store_fn(cfg, loss, count, steps, rng)`` makes a set."""
    rng = np.random.default_rng(seed)
    store_fn = store_fn or (lambda c, loss, n, t, r: random_store(c, loss, n, t, r))
    train = store_fn(cfg, tc.loss, n_train, steps, rng)
    test = store_fn(cfg, tc.loss, n_test, steps, rng) if n_test else None
    master = random_master(cfg, rng)
    moment = random_moment(cfg, rng) if moments else {k: np.zeros(s, dtype=np.int64)
                                                      for k, s in cfg.param_shapes().items()}
    layout = unpack_setup(cfg, pack_setup(cfg, tc, steps, n_train, n_test))[1]
    image = store_image(cfg, layout, [s for s in (train, test) if s is not None], rng)

    ref = OnChipTrainer(cfg, tc, train, {k: clamp_master(v, TrainFormats(cfg))
                                         for k, v in master.items()})
    ref.load_state({**{f"master_{k}": master[k] for k in PARAM_NAMES},
                    **{f"moment_{k}": moment[k] for k in PARAM_NAMES}, "epoch": 0})
    expect = []
    for e in epochs:
        ref.epoch = e
        tr = ref.train_epoch()
        ev_test = ref.evaluate(test) if test is not None else None
        ev_train = ref.evaluate(train)
        expect.append((tr, flat(ref.master), flat(ref.moment), flat(ref.params()), ev_test,
                       ev_train))

    dut = TrainingCore(cfg)
    P = dut.n_params
    mism: list[str] = []
    srng = random.Random(seed)

    def check(what, got, want):
        if got != want:
            if isinstance(want, list):
                bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
                mism.append(f"{what}: {len(bad)} of {len(want)} differ, first at {bad[:5]}: "
                            f"{[got[i] for i in bad[:3]]} vs {[want[i] for i in bad[:3]]}")
            else:
                mism.append(f"{what}: {got} vs {want}")

    def metrics_of(m, samples_count):
        return {"samples": m.samples, "loss_sum": m.loss_sum, "correct": m.correct or 0,
                "skipped": m.overflow_batches}

    async def bench(ctx):
        d = Driver(ctx, dut, srng)
        await d.write_master(0, flat(master))
        await d.write_master(1, flat(moment))
        assert await d.setup(pack_setup(cfg, tc, steps, n_train, n_test)) == 1
        await d.store(image, chunk=max(1, len(image) // 3 + 1))
        for e, (tr, mst, mom, prm, ev_test, ev_train) in zip(epochs, expect):
            got, cyc = await d.run_pass(Op.TRAIN, length=e)
            if stats is not None:
                stats.setdefault("train_cycles", []).append(cyc)
            check(f"epoch {e} train metrics", got, metrics_of(tr, n_train))
            check(f"epoch {e} master", await d.read_master(0, P), mst)
            check(f"epoch {e} moment", await d.read_master(1, P), mom)
            check(f"epoch {e} params", await d.read_params(P), prm)
            if ev_test is not None:
                got, _ = await d.run_pass(Op.EVAL, bank=1)
                check(f"epoch {e} test eval", got, metrics_of(ev_test, n_test) | {"skipped": 0})
            got, cyc = await d.run_pass(Op.EVAL, bank=0)
            if stats is not None:
                stats.setdefault("eval_cycles", []).append(cyc)
            check(f"epoch {e} train eval", got, metrics_of(ev_train, n_train) | {"skipped": 0})

    run(dut, bench)
    return mism, expect


SMALL = HelConfig(n=4, m=4, k=1, o=2, t_max=8, lanes=1, store_words=256)


def test_mse_lion_epoch_equals_golden_trainer():
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=2, lr_log2=7, epochs=4, seed=3)
    mism, expect = train_scenario(SMALL, tc, n_train=6, n_test=3, steps=5, epochs=(2,), seed=1)
    assert not mism, "\n".join(mism)
