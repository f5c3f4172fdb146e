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
* Data narrower than the core (k < K inputs, o < O outputs) for both losses,
  labels o … O−1 included.
* Streamed passes (rings of 1, 2, 3 and 5 records) against
  :class:`~hel_fpga.sim.onchip.TrainingUnit` fed the same words with
  ``write_stream``: records in random orders sent as STREAM operations of random
  sizes with random stalls, a ring that wraps 20 times under back-pressure,
  surplus words, the ring read back by a resident EVAL, and an epoch streamed in
  ``epoch_order`` equal to the resident epoch.
* ``setup_ok`` for bad setups (one test per refused property) and random setups
  against :func:`~hel_fpga.spec.training.unpack_setup`, the setup's inputs,
  outputs and ring included.
* A reset in the middle of a pass; operations 0 … 9 pass through; conversion of
  an ECP5-sized TrainingCore.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from amaranth.back import verilog

from hel_fpga.rtl.core import Op, Result
from hel_fpga.rtl.training import MetricsLayout, TrainingCore
from hel_fpga.sim.onchip import OnChipTrainer, SampleStore, clamp_master
from hel_fpga.spec.formats import ECP5_OPERAND, HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.protocol import Pass
from hel_fpga.spec.training import (SETUP_FIELDS, StoreLayout, TrainConfig,
                                    TrainFormats, TrainingError, pack_setup, record_words,
                                    unpack_setup)

from amaranth_sim import simulate


# ----------------------------------------------------------------------------- data
def records(cfg: HelConfig, layout: StoreLayout, st, rng) -> list[list[int]]:
    """The store records of set ``st`` in ``layout``: per sample the inputs (T×k),
    then targets (T×o) and one mask word per step (a random non-zero word for a loss
    step), or the label."""
    lo, hi = cfg.operand.min_int, cfg.operand.max_int
    out = []
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
        out.append(rec)
    return out


def store_image(cfg: HelConfig, layout: StoreLayout, sets, rng) -> list[int]:
    """The store words of ``sets`` (training set, then test set) in ``layout``
    (:func:`records`)."""
    words = [w for st in sets for rec in records(cfg, layout, st, rng) for w in rec]
    assert len(words) == layout.words
    return words


def random_store(cfg: HelConfig, loss: str, count: int, steps: int, rng,
                 scale: float = 0.7, mask_p: float = 0.7, k: int | None = None,
                 o: int | None = None) -> SampleStore:
    """A random set of ``k`` inputs and ``o`` outputs (default: the core's K and O)."""
    f = cfg.operand
    k = cfg.k if k is None else k
    o = cfg.o if o is None else o
    u = np.clip(np.rint(rng.normal(0, scale, (count, steps, k)) * f.scale),
                f.min_int, f.max_int).astype(np.int64)
    if loss == "onehot":
        return SampleStore.classification(cfg, u, rng.integers(0, o, count), classes=o)
    y = np.clip(np.rint(rng.normal(0, scale, (count, steps, o)) * f.scale),
                f.min_int, f.max_int).astype(np.int64)
    mask = rng.random((count, steps)) < mask_p
    return SampleStore.regression(cfg, u, y, mask)


def random_weights(cfg: HelConfig, rng, scale: float, wild: int) -> dict:
    """Master-format arrays (normal, ``scale`` in parameter units) with ``wild``
    elements far beyond the master range and the moment width (WRITE_MASTER clamps
    master weights and saturates moments)."""
    fm = TrainFormats(cfg)
    out = {k: np.rint(rng.normal(0, scale, shp) * fm.master.scale).astype(np.int64)
           for k, shp in cfg.param_shapes().items()}
    flat = [(k, i) for k in PARAM_NAMES for i in range(out[k].size)]
    lim = 1 << (cfg.acc_width - 2)
    for j in rng.choice(len(flat), wild, replace=False):
        k, i = flat[j]
        out[k].reshape(-1)[i] = int(rng.integers(-lim, lim))
    return out


def random_master(cfg: HelConfig, rng, scale: float = 0.4, wild: int = 3) -> dict:
    return random_weights(cfg, rng, scale, wild)


def random_moment(cfg: HelConfig, rng, scale: float = 0.01, wild: int = 2) -> dict:
    return random_weights(cfg, rng, scale, wild)


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
        self.waits = 0          # cycles a word waited for ``ready`` (back-pressure)

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
            while True:
                _, _, ready = await ctx.tick().sample(port.ready)
                self.cycles += 1
                if ready:
                    break
                self.waits += 1
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
        self.core_idle = 0          # cycles of the pass in which the inner core was idle
        while ctx.get(dut.training):
            self.core_idle += not ctx.get(dut.core.busy)
            await self.tick()
        assert ctx.get(mt.running) == Pass.NONE
        return ({f: ctx.get(getattr(mt, f)) for f in ("samples", "loss_sum", "correct", "skipped")},
                self.cycles - t0)


def run(dut, bench, max_cycles=2_000_000):
    """Simulate ``bench(ctx)`` to its end (a watchdog fails a hung handshake)."""
    simulate(dut, bench, max_cycles=max_cycles)


