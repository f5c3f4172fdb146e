"""The golden model of on-chip training (sim/onchip.py) against independent references:
the host-driven path (HelConfig.nudges, hel_sample, read_batch), float versions of
the optimiser updates, and plain definitions of the metrics and the epoch order."""

import numpy as np
import pytest

from hel_fpga.host.device import GoldenDevice
from hel_fpga.host.learning import hel_sample, masked_mse, read_batch
from hel_fpga.sim.onchip import (
    OnChipTrainer, SampleStore, clamp_master, gradient_from_acc, lion_step, master_from_float,
    requantize, sample_nudges, sgdm_step, shift_saturate)
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.training import (
    TrainConfig, TrainFormats, TrainingError, epoch_order, lr_shift_at)

CFG = HelConfig(n=6, m=5, k=2, o=2, t_max=16)
FM = TrainFormats(CFG)


def float_params(rng, cfg=CFG):
    return {"W": rng.normal(0, 1 / np.sqrt(cfg.n), (cfg.m, cfg.n)),
            "B": rng.normal(0, 0.5, (cfg.m, cfg.k)), "b": rng.normal(0, 0.1, cfg.m),
            "alpha": rng.uniform(0.5, 1.5, cfg.n)}


def regression_store(rng, s=8, t=12, cfg=CFG):
    u = cfg.operand.quantize(rng.normal(0, 0.5, (s, t, cfg.k)))
    y = TrainFormats(cfg).target.quantize(rng.normal(0, 0.3, (s, t, cfg.o)))
    mask = rng.random((s, t)) < 0.6
    mask[:, -1] = True
    return SampleStore.regression(cfg, u, y, mask)


def classification_store(rng, s=8, t=10, cfg=CFG):
    u = cfg.operand.quantize(rng.uniform(0, 1, (s, t, cfg.k)))
    return SampleStore.classification(cfg, u, rng.integers(0, cfg.o, s))


def trainer(rng, store, **tc):
    tc = TrainConfig(loss=store.kind, **tc)
    return OnChipTrainer(CFG, tc, store, master_from_float(float_params(rng), FM))


# --------------------------------------------------------------------------- nudges

def test_nudges_equal_host_nudges_except_that_exact_ties_round_up():
    """ν = rshift_round(ŷ − y, dt+1+eps_log2) is HelConfig.nudges((ŷ − y)·mask, 2^−eps_log2)
    whenever y is exactly a target-format value: the same number, rounded half up
    on chip and half to even on the host, so they differ only on exact ties (by +1)."""
    rng = np.random.default_rng(1)
    t, eps_log2 = 64, 5
    sn = FM.nudge_shift(eps_log2)
    y = FM.target.quantize(rng.normal(0, 0.3, (t, CFG.o)))
    d = rng.integers(-(1 << 26), 1 << 26, (t, CFG.o))
    d[:8] = (rng.integers(-200, 200, (8, CFG.o)) << sn) + (1 << (sn - 1))   # exact ties
    out = (y << FM.target_shift) + d
    mask = rng.random(t) < 0.7
    nu, _ = sample_nudges(CFG, out, y, mask, eps_log2)
    g = masked_mse(FM.target.to_float(y), mask)(CFG.outputs_to_float(out))[1]
    host = CFG.nudges(g, 2.0 ** -eps_log2)
    tie = (mask[:, None] & ((d & ((1 << sn) - 1)) == (1 << (sn - 1))))[::-1]
    assert tie.sum() >= 8
    assert np.array_equal(nu[~tie], host[~tie])
    exact = (d[::-1] / 2.0 ** sn)[tie]
    assert np.array_equal(nu[tie], np.ceil(exact).astype(np.int64))
    assert np.all(nu[~mask[::-1]] == 0)


# --------------------------------------------------------------------------- host path

