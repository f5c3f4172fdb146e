"""One HEL learning sample on any :class:`hel_fpga.host.device.Device`.

The host owns the loss: the device runs FORWARD and streams the outputs; the
host turns them into output gradients, quantises ``ν = (δ/2)·ε·∂ℓ/∂ŷ`` into
integer nudges (``HelConfig.nudges``), and the device runs the echo and
accumulates the contrast (docs/design.md §1.3, §2.4). The contrast is read, and
scaled to gradients, once per batch.

:func:`hel_sample` is the one implementation of a sample, and
:func:`read_batch` of the end of a batch: ``hel train`` runs a batch of
samples between two reads, ``hel compare`` one sample, and ``hel bench link``
times each device operation of a sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from hel_fpga.host.device import Device, Status
from hel_fpga.spec.formats import HelConfig

__all__ = ["LossFn", "Sample", "BatchReadout", "masked_mse", "hel_sample", "read_batch",
           "read_gradients", "default_eps", "config_for"]

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


@dataclass(frozen=True)
class Sample:
    """One HEL sample as the host saw it."""

    outputs: np.ndarray     #: FORWARD's outputs, integers (T×O)
    y_hat: np.ndarray       #: the same outputs as floats
    loss: float             #: what ``loss_fn`` returned for them
    nudges: np.ndarray      #: the integer nudge rows ECHO sent, in echo order


#: Runs one device operation of a sample: ``phase(name, op)`` calls ``op()`` and
#: returns its result; ``name`` is ``"LOAD"``, ``"FORWARD"`` or ``"ECHO"``.
Phase = Callable[[str, Callable[[], Any]], Any]


def _run(name: str, op: Callable[[], Any]) -> Any:
    return op()


def hel_sample(dev: Device, u_int: np.ndarray, loss_fn: LossFn, eps: float,
               estimator: str = "centred", *, phase: Phase | None = None) -> Sample:
    """One HEL sample on ``dev``: LOAD, FORWARD, the host's loss and nudges, ECHO.

    ``u_int`` is the input sequence in the operand format (T×K); ``loss_fn``
    maps the float outputs ŷ to (loss, ∂loss/∂ŷ) and ``eps`` scales the nudges.
    The contrast accumulates on the device until :func:`read_batch`.

    When every nudge row after the first is zero (a loss on the final step only)
    ECHO gets that one row: a single kick after the flip, which the device
    treats exactly like T rows of which T−1 are zero, for 1/T of the bytes.

    ``phase`` wraps each device operation (e.g. to time it); by default each
    simply runs.
    """
    cfg = dev.config
    run = phase or _run
    run("LOAD", lambda: dev.load(u_int))
    outputs = run("FORWARD", lambda: dev.forward(estimator))
    y_hat = cfg.outputs_to_float(outputs)
    loss, g = loss_fn(y_hat)
    nudges = cfg.nudges(g, eps)
    if not nudges[1:].any():
        nudges = nudges[:1]
    run("ECHO", lambda: dev.echo(nudges))
    return Sample(outputs, y_hat, loss, nudges)


@dataclass(frozen=True)
class BatchReadout:
    """The end of a batch: what the device accumulated over its samples."""

    status: Status                          #: overflow flags raised during the batch
    acc: dict[str, np.ndarray]              #: the raw accumulators, by parameter
    gradients: dict[str, np.ndarray]        #: ``acc`` scaled to ∇θL (float64)


def read_batch(dev: Device, eps: float, estimator: str = "centred") -> BatchReadout:
    """STATUS, READ_ACC, CLEAR_ACC, and CLEAR_FLAGS if a flag was raised: the device
    is ready for the next batch, and the readout says whether this one overflowed."""
    status = dev.status()
    acc = dev.read_accumulators()
    dev.clear_accumulators()
    if status.state_overflow or status.acc_overflow:
        dev.clear_flags()
    grads = dev.config.gradients_from_accumulators(acc, eps, centred=(estimator == "centred"))
    return BatchReadout(status, acc, grads)


def read_gradients(dev: Device, eps: float, estimator: str = "centred") -> dict[str, np.ndarray]:
    """The gradients of :func:`read_batch` alone."""
    return read_batch(dev, eps, estimator).gradients


def config_for(n: int, m: int, k: int, o: int, t: int, dt: float, base: HelConfig | None = None) -> HelConfig:
    """The default configuration resized to a problem's shape (t_max ≥ T)."""
    import math
    base = base or HelConfig()
    t_max = max(base.t_max, 1 << max(0, math.ceil(math.log2(t))))
    return base.replace(n=n, m=m, k=k, o=o, t_max=t_max, dt_log2=int(round(-math.log2(dt))),
                        lanes=min(base.lanes, max(n, m)))
