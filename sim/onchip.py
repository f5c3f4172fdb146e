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

Sample engines
--------------
With ``cfg.engines`` = C > 1 the loop drives C cores (engines) that hold the
same parameters (every parameter write goes to all of them), each with its own
state, flags and accumulators. In a TRAIN pass the i-th sample of the current
batch (0-based, restarting at every batch end) runs on engine ``i mod C``; in an
EVAL pass the j-th sample of the pass runs on engine ``j mod C``. At a batch end
the update is skipped if any engine's flag rose or if an element of the exact
integer sum of the C accumulators lies outside the signed ``acc_width`` range
(:func:`sum_accumulators`); otherwise that sum is the batch's accumulator.
Without a wrap the sum is the one core's sequential accumulation, so a run
without overflow is bit-identical for every C.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hel_fpga.sim.golden import GoldenCore
from hel_fpga.spec.formats import HelConfig, rshift_round, saturate
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.protocol import Pass
from hel_fpga.spec.training import (
    LOSS_SUM_WIDTH, StoreLayout, TrainConfig, TrainFormats, TrainingError, epoch_order, lr_shift_at,
    unpack_setup)

__all__ = ["SampleStore", "Metrics", "OnChipTrainer", "PassRunner", "TrainingUnit", "shift_saturate", "gradient_from_acc",
           "sum_accumulators", "engine_cores",
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


_LO32 = (1 << 32) - 1


def sum_accumulators(accs, acc_width: int) -> dict[str, np.ndarray] | None:
    """The exact element-wise sum of several cores' accumulators, or None when an
    element of it lies outside the signed ``acc_width`` range.

    ``accs`` are :meth:`GoldenCore.read_accumulators` dicts (each element in the
    signed ``acc_width``-bit range, ``acc_width`` ≤ 63). The sum of up to 16 of
    them needs up to 67 bits, so each element is split into its high (arithmetic
    ≫ 32) and low 32 bits, the halves are summed separately in int64, and the
    range test compares (high, low) pairs; a sum in range fits int64.
    """
    lo_b, hi_b = -(1 << (acc_width - 1)), (1 << (acc_width - 1)) - 1
    out = {}
    for k in PARAM_NAMES:
        a = np.stack([np.asarray(acc[k], dtype=np.int64) for acc in accs])
        hi = (a >> 32).sum(axis=0)
        lo = (a & _LO32).sum(axis=0)
        hi += lo >> 32
        lo &= _LO32                         # value = hi·2^32 + lo, 0 ≤ lo < 2^32
        below = (hi < lo_b >> 32) | ((hi == lo_b >> 32) & (lo < (lo_b & _LO32)))
        above = (hi > hi_b >> 32) | ((hi == hi_b >> 32) & (lo > (hi_b & _LO32)))
        if np.any(below | above):
            return None
        out[k] = (hi << 32) + lo
    return out


def engine_cores(cfg: HelConfig, core) -> list[GoldenCore]:
    """A device's ``cfg.engines`` cores from ``core``: a list of them (used as it is),
    or one GoldenCore, which becomes engine 0; the other engines are then fresh
    cores holding engine 0's parameters."""
    if isinstance(core, GoldenCore):
        cores = [core] + [GoldenCore(cfg) for _ in range(cfg.engines - 1)]
        for c in cores[1:]:
            c.write_params(**core.read_params())
        return cores
    cores = list(core)
    if len(cores) != cfg.engines or not all(isinstance(c, GoldenCore) for c in cores):
        raise TrainingError(f"expected {cfg.engines} GoldenCore engine(s), got {len(cores)}")
    return cores


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
    """A data set in device memory: inputs and targets, integers, at the data's own widths.

    ``inputs`` (S, T, k) in the operand format, k ≤ K (the core sees zeros on its
    other inputs); for ``mse`` ``targets`` (S, T, o) in the target format, o ≤ O,
    and ``mask`` (S, T) of loss steps; for ``onehot`` ``labels`` (S,) in
    0..``classes``−1 (the loss step is the last; o = ``classes`` ≤ O). The loss,
    the nudges and the argmax use the first o outputs; the others get zero nudges.
    Build one with :meth:`regression` or :meth:`classification`, which check it
    against the core and raise :class:`TrainingError` (a ValueError) with one line.
    """

    kind: str
    inputs: np.ndarray
    targets: np.ndarray | None = None
    mask: np.ndarray | None = None
    labels: np.ndarray | None = None
    classes: int = 0

    @property
    def count(self) -> int:
        return self.inputs.shape[0]

    @property
    def steps(self) -> int:
        return self.inputs.shape[1]

    @property
    def k(self) -> int:
        """Input channels per step (the setup's ``inputs``)."""
        return self.inputs.shape[2]

    @property
    def o(self) -> int:
        """Outputs the loss uses (the setup's ``outputs``)."""
        return self.classes if self.kind == "onehot" else self.targets.shape[2]

    @staticmethod
    def _check_inputs(cfg: HelConfig, u) -> np.ndarray:
        u = np.asarray(u)
        if u.ndim != 3 or u.shape[0] < 1:
            raise TrainingError(f"inputs must have shape (S, T, {cfg.k}) with S ≥ 1, got {u.shape}")
        s, t, k = u.shape
        if not 1 <= k <= cfg.k:
            raise TrainingError(f"inputs have {k} channels, the core takes 1..K = {cfg.k}")
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
        if y.ndim != 3 or y.shape[:2] != (s, t) or not 1 <= y.shape[2] <= cfg.o:
            raise TrainingError(f"targets have shape {y.shape}, expected ({s}, {t}, o) with "
                                f"1 ≤ o ≤ O = {cfg.o}")
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
    def classification(cls, cfg: HelConfig, inputs, labels, classes: int | None = None) -> "SampleStore":
        u = cls._check_inputs(cfg, inputs)
        s = u.shape[0]
        classes = cfg.o if classes is None else int(classes)
        if not 2 <= classes <= cfg.o:
            raise TrainingError(f"classification needs 2..O = {cfg.o} outputs, got {classes} classes")
        lab = np.asarray(labels)
        if lab.shape != (s,):
            raise TrainingError(f"labels have shape {lab.shape}, expected ({s},)")
        if lab.dtype.kind not in "iu":
            raise TrainingError(f"labels must be integers, got dtype {lab.dtype}")
        if lab.min() < 0 or lab.max() >= classes:
            raise TrainingError(f"labels must be in 0..{classes - 1}, got {int(lab.min())}..{int(lab.max())}")
        return cls("onehot", u, labels=lab.astype(np.int64), classes=classes)

    @classmethod
    def from_image(cls, cfg: HelConfig, image, layout: StoreLayout, test: bool) -> "SampleStore":
        """The training (or test) set as the device reads it from its store image
        (operand words, :class:`hel_fpga.spec.training.StoreLayout`)."""
        count = layout.test_count if test else layout.train_count
        base = layout.base(test, 0)
        return cls.from_records(cfg, image[base:base + count * layout.record], layout)

    @classmethod
    def from_records(cls, cfg: HelConfig, words, layout: StoreLayout) -> "SampleStore":
        """The samples of consecutive records ``words`` as the device reads them: mask
        words count when non-zero, label words are read unsigned (one outside
        0..o−1 is no output's target). No range check: the device takes what was
        written."""
        t, k, o = layout.steps, layout.k, layout.o
        recs = np.asarray(words, dtype=np.int64)
        count = len(recs) // layout.record
        recs = recs[:count * layout.record].reshape(count, layout.record)
        u = recs[:, :t * k].reshape(count, t, k)
        if layout.loss == "onehot":
            labels = recs[:, t * k] & ((1 << cfg.operand_width) - 1)
            return cls("onehot", u, labels=labels, classes=o)
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
        """Squared errors one pass over the store sums (Σ mask · o, or S · o)."""
        if self.kind == "onehot":
            return self.count * self.o
        return int(self.mask.sum()) * self.o

    def core_inputs(self, cfg: HelConfig, i: int) -> np.ndarray:
        """Sample ``i``'s inputs as the core takes them: K channels, zeros beyond the store's k."""
        u = np.zeros((self.steps, cfg.k), dtype=np.int64)
        u[:, :self.k] = self.inputs[i]
        return u

    def sample_targets(self, cfg: HelConfig, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i's targets (T, o, target format) and loss mask (T,)."""
        if self.kind == "mse":
            return self.targets[i], self.mask[i]
        fm = TrainFormats(cfg)
        y = np.zeros((self.steps, self.o), dtype=np.int64)
        if 0 <= self.labels[i] < self.o:        # a label out of range is no output's target
            y[-1, self.labels[i]] = fm.onehot_on()
        mask = np.zeros(self.steps, dtype=bool)
        mask[-1] = True
        return y, mask


def sample_nudges(cfg: HelConfig, outputs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                  eps_log2: int) -> tuple[np.ndarray, int]:
    """The nudges (T, O, echo order) and the sum of squared errors of one sample.

    ``outputs`` are FORWARD's (T, O) state-format integers, ``targets`` (T, o) in
    the target format (o ≤ O: outputs o.. are in no loss and get zero nudges),
    ``mask`` (T,) the loss steps.
    """
    fm = TrainFormats(cfg)
    y = np.asarray(targets, dtype=np.int64)
    out = np.asarray(outputs, dtype=np.int64)
    d = np.zeros_like(out)
    d[:, :y.shape[1]] = out[:, :y.shape[1]] - (y << fm.target_shift)
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
    """On-chip HEL training around ``cfg.engines`` = C :class:`GoldenCore` sample engines.

    ``cores`` are the engines; ``core`` is engine 0, the one a host sees (LOAD,
    FORWARD, READ_ACC … act on it). All engines hold the same parameters: every
    parameter write (the initial one, the one after each optimiser step,
    :meth:`load_state`) goes to each. A sample runs on the engine
    :class:`PassRunner` names (TRAIN: the sample's index in its batch mod C;
    EVAL: its index in the pass mod C), and :meth:`end_batch` sums the engines'
    accumulators exactly (:func:`sum_accumulators`): the update is skipped when a
    flag of any engine rose or the sum leaves the signed ``acc_width`` range,
    else the sum is the batch's accumulator. Then every engine's accumulators
    and flags are cleared. With C = 1 this is the one core's loop.

    Parameters
    ----------
    cfg, tc:
        The core's configuration and the run's hyperparameters.
    train:
        The training set (its kind must be ``tc.loss``).
    master:
        Initial master weights (integers, master format), by parameter name.
    core:
        Drive these engines as they are (a device's: :class:`TrainingUnit`; a list
        of C cores, or one core, see :func:`engine_cores`) instead of fresh ones
        loaded with the re-quantised master weights.
    """

    def __init__(self, cfg: HelConfig, tc: TrainConfig, train: SampleStore,
                 master: dict[str, np.ndarray], *, core=None):
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
        if core is not None:        # a device's engines: their parameters are the device's
            self.cores = engine_cores(cfg, core)
            self.core = self.cores[0]
            return
        self.cores = [GoldenCore(cfg) for _ in range(cfg.engines)]
        self.core = self.cores[0]
        self._write_params()
        for c in self.cores:
            c.clear_accumulators()
            c.clear_flags()

    # ---- pieces (each is one step of docs/onchip.md) -------------------------------------
    def params(self) -> dict[str, np.ndarray]:
        """The core's parameters: the re-quantised master weights."""
        return {k: requantize(self.master[k], self.fm) for k in PARAM_NAMES}

    def _write_params(self) -> None:
        p = self.params()
        for c in self.cores:
            c.write_params(**p)

    def forward_sample(self, store: SampleStore, i: int,
                       engine: int = 0) -> tuple[np.ndarray, np.ndarray, int, bool | None]:
        """LOAD and FORWARD sample ``i`` on ``engine``: (outputs, nudges, squared-error
        sum, correct).

        The core's inputs beyond the store's k channels are zero; the loss and the
        argmax see the store's first o outputs."""
        core = self.cores[engine]
        core.load(store.core_inputs(self.cfg, i))
        out = core.forward("centred")
        y, mask = store.sample_targets(self.cfg, i)
        nu, sq = sample_nudges(self.cfg, out, y, mask, self.tc.eps_log2)
        correct = None
        if store.kind == "onehot":
            correct = bool(int(np.argmax(out[-1, :store.o])) == int(store.labels[i]))
        return out, nu, sq, correct

    def train_sample(self, i: int, store: SampleStore | None = None,
                     engine: int = 0) -> tuple[int, bool | None]:
        """One training sample (of ``store``, default the training set) on ``engine``:
        FORWARD, nudges, centred ECHO (the contrast accumulates in that engine)."""
        _, nu, sq, correct = self.forward_sample(self.train if store is None else store, i, engine)
        self.cores[engine].echo(nu)
        return sq, correct

    def batch_accumulators(self) -> dict[str, np.ndarray] | None:
        """The batch's accumulators: the exact sum over the engines, or None when a
        flag of any engine rose or an element of the sum leaves the signed
        ``acc_width`` range (the update is then skipped)."""
        cores = self.cores
        if any(c.state_overflow or c.acc_overflow for c in cores):
            return None
        if len(cores) == 1:
            return cores[0].read_accumulators()
        return sum_accumulators([c.acc for c in cores], self.cfg.acc_width)

    def end_batch(self, lr_shift: int) -> bool:
        """Optimiser step from :meth:`batch_accumulators` unless it is None (overflow);
        then clear every engine's accumulators and flags. True if stepped."""
        acc = self.batch_accumulators()
        if acc is not None:
            self.step(gradient_from_acc(acc, self.fm, self.tc), lr_shift)
        for c in self.cores:
            c.clear_accumulators()
            c.clear_flags()
        return acc is not None

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
    def begin_pass(self, train: bool) -> "PassRunner":
        """A TRAIN (this epoch) or EVAL pass that takes its samples one at a time
        (:class:`PassRunner`): the order is the caller's."""
        return PassRunner(self, train)

    def train_epoch(self, on_sample=None) -> Metrics:
        """One epoch over the training set in this epoch's order; returns its running
        metrics. ``on_sample()`` is called after every sample (progress)."""
        p = self.begin_pass(train=True)
        for i in epoch_order(self.train.count, self.tc.seed, self.epoch):
            p.add(self.train, i)
            if on_sample is not None:
                on_sample()
        return p.finish()

    def evaluate(self, store: SampleStore) -> Metrics:
        """EVAL: every sample of ``store`` forward only (no echo, no accumulation)."""
        if store.kind != self.tc.loss:
            raise TrainingError(f"the set is for loss {store.kind!r}, the run uses {self.tc.loss!r}")
        if store.k > self.cfg.k or store.steps > self.cfg.t_max:
            raise TrainingError(f"the set's samples ({store.steps}×{store.k}) do not "
                                f"fit the core (t_max = {self.cfg.t_max}, K = {self.cfg.k})")
        p = self.begin_pass(train=False)
        for i in range(store.count):
            p.add(store, i)
        return p.finish()

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


class PassRunner:
    """One TRAIN epoch or EVAL pass of an :class:`OnChipTrainer`, sample by sample.

    :meth:`add` runs one sample (training: FORWARD, ECHO and, every B samples, the
    batch's update; EVAL: FORWARD), :meth:`finish` closes a partial batch, counts
    the epoch and returns the pass's :class:`Metrics`; :meth:`running` gives the
    device's running counts in between. The resident passes feed it their own
    order; a streamed pass feeds it the records as they arrive.

    The sample runs on engine :meth:`engine` of the trainer's C: in TRAIN the
    sample's 0-based index in its batch (``in_batch`` before it is added) mod C,
    in EVAL its 0-based index in the pass mod C.
    """

    def __init__(self, trainer: OnChipTrainer, train: bool):
        self.t, self.train = trainer, train
        self.lr_shift = lr_shift_at(trainer.tc, trainer.epoch) if train else 0
        self.samples = self.loss = self.correct = self.skipped = self.in_batch = 0
        self.elements = 0

    def engine(self) -> int:
        """The engine the next sample runs on."""
        return (self.in_batch if self.train else self.samples) % len(self.t.cores)

    def add(self, store: SampleStore, i: int) -> None:
        t = self.t
        e = self.engine()
        if self.train:
            sq, ok = t.train_sample(i, store, e)
        else:
            sq, ok = t.forward_sample(store, i, e)[2:]
        self.samples += 1
        self.loss += sq
        self.correct += bool(ok)
        self.elements += store.o * (1 if store.kind == "onehot" else int(store.mask[i].sum()))
        if self.train:
            self.in_batch += 1
            if self.in_batch == t.tc.batch:
                self.skipped += not t.end_batch(self.lr_shift)
                self.in_batch = 0

    def running(self) -> tuple[int, int, int, int]:
        """samples, loss sum (saturated), correct, skipped: what METRICS reports mid-pass."""
        return self.samples, min(self.loss, (1 << (LOSS_SUM_WIDTH - 1)) - 1), self.correct, self.skipped

    def finish(self) -> Metrics:
        t = self.t
        if self.train:
            if self.in_batch:
                self.skipped += not t.end_batch(self.lr_shift)
                self.in_batch = 0
            t.epoch += 1
        return Metrics(self.samples, min(self.loss, (1 << (LOSS_SUM_WIDTH - 1)) - 1),
                       self.elements, t.fm.loss_frac,
                       self.correct if t.tc.loss == "onehot" else None, self.skipped)


# --------------------------------------------------------------------------- the device's unit

class TrainingUnit:
    """The device's on-chip training unit beside its C :class:`GoldenCore` engines, command by command.

    This is what the protocol commands of docs/protocol.md (TRAIN_SETUP, STORE,
    WRITE_MASTER, READ_MASTER, TRAIN, EVAL, METRICS, STREAM) act on: the store of
    ``cfg.store_words`` operand words, the master weights and moments, the
    latched setup and the last pass's metrics. A pass is the same loop as
    :class:`OnChipTrainer` (which it drives on the shared engines, ``cores``;
    ``core`` is engine 0), with the device's extras: TRAIN starts by clearing
    every engine's accumulators and flags, and the store is read as written
    (:meth:`SampleStore.from_image`). WRITE_MASTER's master weights go,
    re-quantised, to every engine.

    A resident pass runs to its end at TRAIN or EVAL. A streamed pass
    (``StoreLayout.streamed``) starts there and takes the records :meth:`write_stream`
    delivers, each written into the ring and run as soon as it is complete; it
    ends with its last sample (``running`` is the pass until then). Words beyond
    the pass's records are dropped.

    :meth:`reset` is the device's RESET: the setup and the metrics are
    forgotten, the memories (store, master weights, moments) keep their contents.
    """

    def __init__(self, cfg: HelConfig, core):
        if cfg.store_words < 1:
            raise TrainingError("this configuration has no on-chip training (store_words = 0)")
        self.cfg = cfg
        self.attach(core)
        self.fm = TrainFormats(cfg)
        shapes = cfg.param_shapes()
        self.store = np.zeros(cfg.store_words, dtype=np.int64)
        self.master = {k: np.zeros(shapes[k], dtype=np.int64) for k in PARAM_NAMES}
        self.moment = {k: np.zeros(shapes[k], dtype=np.int64) for k in PARAM_NAMES}
        self.reset()

    def reset(self) -> None:
        self.setup: tuple[TrainConfig, StoreLayout] | None = None
        self.running = Pass.NONE                # the pass in progress
        self.metrics = (0, 0, 0, 0)             # samples, loss sum, correct, skipped
        self._stream: dict | None = None        # a streamed pass: its runner, ring, counts

    def attach(self, core) -> None:
        """Drive these engines: a list of C cores, or one core (:func:`engine_cores`)."""
        self.cores = engine_cores(self.cfg, core)
        self.core = self.cores[0]

    @property
    def streaming(self) -> bool:
        """A streamed pass runs (STREAM is accepted)."""
        return self._stream is not None

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
        """WRITE_MASTER: master weights (clamped; every engine gets their re-quantised copy)
        or moments (saturated), in PARAM_NAMES order."""
        arrays = self._split(words)
        if which == 0:
            self.master = {k: clamp_master(v, self.fm) for k, v in arrays.items()}
            params = {k: requantize(v, self.fm) for k, v in self.master.items()}
            for c in self.cores:
                c.write_params(**params)
        else:
            self.moment = {k: saturate(v, self.fm.moment.width) for k, v in arrays.items()}

    def read_master(self, which: int) -> np.ndarray:
        src = self.master if which == 0 else self.moment
        return np.concatenate([src[k].ravel() for k in PARAM_NAMES])

    def _trainer(self, store: SampleStore | None = None) -> OnChipTrainer:
        tc, layout = self.setup
        if store is None:                       # a streamed pass: the samples come later
            store = SampleStore(tc.loss, np.zeros((0, layout.steps, layout.k), dtype=np.int64))
        t = OnChipTrainer(self.cfg, tc, store, self.master, core=self.cores)
        t.master, t.moment = self.master, self.moment     # exactly as stored (no clamp)
        return t

    def _store(self, test: bool) -> SampleStore:
        return SampleStore.from_image(self.cfg, self.store, self.setup[1], test)

    def train(self, epoch: int) -> Metrics | None:
        """TRAIN: one epoch of the latched setup (``TrainingError`` without one); None
        while a streamed epoch waits for its records."""
        if self.setup is None:
            raise TrainingError("no training setup")
        layout = self.setup[1]
        for c in self.cores:
            c.clear_accumulators()
            c.clear_flags()
        if layout.streamed:
            t = self._trainer()
            t.epoch = epoch
            return self._begin_stream(t, True, layout.train_count, Pass.TRAIN)
        t = self._trainer(self._store(False))
        t.epoch = epoch
        m = t.train_epoch()
        self._finish(t, m)
        return m

    def evaluate(self, test: bool) -> Metrics | None:
        """EVAL: the training or the test set, forward only; None while a streamed
        pass waits for its records."""
        if self.setup is None:
            raise TrainingError("no training setup")
        _, layout = self.setup
        count = layout.test_count if test else layout.train_count
        if count == 0:
            self.metrics = (0, 0, 0, 0)
            return Metrics(0, 0, 0, self.fm.loss_frac, 0 if layout.loss == "onehot" else None)
        if layout.streamed:
            return self._begin_stream(self._trainer(), False, count, Pass.EVAL)
        m = self._trainer(self._store(False)).evaluate(self._store(test))
        self.metrics = (m.samples, m.loss_sum, m.correct or 0, 0)
        return m

    def _finish(self, t: OnChipTrainer, m: Metrics) -> None:
        self.master, self.moment = t.master, t.moment
        self.metrics = (m.samples, m.loss_sum, m.correct or 0, m.overflow_batches)

    def _begin_stream(self, t: OnChipTrainer, train: bool, count: int, kind: Pass) -> None:
        self.running = kind
        self.metrics = (0, 0, 0, 0)
        self._stream = {"trainer": t, "runner": t.begin_pass(train), "left": count,
                        "pending": np.zeros(0, dtype=np.int64), "wp": 0}
        return None

    def write_stream(self, words) -> Metrics | None:
        """STREAM: records for the running streamed pass, in the pass's order. Each
        word goes into the ring; each complete record runs at once. Returns the
        pass's metrics when its last sample is done, else None."""
        st = self._stream
        if st is None:
            raise TrainingError("STREAM needs a streamed pass in progress")
        layout = self.setup[1]
        rec, ring = layout.record, layout.words
        words = np.asarray(words, dtype=np.int64)
        take = min(len(words), st["left"] * rec - len(st["pending"]))
        # the ring, as the device writes it (take ≤ the pass's words; a later word of one
        # call may overwrite an earlier one, as the ring's wrap does)
        for lo in range(0, take, ring):
            part = words[lo:min(take, lo + ring)]
            self.store[(st["wp"] + np.arange(len(part))) % ring] = part
            st["wp"] = (st["wp"] + len(part)) % ring
        st["pending"] = np.concatenate([st["pending"], words[:take]])
        runner = st["runner"]
        while len(st["pending"]) >= rec:
            runner.add(SampleStore.from_records(self.cfg, st["pending"][:rec], layout), 0)
            st["pending"] = st["pending"][rec:]
            st["left"] -= 1
            self.metrics = runner.running()
        if st["left"]:
            return None
        m = runner.finish()
        if runner.train:
            self._finish(st["trainer"], m)
        else:
            self.metrics = (m.samples, m.loss_sum, m.correct or 0, 0)
        self._stream = None
        self.running = Pass.NONE
        return m
