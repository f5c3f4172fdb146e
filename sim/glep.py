"""GLEP on the discrete leapfrog model: which boundary conditions give which rule.

Generalised Lagrangian Equilibrium Propagation (Pourcel, Basu, Ernoult, Gilra,
arXiv 2506.06248) contrasts the parameter derivative of an action between a
free trajectory and trajectories nudged by a cost. Whether the contrast alone is
the gradient depends on the boundary conditions; this module builds every
variant of that paper on the model of :mod:`hel_fpga.sim.reference` in float64 and checks
each against the exact gradient of its own model.

Discrete action
---------------
The leapfrog's half-step positions ``x_k = qh_k`` obey the Störmer equations
``x_{k+1} − 2x_k + x_{k−1} = −δ² f(x_k, u_k)`` for ``k = 0..T−1``, with the two
boundary nodes ``x_{−1} = q_0 − (δ/2) p_0`` and ``x_T = q_T + (δ/2) p_T``, so that
the leapfrog's momenta are ``p_{k+1} = (x_{k+1} − x_k)/δ`` and its outputs are
midpoints, ``ŷ_t = q_{t+1}[N−O:] = ½(x_t + x_{t+1})[N−O:]``. They are the
Euler–Lagrange (EL) equations at the inner nodes of::

    A(x; θ) = Σ_{k=−1}^{T−1} ½‖x_{k+1} − x_k‖²/δ  −  δ Σ_{k=0}^{T−1} V(x_k, u_k)

(the trapezoidal discrete action of docs/design.md §1.5, with the end nodes'
half potentials moved into the boundary terms; then the boundary momenta
``∂A/∂x_T = p_T`` and ``∂A/∂x_{−1} = −p_0`` are the leapfrog's own.) The explicit
parameter derivative is local: ``∂θA = −δ Σ_{k=0}^{T−1} ∂θV(x_k, u_k)``.

Nudging
-------
The cost is the loss linearised at the free trajectory,
``C(x) = Σ_t g_t · ½(x_t + x_{t+1})[N−O:]`` with ``g_t = ∂ℓ_t/∂ŷ_t`` held fixed
(the host computes the nudges once from the free phase; only ``∂xC`` at the
free trajectory enters the ε→0 limit). The nudged trajectory makes
``A + βC`` stationary at the inner nodes::

    x_{k+1} − 2x_k + x_{k−1} = −δ² f(x_k, u_k) + δβ c_k,   c_k = ½(g_{k−1} + g_k)

(``g_{−1} = 0``, embedded in the last O coordinates). The EP contrast is
``dΓ/dβ`` with ``Γ(β) = ∂θA(x_β) = −δ Σ_k ∂θV(x_k^β)``, estimated by a centred
difference at ``β = ±ε``.

The GLEP identity
-----------------
Let ``Φ(θ, β) = (A + βC)(x_β(θ))``; stationarity kills every inner-node term of
its derivatives, leaving the boundary nodes ``b ∈ {−1, T}`` with momenta
``P_b = ∂(A + βC)/∂x_b`` (``P_T = (x_T − x_{T−1})/δ + ½β g_{T−1}``,
``P_{−1} = −(x_0 − x_{−1})/δ``). Equating the mixed partials at ``β = 0``::

    dL/dθ = dΓ/dβ + Σ_b [ (dP_b/dβ)ᵀ ∂θx_b − (dP_b/dθ)ᵀ ∂βx_b ]      (boundary residual)

* Constant initial value (:func:`civp`): ``x_{−1}, x_0`` fixed, ``x_T`` free.
  The residual needs ``∂θx_T`` and ``∂θp_T`` — the forward sensitivities of the
  final state to every parameter (RTRL, an N×P matrix pair carried through
  time). Without it the contrast is biased at every ε.
* Fixed endpoints (:func:`fixed_endpoints_ep`): ``x_{−1}, x_T`` fixed in both
  phases, so ``∂θx_b = ∂βx_b = 0``: the contrast is exact, but each phase is a
  two-point boundary-value problem (non-causal; solved here by Newton).
* Periodic (:func:`periodic_ep`): ``x_{k+T} = x_k`` has no boundary at all:
  exact, but only for a periodic steady state under a periodic drive.
* Pinned final state (:func:`solve_pinned_final_state`): the nudged trajectory
  keeps the free trajectory's final node ``x_T`` and momentum ``P_T``; the
  start is free. Then ``dP_T/dβ = ∂βx_T = 0`` and, since the free start does not
  depend on θ, ``∂θx_{−1} = dP_{−1}/dθ = 0``: the residual vanishes. The nudged
  trajectory is then a terminal-value problem, i.e. an initial-value problem in
  reversed time: it is exactly the momentum-flipped echo of HEL with nudges
  ``ε g`` (checked to float precision by solving the EL system globally), and
  ``dΓ/dβ`` is RHEL's ``−δ (G(+ε) − G(−ε))/2ε``. HEB is the same with a loss at
  the last step only.

Memory
------
:func:`peak_array_bytes` measures the peak bytes allocated (NumPy arrays
included, via :mod:`tracemalloc`) while a variant computes its gradient from an
already-built problem. The HEL variants are measured with :func:`hel_streaming`,
which keeps only the current state, the accumulators and the host's list of
nudges (T×O), as the hardware flow does.
"""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.linalg import solve_banded

