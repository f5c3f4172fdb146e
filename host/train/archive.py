"""Time-series classification archive tasks: ``--task aeon:NAME``.

The UCR/UEA archive is what sequence classifiers are judged on. The ``aeon``
wheel ships a handful of its classification data sets (no download), and
:func:`load_aeon_task` turns any of them into a :class:`~hel_fpga.host.train.tasks.Task`:

* **Split**: the archive's own train/test split (``split=train`` and ``test``).
* **Normalisation**: per channel, the mean and standard deviation over every
  time step of the *training* series (the test split never informs it); the
  normalised values are clipped to the device's input range ±3.99 (docs/train.md
  gives the fraction of values clipped per data set; it is below 0.1 % on the
  four benchmark sets).
* **Variable length** (JapaneseVowels: 7–29 steps): series are padded with zeros
  (the channel mean after normalisation) *in front* and end together at step
  T = the longest series. The classification loss sits on the final step, so it
  is each series' own last step, and the hardware's final-step loss and echo
  need no per-sample step index. The zero prefix only lets the network drift
  under its bias, the same drift for every series of one length.
* **Classes** map to outputs 0..C−1 in the order the archive file declares them
  (its ``@classLabel`` line), so output ``c`` means the same class in every run.

:data:`DATASET_DEFAULTS` holds the model size and schedule per data set, chosen
on a validation split cut from the training split only (``hel archive
--select``, docs/train.md "Archive benchmarks"); :data:`ONCHIP_DEFAULTS` the
on-chip rates of the archive board (:data:`ARCHIVE_BOARD`), chosen the same way
(``hel archive --select --algorithms onchip``) for the data sets the board takes
(:func:`board_fit`);
:data:`REFERENCES` holds the published accuracies the README table puts beside
ours, with their sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from hel_fpga.host.train.dataset import INPUT_LIMIT, Task, TaskError

__all__ = ["AEON_PREFIX", "bundled_datasets", "load_aeon_task", "DATASET_DEFAULTS",
           "ONCHIP_DEFAULTS", "ARCHIVE_BOARD", "BoardFit", "board_fit",
           "BENCHMARK_DATASETS", "Reference", "REFERENCES"]

AEON_PREFIX = "aeon:"

#: The data sets of the README's archive table (``hel archive`` runs these by default).
BENCHMARK_DATASETS = ("JapaneseVowels", "GunPoint", "ItalyPowerDemand", "BasicMotions")

#: Leapfrog step of every archive task: one archive sample per step.
ARCHIVE_DT = 1 / 8

#: Model size and schedule per data set, chosen by ``hel archive --select`` on
#: 2026-12-07 (validation accuracy of float BPTT / float RHEL at the chosen point:
#: JapaneseVowels 0.965 / 0.965, GunPoint 0.917 / 0.958, ItalyPowerDemand 1.000 /
#: 1.000, BasicMotions 0.812 / 0.812). Data sets not listed get :data:`GENERIC_DEFAULTS`.
DATASET_DEFAULTS: dict[str, dict] = {
    "JapaneseVowels": dict(oscillators=32, hidden=32, epochs=80, batch=8, lr=0.005, eps=0.01),
    "GunPoint": dict(oscillators=64, hidden=64, epochs=80, batch=8, lr=0.02, eps=0.03),
    "ItalyPowerDemand": dict(oscillators=64, hidden=64, epochs=80, batch=8, lr=0.02, eps=0.03),
    "BasicMotions": dict(oscillators=32, hidden=32, epochs=20, batch=8, lr=0.01, eps=0.1),
}
GENERIC_DEFAULTS = dict(oscillators=64, hidden=64, epochs=40, batch=8, lr=0.01)

#: On-chip settings per data set (``hel archive --algorithms onchip``): the runs are
#: the archive board's (:data:`ARCHIVE_BOARD`: N = M = 64, K = 12, O = 9, its store),
#: each data set at its own K and O (``hel train --on-chip --board``). Epochs and
#: batch are :data:`DATASET_DEFAULTS`'; Lion's lr ∈ {2^−6, 2^−7, 2^−8} × ε ∈
#: {2^−2, 2^−3} is chosen by ``hel archive --select --algorithms onchip``:
#: ``hel train --on-chip --device sim --validation 0.25``, seeds 0 and 1, best mean
#: validation accuracy, ties to the lower validation loss (the task's cross-entropy).
#: GunPoint and ItalyPowerDemand were chosen on 2026-12-07 on an N = M = 64 core of
#: the data set's own K and O, the network the board trains (the same oscillators
#: and hidden units; the board's extra inputs see zeros and its extra outputs are
#: in no loss): validation accuracy 0.917 (two points tied) and 1.000 (three tied).
#: BasicMotions (0.812, three tied) and JapaneseVowels (0.965) were chosen on the
#: board's configuration. Data sets not listed train on chip with the device's own
#: rates.
ONCHIP_DEFAULTS: dict[str, dict] = {
    "JapaneseVowels": dict(epochs=80, batch=8, optimizer="lion", lr=2.0 ** -7, eps=2.0 ** -2),
    "GunPoint": dict(epochs=80, batch=8, optimizer="lion", lr=2.0 ** -8, eps=2.0 ** -3),
    "ItalyPowerDemand": dict(epochs=80, batch=8, optimizer="lion", lr=2.0 ** -7, eps=2.0 ** -3),
    "BasicMotions": dict(epochs=20, batch=8, optimizer="lion", lr=2.0 ** -6, eps=2.0 ** -2),
}

#: The board entry (``hel_fpga.boards.table``) the archive's on-chip column is for.
ARCHIVE_BOARD = "ulx3s-85f-n64"


@dataclass(frozen=True)
class BoardFit:
    """Whether archive data set ``dataset`` trains on chip on board entry ``board``,
    and how its sets reach the board's store.

    The board trains the data at their own widths (K channels, one label word a
    record: :func:`hel_fpga.spec.training.record_words`), so it needs K, the classes
    and T within its K, O and t_max. Both sets are resident when their records fit
    the store; otherwise every pass streams its records through a ring in it.
    """

    dataset: str
    board: str
    samples: int           # training + test series
    steps: int             # T
    k: int
    classes: int
    record: int            # store words per series
    store_words: int       # the board's store
    board_k: int
    board_o: int
    t_max: int

    @property
    def words(self) -> int:
        return self.samples * self.record

    @property
    def problems(self) -> list[str]:
        """What the board lacks for this data set (empty: it fits)."""
        out = []
        if self.k > self.board_k:
            out.append(f"{self.k} channels > K = {self.board_k}")
        if self.classes > self.board_o:
            out.append(f"{self.classes} classes > O = {self.board_o}")
        if self.steps > self.t_max:
            out.append(f"T = {self.steps} > t_max = {self.t_max}")
        return out

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def resident(self) -> bool:
        return self.words <= self.store_words

    def describe(self) -> str:
        """One line: ``640 × 349 = 223,360 words > 65,536: streamed``, or what the board lacks."""
        if self.problems:
            return "; ".join(self.problems)
        rel, mode = ("≤", "resident") if self.resident else (">", "streamed")
        return f"{self.samples} × {self.record} = {self.words:,} words {rel} {self.store_words:,}: {mode}"


def board_fit(name: str, board: str | None = None) -> BoardFit:
    """The on-chip figures of archive data set ``name`` on board entry ``board``
    (default :data:`ARCHIVE_BOARD`; :class:`BoardFit`), from the task as ``hel train``
    loads it."""
    board = board or ARCHIVE_BOARD
    from hel_fpga.boards.table import get_board  # noqa: PLC0415
    from hel_fpga.host.train.onchip import loss_kind_for  # noqa: PLC0415
    from hel_fpga.spec.training import record_words  # noqa: PLC0415
    task = load_aeon_task(name)
    cfg = get_board(board).config
    return BoardFit(name, board, samples=len(task.u), steps=task.t, k=task.k, classes=task.o,
                    record=record_words(cfg, loss_kind_for(task), task.t, task.k, task.o),
                    store_words=cfg.store_words, board_k=cfg.k, board_o=cfg.o, t_max=cfg.t_max)


def _aeon_data_dir() -> Path:
    try:
        import aeon.datasets  # noqa: PLC0415 (only archive tasks need aeon)
    except ImportError:
        raise TaskError("archive tasks need the aeon package (pip install aeon)") from None
    return Path(aeon.datasets.__file__).parent / "data"


@lru_cache(maxsize=1)
def bundled_datasets() -> tuple[str, ...]:
    """The classification data sets inside the installed ``aeon`` wheel (no download).

    A data set qualifies when its folder holds ``NAME_TRAIN.ts`` and
    ``NAME_TEST.ts`` and the training file declares class labels.
    """
    names = []
    for d in sorted(_aeon_data_dir().iterdir(), key=lambda p: p.name.lower()):
        train, test = d / f"{d.name}_TRAIN.ts", d / f"{d.name}_TEST.ts"
        if not (train.is_file() and test.is_file()):
            continue
        with train.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                low = line.strip().lower()
                if low.startswith("@classlabel"):
                    if low.split()[1:2] == ["true"]:
                        names.append(d.name)
                    break
                if low.startswith("@data"):
                    break
    return tuple(names)


def _load_split(name: str, split: str):
    from aeon.datasets import load_classification  # noqa: PLC0415
    # extract_path points at the wheel's own folder, so aeon never tries a download.
    x, y, meta = load_classification(name, split=split, extract_path=str(_aeon_data_dir()),
                                     return_metadata=True)
    series = [np.asarray(s, dtype=np.float64).T for s in x]  # each (T_i, K)
    return series, [str(v) for v in y], meta


def load_aeon_task(name: str) -> Task:
    """The archive data set ``name`` as a classification task (module docstring)."""
    known = bundled_datasets()
    match = {n.lower(): n for n in known}.get(name.lower())
    if match is None:
        raise TaskError(f"unknown archive data set {name!r}; the aeon wheel bundles: {', '.join(known)}")
    name = match
    train, y_train, meta = _load_split(name, "train")
    test, y_test, _ = _load_split(name, "test")
    series = train + test
    k = series[0].shape[1]
    if any(s.shape[1] != k for s in series):
        raise TaskError(f"aeon:{name}: series have different channel counts")
    if not all(np.all(np.isfinite(s)) for s in series):
        raise TaskError(f"aeon:{name}: the data contain missing values, which archive tasks do not support")

    # Classes in the order the file declares them; labels compare case-insensitively
    # because aeon lower-cases the declaration but not always the values.
    declared = [str(c).lower() for c in meta.get("class_values") or []]
    seen = sorted({v.lower() for v in y_train + y_test})
    classes = declared if declared and set(seen) <= set(declared) else seen
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[v.lower()] for v in y_train + y_test], dtype=np.int64)

    steps = np.concatenate(train)  # every training step, (Σ T_i, K)
    mean, std = steps.mean(0), steps.std(0)
    std = np.where(std > 0, std, 1.0)
    t = max(len(s) for s in series)
    u = np.zeros((len(series), t, k))
    for i, s in enumerate(series):
        u[i, t - len(s):] = (s - mean) / std
    clipped = float(np.mean(np.abs(u) > INPUT_LIMIT))
    u = np.clip(u, -INPUT_LIMIT, INPUT_LIMIT)
    split = np.r_[np.zeros(len(train), int), np.ones(len(test), int)]
    lengths = sorted({len(s) for s in series})
    shape = f"T = {t}" if len(lengths) == 1 else f"T = {lengths[0]}–{t}, front-padded"
    return Task(
        f"aeon:{name}", "classification", u=u, split=split, o=len(classes), labels=labels, tau=0.1,
        dt=ARCHIVE_DT, defaults=dict(DATASET_DEFAULTS.get(name, GENERIC_DEFAULTS)),
        description=(f"archive data set {name} (aeon): {len(train)}/{len(test)} series, {shape}, "
                     f"K = {k}, {len(classes)} classes; {clipped:.3%} of values clipped to ±{INPUT_LIMIT}"))


@dataclass(frozen=True)
class Reference:
    """A published test accuracy on the archive's default split, and where it is from."""

    accuracy: float | None
    source: str