@pytest.mark.parametrize("kind", ["mse", "onehot"])
def test_one_batch_accumulators_equal_the_host_driven_path_bit_for_bit(kind):
    """B on-chip samples leave the same accumulators as hel_sample on a GoldenDevice fed
    the same nudges; for one-hot the host sends one kick row, the chip T rows."""
    rng = np.random.default_rng(2)
    store = regression_store(rng) if kind == "mse" else classification_store(rng)
    eps_log2 = 5 if kind == "mse" else 2
    tr = trainer(rng, store, eps_log2=eps_log2, batch_log2=2)
    dev = GoldenDevice(CFG)
    dev.write_params(tr.params())
    sn = FM.nudge_shift(eps_log2)
    for i in (3, 0, 5, 6):
        out, nu, _, _ = tr.forward_sample(store, i)
        tr.core.echo(nu)

        def loss_fn(y_hat, nu=nu):
            return 0.0, nu[::-1] * 2.0 ** (sn - CFG.state_frac)
        s = hel_sample(dev, store.inputs[i], loss_fn, 2.0 ** -eps_log2)
        assert np.array_equal(s.outputs, out)
        assert np.array_equal(s.nudges, nu[:len(s.nudges)]) and not nu[len(s.nudges):].any()
        if kind == "onehot":
            assert len(s.nudges) == 1
    host_acc = dev.read_accumulators()
    for k in PARAM_NAMES:
        assert np.array_equal(tr.core.acc[k], host_acc[k]), k
    assert any(host_acc[k].any() for k in PARAM_NAMES)


def test_gradient_shift_equals_read_batch_scaling_within_half_an_lsb():
    """rshift_round(−acc, s_p) is read_batch's −δ·acc·scale/(2ε), divided by B, in master
    units, rounded: within ½ LSB for every parameter array."""
    rng = np.random.default_rng(3)
    store = regression_store(rng)
    tc = dict(eps_log2=5, batch_log2=3)
    tr = trainer(rng, store, **tc)
    dev = GoldenDevice(CFG)
    dev.write_params(tr.params())
    for i in range(store.count):
        _, nu, _, _ = tr.forward_sample(store, i)
        tr.core.echo(nu)
        dev.load(store.inputs[i])
        dev.forward("centred")
        dev.echo(nu)
    g = gradient_from_acc(tr.core.read_accumulators(), FM, tr.tc)
    ref = read_batch(dev, 2.0 ** -5).gradients
    for k in PARAM_NAMES:
        want = ref[k] / 8 * FM.master.scale
        assert np.max(np.abs(g[k] - want)) <= 0.5 + 1e-6 * np.max(np.abs(want)), k
        assert np.abs(want).max() > 100, k     # the comparison is not vacuous


def test_shift_saturate_saturates_left_shifts_as_if_exact():
    x = np.array([-(1 << 40), -5, -1, 0, 1, 5, 1 << 40, (1 << 12) - 1, 1 << 12])
    assert np.array_equal(shift_saturate(x, -4, 17),
                          np.clip(x.astype(object) * 16, -(1 << 16), (1 << 16) - 1).astype(np.int64))
    assert np.array_equal(shift_saturate(x, 3, 40),
                          np.clip((x + 4) >> 3, -(1 << 39), (1 << 39) - 1))


# --------------------------------------------------------------------------- optimisers

@pytest.mark.parametrize("lr_shift", [-3, 0, 4, 9])
def test_sgdm_step_matches_its_float_update_within_the_rounding_bound(lr_shift):
    """m = βm + (1−β)g, θ −= lr·m in float vs integers: m within ½ LSB, θ within ½ + lr/2."""
    rng = np.random.default_rng(4 + lr_shift)
    shape, beta_log2 = (4000,), 3
    lim = FM.master.max_int // 4
    th = rng.integers(-lim, lim, shape)
    m = rng.integers(-(1 << 24), 1 << 24, shape)
    g = rng.integers(-(1 << 24), 1 << 24, shape)
    th2, m2 = sgdm_step(th, m, g, lr_shift, beta_log2, FM)
    beta, lr = 1 - 2.0 ** -beta_log2, 2.0 ** -lr_shift
    mf = beta * m + (1 - beta) * g
    thf = th - lr * mf
    assert np.max(np.abs(m2 - mf)) <= 0.5
    assert np.max(np.abs(th2 - thf)) <= 0.5 + lr * 0.5