from hel_fpga.sim.reference import (
    PARAM_NAMES, Params, Problem, bptt, cosine, dtheta_V, echo, flatten, force, forward,
    leapfrog_step, loss_and_output_grads, rel_err, rhel, sum_dtheta_V, unflatten,
    zeros_like_params,
)

__all__ = [
    "VARIANTS", "Variant", "glep_table", "peak_array_bytes",
    "civp", "force_param_jacobian",
    "solve_fixed_endpoints", "fixed_endpoints_loss", "fixed_endpoints_ep", "fixed_endpoints_gradient",
    "periodic_problem", "solve_periodic", "periodic_loss", "periodic_ep", "periodic_gradient",
    "free_nodes", "solve_pinned_final_state", "pinned_final_state_ep", "pinned_vs_echo", "hel_streaming",
    "bptt_memory",
]


# --------------------------------------------------------------------------- node helpers


def _force_rows(params: Params, X: np.ndarray, U: np.ndarray) -> np.ndarray:
    """``f(x_k, u_k)`` for every row."""
    a = np.tanh(X @ params["W"].T + U @ params["B"].T + params["b"])
    return params["alpha"] * X + a @ params["W"]


def _jf_rows(params: Params, X: np.ndarray, U: np.ndarray) -> np.ndarray:
    """``J_f(x_k, u_k)`` for every row, shape (S, N, N)."""
    W = params["W"]
    a = np.tanh(X @ W.T + U @ params["B"].T + params["b"])
    jf = np.einsum("mi,sm,mj->sij", W, 1.0 - a * a, W)
    idx = np.arange(W.shape[1])
    jf[:, idx, idx] += params["alpha"]
    return jf


def _embed(g: np.ndarray, n: int) -> np.ndarray:
    """(S, O) output-space rows → (S, N), in the last O coordinates."""
    out = np.zeros((g.shape[0], n))
    out[:, n - g.shape[1]:] = g
    return out


def _midpoint_loss(problem: Problem, X: np.ndarray, x_next: np.ndarray) -> tuple[float, np.ndarray]:
    """Loss on ``ŷ_t = ½(x_t + x_{t+1})[N−O:]``; returns ``(L, g)``, g (T, O)."""
    o = problem.o
    yhat = 0.5 * (X + x_next)[:, X.shape[1] - o:]
    g = np.where(np.asarray(problem.mask, bool)[:, None], yhat - problem.y, 0.0)
    return 0.5 * float(np.sum(g * g)), g


def _gamma(params: Params, X: np.ndarray, U: np.ndarray, dt: float) -> Params:
    """``Γ = ∂θA = −δ Σ_k ∂θV(x_k, u_k)``."""
    s = sum_dtheta_V(params, X, U)
    return {k: -dt * s[k] for k in PARAM_NAMES}


def _centred(gp: Params, gm: Params, eps: float) -> Params:
    return {k: (gp[k] - gm[k]) / (2 * eps) for k in PARAM_NAMES}


def _params_vjp_rows(params: Params, X: np.ndarray, U: np.ndarray, V: np.ndarray) -> Params:
    """``Σ_k ∂θ(v_kᵀ f(x_k, u_k))`` over rows (vectorised :func:`hel_fpga.sim.reference.force_param_vjp`)."""
    W = params["W"]
    a = np.tanh(X @ W.T + U @ params["B"].T + params["b"])
    r = (1.0 - a * a) * (V @ W.T)
    return {"W": a.T @ V + r.T @ X, "B": r.T @ U, "b": r.sum(0), "alpha": np.sum(V * X, 0)}


