"""The float references of hel_fpga.sim.reference, checked against independent references:
BPTT against central finite differences of the loss, and every echo-based rule
against BPTT."""

import numpy as np
import pytest

from hel_fpga.sim.reference import (
    ESTIMATORS, PARAM_NAMES, Problem, bptt, cosine, echo, flatten, forward, heb,
    loss_and_output_grads, rel_err, rhel, unflatten,
)


def _problem(seed=0, n=6, m=5, k=2, o=2, t=40, final_step_only=False):
    return Problem.random(np.random.default_rng(seed), n, m, k, o, t, final_step_only=final_step_only)


def _loss(problem, theta):
    p = problem.with_params(unflatten(theta, problem.params))
    traj = forward(p.params, p.u, p.dt)
    return loss_and_output_grads(p, traj.q)[0]


@pytest.mark.parametrize("final_step_only", [False, True])
def test_bptt_matches_central_finite_differences(final_step_only):
    problem = _problem(seed=1, n=4, m=3, k=2, o=2, t=15, final_step_only=final_step_only)
    loss, grads = bptt(problem)
    theta = flatten(problem.params)
    assert loss == pytest.approx(_loss(problem, theta), rel=1e-14)
    h = 1e-6
    fd = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        fd[i] = (_loss(problem, theta + e) - _loss(problem, theta - e)) / (2 * h)
    assert rel_err(grads, fd) < 1e-6
    fd_dict = unflatten(fd, problem.params)
    for k in PARAM_NAMES:
        assert rel_err(grads[k], fd_dict[k]) < 1e-6, k


def test_unnudged_echo_returns_to_initial_state():
    problem = _problem(seed=2, t=300)
    rng = np.random.default_rng(3)
    q0, p0 = rng.normal(0, 0.5, problem.n), rng.normal(0, 0.5, problem.n)
    fwd = forward(problem.params, problem.u, problem.dt, q0=q0, p0=p0)
    _, back = echo(problem.params, problem.u, fwd.q[-1], fwd.p[-1],
                   np.zeros((problem.t, problem.o)), problem.dt)
    np.testing.assert_allclose(back.q[-1], q0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(back.p[-1], -p0, rtol=0, atol=1e-12)
    # the echo revisits the forward half-step positions in reverse order
    np.testing.assert_allclose(back.qh, fwd.qh[::-1], rtol=0, atol=1e-12)


def _slope(estimator, eps_values, problem):
    _, ref = bptt(problem)
    errs = [rel_err(rhel(problem, e, estimator), ref) for e in eps_values]
    return np.polyfit(np.log(eps_values), np.log(errs), 1)[0]


def test_centred_rhel_bias_is_second_order_in_eps():
    eps = np.logspace(-1, -3, 5)
    assert _slope("centred", eps, _problem(seed=4)) > 1.7


def test_one_sided_rhel_bias_is_first_order_in_eps():
    eps = np.logspace(-1, -3, 5)
    assert 0.8 < _slope("one-sided", eps, _problem(seed=4)) < 1.3


@pytest.mark.parametrize("final_step_only", [False, True], ids=["all-steps", "final-step"])
@pytest.mark.parametrize("estimator,eps", [("centred", 1e-4), ("one-sided", 1e-6)])
def test_rhel_matches_bptt_for_every_parameter(estimator, eps, final_step_only):
    problem = _problem(seed=5, t=60, final_step_only=final_step_only)
    _, ref = bptt(problem)
    est = rhel(problem, eps, estimator)
    for k in PARAM_NAMES:
        assert cosine(est[k], ref[k]) >= 0.999999, k
    assert rel_err(est, ref) < 1e-4


def test_nudge_sign_matches_bptt_not_its_negation():
    problem = _problem(seed=6)
    _, ref = bptt(problem)
    assert cosine(rhel(problem, 1e-3), ref) > 0.999999


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_heb_is_centred_rhel_for_a_final_step_loss_and_converges_to_bptt(estimator):
    problem = _problem(seed=7, t=60, final_step_only=True)
    _, ref = bptt(problem)
    for eps in (1e-2, 1e-4):
        h, r = heb(problem, eps, estimator), rhel(problem, eps, estimator)
        assert rel_err(h, r) < 1e-12
    errs = [rel_err(heb(problem, e, estimator), ref) for e in (1e-2, 1e-3)]
    assert errs[1] < errs[0] / (50 if estimator == "centred" else 5)
    assert cosine(heb(problem, 1e-4), ref) >= 0.999999


def test_heb_rejects_a_loss_on_more_than_the_final_step():
    with pytest.raises(ValueError):
        heb(_problem(seed=8, t=10), 1e-3)
