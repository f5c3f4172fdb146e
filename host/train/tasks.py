"""Training tasks: seeded data sets that need no download, and user ``.npz`` files.

A :class:`Task` holds the whole data set as arrays (inputs ``u`` S×T×K, one
split flag per sample) plus the loss: masked MSE for regression, cross-entropy
on the final step's outputs ``ŷ_T/τ`` for classification. Each built-in task
fixes its data with its own seed (so ``--seed`` changes the initialisation and
the batch order, never the data) and suggests a model size and schedule.

Built-in tasks
--------------
``oscillators``
    The target-trajectory toy: the network is driven by two input signals
    (sinusoids of random frequency, amplitude and phase per sample) and its
    output oscillator must follow a target curve on every step. The targets
    are the output trajectories of a fixed, strongly nonlinear "teacher"
    network of the same family (8 oscillators, weights scaled up), normalised
    to an RMS of 0.3: reachable in principle, but not by a linear response.
    128 training and 64 test sequences of 64 steps. The default model
    (N = M = 16, K = 2, O = 1) is the simulated board's core, so ``--device
    sim`` and ``--device sim-board`` train the same model.
``sine``
    Sequence-to-sequence regression, sine generation: a constant cue
    ``c ∈ [−1, 1]`` on every step; the output must trace ``0.3·sin(ω t)`` with
    ``ω = 1 + c/2`` (t in model time units, from rest). 128/64 sequences of 64 steps.
``digits``
    scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes),
    read as a sequence: the 8 rows of 8 pixels (scaled to [0, 1]) are fed one
    after the other, each held for 4 steps (T = 32, K = 8). 10 output
    oscillators, cross-entropy on ``ŷ_T/τ`` (τ = 0.1), 80/20 train/test split.

User tasks (``--task PATH.npz``)
--------------------------------
Float arrays ``u`` (S×T×K) and either ``y`` (S×T×O, regression; optional
``mask`` S×T of loss steps, default every step) or ``labels`` (S integers ≥ 0,
classification on the final step; O = max label + 1), and optionally ``split``
(S, 0 = train, 1 = test; default all train). Any malformed file raises
:class:`TaskError` with a one-line message.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from hel_fpga.host.train.dataset import INPUT_LIMIT, Task, TaskError

__all__ = ["Task", "TaskError", "TASKS", "load_task", "DEFAULT_TASK", "INPUT_LIMIT"]

DEFAULT_TASK = "oscillators"


# --------------------------------------------------------------------------- built-in tasks


def _init_like(rng, n, m, k):
    return {"W": rng.normal(0.0, 1.0 / np.sqrt(n), (m, n)), "B": rng.normal(0.0, 0.5, (m, k)),
            "b": rng.normal(0.0, 0.1, m), "alpha": rng.uniform(0.5, 1.5, n)}


def make_oscillators(n_train: int = 128, n_test: int = 64, t: int = 64, seed: int = 6001) -> Task:
    from hel_fpga.host.train import floatpath
    rng = np.random.default_rng(seed)
    s = n_train + n_test
    dt = 1 / 8
    time = np.arange(t) * dt
    w = rng.uniform(0.5, 2.0, (s, 2))
    ph = rng.uniform(0.0, 2 * np.pi, (s, 2))
    amp = rng.uniform(0.2, 0.6, (s, 2))
    u = amp[:, None] * np.sin(w[:, None] * time[None, :, None] + ph[:, None])  # (S, T, 2)
    teacher = _init_like(np.random.default_rng(seed + 1), 8, 8, 2)
    teacher["W"] *= 2.5
    teacher["B"] *= 3.0
    y = floatpath.outputs(teacher, u, dt, 1)
    y *= 0.3 / np.sqrt(np.mean(y * y))
    split = np.r_[np.zeros(n_train, int), np.ones(n_test, int)]
    return Task("oscillators", "regression", u=u, split=split, o=1, y=y, mask=np.ones((s, t), bool),
                dt=dt, defaults=dict(oscillators=16, hidden=16, epochs=10, batch=8, lr=0.02),
                description="driven oscillators follow a teacher network's output trajectory (MSE every step)")


def make_sine(n_train: int = 128, n_test: int = 64, t: int = 64, seed: int = 6002) -> Task:
    rng = np.random.default_rng(seed)
    s = n_train + n_test
    dt = 1 / 8
    c = rng.uniform(-1.0, 1.0, s)
    omega = 1.0 + 0.5 * c
    u = np.repeat(c[:, None, None], t, axis=1)
    y = (0.3 * np.sin(omega[:, None] * (np.arange(1, t + 1) * dt)[None, :]))[..., None]
    split = np.r_[np.zeros(n_train, int), np.ones(n_test, int)]
    return Task("sine", "regression", u=u, split=split, o=1, y=y, mask=np.ones((s, t), bool),
                dt=dt, defaults=dict(oscillators=16, hidden=16, epochs=20, batch=8, lr=0.02),
                description="sine generation: a constant cue sets the frequency of the output sine (MSE every step)")


def make_digits(hold: int = 4, seed: int = 6003) -> Task:
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 (only this task needs it)
    except ImportError:
        raise TaskError("task digits needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    x = d.images.astype(np.float64) / 16.0
    s = len(x)
    u = np.repeat(x, hold, axis=1)  # (S, 8·hold, 8): row r held for `hold` steps
    rng = np.random.default_rng(seed)
    split = np.zeros(s, int)
    split[rng.permutation(s)[: int(round(0.2 * s))]] = 1
    return Task("digits", "classification", u=u, split=split, o=10, labels=d.target.astype(np.int64),
                tau=0.1, dt=1 / 8, defaults=dict(oscillators=16, hidden=16, epochs=10, batch=16, lr=0.02),
                description="scikit-learn digits, 8 rows of 8 pixels as a sequence (cross-entropy on the final step)")


TASKS = {"oscillators": make_oscillators, "sine": make_sine, "digits": make_digits}


# --------------------------------------------------------------------------- user files


def _fail(path, msg):
    raise TaskError(f"{path}: {msg}")


def load_npz_task(path) -> Task:
    """Read and validate a user task file (see the module docstring)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        _fail(path, "no such file")
    except IsADirectoryError:
        _fail(path, "is a directory, not an .npz file")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        _fail(path, f"not a readable .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    unknown = sorted(set(data) - {"u", "y", "mask", "labels", "split"})
    if unknown:
        _fail(path, f"unknown array(s) {', '.join(unknown)} (expected u, y, mask, labels, split)")
    if "u" not in data:
        _fail(path, "missing array u (S×T×K inputs)")
    u = data["u"]
    if u.dtype.kind not in "fiu":
        _fail(path, f"u must be numeric, got dtype {u.dtype}")
    if u.ndim != 3 or min(u.shape) < 1:
        _fail(path, f"u must be 3-D (S×T×K) and non-empty, got shape {u.shape}")
    s, t, _ = u.shape
    u = u.astype(np.float64)
    if not np.all(np.isfinite(u)):
        _fail(path, "u contains NaN or infinity")
    has_y, has_labels = "y" in data, "labels" in data
    if has_y == has_labels:
        _fail(path, "needs exactly one of y (regression) and labels (classification)")
    split = np.zeros(s, int)
    if "split" in data:
        sp = data["split"]
        if sp.shape != (s,):
            _fail(path, f"split has shape {sp.shape}, expected ({s},)")
        if sp.dtype.kind not in "biuf" or not np.all(np.isin(sp, (0, 1))):
            _fail(path, "split must hold only 0 (train) and 1 (test)")
        split = sp.astype(int)
    if not np.any(split == 0):
        _fail(path, "split leaves no training sample")
    name = p.stem
    if has_y:
        y = data["y"]
        if y.dtype.kind not in "fiu":
            _fail(path, f"y must be numeric, got dtype {y.dtype}")
        if y.ndim != 3 or y.shape[:2] != (s, t) or y.shape[2] < 1:
            _fail(path, f"y has shape {y.shape}, expected ({s}, {t}, O)")
        y = y.astype(np.float64)
        if not np.all(np.isfinite(y)):
            _fail(path, "y contains NaN or infinity")
        if "mask" in data:
            mask = data["mask"]
            if mask.shape != (s, t):
                _fail(path, f"mask has shape {mask.shape}, expected ({s}, {t})")
            if mask.dtype.kind not in "biuf" or not np.all(np.isin(mask, (0, 1))):
                _fail(path, "mask must be boolean (0/1)")
            mask = mask.astype(bool)
            if not mask[split == 0].any():
                _fail(path, "mask selects no loss step in the training samples")
        else:
            mask = np.ones((s, t), bool)
        o = y.shape[2]
        return Task(name, "regression", u=u, split=split, o=o, y=y, mask=mask,
                    defaults=dict(oscillators=max(16, o), hidden=16, epochs=10, batch=8, lr=0.01),
                    description=f"user regression data from {path}")
    if "mask" in data:
        _fail(path, "mask applies to regression (y) only; classification uses the final step")
    labels = data["labels"]
    if labels.shape != (s,):
        _fail(path, f"labels has shape {labels.shape}, expected ({s},)")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            _fail(path, f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        _fail(path, "labels must be ≥ 0")
    o = int(labels.max()) + 1
    if o < 2:
        _fail(path, "classification needs at least 2 classes")
    return Task(name, "classification", u=u, split=split, o=o, labels=labels, tau=0.1,
                defaults=dict(oscillators=max(16, o), hidden=16, epochs=10, batch=16, lr=0.02),
                description=f"user classification data from {path}")


def load_task(spec: str) -> Task:
    """A built-in task by name, an archive data set (``aeon:NAME``) or a user task
    from a ``.npz`` path."""
    from hel_fpga.host.train import archive  # noqa: PLC0415 (aeon loads only for archive tasks)
    if spec in TASKS:
        return TASKS[spec]()
    if spec.startswith(archive.AEON_PREFIX):
        return archive.load_aeon_task(spec[len(archive.AEON_PREFIX):])
    if spec.endswith(".npz") or "/" in spec or Path(spec).exists():
        return load_npz_task(spec)
    raise TaskError(f"unknown task {spec!r} (built-in: {', '.join(TASKS)}; aeon:NAME; or a PATH.npz)")