def test_lion_step_moves_by_exactly_lr_against_the_sign_of_the_float_interpolation():
    rng = np.random.default_rng(5)
    shape, lr_shift, b1, b2 = (4000,), 8, 3, 7
    lim = FM.master.max_int // 4
    th = rng.integers(-lim, lim, shape)
    m = rng.integers(-(1 << 12), 1 << 12, shape)
    g = rng.integers(-(1 << 12), 1 << 12, shape)
    g[:50] = m[:50]                                   # c = m exactly, including zeros
    m[:10] = g[:10] = 0
    th2, m2 = lion_step(th, m, g, lr_shift, b1, b2, FM)
    lr = 1 << (FM.master.frac - lr_shift)
    cf = (1 - 2.0 ** -b1) * m + 2.0 ** -b1 * g
    clear = np.abs(cf) > 0.5                          # beyond the interpolation's rounding
    assert np.array_equal((th - th2)[clear], lr * np.sign(cf[clear]).astype(np.int64))
    assert np.all(np.isin(th - th2, (-lr, 0, lr)))
    assert np.all(th2[:10] == th[:10])                # c = 0: no step
    mf = (1 - 2.0 ** -b2) * m + 2.0 ** -b2 * g
    assert np.max(np.abs(m2 - mf)) <= 0.5


def test_requantize_and_master_updates_saturate_instead_of_wrapping():
    mx, mn = FM.master.max_int, FM.master.min_int
    pmax, pmin = CFG.param.max_int, CFG.param.min_int
    th = np.array([mx - 3, mn + 3])
    m = np.zeros(2, dtype=np.int64)
    up = np.array([-(1 << 30), 1 << 30])              # pushes θ outwards at both ends
    for _ in range(3):
        th, m = lion_step(th, m, up, 0, 3, 7, FM)
    assert np.array_equal(th, [mx, mn])
    th2, _ = sgdm_step(np.array([mx, mn]), np.array([-(1 << 40), 1 << 40]), up, -8, 3, FM)
    assert np.array_equal(th2, [mx, mn])
    assert np.array_equal(requantize(np.array([mx, mn, 0, (1 << 15) - 1, 1 << 15]), FM),
                          [pmax, pmin, 0, 0, 1])
    # beyond the master range (e.g. a foreign checkpoint): saturate, never wrap
    big = np.array([mx * 3, mn * 3, 1 << 45, -(1 << 45)])
    assert np.array_equal(requantize(big, FM), [pmax, pmin, pmax, pmin])
    assert np.array_equal(clamp_master(big, FM), [mx, mn, mx, mn])


# --------------------------------------------------------------------------- schedule, order

def test_halving_schedule_is_the_documented_staircase():
    tc = TrainConfig(lr_log2=8, epochs=10, halvings=3)
    assert [lr_shift_at(tc, e) for e in range(10)] == [8] * 5 + [9] * 3 + [10, 11]
    tc20 = TrainConfig(lr_log2=4, epochs=20, halvings=2)
    assert [lr_shift_at(tc20, e) for e in range(20)] == [4] * 10 + [5] * 5 + [6] * 5
    assert {lr_shift_at(TrainConfig(lr_log2=8, schedule="constant"), e) for e in range(10)} == {8}


def test_epoch_order_is_a_fresh_permutation_every_epoch():
    for count in list(range(1, 70)) + [128, 1000, 1437]:
        orders = [epoch_order(count, 7, e) for e in range(3)]
        for o in orders:
            assert sorted(o) == list(range(count))
        if count >= 8:
            assert orders[0] != orders[1] != orders[2]
    assert epoch_order(128, 0, 0) != epoch_order(128, 1, 0)