# ----------------------------------------------------------------------------- scenarios
def train_scenario(cfg: HelConfig, tc: TrainConfig, *, n_train: int, n_test: int, steps: int,
                   epochs=(0,), seed: int = 0, moments: bool = True, store_fn=None,
                   master_scale: float = 0.4, stats: dict | None = None,
                   store_bank_words: int | None = None, k: int | None = None,
                   o: int | None = None, master: dict | None = None):
    """WRITE_MASTER both banks, TRAIN_SETUP, STORE, then per epoch e in ``epochs``:
    TRAIN e, READ_MASTER both banks, READ_PARAMS, and EVAL of both sets; all against
    the golden trainer. ``store_fn(cfg, loss, count, steps, rng)`` makes a set; ``k``
    and ``o`` are the data's widths (default: the core's); ``master``, the initial
    master weights (default: random)."""
    rng = np.random.default_rng(seed)
    store_fn = store_fn or (lambda c, loss, n, t, r: random_store(c, loss, n, t, r, k=k, o=o))
    train = store_fn(cfg, tc.loss, n_train, steps, rng)
    test = store_fn(cfg, tc.loss, n_test, steps, rng) if n_test else None
    master = random_master(cfg, rng, scale=master_scale) if master is None else master
    moment = random_moment(cfg, rng) if moments else {k: np.zeros(s, dtype=np.int64)
                                                      for k, s in cfg.param_shapes().items()}
    setup = pack_setup(cfg, tc, steps, n_train, n_test, k=k, o=o)
    layout = unpack_setup(cfg, setup)[1]
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

    dut = TrainingCore(cfg, store_bank_words=store_bank_words)
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

    def metrics_of(m):
        return {"samples": m.samples, "loss_sum": m.loss_sum, "correct": m.correct or 0,
                "skipped": m.overflow_batches}

    async def bench(ctx):
        d = Driver(ctx, dut, srng)
        await d.write_master(0, flat(master))
        await d.write_master(1, flat(moment))
        assert await d.setup(setup) == 1
        await d.store(image, chunk=max(1, len(image) // 3 + 1))
        for e, (tr, mst, mom, prm, ev_test, ev_train) in zip(epochs, expect):
            got, cyc = await d.run_pass(Op.TRAIN, length=e)
            if stats is not None:
                stats.setdefault("train", []).append((cyc, d.core_idle))
            check(f"epoch {e} train metrics", got, metrics_of(tr))
            check(f"epoch {e} master", await d.read_master(0, P), mst)
            check(f"epoch {e} moment", await d.read_master(1, P), mom)
            check(f"epoch {e} params", await d.read_params(P), prm)
            if ev_test is not None:
                got, _ = await d.run_pass(Op.EVAL, bank=1)
                check(f"epoch {e} test eval", got, metrics_of(ev_test) | {"skipped": 0})
            got, cyc = await d.run_pass(Op.EVAL, bank=0)
            if stats is not None:
                stats.setdefault("eval", []).append((cyc, d.core_idle))
            check(f"epoch {e} train eval", got, metrics_of(ev_train) | {"skipped": 0})

    run(dut, bench)
    return mism, expect


SMALL = HelConfig(n=4, m=4, k=1, o=2, t_max=8, lanes=1, store_words=256)


def test_mse_lion_epoch_equals_golden_trainer_with_little_controller_overhead():
    """Bit for bit; and the inner core is idle for at most a few cycles per sample
    (EVAL: between FORWARD and the next LOAD; TRAIN: also around the ECHO and per
    batch, plus the round keys' derivation at the start of the epoch)."""
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=2, lr_log2=7, epochs=4, seed=3)
    stats = {}
    mism, expect = train_scenario(SMALL, tc, n_train=6, n_test=3, steps=5, epochs=(2,), seed=1,
                                  stats=stats)
    assert not mism, "\n".join(mism)
    assert expect[0][0].overflow_batches == 0 and expect[0][0].loss_sum > 0
    (train_cycles, train_idle), = stats["train"]
    (eval_cycles, eval_idle), = stats["eval"]
    keys = 4 * 97 + 12          # four bit-serial mix32 words, once per epoch
    assert eval_idle <= 10 * 6, stats
    assert train_idle <= keys + 14 * 6 + 10 * 2, stats


def test_a_store_of_many_banks_reads_and_writes_every_bank_like_one_memory():
    """Banks of 32 words: the sets' 180 words span six banks (and the store's write
    and read addresses cross every bank boundary), bit for bit as with one bank."""
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=2, lr_log2=7, epochs=4, seed=3)
    mism, _ = train_scenario(SMALL, tc, n_train=6, n_test=3, steps=5, epochs=(1,), seed=4,
                             store_bank_words=32)
    assert not mism, "\n".join(mism)


def test_onehot_sgdm_two_epochs_with_a_partial_batch_equal_golden_trainer():
    """7 samples in batches of 4 (a partial last batch of 3), two epochs in a row
    (the second continues from the first's master weights and moments)."""
    tc = TrainConfig(loss="onehot", optimizer="sgdm", eps_log2=2, batch_log2=2, lr_log2=-2,
                     epochs=6, halvings=2, seed=77)
    mism, expect = train_scenario(SMALL, tc, n_train=7, n_test=4, steps=6, epochs=(0, 5),
                                  seed=2)
    assert not mism, "\n".join(mism)
    assert expect[0][0].correct is not None


def test_mse_sgdm_on_two_lanes_with_odd_shapes_equals_golden_trainer():
    """P = 2 lanes, K = 2, N not a multiple of P, batch of 2 over 5 samples, zero
    initial moments, an epoch past the first halving."""
    cfg = HelConfig(n=5, m=3, k=2, o=2, t_max=6, lanes=2, store_words=300)
    tc = TrainConfig(loss="mse", optimizer="sgdm", batch_log2=1, lr_log2=1, beta_log2=2,
                     epochs=3, halvings=1, seed=0x1234_5678)
    mism, _ = train_scenario(cfg, tc, n_train=5, n_test=2, steps=4, epochs=(2,), seed=3,
                             moments=False)
    assert not mism, "\n".join(mism)


def test_onehot_lion_batch_of_one_three_outputs_equals_golden_trainer():
    cfg = HelConfig(n=5, m=4, k=1, o=3, t_max=5, lanes=1, store_words=200)
    tc = TrainConfig(loss="onehot", optimizer="lion", eps_log2=2, batch_log2=0, lr_log2=6,
                     beta_log2=1, beta2_log2=16, epochs=2, schedule="constant", seed=5)
    mism, _ = train_scenario(cfg, tc, n_train=5, n_test=0, steps=5, epochs=(1,), seed=4)
    assert not mism, "\n".join(mism)


#: A small state (20 bits, ±8) and δ = 1/2: large weights wrap the state in some samples.
OVERFLOW = HelConfig(n=4, m=4, k=1, o=2, t_max=8, lanes=1, store_words=256, state_width=20,
                     state_frac=16, dt_log2=1)


