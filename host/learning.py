"""One HEL learning sample on any :class:`hel_fpga.host.device.Device`.

The host owns the loss: the device runs FORWARD and streams the outputs; the
host turns them into output gradients, quantises ``ν = (δ/2)·ε·∂ℓ/∂ŷ`` into
integer nudges (``HelConfig.nudges``), and the device runs the echo and
accumulates the contrast. Gradients are read (and scaled) once per batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from hel_fpga.host.device import Device
from hel_fpga.spec.formats import HelConfig

__all__ = ["LossFn", "masked_mse", "run_sample", "read_gradients", "default_eps", "config_for"]

#: ŷ (T×O floats) → (loss, ∂loss/∂ŷ (T×O)).
LossFn = Callable[[np.ndarray], tuple[float, np.ndarray]]


def masked_mse(y: np.ndarray, mask: np.ndarray) -> LossFn:
    """``Σ_t mask_t·½‖ŷ_t − y_t‖²`` and its gradient."""
    m = np.asarray(mask, dtype=float)[:, None]

    def fn(y_hat: np.ndarray):
        r = (y_hat - y) * m
        return 0.5 * float(np.sum(r * r)), r

    return fn


#: Default ε by estimator and by loss kind (every step / a single final step).
#: The nudge must move the echo by many operand LSBs yet stay small next to the
#: nonlinearity: a single final-step kick perturbs far less than T nudges, so it
#: takes a larger ε. Measured with ``hel compare`` on random problems (README).
DEFAULT_EPS = {("centred", "all"): 0.03, ("centred", "final"): 0.3,
               ("one-sided", "all"): 0.005, ("one-sided", "final"): 0.1}


def default_eps(mask, estimator: str = "centred") -> float:
    """The documented default ε for a loss mask (T booleans) and an estimator."""
    kind = "final" if int(np.count_nonzero(mask)) == 1 else "all"
    return DEFAULT_EPS[(estimator, kind)]


def run_sample(dev: Device, u_int: np.ndarray, loss_fn: LossFn, eps: float,
               estimator: str = "centred") -> tuple[float, np.ndarray]:
    """LOAD, FORWARD, host loss and nudges, ECHO. Returns (loss, ŷ as floats)."""
    cfg = dev.config
    dev.load(u_int)
    y_hat = cfg.outputs_to_float(dev.forward(estimator))
    loss, g = loss_fn(y_hat)
    dev.echo(cfg.nudges(g, eps))
    return loss, y_hat


def read_gradients(dev: Device, eps: float, estimator: str = "centred",
                   clear: bool = True) -> dict[str, np.ndarray]:
    """Read the accumulated contrast and scale it to ∇θL (float64)."""
    acc = dev.read_accumulators()
    if clear:
        dev.clear_accumulators()
    return dev.config.gradients_from_accumulators(acc, eps, centred=(estimator == "centred"))


def config_for(n: int, m: int, k: int, o: int, t: int, dt: float, base: HelConfig | None = None) -> HelConfig:
    """The default configuration resized to a problem's shape (t_max ≥ T)."""
    import math
    base = base or HelConfig()
    t_max = max(base.t_max, 1 << max(0, math.ceil(math.log2(t))))
    return base.replace(n=n, m=m, k=k, o=o, t_max=t_max, dt_log2=int(round(-math.log2(dt))),
                        lanes=min(base.lanes, max(n, m)))
