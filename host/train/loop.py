"""The training loop behind ``hel train``.

Per epoch: shuffle the training samples with the run's generator, then per
batch obtain the mean gradient from the engine (for ``hel``: LOAD, FORWARD,
host loss and nudges, ECHO per sample on the device, then read and clear the
accumulators), take an Adam step on the float master weights, quantise and
write them to the device. After the epoch: evaluate the test split, append to
the history, write the checkpoint (atomically), ``metrics.json`` and
``log.csv``. After the last epoch: evaluate both splits with the final
parameters, write the plots and the final ``metrics.json``.

Determinism: the initial weights and every batch order come from one
``numpy.random.Generator`` seeded by ``--seed``, whose exact state is part of
the checkpoint; the engines are deterministic (the golden model is bit-exact,
the float paths are plain NumPy), so a resumed run reproduces an uninterrupted
one bit for bit.

On-chip training (``--on-chip``, :func:`_train_on_chip`) hands the loop to the
device instead: the host writes the sets, the ``TrainConfig`` and the initial
master weights (``hel_fpga.host.train.onchip``), then per epoch starts the
epoch, follows its progress, runs EVAL on the test set and reads the training
state back for the checkpoint; the outputs are the same files.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from hel_fpga.host.device import Device, DeviceError, GoldenDevice
from hel_fpga.host.errors import UsageError
from hel_fpga.host.learning import config_for
from hel_fpga.host.registry import DEVICE_NAMES, open_device, takes_config
from hel_fpga.host.train import floatpath
from hel_fpga.host.train.checkpoint import (CHECKPOINT_NAME, Checkpoint, CheckpointError, atomic_write_text,
                                            load_checkpoint, resumed_settings, save_checkpoint)
from hel_fpga.host.train import onchip as oc
from hel_fpga.host.train.engines import ALGORITHMS, DeviceEngine, FloatEngine, default_eps_for
from hel_fpga.host.train.optim import Adam, init_params, lr_at
from hel_fpga.host.train.progress import EpochProgress
from hel_fpga.host.train.tasks import DEFAULT_TASK, Task, TaskError, load_task
from hel_fpga.spec.formats import ConfigError, FormatError, HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.training import TrainingError, lr_shift_at

__all__ = ["TrainOptions", "TrainError", "train", "SETTINGS", "DEFAULT_DEVICE", "ONCHIP_DEFAULT_DEVICE",
           "default_out_dir"]

DEFAULT_DEVICE = "sim-board"
#: --on-chip's default device: the only one with a training mode today.
ONCHIP_DEFAULT_DEVICE = "sim"
#: The settings that decide a run's result (stored in the checkpoint; --resume keeps them).
SETTINGS = ("task", "algorithm", "oscillators", "hidden", "epochs", "batch", "lr", "lr_schedule",
            "eps", "estimator", "seed", "validation")
#: Errors a device (or its link) raises when it fails or stops answering.
DEVICE_FAILURES = (DeviceError, TimeoutError, OSError)


class TrainError(RuntimeError):
    """The run failed after it started (a device stopped answering, a non-finite gradient)."""


@dataclass
class TrainOptions:
    """What ``hel train`` was asked for; ``None`` means "the task's default"
    (or, with ``resume``, "the checkpoint's value")."""

    task: str | None = None
    device: str | None = None
    algorithm: str | None = None
    epochs: int | None = None
    batch: int | None = None
    lr: float | None = None
    lr_schedule: str | None = None
    eps: float | None = None
    estimator: str | None = None
    seed: int | None = None
    oscillators: int | None = None
    hidden: int | None = None
    validation: float | None = None
    out: str | None = None
    resume: bool = False
    overwrite: bool = False
    plots: bool = True
    progress: bool = True
    on_chip: bool = False
    optimizer: str | None = None
    data: str | None = None
    board: str | None = None


def _slug(s: str) -> str:
    s = Path(s).stem if s.endswith(".npz") or "/" in s else s
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "device"


def default_out_dir(task: str, algorithm: str, device: str, on_chip: bool = False) -> Path:
    if on_chip:
        return Path("runs") / f"{_slug(task)}-onchip-{_slug(device)}"
    parts = [_slug(task), algorithm] + ([_slug(device)] if algorithm == "hel" else [])
    return Path("runs") / "-".join(parts)


def _resolve_settings(opts: TrainOptions, task: Task, ck: Checkpoint | None) -> dict:
    explicit = {k: getattr(opts, k) for k in SETTINGS if getattr(opts, k) is not None}
    if ck is not None:
        return resumed_settings(ck.settings, explicit)
    d = task.defaults
    estimator = explicit.get("estimator", "centred")
    return {
        "task": explicit.get("task", DEFAULT_TASK),
        "algorithm": explicit.get("algorithm", "hel"),
        "oscillators": explicit.get("oscillators", d["oscillators"]),
        "hidden": explicit.get("hidden", d["hidden"]),
        "epochs": explicit.get("epochs", d["epochs"]),
        "batch": explicit.get("batch", d["batch"]),
        "lr": explicit.get("lr", d["lr"]),
        "lr_schedule": explicit.get("lr_schedule", "cosine"),
        "eps": explicit.get("eps", d.get("eps", default_eps_for(task, estimator))),
        "estimator": estimator,
        "seed": explicit.get("seed", 0),
        "validation": explicit.get("validation"),
    }


def _check_settings(s: dict, task: Task) -> None:
    if s["algorithm"] not in ALGORITHMS:
        raise UsageError(f"--algorithm must be one of {', '.join(ALGORITHMS)}")
    if s["estimator"] not in ("centred", "one-sided"):
        raise UsageError("--estimator must be centred or one-sided")
    if s["lr_schedule"] not in ("cosine", "constant"):
        raise UsageError("--lr-schedule must be cosine or constant")
    if not isinstance(s["epochs"], int) or s["epochs"] < 1:
        raise UsageError(f"--epochs must be ≥ 1, got {s['epochs']}")
    if not isinstance(s["batch"], int) or s["batch"] < 1:
        raise UsageError(f"--batch must be ≥ 1, got {s['batch']}")
    if not (s["lr"] > 0 and math.isfinite(s["lr"])):
        raise UsageError(f"--lr must be a positive number, got {s['lr']}")
    if not 0 < s["eps"] <= 1:
        raise UsageError(f"--eps must be in (0, 1], got {s['eps']}")
    _check_model_settings(s, task)


def _check_model_settings(s: dict, task: Task) -> None:
    """The checks host-driven and on-chip runs share: model size and validation fraction."""
    if s["oscillators"] < task.o:
        raise UsageError(f"--oscillators {s['oscillators']} is fewer than the task's {task.o} outputs "
                         f"(pass --oscillators {task.o} or more)")
    if s["hidden"] < 1:
        raise UsageError(f"--hidden must be ≥ 1, got {s['hidden']}")
    if s.get("validation") is not None and not 0 < s["validation"] < 1:
        raise UsageError(f"--validation must be a fraction in (0, 1), got {s['validation']}")


def _run_directory(opts: TrainOptions, settings: dict, task: Task, ck: Checkpoint | None,
                   device_spec: str, algorithm: str, on_chip: bool) -> tuple[Task, Path]:
    """The task as the run sees it (with ``--validation``, the hold-out) and the run
    directory, refusing to overwrite a run or to resume to fewer epochs than done."""
    if settings.get("validation"):
        # Model selection: the test split is dropped and never read.
        try:
            task = task.holdout(settings["validation"])
        except TaskError as e:
            raise UsageError(str(e)) from None
    # The device does not decide the result (every device computes the same integers),
    # so a resumed run may move to another one; without --device it keeps its own.
    settings["device"] = device_spec
    out = Path(opts.out) if opts.out else default_out_dir(settings["task"], algorithm, device_spec, on_chip)
    if ck is None and (out / CHECKPOINT_NAME).exists() and not opts.overwrite:
        raise UsageError(f"{out} already holds a training run; pass --resume to continue it, "
                         f"--overwrite to start afresh, or another --out")
    if ck is not None and settings["epochs"] < ck.epoch:
        raise UsageError(f"--epochs {settings['epochs']} is below the {ck.epoch} epochs the checkpoint has done")
    return task, out


def _pad_inputs(task: Task, k: int) -> None:
    """Give the task ``k`` input channels by appending zero channels (a device
    with more inputs than the task: the extra columns of B see u = 0 and stay put)."""
    if k > task.k:
        pad = np.zeros(task.u.shape[:2] + (k - task.k,))
        task.u = np.concatenate([task.u, pad], axis=2)


def _adapt_to_device(dc: HelConfig, spec: str, task: Task, settings: dict, fixed_size: bool) -> HelConfig:
    """Check a device's configuration against the task and take its model size.

    A board's bitstream fixes N, M, K, O, t_max and δ. The run uses the device's
    N and M unless they were given explicitly (or come from a checkpoint), pads
    the inputs with zeros up to the device's K, and needs the task's O, δ and
    sequence length to fit.
    """
    problems = []
    if dc.o < task.o or (dc.o != task.o and not task.classification):
        problems.append(f"{dc.o} outputs (the task has {task.o})")
    if dc.k < task.k:
        problems.append(f"{dc.k} inputs (the task has {task.k})")
    if dc.t_max < task.t:
        problems.append(f"t_max {dc.t_max} (the task's sequences have {task.t} steps)")
    if dc.dt != task.dt:
        problems.append(f"δ = {dc.dt:g} (the task needs {task.dt:g})")
    if fixed_size and (dc.n, dc.m) != (settings["oscillators"], settings["hidden"]):
        problems.append(f"N = {dc.n}, M = {dc.m} (this run: N = {settings['oscillators']}, "
                        f"M = {settings['hidden']})")
    if problems:
        raise UsageError(f"device {spec} does not fit this run: it has " + "; ".join(problems)
                         + _boards_that_fit(task, settings if fixed_size else None))
    settings["oscillators"], settings["hidden"] = dc.n, dc.m
    _pad_inputs(task, dc.k)
    if dc.o > task.o:
        # A classifier with more outputs than classes: the extra outputs are classes
        # that never occur, which the cross-entropy learns to keep low.
        task.o = dc.o
    return dc


def _board_option(opts: TrainOptions, ck: Checkpoint | None, device_spec: str, settings: dict):
    """The board entry whose configuration ``--board`` gives a named device (or the
    checkpoint's), recorded in ``settings``; None without one."""
    name = opts.board or (ck.settings.get("board") if ck is not None else None)
    if name is None:
        return None
    if not takes_config(device_spec):
        raise UsageError(f"--board applies to the named devices ({', '.join(DEVICE_NAMES)}); "
                         f"device {device_spec} reports its own configuration")
    from hel_fpga.boards.table import UnknownBoard, get_board  # noqa: PLC0415
    try:
        board = get_board(name)
    except UnknownBoard as e:
        raise UsageError(f"--board: {e.args[0]}") from None
    settings["board"] = board.name
    return board


def _training_boards() -> list[str]:
    from hel_fpga.boards.table import BOARDS  # noqa: PLC0415
    return [b.name for b in BOARDS.values() if b.config.store_words > 0]


def _boards_that_fit(task: Task, settings: dict | None) -> str:
    """A hint naming the board entries whose configuration takes ``task``."""
    from hel_fpga.boards.table import BOARDS
    fit = [b.name for b in BOARDS.values()
           if b.config.k >= task.k and b.config.t_max >= task.t and b.config.dt == task.dt
           and (b.config.o == task.o or (task.classification and b.config.o > task.o))
           and (settings is None or (b.config.n, b.config.m) == (settings["oscillators"], settings["hidden"]))]
    return (f"; boards whose entry fits: {', '.join(fit)}" if fit
            else "; no board entry fits (docs/boards.md: a table entry with larger K, O or t_max)")


def _device_failed(device_spec: str, out: Path, ck_epoch: int, e: BaseException, where: str) -> TrainError:
    """The one-line error of a device that failed mid-run: where, why, and how to resume."""
    last = f"epoch {ck_epoch}" if ck_epoch else "none yet"
    return TrainError(f"device {device_spec} failed {where}: {e}. The last checkpoint ({last}) in "
                      f"{out} is intact; continue with: hel train --resume --out {out}")


def _evaluate(engine, task: Task, idx: np.ndarray) -> tuple[float | None, float | None]:
    if len(idx) == 0:
        return None, None
    _, _, report, correct = task.loss(engine.predict(idx), idx)
    return float(np.mean(report)), (float(np.mean(correct)) if correct is not None else None)


def _write_log(out: Path, history: list[dict]) -> None:
    cols = ["epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
            "seconds", "samples_per_second", "overflow_batches"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for h in history:
        w.writerow({k: ("" if h.get(k) is None else h.get(k)) for k in cols})
    atomic_write_text(out / "log.csv", buf.getvalue())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))