def test_batches_with_an_overflow_flag_are_skipped_and_counted_as_the_golden_trainer():
    tc = TrainConfig(loss="mse", optimizer="sgdm", batch_log2=1, lr_log2=2, eps_log2=3,
                     epochs=4, seed=3)
    mism, expect = train_scenario(
        OVERFLOW, tc, n_train=8, n_test=0, steps=8, epochs=(0,), seed=3, master_scale=0.5,
        store_fn=lambda c, loss, n, t, r: random_store(c, loss, n, t, r, scale=1.0))
    assert not mism, "\n".join(mism)
    assert 0 < expect[0][0].overflow_batches < 4, "the scenario must skip some batches, not all"


def raw_label_store(cfg: HelConfig, inputs, labels, classes: int) -> SampleStore:
    """A one-hot set whose label words may lie outside 0 … o−1 (built without
    :meth:`SampleStore.classification`'s check, as the device reads a store image):
    such a label is the target of no output and never correct."""
    return SampleStore("onehot", np.asarray(inputs, dtype=np.int64),
                       labels=np.asarray(labels, dtype=np.int64), classes=classes)


def test_labels_outside_the_outputs_are_no_class_and_never_correct():
    cfg = SMALL
    wild = [-1, cfg.o, cfg.o + 1, 3, 7, cfg.operand.max_int, cfg.operand.min_int]

    def make(c, loss, n, t, r):
        st = random_store(c, loss, n, t, r)
        labels = st.labels.copy()
        labels[::2] = r.choice(wild, len(labels[::2]))
        return raw_label_store(c, st.inputs, labels, c.o)

    tc = TrainConfig(loss="onehot", optimizer="lion", eps_log2=2, batch_log2=1, lr_log2=6,
                     epochs=2, seed=9)
    mism, expect = train_scenario(cfg, tc, n_train=7, n_test=5, steps=4, epochs=(0,), seed=6,
                                  store_fn=make)
    assert not mism, "\n".join(mism)
    # the reference differs from treating every wild label as some in-range class
    assert expect[0][0].correct <= 7 - 4


# ----------------------------------------------------------------------------- narrow data
#: K = 3 inputs, O = 4 outputs: data sets of fewer inputs and outputs run on it.
WIDE_CORE = HelConfig(n=6, m=4, k=3, o=4, t_max=6, lanes=2, store_words=400)


@pytest.mark.parametrize("k, o, optimizer, batch_log2", [(1, 1, "lion", 1), (2, 3, "sgdm", 2),
                                                         (3, 2, "lion", 0), (1, 4, "sgdm", 1)])
def test_mse_on_data_narrower_than_the_core_equals_golden_trainer(k, o, optimizer, batch_log2):
    """Records of T·(k + o + 1) words; the core sees zeros on inputs k … K−1 and
    outputs o … O−1 get zero nudges and no squared error."""
    tc = TrainConfig(loss="mse", optimizer=optimizer, batch_log2=batch_log2,
                     lr_log2=6 if optimizer == "lion" else 1, epochs=3, halvings=1, seed=k * 7 + o)
    mism, expect = train_scenario(WIDE_CORE, tc, n_train=5, n_test=2, steps=4, epochs=(1,),
                                  seed=20 + k + o, k=k, o=o)
    assert not mism, "\n".join(mism)
    assert expect[0][0].loss_sum > 0


@pytest.mark.parametrize("k, o", [(2, 2), (1, 3), (3, 4)])
def test_onehot_on_fewer_classes_than_outputs_equals_golden_trainer(k, o):
    """The argmax over outputs 0 … o−1 only (the others may be larger); label words
    o … O−1, beyond O and negative are no class and never correct."""
    cfg = WIDE_CORE
    wild = [o, cfg.o - 1, cfg.o, -1, cfg.operand.max_int]

    def make(c, loss, n, t, r):
        st = random_store(c, loss, n, t, r, k=k, o=o)
        labels = st.labels.copy()
        labels[1::3] = r.choice(wild, len(labels[1::3]))
        return raw_label_store(c, st.inputs, labels, o)

    tc = TrainConfig(loss="onehot", optimizer="lion", eps_log2=2, batch_log2=1, lr_log2=6,
                     epochs=2, seed=o)
    mism, expect = train_scenario(cfg, tc, n_train=7, n_test=3, steps=3, epochs=(0,),
                                  seed=30 + k + o, store_fn=make, k=k, o=o)
    assert not mism, "\n".join(mism)


# ----------------------------------------------------------------------------- setup
SETUP_CFG = HelConfig(n=4, m=4, k=2, o=3, t_max=8, lanes=1, store_words=200, state_width=20,
                      state_frac=16, dt_log2=3)      # eps_log2 ≤ 15 by the nudge's shift
#: mse, T = 5, 6 + 3 samples of k = 1 input and o = 2 outputs, resident
SETUP_BASE = (TrainConfig(loss="mse", optimizer="lion", eps_log2=5, batch_log2=2, lr_log2=7,
                          epochs=10, seed=0xDEAD_BEEF), 5, 6, 3)


def _setup_words(**change):
    tc, steps, n_train, n_test = SETUP_BASE
    words = dict(zip(SETUP_FIELDS, pack_setup(SETUP_CFG, tc, steps, n_train, n_test, k=1, o=2)))
    words.update({k: v & 0xFFFF for k, v in change.items()})
    return [words[f] for f in SETUP_FIELDS]


