"""The one definition of on-chip training: formats, loss kinds, rates and schedules.

On-chip training moves the loss, the nudges, the batches, the optimiser and the
metrics from the host into the device. The golden model of that loop is
``hel_fpga.sim.onchip``; docs/onchip.md describes it for the gateware. This
module holds only what every layer must agree on: the number formats the loop
adds to the core's (:class:`TrainFormats`), the hyperparameters the host
writes to the device (:class:`TrainConfig`), the shift amounts derived from
them, and the per-epoch order of the samples.

Design rules, and why
---------------------
* **Powers of two only.** ε, the batch size, the learning rate and the
  momentum constants (β = 1 − 2^−s) are powers of two, so every scale in the
  loop is a shift: the nudge ``ν = (δ/2)·ε·(ŷ − y)`` is a subtraction and a
  rounded right shift, the centred estimator's ``−δ/(2ε)`` and the batch mean
  ``1/B`` fold into one shift per parameter array (:meth:`TrainFormats.grad_shift`),
  and the optimiser needs adders, shifts, compares and sign logic, no
  multiplier, divider or square root.
* **Master weights wider than the operands.** The optimiser updates
  ``master_width``-bit master weights with ``MASTER_EXTRA_FRAC`` more
  fractional bits than the core's parameters; the core's parameter memories get
  a rounded copy after every step. Without the extra bits an update smaller
  than half a parameter LSB (2^−12 at 16-bit operands) would round to nothing.
  The master range equals the parameter range (the extra bits are all below
  the LSB), so master weights saturate exactly where the host's float master
  weights are clipped, and re-quantisation can never overflow.
* **Rounding** everywhere is ``rshift_round`` of :mod:`hel_fpga.spec.formats`
  (add half, arithmetic shift), and every value that can leave its range
  saturates; nothing in the training loop wraps (the core's state and
  accumulators keep their own wrap-and-flag rule).
* **Classification is MSE to a one-hot target**, not softmax cross-entropy.
  Softmax needs an exponential per output, a division by their sum and, for the
  reported loss, a logarithm: an exp table, a divider and a log table that
  exist only for one step of each sample, and whose roundings would all have
  to be specified bit for bit. MSE to a one-hot target uses the regression
  datapath unchanged (subtract, shift, square), has a bounded output gradient
  (|ŷ − y|, where cross-entropy on ŷ/τ reaches 1/τ), and on the digits task
  comes within a fraction of a point of host-driven cross-entropy's test
  accuracy (docs/onchip.md, results).
* **Centred estimator only.** Its bias is O(ε²), so ε can be a coarse power
  of two (2^−5 ≈ 0.03 on every step, 2^−2 for a single final-step kick); the
  one-sided estimator's O(ε) bias needs a small ε that is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from hel_fpga.spec.formats import Fixed, HelConfig
from hel_fpga.spec.names import PARAM_NAMES, mix32

__all__ = [
    "TrainingError", "LOSS_KINDS", "OPTIMIZERS", "SCHEDULES", "DEFAULT_OPTIMIZER",
    "DEFAULT_LR_LOG2", "DEFAULT_EPS_LOG2", "MASTER_EXTRA_FRAC", "MOMENT_EXTRA_INT",
    "LOSS_SUM_WIDTH", "COUNT_WIDTH", "ONEHOT_ON_LOG2", "TrainFormats", "TrainConfig",
    "EPS_LOG2_RANGE", "BATCH_LOG2_RANGE", "BETA_LOG2_RANGE", "HALVINGS_RANGE", "LR_LOG2_RANGE",
    "SGDM_LR_LOG2_MIN", "LR_SHIFT_RANGE",
    "lr_shift_at", "epoch_order", "order_bits",
    "SETUP_FIELDS", "SETUP_WORDS", "SETUP_WORD_BITS", "SETUP_WORD_MAX", "StoreLayout",
    "pack_setup", "unpack_setup", "record_words",
]


class TrainingError(ValueError):
    """A training set or training configuration the device cannot take (one-line message)."""


#: Loss kinds: masked MSE on any steps (regression, sequence targets) and MSE of
#: the final step's outputs to a one-hot target (classification).
LOSS_KINDS = ("mse", "onehot")

#: Optimisers: SGD with (EMA) momentum, and Lion (sign of an interpolated momentum).
OPTIMIZERS = ("sgdm", "lion")

#: Learning-rate schedules: constant, or halvings at fixed fractions of the run.
SCHEDULES = ("constant", "halving")

#: The default optimiser, picked on the built-in tasks (docs/onchip.md, results).
DEFAULT_OPTIMIZER = "lion"

#: Default learning rates as −log2(lr), per optimiser and loss kind. Lion's step is
#: ±lr whatever the gradient's scale, so one rate serves both losses; sgdm's step
#: scales with the gradient, and the one-hot loss (one kick, ε = 2^−2) needs a
#: rate 16 times larger than every-step MSE (measured: docs/onchip.md, results).
DEFAULT_LR_LOG2 = {("lion", "mse"): 7, ("lion", "onehot"): 7,
                   ("sgdm", "mse"): 2, ("sgdm", "onehot"): -2}

#: Default −log2(ε) by loss kind: every-step nudges 2^−5 ≈ 0.031 (the host's 0.03),
#: one final-step kick 2^−2 (a single kick perturbs far less than T nudges).
DEFAULT_EPS_LOG2 = {"all": 5, "final": 2}

#: Fractional bits the master weights carry beyond the core's parameters.
MASTER_EXTRA_FRAC = 16

#: Integer bits the optimiser's moment carries beyond the master weights' range:
#: a batch gradient may exceed the parameter range; beyond 2^MOMENT_EXTRA_INT
#: times it, it saturates (a clip that only sgdm can notice).
MOMENT_EXTRA_INT = 8

#: Width of the per-epoch loss sum (saturating) and of the sample counters.
LOSS_SUM_WIDTH = 64
COUNT_WIDTH = 32

#: One-hot target of the true class: 2^−ONEHOT_ON_LOG2 (the others 0). A target of
#: 1.0 trained digits better than 0.5 and 0.25 (docs/onchip.md, results).
ONEHOT_ON_LOG2 = 0


@dataclass(frozen=True)
class TrainFormats:
    """The integer formats on-chip training adds to a core configuration.

    ======== ========================================= =====================================
    quantity format                                    why
    ======== ========================================= =====================================
    master   OW + X bits, PF + X fractional (X = 16)   range of the parameters, 2^−X finer
    moment   master width + 8 bits, same fraction      a gradient may exceed the range
    target   the operand format (OW, OF)               the input words' width; |y| < 2^(OW−OF−1)
    error    the operand format, saturated             e² fits one core multiplier
    loss sum 64 bits of 2·OF fractional bits, saturating
    ======== ========================================= =====================================
    """

    cfg: HelConfig

    @property
    def master_extra(self) -> int:
        return MASTER_EXTRA_FRAC

    @property
    def master(self) -> Fixed:
        c = self.cfg
        return Fixed(c.operand_width + MASTER_EXTRA_FRAC, c.param_frac + MASTER_EXTRA_FRAC)

    @property
    def moment(self) -> Fixed:
        m = self.master
        return Fixed(m.width + MOMENT_EXTRA_INT, m.frac)

    @property
    def target(self) -> Fixed:
        return self.cfg.operand

    @property
    def error(self) -> Fixed:
        return self.cfg.operand

    @property
    def target_shift(self) -> int:
        """Left shift taking a target to the state format of the outputs."""
        return self.cfg.state_frac - self.target.frac

    @property
    def error_shift(self) -> int:
        """Right shift taking an output − target difference (state format) to the error format."""
        return self.cfg.state_frac - self.error.frac

    @property
    def loss_frac(self) -> int:
        """Fractional bits of a squared error and of the loss sums."""
        return 2 * self.error.frac

    def nudge_shift(self, eps_log2: int) -> int:
        """ν = rshift_round(ŷ − y, ·): (δ/2)·ε = 2^−(dt_log2 + 1 + eps_log2) in state units."""
        return self.cfg.dt_log2 + 1 + eps_log2

    def grad_frac(self, name: str) -> int:
        """Fractional bits of an accumulated contrast element of ``name``, with the
        ½ of ∂V/∂α = ½·α·q² counted as one more bit (``HelConfig.gradients_from_accumulators``)."""
        c = self.cfg
        return {"W": c.operand_frac + c.act_frac, "B": c.operand_frac + c.act_frac,
                "b": c.act_frac, "alpha": 2 * c.operand_frac + 1}[name]

    def grad_shift(self, name: str, eps_log2: int, batch_log2: int) -> int:
        """Right shift (negative: left) taking a batch's accumulator to the mean gradient
        in master units: g = rshift_round(−acc, s) = −δ·acc·scale/(2ε·B)·2^MF."""
        if name not in PARAM_NAMES:
            raise TrainingError(f"unknown parameter {name!r}")
        return (self.cfg.dt_log2 + self.grad_frac(name) + 1 - eps_log2 + batch_log2
                - self.master.frac)

    def onehot_on(self) -> int:
        """The true class's target in the target format."""
        return 1 << (self.target.frac - ONEHOT_ON_LOG2)


