"""C sample engines in the golden model of on-chip training (sim/onchip.py,
sim/protocol_model.py): C cores with the same parameters, the samples of a batch
spread over them, the batch's gradient the exact sum of their accumulators.

References: the C = 1 trainer (a run without overflow must not depend on C), cores
driven by hand on the engine the rule names with their accumulators summed in
Python integers, and the signed ``acc_width`` range written out.
"""

import numpy as np
import pytest

from hel_fpga.host.link import SerialDevice
from hel_fpga.sim.golden import GoldenCore
from hel_fpga.sim.onchip import (
    OnChipTrainer, SampleStore, TrainingUnit, gradient_from_acc, master_from_float, requantize,
    sample_nudges, sgdm_step, sum_accumulators)
from hel_fpga.sim.protocol_model import ModelPort, ProtocolModel
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.protocol import Command, StatusFlag
from hel_fpga.spec.training import TrainConfig, TrainFormats, epoch_order, pack_setup

CFG = HelConfig(n=6, m=5, k=2, o=2, t_max=16, store_words=4096)


def float_params(rng, cfg=CFG):
    return {"W": rng.normal(0, 1 / np.sqrt(cfg.n), (cfg.m, cfg.n)),
            "B": rng.normal(0, 0.5, (cfg.m, cfg.k)), "b": rng.normal(0, 0.1, cfg.m),
            "alpha": rng.uniform(0.5, 1.5, cfg.n)}


def make_store(kind, rng, s, t=8, cfg=CFG):
    u = cfg.operand.quantize(rng.normal(0, 0.5, (s, t, cfg.k)))
    if kind == "onehot":
        return SampleStore.classification(cfg, u, rng.integers(0, cfg.o, s))
    y = TrainFormats(cfg).target.quantize(rng.normal(0, 0.3, (s, t, cfg.o)))
    mask = rng.random((s, t)) < 0.6
    mask[:, -1] = True
    return SampleStore.regression(cfg, u, y, mask)


def py_sum(accs, k):
    """Element-wise sum in Python integers (no width)."""
    total = np.zeros(accs[0][k].shape, dtype=object)
    for a in accs:
        total = total + a[k].astype(object)
    return total


# --------------------------------------------------------------------------- the exact sum

