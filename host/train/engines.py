"""The three ways a batch's gradient is obtained: float BPTT, float RHEL, HEL on a device.

Every engine trains the same model (docs/design.md §1) with the same loss and
the same batches; only the gradient differs:

* ``bptt`` — exact float64 backpropagation through time (the CPU baseline);
* ``rhel-float`` — float64 RHEL echoes (what HEL computes, without quantisation);
* ``hel`` — the hardware flow on a :class:`hel_fpga.host.device.Device`: per sample
  :func:`hel_fpga.host.learning.hel_sample` (LOAD, FORWARD, host loss and nudges,
  ECHO), per batch :func:`hel_fpga.host.learning.read_batch`. Inference
  (``predict``) is FORWARD only, on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from hel_fpga.host.device import Device
from hel_fpga.host.learning import DEFAULT_EPS, hel_sample, read_batch
from hel_fpga.host.train import floatpath
from hel_fpga.host.train.tasks import Task
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.names import PARAM_NAMES

__all__ = ["ALGORITHMS", "BatchResult", "FloatEngine", "DeviceEngine", "default_eps_for"]

ALGORITHMS = ("hel", "bptt", "rhel-float")

#: ε for a cross-entropy on ŷ_T/τ: its output gradient is up to 1/τ = 10 times
#: larger than the MSE gradients the DEFAULT_EPS of hel_fpga.host.learning are
#: chosen for, so the same nudge size needs a smaller ε (measured on the digits
#: task: see docs/train.md).
CLASSIFICATION_EPS = {"centred": 0.03, "one-sided": 0.01}


def default_eps_for(task: Task, estimator: str) -> float:
    if task.classification:
        return CLASSIFICATION_EPS[estimator]
    return DEFAULT_EPS[(estimator, task.loss_kind)]


@dataclass
class BatchResult:
    """One batch: per-sample objective, reported loss and correctness, the mean
    gradient over the batch, and whether the device raised an overflow flag."""

    obj: np.ndarray
    report: np.ndarray
    correct: np.ndarray | None
    grads: dict[str, np.ndarray]
    overflow: bool = False


class FloatEngine:
    """Float64 training on the CPU, a whole batch at once."""

    def __init__(self, task: Task, algorithm: str, eps: float, estimator: str, chunk: int = 512):
        if algorithm not in ("bptt", "rhel-float"):
            raise ValueError(f"not a float algorithm: {algorithm}")
        self.task, self.algorithm, self.eps, self.estimator, self.chunk = task, algorithm, eps, estimator, chunk
        self.params = None

    def write(self, params) -> None:
        self.params = {k: np.array(params[k], dtype=np.float64) for k in PARAM_NAMES}

    def train_batch(self, idx, on_sample: Callable[[int], None] | None = None) -> BatchResult:
        t = self.task
        u = t.u[idx]
        traj = floatpath.forward(self.params, u, t.dt)
        obj, g, report, correct = t.loss(traj.outputs(t.o), idx)
        if self.algorithm == "bptt":
            grads = floatpath.bptt_grads(self.params, u, t.dt, traj, g)
        else:
            grads = floatpath.rhel_grads(self.params, u, t.dt, traj, g, self.eps, self.estimator)
        if on_sample:
            on_sample(len(idx))
        return BatchResult(obj, report, correct, {k: v / len(idx) for k, v in grads.items()})

    def predict(self, idx) -> np.ndarray:
        t = self.task
        parts = [floatpath.outputs(self.params, t.u[idx[i:i + self.chunk]], t.dt, t.o)
                 for i in range(0, len(idx), self.chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, t.t, t.o))

    def close(self) -> None:
        pass


class DeviceEngine:
    """HEL through a :class:`Device`: the integer arithmetic of the hardware."""

    algorithm = "hel"

    def __init__(self, task: Task, dev: Device, eps: float, estimator: str):
        self.task, self.dev, self.eps, self.estimator = task, dev, eps, estimator
        self.cfg: HelConfig = dev.config
        self.u_int = np.stack([self.cfg.quantize_inputs(x) for x in task.u])
        self.params_int = None

    def write(self, params) -> None:
        self.params_int = self.cfg.quantize_params(params)
        self.dev.write_params(self.params_int)

    def start(self) -> None:
        """Put the device in a known state before the first batch."""
        self.dev.clear_accumulators()
        self.dev.clear_flags()

    def train_batch(self, idx, on_sample: Callable[[int], None] | None = None) -> BatchResult:
        t = self.task
        objs, reports, corrects = [], [], []
        for i in idx:
            def loss_fn(y_hat, i=i):
                obj, g, report, correct = t.loss(y_hat[None], np.array([i]))
                reports.append(report[0])
                if correct is not None:
                    corrects.append(correct[0])
                return obj[0], g[0]
            objs.append(hel_sample(self.dev, self.u_int[i], loss_fn, self.eps, self.estimator).loss)
            if on_sample:
                on_sample(1)
        batch = read_batch(self.dev, self.eps, self.estimator)
        overflow = batch.status.state_overflow or batch.status.acc_overflow
        return BatchResult(np.array(objs), np.array(reports),
                           np.array(corrects) if t.classification else None,
                           {k: v / len(idx) for k, v in batch.gradients.items()}, overflow)

    def predict(self, idx) -> np.ndarray:
        out = np.empty((len(idx), self.task.t, self.task.o))
        for j, i in enumerate(idx):
            self.dev.load(self.u_int[i])
            # The centred FORWARD leaves the accumulators alone (one-sided would not).
            out[j] = self.cfg.outputs_to_float(self.dev.forward("centred"))
        return out

    def close(self) -> None:
        self.dev.close()