#: The ranges of the run's settings (inclusive), checked by :meth:`TrainConfig.validate`
#: and the ranges the gateware's shifters are sized for. ``LR_LOG2_RANGE`` holds for
#: Lion; sgdm may go down to ``SGDM_LR_LOG2_MIN`` (rates above 1). ``LR_SHIFT_RANGE``
#: is the learning-rate shift a schedule can reach: ``lr_log2`` plus up to
#: ``HALVINGS_RANGE[1]`` halvings.
EPS_LOG2_RANGE = (0, 16)
BATCH_LOG2_RANGE = (0, 12)
BETA_LOG2_RANGE = (1, 16)
HALVINGS_RANGE = (0, 8)
LR_LOG2_RANGE = (0, 24)
SGDM_LR_LOG2_MIN = -8
LR_SHIFT_RANGE = (SGDM_LR_LOG2_MIN, LR_LOG2_RANGE[1] + HALVINGS_RANGE[1])


@dataclass(frozen=True)
class TrainConfig:
    """The hyperparameters of one on-chip run, as the host writes them to the device.

    Every rate is a power of two, given by its negated log2: ε = 2^−eps_log2,
    B = 2^batch_log2, lr = 2^−lr_log2, β = 1 − 2^−beta_log2. ``lr_log2`` may be
    negative for sgdm (rates above 1). ``halvings`` applies to the ``halving``
    schedule (:func:`lr_shift_at`).
    """

    loss: str = "mse"
    optimizer: str = DEFAULT_OPTIMIZER
    eps_log2: int = 5
    batch_log2: int = 3
    lr_log2: int = 7
    beta_log2: int = 3           #: sgdm's momentum, and Lion's β1 (interpolation)
    beta2_log2: int = 7          #: Lion's β2 (the momentum it keeps)
    schedule: str = "halving"
    halvings: int = 3
    epochs: int = 10
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(f.default, str):
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                raise TrainingError(f"training setting {f.name} must be an integer, got {v!r}")
        if self.loss not in LOSS_KINDS:
            raise TrainingError(f"loss must be one of {LOSS_KINDS}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        checks = [("eps_log2", *EPS_LOG2_RANGE), ("batch_log2", *BATCH_LOG2_RANGE),
                  ("beta_log2", *BETA_LOG2_RANGE), ("beta2_log2", *BETA_LOG2_RANGE),
                  ("halvings", *HALVINGS_RANGE), ("epochs", 1, SETUP_WORD_MAX),
                  ("seed", 0, (1 << 32) - 1)]
        lo_lr = SGDM_LR_LOG2_MIN if self.optimizer == "sgdm" else LR_LOG2_RANGE[0]
        checks.append(("lr_log2", lo_lr, LR_LOG2_RANGE[1]))
        for name, lo, hi in checks:
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise TrainingError(f"training setting {name} = {v} is outside {lo}..{hi}")

    @property
    def batch(self) -> int:
        return 1 << self.batch_log2

    @property
    def eps(self) -> float:
        return 2.0 ** -self.eps_log2

    @property
    def lr(self) -> float:
        return 2.0 ** -self.lr_log2

    def check_for(self, cfg: HelConfig) -> None:
        """Refuse settings whose shifts the core's formats cannot carry."""
        fm = TrainFormats(cfg)
        worst = self.lr_log2 + (self.halvings if self.schedule == "halving" else 0)
        if self.optimizer == "lion" and worst > fm.master.frac:
            raise TrainingError(f"Lion's smallest step 2^-{worst} is below the master weights' "
                                f"LSB 2^-{fm.master.frac}")
        if fm.nudge_shift(self.eps_log2) >= cfg.state_width:
            raise TrainingError(f"eps = 2^-{self.eps_log2} shifts every nudge out of the "
                                f"{cfg.state_width}-bit state")