_REC = record_words(SETUP_CFG, "mse", 5, 1, 2)    # 5·(1 + 2 + 1) = 20 words a sample
assert _REC == 20
BAD_SETUPS = {
    "loss_code_unknown": dict(loss=2),
    "optimizer_code_unknown": dict(optimizer=3),
    "eps_log2_above_its_range": dict(eps_log2=17),
    "eps_shifts_every_nudge_out_of_the_state": dict(eps_log2=16),
    "batch_log2_above_12": dict(batch_log2=13),
    "lion_lr_log2_negative": dict(lr_log2=-1),
    "sgdm_lr_log2_below_minus_8": dict(optimizer=0, lr_log2=-9),
    "lr_log2_above_24": dict(lr_log2=25),
    "lion_smallest_step_below_the_master_lsb": dict(lr_log2=21, halvings=8),
    "beta_log2_zero": dict(beta_log2=0),
    "beta2_log2_above_16": dict(beta2_log2=17),
    "halvings_above_8": dict(halvings=9),
    "epochs_zero": dict(epochs=0),
    "steps_zero": dict(steps=0),
    "steps_above_t_max": dict(steps=SETUP_CFG.t_max + 1),
    "train_count_zero": dict(train_count=0),
    "sets_exceed_the_store": dict(train_count=7, test_count=4),
    "test_set_exceeds_the_store": dict(train_count=1, test_count=0xFFFF),
    "inputs_zero": dict(inputs=0),
    "inputs_above_k": dict(inputs=3),
    "inputs_far_above_k": dict(inputs=0xFFFF),
    "outputs_zero": dict(outputs=0),
    "outputs_above_o": dict(outputs=4),
    "outputs_far_above_o": dict(outputs=0x8002),
    "onehot_on_one_output": dict(loss=1, outputs=1),
    "wider_records_exceed_the_store": dict(inputs=2, outputs=3, train_count=6, test_count=1),
    "ring_one_record_beyond_the_store": dict(stream_slots=11),
    "ring_of_the_most_slots": dict(stream_slots=0xFFFF),
    "ring_of_wide_records_beyond_the_store": dict(stream_slots=7, inputs=2, outputs=3),
}
GOOD_SETUPS = {
    "base": {},
    "eps_at_the_largest_shift_the_state_allows": dict(eps_log2=15),
    "sgdm_lr_log2_minus_8": dict(optimizer=0, lr_log2=-8),
    "lion_smallest_step_at_the_master_lsb": dict(lr_log2=20, halvings=8),
    "sets_exactly_fill_the_store": dict(train_count=6, test_count=4),
    "onehot": dict(loss=1, steps=8),
    "constant_schedule_empty_test_set": dict(halvings=0, test_count=0),
    "widest_data_fill_the_store": dict(inputs=2, outputs=3, train_count=5, test_count=1),
    "onehot_on_two_of_three_outputs": dict(loss=1, outputs=2),
    "onehot_on_three_outputs_two_inputs": dict(loss=1, outputs=3, inputs=2),
    "ring_exactly_fills_the_store": dict(stream_slots=10, train_count=0xFFFF,
                                         test_count=0xFFFF),
    "ring_of_one_slot_for_sets_beyond_the_store": dict(stream_slots=1, train_count=500),
    "ring_of_wide_records": dict(stream_slots=6, inputs=2, outputs=3, train_count=99),
}


def _random_setups(n, seed):
    """Setups near the boundaries: a valid one with 1–3 fields replaced."""
    rng = random.Random(seed)
    near = {"loss": [0, 1, 2], "optimizer": [0, 1, 2], "eps_log2": [0, 14, 15, 16, 17],
            "batch_log2": [0, 12, 13], "lr_log2": [-9, -8, -1, 0, 20, 21, 24, 25, 0x8000],
            "beta_log2": [0, 1, 16, 17], "beta2_log2": [0, 1, 16, 17],
            "halvings": [0, 1, 8, 9], "epochs": [0, 1, 0xFFFF], "seed_lo": [0, 0xFFFF],
            "seed_hi": [0, 0xFFFF], "steps": [0, 1, 7, 8, 9, 0xFFFF],
            "train_count": [0, 1, 2, 9, 10, 11, 0xFFFF], "test_count": [0, 1, 5, 0xFFFF],
            "inputs": [0, 1, 2, 3, 0xFFFF], "outputs": [0, 1, 2, 3, 4, 0x8003],
            "stream_slots": [0, 0, 1, 2, 6, 7, 9, 10, 11, 0xFFFF]}
    out = []
    for _ in range(n):
        change = {f: rng.choice(near[f]) for f in rng.sample(SETUP_FIELDS, rng.randint(1, 3))}
        out.append(_setup_words(**change))
    return out


def _accepts(cfg, words):
    try:
        unpack_setup(cfg, words)
        return 1
    except TrainingError:
        return 0


@pytest.fixture(scope="module")
def setup_results():
    """Every named and random setup through one simulation: {name: (setup_ok, expected)}."""
    cases = {**{f"bad:{k}": _setup_words(**v) for k, v in BAD_SETUPS.items()},
             **{f"good:{k}": _setup_words(**v) for k, v in GOOD_SETUPS.items()},
             **{f"random:{i}": w for i, w in enumerate(_random_setups(200, 11))}}
    dut = TrainingCore(SETUP_CFG)
    out = {}

    async def bench(ctx):
        d = Driver(ctx, dut, random.Random(1))
        for name, words in cases.items():
            ok = await d.setup(words)
            out[name] = (ok, _accepts(SETUP_CFG, words))

    run(dut, bench)
    return out


@pytest.mark.parametrize("name", sorted(BAD_SETUPS))
def test_setup_ok_is_low_for(setup_results, name):
    ok, expected = setup_results[f"bad:{name}"]
    assert expected == 0, "the golden unpack_setup must refuse this setup"
    assert ok == 0


@pytest.mark.parametrize("name", sorted(GOOD_SETUPS))
def test_setup_ok_is_high_for(setup_results, name):
    ok, expected = setup_results[f"good:{name}"]
    assert expected == 1
    assert ok == 1


def test_setup_ok_equals_unpack_setup_on_random_setups_near_the_boundaries(setup_results):
    res = {k: v for k, v in setup_results.items() if k.startswith("random:")}
    bad = {k: v for k, v in res.items() if v[0] != v[1]}
    assert not bad
    assert 20 < sum(v[1] for v in res.values()) < len(res) - 20   # both outcomes occur