def _solve_block_banded(nblocks: int, n: int, blocks: dict[tuple[int, int], np.ndarray],
                        rhs: np.ndarray) -> np.ndarray:
    """Solve a sparse block system ``Σ_j A_{ij} x_j = r_i`` (N×N blocks keyed by
    (row block, column block)) as a banded LAPACK system. Memory O(nblocks·N·band)."""
    lower = max(0, max((i - j) for i, j in blocks)) * n + n - 1
    upper = max(0, max((j - i) for i, j in blocks)) * n + n - 1
    size = nblocks * n
    ab = np.zeros((lower + upper + 1, size))
    a_idx = np.arange(n)
    for (i, j), blk in blocks.items():
        rows = (i * n + a_idx)[:, None]
        cols = (j * n + a_idx)[None, :]
        ab[upper + rows - cols, np.broadcast_to(cols, (n, n))] = blk
    return solve_banded((lower, upper), ab, rhs.reshape(size)).reshape(nblocks, n)


def _newton(residual: Callable[[np.ndarray], np.ndarray],
            blocks: Callable[[np.ndarray], dict], x: np.ndarray, max_iter: int = 50) -> np.ndarray:
    """Newton's method on a block-banded system; stops when the step stops shrinking
    at float precision."""
    nb, n = x.shape
    x = x.copy()
    last = np.inf
    for _ in range(max_iter):
        step = _solve_block_banded(nb, n, blocks(x), residual(x))
        x -= step
        size = float(np.max(np.abs(step)))
        if size <= 1e-15 * (1.0 + float(np.max(np.abs(x)))) or (size < 1e-11 and size >= 0.5 * last):
            return x
        last = size
    raise RuntimeError(f"Newton did not converge (last step {size:.3g})")


# --------------------------------------------------------------------------- 1. constant initial value


