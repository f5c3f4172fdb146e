"""The integer golden model: reversibility, flags, accumulator algebra, formats."""

import numpy as np
import pytest

from hel_fpga.spec.formats import ConfigError, FormatError, HelConfig, wrap
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.sim.golden import GoldenCore, StateError, selftest_inputs


def random_config(rng, **over):
    ow = int(rng.choice([16, 18]))
    d = dict(n=int(rng.integers(2, 12)), m=int(rng.integers(2, 12)), k=int(rng.integers(1, 4)),
             t_max=512, operand_width=ow, operand_frac=ow - 3, act_frac=ow - 2, param_frac=ow - 4,
             z_frac=ow - 4,
             state_width=int(rng.integers(30, 40)), dt_log2=int(rng.integers(2, 5)))
    d["o"] = int(rng.integers(1, d["n"] + 1))
    d["state_frac"] = d["state_width"] - 8
    d.update(over)
    return HelConfig(**d)


def random_core(rng, cfg, scale=1.0):
    n, m, k = cfg.n, cfg.m, cfg.k
    params = dict(W=rng.normal(0, scale / np.sqrt(n), (m, n)), B=rng.normal(0, 0.5, (m, k)),
                  b=rng.normal(0, 0.1, m), alpha=rng.uniform(0.5, 1.5, n))
    core = GoldenCore(cfg)
    core.write_params(**cfg.quantize_params(params))
    return core


def random_inputs(rng, cfg, t):
    return cfg.quantize_inputs(rng.normal(0, 0.5, (t, cfg.k)))


@pytest.mark.parametrize("seed", range(6))
def test_unnudged_echo_returns_bit_exactly_for_random_configs(seed):
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    core = random_core(rng, cfg)
    t = int(rng.integers(1, cfg.t_max + 1))
    core.load(random_inputs(rng, cfg, t))
    core.forward()
    core.echo(np.zeros((t, cfg.o), dtype=np.int64))
    for bank in ("pos", "neg"):
        st = core.read_state(bank)
        assert np.array_equal(st.q, np.zeros(cfg.n)) and np.array_equal(st.w, np.zeros(cfg.n))


def test_selftest_returns_bit_exactly_after_10000_steps():
    rng = np.random.default_rng(11)
    core = random_core(rng, HelConfig())
    assert core.selftest(10_000, seed=7)
    assert not core.state_overflow


def test_reversibility_survives_state_wrap_and_raises_overflow_flag():
    """A narrow, unstable state wraps many times; the echo still returns exactly."""
    cfg = HelConfig(n=6, m=5, k=2, o=2, state_width=20, state_frac=14, t_max=4096)
    rng = np.random.default_rng(3)
    core = random_core(rng, cfg, scale=3.0)
    core.write_params(alpha=cfg.param.quantize(np.full(cfg.n, -6.0)))  # unstable: grows
    assert core.selftest(3000, seed=5)
    assert core.state_overflow
    core.clear_flags()
    assert not core.state_overflow


def test_stable_run_does_not_raise_overflow_flag():
    rng = np.random.default_rng(4)
    cfg = HelConfig()
    core = random_core(rng, cfg)
    core.load(random_inputs(rng, cfg, 200))
    core.forward()
    core.echo(np.zeros((200, cfg.o), dtype=np.int64))
    assert not core.state_overflow and not core.acc_overflow


@pytest.mark.parametrize("estimator", ["centred", "one-sided"])
def test_unnudged_contrast_is_exactly_zero(estimator):
    """The un-nudged echo revisits the forward half-step positions bit for bit."""
    rng = np.random.default_rng(5)
    cfg = HelConfig(n=10, m=7, k=3, o=2)
    core = random_core(rng, cfg)
    core.load(random_inputs(rng, cfg, 150))
    core.forward(estimator)
    core.echo(np.zeros((150, cfg.o), dtype=np.int64))
    acc = core.read_accumulators()
    assert all(not acc[p].any() for p in PARAM_NAMES)
    if estimator == "one-sided":
        # ...and the forward pass did put −G(0) in, so the echo cancelled it.
        core.load(random_inputs(rng, cfg, 150))
        core.forward(estimator)
        assert any(core.read_accumulators()[p].any() for p in PARAM_NAMES)


def test_centred_contrast_is_antisymmetric_in_the_nudge():
    rng = np.random.default_rng(6)
    cfg = HelConfig(n=8, m=9, k=2, o=3)
    core = random_core(rng, cfg)
    t = 80
    core.load(random_inputs(rng, cfg, t))
    nu = rng.integers(-(1 << 18), 1 << 18, (t, cfg.o))
    core.forward()
    core.echo(nu)
    plus = core.read_accumulators()
    core.clear_accumulators()
    core.forward()
    core.echo(-nu)
    minus = core.read_accumulators()
    for p in PARAM_NAMES:
        assert np.array_equal(plus[p], -minus[p])
        assert plus[p].any()


def test_accumulators_sum_over_samples_until_cleared():
    rng = np.random.default_rng(8)
    cfg = HelConfig(n=6, m=6, k=2, o=1)
    core = random_core(rng, cfg)
    seqs = [random_inputs(rng, cfg, t) for t in (30, 45)]
    nudges = [rng.integers(-(1 << 16), 1 << 16, (len(s), 1)) for s in seqs]
    single = []
    for s, nu in zip(seqs, nudges):
        core.clear_accumulators()
        core.load(s)
        core.forward()
        core.echo(nu)
        single.append(core.read_accumulators())
    core.clear_accumulators()
    for s, nu in zip(seqs, nudges):
        core.load(s)
        core.forward()
        core.echo(nu)
    both = core.read_accumulators()
    for p in PARAM_NAMES:
        assert np.array_equal(both[p], single[0][p] + single[1][p])