def test_onehot_needs_two_outputs_and_training_needs_an_accepted_setup():
    """O = 1 refuses a one-hot setup; TRAIN and EVAL answer WRONG_STATE (and start no
    pass) without an accepted setup; EVAL of a set other than 0 and 1 is BAD_ARG."""
    cfg = HelConfig(n=3, m=2, k=1, o=1, t_max=4, store_words=64)
    tc = TrainConfig(loss="mse", batch_log2=0)
    good = pack_setup(cfg, tc, 3, 2, 1)
    onehot = list(good)
    onehot[SETUP_FIELDS.index("loss")] = 1
    assert _accepts(cfg, onehot) == 0
    dut = TrainingCore(cfg)
    seen = []

    async def bench(ctx):
        d = Driver(ctx, dut, random.Random(2))
        assert ctx.get(dut.setup_ok) == 0                       # after reset
        for op, kw in ((Op.TRAIN, {}), (Op.EVAL, {"bank": 0})):
            res, _ = await d.command(op, **kw)
            seen.append((op, res, ctx.get(dut.training)))
        seen.append(("onehot", await d.setup(onehot)))
        res, _ = await d.command(Op.TRAIN)
        seen.append((Op.TRAIN, res, ctx.get(dut.training)))
        seen.append(("good", await d.setup(good)))
        res, _ = await d.command(Op.EVAL, bank=2)
        seen.append((Op.EVAL, res, ctx.get(dut.training)))

    run(dut, bench)
    assert seen == [(Op.TRAIN, Result.WRONG_STATE, 0), (Op.EVAL, Result.WRONG_STATE, 0),
                    ("onehot", 0), (Op.TRAIN, Result.WRONG_STATE, 0), ("good", 1),
                    (Op.EVAL, Result.BAD_ARG, 0)]