_UCR_DTW = ("UCR archive 2018 DataSummary.csv, column 'DTW (w=100)' (1-NN DTW, full window; "
            "accuracy = 1 − error), default split")
_UEA_DTW = ("Bagnall et al. 2018, 'The UEA multivariate time series classification archive, 2018' "
            "(arXiv:1811.00075), 1-NN DTW_D, default split")
_ROCKET = ("Dempster, Petitjean, Webb 2020 (ROCKET); github.com/angus924/rocket results/results_ucr.csv "
           "(commit 41cfd4b), accuracy_mean: default split, mean of 10 runs")
_INCEPTION = ("Ismail Fawaz et al. 2020 (InceptionTime); github.com/hfawaz/InceptionTime "
              "results-InceptionTime-128.csv (commit 365ce4d), default split")
_INCEPTION_MTS = ("github.com/hfawaz/InceptionTime results-mts.csv (added in commit 0d623a3, "
                  "removed in 365ce4d; not in the paper), default split")
_NOT_FOUND = ("no default-split figure found: the multivariate bake-off (Ruiz et al. 2021) reports "
              "30-resample means only and leaves out unequal-length sets")

#: data set → classifier → :class:`Reference`: published test accuracies on the
#: archive's default split, each with its source.
REFERENCES: dict[str, dict[str, Reference]] = {
    "JapaneseVowels": {"1-NN DTW": Reference(0.949, _UEA_DTW), "ROCKET": Reference(None, _NOT_FOUND),
                       "InceptionTime": Reference(0.992, _INCEPTION_MTS)},
    "GunPoint": {"1-NN DTW": Reference(0.907, _UCR_DTW), "ROCKET": Reference(1.000, _ROCKET),
                 "InceptionTime": Reference(1.000, _INCEPTION)},
    "ItalyPowerDemand": {"1-NN DTW": Reference(0.950, _UCR_DTW), "ROCKET": Reference(0.970, _ROCKET),
                         "InceptionTime": Reference(0.965, _INCEPTION)},
    "BasicMotions": {"1-NN DTW": Reference(0.975, _UEA_DTW), "ROCKET": Reference(None, _NOT_FOUND),
                     "InceptionTime": Reference(1.000, _INCEPTION_MTS)},
    "ArrowHead": {"1-NN DTW": Reference(0.703, _UCR_DTW), "ROCKET": Reference(0.814, _ROCKET),
                  "InceptionTime": Reference(0.846, _INCEPTION)},
    "OSULeaf": {"1-NN DTW": Reference(0.591, _UCR_DTW), "ROCKET": Reference(0.941, _ROCKET),
                "InceptionTime": Reference(0.942, _INCEPTION)},
}