def lr_shift_at(tc: TrainConfig, epoch: int) -> int:
    """−log2 of the learning rate in ``epoch`` (0-based): ``lr_log2`` plus the halvings so far.

    The ``halving`` schedule halves the rate when the epoch counter reaches
    ``E − (E ≫ h)`` for h = 1..halvings (E = epochs): at 1/2, 3/4, 7/8 … of the
    run. For E = 10 and 3 halvings: epochs 0–4 at lr, 5–7 at lr/2, 8 at lr/4,
    9 at lr/8 — a staircase under the host's cosine decay to lr/20, found with
    shifts and compares only.
    """
    if tc.schedule == "constant":
        return tc.lr_log2
    e = tc.epochs
    return tc.lr_log2 + sum(1 for h in range(1, tc.halvings + 1) if epoch >= e - (e >> h))


def order_bits(count: int) -> int:
    """Bits of the index space the epoch order permutes: ⌈log2 count⌉, at least 1."""
    return max(1, math.ceil(math.log2(count))) if count > 1 else 1


def _permute(i: int, keys: tuple[int, int, int], bits: int) -> int:
    mask = (1 << bits) - 1
    s1, s2 = max(1, (bits + 1) // 2), max(1, bits // 3)
    x = i
    for key in keys:
        x = (x + key) & mask            # add a key: a rotation of the index space
        x ^= x >> s1                    # xorshift: invertible for s1 ≥ 1
        x = (x + (x << s2)) & mask      # times the odd 1 + 2^s2: invertible
    return x


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order in which ``epoch`` visits samples 0..count−1.

    A keyed bijection of the ``order_bits(count)``-bit index space, made of
    additions, xorshifts and multiplications by 1 + 2^s (all invertible mod
    2^bits, all shifts and adds), applied to 0, 1, … 2^bits − 1; indices ≥ count
    are skipped. Each epoch gets its own three round keys from ``mix32``, so the
    device walks a fresh permutation with a counter and no stored table.
    """
    if count < 1:
        raise TrainingError("the training set is empty")
    bits = order_bits(count)
    mask = (1 << bits) - 1
    base = mix32(seed & 0xFFFF_FFFF)
    keys = tuple(mix32(base ^ (((epoch << 2) + r) & 0xFFFF_FFFF)) & mask for r in range(3))
    out = []
    for i in range(1 << bits):
        j = _permute(i, keys, bits)
        if j < count:
            out.append(j)
    return out


# ---------------------------------------------------------------------------
# The device's view: the setup words and the sample store's layout
# ---------------------------------------------------------------------------

#: The words of TRAIN_SETUP, in order (docs/protocol.md). Each is an unsigned
#: ``SETUP_WORD_BITS``-bit value carried in an operand word: ``loss`` and
#: ``optimizer`` are indices into :data:`LOSS_KINDS` and :data:`OPTIMIZERS`;
#: ``lr_log2`` is two's complement; ``halvings`` is 0 for the constant schedule;
#: the seed is split into its low and high halves; ``steps`` is the T of every
#: sample; ``train_count`` and ``test_count`` are the samples of the two sets.
#: ``inputs`` (1..K) and ``outputs`` (1..O) are the data's own widths: a record
#: holds ``inputs`` words per step (the core sees zeros on the other inputs), and
#: the loss, the nudges and the argmax use outputs 0..``outputs``−1 only (the others
#: get zero nudges), so a core with more inputs or outputs than a data set trains
#: it as a core of its own size would, and its records take no padding.
#: ``stream_slots`` picks the data mode: 0, the sets are resident in the store
#: (training set in the first ``train_count`` records, test set after it); n ≥ 1,
#: the store is a ring of n records that the host streams each pass into
#: (:class:`StoreLayout`).
SETUP_FIELDS = ("loss", "optimizer", "eps_log2", "batch_log2", "lr_log2", "beta_log2",
                "beta2_log2", "halvings", "epochs", "seed_lo", "seed_hi", "steps",
                "train_count", "test_count", "inputs", "outputs", "stream_slots")
SETUP_WORDS = len(SETUP_FIELDS)
SETUP_WORD_BITS = 16
SETUP_WORD_MAX = (1 << SETUP_WORD_BITS) - 1


def record_words(cfg: HelConfig, loss: str, steps: int, k: int | None = None,
                 o: int | None = None) -> int:
    """Store words of one sample of ``k`` input channels and ``o`` outputs (default: the
    core's K and O): its T·k inputs, then for ``mse`` its T·o targets and T mask words,
    for ``onehot`` one label word."""
    k = cfg.k if k is None else k
    o = cfg.o if o is None else o
    if loss == "onehot":
        return steps * k + 1
    return steps * (k + o + 1)


@dataclass(frozen=True)
class StoreLayout:
    """Where a setup's samples sit in the store (word addresses).

    A record is one sample: its inputs row-major (T×k), then (``mse``) its targets
    row-major (T×o) and one mask word per step (non-zero: a loss step), or
    (``onehot``) its label (a label outside 0..o−1 is the target of no output: its
    sample is never correct); k and o are the setup's ``inputs`` and ``outputs``.

    **Resident** (``slots`` = 0): sample ``i`` of the training set starts at
    ``i·record``, sample ``i`` of the test set at ``(train_count + i)·record``; a
    pass reads them in its own order (TRAIN: :func:`epoch_order`; EVAL: 0, 1, …).

    **Streamed** (``slots`` ≥ 1): the first ``slots·record`` words are a ring of
    records. During a pass the host sends the pass's records with STREAM, in the
    order the pass is to visit them; the device writes them into the ring in
    arrival order, trains (or evaluates) each as soon as it is complete, and frees
    its slot when the sample is done. A host that streams a TRAIN pass in
    ``epoch_order`` gets exactly the resident run.
    """

    loss: str
    steps: int
    train_count: int
    test_count: int
    record: int
    k: int = 0
    o: int = 0
    slots: int = 0

    @property
    def streamed(self) -> bool:
        return self.slots > 0

    @property
    def words(self) -> int:
        """Store words the layout occupies: both sets, or the ring."""
        if self.streamed:
            return self.slots * self.record
        return (self.train_count + self.test_count) * self.record

    def base(self, test: bool, i: int) -> int:
        return ((self.train_count if test else 0) + i) * self.record


def pack_setup(cfg: HelConfig, tc: TrainConfig, steps: int, train_count: int,
               test_count: int, *, k: int | None = None, o: int | None = None,
               slots: int = 0) -> list[int]:
    """The TRAIN_SETUP words of a run on data of ``k`` inputs and ``o`` outputs (default:
    the core's), resident (``slots`` = 0) or streamed through a ring of ``slots``
    records; :class:`TrainingError` if the device could not take it."""
    tc.check_for(cfg)
    layout = _check_layout(cfg, tc.loss, steps, train_count, test_count,
                           cfg.k if k is None else k, cfg.o if o is None else o, slots)
    values = {
        "loss": LOSS_KINDS.index(tc.loss), "optimizer": OPTIMIZERS.index(tc.optimizer),
        "eps_log2": tc.eps_log2, "batch_log2": tc.batch_log2,
        "lr_log2": tc.lr_log2 & SETUP_WORD_MAX, "beta_log2": tc.beta_log2,
        "beta2_log2": tc.beta2_log2,
        "halvings": tc.halvings if tc.schedule == "halving" else 0,
        "epochs": tc.epochs, "seed_lo": tc.seed & SETUP_WORD_MAX, "seed_hi": tc.seed >> 16,
        "steps": layout.steps, "train_count": layout.train_count,
        "test_count": layout.test_count, "inputs": layout.k, "outputs": layout.o,
        "stream_slots": layout.slots}
    return [values[f] for f in SETUP_FIELDS]


def unpack_setup(cfg: HelConfig, words) -> tuple[TrainConfig, StoreLayout]:
    """The run and store layout TRAIN_SETUP's words describe (as the device reads them).

    Raises :class:`TrainingError` when the device would refuse them (its
    ``setup_ok`` low): a field out of range, or a layout that does not fit.
    """
    words = [int(w) & SETUP_WORD_MAX for w in words]
    if len(words) != SETUP_WORDS:
        raise TrainingError(f"a training setup has {SETUP_WORDS} words, got {len(words)}")
    v = dict(zip(SETUP_FIELDS, words))
    if v["loss"] >= len(LOSS_KINDS) or v["optimizer"] >= len(OPTIMIZERS):
        raise TrainingError("the setup's loss or optimizer code is unknown")
    lr = v["lr_log2"] - (1 << SETUP_WORD_BITS) if v["lr_log2"] >> (SETUP_WORD_BITS - 1) else v["lr_log2"]
    try:
        tc = TrainConfig(loss=LOSS_KINDS[v["loss"]], optimizer=OPTIMIZERS[v["optimizer"]],
                         eps_log2=v["eps_log2"], batch_log2=v["batch_log2"], lr_log2=lr,
                         beta_log2=v["beta_log2"], beta2_log2=v["beta2_log2"],
                         schedule="halving" if v["halvings"] else "constant",
                         halvings=v["halvings"] or HALVINGS_RANGE[0], epochs=v["epochs"],
                         seed=v["seed_lo"] | (v["seed_hi"] << 16))
    except TypeError as e:          # pragma: no cover - fields are ints by construction
        raise TrainingError(str(e)) from None
    tc.check_for(cfg)
    return tc, _check_layout(cfg, tc.loss, v["steps"], v["train_count"], v["test_count"],
                             v["inputs"], v["outputs"], v["stream_slots"])


def _check_layout(cfg: HelConfig, loss: str, steps: int, train_count: int,
                  test_count: int, k: int, o: int, slots: int) -> StoreLayout:
    if cfg.store_words == 0:
        raise TrainingError("this device has no on-chip training (its store_words is 0)")
    if not 1 <= k <= cfg.k:
        raise TrainingError(f"the data have {k} input channels, the core takes 1..K = {cfg.k}")
    if not 1 <= o <= cfg.o:
        raise TrainingError(f"the data have {o} outputs, the core has 1..O = {cfg.o}")
    if loss == "onehot" and o < 2:
        raise TrainingError(f"classification needs at least 2 outputs, the data have {o}")
    if not 1 <= steps <= cfg.t_max:
        raise TrainingError(f"sequence length T = {steps} is outside 1..t_max = {cfg.t_max}")
    if not 1 <= train_count <= SETUP_WORD_MAX:
        raise TrainingError(f"the training set must have 1..{SETUP_WORD_MAX} samples, "
                            f"got {train_count}")
    if not 0 <= test_count <= SETUP_WORD_MAX:
        raise TrainingError(f"the test set must have 0..{SETUP_WORD_MAX} samples, got {test_count}")
    if not 0 <= slots <= SETUP_WORD_MAX:
        raise TrainingError(f"the stream ring must have 0..{SETUP_WORD_MAX} slots, got {slots}")
    layout = StoreLayout(loss, steps, train_count, test_count,
                         record_words(cfg, loss, steps, k, o), k, o, slots)
    if layout.words > cfg.store_words:
        if layout.streamed:
            raise TrainingError(f"a ring of {slots} records of {layout.record} words needs "
                                f"{layout.words} store words, the device has {cfg.store_words}")
        raise TrainingError(
            f"the sets need {layout.words} store words ({train_count} + {test_count} samples of "
            f"{layout.record}), the device has {cfg.store_words}; stream them instead "
            f"(a ring of {cfg.store_words // layout.record} records fits)")
    return layout
