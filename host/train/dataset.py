"""A training task: a whole data set as arrays, its train/test split and its loss.

:class:`Task` is what every engine trains on (``hel_fpga.host.train.tasks`` builds
the built-in ones and reads user files, ``hel_fpga.host.train.archive`` the
time-series archive's).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

__all__ = ["Task", "TaskError", "INPUT_LIMIT"]

#: Inputs must fit the device's operand format (16-bit, 13 fractional bits: |u| < 4).
INPUT_LIMIT = 3.99


class TaskError(ValueError):
    """A task that cannot be built or a malformed task file (one-line message)."""


@dataclass
class Task:
    """A data set and its loss.

    Attributes
    ----------
    name : task name (or the file's stem for user tasks).
    kind : ``"regression"`` (masked MSE) or ``"classification"`` (final-step CE).
    u : (S, T, K) float inputs.
    split : (S,) int, 0 = train, 1 = test.
    o : number of outputs (the last ``o`` oscillators).
    y, mask : regression targets (S, T, O) and loss steps (S, T) bool.
    labels : classification labels (S,) int in 0..o−1.
    tau : temperature of the cross-entropy (logits = ŷ_T/τ).
    dt : leapfrog step δ.
    defaults : suggested ``oscillators``, ``hidden``, ``epochs``, ``batch``, ``lr``.
    description : one line for the report.
    """

    name: str
    kind: str
    u: np.ndarray
    split: np.ndarray
    o: int
    y: np.ndarray | None = None
    mask: np.ndarray | None = None
    labels: np.ndarray | None = None
    tau: float = 0.1
    dt: float = 1 / 8
    defaults: dict = field(default_factory=dict)
    description: str = ""

    @property
    def k(self) -> int:
        return self.u.shape[2]

    @property
    def t(self) -> int:
        return self.u.shape[1]

    @property
    def train_idx(self) -> np.ndarray:
        return np.flatnonzero(self.split == 0)

    @property
    def test_idx(self) -> np.ndarray:
        return np.flatnonzero(self.split == 1)

    @property
    def classification(self) -> bool:
        return self.kind == "classification"

    @property
    def loss_kind(self) -> str:
        """``"final"`` when every sample's loss sits on one step, else ``"all"``."""
        if self.classification:
            return "final"
        return "final" if int(self.mask.sum(1).max()) <= 1 else "all"

    def loss(self, y_hat: np.ndarray, idx: np.ndarray):
        """Per-sample objective and output gradients for samples ``idx``.

        Returns ``(obj, g, report, correct)``: the objective each sample's
        gradient is taken of (S,), ``g = ∂obj/∂ŷ`` (S, T, O), the reported loss
        (S,) and, for classification, whether the prediction is right (S,) bool
        (else None). Regression: ``obj = Σ_t mask·½‖ŷ − y‖²`` and the report is
        the mean squared error over the loss steps and outputs. Classification:
        ``obj = report = −log softmax(ŷ_T/τ)[label]``.
        """
        y_hat = np.asarray(y_hat, dtype=np.float64)
        if self.classification:
            z = y_hat[:, -1] / self.tau
            z = z - z.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            lab = self.labels[idx]
            obj = -logp[np.arange(len(idx)), lab]
            g = np.zeros_like(y_hat)
            g[:, -1] = (np.exp(logp) - np.eye(self.o)[lab]) / self.tau
            return obj, g, obj, logp.argmax(1) == lab
        m = self.mask[idx][:, :, None]
        r = np.where(m, y_hat - self.y[idx], 0.0)
        obj = 0.5 * np.sum(r * r, axis=(1, 2))
        report = 2 * obj / (np.maximum(self.mask[idx].sum(1), 1) * self.o)
        return obj, r, report, None

    def holdout(self, fraction: float, seed: int = 0) -> "Task":
        """This task with the test split dropped and ``fraction`` of the training
        split held out as a validation split in its place (``split == 1``).

        Classification holds out the same fraction of every class (at least one
        sample of each class with two or more); the choice depends only on
        ``seed``, so every run of a selection sees the same validation split.
        """
        if not 0 < fraction < 1:
            raise TaskError(f"the validation fraction must be in (0, 1), got {fraction}")
        rng = np.random.default_rng(seed)
        train = self.train_idx
        groups = ([train[self.labels[train] == c] for c in range(self.o)] if self.classification
                  else [train])
        held = []
        for g in groups:
            n = int(round(fraction * len(g)))
            n = min(max(n, 1 if len(g) >= 2 else 0), len(g) - 1) if len(g) else 0
            held.extend(rng.permutation(g)[:n])
        if not held:
            raise TaskError(f"task {self.name}: {len(train)} training samples are too few to hold "
                            f"out {fraction:g} of them for validation")
        keep = train  # sorted: the training samples, in their order, some now validation
        split = np.where(np.isin(keep, held), 1, 0)

        def take(a):
            return None if a is None else a[keep]
        return replace(self, u=self.u[keep], split=split, y=take(self.y), mask=take(self.mask),
                       labels=take(self.labels), name=f"{self.name} (validation {fraction:g})",
                       description=f"{self.description}; test split replaced by {len(held)} "
                                   f"validation samples held out of the training split")

    def validate_for_device(self) -> None:
        worst = float(np.abs(self.u).max()) if self.u.size else 0.0
        if worst > INPUT_LIMIT:
            raise TaskError(f"task {self.name}: inputs reach |u| = {worst:.4g}, beyond the "
                            f"device's input range ±{INPUT_LIMIT} (scale them down)")
