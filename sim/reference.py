"""Float64 references of the HEL model and its learning rules (docs/design.md §1).

Everything here is plain NumPy in float64, with hand-written derivatives (no
autograd library), so that it can serve as the independent reference for the
integer golden model, the gateware and the host.

Model
-----
Positions ``q`` and momenta ``p`` (length N), input ``u_t`` (length K),
parameters ``θ = {"W": M×N, "B": M×K, "b": M, "alpha": N}``::

    V(q, u) = ½ Σ α_i q_i² + Σ_j log cosh z_j,     z = W q + B u + b
    f(q, u) = ∂V/∂q = α ⊙ q + Wᵀ tanh z

One leapfrog step (drift δ/2, kick δ at the half-step position, drift δ/2)::

    qh = q + (δ/2) p;   p' = p − δ f(qh, u);   q' = qh + (δ/2) p'

The kick at ``qh`` makes the step a composition of three shears, each exactly
undone by the same shear with the momentum negated: flipping ``p`` and replaying
the inputs backwards retraces the trajectory (the "echo"). Outputs are
``ŷ_t = q_{t+1}[N−O:]``; the loss is ``L = Σ_t mask_t ½‖ŷ_t − y_t‖²``.

Learning rules
--------------
* :func:`bptt` — the exact adjoint of the discrete leapfrog (the reference).
* :func:`rhel` — Recurrent Hamiltonian Echo Learning: centred
  ``∇ ≈ −δ (G(+ε) − G(−ε)) / 2ε`` (bias O(ε²)) or one-sided
  ``∇ ≈ −δ (G(+ε) − G(0)) / ε`` (bias O(ε)), where ``G(ε)`` sums the local
  quantities ``∂θV`` at the half-step positions of the ε-nudged echo.
* :func:`heb` — Hamiltonian Echo Backpropagation: loss at the final step only,
  one kick before the echo.

Sign convention (verified numerically against :func:`bptt`, see
``tests/test_reference.py``): the nudge ``+ε g`` is *added* to the flipped
momenta, and the gradient is ``−δ`` times the ε-derivative of ``G``
(docs/design.md §1.4). Why: leapfrog is symplectic and time-reversible, so a
momentum perturbation ``+ε g`` of the flipped state maps, in forward-time
coordinates, to the state perturbation ``ε J λ`` where ``λ = (g, 0)`` is the BPTT
adjoint; propagated backwards this keeps the relation, so the echo's half-step
positions move by ``ε`` times the adjoint of the momentum after each kick, and
``∂θ ∂θV · δqh`` reproduces the BPTT sum ``−δ Σ_t (∂θ f)ᵀ λ_p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hel_fpga.spec.names import ESTIMATORS, PARAM_NAMES

__all__ = [
    "Problem", "Trajectory",
    "force", "force_jvp", "force_param_vjp", "leapfrog_step", "forward",
    "loss_and_output_grads", "dtheta_V", "sum_dtheta_V",
    "bptt", "echo", "rhel", "heb",
    "zeros_like_params", "flatten", "unflatten", "cosine", "rel_err",
]

#: Parameter arrays by name (:data:`hel_fpga.spec.names.PARAM_NAMES`).
Params = dict[str, np.ndarray]


# --------------------------------------------------------------------------- problem


@dataclass
class Problem:
    """One sequence problem: parameters, input, target, loss mask and step size.

    Attributes
    ----------
    W, B, b, alpha : parameter arrays (M×N, M×K, M, N).
    u : (T, K) input sequence; step ``t`` uses ``u[t]``.
    y : (T, O) targets; ``y[t]`` is compared with ``ŷ_t = q_{t+1}[N−O:]``.
    mask : (T,) bool, the loss steps.
    dt : the leapfrog step δ.

    The forward pass always starts from ``q_0 = p_0 = 0``.
    """

    W: np.ndarray
    B: np.ndarray
    b: np.ndarray
    alpha: np.ndarray
    u: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    dt: float = 1 / 8

    @property
    def params(self) -> Params:
        return {"W": self.W, "B": self.B, "b": self.b, "alpha": self.alpha}

    @property
    def n(self) -> int:
        return self.W.shape[1]

    @property
    def m(self) -> int:
        return self.W.shape[0]

    @property
    def k(self) -> int:
        return self.B.shape[1]

    @property
    def o(self) -> int:
        return self.y.shape[1]

    @property
    def t(self) -> int:
        return self.u.shape[0]

    @property
    def final_step_only(self) -> bool:
        """True when the loss sits at the last step and nowhere else."""
        m = np.asarray(self.mask, bool)
        return bool(m[-1]) and not m[:-1].any()

    def with_params(self, params: Params) -> "Problem":
        """A copy sharing u/y/mask/dt with different parameters."""
        return Problem(W=params["W"], B=params["B"], b=params["b"], alpha=params["alpha"],
                       u=self.u, y=self.y, mask=self.mask, dt=self.dt)

    @classmethod
    def random(cls, rng: np.random.Generator, n: int, m: int, k: int, o: int, t: int,
               dt: float = 1 / 8, final_step_only: bool = False) -> "Problem":
        """Draw a problem: W ~ N(0, 1/N), B ~ N(0, 0.25), b ~ N(0, 0.01),
        α ~ U[0.5, 1.5], u ~ N(0, 0.25), y ~ N(0, 0.09) (variances), loss on
        every step or on the final step only. Draw order: W, B, b, α, u, y."""
        if not 1 <= o <= n:
            raise ValueError(f"need 1 <= o <= n, got o={o}, n={n}")
        W = rng.normal(0.0, 1.0 / np.sqrt(n), (m, n))
        B = rng.normal(0.0, 0.5, (m, k))
        b = rng.normal(0.0, 0.1, m)
        alpha = rng.uniform(0.5, 1.5, n)
        u = rng.normal(0.0, 0.5, (t, k))
        y = rng.normal(0.0, 0.3, (t, o))
        mask = np.zeros(t, bool)
        if final_step_only:
            mask[-1] = True
        else:
            mask[:] = True
        return cls(W=W, B=B, b=b, alpha=alpha, u=u, y=y, mask=mask, dt=float(dt))


@dataclass
class Trajectory:
    """A recorded leapfrog run.

    Attributes
    ----------
    q, p : (T+1, N) positions and momenta; row 0 is the initial state.
    qh : (T, N) half-step positions (where each kick and ``∂θV`` are evaluated).

    For an echo (:func:`echo`) rows are in echo order, momenta are in the
    flipped frame, and ``p[0]`` is ``−p_T`` *before* the first nudge.
    """

    q: np.ndarray
    p: np.ndarray
    qh: np.ndarray

    def outputs(self, o: int) -> np.ndarray:
        """``ŷ_t = q_{t+1}[N−O:]`` for t = 0..T−1, shape (T, O)."""
        return self.q[1:, self.q.shape[1] - o:]


# --------------------------------------------------------------------------- model


def _z(params: Params, q: np.ndarray, u: np.ndarray) -> np.ndarray:
    return params["W"] @ q + params["B"] @ u + params["b"]


def force(params: Params, q: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``f(q, u) = ∂V/∂q = α ⊙ q + Wᵀ tanh(W q + B u + b)``."""
    return params["alpha"] * q + params["W"].T @ np.tanh(_z(params, q, u))