@pytest.mark.parametrize("acc_width", [34, 48, 60, 63])
@pytest.mark.parametrize("engines", [2, 5, 16])
def test_sum_accumulators_is_the_exact_integer_sum_or_none_outside_the_signed_range(acc_width, engines):
    """Against Python integers: in range → the exact sum; any element outside
    [−2^(aw−1), 2^(aw−1)−1] → None; the extremes (all engines at the minimum or the
    maximum, which need up to 67 bits) are handled exactly."""
    rng = np.random.default_rng(acc_width * 100 + engines)
    lo, hi = -(1 << (acc_width - 1)), (1 << (acc_width - 1)) - 1
    shapes = CFG.param_shapes()
    seen_in = seen_out = 0
    for trial in range(60):
        spread = [hi, hi // engines, hi >> 8][trial % 3]
        accs = [{k: rng.integers(-spread - 1, spread, shapes[k], endpoint=True) for k in PARAM_NAMES}
                for _ in range(engines)]
        if trial == 0:
            for a in accs:
                a["W"][0, 0], a["b"][0] = lo, hi
        if trial == 1:                   # exactly the bounds: in range
            accs[0]["W"][:] = lo
            accs[0]["b"][:] = hi
            for a in accs[1:]:
                for k in PARAM_NAMES:
                    a[k][:] = 0
        exact = {k: py_sum(accs, k) for k in PARAM_NAMES}
        inside = all(((v >= lo) & (v <= hi)).all() for v in exact.values())
        got = sum_accumulators(accs, acc_width)
        if inside:
            seen_in += 1
            assert got is not None
            for k in PARAM_NAMES:
                assert got[k].dtype == np.int64
                assert (got[k].astype(object) == exact[k]).all()
        else:
            seen_out += 1
            assert got is None
    assert seen_in >= 10 and seen_out >= 10


def test_sum_accumulators_finds_one_element_just_outside_either_bound():
    aw = 40
    lo, hi = -(1 << (aw - 1)), (1 << (aw - 1)) - 1
    shapes = CFG.param_shapes()
    for bound, extra in ((hi, 1), (lo, -1), (hi, 0), (lo, 0)):
        accs = [{k: np.zeros(shapes[k], dtype=np.int64) for k in PARAM_NAMES} for _ in range(3)]
        accs[0]["alpha"][2] = bound
        accs[2]["alpha"][2] = extra
        assert (sum_accumulators(accs, aw) is None) == (extra != 0)


# --------------------------------------------------------------------------- C does not change a run

def run(cfg, tc, train, test, master):
    tr = OnChipTrainer(cfg, tc, train, master)
    rows = tr.fit(test)
    return tr, rows


@pytest.mark.parametrize("engines", [2, 3, 4, 5])
@pytest.mark.parametrize("kind,optimizer", [("mse", "sgdm"), ("mse", "lion"),
                                            ("onehot", "sgdm"), ("onehot", "lion")])
@pytest.mark.parametrize("batch_log2", [0, 1, 2, 3])
def test_c_engines_train_bit_identically_to_one_engine_when_nothing_overflows(
        engines, kind, optimizer, batch_log2):
    """Master weights, moments, the engines' parameters and every epoch's train and
    test metrics equal the C = 1 run; 13 samples make a partial last batch for
    every B ≥ 2, and B = 1, 2, 4, 8 are and are not multiples of C. No batch is
    skipped (else the runs could agree by skipping)."""
    rng = np.random.default_rng(engines * 10 + batch_log2 + len(kind) + len(optimizer))
    train, test = make_store(kind, rng, 13), make_store(kind, rng, 7)
    master = master_from_float(float_params(rng), TrainFormats(CFG))
    tc = TrainConfig(loss=kind, optimizer=optimizer, batch_log2=batch_log2, epochs=3, seed=4,
                     eps_log2=3 if kind == "mse" else 2, lr_log2=5 if optimizer == "lion" else 0)
    one, rows1 = run(CFG, tc, train, test, master)
    many, rows_c = run(CFG.replace(engines=engines), tc, train, test, master)
    assert len(many.cores) == engines and many.core is many.cores[0]
    assert rows_c == rows1
    assert all(m.overflow_batches == 0 for m, _ in rows1)
    for k in PARAM_NAMES:
        assert np.array_equal(many.master[k], one.master[k])
        assert np.array_equal(many.moment[k], one.moment[k])
        for c in many.cores:
            assert np.array_equal(c.params[k], one.core.params[k])
    assert any(not np.array_equal(many.master[k], master[k]) for k in PARAM_NAMES)


# --------------------------------------------------------------------------- which engine

def reference_cores(cfg, params):
    cores = [GoldenCore(cfg) for _ in range(cfg.engines)]
    for c in cores:
        c.write_params(**params)
    return cores


def run_by_hand(cfg, tc, cores, store, i, engine):
    """FORWARD, nudges, ECHO of sample ``i`` on ``cores[engine]``."""
    c = cores[engine]
    c.load(store.core_inputs(cfg, i))
    out = c.forward("centred")
    y, mask = store.sample_targets(cfg, i)
    c.echo(sample_nudges(cfg, out, y, mask, tc.eps_log2)[0])


def test_train_samples_run_on_their_index_in_the_batch_mod_c():
    """B = 4, C = 3: every batch's samples run on engines 0, 1, 2, 0 (the count
    restarts at the batch end). Cores driven by hand on those engines hold the
    trainer's per-engine accumulators just before each batch end; the batch's update
    is the one from their sum in Python integers."""
    cfg = CFG.replace(engines=3)
    rng = np.random.default_rng(31)
    store = make_store("mse", rng, 10)
    tc = TrainConfig(loss="mse", optimizer="sgdm", batch_log2=2, eps_log2=3, lr_log2=0, epochs=1)
    tr = OnChipTrainer(cfg, tc, store, master_from_float(float_params(rng), TrainFormats(cfg)))
    order = epoch_order(store.count, tc.seed, 0)
    p = tr.begin_pass(train=True)
    for start in range(0, store.count, tc.batch):
        batch = order[start:start + tc.batch]
        ref = reference_cores(cfg, tr.params())
        master0 = {k: v.copy() for k, v in tr.master.items()}
        moment0 = {k: v.copy() for k, v in tr.moment.items()}
        full = len(batch) == tc.batch
        for n, i in enumerate(batch[:-1] if full else batch):
            assert p.engine() == n % 3
            run_by_hand(cfg, tc, ref, store, i, n % 3)
            p.add(store, i)
        for e in range(3):          # before the batch end (a full batch's last sample ends it)
            for k in PARAM_NAMES:
                assert np.array_equal(tr.cores[e].acc[k], ref[e].acc[k]), (start, e, k)
        if full:
            assert p.engine() == (tc.batch - 1) % 3
            run_by_hand(cfg, tc, ref, store, batch[-1], (tc.batch - 1) % 3)
        total = {k: py_sum([c.acc for c in ref], k).astype(np.int64) for k in PARAM_NAMES}
        if full:
            p.add(store, batch[-1])                       # the batch end
        else:
            for k in PARAM_NAMES:
                assert np.array_equal(tr.batch_accumulators()[k], total[k])
            p.finish()
        g = gradient_from_acc(total, tr.fm, tc)
        for k in PARAM_NAMES:
            m, mo = sgdm_step(master0[k], moment0[k], g[k], tc.lr_log2, tc.beta_log2, tr.fm)
            assert np.array_equal(tr.master[k], m) and np.array_equal(tr.moment[k], mo)
        assert all(not c.acc[k].any() for c in tr.cores for k in PARAM_NAMES)
    assert len(range(0, store.count, tc.batch)) == 3          # 4 + 4 + a partial 2


def test_eval_sample_j_runs_on_engine_j_mod_c_and_engine_0_keeps_the_last_of_its_samples():
    cfg = CFG.replace(engines=3)
    rng = np.random.default_rng(32)
    store = make_store("onehot", rng, 8)
    tc = TrainConfig(loss="onehot")
    tr = OnChipTrainer(cfg, tc, store, master_from_float(float_params(rng), TrainFormats(cfg)))
    m = tr.evaluate(store)
    ref = reference_cores(cfg, tr.params())
    for j, e in ((6, 0), (7, 1), (5, 2)):                # each engine's last sample
        ref[e].load(store.core_inputs(cfg, j))
        ref[e].forward("centred")
        assert np.array_equal(tr.cores[e].inputs, store.core_inputs(cfg, j))
        for bank in ("fwd",):
            assert np.array_equal(tr.cores[e].banks[bank].q, ref[e].banks[bank].q)
            assert np.array_equal(tr.cores[e].banks[bank].w, ref[e].banks[bank].w)
    assert all(not c.acc[k].any() for c in tr.cores for k in PARAM_NAMES)
    assert m == OnChipTrainer(CFG, tc, store, tr.master).evaluate(store)


# --------------------------------------------------------------------------- overflow

def big_contrast_case(engines):
    """T = 1 samples with the largest error, all the same, and an acc_width at which
    B of them overflow while B/C do not."""
    base = HelConfig(n=6, m=5, k=2, o=2, t_max=1, store_words=64, acc_width=63)
    fm = TrainFormats(base)
    u = np.full((1, 1, base.k), base.operand.max_int)
    y = np.full((1, 1, base.o), fm.target.min_int)
    rng = np.random.default_rng(33)
    master = master_from_float({"W": rng.normal(0, 1, (base.m, base.n)), "B": np.full((base.m, base.k), 1.5),
                                "b": np.full(base.m, 1.0), "alpha": np.ones(base.n)}, fm)
    one = SampleStore.regression(base, u, y)
    tc = TrainConfig(loss="mse", eps_log2=0, batch_log2=7, epochs=1)
    probe = OnChipTrainer(base, tc, one, master)
    probe.train_sample(0)
    v = probe.core.read_accumulators()
    big = max(int(np.abs(a).max()) for a in v.values())
    aw = (tc.batch * big).bit_length()                  # 2^(aw−1) ≤ B·max|v| < 2^aw
    cfg = base.replace(acc_width=aw, engines=engines)
    assert aw >= cfg.acc_min_width
    store = SampleStore.regression(cfg, np.repeat(u, tc.batch, 0), np.repeat(y, tc.batch, 0))
    return cfg, tc, store, master, v


@pytest.mark.parametrize("engines", [2, 3])
def test_engines_in_range_whose_sum_is_not_skip_the_batch(engines):
    """B = 128 equal samples: each engine's B/C contrasts stay in the acc_width range
    (no flag), their sum does not (checked in Python integers) → the batch is
    skipped and the masters and moments stay; one core (C = 1) wraps and skips too."""
    cfg, tc, store, master, v = big_contrast_case(engines)
    lo, hi = -(1 << (cfg.acc_width - 1)), (1 << (cfg.acc_width - 1)) - 1
    tr = OnChipTrainer(cfg, tc, store, master)
    before = {k: a.copy() for k, a in tr.master.items()}
    for i in range(tc.batch):
        tr.train_sample(i, engine=i % engines)
    assert not any(c.acc_overflow or c.state_overflow for c in tr.cores)
    for e, c in enumerate(tr.cores):
        n = len(range(e, tc.batch, engines))
        for k in PARAM_NAMES:
            assert np.array_equal(c.acc[k], n * v[k])     # no engine wrapped
    exact = {k: py_sum([c.acc for c in tr.cores], k) for k in PARAM_NAMES}
    assert any(((x < lo) | (x > hi)).any() for x in exact.values())
    assert tr.batch_accumulators() is None
    assert tr.end_batch(tc.lr_log2) is False
    assert all(np.array_equal(tr.master[k], before[k]) for k in PARAM_NAMES)
    assert all(not tr.moment[k].any() for k in PARAM_NAMES)
    assert all(not c.acc[k].any() and not c.acc_overflow for c in tr.cores for k in PARAM_NAMES)
    # the same through an epoch, and on one core (which wraps: its flag)
    for c in (engines, 1):
        t = OnChipTrainer(cfg.replace(engines=c), tc, store, master)
        (m, _), = t.fit()
        assert m.overflow_batches == 1 and m.samples == tc.batch
        assert all(np.array_equal(t.master[k], before[k]) for k in PARAM_NAMES)
    # half the batch: the sum is in range, the step is taken
    half = TrainConfig(loss="mse", eps_log2=tc.eps_log2, batch_log2=tc.batch_log2 - 1, epochs=1)
    halves = SampleStore.regression(cfg, store.inputs[:half.batch], store.targets[:half.batch])
    t = OnChipTrainer(cfg, half, halves, master)
    (m, _), = t.fit()
    assert m.overflow_batches == 0
    assert any(not np.array_equal(t.master[k], before[k]) for k in PARAM_NAMES)


@pytest.mark.parametrize("flag", ["state_overflow", "acc_overflow"])
@pytest.mark.parametrize("engine", [1, 2])
def test_a_flag_of_any_engine_skips_the_batch_and_every_engine_is_cleared(flag, engine):
    cfg = CFG.replace(engines=3)
    rng = np.random.default_rng(34)
    store = make_store("mse", rng, 6)
    tc = TrainConfig(loss="mse", batch_log2=2)
    tr = OnChipTrainer(cfg, tc, store, master_from_float(float_params(rng), TrainFormats(cfg)))
    before = {k: a.copy() for k, a in tr.master.items()}
    for i in range(3):
        tr.train_sample(i, engine=i)
    setattr(tr.cores[engine], flag, True)
    assert tr.batch_accumulators() is None
    assert tr.end_batch(8) is False
    assert all(np.array_equal(before[k], tr.master[k]) for k in PARAM_NAMES)
    for c in tr.cores:
        assert not c.acc_overflow and not c.state_overflow
        assert not any(c.acc[k].any() for k in PARAM_NAMES)
    for i in range(3):
        tr.train_sample(i, engine=i)
    assert tr.end_batch(8) is True


# --------------------------------------------------------------------------- the device

def unit(cfg, tc, train, test, master, moment=None):
    u = TrainingUnit(cfg, GoldenCore(cfg))
    u.write_store(0, np.concatenate([train.image(cfg), test.image(cfg)]))
    u.write_setup(pack_setup(cfg, tc, train.steps, train.count, test.count))
    assert u.setup is not None
    u.write_master(0, np.concatenate([master[k].ravel() for k in PARAM_NAMES]))
    return u


def test_training_unit_with_c_engines_is_the_one_engine_unit_and_train_clears_every_engine():
    """WRITE_MASTER writes every engine; TRAIN clears every engine's accumulators and
    flags first (a stale flag on engine 2 skips nothing); epochs, EVALs and master
    weights equal the C = 1 unit."""
    rng = np.random.default_rng(35)
    train, test = make_store("onehot", rng, 11), make_store("onehot", rng, 5)
    master = master_from_float(float_params(rng), TrainFormats(CFG))
    tc = TrainConfig(loss="onehot", optimizer="lion", batch_log2=2, eps_log2=2, lr_log2=5, epochs=2)
    one, many = unit(CFG, tc, train, test, master), unit(CFG.replace(engines=4), tc, train, test, master)
    assert len(many.cores) == 4
    for c in many.cores:
        for k in PARAM_NAMES:
            assert np.array_equal(c.params[k], requantize(master[k], many.fm))
    for epoch in range(2):
        many.cores[2].state_overflow = True
        many.cores[3].acc["W"][:] = 1 << 40
        m = many.train(epoch)
        assert m == one.train(epoch) and m.overflow_batches == 0
        assert many.evaluate(True) == one.evaluate(True)
        assert many.evaluate(False) == one.evaluate(False)
    for which in (0, 1):
        assert np.array_equal(many.read_master(which), one.read_master(which))


def model_device(cfg) -> tuple[SerialDevice, ProtocolModel]:
    model = ProtocolModel(cfg)
    return SerialDevice(ModelPort(model), retries=0), model


def test_protocol_model_write_params_reaches_every_engine_and_train_starts_from_it():
    """A host WRITE_PARAMS after WRITE_MASTER: the first batch runs on those
    parameters on both engines. Reference: a C = 1 trainer whose core holds them
    (a C = 1 trainer on the master's own parameters ends elsewhere)."""
    cfg = CFG.replace(engines=2)
    rng = np.random.default_rng(36)
    train = make_store("mse", rng, 9)
    tc = TrainConfig(loss="mse", optimizer="sgdm", batch_log2=2, eps_log2=3, lr_log2=0, epochs=1)
    fm = TrainFormats(cfg)
    master = master_from_float(float_params(rng), fm)
    params = {k: requantize(v, fm) for k, v in master_from_float(float_params(rng), fm).items()}
    dev, model = model_device(cfg)
    dev.write_master(0, np.concatenate([master[k].ravel() for k in PARAM_NAMES]))
    dev.write_params(params)
    for c in model.cores:
        for k in PARAM_NAMES:
            assert np.array_equal(c.params[k], params[k])
    dev.store(0, train.image(cfg))
    dev.train_setup(pack_setup(cfg, tc, train.steps, train.count, 0))
    dev.start_pass(Command.TRAIN, 0)
    core = GoldenCore(CFG)
    core.write_params(**params)
    ref = OnChipTrainer(CFG, tc, train, master, core=core)
    m = ref.train_epoch()
    plain = OnChipTrainer(CFG, tc, train, master)
    plain.train_epoch()
    got = dev.metrics()
    assert (got["samples"], got["loss_sum"], got["skipped"]) == (m.samples, m.loss_sum, 0)
    words = np.concatenate([ref.master[k].ravel() for k in PARAM_NAMES])
    assert np.array_equal(dev.read_master(0), words)
    assert not np.array_equal(words, np.concatenate([plain.master[k].ravel() for k in PARAM_NAMES]))
    for c in model.cores:
        for k in PARAM_NAMES:
            assert np.array_equal(c.params[k], ref.core.params[k])


def test_protocol_model_status_reports_the_or_of_the_engines_and_clears_act_on_all():
    cfg = CFG.replace(engines=3)
    dev, model = model_device(cfg)
    assert not dev.status().state_overflow and not dev.status().acc_overflow
    model.cores[2].state_overflow = True
    model.cores[1].acc_overflow = True
    flags = dev.status_fields()["flags"]
    assert flags & StatusFlag.STATE_OVERFLOW and flags & StatusFlag.ACC_OVERFLOW
    model.cores[1].acc["b"][:] = 7
    model.cores[2].acc["W"][:] = -3
    dev.clear_accumulators()
    assert all(not c.acc[k].any() for c in model.cores for k in PARAM_NAMES)
    assert dev.status().state_overflow                   # CLEAR_ACC leaves state_overflow
    model.cores[1].acc_overflow = True
    dev.clear_flags()
    assert not any(c.state_overflow or c.acc_overflow for c in model.cores)
    assert not dev.status().state_overflow and not dev.status().acc_overflow
    model.cores[2].acc_overflow = True
    dev.reset()                                          # RESET: every engine fresh
    assert len(model.cores) == 3 and model.trainer.cores == model.cores
    assert not dev.status().acc_overflow