def train(opts: TrainOptions, device_factory: Callable[[str, HelConfig], Device] | None = None,
          stream=None, onchip_factory: Callable[[str, HelConfig], oc.OnChipDevice] | None = None) -> dict:
    """Run (or resume) a training run; return the metrics also written to metrics.json.

    ``device_factory(spec, cfg)`` opens the device for ``--algorithm hel``
    (default: :func:`hel_fpga.host.registry.open_device`), ``onchip_factory(spec,
    cfg)`` the training device for ``--on-chip`` (default:
    :func:`hel_fpga.host.train.onchip.open_onchip_device`). Raises
    :class:`UsageError` for bad options or task files and :class:`TrainError`
    when the device fails mid-run (the last checkpoint stays intact).
    """
    t_start = time.perf_counter()
    prog = EpochProgress(opts.progress, stream)

    # ---- task, output directory, checkpoint ------------------------------------------
    ck = None
    task_spec = opts.task or DEFAULT_TASK
    algorithm = opts.algorithm or "hel"
    device_spec = opts.device or (ONCHIP_DEFAULT_DEVICE if opts.on_chip else DEFAULT_DEVICE)
    if opts.resume and opts.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if opts.resume:
        out = Path(opts.out) if opts.out else default_out_dir(task_spec, algorithm, device_spec, opts.on_chip)
        try:
            ck = load_checkpoint(out)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        if opts.on_chip and ck.onchip is None:
            raise UsageError(f"{out} holds a host-driven run; resume it without --on-chip")
        task_spec = ck.settings["task"]
        device_spec = opts.device or ck.settings.get("device", device_spec)
    on_chip = opts.on_chip or (ck is not None and ck.onchip is not None)
    if opts.optimizer is not None and not on_chip:
        raise UsageError("--optimizer applies to --on-chip only (host-driven training steps Adam on the host)")
    try:
        task = load_task(task_spec)
    except TaskError as e:
        raise UsageError(str(e)) from None
    if on_chip:
        return _train_on_chip(opts, task, ck, device_spec, onchip_factory, prog, t_start)
    settings = _resolve_settings(opts, task, ck)
    _check_settings(settings, task)
    algorithm = settings["algorithm"]
    task, out = _run_directory(opts, settings, task, ck, device_spec, algorithm, on_chip=False)
    try:
        cfg = config_for(settings["oscillators"], settings["hidden"], task.k, task.o, task.t, task.dt)
    except ConfigError as e:
        raise UsageError(str(e)) from None

    # ---- engine ---------------------------------------------------------------------------
    eps, estimator = settings["eps"], settings["estimator"]
    if algorithm == "hel":
        try:
            task.validate_for_device()
        except TaskError as e:
            raise UsageError(str(e)) from None
        factory = device_factory or open_device
        board = _board_option(opts, ck, device_spec, settings)
        if board is not None:
            cfg = board.config
        # A named device runs the run's configuration; a board has its own, reported
        # by IDENT, and the run adapts to it below.
        try:
            dev = factory(device_spec, cfg if takes_config(device_spec) else None)
        except Exception as e:  # noqa: BLE001 - any failure to open is reported in one line
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(msg if msg.startswith("cannot open device")
                             else f"cannot open device {device_spec!r}: {msg}") from None
        try:
            cfg = _adapt_to_device(dev.config, device_spec, task, settings,
                                   fixed_size=opts.oscillators is not None or opts.hidden is not None
                                   or ck is not None)
        except UsageError:
            dev.close()
            raise
        engine = DeviceEngine(task, dev, eps, estimator)
        device_label = device_spec
    else:
        engine = FloatEngine(task, algorithm, eps, estimator)
        device_label = "cpu"
    n, m = settings["oscillators"], settings["hidden"]
    if ck is not None:
        want = {k: tuple(np.shape(v)) for k, v in ck.params.items()}
        have = {k: tuple(v) for k, v in cfg.param_shapes().items()}
        if ck.params["B"].shape[1] > task.k:
            _pad_inputs(task, ck.params["B"].shape[1])
            have["B"] = (m, task.k)
        if want != have:
            engine.close()
            raise UsageError(f"the checkpoint's parameters have shapes {want}; this run's are {have}")

    # ---- state ---------------------------------------------------------------------------
    clip = cfg.param.max_value
    rng = np.random.default_rng(settings["seed"])
    params = init_params(rng, n, m, task.k)
    for k in PARAM_NAMES:
        params[k] = np.clip(params[k], -clip, clip)
    opt = Adam(params, clip=clip)
    history: list[dict] = []
    start_epoch, wall_before, train_seconds, train_samples = 0, 0.0, 0.0, 0
    if ck is not None:
        for k in PARAM_NAMES:
            params[k][...] = ck.params[k]
        opt.load_state(ck.adam, ck.adam_t)
        rng.bit_generator.state = ck.rng_state
        history = list(ck.history)
        start_epoch, wall_before = ck.epoch, ck.wall_seconds
        train_seconds, train_samples = ck.train_seconds, ck.train_samples
    out.mkdir(parents=True, exist_ok=True)
    train_idx, test_idx = task.train_idx, task.test_idx
    loss_name = "cross-entropy" if task.classification else "MSE"
    epochs = settings["epochs"]

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def fail(e: BaseException, where: str) -> TrainError:
        return _device_failed(device_spec, out, ck_epoch, e, where)

    ck_epoch = start_epoch
    base_metrics = {"task": settings["task"], "device": device_label, "algorithm": algorithm,
                    "settings": settings, "config": cfg.to_dict(), "loss": loss_name,
                    "description": task.description, "out": str(out),
                    "evaluated_on": "validation" if settings.get("validation") else "test"}

    def snapshot(epoch: int) -> None:
        save_checkpoint(out, Checkpoint(
            params=params, adam=opt.state(), adam_t=opt.t, epoch=epoch,
            rng_state=rng.bit_generator.state, settings=settings, config=cfg.to_dict(),
            history=history, wall_seconds=wall(), train_seconds=train_seconds,
            train_samples=train_samples))
        atomic_write_text(out / "metrics.json", json.dumps(
            {**base_metrics, "epochs": epoch, "complete": False, "history": history},
            indent=2, default=_json_default))
        _write_log(out, history)

    try:
        try:
            engine.write(params)
            if isinstance(engine, DeviceEngine):
                engine.start()
        except DEVICE_FAILURES as e:
            raise fail(e, "while writing the initial parameters") from None
        except FormatError as e:
            raise UsageError(str(e)) from None

        if not history:
            try:
                tl, ta = _evaluate(engine, task, test_idx)
            except DEVICE_FAILURES as e:
                raise fail(e, "during the initial evaluation") from None
            history.append({"epoch": 0, "lr": None, "train_loss": None, "train_accuracy": None,
                            "test_loss": tl, "test_accuracy": ta, "seconds": 0.0,
                            "samples_per_second": None, "overflow_batches": 0})

        for epoch in range(start_epoch, epochs):
            lr = lr_at(settings["lr"], settings["lr_schedule"], epoch, epochs)
            perm = rng.permutation(train_idx)
            nb = math.ceil(len(perm) / settings["batch"])
            prog.start(epoch + 1, epochs, len(perm))
            t_ep = time.perf_counter()
            loss_sum, correct_sum, count, overflows = 0.0, 0, 0, 0
            for b in range(nb):
                idx = perm[b * settings["batch"]:(b + 1) * settings["batch"]]
                try:
                    res = engine.train_batch(idx, prog.update)
                except DEVICE_FAILURES as e:
                    prog.close()
                    raise fail(e, f"in epoch {epoch + 1}, batch {b + 1}/{nb}") from None
                loss_sum += float(np.sum(res.report))
                count += len(idx)
                if res.correct is not None:
                    correct_sum += int(np.sum(res.correct))
                if res.overflow:
                    overflows += 1  # the contrast is meaningless: skip this update
                else:
                    try:
                        opt.step(res.grads, lr)
                    except FloatingPointError as e:
                        prog.close()
                        raise TrainError(f"epoch {epoch + 1}, batch {b + 1}: {e}") from None
                try:
                    engine.write(params)
                except DEVICE_FAILURES as e:
                    prog.close()
                    raise fail(e, f"in epoch {epoch + 1}, batch {b + 1}/{nb} (writing parameters)") from None
                prog.show(loss=loss_sum / count,
                          acc=(correct_sum / count) if task.classification else None)
            ep_train = time.perf_counter() - t_ep
            train_seconds += ep_train
            train_samples += count
            try:
                tl, ta = _evaluate(engine, task, test_idx)
            except DEVICE_FAILURES as e:
                prog.close()
                raise fail(e, f"evaluating epoch {epoch + 1}") from None
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / count,
                   "train_accuracy": (correct_sum / count) if task.classification else None,
                   "test_loss": tl, "test_accuracy": ta, "seconds": time.perf_counter() - t_ep,
                   "samples_per_second": count / ep_train if ep_train > 0 else None,
                   "overflow_batches": overflows}
            history.append(row)
            prog.show(loss=row["train_loss"], acc=row["train_accuracy"], test_loss=tl, test_acc=ta)
            prog.close()
            if overflows:
                prog.message(f"warning: {overflows} batch(es) of epoch {epoch + 1} raised the device's "
                             "overflow flag and were skipped")
            snapshot(epoch + 1)
            ck_epoch = epoch + 1

        # ---- final evaluation ------------------------------------------------------------
        try:
            trl, tra = _evaluate(engine, task, train_idx)
            tel, tea = _evaluate(engine, task, test_idx)
        except DEVICE_FAILURES as e:
            raise fail(e, "during the final evaluation") from None
        metrics = {
            **base_metrics, "epochs": epochs, "complete": True,
            "final_train_loss": trl, "final_test_loss": tel,
            "initial_test_loss": history[0]["test_loss"],
            "wall_seconds": wall(), "train_seconds": train_seconds,
            "samples_per_second": train_samples / train_seconds if train_seconds > 0 else None,
            "overflow_batches": int(sum(h.get("overflow_batches") or 0 for h in history)),
            "history": history,
        }
        if task.classification:
            metrics["train_accuracy"] = tra
            metrics["test_accuracy"] = tea
            metrics["initial_test_accuracy"] = history[0]["test_accuracy"]
        if opts.plots:
            try:
                metrics["plots"] = _make_plots(out, task, settings, cfg, params, engine, metrics)
            except DEVICE_FAILURES as e:
                raise fail(e, "while measuring gradient agreement for the plots") from None
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=_json_default))
        _write_log(out, history)
        return metrics
    finally:
        prog.close()
        engine.close()