# --------------------------------------------------------------------------- metrics, passes

def test_loss_sum_and_correct_count_match_float_definitions():
    """Σ e² against the float squared error of the same outputs (each e within half an
    error LSB), and the correct count against argmax of the float outputs."""
    rng = np.random.default_rng(6)
    for store in (regression_store(rng), classification_store(rng)):
        tr = trainer(rng, store, eps_log2=3)
        ev = tr.evaluate(store)
        se, bound, correct = 0.0, 0.0, 0
        lsb = 2.0 ** -FM.error.frac
        for i in range(store.count):
            out = CFG.outputs_to_float(tr.forward_sample(store, i)[0])
            y, mask = store.sample_targets(CFG, i)
            d = (out - FM.target.to_float(y))[mask]
            se += float(np.sum(d * d))
            bound += float(np.sum(np.abs(d) * lsb + lsb * lsb / 4))
            if store.kind == "onehot":
                correct += int(np.argmax(out[-1]) == store.labels[i])
        assert abs(ev.loss_sum * 2.0 ** -FM.loss_frac - se) <= bound
        assert ev.loss_elements == (store.count * CFG.o if store.kind == "onehot"
                                    else int(store.mask.sum()) * CFG.o)
        assert ev.correct == (correct if store.kind == "onehot" else None)


def test_eval_touches_neither_accumulators_nor_parameters():
    rng = np.random.default_rng(7)
    store = regression_store(rng)
    tr = trainer(rng, store)
    before = tr.core.read_params()
    tr.evaluate(store)
    assert all(not a.any() for a in tr.core.read_accumulators().values())
    assert all(np.array_equal(before[k], tr.core.read_params()[k]) for k in PARAM_NAMES)


def test_a_raised_flag_skips_the_update_and_clears_the_flags():
    rng = np.random.default_rng(8)
    store = regression_store(rng)
    tr = trainer(rng, store)
    before = {k: v.copy() for k, v in tr.master.items()}
    tr.train_sample(0)
    tr.core.acc_overflow = True
    assert tr.end_batch(8) is False
    assert all(np.array_equal(before[k], tr.master[k]) for k in PARAM_NAMES)
    assert not tr.core.acc_overflow and not any(a.any() for a in tr.core.acc.values())
    tr.train_sample(0)
    assert tr.end_batch(8) is True
    assert any(not np.array_equal(before[k], tr.master[k]) for k in PARAM_NAMES)


@pytest.mark.parametrize("optimizer,lr_log2", [("lion", 7), ("sgdm", -1)])
def test_same_seed_gives_identical_integers_and_resume_continues_bit_for_bit(optimizer, lr_log2):
    rng = np.random.default_rng(9)
    store = regression_store(rng, s=11)
    init = master_from_float(float_params(rng), FM)
    tc = TrainConfig(optimizer=optimizer, lr_log2=lr_log2, batch_log2=2, epochs=3, seed=5)
    runs = []
    for _ in range(2):
        tr = OnChipTrainer(CFG, tc, store, init)
        runs.append((tr, [m.loss_sum for m, _ in tr.fit()]))
    (a, la), (b, lb) = runs
    assert la == lb
    assert all(np.array_equal(a.state()[k], b.state()[k]) for k in a.state() if k != "epoch")
    resumed = OnChipTrainer(CFG, tc, store, init)
    resumed.train_epoch()
    state = resumed.state()
    fresh = OnChipTrainer(CFG, tc, store, init)
    fresh.load_state(state)
    fresh.fit()
    assert all(np.array_equal(a.state()[k], fresh.state()[k]) for k in a.state())
    other = OnChipTrainer(CFG, TrainConfig(optimizer=optimizer, lr_log2=lr_log2, batch_log2=2,
                                           epochs=3, seed=6), store, init)
    other.fit()
    assert any(not np.array_equal(a.master[k], other.master[k]) for k in PARAM_NAMES)


