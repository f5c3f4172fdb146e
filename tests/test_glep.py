"""GLEP variants of hel_fpga.sim.glep, each checked against the exact gradient of its own
model (BPTT, or implicit differentiation that is itself checked against finite
differences), and the claims of ``hel glep``'s table."""

import json

import numpy as np
import pytest

from hel_fpga.sim import glep
from hel_fpga.sim.reference import (
    Problem, bptt, cosine, echo, flatten, force_param_vjp, forward, heb,
    loss_and_output_grads, rel_err, rhel, unflatten,
)

EXACT = ("civp_residual", "fixed_endpoints", "periodic", "hel_centred", "hel_one_sided", "heb")
IDS = ("civp_contrast",) + EXACT
KEYS = {"variant", "boundary_conditions", "forward_only", "local", "needs_sensitivities",
        "passes", "memory_bytes", "results"}


def _seq(seed=3, t=24, final_step_only=False, **size):
    size = {**glep.SIZE, **size}
    return Problem.random(np.random.default_rng(seed), t=t, final_step_only=final_step_only, **size)


def _fd(loss_of_problem, problem, h=1e-6):
    theta = flatten(problem.params)
    out = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        lp = loss_of_problem(problem.with_params(unflatten(theta + e, problem.params)))
        lm = loss_of_problem(problem.with_params(unflatten(theta - e, problem.params)))
        out[i] = (lp - lm) / (2 * h)
    return out


def _errors(estimate, problem, ref, eps=(1e-2, 1e-3)):
    return [rel_err(estimate(problem, e), ref) for e in eps]


def test_force_parameter_jacobian_matches_the_vjp():
    pr = _seq()
    rng = np.random.default_rng(0)
    q, u, v = rng.normal(size=pr.n), rng.normal(size=pr.k), rng.normal(size=pr.n)
    np.testing.assert_allclose(v @ glep.force_param_jacobian(pr.params, q, u),
                               flatten(force_param_vjp(pr.params, q, u, v)), rtol=0, atol=1e-14)


# ------------------------------------------------------------------ constant initial value


def test_civp_contrast_plus_residual_converges_to_bptt():
    pr = _seq()
    _, ref = bptt(pr)
    e1, e2 = _errors(lambda p, e: glep.civp(p, e, residual=True), pr, ref)
    assert e2 < e1 / 50
    assert cosine(glep.civp(pr, 1e-3, residual=True), ref) >= 0.9999


def test_civp_contrast_without_residual_stays_biased_as_eps_shrinks():
    pr = _seq()
    _, ref = bptt(pr)
    errs = _errors(lambda p, e: glep.civp(p, e), pr, ref, eps=(1e-2, 1e-3, 1e-4))
    assert min(errs) > 0.1
    assert errs[-1] > 0.9 * errs[0]


# ------------------------------------------------------------------ fixed endpoints


def test_fixed_endpoint_solution_is_a_leapfrog_trajectory_between_the_ends():
    pr = _seq()
    X = glep.solve_fixed_endpoints(pr)
    dt = pr.dt
    # x_{−1} = 0 and x_0 give (q_0, p_0); the leapfrog must then land on x_T = 0.
    q0, p0 = 0.5 * X[0], X[0] / dt
    traj = forward(pr.params, pr.u, dt, q0=q0, p0=p0)
    np.testing.assert_allclose(traj.qh, X, rtol=0, atol=1e-10)
    np.testing.assert_allclose(traj.q[-1] + 0.5 * dt * traj.p[-1], 0.0, rtol=0, atol=1e-10)


def test_fixed_endpoint_implicit_gradient_matches_finite_differences():
    pr = _seq(seed=4, t=12, n=4, m=3, o=2)
    _, grad = glep.fixed_endpoints_gradient(pr)
    fd = _fd(lambda p: glep.fixed_endpoints_loss(p, glep.solve_fixed_endpoints(p))[0], pr)
    assert rel_err(grad, fd) < 1e-6


def test_fixed_endpoint_contrast_converges_to_its_exact_gradient():
    pr = _seq()
    _, ref = glep.fixed_endpoints_gradient(pr)
    e1, e2 = _errors(glep.fixed_endpoints_ep, pr, ref)
    assert e2 < e1 / 50
    assert cosine(glep.fixed_endpoints_ep(pr, 1e-3), ref) >= 0.9999


# ------------------------------------------------------------------ periodic


def test_periodic_solution_is_a_periodic_orbit_of_the_leapfrog():
    pr = glep.periodic_problem(np.random.default_rng(5), t=24, **glep.SIZE)
    X = glep.solve_periodic(pr)
    dt = pr.dt
    q0, p0 = 0.5 * (X[-1] + X[0]), (X[0] - X[-1]) / dt
    traj = forward(pr.params, pr.u, dt, q0=q0, p0=p0)
    np.testing.assert_allclose(traj.q[-1], q0, rtol=0, atol=1e-10)
    np.testing.assert_allclose(traj.p[-1], p0, rtol=0, atol=1e-10)


