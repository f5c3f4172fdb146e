"""Gradient-comparison problems: the seeded reference problem and ``.npz`` files.

A problem file holds float64 arrays ``W`` (M×N), ``B`` (M×K), ``b`` (M),
``alpha`` (N), ``u`` (T×K), ``y`` (T×O), ``mask`` (T, bool: the loss steps) and
the scalar ``dt`` (a power of two). The loss is
``Σ_t mask_t · ½‖q_{t+1}[N−O:] − y_t‖²`` from the zero state.
"""

from __future__ import annotations

import math
import zipfile

import numpy as np

from hel_fpga.sim.reference import Problem

__all__ = ["ProblemError", "reference_problem", "load_problem", "save_problem", "REFERENCE_SEED"]

REFERENCE_SEED = 2506


class ProblemError(ValueError):
    """A malformed problem file; the message names the problem."""


def reference_problem(seed: int = REFERENCE_SEED, final_step_only: bool = False) -> Problem:
    """The documented reference problem of ``hel compare``.

    N = M = 16 oscillators/hidden units, K = 2 inputs, O = 1 output, T = 120 steps,
    δ = 1/8, parameters drawn as in ``Problem.random`` (W ~ N(0, 1/N),
    B ~ N(0, 0.25), b ~ N(0, 0.01), α ∈ [0.5, 1.5]), inputs ~ N(0, 0.25), and
    the target a sine of amplitude 0.3 and period 40 steps on every step (or on
    the final step only).
    """
    rng = np.random.default_rng(seed)
    p = Problem.random(rng, n=16, m=16, k=2, o=1, t=120, dt=1 / 8, final_step_only=final_step_only)
    p.y = 0.3 * np.sin(2 * np.pi * np.arange(120) / 40.0)[:, None]
    return p


_KEYS = ("W", "B", "b", "alpha", "u", "y", "mask", "dt")


def load_problem(path) -> Problem:
    """Read and validate a problem file; raise :class:`ProblemError` naming what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise ProblemError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ProblemError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise ProblemError(f"{path}: missing array(s) {', '.join(missing)}")
    for k in _KEYS:
        if k != "mask" and data[k].dtype.kind not in "fiu":
            raise ProblemError(f"{path}: array {k} must be numeric, got dtype {data[k].dtype}")
    W, B, b, alpha, u, y, mask = (data[k] for k in _KEYS[:-1])
    if W.ndim != 2:
        raise ProblemError(f"{path}: W must be 2-D (M×N), got shape {W.shape}")
    m, n = W.shape
    t = u.shape[0] if u.ndim == 2 else -1
    k = u.shape[1] if u.ndim == 2 else -1
    expect = {"B": (m, k), "b": (m,), "alpha": (n,), "y": (t, y.shape[1] if y.ndim == 2 else -1),
              "mask": (t,)}
    if u.ndim != 2 or t < 1:
        raise ProblemError(f"{path}: u must be 2-D (T×K) with T ≥ 1, got shape {u.shape}")
    for name, shape in expect.items():
        if data[name].shape != shape:
            raise ProblemError(f"{path}: {name} has shape {data[name].shape}, expected {shape}")
    o = y.shape[1]
    if not 1 <= o <= n:
        raise ProblemError(f"{path}: y must have between 1 and N = {n} columns, got {o}")
    if mask.dtype != np.bool_:
        if not np.all(np.isin(mask, (0, 1))):
            raise ProblemError(f"{path}: mask must be boolean (0/1)")
        mask = mask.astype(bool)
    if not mask.any():
        raise ProblemError(f"{path}: mask selects no loss step")
    if data["dt"].shape != ():
        raise ProblemError(f"{path}: dt must be a scalar, got shape {data['dt'].shape}")
    dt = float(data["dt"])
    if not (dt > 0 and math.isfinite(dt) and math.log2(dt) == round(math.log2(dt)) and dt < 1):
        raise ProblemError(f"{path}: dt = {dt} is not a power of two below 1")
    for name in ("W", "B", "b", "alpha", "u", "y"):
        if not np.all(np.isfinite(data[name])):
            raise ProblemError(f"{path}: {name} contains NaN or infinity")
    return Problem(W=W.astype(float), B=B.astype(float), b=b.astype(float),
                   alpha=alpha.astype(float), u=u.astype(float), y=y.astype(float),
                   mask=mask, dt=dt)


def save_problem(path, p: Problem) -> None:
    np.savez(path, W=p.W, B=p.B, b=p.b, alpha=p.alpha, u=p.u, y=p.y, mask=p.mask, dt=np.float64(p.dt))