def test_training_lowers_the_loss_on_a_learnable_problem():
    """A teacher with the core's own architecture: a few epochs of either optimiser
    bring the train loss well below its start."""
    rng = np.random.default_rng(10)
    teacher = OnChipTrainer(CFG, TrainConfig(), regression_store(rng, s=16),
                            master_from_float(float_params(rng), FM))
    u = regression_store(rng, s=16).inputs
    y = np.stack([FM.target.quantize(CFG.outputs_to_float(teacher.forward_sample(
        SampleStore.regression(CFG, u, np.zeros((16, 12, 2), np.int64)), i)[0])) for i in range(16)])
    store = SampleStore.regression(CFG, u, y)
    init = master_from_float(float_params(np.random.default_rng(11)), FM)
    for optimizer, lr_log2 in (("lion", 6), ("sgdm", -2)):
        tr = OnChipTrainer(CFG, TrainConfig(optimizer=optimizer, lr_log2=lr_log2, batch_log2=2,
                                            epochs=6, schedule="constant"), store, init)
        start = tr.evaluate(store).mse
        tr.fit()
        assert tr.evaluate(store).mse < 0.5 * start, optimizer


# --------------------------------------------------------------------------- bad input

def _one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("make,needle", [
    (lambda u, y, lab: SampleStore.regression(CFG, u, y + (1 << 15)), "targets out of range"),
    (lambda u, y, lab: SampleStore.regression(CFG, u, y[:, :3]), "targets have shape"),
    (lambda u, y, lab: SampleStore.regression(CFG, u, np.zeros((4, 6, 3), np.int64)), "targets have shape"),
    (lambda u, y, lab: SampleStore.regression(CFG, u, y, np.ones((4, 3))), "mask has shape"),
    (lambda u, y, lab: SampleStore.regression(CFG, u.astype(float), y), "must be integers"),
    (lambda u, y, lab: SampleStore.regression(CFG, np.zeros((4, 6, 3), np.int64), y), "channels"),
    (lambda u, y, lab: SampleStore.regression(CFG, np.zeros((4, 17, 2), np.int64),
                                              np.zeros((4, 17, 2), np.int64)), "t_max"),
    (lambda u, y, lab: SampleStore.regression(CFG, u[0], y), "shape"),
    (lambda u, y, lab: SampleStore.classification(CFG, u, lab + 2), "labels must be in 0..1"),
    (lambda u, y, lab: SampleStore.classification(CFG, u, lab - 1), "labels must be in"),
    (lambda u, y, lab: SampleStore.classification(CFG, u, lab[:3]), "labels have shape"),
    (lambda u, y, lab: SampleStore.classification(HelConfig(n=6, m=5, k=2, o=1, t_max=16), u, lab * 0),
     "classification needs 2..O = 1 outputs"),
    (lambda u, y, lab: SampleStore.classification(CFG, u, lab, classes=3), "classification needs"),
])
def test_bad_sets_raise_valueerror_with_one_line(make, needle):
    rng = np.random.default_rng(12)
    u = CFG.operand.quantize(rng.normal(0, 0.5, (4, 6, 2)))
    y = FM.target.quantize(rng.normal(0, 0.3, (4, 6, 2)))
    lab = np.array([0, 1, 1, 0])
    with pytest.raises(ValueError) as e:
        make(u, y, lab)
    assert needle in _one_line(e)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(optimizer="adam"), "optimizer"), (dict(loss="ce"), "loss"),
    (dict(schedule="cosine"), "schedule"), (dict(lr_log2=-1), "lr_log2"),
    (dict(batch_log2=13), "batch_log2"), (dict(eps_log2=1.5), "integer"),
])
def test_bad_training_settings_raise_valueerror_with_one_line(kwargs, needle):
    with pytest.raises(ValueError) as e:
        TrainConfig(**kwargs)
    assert needle in _one_line(e)