def test_periodic_implicit_gradient_matches_finite_differences():
    pr = glep.periodic_problem(np.random.default_rng(6), n=4, m=3, k=2, o=2, t=12)
    _, grad = glep.periodic_gradient(pr)
    fd = _fd(lambda p: glep.periodic_loss(p, glep.solve_periodic(p))[0], pr)
    assert rel_err(grad, fd) < 1e-6


def test_periodic_contrast_converges_to_its_exact_gradient():
    pr = glep.periodic_problem(np.random.default_rng(5), t=24, **glep.SIZE)
    _, ref = glep.periodic_gradient(pr)
    e1, e2 = _errors(glep.periodic_ep, pr, ref)
    assert e2 < e1 / 50
    assert cosine(glep.periodic_ep(pr, 1e-3), ref) >= 0.9999


# ------------------------------------------------------------------ pinned final state = HEL


@pytest.mark.parametrize("beta", [1e-2, -1e-3, 0.3])
def test_pinned_final_state_solution_equals_the_momentum_flipped_echo(beta):
    pr = _seq(t=32)
    nodes = glep.solve_pinned_final_state(pr, beta)
    traj = forward(pr.params, pr.u, pr.dt)
    _, g = loss_and_output_grads(pr, traj.q)
    _, et = echo(pr.params, pr.u, traj.q[-1], traj.p[-1], beta * g[::-1], pr.dt)
    np.testing.assert_allclose(nodes[1:], et.qh[::-1], rtol=0, atol=1e-13)
    np.testing.assert_allclose(nodes[0], et.q[-1] + 0.5 * pr.dt * et.p[-1], rtol=0, atol=1e-13)


def test_pinned_final_state_contrast_is_centred_rhel_and_converges_to_bptt():
    pr = _seq(t=32)
    _, ref = bptt(pr)
    for e in (1e-2, 1e-3):
        assert rel_err(glep.pinned_final_state_ep(pr, e), rhel(pr, e, "centred")) < 1e-10
    e1, e2 = _errors(glep.pinned_final_state_ep, pr, ref)
    assert e2 < e1 / 50


@pytest.mark.parametrize("estimator", ["centred", "one-sided"])
def test_streaming_hel_equals_reference_rhel_and_heb(estimator):
    # same arithmetic up to summation order (one-sided: float rounding of G(0) / ε)
    pr = _seq(t=32)
    assert rel_err(glep.hel_streaming(pr, 1e-3, estimator), rhel(pr, 1e-3, estimator)) < 1e-10
    pf = _seq(t=32, final_step_only=True)
    assert rel_err(glep.hel_streaming(pf, 1e-3, estimator, final_kick_only=True),
                   heb(pf, 1e-3, estimator)) < 1e-10


# ------------------------------------------------------------------ the table's claims


@pytest.fixture(scope="module")
def rows():
    return glep.glep_table()


def test_table_has_the_issue_keys_and_variant_ids(rows):
    assert [r["variant"] for r in rows] == list(IDS)
    for r in rows:
        assert set(r) == KEYS
        assert len(r["memory_bytes"]) == 2
        assert all(set(x) == {"eps", "cos", "rel_err"} for x in r["results"])


@pytest.mark.parametrize("variant", EXACT)
def test_table_exact_variants_converge_to_their_reference(rows, variant):
    r = next(r for r in rows if r["variant"] == variant)
    res = sorted(r["results"], key=lambda x: -x["eps"])
    assert res[-1]["cos"] >= 0.9999
    order = 1 if variant == "hel_one_sided" else 2
    ratio = res[0]["eps"] / res[-1]["eps"]
    assert res[-1]["rel_err"] < res[0]["rel_err"] / (0.5 * ratio ** order)


def test_table_contrast_without_residual_does_not_converge(rows):
    r = next(r for r in rows if r["variant"] == "civp_contrast")
    errs = [x["rel_err"] for x in r["results"]]
    assert min(errs) > 0.1 and errs[-1] > 0.9 * errs[0]


def test_table_memory_grows_with_t_only_for_boundary_value_variants(rows):
    for r in rows:
        (t1, m1), (t2, m2) = sorted(r["memory_bytes"].items())
        if r["forward_only"]:
            # at most the host's list of ±ε nudges (T×O float64 each) grows
            assert m2 - m1 <= 2 * 8 * glep.SIZE["o"] * (t2 - t1) + 1024, r["variant"]
        else:
            assert m2 > 0.6 * (t2 / t1) * m1, r["variant"]


def test_hel_glep_json_prints_the_rows(capsys):
    from hel_fpga.host.cli import main
    assert main(["glep", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in out] == list(IDS)
    assert all(set(r) == KEYS for r in out)
