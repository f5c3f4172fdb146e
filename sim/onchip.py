"""The golden model of on-chip training: the bit-exact loop the gateware will run.

The device holds a training set (and optionally a test set) in a
:class:`SampleStore`, forms the loss and the nudges from FORWARD's outputs,
runs the centred echo, accumulates B samples' contrasts in the core's
accumulators, and then steps an optimiser on integer master weights and
re-quantises them into the core's parameter memories. Per epoch it reports an
integer loss sum, a correct count (classification) and the batches skipped
after an overflow flag; EVAL runs a stored set forward only and reports the
same. docs/onchip.md is the prose for the gateware engineer; the formats and
hyperparameters are :mod:`hel_fpga.spec.training`.

The core itself is :class:`hel_fpga.sim.golden.GoldenCore`, unchanged: this
model only drives it through the operations the gateware already has (write
parameters, load, forward, echo, read and clear accumulators, flags), so the
on-chip loop adds a controller around the core, not a second datapath.

Order of operations for one sample ``i`` (training)
---------------------------------------------------
1. LOAD ``u_i`` from the store; FORWARD (centred: no accumulation).
2. At each forward step t, with ``D = Ŷ_t − (Y_t ≪ (SF − OF))`` (state units):
   the nudge row ``T−1−t`` of the T×O buffer gets ``mask_t · rshift_round(D, sn)``,
   ``sn = dt_log2 + 1 + eps_log2``; the loss sum gets ``mask_t · Σ_o e²`` with
   ``e = sat(rshift_round(D, SF − OF), OW)``. For classification the mask is
   the last step only and Y is the one-hot target of the label; the sample is
   correct when the first largest of ``Ŷ_{T−1}`` is the label.
3. ECHO with the buffer (echo order); the core adds ``G(+ε) − G(−ε)`` per step.

After every B = 2^batch_log2 samples (and after the last, possibly partial,
batch of an epoch): if a flag was raised the update is skipped and counted;
otherwise ``g = sat(rshift_round(−acc, s_p))`` per parameter array
(:meth:`TrainFormats.grad_shift`: −δ/(2ε), 1/B and the accumulator's scale in
one shift), one optimiser step (:func:`sgdm_step`, :func:`lion_step`), and the
re-quantised master weights are written to the core. Then the accumulators
and flags are cleared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hel_fpga.sim.golden import GoldenCore
from hel_fpga.spec.formats import HelConfig, rshift_round, saturate
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.training import (
    LOSS_SUM_WIDTH, StoreLayout, TrainConfig, TrainFormats, TrainingError, epoch_order, lr_shift_at,
    unpack_setup)

__all__ = ["SampleStore", "Metrics", "OnChipTrainer", "TrainingUnit", "shift_saturate", "gradient_from_acc",
           "sgdm_step", "lion_step", "requantize", "clamp_master", "master_from_float",
           "sample_nudges"]


# --------------------------------------------------------------------------- integer helpers

def shift_saturate(x: np.ndarray, shift: int, width: int) -> np.ndarray:
    """``sat(rshift_round(x, shift), width)``; a negative shift is an exact left shift
    whose result saturates as if computed without overflow."""
    x = np.asarray(x, dtype=np.int64)
    if shift >= 0:
        return saturate(rshift_round(x, shift), width)
    k = -shift
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    return np.where(x > (hi >> k), hi, np.where(x < (lo >> k), lo, x << k))


def clamp_master(x: np.ndarray, fm: TrainFormats) -> np.ndarray:
    """Saturate master weights to the parameters' range in master units (never wrap)."""
    m = fm.master
    return np.clip(x, m.min_int, m.max_int)


def requantize(master: np.ndarray, fm: TrainFormats) -> np.ndarray:
    """Master weights → the core's parameter format: round half up, then saturate."""
    return saturate(rshift_round(np.asarray(master, dtype=np.int64), fm.master_extra),
                    fm.cfg.operand_width)


def master_from_float(params, fm: TrainFormats) -> dict[str, np.ndarray]:
    """Float parameters (e.g. the host's initialisation) → master weights, rounded
    to nearest and saturated to the parameter range (the host's clip)."""
    m = fm.master
    return {k: clamp_master(np.rint(np.asarray(params[k], dtype=np.float64) * m.scale)
                            .astype(np.int64), fm) for k in PARAM_NAMES}