def test_a_set_for_another_loss_or_core_is_refused():
    rng = np.random.default_rng(13)
    store = regression_store(rng)
    with pytest.raises(TrainingError) as e:
        OnChipTrainer(CFG, TrainConfig(loss="onehot"), store, master_from_float(float_params(rng), FM))
    assert "loss" in _one_line(e)
    tr = trainer(rng, store)
    with pytest.raises(TrainingError) as e:
        tr.evaluate(classification_store(rng))
    _one_line(e)
    with pytest.raises(TrainingError) as e:
        OnChipTrainer(CFG, TrainConfig(lr_log2=24, halvings=8), store, tr.master)
    assert "LSB" in _one_line(e)


def test_default_settings_are_the_measured_picks():
    from hel_fpga.spec.training import DEFAULT_EPS_LOG2, DEFAULT_LR_LOG2, DEFAULT_OPTIMIZER
    tc = TrainConfig()
    assert tc.optimizer == DEFAULT_OPTIMIZER == "lion"
    assert tc.lr_log2 == DEFAULT_LR_LOG2[("lion", "mse")] == DEFAULT_LR_LOG2[("lion", "onehot")]
    assert tc.eps_log2 == DEFAULT_EPS_LOG2["all"]
    assert FM.onehot_on() == 1 << CFG.operand_frac       # a one-hot target of 1.0


# --------------------------------------------------------------------------- data widths, streaming

@pytest.mark.parametrize("kind", ["mse", "onehot"])
def test_narrow_data_on_a_wide_core_trains_as_a_core_of_the_datas_own_size(kind):
    """k < K inputs and o < O outputs. The reference is a core with K = k and O = o
    and the same N, M. Its outputs are the last o oscillators, the wide core's first
    o outputs are oscillators N−O … N−O+o−1: the reference runs with those
    oscillators swapped in (W's columns and α permuted). Every parameter ends equal
    (up to that permutation), except the input weights of the inputs the data lack,
    which see u = 0, get a zero gradient and never move."""
    rng = np.random.default_rng(21)
    wide = HelConfig(n=6, m=5, k=3, o=4, t_max=16)
    narrow = wide.replace(k=2, o=2)
    store = regression_store(rng, cfg=narrow) if kind == "mse" else classification_store(rng, cfg=narrow)
    if kind == "onehot":        # the same samples as a two-class set of the wide core
        wide_store = SampleStore.classification(wide, store.inputs, store.labels, classes=2)
    else:
        wide_store = SampleStore.regression(wide, store.inputs, store.targets, store.mask)
    assert (wide_store.k, wide_store.o) == (2, 2)
    perm = np.arange(wide.n)                        # narrow oscillator i = wide oscillator perm[i]
    perm[[2, 3, 4, 5]] = [4, 5, 2, 3]
    fp = float_params(rng, wide)
    fn = {"W": fp["W"][:, perm], "B": fp["B"][:, :2], "b": fp["b"], "alpha": fp["alpha"][perm]}
    tc = TrainConfig(loss=kind, eps_log2=5 if kind == "mse" else 2, batch_log2=1, epochs=3)
    tw = OnChipTrainer(wide, tc, wide_store, master_from_float(fp, TrainFormats(wide)))
    tn = OnChipTrainer(narrow, tc, store, master_from_float(fn, TrainFormats(narrow)))
    b_extra = tw.master["B"][:, 2].copy()
    w0 = tw.master["W"].copy()
    for rw, rn in zip(tw.fit(wide_store), tn.fit(store)):
        assert rw[0] == rn[0] and rw[1] == rn[1]
    assert np.array_equal(tw.master["W"][:, perm], tn.master["W"])
    assert np.array_equal(tw.master["alpha"][perm], tn.master["alpha"])
    assert np.array_equal(tw.master["b"], tn.master["b"])
    assert np.array_equal(tw.master["B"][:, :2], tn.master["B"])
    assert np.array_equal(tw.master["B"][:, 2], b_extra)
    assert tw.epoch == 3 and not np.array_equal(tw.master["W"], w0)