def test_accumulator_wrap_sets_its_flag():
    """Saturated operands: each echo step adds qo² = 2^30 to the α accumulators."""
    cfg = HelConfig(n=2, m=2, k=1, o=1, t_max=16)
    assert cfg.acc_width > 38
    cfg = cfg.replace(acc_width=cfg.acc_min_width)  # 38 bits
    core = GoldenCore(cfg)  # zero parameters: the zero state stays at rest
    core.load(np.zeros((16, 1), dtype=np.int64))
    kick = np.array([[1 << 27]])  # the output oscillator's q runs off the operand range
    core.forward("one-sided")
    core.echo(kick)
    per_sample = int(core.read_accumulators()["alpha"][1])
    assert per_sample > 1 << 32 and not core.acc_overflow
    limit = (1 << (cfg.acc_width - 1)) - 1
    for samples in range(2, 40):
        core.forward("one-sided")
        core.echo(kick)
        assert core.acc_overflow == (samples * per_sample > limit)
    assert core.acc_overflow
    core.clear_accumulators()
    assert not core.acc_overflow


def test_single_kick_echo_equals_full_nudges_with_zeros():
    rng = np.random.default_rng(10)
    cfg = HelConfig(n=5, m=4, k=2, o=2)
    core = random_core(rng, cfg)
    core.load(random_inputs(rng, cfg, 40))
    kick = rng.integers(-(1 << 20), 1 << 20, (1, 2))
    core.forward()
    out1 = core.echo(kick)
    acc1 = core.read_accumulators()
    core.clear_accumulators()
    full = np.zeros((40, 2), dtype=np.int64)
    full[0] = kick[0]
    core.forward()
    out2 = core.echo(full)
    assert np.array_equal(out1, out2)
    for p in PARAM_NAMES:
        assert np.array_equal(acc1[p], core.read_accumulators()[p])


def test_wrong_state_and_bad_values_are_rejected_without_state_change():
    rng = np.random.default_rng(12)
    cfg = HelConfig(n=4, m=3, k=2, o=1, t_max=32)
    core = random_core(rng, cfg)
    with pytest.raises(StateError):
        core.forward()
    core.load(random_inputs(rng, cfg, 10))
    with pytest.raises(StateError):
        core.echo(np.zeros((10, 1), dtype=np.int64))
    before = core.read_params()
    with pytest.raises(FormatError):
        core.write_params(W=np.zeros((3, 4), dtype=np.int64), alpha=np.full(4, 1 << 20))
    assert all(np.array_equal(before[p], core.read_params()[p]) for p in PARAM_NAMES)
    with pytest.raises(FormatError):
        core.load(np.zeros((33, 2), dtype=np.int64))
    with pytest.raises(FormatError):
        core.load(np.zeros((5, 2)))  # floats are not integers
    core.forward()
    with pytest.raises(FormatError):
        core.echo(np.zeros((9, 1), dtype=np.int64))
    core.echo(np.zeros((10, 1), dtype=np.int64))  # still usable after the error


def test_tanh_table_interpolates_tanh_within_the_segment_bound():
    cfg = HelConfig()
    z = np.arange(-(1 << (cfg.z_width - 1)), 1 << (cfg.z_width - 1), dtype=np.int64)
    y = cfg.act.to_float(cfg.tanh_int(z))
    exact = np.tanh(cfg.z.to_float(z))
    h = 2.0 ** (cfg.tanh_range_log2 + 1 - cfg.tanh_segments_log2)
    bound = h * h / 8 * 0.77 + 1.5 / cfg.act.scale  # interpolation + knot/product rounding
    assert np.max(np.abs(y - exact)) < bound
    assert np.all(np.diff(y) >= 0)


def test_selftest_inputs_are_reproducible_and_bounded():
    cfg = HelConfig(k=3)
    a = selftest_inputs(cfg, 500, seed=42)
    assert np.array_equal(a, selftest_inputs(cfg, 500, seed=42))
    assert not np.array_equal(a, selftest_inputs(cfg, 500, seed=43))
    assert np.abs(cfg.operand.to_float(a)).max() <= 0.5
    assert abs(cfg.operand.to_float(a).mean()) < 0.02


def test_wrap_is_twos_complement():
    assert wrap(1 << 35, 36) == -(1 << 35)
    assert wrap(-(1 << 35) - 1, 36) == (1 << 35) - 1
    assert np.array_equal(wrap(np.array([9, -9, 7]), 4), np.array([-7, 7, 7]))


def test_config_round_trips_json_and_rejects_impossible_configs():
    cfg = HelConfig(n=20, m=12, k=3, o=2, operand_width=18, operand_frac=15, act_frac=16, param_frac=14, z_frac=14)
    assert HelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="o = 5 outputs cannot exceed n = 4"):
        HelConfig(n=4, o=5)
    with pytest.raises(ConfigError, match="acc_width"):
        HelConfig(acc_width=20)
    with pytest.raises(ConfigError, match="unknown configuration keys: bogus"):
        HelConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="must be an integer"):
        HelConfig(n=2.5)


def test_quantize_rejects_out_of_range_values_with_the_array_name():
    cfg = HelConfig(n=2, m=2, k=1)
    p = dict(W=np.full((2, 2), 100.0), B=np.zeros((2, 1)), b=np.zeros(2), alpha=np.ones(2))
    with pytest.raises(FormatError, match="parameter W does not fit"):
        cfg.quantize_params(p)