# ----------------------------------------------------------------------------- core ops, reset
def test_core_operations_pass_through_and_training_operations_check_their_arguments():
    """WRITE_PARAMS, LOAD, FORWARD, ECHO, READ_ACC, READ_STATE, CLEAR_* through the
    outer streams equal GoldenCore (with an error result passed through); STORE,
    WRITE/READ_MASTER and EVAL refuse bad arguments; EVAL of an empty test set ends
    at once with no samples."""
    from hel_fpga.sim.golden import GoldenCore
    cfg = HelConfig(n=4, m=3, k=2, o=2, t_max=6, lanes=2, store_words=64)
    rng = np.random.default_rng(8)
    gold = GoldenCore(cfg)
    f = cfg.param
    params = {k: rng.integers(f.min_int // 4, f.max_int // 4, s)
              for k, s in cfg.param_shapes().items()}
    u = rng.integers(cfg.operand.min_int // 2, cfg.operand.max_int // 2, (5, cfg.k))
    nu = rng.integers(-(1 << 20), 1 << 20, (5, cfg.o))
    gold.write_params(**params)
    gold.load(u)
    out = gold.forward("centred")
    gold.echo(nu)
    acc = gold.read_accumulators()
    pos = gold.read_state("pos")
    dut = TrainingCore(cfg)
    P = dut.n_params
    got = {}

    async def bench(ctx):
        d = Driver(ctx, dut, random.Random(3))
        got["echo_early"], _ = await d.command(Op.ECHO)
        await d.command(Op.WRITE_PARAMS, send=flat(params), port=dut.params_in)
        got["params"] = (await d.command(Op.READ_PARAMS, receive=P, out=dut.params_out))[1]
        await d.command(Op.LOAD, length=5, send=u.reshape(-1), port=dut.inputs)
        got["outputs"] = (await d.command(Op.FORWARD, receive=5 * cfg.o, out=dut.outputs))[1]
        await d.command(Op.ECHO, send=nu.reshape(-1), port=dut.nudges)
        got["acc"] = (await d.command(Op.READ_ACC, receive=P, out=dut.acc_out))[1]
        got["pos"] = (await d.command(Op.READ_STATE, bank=1, receive=2 * cfg.n,
                                      out=dut.state_out))[1]
        await d.command(Op.CLEAR_ACC)
        got["cleared"] = (await d.command(Op.READ_ACC, receive=P, out=dut.acc_out))[1]
        await d.command(Op.CLEAR_FLAGS)
        got["bad"] = [
            (await d.command(Op.STORE, length=0, seed=0))[0],
            (await d.command(Op.STORE, length=2, seed=63))[0],
            (await d.command(Op.STORE, length=1, seed=1 << 31))[0],
            (await d.command(Op.WRITE_MASTER, bank=2))[0],
            (await d.command(Op.READ_MASTER, bank=3))[0]]
        got["inputs_ready"] = ctx.get(dut.inputs.ready)
        tc = TrainConfig(loss="mse", batch_log2=0)
        assert await d.setup(pack_setup(cfg, tc, 2, 3, 0)) == 1
        got["empty_eval"] = await d.run_pass(Op.EVAL, bank=1)

    run(dut, bench)
    assert got["echo_early"] == Result.WRONG_STATE
    assert got["params"] == flat(params)
    assert got["outputs"] == [int(v) for v in out.reshape(-1)]
    assert got["acc"] == flat(acc)
    assert got["pos"] == [int(v) for v in pos.q] + [int(v) for v in pos.w]
    assert got["cleared"] == [0] * P
    assert got["bad"] == [Result.BAD_ARG] * 5 and got["inputs_ready"] == 0
    metrics, cycles = got["empty_eval"]
    assert metrics == {"samples": 0, "loss_sum": 0, "correct": 0, "skipped": 0} and cycles < 10


def test_reset_in_a_pass_returns_to_idle_and_keeps_the_memories():
    """A one-cycle ``reset`` (as the command unit's RESET drives it) in the middle of a
    TRAIN: training, setup_ok, metrics go to their idle values a cycle later (the core
    registers its reset); the store survives, so after WRITE_MASTER and TRAIN_SETUP
    (no STORE) the epoch equals the golden one."""
    cfg = SMALL
    rng = np.random.default_rng(12)
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=1, lr_log2=7, epochs=3, seed=1)
    train = random_store(cfg, "mse", 5, 4, rng)
    master = random_master(cfg, rng, wild=0)
    words = pack_setup(cfg, tc, 4, 5, 0)
    layout = unpack_setup(cfg, words)[1]
    image = store_image(cfg, layout, [train], rng)
    ref = OnChipTrainer(cfg, tc, train, master)
    ref.epoch = 1
    want = ref.train_epoch()
    dut = TrainingCore(cfg)
    seen = {}

    async def bench(ctx):
        d = Driver(ctx, dut, random.Random(4))
        zero = [0] * dut.n_params
        await d.write_master(0, flat(master))
        await d.write_master(1, zero)
        assert await d.setup(words) == 1
        await d.store(image)
        res, _ = await d.command(Op.TRAIN, length=1)
        while ctx.get(dut.metrics.samples) < 3:
            await d.tick()
        ctx.set(dut.reset, 1)
        await d.tick()
        ctx.set(dut.reset, 0)
        await d.tick()
        seen["after"] = (ctx.get(dut.training), ctx.get(dut.setup_ok),
                         ctx.get(dut.metrics.as_value()), ctx.get(dut.busy))
        await d.write_master(0, flat(master))
        await d.write_master(1, zero)
        assert await d.setup(words) == 1
        seen["train"], _ = await d.run_pass(Op.TRAIN, length=1)
        seen["master"] = await d.read_master(0, dut.n_params)

    run(dut, bench)
    assert seen["after"] == (0, 0, 0, 0)
    assert seen["train"] == {"samples": 5, "loss_sum": want.loss_sum, "correct": 0,
                             "skipped": want.overflow_batches}
    assert seen["master"] == flat(ref.master)


def test_metrics_layout_is_the_protocol_layout():
    from hel_fpga.spec.protocol import METRICS_LAYOUT
    widths = {name: 8 * n for name, n in METRICS_LAYOUT}
    assert list(MetricsLayout.members) == list(widths)
    for name, w in widths.items():
        assert MetricsLayout.members[name].width <= w
    assert MetricsLayout.members["running"].width >= max(Pass).bit_length()


def test_training_core_converts_for_an_ecp5_sized_configuration():
    cfg = HelConfig(n=32, m=32, k=2, o=1, t_max=4096, lanes=8, store_words=65536,
                    **ECP5_OPERAND)
    text = verilog.convert(TrainingCore(cfg), name="training_core")
    assert "module training_core" in text


def test_sample_order_and_learning_rate_follow_epoch_order_and_lr_shift_at():
    """The store addresses of the samples of epoch e are ``epoch_order(count, seed, e)``
    times the record length, for set sizes around powers of two (1 … 33) and epochs
    whose 4e wraps 32 bits; the optimiser's shift is ``lr_shift_at(tc, e)`` across the
    halvings."""
    from hel_fpga.spec.training import epoch_order, lr_shift_at
    cfg = HelConfig(n=3, m=2, k=1, o=1, t_max=2, lanes=1, store_words=200)
    runs = [(1, 0, (0, 3)), (2, 7, (1,)), (3, 0xFFFF_FFFF, (5,)), (9, 12345, (0, 9)),
            (17, 0x8000_0001, ((1 << 30) + 3,)), (33, 99, (2, (1 << 32) - 1))]
    tc0 = TrainConfig(loss="mse", optimizer="sgdm", batch_log2=5, lr_log2=-3, epochs=10,
                      halvings=3)
    lr_epochs = (0, 4, 5, 7, 8, 9, 10, 1 << 20)
    dut = TrainingCore(cfg)
    rec = record_words(cfg, "mse", 1)
    bases, lrs = {}, {}

    async def bench(ctx):
        d = Driver(ctx, dut, random.Random(5), idle=0.1, stall=0.1)
        await d.write_master(0, [0] * dut.n_params)
        await d.write_master(1, [0] * dut.n_params)
        await d.store([0] * (33 * rec))
        for count, seed, epochs in runs:
            tc = TrainConfig(loss="mse", optimizer="sgdm", batch_log2=5, lr_log2=-3,
                             epochs=10, halvings=3, seed=seed)
            assert await d.setup(pack_setup(cfg, tc, 1, count, 0)) == 1
            for e in epochs:
                seen = []
                res, _ = await d.command(Op.TRAIN, length=e)
                while ctx.get(dut.training):
                    if ctx.get(dut.probes["sample_start"]):
                        seen.append(ctx.get(dut.probes["sample_base"]))
                    await d.tick()
                bases[count, seed, e] = seen
        assert await d.setup(pack_setup(cfg, tc0, 1, 1, 0)) == 1
        for e in lr_epochs:
            await d.run_pass(Op.TRAIN, length=e)
            lrs[e] = ctx.get(dut.probes["lr_shift"])

    run(dut, bench)
    for count, seed, epochs in runs:
        for e in epochs:
            assert bases[count, seed, e] == [i * rec for i in epoch_order(count, seed, e)], \
                (count, seed, e)
    assert lrs == {e: lr_shift_at(tc0, e) for e in lr_epochs}
    assert len(set(lrs.values())) == 4


# ----------------------------------------------------------------------------- streamed passes
def stream_scenario(cfg: HelConfig, tc: TrainConfig, *, slots: int, n_train: int, n_test: int,
                    steps: int, passes, seed: int, k: int | None = None, o: int | None = None,
                    max_chunk: int | None = None, resident_after: bool = True,
                    idle: float = 0.3, stall: float = 0.3):
    """A streamed setup (a ring of ``slots`` records), then ``passes``: ("train", epoch,
    order[, extra]) or ("eval", bank, order[, extra]). Each pass starts with TRAIN or
    EVAL; the testbench then sends the records of ``order`` (indices into the pass's
    set) and ``extra`` surplus words as STREAM operations of random sizes (1 …
    ``max_chunk`` words, crossing records), with random idle cycles; the ring's
    back-pressure stalls them. The last STREAM's done comes with the pass's end.
    Reference: :class:`~hel_fpga.sim.onchip.TrainingUnit` fed the same words through
    ``write_stream``: the metrics after every pass, the master weights and moments
    after every TRAIN. With ``resident_after``, a resident setup of ``slots`` training
    records then EVALs the store (the ring as the streams left it)."""
    from hel_fpga.sim.golden import GoldenCore
    from hel_fpga.sim.onchip import TrainingUnit
    rng = np.random.default_rng(seed)
    train = random_store(cfg, tc.loss, n_train, steps, rng, k=k, o=o)
    test = random_store(cfg, tc.loss, n_test, steps, rng, k=k, o=o) if n_test else None
    master = random_master(cfg, rng)
    moment = random_moment(cfg, rng)
    setup = pack_setup(cfg, tc, steps, n_train, n_test, k=k, o=o, slots=slots)
    layout = unpack_setup(cfg, setup)[1]
    assert layout.streamed and layout.words <= cfg.store_words
    recs = [records(cfg, layout, train, rng), records(cfg, layout, test, rng) if test else []]
    max_chunk = max_chunk or 2 * layout.record + 1

    ref = TrainingUnit(cfg, GoldenCore(cfg))
    ref.write_master(0, flat(master))
    ref.write_master(1, flat(moment))
    ref.write_setup(setup)
    plan, expect = [], []
    for kind, arg, order, *extra in passes:
        words = [w for i in order for w in recs[kind == "eval" and arg][i]]
        cuts, a = [], 0
        while a < len(words):
            n = int(rng.integers(1, max_chunk + 1))
            cuts.append(words[a:a + n])
            a += n
        # surplus words come in the STREAM of the last record (after it, none is taken)
        cuts[-1] += [int(v) for v in rng.integers(-999, 999, extra[0] if extra else 0)]
        assert (ref.train(arg) if kind == "train" else ref.evaluate(bool(arg))) is None
        assert ref.streaming
        for part in cuts:
            ref.write_stream(part)
        assert not ref.streaming and ref.running == Pass.NONE
        plan.append((kind, arg, cuts))
        expect.append((ref.metrics, list(ref.read_master(0)), list(ref.read_master(1))))
    resident = None
    if resident_after:
        setup2 = pack_setup(cfg, tc, steps, slots, 0, k=k, o=o)
        ref.write_setup(setup2)
        m = ref.evaluate(False)
        resident = (setup2, (m.samples, m.loss_sum, m.correct or 0, 0))

    dut = TrainingCore(cfg)
    P = dut.n_params
    got = {"passes": [], "streaming": []}

    async def bench(ctx):
        d = Driver(ctx, dut, random.Random(seed), idle=idle, stall=stall)
        got["driver"] = d
        mt = dut.metrics
        await d.write_master(0, flat(master))
        await d.write_master(1, flat(moment))
        assert await d.setup(setup) == 1
        for kind, arg, cuts in plan:
            op, kw = (Op.TRAIN, {"length": arg}) if kind == "train" else (Op.EVAL, {"bank": arg})
            res, _ = await d.command(op, **kw)
            assert res == Result.OK
            flags = [(ctx.get(dut.training), ctx.get(dut.streaming))]
            for part in cuts:
                res, _ = await d.command(Op.STREAM, length=len(part), send=part,
                                         port=dut.inputs)
                assert res == Result.OK
                flags.append((ctx.get(dut.training), ctx.get(dut.streaming)))
            got["streaming"].append(flags)
            metrics = tuple(ctx.get(getattr(mt, f))
                            for f in ("samples", "loss_sum", "correct", "skipped"))
            got["passes"].append((metrics, await d.read_master(0, P), await d.read_master(1, P)))
        got["stream_idle"], _ = await d.command(Op.STREAM, length=3)
        if resident is not None:
            assert await d.setup(resident[0]) == 1
            m, _ = await d.run_pass(Op.EVAL, bank=0)
            got["resident"] = tuple(m[f] for f in ("samples", "loss_sum", "correct", "skipped"))

    run(dut, bench)
    for i, ((kind, _, cuts), flags) in enumerate(zip(plan, got["streaming"])):
        # running and streaming until the done of the STREAM that completes the pass
        assert flags == [(1, 1)] * len(cuts) + [(0, 0)], (i, flags)
    for i, (g, w) in enumerate(zip(got["passes"], expect)):
        assert g[0] == w[0], f"pass {i} metrics"
        assert g[1] == w[1], f"pass {i} master"
        assert g[2] == w[2], f"pass {i} moment"
    assert got["stream_idle"] == Result.WRONG_STATE
    if resident is not None:
        assert got["resident"] == resident[1]
    stream_scenario.waits = got["driver"].waits
    return expect


def _orders(rng: random.Random, count: int, n: int):
    """``count`` sample indices of a set of ``n``: a shuffle, with repeats if longer."""
    return [rng.randrange(n) for _ in range(count)]


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_streamed_mse_train_and_eval_passes_equal_the_training_unit(slots):
    """Rings of 1, 2 and 5 records; 7 training samples sent in a random order with
    repeats (the ring of 1 and 2 wraps on every pass), the test set, narrow data
    (k < K, o < O), surplus words after the last record of an EVAL, then the store
    read back by a resident EVAL."""
    cfg = WIDE_CORE
    r = random.Random(slots)
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=1, lr_log2=6, epochs=3,
                     halvings=1, seed=5)
    passes = [("train", 0, _orders(r, 7, 7)), ("eval", 1, _orders(r, 3, 3)),
              ("train", 2, _orders(r, 7, 7)), ("eval", 0, _orders(r, 7, 7), 11)]
    stream_scenario(cfg, tc, slots=slots, n_train=7, n_test=3, steps=3, k=2, o=3,
                    passes=passes, seed=40 + slots)


