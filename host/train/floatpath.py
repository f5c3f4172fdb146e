"""Float64 training path: batched forward, BPTT and RHEL with any output gradient.

:func:`hel_fpga.sim.reference.bptt` and :func:`hel_fpga.sim.reference.rhel` take a
:class:`hel_fpga.sim.reference.Problem`, whose loss is a masked MSE. Training also needs
cross-entropy, so this module splits the two steps — forward, then a backward
pass (adjoint or echoes) driven by an arbitrary output gradient ``g`` — and runs
a whole mini-batch at once (the rows of every array are samples), which is what
makes the float baselines fast enough to compare against.

The arithmetic is exactly that of :mod:`hel_fpga.sim.reference` (drift–kick–drift with
the kick at the half-step position, the same adjoint recursion and the same
echo convention); ``tests/test_train.py`` checks every function here against
``reference.bptt`` / ``reference.rhel`` sample by sample.

Shapes: ``u`` (S, T, K), outputs and output gradients (S, T, O), states (S, N).
Gradients are *summed* over the samples of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hel_fpga.spec.names import PARAM_NAMES

__all__ = ["BatchTrajectory", "forward", "bptt_grads", "rhel_grads", "outputs"]

Params = dict[str, np.ndarray]


@dataclass
class BatchTrajectory:
    """A batched forward run: half-step positions ``qh`` (T, S, N), activations
    ``a = tanh z`` at them (T, S, M), positions after each step ``q`` (T, S, N),
    and the final state ``(q_T, p_T)`` (S, N) each."""

    qh: np.ndarray
    a: np.ndarray
    q: np.ndarray
    q_T: np.ndarray
    p_T: np.ndarray

    def outputs(self, o: int) -> np.ndarray:
        """``ŷ`` (S, T, O): the last ``o`` positions after every step."""
        return np.transpose(self.q[:, :, self.q.shape[2] - o:], (1, 0, 2))


def _step(params: Params, q, p, u, dt):
    qh = q + 0.5 * dt * p
    a = np.tanh(qh @ params["W"].T + u @ params["B"].T + params["b"])
    p1 = p - dt * (params["alpha"] * qh + a @ params["W"])
    return qh + 0.5 * dt * p1, p1, qh, a


def forward(params: Params, u: np.ndarray, dt: float) -> BatchTrajectory:
    """Leapfrog from the zero state over every sample of ``u`` (S, T, K)."""
    s, t_len, _ = u.shape
    n, m = params["W"].shape[1], params["W"].shape[0]
    q = np.zeros((s, n))
    p = np.zeros((s, n))
    qh_rec = np.empty((t_len, s, n))
    a_rec = np.empty((t_len, s, m))
    q_rec = np.empty((t_len, s, n))
    for t in range(t_len):
        q, p, qh_rec[t], a_rec[t] = _step(params, q, p, u[:, t], dt)
        q_rec[t] = q
    return BatchTrajectory(qh=qh_rec, a=a_rec, q=q_rec, q_T=q, p_T=p)


def outputs(params: Params, u: np.ndarray, dt: float, o: int) -> np.ndarray:
    """Forward only: ``ŷ`` (S, T, O)."""
    return forward(params, u, dt).outputs(o)


def bptt_grads(params: Params, u: np.ndarray, dt: float, traj: BatchTrajectory,
               g: np.ndarray) -> Params:
    """Exact gradient of ``Σ_samples L`` given ``g = ∂L/∂ŷ`` (S, T, O).

    The adjoint recursion of :func:`hel_fpga.sim.reference.bptt`, batched.
    """
    W, alpha = params["W"], params["alpha"]
    s, t_len, o = g.shape
    n = W.shape[1]
    aq = np.zeros((s, n))
    ap = np.zeros((s, n))
    grads = {k: np.zeros_like(params[k], dtype=float) for k in PARAM_NAMES}
    for t in range(t_len - 1, -1, -1):
        aq[:, n - o:] += g[:, t]
        ap1 = ap + 0.5 * dt * aq
        qh, a, ut = traj.qh[t], traj.a[t], u[:, t]
        r = (1.0 - a * a) * (ap1 @ W.T)                       # sech² z ⊙ (W v)
        aqh = aq - dt * (alpha * ap1 + r @ W)                  # J_f symmetric
        grads["W"] -= dt * (a.T @ ap1 + r.T @ qh)
        grads["B"] -= dt * (r.T @ ut)
        grads["b"] -= dt * r.sum(0)
        grads["alpha"] -= dt * np.sum(ap1 * qh, 0)
        aq = aqh
        ap = ap1 + 0.5 * dt * aqh
    return grads


def _echo_G(params: Params, u: np.ndarray, q_T, p_T, nudges, dt) -> Params:
    """Σ_s ∂θV along the echoes of every sample (nudges (S, T, O), echo order)."""
    s_count, t_len, o = nudges.shape
    n = q_T.shape[1]
    q = q_T.copy()
    p = -p_T
    G = {k: np.zeros_like(params[k], dtype=float) for k in PARAM_NAMES}
    for s in range(t_len):
        p[:, n - o:] += nudges[:, s]
        us = u[:, t_len - 1 - s]
        q, p, qh, a = _step(params, q, p, us, dt)
        G["W"] += a.T @ qh
        G["B"] += a.T @ us
        G["b"] += a.sum(0)
        G["alpha"] += 0.5 * np.sum(qh * qh, 0)
    return G


def rhel_grads(params: Params, u: np.ndarray, dt: float, traj: BatchTrajectory,
               g: np.ndarray, eps: float, estimator: str = "centred") -> Params:
    """Float RHEL (docs/design.md §1.4) given ``g = ∂L/∂ŷ`` (S, T, O), summed over samples.

    Centred: a +ε and a −ε echo of every sample,
    ``∇ ≈ −δ (G(+ε) − G(−ε)) / 2ε``. One-sided: ``G(0)`` from the forward
    pass's half-step positions, ``∇ ≈ −δ (G(+ε) − G(0)) / ε``.
    """
    nudges = eps * g[:, ::-1]
    if estimator == "centred":
        Gp = _echo_G(params, u, traj.q_T, traj.p_T, nudges, dt)
        Gm = _echo_G(params, u, traj.q_T, traj.p_T, -nudges, dt)
        return {k: -dt * (Gp[k] - Gm[k]) / (2 * eps) for k in PARAM_NAMES}
    if estimator != "one-sided":
        raise ValueError(f"unknown estimator {estimator!r}")
    Gp = _echo_G(params, u, traj.q_T, traj.p_T, nudges, dt)
    qh = traj.qh.reshape(-1, traj.qh.shape[2])
    a = traj.a.reshape(-1, traj.a.shape[2])
    uf = np.transpose(u, (1, 0, 2)).reshape(-1, u.shape[2])
    G0 = {"W": a.T @ qh, "B": a.T @ uf, "b": a.sum(0), "alpha": 0.5 * np.sum(qh * qh, 0)}
    return {k: -dt * (Gp[k] - G0[k]) / eps for k in PARAM_NAMES}
