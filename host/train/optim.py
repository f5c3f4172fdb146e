"""Adam on float master weights, and the model's initialisation.

The optimiser lives on the host and keeps float64 master weights; after every
step the trainer quantises them and writes them to the device (the device only
ever sees integers). Master weights are clipped to the device's parameter range
(``HelConfig.param.max_value``) so the quantised copy always exists; the float
baselines use the same clipping, so every algorithm trains the same model.
"""

from __future__ import annotations

import math

import numpy as np

from hel_fpga.spec.names import PARAM_NAMES

__all__ = ["Adam", "init_params", "lr_at"]


def init_params(rng: np.random.Generator, n: int, m: int, k: int) -> dict[str, np.ndarray]:
    """W ~ N(0, 1/N), B ~ N(0, 1/4), b ~ N(0, 1/100), α ~ U[0.5, 1.5] (draw order W, B, b, α),
    the distributions of ``hel_fpga.sim.reference.Problem.random``."""
    return {"W": rng.normal(0.0, 1.0 / np.sqrt(n), (m, n)), "B": rng.normal(0.0, 0.5, (m, k)),
            "b": rng.normal(0.0, 0.1, m), "alpha": rng.uniform(0.5, 1.5, n)}


def lr_at(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` (0-based): constant, or cosine from lr down to lr/20."""
    if schedule == "constant" or epochs <= 1:
        return lr
    frac = epoch / (epochs - 1)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


class Adam:
    """Adam (Kingma & Ba) with bias correction; state is plain arrays for checkpoints.

    Parameters
    ----------
    params : the float master weights (updated in place by :meth:`step`).
    beta1, beta2, eps : the usual constants.
    clip : bound on |θ| after each step (the device's parameter range), or None.
    """

    def __init__(self, params, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 clip: float | None = None):
        self.params = params
        self.beta1, self.beta2, self.eps, self.clip = beta1, beta2, eps, clip
        self.m = {k: np.zeros_like(params[k], dtype=np.float64) for k in PARAM_NAMES}
        self.v = {k: np.zeros_like(params[k], dtype=np.float64) for k in PARAM_NAMES}
        self.t = 0

    def step(self, grads, lr: float) -> None:
        self.t += 1
        c1 = 1.0 - self.beta1 ** self.t
        c2 = 1.0 - self.beta2 ** self.t
        for k in PARAM_NAMES:
            g = np.asarray(grads[k], dtype=np.float64)
            if not np.all(np.isfinite(g)):
                raise FloatingPointError(f"gradient of {k} is not finite")
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * g
            self.v[k] = self.beta2 * self.v[k] + (1 - self.beta2) * g * g
            upd = lr * (self.m[k] / c1) / (np.sqrt(self.v[k] / c2) + self.eps)
            p = self.params[k] - upd
            if self.clip is not None:
                p = np.clip(p, -self.clip, self.clip)
            self.params[k][...] = p

    def state(self) -> dict:
        """Arrays ``m_<name>``, ``v_<name>`` and the step count (for checkpoints)."""
        out = {f"m_{k}": self.m[k] for k in PARAM_NAMES}
        out.update({f"v_{k}": self.v[k] for k in PARAM_NAMES})
        return out

    def load_state(self, arrays, t: int) -> None:
        for k in PARAM_NAMES:
            self.m[k] = np.array(arrays[f"m_{k}"], dtype=np.float64)
            self.v[k] = np.array(arrays[f"v_{k}"], dtype=np.float64)
        self.t = int(t)