def force_param_jacobian(params: Params, q: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``∂f/∂θ`` as an N×P matrix, columns in :func:`hel_fpga.sim.reference.flatten` order."""
    W = params["W"]
    n = W.shape[1]
    a = np.tanh(W @ q + params["B"] @ u + params["b"])
    ws = W * (1.0 - a * a)[:, None]                     # ws[j, i] = W_ji sech² z_j
    fw = np.einsum("il,j->ijl", np.eye(n), a) + np.einsum("ji,l->ijl", ws, q)
    fb_ = np.einsum("ji,l->ijl", ws, u)
    return np.hstack([fw.reshape(n, -1), fb_.reshape(n, -1), ws.T, np.diag(q)])


def civp(problem: Problem, eps: float, residual: bool = False) -> Params:
    """GLEP with a constant initial value (both phases start at ``q = p = 0``).

    The free phase and the ±ε nudged phases run forward in lockstep (the nudge at
    node k needs ``g_k``, available one free step ahead), so memory does not grow
    with T. Returns the centred contrast ``dΓ/dβ``, plus, if ``residual``, the
    boundary residual at the free end ``x_T``::

        R = (dP_T/dβ)ᵀ ∂θx_T − (∂θp_T)ᵀ ∂βx_T,   P_T = p_T + ½β g_{T−1}

    with ``∂θ(q_T, p_T)`` carried forward by RTRL (two N×P matrices,
    O(N·P) work per step) and the β-derivatives from the two nudged phases.
    Exact as ε → 0 only with the residual.
    """
    params, dt, u = problem.params, problem.dt, problem.u
    n, o, t_len = problem.n, problem.o, problem.t
    mask = np.asarray(problem.mask, bool)
    betas = np.array([eps, -eps])
    q, p = np.zeros(n), np.zeros(n)
    xm, x = np.zeros((2, n)), np.zeros((2, n))       # (x_{k−1}, x_k) per nudged phase
    gam = [zeros_like_params(params), zeros_like_params(params)]
    g_prev = np.zeros(n)
    if residual:
        npar = flatten(params).size
        sq, sp = np.zeros((n, npar)), np.zeros((n, npar))
    for k in range(t_len):
        uk = u[k]
        qh = q + 0.5 * dt * p
        if residual:
            sqh = sq + 0.5 * dt * sp
            jf = np.diag(params["alpha"]) + params["W"].T @ (
                (1.0 - np.tanh(params["W"] @ qh + params["B"] @ uk + params["b"]) ** 2)[:, None] * params["W"])
            sp = sp - dt * (jf @ sqh + force_param_jacobian(params, qh, uk))
            sq = sqh + 0.5 * dt * sp
        p = p - dt * force(params, qh, uk)
        q = qh + 0.5 * dt * p
        g_k = np.zeros(n)
        if mask[k]:
            g_k[n - o:] = q[n - o:] - problem.y[k]
        c = 0.5 * (g_prev + g_k)
        for i in range(2):
            dv = dtheta_V(params, x[i], uk)
            for name in PARAM_NAMES:
                gam[i][name] -= dt * dv[name]
            x_new = 2 * x[i] - xm[i] - dt * dt * force(params, x[i], uk) + dt * betas[i] * c
            xm[i], x[i] = x[i], x_new
        g_prev = g_k
    grads = _centred(gam[0], gam[1], eps)
    if residual:
        c_T = 0.5 * g_prev
        P = (x - xm) / dt + betas[:, None] * c_T
        dP_dbeta = (P[0] - P[1]) / (2 * eps)
        dx_dbeta = (x[0] - x[1]) / (2 * eps)
        r = dP_dbeta @ (sq + 0.5 * dt * sp) - dx_dbeta @ sp
        rd = unflatten(r, params)
        grads = {k: grads[k] + rd[k] for k in PARAM_NAMES}
    return grads


# --------------------------------------------------------------------------- 2. fixed endpoints


def _el_residual(params, X, xm, xp, U, dt, beta, c):
    return xp - 2 * X + xm + dt * dt * _force_rows(params, X, U) - dt * beta * c


def _chain_blocks(params, X, U, dt, pos, links):
    """Jacobian blocks of the EL residuals: ``−2I + δ²J_f`` on the diagonal and
    ``I`` for each (equation, neighbour) pair in ``links``."""
    jf = _jf_rows(params, X, U)
    eye = np.eye(X.shape[1])
    blocks = {}
    for k in range(X.shape[0]):
        blocks[(pos[k], pos[k])] = dt * dt * jf[k] - 2 * eye
    for k, j in links:
        blocks[(pos[k], pos[j])] = blocks.get((pos[k], pos[j]), 0) + eye
    return blocks


def _fixed_links(t_len):
    return [(k, k - 1) for k in range(1, t_len)] + [(k, k + 1) for k in range(t_len - 1)]


def solve_fixed_endpoints(problem: Problem, ends: tuple[np.ndarray, np.ndarray] | None = None,
                          beta: float = 0.0, c: np.ndarray | None = None,
                          x_init: np.ndarray | None = None) -> np.ndarray:
    """Nodes ``x_0..x_{T−1}`` (T, N) of the trajectory with ``x_{−1}, x_T`` fixed
    (``ends``, zero by default), solving the (nudged) EL equations at every inner
    node by Newton. The model "fixed endpoints" is this solution."""
    params, dt, u = problem.params, problem.dt, problem.u
    t_len, n = problem.t, problem.n
    a, b = (np.zeros(n), np.zeros(n)) if ends is None else ends
    c = np.zeros((t_len, n)) if c is None else c
    pos = np.arange(t_len)
    links = _fixed_links(t_len)

    def res(X):
        xm = np.vstack([a[None], X[:-1]])
        xp = np.vstack([X[1:], b[None]])
        return _el_residual(params, X, xm, xp, u, dt, beta, c)

    x0 = np.zeros((t_len, n)) if x_init is None else x_init
    return _newton(res, lambda X: _chain_blocks(params, X, u, dt, pos, links), x0)


def fixed_endpoints_loss(problem: Problem, X: np.ndarray, x_end: np.ndarray | None = None):
    """Loss and g of the fixed-endpoint model, ``ŷ_t = ½(x_t + x_{t+1})``."""
    x_end = np.zeros(problem.n) if x_end is None else x_end
    return _midpoint_loss(problem, X, np.vstack([X[1:], x_end[None]]))


def _node_cost_grads(g_full: np.ndarray, cyclic: bool) -> np.ndarray:
    """``c_k = ½(g_{k−1} + g_k)``: the linearised cost's gradient at node k."""
    prev = np.roll(g_full, 1, axis=0) if cyclic else np.vstack([np.zeros_like(g_full[:1]), g_full[:-1]])
    return 0.5 * (prev + g_full)


def fixed_endpoints_ep(problem: Problem, eps: float) -> Params:
    """EP contrast on the fixed-endpoint model: free solve, then ±ε nudged solves
    (warm-started from the free one); no residual since the ends never move."""
    X = solve_fixed_endpoints(problem)
    _, g = fixed_endpoints_loss(problem, X)
    c = _node_cost_grads(_embed(g, problem.n), cyclic=False)
    gp = _gamma(problem.params, solve_fixed_endpoints(problem, beta=eps, c=c, x_init=X), problem.u, problem.dt)
    gm = _gamma(problem.params, solve_fixed_endpoints(problem, beta=-eps, c=c, x_init=X), problem.u, problem.dt)
    return _centred(gp, gm, eps)


def _implicit_gradient(problem, X, c, pos, links):
    """``dL/dθ = −μᵀ ∂θF`` with ``J μ = ∂L/∂x`` (J symmetric) and
    ``∂θF_k = δ² ∂θf(x_k)``: implicit differentiation of the EL system."""
    params, dt = problem.params, problem.dt
    blocks = _chain_blocks(params, X, problem.u, dt, pos, links)
    blocks_t = {(j, i): blk.T for (i, j), blk in blocks.items()}
    mu_pos = _solve_block_banded(X.shape[0], X.shape[1], blocks_t, c[np.argsort(pos)])
    mu = mu_pos[pos]
    vjp = _params_vjp_rows(params, X, problem.u, mu)
    return {k: -dt * dt * vjp[k] for k in PARAM_NAMES}


def fixed_endpoints_gradient(problem: Problem) -> tuple[float, Params]:
    """Exact loss gradient of the fixed-endpoint model by implicit differentiation."""
    X = solve_fixed_endpoints(problem)
    loss, g = fixed_endpoints_loss(problem, X)
    c = _node_cost_grads(_embed(g, problem.n), cyclic=False)
    return loss, _implicit_gradient(problem, X, c, np.arange(problem.t), _fixed_links(problem.t))


# --------------------------------------------------------------------------- 3. periodic


def periodic_problem(rng: np.random.Generator, n: int, m: int, k: int, o: int, t: int,
                     dt: float = 1 / 8) -> Problem:
    """A periodically driven task: parameters as :meth:`Problem.random`, inputs
    ``0.5 sin(2πt/T + φ)``, targets ``0.3 sin(2πt/T + ψ)``, loss on every step."""
    pr = Problem.random(rng, n, m, k, o, t, dt=dt)
    phase_u, phase_y = rng.uniform(0, 2 * np.pi, k), rng.uniform(0, 2 * np.pi, o)
    ts = 2 * np.pi * np.arange(t)[:, None] / t
    pr.u = 0.5 * np.sin(ts + phase_u)
    pr.y = 0.3 * np.sin(ts + phase_y)
    return pr


def _fold(t_len: int) -> np.ndarray:
    """Node → position in the order 0, T−1, 1, T−2, …: cyclic neighbours end up
    at most two positions apart, so the periodic system is banded."""
    order = np.empty(t_len, int)
    order[0::2] = np.arange((t_len + 1) // 2)
    order[1::2] = t_len - 1 - np.arange(t_len // 2)
    pos = np.empty(t_len, int)
    pos[order] = np.arange(t_len)
    return pos


def _periodic_links(t_len):
    return [(k, (k - 1) % t_len) for k in range(t_len)] + [(k, (k + 1) % t_len) for k in range(t_len)]


def solve_periodic(problem: Problem, beta: float = 0.0, c: np.ndarray | None = None,
                   x_init: np.ndarray | None = None) -> np.ndarray:
    """Nodes ``x_0..x_{T−1}`` of the periodic steady state (``x_{k+T} = x_k``)
    under the periodic drive ``u``, by Newton on the cyclic EL system."""
    params, dt, u = problem.params, problem.dt, problem.u
    t_len, n = problem.t, problem.n
    if t_len < 3:
        raise ValueError("periodic orbits need T >= 3 nodes")
    c = np.zeros((t_len, n)) if c is None else c
    pos = _fold(t_len)
    links = _periodic_links(t_len)

    def res(Xp):
        X = Xp[pos]
        r = _el_residual(params, X, np.roll(X, 1, 0), np.roll(X, -1, 0), u, dt, beta, c)
        out = np.empty_like(r)
        out[pos] = r
        return out

    def blocks(Xp):
        return _chain_blocks(params, Xp[pos], u, dt, pos, links)

    x0 = np.zeros((t_len, n)) if x_init is None else x_init
    xp0 = np.empty_like(x0)
    xp0[pos] = x0
    return _newton(res, blocks, xp0)[pos]


def periodic_loss(problem: Problem, X: np.ndarray):
    """Loss and g on ``ŷ_t = ½(x_t + x_{t+1 mod T})`` over one period."""
    return _midpoint_loss(problem, X, np.roll(X, -1, 0))


def periodic_ep(problem: Problem, eps: float) -> Params:
    """EP contrast on the periodic steady state (no boundary, no residual)."""
    X = solve_periodic(problem)
    _, g = periodic_loss(problem, X)
    c = _node_cost_grads(_embed(g, problem.n), cyclic=True)
    gp = _gamma(problem.params, solve_periodic(problem, beta=eps, c=c, x_init=X), problem.u, problem.dt)
    gm = _gamma(problem.params, solve_periodic(problem, beta=-eps, c=c, x_init=X), problem.u, problem.dt)
    return _centred(gp, gm, eps)


def periodic_gradient(problem: Problem) -> tuple[float, Params]:
    """Exact loss gradient of the periodic steady state by implicit differentiation."""
    X = solve_periodic(problem)
    loss, g = periodic_loss(problem, X)
    c = _node_cost_grads(_embed(g, problem.n), cyclic=True)
    return loss, _implicit_gradient(problem, X, c, _fold(problem.t), _periodic_links(problem.t))


# --------------------------------------------------------------------------- 4. pinned final state = HEL


def free_nodes(problem: Problem):
    """The free leapfrog run as nodes: ``(x_{−1}..x_{T−1}) (T+1, N), x_T, p_T, g``."""
    traj = forward(problem.params, problem.u, problem.dt)
    _, g = loss_and_output_grads(problem, traj.q)
    dt = problem.dt
    x_first = traj.q[0] - 0.5 * dt * traj.p[0]
    nodes = np.vstack([x_first[None], traj.qh])
    x_T = traj.q[-1] + 0.5 * dt * traj.p[-1]
    return nodes, x_T, traj.p[-1], g


def solve_pinned_final_state(problem: Problem, beta: float) -> np.ndarray:
    """Nudged trajectory pinned to the free final state, solved globally.

    Unknowns ``x_{−1}..x_{T−1}``; equations: the nudged EL equations at nodes
    ``0..T−1`` with ``x_T`` fixed to the free one, and the terminal momentum
    ``P_T = (x_T − x_{T−1})/δ + ½β g_{T−1}`` fixed to the free ``p_T``. Solved by
    Newton on the whole (T+1)·N system, not by stepping, so that its equality with
    the echo (:func:`hel_fpga.sim.reference.echo`, ``nudges = β g`` in echo order) is an
    independent check. Returns (T+1, N) nodes ``x_{−1}..x_{T−1}``.
    """
    params, dt, u = problem.params, problem.dt, problem.u
    t_len, n = problem.t, problem.n
    nodes0, x_T, p_T, g = free_nodes(problem)
    gf = _embed(g, n)
    c = _node_cost_grads(gf, cyclic=False)
    x_last = x_T - dt * (p_T - 0.5 * beta * gf[-1])   # terminal condition, linear
    eye = np.eye(n)

    def res(Y):
        X, xm = Y[1:], Y[:-1]
        xp = np.vstack([Y[2:], x_T[None]])
        r = _el_residual(params, X, xm, xp, u, dt, beta, c)
        return np.vstack([r, (Y[-1] - x_last)[None]])

    def blocks(Y):
        jf = _jf_rows(params, Y[1:], u)
        bl = {}
        for k in range(t_len):          # row k: EL at node k → columns of nodes k−1, k, k+1
            bl[(k, k)] = eye
            bl[(k, k + 1)] = dt * dt * jf[k] - 2 * eye
            if k + 2 <= t_len:
                bl[(k, k + 2)] = eye
        bl[(t_len, t_len)] = eye
        return bl

    return _newton(res, blocks, nodes0)


def pinned_final_state_ep(problem: Problem, eps: float) -> Params:
    """``dΓ/dβ`` over the pinned-final-state solutions at ±ε (the GLEP view of
    centred RHEL)."""
    gp = _gamma(problem.params, solve_pinned_final_state(problem, eps)[1:], problem.u, problem.dt)
    gm = _gamma(problem.params, solve_pinned_final_state(problem, -eps)[1:], problem.u, problem.dt)
    return _centred(gp, gm, eps)


def pinned_vs_echo(problem: Problem, eps: float) -> tuple[float, float]:
    """How far the globally solved pinned-final-state trajectory is from the
    echo: ``(max |x_k − qh_echo|, rel. difference of dΓ/dβ and centred RHEL)``."""
    traj = forward(problem.params, problem.u, problem.dt)
    _, g = loss_and_output_grads(problem, traj.q)
    _, et = echo(problem.params, problem.u, traj.q[-1], traj.p[-1], eps * g[::-1], problem.dt)
    nodes = solve_pinned_final_state(problem, eps)
    first = et.q[-1] + 0.5 * problem.dt * et.p[-1]     # x_{−1} of the echo
    dx = max(float(np.max(np.abs(nodes[1:] - et.qh[::-1]))), float(np.max(np.abs(nodes[0] - first))))
    return dx, rel_err(pinned_final_state_ep(problem, eps), rhel(problem, eps, "centred"))


def hel_streaming(problem: Problem, eps: float, estimator: str = "centred",
                  final_kick_only: bool = False) -> Params:
    """HEL as the hardware flow runs it: an unrecorded forward pass that hands
    the host one output per step (the host keeps the nudges ``ε g``, T×O, or
    just the final kick for HEB), then the echo(es) with memory O(N).
    Equals :func:`hel_fpga.sim.reference.rhel` / :func:`hel_fpga.sim.reference.heb`."""
    params, dt, u = problem.params, problem.dt, problem.u
    n, o, t_len = problem.n, problem.o, problem.t
    mask = np.asarray(problem.mask, bool)
    if final_kick_only and not problem.final_step_only:
        raise ValueError("HEB needs a loss at the final step only")
    q, p = np.zeros(n), np.zeros(n)
    nudges = np.zeros((t_len, o)) if not final_kick_only else None
    g0 = zeros_like_params(params)
    for k in range(t_len):
        q, p, qh = leapfrog_step(params, q, p, u[k], dt)
        if estimator == "one-sided":
            dv = dtheta_V(params, qh, u[k])
            for name in PARAM_NAMES:
                g0[name] += dv[name]
        if not final_kick_only and mask[k]:
            nudges[t_len - 1 - k] = eps * (q[n - o:] - problem.y[k])
    if final_kick_only:
        nudges = eps * (q[n - o:] - problem.y[-1])[None]
    gp, _ = echo(params, u, q, p, nudges, dt, record=False)
    if estimator == "centred":
        gm, _ = echo(params, u, q, p, -nudges, dt, record=False)
        return {k: -dt * (gp[k] - gm[k]) / (2 * eps) for k in PARAM_NAMES}
    return {k: -dt * (gp[k] - g0[k]) / eps for k in PARAM_NAMES}


# --------------------------------------------------------------------------- the table


def peak_array_bytes(fn: Callable, *args, **kwargs) -> int:
    """Peak bytes allocated (NumPy arrays included) while ``fn`` runs, above what
    was allocated before it started."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn(*args, **kwargs)
        return int(tracemalloc.get_traced_memory()[1] - base)
    finally:
        if not was_tracing:
            tracemalloc.stop()


@dataclass(frozen=True)
class Variant:
    """One row of the GLEP table.

    Attributes
    ----------
    id, boundary_conditions, forward_only, local, needs_sensitivities, passes :
        the claims the table prints (``passes`` counts runs of the dynamics:
        free + nudged phases).
    make_problem : ``(seed, T) → Problem`` for this variant's model.
    estimate : ``(problem, eps) → grads``, the learning rule.
    reference : ``problem → grads``, the exact gradient of the variant's own
        model, computed independently of the rule.
    solver : how a phase is computed (for the printed table).
    """

    id: str
    boundary_conditions: str
    forward_only: bool
    local: bool
    needs_sensitivities: bool
    passes: int
    make_problem: Callable[[int, int], Problem]
    estimate: Callable[[Problem, float], Params]
    reference: Callable[[Problem], Params]
    solver: str


#: Problem size of the table: N = M = 6 oscillators/hidden units, K = 2, O = 2, δ = 1/8.
SIZE = dict(n=6, m=6, k=2, o=2)


def _seq_problem(seed, t, final_step_only=False):
    return Problem.random(np.random.default_rng(seed), t=t, final_step_only=final_step_only, **SIZE)


def _per_problem(seed, t):
    return periodic_problem(np.random.default_rng(seed), t=t, **SIZE)


VARIANTS: tuple[Variant, ...] = (
    Variant("civp_contrast", "initial q, p fixed; end free", True, True, False, 3,
            _seq_problem, lambda pr, e: civp(pr, e, residual=False), lambda pr: bptt(pr)[1],
            "forward (leapfrog), free and ±ε in lockstep"),
    Variant("civp_residual", "initial q, p fixed; end free", True, False, True, 3,
            _seq_problem, lambda pr, e: civp(pr, e, residual=True), lambda pr: bptt(pr)[1],
            "forward + RTRL sensitivities (N×P)"),
    Variant("fixed_endpoints", "first and last positions fixed", False, True, False, 3,
            _seq_problem, fixed_endpoints_ep, lambda pr: fixed_endpoints_gradient(pr)[1],
            "boundary-value problem (Newton, all T steps at once)"),
    Variant("periodic", "periodic, x(t+T) = x(t)", False, True, False, 3,
            _per_problem, periodic_ep, lambda pr: periodic_gradient(pr)[1],
            "periodic orbit (Newton, all T steps at once)"),
    Variant("hel_centred", "nudged end pinned to free final state", True, True, False, 3,
            _seq_problem, lambda pr, e: hel_streaming(pr, e, "centred"), lambda pr: bptt(pr)[1],
            "forward, flip, ±ε echoes in lockstep"),
    Variant("hel_one_sided", "nudged end pinned to free final state", True, True, False, 2,
            _seq_problem, lambda pr, e: hel_streaming(pr, e, "one-sided"), lambda pr: bptt(pr)[1],
            "forward (accumulates G(0)), flip, +ε echo"),
    Variant("heb", "final state pinned; one kick (final-step loss)", True, True, False, 3,
            lambda s, t: _seq_problem(s, t, final_step_only=True),
            lambda pr, e: hel_streaming(pr, e, "centred", final_kick_only=True), lambda pr: bptt(pr)[1],
            "forward, flip + kick, ±ε echoes"),
)

DEFAULT_SEED = 7
DEFAULT_T = 32
DEFAULT_T_MEMORY = (32, 128)
DEFAULT_EPS = (1e-2, 1e-3)


def bptt_memory(seed: int = DEFAULT_SEED, t_memory: tuple[int, int] = DEFAULT_T_MEMORY) -> dict[int, int]:
    """Peak array bytes of BPTT (which stores the trajectory), for comparison."""
    return {int(t): peak_array_bytes(bptt, _seq_problem(seed, t)) for t in t_memory}


def glep_table(seed: int = DEFAULT_SEED, t: int = DEFAULT_T, t_memory: tuple[int, int] = DEFAULT_T_MEMORY,
               eps: tuple[float, ...] = DEFAULT_EPS, variants=VARIANTS) -> list[dict]:
    """Measure every variant: cosine and relative error against its own exact
    reference at each ε (on a T = ``t`` problem), and the peak array bytes of one
    gradient computation at the two sequence lengths ``t_memory``.

    Returns rows with the keys ``variant, boundary_conditions, forward_only,
    local, needs_sensitivities, passes, memory_bytes`` (sequence length → bytes)
    and ``results`` (a list of ``{eps, cos, rel_err}``).
    """
    rows = []
    for v in variants:
        pr = v.make_problem(seed, t)
        ref = v.reference(pr)
        results = []
        for e in eps:
            est = v.estimate(pr, e)
            results.append({"eps": float(e), "cos": cosine(est, ref), "rel_err": rel_err(est, ref)})
        memory = {}
        for tm in t_memory:
            prm = v.make_problem(seed, tm)
            memory[int(tm)] = peak_array_bytes(v.estimate, prm, eps[0])
        rows.append({
            "variant": v.id,
            "boundary_conditions": v.boundary_conditions,
            "forward_only": v.forward_only,
            "local": v.local,
            "needs_sensitivities": v.needs_sensitivities,
            "passes": v.passes,
            "memory_bytes": memory,
            "results": results,
        })
    return rows