def gradient_from_acc(acc, fm: TrainFormats, tc: TrainConfig) -> dict[str, np.ndarray]:
    """The batch's mean gradient in master units from the raw accumulators.

    ``g_p = sat(rshift_round(−acc_p, s_p), moment width)``: the minus sign and
    −δ/(2ε)·scale_p/B are one shift, because ε, δ, B and the scales are powers
    of two. Equal to ``HelConfig.gradients_from_accumulators(acc)/B · 2^MF`` up to
    the rounding of the shift.
    """
    w = fm.moment.width
    return {k: shift_saturate(-np.asarray(acc[k], dtype=np.int64),
                              fm.grad_shift(k, tc.eps_log2, tc.batch_log2), w)
            for k in PARAM_NAMES}


def _ema(m: np.ndarray, g: np.ndarray, beta_log2: int) -> np.ndarray:
    """β·m + (1 − β)·g with β = 1 − 2^−beta_log2: m + rshift_round(g − m, beta_log2)."""
    return m + rshift_round(g - m, beta_log2)


def sgdm_step(master: np.ndarray, moment: np.ndarray, g: np.ndarray, lr_shift: int,
              beta_log2: int, fm: TrainFormats) -> tuple[np.ndarray, np.ndarray]:
    """SGD with EMA momentum, in integers (all three arrays in master units)::

        m ← sat(m + rshift_round(g − m, beta_log2))
        θ ← clamp(θ − rshift_round(m, lr_shift))

    The EMA form keeps m at the gradient's scale (no 1/(1−β) growth), so the
    moment needs no more integer bits than a gradient.
    """
    m = saturate(_ema(moment, g, beta_log2), fm.moment.width)
    return clamp_master(master - rshift_round(m, lr_shift), fm), m


def lion_step(master: np.ndarray, moment: np.ndarray, g: np.ndarray, lr_shift: int,
              beta1_log2: int, beta2_log2: int, fm: TrainFormats) -> tuple[np.ndarray, np.ndarray]:
    """Lion (Chen et al. 2023) without weight decay, in integers::

        c ← m + rshift_round(g − m, beta1_log2)          interpolation, β1
        θ ← clamp(θ − sign(c) · 2^(MF − lr_shift))        every step is ±lr or 0
        m ← m + rshift_round(g − m, beta2_log2)          momentum, β2

    The update's size is the learning rate itself, so the gradient's scale
    (ε, B, δ) cancels, and sign(c) is the sign bit and a zero test.
    """
    c = _ema(moment, g, beta1_log2)
    step = np.sign(c) << (fm.master.frac - lr_shift)
    m = saturate(_ema(moment, g, beta2_log2), fm.moment.width)
    return clamp_master(master - step, fm), m


# --------------------------------------------------------------------------- the store