def force_jvp(params: Params, q: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``J_f v`` with the symmetric Jacobian ``J_f = diag(α) + Wᵀ diag(sech² z) W``."""
    s2 = 1.0 - np.tanh(_z(params, q, u)) ** 2
    return params["alpha"] * v + params["W"].T @ (s2 * (params["W"] @ v))


def force_param_vjp(params: Params, q: np.ndarray, u: np.ndarray, v: np.ndarray) -> Params:
    """``∂(vᵀ f)/∂θ``: the parameter vector-Jacobian product of the force.

    With ``a = tanh z`` and ``r = sech² z ⊙ (W v)``:
    ``W: a vᵀ + r qᵀ``, ``B: r uᵀ``, ``b: r``, ``α: v ⊙ q``.
    """
    a = np.tanh(_z(params, q, u))
    r = (1.0 - a * a) * (params["W"] @ v)
    return {"W": np.outer(a, v) + np.outer(r, q), "B": np.outer(r, u), "b": r, "alpha": v * q}


def leapfrog_step(params: Params, q: np.ndarray, p: np.ndarray, u: np.ndarray,
                  dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One drift–kick–drift step; returns ``(q', p', qh)``."""
    qh = q + 0.5 * dt * p
    p1 = p - dt * force(params, qh, u)
    q1 = qh + 0.5 * dt * p1
    return q1, p1, qh


def forward(params: Params, u: np.ndarray, dt: float, q0: np.ndarray | None = None,
            p0: np.ndarray | None = None) -> Trajectory:
    """Run ``T = len(u)`` leapfrog steps from ``(q0, p0)`` (zero by default)."""
    n = params["W"].shape[1]
    t_len = u.shape[0]
    q = np.zeros((t_len + 1, n))
    p = np.zeros((t_len + 1, n))
    qh = np.zeros((t_len, n))
    if q0 is not None:
        q[0] = q0
    if p0 is not None:
        p[0] = p0
    for t in range(t_len):
        q[t + 1], p[t + 1], qh[t] = leapfrog_step(params, q[t], p[t], u[t], dt)
    return Trajectory(q=q, p=p, qh=qh)


def loss_and_output_grads(problem: Problem, q: np.ndarray) -> tuple[float, np.ndarray]:
    """``L = Σ_t mask_t ½‖q_{t+1}[N−O:] − y_t‖²`` and ``g_t = ∂ℓ_t/∂ŷ_t`` (T, O).

    ``q`` is the (T+1, N) position record of :func:`forward`; ``g`` is zero off
    the loss steps.
    """
    o = problem.o
    yhat = q[1:, q.shape[1] - o:]
    mask = np.asarray(problem.mask, bool)[:, None]
    g = np.where(mask, yhat - problem.y, 0.0)
    return 0.5 * float(np.sum(g * g)), g


# --------------------------------------------------------------------------- local terms


def dtheta_V(params: Params, qh: np.ndarray, u: np.ndarray) -> Params:
    """The local learning quantities ``∂θV`` at one position ``qh`` and input ``u``:
    ``∂V/∂W = tanh(z) qhᵀ``, ``∂V/∂B = tanh(z) uᵀ``, ``∂V/∂b = tanh(z)``,
    ``∂V/∂α = ½ qh ⊙ qh``."""
    a = np.tanh(_z(params, qh, u))
    return {"W": np.outer(a, qh), "B": np.outer(a, u), "b": a, "alpha": 0.5 * qh * qh}


def sum_dtheta_V(params: Params, qh: np.ndarray, u: np.ndarray) -> Params:
    """``Σ_s ∂θV(qh_s, u_s)`` over rows of ``qh`` (S, N) and ``u`` (S, K)."""
    a = np.tanh(qh @ params["W"].T + u @ params["B"].T + params["b"])
    return {"W": a.T @ qh, "B": a.T @ u, "b": a.sum(0), "alpha": 0.5 * np.sum(qh * qh, 0)}


def zeros_like_params(params: Params) -> Params:
    return {k: np.zeros_like(params[k], dtype=float) for k in PARAM_NAMES}


def _axpy(acc: Params, a: float, x: Params) -> None:
    for k in PARAM_NAMES:
        acc[k] += a * x[k]


# --------------------------------------------------------------------------- BPTT


def bptt(problem: Problem) -> tuple[float, Params]:
    """Loss and exact gradient by the hand-written adjoint of the leapfrog.

    Backwards through ``qh = q + δ/2 p``, ``p' = p − δ f(qh)``, ``q' = qh + δ/2 p'``
    with adjoints ``(a_q, a_p)`` of ``(q_{t+1}, p_{t+1})``::

        ā_p' = a_p + δ/2 a_q                    (adjoint of p' incl. the last drift)
        a_qh = a_q − δ J_f(qh) ā_p'             (J_f symmetric)
        ∇θ  −= δ ∂θ(ā_p'ᵀ f)(qh)
        a_q ← a_qh;  a_p ← ā_p' + δ/2 a_qh
    """
    params, dt, o = problem.params, problem.dt, problem.o
    traj = forward(params, problem.u, dt)
    loss, g = loss_and_output_grads(problem, traj.q)
    n = problem.n
    aq = np.zeros(n)
    ap = np.zeros(n)
    grads = zeros_like_params(params)
    for t in range(problem.t - 1, -1, -1):
        aq[n - o:] += g[t]
        ap1 = ap + 0.5 * dt * aq
        qh, ut = traj.qh[t], problem.u[t]
        aqh = aq - dt * force_jvp(params, qh, ut, ap1)
        _axpy(grads, -dt, force_param_vjp(params, qh, ut, ap1))
        aq = aqh
        ap = ap1 + 0.5 * dt * aqh
    return loss, grads


# --------------------------------------------------------------------------- echo


def echo(params: Params, u: np.ndarray, q_T: np.ndarray, p_T: np.ndarray, nudges: np.ndarray,
         dt: float, record: bool = True) -> tuple[Params, Trajectory | None]:
    """The (nudged) echo of a forward pass that ended in ``(q_T, p_T)``.

    Flip ``p ← −p_T``; then for echo step ``s = 0..T−1``: add ``nudges[s]`` to
    the momenta of the last O oscillators, replay ``u[T−1−s]`` with one leapfrog
    step, and add ``∂θV`` at that step's half-step position to ``G``.

    Parameters
    ----------
    nudges : (T, O) in echo order; for RHEL row ``s`` is ``ε g_{T−1−s}``, so row
        0 is applied right after the flip. A single row (1, O) is one kick right
        after the flip and nothing else (HEB). This is the convention of the
        integer golden model (``hel_fpga.sim.golden``).
    record : keep the echo trajectory (memory O(T·N)); with False the second
        return value is None and the working memory is O(N) plus the nudges.

    Returns
    -------
    (G, trajectory) : the accumulated local quantities and the echo record.
    """
    t_len = u.shape[0]
    nudges = np.asarray(nudges, float)
    if nudges.ndim != 2 or nudges.shape[0] not in (t_len, 1):
        raise ValueError(f"nudges must have {t_len} rows (echo order) or 1 (a kick), got {nudges.shape}")
    o = nudges.shape[1]
    n = q_T.shape[0]
    q = np.array(q_T, float)
    p = -np.array(p_T, float)
    G = zeros_like_params(params)
    traj = None
    if record:
        traj = Trajectory(q=np.zeros((t_len + 1, n)), p=np.zeros((t_len + 1, n)),
                          qh=np.zeros((t_len, n)))
        traj.q[0], traj.p[0] = q, p
    for s in range(t_len):
        if s < nudges.shape[0]:
            p[n - o:] += nudges[s]
        us = u[t_len - 1 - s]
        q, p, qh = leapfrog_step(params, q, p, us, dt)
        _axpy(G, 1.0, dtheta_V(params, qh, us))
        if record:
            traj.q[s + 1], traj.p[s + 1], traj.qh[s] = q, p, qh
    return G, traj


def _contrast(G_plus: Params, G_ref: Params, scale: float) -> Params:
    return {k: scale * (G_plus[k] - G_ref[k]) for k in PARAM_NAMES}


def rhel(problem: Problem, eps: float, estimator: str = "centred") -> Params:
    """RHEL gradient estimate (docs/design.md §1.4).

    ``centred``: three passes (forward, +ε echo, −ε echo),
    ``∇ ≈ −δ (G(+ε) − G(−ε)) / 2ε``, bias O(ε²).
    ``one-sided``: two passes; ``G(0)`` is accumulated at the forward pass's
    half-step positions (the un-nudged echo would revisit them),
    ``∇ ≈ −δ (G(+ε) − G(0)) / ε``, bias O(ε).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    params, dt = problem.params, problem.dt
    traj = forward(params, problem.u, dt)
    _, g = loss_and_output_grads(problem, traj.q)
    nudges = eps * g[::-1]
    G_plus, _ = echo(params, problem.u, traj.q[-1], traj.p[-1], nudges, dt, record=False)
    if estimator == "centred":
        G_minus, _ = echo(params, problem.u, traj.q[-1], traj.p[-1], -nudges, dt, record=False)
        return _contrast(G_plus, G_minus, -dt / (2 * eps))
    G0 = sum_dtheta_V(params, traj.qh, problem.u)
    return _contrast(G_plus, G0, -dt / eps)


def heb(problem: Problem, eps: float, estimator: str = "centred") -> Params:
    """Hamiltonian Echo Backpropagation: a final-step loss, injected as one kick
    ``ε g_{T−1}`` right after the flip and no other nudge; the contrast is taken
    as in :func:`rhel` (centred by default).

    Raises ValueError unless ``problem.mask`` selects the final step only.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not problem.final_step_only:
        raise ValueError("HEB needs a loss at the final step only (mask = last step)")
    params, dt = problem.params, problem.dt
    traj = forward(params, problem.u, dt)
    _, g = loss_and_output_grads(problem, traj.q)
    kick = eps * g[-1:]
    G_plus, _ = echo(params, problem.u, traj.q[-1], traj.p[-1], kick, dt, record=False)
    if estimator == "centred":
        G_minus, _ = echo(params, problem.u, traj.q[-1], traj.p[-1], -kick, dt, record=False)
        return _contrast(G_plus, G_minus, -dt / (2 * eps))
    return _contrast(G_plus, sum_dtheta_V(params, traj.qh, problem.u), -dt / eps)


# --------------------------------------------------------------------------- helpers


def flatten(params: Params) -> np.ndarray:
    """Concatenate the arrays in :data:`PARAM_NAMES` order."""
    return np.concatenate([np.ravel(params[k]) for k in PARAM_NAMES])


def unflatten(vec: np.ndarray, like: Params) -> Params:
    """Inverse of :func:`flatten`, shapes taken from ``like``."""
    out, i = {}, 0
    for k in PARAM_NAMES:
        size = np.size(like[k])
        out[k] = np.asarray(vec[i:i + size], float).reshape(np.shape(like[k]))
        i += size
    return out


def cosine(a, b) -> float:
    """Cosine similarity of two parameter dicts (or arrays), flattened."""
    a = flatten(a) if isinstance(a, dict) else np.ravel(a)
    b = flatten(b) if isinstance(b, dict) else np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rel_err(estimate, reference) -> float:
    """``‖estimate − reference‖ / ‖reference‖``, flattened."""
    a = flatten(estimate) if isinstance(estimate, dict) else np.ravel(estimate)
    b = flatten(reference) if isinstance(reference, dict) else np.ravel(reference)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