# --------------------------------------------------------------------------- on-chip training


def _train_on_chip(opts: TrainOptions, task: Task, ck: Checkpoint | None, device_spec: str,
                   onchip_factory, prog: EpochProgress, t_start: float) -> dict:
    """``hel train --on-chip``: the device runs the loop (docs/onchip.md); the host
    writes the sets, the TrainConfig and the initial state, then per epoch starts
    it, follows its progress, runs EVAL and checkpoints the state it reads back.

    Every usage error (settings, data, a device without a training mode) is
    raised before anything is written.
    """
    explicit = {k: getattr(opts, k) for k in SETTINGS + ("optimizer",) if getattr(opts, k) is not None}
    settings = oc.resolve_onchip_settings(explicit, task, ck.settings if ck is not None else None)
    tc = oc.train_config_for(settings, task)
    _check_model_settings(settings, task)
    task, out = _run_directory(opts, settings, task, ck, device_spec, "hel", on_chip=True)
    try:
        task.validate_for_device()
        cfg = config_for(settings["oscillators"], settings["hidden"], task.k, task.o, task.t, task.dt)
    except (TaskError, ConfigError) as e:
        raise UsageError(str(e)) from None

    board = _board_option(opts, ck, device_spec, settings)
    if board is not None:
        cfg = board.config
        if cfg.store_words < 1:
            raise UsageError(f"--on-chip: board {board.name} has no training store (store_words = 0); "
                             f"boards that train on chip: {', '.join(_training_boards())}")
    else:
        cfg = cfg.replace(store_words=oc.store_words_for(task, task.train_idx, task.test_idx, cfg))
    data = opts.data or settings.get("data") or "auto"
    settings["data"] = data
    factory = onchip_factory or functools.partial(oc.open_onchip_device, data=data)
    try:
        dev = factory(device_spec, cfg)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to open is reported in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot open device {device_spec!r} for on-chip training: {msg}") from None
    try:
        return _run_on_chip(opts, task, ck, device_spec, dev, settings, tc, out, prog, t_start)
    finally:
        prog.close()
        dev.close()