@pytest.mark.parametrize("slots, k, o", [(1, 3, 4), (3, 1, 2)])
def test_streamed_onehot_sgdm_passes_equal_the_training_unit(slots, k, o):
    cfg = WIDE_CORE
    r = random.Random(slots + 10)
    tc = TrainConfig(loss="onehot", optimizer="sgdm", eps_log2=2, batch_log2=2, lr_log2=-1,
                     epochs=4, seed=8)
    passes = [("train", 1, _orders(r, 6, 6)), ("eval", 0, _orders(r, 6, 6), 1),
              ("train", 3, _orders(r, 6, 6), 5)]
    stream_scenario(cfg, tc, slots=slots, n_train=6, n_test=0, steps=4, k=k, o=o,
                    passes=passes, seed=50 + slots)


def test_a_ring_of_two_wraps_many_times_under_tight_back_pressure():
    """40 samples through a ring of 2 (20 wraps), one word per STREAM at times and
    long ones at others, with little idle: the ring stays full and stalls the words."""
    cfg = SMALL
    r = random.Random(3)
    tc = TrainConfig(loss="mse", optimizer="sgdm", batch_log2=3, lr_log2=1, epochs=2, seed=2)
    stream_scenario(cfg, tc, slots=2, n_train=40, n_test=0, steps=2,
                    passes=[("train", 1, _orders(r, 40, 40), 3)], seed=60, max_chunk=30,
                    idle=0.05, stall=0.1)
    assert stream_scenario.waits > 40 * 10, "the ring must hold the words back"