@dataclass(frozen=True)
class SampleStore:
    """A data set in device memory: inputs and targets, integers.

    ``inputs`` (S, T, K) in the operand format; for ``mse`` ``targets`` (S, T, O)
    in the target format and ``mask`` (S, T) of loss steps; for ``onehot``
    ``labels`` (S,) in 0..O−1 (the loss step is the last). Build one with
    :meth:`regression` or :meth:`classification`, which check it against the
    core and raise :class:`TrainingError` (a ValueError) with one line.
    """

    kind: str
    inputs: np.ndarray
    targets: np.ndarray | None = None
    mask: np.ndarray | None = None
    labels: np.ndarray | None = None

    @property
    def count(self) -> int:
        return self.inputs.shape[0]

    @property
    def steps(self) -> int:
        return self.inputs.shape[1]

    @staticmethod
    def _check_inputs(cfg: HelConfig, u) -> np.ndarray:
        u = np.asarray(u)
        if u.ndim != 3 or u.shape[0] < 1:
            raise TrainingError(f"inputs must have shape (S, T, {cfg.k}) with S ≥ 1, got {u.shape}")
        s, t, k = u.shape
        if k != cfg.k:
            raise TrainingError(f"inputs have {k} channels, the core has K = {cfg.k}")
        if not 1 <= t <= cfg.t_max:
            raise TrainingError(f"sequence length T = {t} is outside 1..t_max = {cfg.t_max}")
        if u.dtype.kind not in "iu":
            raise TrainingError(f"inputs must be integers, got dtype {u.dtype}")
        f = cfg.operand
        if u.size and (u.min() < f.min_int or u.max() > f.max_int):
            raise TrainingError(f"inputs out of range for the {f.width}-bit operand format")
        return u.astype(np.int64)

    @classmethod
    def regression(cls, cfg: HelConfig, inputs, targets, mask=None) -> "SampleStore":
        u = cls._check_inputs(cfg, inputs)
        s, t, _ = u.shape
        y = np.asarray(targets)
        if y.shape != (s, t, cfg.o):
            raise TrainingError(f"targets have shape {y.shape}, expected ({s}, {t}, {cfg.o})")
        if y.dtype.kind not in "iu":
            raise TrainingError(f"targets must be integers, got dtype {y.dtype}")
        f = TrainFormats(cfg).target
        if y.min() < f.min_int or y.max() > f.max_int:
            raise TrainingError(f"targets out of range for the {f.width}-bit target format "
                                f"[{f.min_int}, {f.max_int}]")
        if mask is None:
            mk = np.ones((s, t), dtype=bool)
        else:
            mk = np.asarray(mask)
            if mk.shape != (s, t):
                raise TrainingError(f"mask has shape {mk.shape}, expected ({s}, {t})")
            if not np.all(np.isin(mk, (0, 1))):
                raise TrainingError("mask must hold only 0 and 1")
            mk = mk.astype(bool)
        return cls("mse", u, targets=y.astype(np.int64), mask=mk)

    @classmethod
    def classification(cls, cfg: HelConfig, inputs, labels) -> "SampleStore":
        u = cls._check_inputs(cfg, inputs)
        s = u.shape[0]
        if cfg.o < 2:
            raise TrainingError(f"classification needs at least 2 outputs, the core has O = {cfg.o}")
        lab = np.asarray(labels)
        if lab.shape != (s,):
            raise TrainingError(f"labels have shape {lab.shape}, expected ({s},)")
        if lab.dtype.kind not in "iu":
            raise TrainingError(f"labels must be integers, got dtype {lab.dtype}")
        if lab.min() < 0 or lab.max() >= cfg.o:
            raise TrainingError(f"labels must be in 0..{cfg.o - 1}, got {int(lab.min())}..{int(lab.max())}")
        return cls("onehot", u, labels=lab.astype(np.int64))

    @classmethod
    def from_image(cls, cfg: HelConfig, image, layout: StoreLayout, test: bool) -> "SampleStore":
        """The training (or test) set as the device reads it from its store image
        (operand words, :class:`hel_fpga.spec.training.StoreLayout`): mask words count
        when non-zero, label words are read unsigned (one outside 0..O−1 is no
        output's target). No range check: the device takes what was written."""
        count = layout.test_count if test else layout.train_count
        t, k, o = layout.steps, cfg.k, cfg.o
        base = layout.base(test, 0)
        recs = np.asarray(image[base:base + count * layout.record], dtype=np.int64)
        recs = recs.reshape(count, layout.record)
        u = recs[:, :t * k].reshape(count, t, k)
        if layout.loss == "onehot":
            labels = recs[:, t * k] & ((1 << cfg.operand_width) - 1)
            return cls("onehot", u, labels=labels)
        y = recs[:, t * k:t * (k + o)].reshape(count, t, o)
        mask = recs[:, t * (k + o):] != 0
        return cls("mse", u, targets=y, mask=mask)

    def image(self, cfg: HelConfig) -> np.ndarray:
        """This set's records as store words (:class:`hel_fpga.spec.training.StoreLayout`)."""
        s = self.count
        parts = [self.inputs.reshape(s, -1)]
        if self.kind == "onehot":
            parts.append(self.labels.reshape(s, 1))
        else:
            parts += [self.targets.reshape(s, -1), self.mask.reshape(s, -1).astype(np.int64)]
        return np.concatenate(parts, axis=1).ravel()

    def loss_elements(self, cfg: HelConfig) -> int:
        """Squared errors one pass over the store sums (Σ mask · O, or S · O)."""
        if self.kind == "onehot":
            return self.count * cfg.o
        return int(self.mask.sum()) * cfg.o

    def sample_targets(self, cfg: HelConfig, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i's targets (T, O, target format) and loss mask (T,)."""
        if self.kind == "mse":
            return self.targets[i], self.mask[i]
        fm = TrainFormats(cfg)
        y = np.zeros((self.steps, cfg.o), dtype=np.int64)
        if 0 <= self.labels[i] < cfg.o:        # a label out of range is no output's target
            y[-1, self.labels[i]] = fm.onehot_on()
        mask = np.zeros(self.steps, dtype=bool)
        mask[-1] = True
        return y, mask


def sample_nudges(cfg: HelConfig, outputs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                  eps_log2: int) -> tuple[np.ndarray, int]:
    """The nudges (T, O, echo order) and the sum of squared errors of one sample.

    ``outputs`` are FORWARD's (T, O) state-format integers, ``targets`` (T, O) in
    the target format, ``mask`` (T,) the loss steps.
    """
    fm = TrainFormats(cfg)
    d = np.asarray(outputs, dtype=np.int64) - (np.asarray(targets, dtype=np.int64) << fm.target_shift)
    d = np.where(np.asarray(mask, dtype=bool)[:, None], d, 0)
    nu = rshift_round(d, fm.nudge_shift(eps_log2))[::-1].copy()
    e = saturate(rshift_round(d, fm.error_shift), fm.error.width)
    return nu, int(np.sum(e * e))


@dataclass
class Metrics:
    """What one pass over a store reports (integers; floats only in the properties).

    ``loss_sum`` is Σ e² in ``2·OF`` fractional bits, saturated at
    ``LOSS_SUM_WIDTH`` bits; ``loss_elements`` the number of squared errors in
    it; ``correct`` the correct count (classification, else None);
    ``overflow_batches`` the updates skipped after an overflow flag (training).
    """

    samples: int
    loss_sum: int
    loss_elements: int
    loss_frac: int
    correct: int | None = None
    overflow_batches: int = 0

    @property
    def mse(self) -> float:
        return self.loss_sum / (self.loss_elements * 2.0 ** self.loss_frac)

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.samples


# --------------------------------------------------------------------------- the trainer

class OnChipTrainer:
    """On-chip HEL training around one :class:`GoldenCore`.

    Parameters
    ----------
    cfg, tc:
        The core's configuration and the run's hyperparameters.
    train:
        The training set (its kind must be ``tc.loss``).
    master:
        Initial master weights (integers, master format), by parameter name.
    core:
        Drive this core as it is (a device's: :class:`TrainingUnit`) instead of a
        fresh one loaded with the re-quantised master weights.
    """

    def __init__(self, cfg: HelConfig, tc: TrainConfig, train: SampleStore,
                 master: dict[str, np.ndarray], *, core: GoldenCore | None = None):
        tc.check_for(cfg)
        if train.kind != tc.loss:
            raise TrainingError(f"the training set is for loss {train.kind!r}, the run uses {tc.loss!r}")
        self.cfg, self.tc, self.train = cfg, tc, train
        self.fm = TrainFormats(cfg)
        shapes = cfg.param_shapes()
        self.master = {}
        for k in PARAM_NAMES:
            if k not in master:
                raise TrainingError(f"master weight {k} is missing")
            a = np.asarray(master[k])
            if a.shape != shapes[k]:
                raise TrainingError(f"master weight {k} has shape {a.shape}, expected {shapes[k]}")
            if a.dtype.kind not in "iu":
                raise TrainingError(f"master weight {k} must be integers, got dtype {a.dtype}")
            self.master[k] = clamp_master(a.astype(np.int64), self.fm)
        self.moment = {k: np.zeros(shapes[k], dtype=np.int64) for k in PARAM_NAMES}
        self.epoch = 0
        if core is not None:        # a device's core: its parameters are the device's
            self.core = core
            return
        self.core = GoldenCore(cfg)
        self._write_params()
        self.core.clear_accumulators()
        self.core.clear_flags()

    # ---- pieces (each is one step of docs/onchip.md) -------------------------------------
    def params(self) -> dict[str, np.ndarray]:
        """The core's parameters: the re-quantised master weights."""
        return {k: requantize(self.master[k], self.fm) for k in PARAM_NAMES}

    def _write_params(self) -> None:
        self.core.write_params(**self.params())

    def forward_sample(self, store: SampleStore, i: int) -> tuple[np.ndarray, np.ndarray, int, bool | None]:
        """LOAD and FORWARD sample ``i``: (outputs, nudges, squared-error sum, correct)."""
        self.core.load(store.inputs[i])
        out = self.core.forward("centred")
        y, mask = store.sample_targets(self.cfg, i)
        nu, sq = sample_nudges(self.cfg, out, y, mask, self.tc.eps_log2)
        correct = None
        if store.kind == "onehot":
            correct = bool(int(np.argmax(out[-1])) == int(store.labels[i]))
        return out, nu, sq, correct

    def train_sample(self, i: int) -> tuple[int, bool | None]:
        """One training sample: FORWARD, nudges, centred ECHO (contrast accumulates)."""
        _, nu, sq, correct = self.forward_sample(self.train, i)
        self.core.echo(nu)
        return sq, correct

    def end_batch(self, lr_shift: int) -> bool:
        """Optimiser step from the accumulators unless a flag rose; clear. True if stepped."""
        c = self.core
        overflow = c.state_overflow or c.acc_overflow
        if not overflow:
            g = gradient_from_acc(c.read_accumulators(), self.fm, self.tc)
            self.step(g, lr_shift)
        c.clear_accumulators()
        c.clear_flags()
        return not overflow

    def step(self, g: dict[str, np.ndarray], lr_shift: int) -> None:
        """One optimiser step on every parameter array, then re-quantise and write."""
        tc = self.tc
        for k in PARAM_NAMES:
            if tc.optimizer == "sgdm":
                self.master[k], self.moment[k] = sgdm_step(
                    self.master[k], self.moment[k], g[k], lr_shift, tc.beta_log2, self.fm)
            else:
                self.master[k], self.moment[k] = lion_step(
                    self.master[k], self.moment[k], g[k], lr_shift, tc.beta_log2,
                    tc.beta2_log2, self.fm)
        self._write_params()

    # ---- passes ---------------------------------------------------------------------------
    def train_epoch(self) -> Metrics:
        """One epoch over the training set in this epoch's order; returns its running metrics."""
        tc, st = self.tc, self.train
        order = epoch_order(st.count, tc.seed, self.epoch)
        lr_shift = lr_shift_at(tc, self.epoch)
        loss, correct, skipped, in_batch = 0, 0, 0, 0
        for i in order:
            sq, ok = self.train_sample(i)
            loss += sq
            correct += bool(ok)
            in_batch += 1
            if in_batch == tc.batch:
                skipped += not self.end_batch(lr_shift)
                in_batch = 0
        if in_batch:
            skipped += not self.end_batch(lr_shift)
        self.epoch += 1
        return Metrics(st.count, min(loss, (1 << (LOSS_SUM_WIDTH - 1)) - 1),
                       st.loss_elements(self.cfg), self.fm.loss_frac,
                       correct if st.kind == "onehot" else None, skipped)

    def evaluate(self, store: SampleStore) -> Metrics:
        """EVAL: every sample of ``store`` forward only (no echo, no accumulation)."""
        if store.kind != self.tc.loss:
            raise TrainingError(f"the set is for loss {store.kind!r}, the run uses {self.tc.loss!r}")
        if store.inputs.shape[2] != self.cfg.k or store.steps > self.cfg.t_max:
            raise TrainingError(f"the set's samples ({store.steps}×{store.inputs.shape[2]}) do not "
                                f"fit the core (t_max = {self.cfg.t_max}, K = {self.cfg.k})")
        loss, correct = 0, 0
        for i in range(store.count):
            _, _, sq, ok = self.forward_sample(store, i)
            loss += sq
            correct += bool(ok)
        return Metrics(store.count, min(loss, (1 << (LOSS_SUM_WIDTH - 1)) - 1),
                       store.loss_elements(self.cfg), self.fm.loss_frac,
                       correct if store.kind == "onehot" else None)

    def fit(self, test: SampleStore | None = None) -> list[tuple[Metrics, Metrics | None]]:
        """The remaining epochs of the run: per epoch (train metrics, test metrics or None)."""
        rows = []
        while self.epoch < self.tc.epochs:
            tr = self.train_epoch()
            rows.append((tr, self.evaluate(test) if test is not None else None))
        return rows

    # ---- checkpoint state -------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray | int]:
        """Everything a resumed run needs: master weights, moments, the epoch counter."""
        out: dict = {f"master_{k}": self.master[k].copy() for k in PARAM_NAMES}
        out.update({f"moment_{k}": self.moment[k].copy() for k in PARAM_NAMES})
        out["epoch"] = self.epoch
        return out

    def load_state(self, state) -> None:
        for k in PARAM_NAMES:
            self.master[k] = clamp_master(np.asarray(state[f"master_{k}"], dtype=np.int64), self.fm)
            self.moment[k] = saturate(np.asarray(state[f"moment_{k}"], dtype=np.int64),
                                      self.fm.moment.width)
        self.epoch = int(state["epoch"])
        self._write_params()


# --------------------------------------------------------------------------- the device's unit

class TrainingUnit:
    """The device's on-chip training unit beside a :class:`GoldenCore`, command by command.

    This is what the protocol commands of docs/protocol.md (TRAIN_SETUP, STORE,
    WRITE_MASTER, READ_MASTER, TRAIN, EVAL, METRICS) act on: the store of
    ``cfg.store_words`` operand words, the master weights and moments, the
    latched setup and the last pass's metrics. A pass is the same loop as
    :class:`OnChipTrainer` (which it drives on the shared core), with the device's
    extras: TRAIN starts by clearing the core's accumulators and flags, and the
    store is read as written (:meth:`SampleStore.from_image`).

    :meth:`reset` is the device's RESET: the setup and the metrics are
    forgotten, the memories (store, master weights, moments) keep their contents.
    """

    def __init__(self, cfg: HelConfig, core: GoldenCore):
        if cfg.store_words < 1:
            raise TrainingError("this configuration has no on-chip training (store_words = 0)")
        self.cfg, self.core = cfg, core
        self.fm = TrainFormats(cfg)
        shapes = cfg.param_shapes()
        self.store = np.zeros(cfg.store_words, dtype=np.int64)
        self.master = {k: np.zeros(shapes[k], dtype=np.int64) for k in PARAM_NAMES}
        self.moment = {k: np.zeros(shapes[k], dtype=np.int64) for k in PARAM_NAMES}
        self.reset()

    def reset(self) -> None:
        self.setup: tuple[TrainConfig, StoreLayout] | None = None
        self.running = 0                        # spec.protocol.Pass of the pass in progress
        self.metrics = (0, 0, 0, 0)             # samples, loss sum, correct, skipped

    def attach(self, core: GoldenCore) -> None:
        self.core = core

    def write_setup(self, words) -> None:
        """TRAIN_SETUP: latch the words; a setup the device refuses leaves none."""
        try:
            self.setup = unpack_setup(self.cfg, words)
        except TrainingError:
            self.setup = None

    def write_store(self, start: int, words) -> None:
        words = np.asarray(words, dtype=np.int64)
        if start < 0 or start + len(words) > self.cfg.store_words:
            raise TrainingError(f"store words {start}..{start + len(words) - 1} are outside "
                                f"0..{self.cfg.store_words - 1}")
        self.store[start:start + len(words)] = words

    def _split(self, words) -> dict[str, np.ndarray]:
        shapes, out, pos = self.cfg.param_shapes(), {}, 0
        words = np.asarray(words, dtype=np.int64)
        for k in PARAM_NAMES:
            size = int(np.prod(shapes[k]))
            out[k] = words[pos:pos + size].reshape(shapes[k])
            pos += size
        return out

    def write_master(self, which: int, words) -> None:
        """WRITE_MASTER: master weights (clamped; the core gets their re-quantised copy)
        or moments (saturated), in PARAM_NAMES order."""
        arrays = self._split(words)
        if which == 0:
            self.master = {k: clamp_master(v, self.fm) for k, v in arrays.items()}
            self.core.write_params(**{k: requantize(v, self.fm) for k, v in self.master.items()})
        else:
            self.moment = {k: saturate(v, self.fm.moment.width) for k, v in arrays.items()}

    def read_master(self, which: int) -> np.ndarray:
        src = self.master if which == 0 else self.moment
        return np.concatenate([src[k].ravel() for k in PARAM_NAMES])

    def _trainer(self, store: SampleStore) -> OnChipTrainer:
        t = OnChipTrainer(self.cfg, self.setup[0], store, self.master, core=self.core)
        t.master, t.moment = self.master, self.moment     # exactly as stored (no clamp)
        return t

    def _store(self, test: bool) -> SampleStore:
        return SampleStore.from_image(self.cfg, self.store, self.setup[1], test)

    def train(self, epoch: int) -> Metrics:
        """TRAIN: one epoch of the latched setup (``TrainingError`` without one)."""
        if self.setup is None:
            raise TrainingError("no training setup")
        t = self._trainer(self._store(False))
        t.epoch = epoch
        self.core.clear_accumulators()
        self.core.clear_flags()
        m = t.train_epoch()
        self.master, self.moment = t.master, t.moment
        self.metrics = (m.samples, m.loss_sum, m.correct or 0, m.overflow_batches)
        return m

    def evaluate(self, test: bool) -> Metrics:
        """EVAL: the training or the test set, forward only."""
        if self.setup is None:
            raise TrainingError("no training setup")
        _, layout = self.setup
        if test and layout.test_count == 0:
            self.metrics = (0, 0, 0, 0)
            return Metrics(0, 0, 0, self.fm.loss_frac, 0 if layout.loss == "onehot" else None)
        m = self._trainer(self._store(False)).evaluate(self._store(test))
        self.metrics = (m.samples, m.loss_sum, m.correct or 0, 0)
        return m