def _run_on_chip(opts, task, ck, device_spec, dev, settings, tc, out, prog, t_start) -> dict:
    # The device trains the data at its own widths (k inputs, o outputs) whatever its K and O.
    data_k, data_o = task.k, task.o
    cfg = _adapt_to_device(dev.config, device_spec, task, settings,
                           fixed_size=opts.oscillators is not None or opts.hidden is not None or ck is not None)
    task.o = data_o
    n, m = settings["oscillators"], settings["hidden"]
    try:
        tc.check_for(cfg)
    except TrainingError as e:
        raise UsageError(f"--on-chip: {e}") from None
    train_idx, test_idx = task.train_idx, task.test_idx
    train_store = oc.task_store(task, train_idx, cfg, k=data_k, o=data_o)
    test_store = oc.task_store(task, test_idx, cfg, k=data_k, o=data_o) if len(test_idx) else None
    if ck is not None:
        if ck.onchip_state is None:
            raise UsageError(f"{out} holds a host-driven run; resume it without --on-chip")
        want = {k: tuple(np.shape(ck.onchip_state[f"master_{k}"])) for k in PARAM_NAMES}
        have = {k: tuple(v) for k, v in cfg.param_shapes().items()}
        if want != have:
            raise UsageError(f"the checkpoint's parameters have shapes {want}; this run's are {have}")
        state = oc.TrainState.from_arrays(ck.onchip_state, ck.epoch)
    else:
        # The host's initialisation for the seed (as host-driven runs), clipped, in master format.
        clip = cfg.param.max_value
        params = init_params(np.random.default_rng(settings["seed"]), n, m, cfg.k)
        state = oc.initial_state({k: np.clip(v, -clip, clip) for k, v in params.items()}, cfg)

    history: list[dict] = list(ck.history) if ck is not None else []
    wall_before = ck.wall_seconds if ck is not None else 0.0
    train_seconds = ck.train_seconds if ck is not None else 0.0
    train_samples = ck.train_samples if ck is not None else 0
    epochs = settings["epochs"]
    ck_epoch = state.epoch
    task_loss = "cross-entropy" if task.classification else "MSE"
    base_metrics = {"task": settings["task"], "device": device_spec, "algorithm": "hel", "mode": "on-chip",
                    "settings": settings, "config": cfg.to_dict(), "train_config": oc.train_config_dict(tc),
                    "loss": task_loss, "onchip_loss": oc.LOSS_DEFINITIONS[tc.loss],
                    "loss_definitions": {
                        "final_train_loss, final_test_loss, initial_test_loss":
                            f"the task's own {task_loss} on the host from FORWARD outputs (as host-driven runs)",
                        "history train_loss, test_loss; onchip_*": oc.LOSS_DEFINITIONS[tc.loss]},
                    "description": task.description, "out": str(out),
                    "evaluated_on": "validation" if settings.get("validation") else "test"}

    def wall() -> float:
        return wall_before + time.perf_counter() - t_start

    def fail(e: BaseException, where: str) -> TrainError:
        return _device_failed(device_spec, out, ck_epoch, e, where)

    def task_eval(which: str, idx) -> tuple[float | None, float | None]:
        """The task's own loss and accuracy from the device's FORWARD outputs."""
        if len(idx) == 0:
            return None, None
        y = cfg.outputs_to_float(dev.forward_outputs(which))[:, :, :data_o]
        _, _, report, correct = task.loss(y, idx)
        return float(np.mean(report)), (float(np.mean(correct)) if correct is not None else None)

    def snapshot(st: oc.TrainState) -> None:
        save_checkpoint(out, Checkpoint(
            params=cfg.params_to_float(oc.params_of(st, cfg)), adam={}, adam_t=0, epoch=st.epoch,
            rng_state={}, settings=settings, config=cfg.to_dict(), history=history, wall_seconds=wall(),
            train_seconds=train_seconds, train_samples=train_samples,
            onchip_state=st.arrays(), onchip={"train_config": oc.train_config_dict(tc), "epoch": st.epoch}))
        atomic_write_text(out / "metrics.json", json.dumps(
            {**base_metrics, "epochs": st.epoch, "complete": False, "history": history},
            indent=2, default=_json_default))
        _write_log(out, history)

    # ---- the device gets the run ------------------------------------------------------------
    try:
        dev.write_train_config(tc)
        dev.write_set("train", train_store)
        if test_store is not None:
            dev.write_set("test", test_store)
        dev.write_state(state)
    except TrainingError as e:
        raise UsageError(f"--on-chip: {e}") from None
    except DEVICE_FAILURES as e:
        raise fail(e, "while receiving the training set and settings") from None
    out.mkdir(parents=True, exist_ok=True)

    if not history:
        try:
            me = dev.evaluate("test") if test_store is not None else None
            tl, ta = task_eval("test", test_idx)
        except DEVICE_FAILURES as e:
            raise fail(e, "during the initial evaluation") from None
        history.append({"epoch": 0, "lr": None, "train_loss": None, "train_accuracy": None,
                        "test_loss": me.mse if me else None, "test_accuracy": me.accuracy if me else None,
                        "seconds": 0.0, "samples_per_second": None, "overflow_batches": 0,
                        "task_test_loss": tl, "task_test_accuracy": ta,
                        "test_metrics": oc.metrics_dict(me) if me else None})

    for epoch in range(state.epoch, epochs):
        lr_shift = lr_shift_at(tc, epoch)
        prog.start(epoch + 1, epochs, train_store.count)
        done = [0]

        def progress(k: int) -> None:
            done[0] += k
            prog.update(k)
        t_ep = time.perf_counter()
        try:
            mt = dev.run_epoch(progress)
        except DEVICE_FAILURES as e:
            prog.close()
            raise fail(e, f"in epoch {epoch + 1}, sample {done[0]}/{train_store.count}") from None
        ep_train = time.perf_counter() - t_ep
        train_seconds += ep_train
        train_samples += mt.samples
        prog.show(loss=mt.mse, acc=mt.accuracy)
        try:
            me = dev.evaluate("test") if test_store is not None else None
            st = dev.read_state()
        except DEVICE_FAILURES as e:
            prog.close()
            raise fail(e, f"after epoch {epoch + 1} (EVAL and reading the training state)") from None
        if st.epoch != epoch + 1:
            prog.close()
            raise TrainError(f"device {device_spec} reports epoch {st.epoch} after epoch {epoch + 1}; "
                             f"the last checkpoint in {out} is intact")
        row = {"epoch": epoch + 1, "lr": 2.0 ** -lr_shift, "train_loss": mt.mse,
               "train_accuracy": mt.accuracy, "test_loss": me.mse if me else None,
               "test_accuracy": me.accuracy if me else None, "seconds": time.perf_counter() - t_ep,
               "samples_per_second": mt.samples / ep_train if ep_train > 0 else None,
               "overflow_batches": mt.overflow_batches, "lr_shift": lr_shift,
               "train_metrics": oc.metrics_dict(mt), "test_metrics": oc.metrics_dict(me) if me else None}
        history.append(row)
        prog.show(loss=row["train_loss"], acc=row["train_accuracy"], test_loss=row["test_loss"],
                  test_acc=row["test_accuracy"])
        prog.close()
        if mt.overflow_batches:
            prog.message(f"warning: {mt.overflow_batches} batch(es) of epoch {epoch + 1} raised the device's "
                         "overflow flag and were skipped")
        snapshot(st)
        ck_epoch, state = st.epoch, st

    # ---- final evaluation: the device's metrics and the task's own loss ----------------------
    try:
        mtr = dev.evaluate("train")
        trl, tra = task_eval("train", train_idx)
        tel, tea = task_eval("test", test_idx)
    except DEVICE_FAILURES as e:
        raise fail(e, "during the final evaluation") from None
    last_test = history[-1].get("test_metrics")
    metrics = {
        **base_metrics, "epochs": epochs, "complete": True,
        "final_train_loss": trl, "final_test_loss": tel,
        "initial_test_loss": history[0].get("task_test_loss"),
        "onchip_final_train_loss": mtr.mse,
        "onchip_final_test_loss": last_test["loss"] if last_test else None,
        "onchip_initial_test_loss": history[0]["test_loss"],
        "onchip_final_train": oc.metrics_dict(mtr), "onchip_final_test": last_test,
        "wall_seconds": wall(), "train_seconds": train_seconds,
        "samples_per_second": train_samples / train_seconds if train_seconds > 0 else None,
        "overflow_batches": int(sum(h.get("overflow_batches") or 0 for h in history)),
        "history": history,
    }
    if task.classification:
        metrics.update(train_accuracy=tra, test_accuracy=tea,
                       initial_test_accuracy=history[0].get("task_test_accuracy"),
                       onchip_final_train_accuracy=mtr.accuracy,
                       onchip_final_test_accuracy=last_test["accuracy"] if last_test else None)
    if opts.plots:
        # The loss curves (the device's per-epoch metrics) and the forward-vs-echo picture
        # at the final parameters; no gradient plot (it measures the host-driven gradient).
        pm = {**metrics, "loss": "on-chip MSE to one-hot" if tc.loss == "onehot" else "MSE (on-chip)"}
        metrics["plots"] = _make_plots(out, task, {**settings, "eps": tc.eps}, cfg,
                                       cfg.params_to_float(oc.params_of(state, cfg)), None, pm,
                                       gradients=False)
        metrics["echo_retrace_max_abs"] = pm["echo_retrace_max_abs"]
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=_json_default))
    _write_log(out, history)
    return metrics


