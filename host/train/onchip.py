"""The host side of on-chip training (``hel train --on-chip``).

On-chip training (docs/onchip.md) keeps the whole loop in the device: the
training and test sets sit in device memory, the device forms the loss and the
nudges from FORWARD's outputs, accumulates B samples' contrasts, steps its own
optimiser on integer master weights and counts the metrics. The host writes the
sets and the settings (a :class:`~hel_fpga.spec.training.TrainConfig`), starts
one epoch at a time, watches the progress, reads the metrics, and reads back the
training state for a checkpoint after every epoch.

This module holds what the training loop (``hel_fpga.host.train.loop``) needs
for that and nothing of the loop itself:

* :class:`OnChipDevice` — the interface of "a device that trains on its own";
  :class:`GoldenOnChipDevice` implements it with the golden model
  (:class:`hel_fpga.sim.onchip.OnChipTrainer`, ``--device sim``),
  :class:`ProtocolOnChipDevice` over the serial protocol's training commands
  (a board, the simulated board, the protocol model). :func:`open_onchip_device`
  picks one, and refuses a device without the training mode in one line.
* :func:`task_store` — a :class:`~hel_fpga.host.train.dataset.Task`'s samples as
  the integer :class:`~hel_fpga.sim.onchip.SampleStore` (inputs and targets in
  the core's operand format, labels, loss masks), checked against the core.
* :func:`resolve_onchip_settings` and :func:`train_config_for` — the command
  line's settings as a ``TrainConfig``: ε, lr and the batch must be powers of
  two; the defaults are ``TrainConfig``'s (Lion, lr 2^−7, ε 2^−5 on every-step
  losses and 2^−2 on a final-step loss).

Every problem with the data or the settings is a one-line
:class:`~hel_fpga.host.errors.UsageError`.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from hel_fpga.host.device import DeviceError
from hel_fpga.host.errors import UsageError
from hel_fpga.host.train.checkpoint import resumed_settings
from hel_fpga.host.train.dataset import Task
from hel_fpga.sim.onchip import Metrics, OnChipTrainer, SampleStore, master_from_float, requantize
from hel_fpga.spec.formats import FormatError, HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.protocol import Command, Pass
from hel_fpga.spec.training import (
    DEFAULT_EPS_LOG2, DEFAULT_LR_LOG2, DEFAULT_OPTIMIZER, OPTIMIZERS, TrainConfig, TrainFormats,
    SETUP_WORD_MAX, TrainingError, epoch_order, pack_setup, record_words)

__all__ = ["OnChipDevice", "GoldenOnChipDevice", "ProtocolOnChipDevice", "store_words_for", "TrainState", "open_onchip_device",
           "ONCHIP_DEVICES", "SETS", "DATA_MODES", "task_store", "loss_kind_for", "resolve_onchip_settings",
           "train_config_for", "pow2_log2", "metrics_dict", "initial_state", "LOSS_DEFINITIONS"]

#: The stored sets a device holds.
SETS = ("train", "test")

#: How the sets reach a protocol device (``hel train --data``): ``resident`` writes
#: both into the store once; ``stream`` sends each pass's records into a ring in the
#: store while the pass runs (docs/onchip.md, "Streamed data"); ``auto`` is
#: resident when both sets fit the store, else streamed.
DATA_MODES = ("auto", "resident", "stream")

#: Named ``--device`` values that train on their own (and any board whose IDENT
#: reports a training store).
ONCHIP_DEVICES = ("sim", "model", "sim-board")

#: Seconds a pass may go without a sample finishing before the host gives up.
PASS_STALL_SECONDS = 120.0

#: What each loss figure of an on-chip run means (written into metrics.json).
LOSS_DEFINITIONS = {
    "mse": "on-chip loss: mean squared error per loss step and output, Σ e² / (Σ mask · O) with "
           "e the output minus the target rounded to the operand format (the device's integer metric)",
    "onehot": "on-chip loss: mean squared error of the final step's O outputs to the one-hot target "
              "(1.0 for the label, 0 elsewhere), Σ e² / (S · O) (the device's integer metric); "
              "not the task's cross-entropy",
}


# --------------------------------------------------------------------------- the interface


@dataclass
class TrainState:
    """What a checkpoint needs from a training device: integer master weights and
    optimiser moments (master units, by parameter name) and the completed epochs."""

    master: dict[str, np.ndarray]
    moment: dict[str, np.ndarray]
    epoch: int

    def arrays(self) -> dict[str, np.ndarray]:
        out = {f"master_{k}": np.asarray(self.master[k], dtype=np.int64) for k in PARAM_NAMES}
        out.update({f"moment_{k}": np.asarray(self.moment[k], dtype=np.int64) for k in PARAM_NAMES})
        return out

    @classmethod
    def from_arrays(cls, arrays, epoch: int) -> "TrainState":
        return cls({k: np.asarray(arrays[f"master_{k}"], dtype=np.int64) for k in PARAM_NAMES},
                   {k: np.asarray(arrays[f"moment_{k}"], dtype=np.int64) for k in PARAM_NAMES},
                   int(epoch))


class OnChipDevice(abc.ABC):
    """A device that trains on its own (docs/onchip.md).

    The host's sequence: :meth:`write_train_config`, :meth:`write_set` for
    ``"train"`` (and ``"test"``), :meth:`write_state` (the initial master
    weights with zero moments and epoch 0, or a checkpoint's), then per epoch
    :meth:`run_epoch`, :meth:`evaluate` and :meth:`read_state`. A device that
    fails or stops answering raises :class:`~hel_fpga.host.device.DeviceError`
    (or ``TimeoutError``/``OSError``); bad sets or settings raise
    :class:`~hel_fpga.spec.training.TrainingError`.
    """

    #: A one-line description for reports.
    name: str = "on-chip training device"

    @property
    @abc.abstractmethod
    def config(self) -> HelConfig:
        """The core's configuration (a board's is fixed by its bitstream)."""

    @abc.abstractmethod
    def write_train_config(self, tc: TrainConfig) -> None:
        """The run's hyperparameters (refused if the core's formats cannot carry them)."""

    @abc.abstractmethod
    def write_set(self, which: str, store: SampleStore) -> None:
        """Write the training (``"train"``) or test (``"test"``) set into device memory."""

    @abc.abstractmethod
    def write_state(self, state: TrainState) -> None:
        """Master weights, moments and the epoch counter; the parameters follow (re-quantised)."""

    @abc.abstractmethod
    def read_state(self) -> TrainState:
        """Master weights, moments and the completed epochs, for a checkpoint."""

    @abc.abstractmethod
    def run_epoch(self, progress: Callable[[int], None] | None = None) -> Metrics:
        """Train one epoch (the device's own order, batches and schedule); ``progress(n)``
        is called as samples complete, with the number completed since the last call."""

    @abc.abstractmethod
    def evaluate(self, which: str) -> Metrics:
        """EVAL: a stored set forward only; the device's loss sum and correct count."""

    @abc.abstractmethod
    def forward_outputs(self, which: str) -> np.ndarray:
        """FORWARD every sample of a stored set and return the outputs (S, T, O),
        state-format integers, for losses the device does not compute."""

    def close(self) -> None:
        """Release the device."""


class GoldenOnChipDevice(OnChipDevice):
    """The golden model of on-chip training in-process (``--device sim``):
    :class:`~hel_fpga.sim.onchip.OnChipTrainer` behind :class:`OnChipDevice`."""

    name = "golden model (in-process)"

    def __init__(self, cfg: HelConfig):
        self._cfg = cfg
        self._tc: TrainConfig | None = None
        self._sets: dict[str, SampleStore] = {}
        self._pending: TrainState | None = None
        self._trainer: OnChipTrainer | None = None

    @property
    def config(self) -> HelConfig:
        return self._cfg

    def _retire(self) -> None:
        # Settings or the training set change: keep the state, rebuild the trainer on use.
        if self._trainer is not None:
            self._pending = self.read_state()
            self._trainer = None

    def write_train_config(self, tc: TrainConfig) -> None:
        tc.check_for(self._cfg)
        self._retire()
        self._tc = tc

    def write_set(self, which: str, store: SampleStore) -> None:
        if which not in SETS:
            raise TrainingError(f"no stored set {which!r} (sets: {', '.join(SETS)})")
        if which == "train":
            self._retire()
        self._sets[which] = store

    def write_state(self, state: TrainState) -> None:
        if self._trainer is not None:
            self._trainer.load_state({**state.arrays(), "epoch": state.epoch})
        else:
            self._pending = state

    def _ready(self) -> OnChipTrainer:
        if self._trainer is None:
            missing = [w for w, ok in (("training settings", self._tc is not None),
                                       ("training set", "train" in self._sets),
                                       ("training state", self._pending is not None)) if not ok]
            if missing:
                raise DeviceError(f"the device has no {' and no '.join(missing)} yet")
            st = self._pending
            tr = OnChipTrainer(self._cfg, self._tc, self._sets["train"], st.master)
            tr.load_state({**st.arrays(), "epoch": st.epoch})
            self._trainer, self._pending = tr, None
        return self._trainer

    def read_state(self) -> TrainState:
        if self._trainer is None:
            if self._pending is None:
                raise DeviceError("the device has no training state yet")
            return self._pending
        s = self._trainer.state()
        return TrainState.from_arrays(s, s["epoch"])

    def run_epoch(self, progress=None) -> Metrics:
        return self._ready().train_epoch(on_sample=None if progress is None else lambda: progress(1))

    def _set(self, which: str) -> SampleStore:
        if which not in self._sets:
            raise DeviceError(f"the device holds no {which} set")
        return self._sets[which]

    def evaluate(self, which: str) -> Metrics:
        return self._ready().evaluate(self._set(which))

    def forward_outputs(self, which: str) -> np.ndarray:
        tr, st = self._ready(), self._set(which)
        out = np.empty((st.count, st.steps, self._cfg.o), dtype=np.int64)
        for i in range(st.count):
            tr.core.load(st.core_inputs(self._cfg, i))
            out[i] = tr.core.forward("centred")  # centred: nothing accumulates
        return out


class ProtocolOnChipDevice(OnChipDevice):
    """On-chip training over the serial protocol (docs/protocol.md, "On-chip training"):
    a board, the simulated board or the protocol model behind a
    :class:`~hel_fpga.host.link.SerialDevice` whose IDENT reports a store.

    The sets and the settings are kept on the host until the state is written
    (or a pass starts): then the device gets the setup words (TRAIN_SETUP) and, in
    the resident data mode, the store both sets (STORE). An epoch is TRAIN followed
    by METRICS polls, which feed the progress callback; the epoch counter lives on
    the host (the device takes it with each TRAIN).

    In the streamed data mode (``data``: :data:`DATA_MODES`) the store is a ring of
    as many records as fit, and each pass's records follow its TRAIN or EVAL in
    STREAM transfers of at most a store's worth of words: a TRAIN pass in
    :func:`~hel_fpga.spec.training.epoch_order`, so the run is bit for bit the
    resident one, an EVAL pass in index order. The device takes each word when its
    slot is free; the host never waits for a sample.
    """

    def __init__(self, dev, *, poll_seconds: float = 0.02, data: str = "auto"):
        if dev.config.store_words < 1:
            raise DeviceError("the device has no on-chip training (IDENT store_words = 0)")
        if data not in DATA_MODES:
            raise ValueError(f"data mode must be one of {DATA_MODES}, got {data!r}")
        self.dev = dev
        self.name = dev.ident().name
        self.poll_seconds = poll_seconds
        self.data = data
        self._tc: TrainConfig | None = None
        self._sets: dict[str, SampleStore] = {}
        self._uploaded = False
        self._epoch: int | None = None
        self.slots = 0                   # the uploaded setup's ring (0: resident)

    @property
    def config(self) -> HelConfig:
        return self.dev.config

    def write_train_config(self, tc: TrainConfig) -> None:
        tc.check_for(self.config)
        self._tc, self._uploaded = tc, False

    def write_set(self, which: str, store: SampleStore) -> None:
        if which not in SETS:
            raise TrainingError(f"no stored set {which!r} (sets: {', '.join(SETS)})")
        self._sets[which], self._uploaded = store, False

    def _upload(self) -> None:
        if self._uploaded:
            return
        if self._tc is None or "train" not in self._sets:
            raise DeviceError("the device has no training settings or no training set yet")
        cfg, tc, train = self.config, self._tc, self._sets["train"]
        test = self._sets.get("test")
        for st in (train, test):
            if st is not None and st.kind != tc.loss:
                raise TrainingError(f"a set is for loss {st.kind!r}, the run uses {tc.loss!r}")
        if test is not None and test.steps != train.steps:
            raise TrainingError(f"the test set's T = {test.steps} differs from the training set's "
                                f"{train.steps}: the store holds one T")
        if test is not None and (test.k, test.o) != (train.k, train.o):
            raise TrainingError("the test set's widths differ from the training set's")
        record = record_words(cfg, tc.loss, train.steps, train.k, train.o)
        n_test = test.count if test else 0
        fits = (train.count + n_test) * record <= cfg.store_words
        streamed = self.data == "stream" or (self.data == "auto" and not fits)
        slots = min(cfg.store_words // record, SETUP_WORD_MAX) if streamed else 0
        if streamed and slots < 1:
            raise TrainingError(f"one record of {record} words does not fit the device's store "
                                f"of {cfg.store_words} words")
        words = pack_setup(cfg, tc, train.steps, train.count, n_test, k=train.k, o=train.o,
                           slots=slots)
        if not streamed:
            self.dev.store(0, train.image(cfg))
            if test is not None:
                self.dev.store(train.count * record, test.image(cfg))
        self.dev.train_setup(words)
        self.slots, self._uploaded = slots, True

    @property
    def streamed(self) -> bool:
        """The uploaded setup streams its passes."""
        return self.slots > 0

    def write_state(self, state: TrainState) -> None:
        self._upload()
        for which, arrays in ((1, state.moment), (0, state.master)):
            self.dev.write_master(which, np.concatenate(
                [np.asarray(arrays[k], dtype=np.int64).ravel() for k in PARAM_NAMES]))
        self._epoch = state.epoch

    def read_state(self) -> TrainState:
        if self._epoch is None:
            raise DeviceError("the device has no training state yet")
        shapes = self.config.param_shapes()

        def split(words):
            out, pos = {}, 0
            for k in PARAM_NAMES:
                size = int(np.prod(shapes[k]))
                out[k] = words[pos:pos + size].reshape(shapes[k]).copy()
                pos += size
            return out
        return TrainState(split(self.dev.read_master(0)), split(self.dev.read_master(1)), self._epoch)

    def _stream(self, store: SampleStore, order, progress, done: int) -> int:
        """Send ``store``'s records in ``order`` in transfers of a ring's worth of whole
        records (at most the store's words), polling METRICS between transfers; returns
        the samples done so far."""
        cfg, per = self.config, self.slots
        image = store.image(cfg).reshape(store.count, -1)
        # A chunk's ack may wait for the samples that free its words; the last one for
        # the pass to end, the whole ring and the one running.
        sample = 8 * store.steps * cfg.macs_forward_step // cfg.lanes
        wait = (per + 2) * sample
        order = list(order)
        for lo in range(0, len(order), per):
            self.dev.stream(image[order[lo:lo + per]].ravel(), wait_cycles=wait)
            f = self.dev.metrics()
            if progress is not None and f["samples"] > done:
                progress(f["samples"] - done)
            done = max(done, f["samples"])
        return done

    def _pass(self, cmd, arg: int, store: SampleStore, progress, order=None) -> Metrics:
        self.dev.start_pass(cmd, arg)
        done, last_change = 0, time.monotonic()
        if self.streamed:
            done = self._stream(store, range(store.count) if order is None else order,
                                progress, done)
        while True:
            f = self.dev.metrics()
            if f["samples"] > done:
                if progress is not None:
                    progress(f["samples"] - done)
                done, last_change = f["samples"], time.monotonic()
            if f["running"] == Pass.NONE:
                break
            if time.monotonic() - last_change > PASS_STALL_SECONDS:
                raise DeviceError(f"the device's {cmd.name} pass made no progress for "
                                  f"{PASS_STALL_SECONDS:.0f} s (at sample {done} of {store.count})")
            time.sleep(self.poll_seconds)
        if f["samples"] != store.count:
            raise DeviceError(f"the device's {cmd.name} pass ended after {f['samples']} of "
                              f"{store.count} samples")
        return Metrics(f["samples"], f["loss_sum"], store.loss_elements(self.config),
                       TrainFormats(self.config).loss_frac,
                       f["correct"] if store.kind == "onehot" else None, f["skipped"])

    def run_epoch(self, progress=None) -> Metrics:
        self._upload()
        if self._epoch is None:
            raise DeviceError("the device has no training state yet")
        train = self._sets["train"]
        m = self._pass(Command.TRAIN, self._epoch, train, progress,
                       epoch_order(train.count, self._tc.seed, self._epoch))
        self._epoch += 1
        return m

    def _set(self, which: str) -> SampleStore:
        if which not in self._sets:
            raise DeviceError(f"the device holds no {which} set")
        return self._sets[which]

    def evaluate(self, which: str) -> Metrics:
        self._upload()
        return self._pass(Command.EVAL, SETS.index(which), self._set(which), None)

    def forward_outputs(self, which: str) -> np.ndarray:
        st, cfg = self._set(which), self.config
        out = np.empty((st.count, st.steps, cfg.o), dtype=np.int64)
        for i in range(st.count):
            self.dev.load(st.core_inputs(cfg, i))
            out[i] = self.dev.forward("centred")      # centred: nothing accumulates
        return out

    def close(self) -> None:
        self.dev.close()


def store_words_for(task: Task, idx_train, idx_test, cfg: HelConfig) -> int:
    """The store a simulated device needs for a task's sets: the records of both,
    rounded up to a power of two (at least 1024 words)."""
    need = (len(idx_train) + len(idx_test)) * record_words(cfg, loss_kind_for(task), task.t,
                                                           task.k, task.o)
    return max(1024, 1 << max(0, need - 1).bit_length())


def open_onchip_device(spec: str, cfg: HelConfig, data: str = "auto") -> OnChipDevice:
    """The training device behind ``--device spec`` (``cfg``: the run's configuration,
    with the store a named device should have; ``data``: :data:`DATA_MODES`), or a
    one-line :class:`UsageError` for a device without the training mode."""
    if spec == "sim":
        return GoldenOnChipDevice(cfg)
    from hel_fpga.host.registry import open_device  # noqa: PLC0415 (pyserial on demand)
    dev = open_device(spec, cfg if spec in ("model", "sim-board") else None)
    if dev.config.store_words < 1:
        name = dev.ident().name
        dev.close()
        raise UsageError(f"--on-chip: device {spec} ({name}) has no on-chip training: its IDENT "
                         f"reports store_words = 0 (the iCEBreaker's UP5K has no room for it); "
                         f"train host-driven on it without --on-chip, or on-chip on an ECP5 board")
    return ProtocolOnChipDevice(dev, data=data)


# --------------------------------------------------------------------------- data


def loss_kind_for(task: Task) -> str:
    """The on-chip loss of a task: masked MSE (regression) or MSE to one-hot (classification)."""
    return "onehot" if task.classification else "mse"


def task_store(task: Task, idx, cfg: HelConfig, *, k: int | None = None,
               o: int | None = None) -> SampleStore:
    """Samples ``idx`` of ``task`` as an integer store for a core ``cfg``, at the data's
    own widths: ``k`` input channels and ``o`` outputs (default the task's; a task
    already padded to a device keeps its first ``k`` channels).

    Inputs and regression targets are rounded to the operand format;
    classification keeps the labels. The device feeds zeros to its other inputs
    and trains only the first ``o`` outputs. Raises a one-line
    :class:`UsageError` when the samples do not fit: T > t_max, more input
    channels than K, more outputs than O, labels beyond 0..o−1, values beyond
    the operand range.
    """
    idx = np.asarray(idx, dtype=np.int64)
    name = task.name
    k = task.k if k is None else k
    o = task.o if o is None else o
    if task.t > cfg.t_max:
        raise UsageError(f"task {name}: sequences of T = {task.t} steps exceed the device's "
                         f"t_max = {cfg.t_max}")
    if k > cfg.k:
        raise UsageError(f"task {name}: {k} input channels, the device has K = {cfg.k}")
    if o > cfg.o:
        raise UsageError(f"task {name}: {o} outputs, the device has O = {cfg.o}")
    if task.classification:
        lab = np.asarray(task.labels)[idx]
        if lab.size and (lab.min() < 0 or lab.max() >= o):
            raise UsageError(f"task {name}: labels must be in 0..{o - 1} ({o} classes), "
                             f"got {int(lab.min())}..{int(lab.max())}")
    u = np.asarray(task.u, dtype=np.float64)[idx][:, :, :k]
    try:
        ui = cfg.operand.quantize(u, f"task {name}: inputs")
        if task.classification:
            return SampleStore.classification(cfg, ui, lab, classes=o)
        yi = TrainFormats(cfg).target.quantize(np.asarray(task.y)[idx][:, :, :o],
                                                    f"task {name}: targets")
        return SampleStore.regression(cfg, ui, yi, np.asarray(task.mask)[idx])
    except (FormatError, TrainingError) as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith("task ") else f"task {name}: {msg}") from None


# --------------------------------------------------------------------------- settings


def pow2_log2(value, option: str, *, what: str = "a power of two") -> int:
    """log2 of ``value`` if it is an exact power of two, else a one-line UsageError
    naming the nearest powers of two."""
    v = float(value)
    if not (v > 0 and math.isfinite(v)):
        raise UsageError(f"{option} must be a positive power of two for --on-chip, got {value}")
    m, e = math.frexp(v)  # v = m · 2^e, m in [0.5, 1)
    if m == 0.5:
        return e - 1
    lo, hi = e - 1, e

    def show(k):
        return f"{2 ** k}" if k >= 0 else f"{2.0 ** k:g} (2^{k})"
    raise UsageError(f"{option} {value} is not {what} (on-chip rates and batches are shifts); "
                     f"the nearest are {show(lo)} and {show(hi)}")


def resolve_onchip_settings(explicit: dict, task: Task, ck_settings: dict | None = None) -> dict:
    """The settings of an on-chip run: the checkpoint's (``ck_settings``), or the
    explicit options over the on-chip defaults.

    Defaults: the task's model size, epochs and batch; Lion; lr and ε from
    :mod:`hel_fpga.spec.training` (``DEFAULT_LR_LOG2`` per optimiser and loss,
    ``DEFAULT_EPS_LOG2`` per loss kind: every step or the final step); the
    ``halving`` schedule; the centred estimator (the only one on chip).
    """
    if ck_settings is not None:
        return resumed_settings(ck_settings, explicit)
    d = task.defaults
    loss = loss_kind_for(task)
    optimizer = explicit.get("optimizer", DEFAULT_OPTIMIZER)
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    return {
        "task": explicit.get("task", task.name),
        "algorithm": explicit.get("algorithm", "hel"),
        "on_chip": True,
        "optimizer": optimizer,
        "oscillators": explicit.get("oscillators", d["oscillators"]),
        "hidden": explicit.get("hidden", d["hidden"]),
        "epochs": explicit.get("epochs", d["epochs"]),
        "batch": explicit.get("batch", d["batch"]),
        "lr": explicit.get("lr", 2.0 ** -DEFAULT_LR_LOG2[(optimizer, loss)]),
        "lr_schedule": explicit.get("lr_schedule", "halving"),
        "eps": explicit.get("eps", 2.0 ** -DEFAULT_EPS_LOG2[task.loss_kind]),
        "estimator": explicit.get("estimator", "centred"),
        "seed": explicit.get("seed", 0),
        "validation": explicit.get("validation"),
    }


def train_config_for(s: dict, task: Task) -> TrainConfig:
    """The run's settings as the ``TrainConfig`` the host writes to the device."""
    if s.get("algorithm", "hel") != "hel":
        raise UsageError(f"--on-chip trains integer HEL on the device; --algorithm {s['algorithm']} "
                         "runs on the CPU (drop one of them)")
    if s["estimator"] != "centred":
        raise UsageError(f"--on-chip uses the centred estimator only (got --estimator {s['estimator']})")
    if s["lr_schedule"] not in ("halving", "constant"):
        raise UsageError(f"--on-chip schedules are halving (default) and constant, not {s['lr_schedule']}")
    if not isinstance(s["epochs"], int) or s["epochs"] < 1:
        raise UsageError(f"--epochs must be ≥ 1, got {s['epochs']}")
    if not isinstance(s["batch"], int) or s["batch"] < 1:
        raise UsageError(f"--batch must be ≥ 1, got {s['batch']}")
    batch_log2 = pow2_log2(s["batch"], "--batch")
    lr_log2 = -pow2_log2(s["lr"], "--lr")
    eps_log2 = -pow2_log2(s["eps"], "--eps")
    try:
        return TrainConfig(loss=loss_kind_for(task), optimizer=s["optimizer"], eps_log2=eps_log2,
                           batch_log2=batch_log2, lr_log2=lr_log2, schedule=s["lr_schedule"],
                           epochs=s["epochs"], seed=s["seed"])
    except TrainingError as e:
        raise UsageError(f"--on-chip: {e}") from None


def initial_state(params: dict[str, np.ndarray], cfg: HelConfig) -> TrainState:
    """The host's float initialisation as master weights (rounded, clamped), zero moments."""
    fm = TrainFormats(cfg)
    master = master_from_float(params, fm)
    return TrainState(master, {k: np.zeros_like(master[k]) for k in PARAM_NAMES}, 0)


def params_of(state: TrainState, cfg: HelConfig) -> dict[str, np.ndarray]:
    """The core's integer parameters for a state (the re-quantised master weights)."""
    fm = TrainFormats(cfg)
    return {k: requantize(state.master[k], fm) for k in PARAM_NAMES}


def metrics_dict(m: Metrics) -> dict:
    """A device's metrics as JSON: the integers and their float meaning."""
    return {"samples": m.samples, "loss_sum": int(m.loss_sum), "loss_elements": m.loss_elements,
            "loss_frac": m.loss_frac, "correct": m.correct, "overflow_batches": m.overflow_batches,
            "loss": m.mse, "accuracy": m.accuracy}


def train_config_dict(tc: TrainConfig) -> dict:
    """A TrainConfig as JSON, with the rates it stands for."""
    return {**asdict(tc), "lr": tc.lr, "eps": tc.eps, "batch": tc.batch}