def test_a_streamed_epoch_in_epoch_order_equals_the_resident_epoch():
    """The host's order epoch_order(count, seed, e): the streamed epoch's metrics,
    master weights and moments equal the golden resident epoch's."""
    from hel_fpga.spec.training import epoch_order
    cfg = SMALL
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=2, lr_log2=7, epochs=4, seed=3)
    n, steps, e = 9, 4, 2
    expect = stream_scenario(cfg, tc, slots=3, n_train=n, n_test=0, steps=steps,
                             passes=[("train", e, epoch_order(n, tc.seed, e))], seed=70,
                             resident_after=False)
    # the resident golden epoch on the same data (the scenario's first draws)
    rng = np.random.default_rng(70)
    train = random_store(cfg, tc.loss, n, steps, rng)
    master, moment = random_master(cfg, rng), random_moment(cfg, rng)
    ref = OnChipTrainer(cfg, tc, train, {k: clamp_master(v, TrainFormats(cfg))
                                         for k, v in master.items()})
    ref.load_state({**{f"master_{k}": master[k] for k in PARAM_NAMES},
                    **{f"moment_{k}": moment[k] for k in PARAM_NAMES}, "epoch": e})
    m = ref.train_epoch()
    (metrics, mst, mom), = expect
    assert metrics == (m.samples, m.loss_sum, m.correct or 0, m.overflow_batches)
    assert mst == flat(ref.master) and mom == flat(ref.moment)


# ----------------------------------------------------------------------------- sample engines
@pytest.mark.parametrize("engines, batch_log2", [(2, 2), (3, 1), (4, 3), (3, 0)])
def test_engines_train_and_eval_mse_equal_golden_trainer(engines, batch_log2):
    """C sample engines: batches that are and are not multiples of C (and smaller than
    C), a partial last batch, two epochs, EVAL of both sets; bit for bit with the golden
    trainer of the same C, which sums the engines' accumulators per batch."""
    cfg = SMALL.replace(engines=engines, store_words=512)
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=batch_log2, lr_log2=7, epochs=4,
                     seed=3)
    mism, expect = train_scenario(cfg, tc, n_train=11, n_test=3, steps=5, epochs=(0, 2),
                                  seed=engines + 10 * batch_log2)
    assert not mism, "\n".join(mism)
    assert all(e[0].overflow_batches == 0 and e[0].loss_sum > 0 for e in expect)


def test_engines_onehot_sgdm_on_narrow_data_equal_golden_trainer():
    """Three engines, one-hot on fewer classes than outputs and fewer inputs than K,
    P = 2 lanes."""
    cfg = WIDE_CORE.replace(engines=3)
    tc = TrainConfig(loss="onehot", optimizer="sgdm", eps_log2=2, batch_log2=2, lr_log2=-1,
                     epochs=3, seed=9)
    mism, expect = train_scenario(cfg, tc, n_train=10, n_test=4, steps=4, epochs=(0, 1), seed=4,
                                  k=2, o=3)
    assert not mism, "\n".join(mism)
    assert expect[0][0].correct is not None


def test_engines_run_samples_at_once():
    """The same epoch on one and on four engines: four take well under half the cycles
    (the walk of a record is short beside a sample, so the engines overlap)."""
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=3, lr_log2=7, epochs=2, seed=3)
    cycles = {}
    for c in (1, 4):
        stats = {}
        mism, _ = train_scenario(SMALL.replace(engines=c, store_words=512), tc, n_train=16, n_test=0, steps=8,
                                 epochs=(0,), seed=5, stats=stats)
        assert not mism, "\n".join(mism)
        cycles[c] = stats["train"][0][0]
    assert cycles[4] < 0.45 * cycles[1], cycles


@pytest.mark.parametrize("engines", [2, 3])
def test_engines_skip_batches_with_an_overflow_flag_as_the_golden_trainer(engines):
    tc = TrainConfig(loss="mse", optimizer="sgdm", batch_log2=1, lr_log2=2, eps_log2=3,
                     epochs=4, seed=3)
    mism, expect = train_scenario(
        OVERFLOW.replace(engines=engines), tc, n_train=8, n_test=0, steps=8, epochs=(0,),
        seed=3, master_scale=0.5,
        store_fn=lambda c, loss, n, t, r: random_store(c, loss, n, t, r, scale=1.0))
    assert not mism, "\n".join(mism)
    assert 0 < expect[0][0].overflow_batches < 4, "the scenario must skip some batches, not all"


@pytest.mark.parametrize("slots", [1, 4])
def test_engines_streamed_passes_equal_the_training_unit(slots):
    """Three engines behind a ring of one record (fewer slots than engines) and of four."""
    cfg = WIDE_CORE.replace(engines=3)
    r = random.Random(slots + 20)
    tc = TrainConfig(loss="mse", optimizer="lion", batch_log2=2, lr_log2=6, epochs=3,
                     halvings=1, seed=5)
    passes = [("train", 0, _orders(r, 9, 9)), ("eval", 1, _orders(r, 3, 3)),
              ("train", 1, _orders(r, 9, 9), 4)]
    stream_scenario(cfg, tc, slots=slots, n_train=9, n_test=3, steps=3, k=2, o=3,
                    passes=passes, seed=70 + slots)


@pytest.mark.parametrize("engines", [2, 3])
def test_engines_whose_accumulator_sum_leaves_acc_width_skip_the_batch(engines):
    """B = 128 equal samples at an acc_width where each engine's share of the batch
    fits and the sum does not (``big_contrast_case``: no engine raises a flag): the
    range check's READ_ACC finds it, the batch is skipped, nothing is stepped."""
    from test_onchip_engines import big_contrast_case
    cfg, tc, store, master, _ = big_contrast_case(engines)
    cfg = cfg.replace(store_words=1024)
    mism, expect = train_scenario(cfg, tc, n_train=store.count, n_test=0, steps=1, epochs=(0,),
                                  store_fn=lambda *_: store, master=master, moments=False)
    assert not mism, "\n".join(mism)
    assert expect[0][0].overflow_batches == 1 and expect[0][1] == flat(master)