def _unit(cfg, tc, store, slots, test=None):
    """A device's TrainingUnit with ``store`` (and ``test``) resident, or a ring of ``slots``."""
    from hel_fpga.sim.golden import GoldenCore
    from hel_fpga.sim.onchip import TrainingUnit
    from hel_fpga.spec.training import pack_setup
    unit = TrainingUnit(cfg, GoldenCore(cfg))
    n_test = test.count if test is not None else 0
    if not slots:
        image = np.concatenate([store.image(cfg)] + ([test.image(cfg)] if test is not None else []))
        unit.write_store(0, image)
    unit.write_setup(pack_setup(cfg, tc, store.steps, store.count, n_test, k=store.k, o=store.o,
                                slots=slots))
    assert unit.setup is not None
    master = master_from_float(float_params(np.random.default_rng(3), cfg), TrainFormats(cfg))
    unit.write_master(0, np.concatenate([master[k].ravel() for k in PARAM_NAMES]))
    return unit


@pytest.mark.parametrize("engines", [1, 3])
@pytest.mark.parametrize("slots,chunk", [(1, 7), (2, 50), (5, 1000)])
def test_a_streamed_epoch_in_epoch_order_is_the_resident_epoch(slots, chunk, engines):
    """The ring of ``slots`` records, fed in pieces of ``chunk`` words in
    epoch_order, trains exactly as the resident store; the pass runs until its last
    record, then ends; words beyond the pass are dropped; EVAL streams in index order.
    With C sample engines too (a streamed record runs on the engine its index names)."""
    from hel_fpga.spec.protocol import Pass
    rng = np.random.default_rng(22)
    cfg = CFG.replace(store_words=4096, engines=engines)
    train, test = regression_store(rng, s=9), regression_store(rng, s=4)
    tc = TrainConfig(loss="mse", batch_log2=2, epochs=2, seed=5)
    res, st = _unit(cfg, tc, train, 0, test), _unit(cfg, tc, train, slots, test)
    rec = train.image(cfg).reshape(train.count, -1)
    for epoch in range(2):
        m_res = res.train(epoch)
        assert st.train(epoch) is None and st.running == Pass.TRAIN and st.streaming
        words = np.concatenate([rec[epoch_order(train.count, tc.seed, epoch)].ravel(),
                                np.arange(5)])          # five words too many
        out = [st.write_stream(words[i:i + chunk]) for i in range(0, len(words), chunk)]
        assert [m for m in out if m is not None] == [m_res] and out[-1] == m_res
        assert st.running == Pass.NONE and not st.streaming and st.metrics == res.metrics
        for which in (0, 1):
            assert np.array_equal(st.read_master(which), res.read_master(which))
    # the ring holds the last `slots` records written, at their slots
    last = rec[epoch_order(train.count, tc.seed, 1)][-slots:]
    ring = st.store[:slots * rec.shape[1]].reshape(slots, -1)
    for j, r in zip(range(train.count - slots, train.count), last):
        assert np.array_equal(ring[j % slots], r)
    assert st.evaluate(True) is None
    m_eval = st.write_stream(test.image(cfg))
    assert m_eval == res.evaluate(True) and st.metrics == res.metrics


def test_stream_without_a_streamed_pass_is_refused():
    cfg = CFG.replace(store_words=1024)
    store = regression_store(np.random.default_rng(23), s=3)
    tc = TrainConfig(loss="mse", epochs=1)
    for slots in (0, 2):
        unit = _unit(cfg, tc, store, slots)
        with pytest.raises(TrainingError, match="STREAM needs a streamed pass"):
            unit.write_stream(np.zeros(4, np.int64))
    unit.train(0)
    unit.reset()                                    # RESET forgets the stream
    assert not unit.streaming and unit.running == 0