# --------------------------------------------------------------------------- plots


def _make_plots(out: Path, task: Task, settings: dict, cfg: HelConfig, params, engine, metrics,
                gradients: bool = True) -> dict:
    from hel_fpga.host.train import plots
    from hel_fpga.sim import reference
    from hel_fpga.sim.golden import GoldenCore

    algorithm, eps, est = settings["algorithm"], settings["eps"], settings["estimator"]
    title = (f"{task.name}: {algorithm}" + (" on-chip" if settings.get("on_chip") else "")
             + (f" on {metrics['device']}" if algorithm == "hel" else " (float64, CPU)")
             + f", N={settings['oscillators']}, M={settings['hidden']}, {settings['epochs']} epochs")
    files = {}
    plots.plot_curves(out / "curves.png", metrics["history"], title, task.classification, metrics["loss"])
    files["curves"] = "curves.png"

    # The integer model's parameters (what a device runs) and their float values.
    p_int = cfg.quantize_params(params)
    p_q = cfg.params_to_float(p_int)

    # Forward vs echo on one test sample (or a training sample if there is no test split).
    i = int((task.test_idx if len(task.test_idx) else task.train_idx)[0])
    _, g, _, _ = task.loss(floatpath.outputs(p_q, task.u[i:i + 1], task.dt, task.o), np.array([i]))
    g = g[0]
    t_len = task.t
    if algorithm == "hel":
        core = GoldenCore(cfg)
        core.write_params(**p_int)
        core.load(cfg.quantize_inputs(task.u[i]))
        yf = cfg.outputs_to_float(core.forward("centred"))
        # GoldenCore.echo returns the echo banks' outputs after every echo step.
        r0 = core.echo(np.zeros((t_len, cfg.o), dtype=np.int64))
        core.forward("centred")
        rn = core.echo(cfg.nudges(g, eps))
        retr = cfg.outputs_to_float(r0[0])
        plus, minus = cfg.outputs_to_float(rn[0]), cfg.outputs_to_float(rn[1])
        yT = yf[-1]
        label = "golden integer model"
    else:
        tr = reference.forward(p_q, task.u[i], task.dt)
        o0 = cfg.n - cfg.o
        yf = tr.q[1:, o0:]
        yT = yf[-1]
        ech = []
        for sgn in (0.0, 1.0, -1.0):
            _, et = reference.echo(p_q, task.u[i], tr.q[-1], tr.p[-1], sgn * eps * g[::-1], task.dt)
            ech.append(et.q[1:, o0:])
        retr, plus, minus = ech
        label = "float model"

    def to_time(echo_out):
        # Echo step s ends at forward position index T−1−s; the echo starts at q_T.
        pos = np.empty((t_len + 1, cfg.o))
        pos[:t_len] = echo_out[::-1]
        pos[t_len] = yT
        return pos

    fwd = np.vstack([np.zeros((1, cfg.o)), yf])
    time_axis = np.arange(t_len + 1) * task.dt
    plots.plot_echo(out / "echo.png", time_axis, fwd, to_time(retr), to_time(plus), to_time(minus), eps,
                    f"{task.name}, sample {i}: forward and echoes of the outputs ({label})")
    files["echo"] = "echo.png"
    metrics["echo_retrace_max_abs"] = float(np.max(np.abs(to_time(retr) - fwd)))
    if not gradients:
        return files

    # Gradient agreement on one batch at the final (quantised) parameters.
    idx = task.train_idx[: min(16, settings["batch"] * 2, len(task.train_idx))]
    fb = FloatEngine(task, "bptt", eps, est)
    fb.write(p_q)
    g_ref = fb.train_batch(idx).grads
    fr = FloatEngine(task, "rhel-float", eps, est)
    fr.write(p_q)
    rows = {"float RHEL": fr.train_batch(idx).grads}
    if isinstance(engine, DeviceEngine):
        engine.write(params)
        engine.dev.clear_accumulators()
        rows[f"HEL on {metrics['device']}"] = engine.train_batch(idx).grads
    else:
        de = DeviceEngine(task, GoldenDevice(cfg), eps, est)
        de.start()
        de.write(params)
        rows["HEL, golden integer"] = de.train_batch(idx).grads
    cos = {m: {k: reference.cosine(v[k], g_ref[k]) for k in PARAM_NAMES} for m, v in rows.items()}
    plots.plot_gradients(out / "gradients.png", cos,
                         f"{task.name}: gradient agreement with BPTT ({len(idx)} samples, ε = {eps:g}, {est})")
    files["gradients"] = "gradients.png"
    metrics["gradient_cosine"] = cos
    return files
