"""``hel train --on-chip``: the host side of on-chip training.

Each test has its own reference: the golden trainer called directly on stores
built here from the task's floats (not through ``task_store``), an
uninterrupted run for resume, the checkpoint's bytes before a failure, and the
plain definitions of the error cases.
"""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from hel_fpga.host.cli import main
from hel_fpga.host.device import DeviceError
from hel_fpga.host.errors import UsageError
from hel_fpga.host.learning import config_for
from hel_fpga.host.train import onchip as oc
from hel_fpga.host.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from hel_fpga.host.train.loop import TrainError, TrainOptions, train
from hel_fpga.host.train.optim import init_params
from hel_fpga.host.train.tasks import load_task
from hel_fpga.sim.golden import GoldenCore
from hel_fpga.sim.onchip import OnChipTrainer, SampleStore, master_from_float
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.training import TrainConfig, TrainFormats

N = M = 8


def opts(path, out, **kw) -> TrainOptions:
    base = dict(task=str(path), device="sim", on_chip=True, epochs=2, batch=4, out=str(out),
                oscillators=N, hidden=M, plots=False, progress=False)
    base.update(kw)
    return TrainOptions(**base)


def reference_trainer(path, epochs, batch_log2, seed=0):
    """The golden trainer on stores built here from the task file's floats (the
    operand format is 2^13 per unit at 16-bit operands: np.rint(x · 2^OF))."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    u, split = data["u"], data["split"]
    tr, te = split == 0, split == 1
    classification = "labels" in data
    o = int(data["labels"].max()) + 1 if classification else data["y"].shape[2]
    cfg = config_for(N, M, u.shape[2], o, u.shape[1], 1 / 8)
    q = 2.0 ** cfg.operand_frac
    ui = np.rint(u * q).astype(np.int64)
    if classification:
        stores = [SampleStore.classification(cfg, ui[s], data["labels"][s]) for s in (tr, te)]
        tc = TrainConfig(loss="onehot", eps_log2=2, batch_log2=batch_log2, lr_log2=7, epochs=epochs, seed=seed)
    else:
        yi = np.rint(data["y"] * q).astype(np.int64)
        stores = [SampleStore.regression(cfg, ui[s], yi[s]) for s in (tr, te)]
        tc = TrainConfig(loss="mse", eps_log2=5, batch_log2=batch_log2, lr_log2=7, epochs=epochs, seed=seed)
    p = init_params(np.random.default_rng(seed), N, M, u.shape[2])
    clip = cfg.param.max_value
    master = master_from_float({k: np.clip(v, -clip, clip) for k, v in p.items()}, TrainFormats(cfg))
    return cfg, tc, OnChipTrainer(cfg, tc, stores[0], master), stores


class FailingDevice(oc.GoldenOnChipDevice):
    """The golden training device that raises ``exc`` when sample ``fail_at`` (counted over
    the whole run) completes, after calling ``on_fail``."""

    def __init__(self, cfg, fail_at, exc, on_fail=None):
        super().__init__(cfg)
        self.fail_at, self.exc, self.on_fail, self.samples = fail_at, exc, on_fail, 0

    def run_epoch(self, progress=None):
        def counting(k):
            self.samples += k
            if progress:
                progress(k)
            if self.samples >= self.fail_at:
                if self.on_fail:
                    self.on_fail()
                raise self.exc
        return super().run_epoch(counting)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_on_chip_run_on_sim_gives_exactly_the_golden_trainers_integers(
        kind, small_regression, small_classification, tmp_path):
    path = small_regression if kind == "regression" else small_classification
    bar = io.StringIO()
    m = train(opts(path, tmp_path / "r", progress=True), stream=bar)
    cfg, tc, ref, (train_set, test_set) = reference_trainer(path, epochs=2, batch_log2=2)
    rows = ref.fit(test_set)

    # The TrainConfig written to the device: the defaults of spec/training.py.
    assert m["mode"] == "on-chip" and m["train_config"]["loss"] == tc.loss
    assert {k: m["train_config"][k] for k in ("eps_log2", "lr_log2", "batch_log2", "optimizer")} == \
        {"eps_log2": tc.eps_log2, "lr_log2": 7, "batch_log2": 2, "optimizer": "lion"}
    # Every per-epoch integer the device reported, and the state it ended in.
    for h, (mt, me) in zip(m["history"][1:], rows):
        assert (h["train_metrics"]["loss_sum"], h["train_metrics"]["correct"]) == (mt.loss_sum, mt.correct)
        assert (h["test_metrics"]["loss_sum"], h["test_metrics"]["correct"]) == (me.loss_sum, me.correct)
    ck = load_checkpoint(tmp_path / "r")
    assert ck.epoch == 2 and ck.onchip["epoch"] == 2
    for name, arr in ref.state().items():
        if name != "epoch":
            assert np.array_equal(ck.onchip_state[name], arr), name
    assert m["onchip_final_train"]["loss_sum"] == ref.evaluate(train_set).loss_sum
    # The task's own loss, from FORWARD outputs of the final parameters on a fresh core.
    core = GoldenCore(cfg)
    core.write_params(**ref.params())
    task = load_task(str(path))
    outs = []
    for x in test_set.inputs:
        core.load(x)
        outs.append(cfg.outputs_to_float(core.forward("centred")))
    _, _, report, correct = task.loss(np.array(outs), task.test_idx)
    assert m["final_test_loss"] == pytest.approx(float(np.mean(report)), rel=1e-12)
    if kind == "classification":
        assert m["test_accuracy"] == pytest.approx(float(np.mean(correct)))
        assert m["loss"] == "cross-entropy" and "one-hot" in m["onchip_loss"]
    # The tqdm bar counted every training sample.
    assert f"{train_set.count}/{train_set.count}" in bar.getvalue()
    # log.csv: the initial row and one per epoch.
    assert len((tmp_path / "r" / "log.csv").read_text().strip().splitlines()) == 1 + 3


def test_resume_after_a_device_failure_is_bit_exact(small_regression, tmp_path):
    whole = tmp_path / "whole"
    mw = train(opts(small_regression, whole, epochs=3))
    ref = load_checkpoint(whole)

    part = tmp_path / "part"
    seen = {}

    def factory(spec, cfg):
        return FailingDevice(cfg, 24 + 10, DeviceError("no reply within 2.0 s (timeout)"),
                             on_fail=lambda: seen.setdefault("bytes", (part / CHECKPOINT_NAME).read_bytes()))

    with pytest.raises(TrainError) as e:
        train(opts(small_regression, part, epochs=3), onchip_factory=factory)
    msg = str(e.value)
    assert "\n" not in msg and "epoch 2, sample 10/24" in msg and "last checkpoint (epoch 1)" in msg
    assert (part / CHECKPOINT_NAME).read_bytes() == seen["bytes"]
    assert load_checkpoint(part).epoch == 1

    mp = train(TrainOptions(out=str(part), resume=True, plots=False, progress=False))
    got = load_checkpoint(part)
    assert got.epoch == 3 and mp["mode"] == "on-chip"
    assert got.onchip_state.keys() == ref.onchip_state.keys()
    for k, v in ref.onchip_state.items():
        assert np.array_equal(got.onchip_state[k], v), k
    for k in PARAM_NAMES:
        assert np.array_equal(got.params[k], ref.params[k]), k
    for a, b in zip(mp["history"], mw["history"]):
        assert a.get("train_metrics") == b.get("train_metrics") and a["test_metrics"] == b["test_metrics"]
    assert mp["onchip_final_train"] == mw["onchip_final_train"]
    assert mp["final_test_loss"] == mw["final_test_loss"]


def test_ctrl_c_mid_epoch_exits_130_and_leaves_the_last_checkpoint_intact(
        small_regression, tmp_path, capsys, monkeypatch):
    import hel_fpga.host.train.onchip as onchip_mod
    out = tmp_path / "r"
    seen = {}
    monkeypatch.setattr(onchip_mod, "open_onchip_device", lambda spec, cfg, data="auto": FailingDevice(
        cfg, 24 + 5, KeyboardInterrupt(), on_fail=lambda: seen.setdefault("bytes", (out / CHECKPOINT_NAME).read_bytes())))
    rc = main(["train", "--on-chip", "--task", str(small_regression), "--oscillators", "8", "--hidden", "8",
               "--epochs", "3", "--batch", "4", "--out", str(out), "--json", "--no-plots"])
    assert rc == 130
    assert "--resume" in capsys.readouterr().err
    assert (out / CHECKPOINT_NAME).read_bytes() == seen["bytes"]
    assert load_checkpoint(out).epoch == 1
    assert not list(out.glob(".*.tmp"))


def test_an_archive_task_trains_on_chip_with_the_final_step_defaults(tmp_path, capsys):
    pytest.importorskip("aeon.datasets")
    rc = main(["train", "--on-chip", "--task", "aeon:UnitTest", "--oscillators", "8", "--hidden", "8",
               "--epochs", "1", "--out", str(tmp_path / "a"), "--json", "--no-plots"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["train_config"]["loss"] == "onehot" and m["train_config"]["eps_log2"] == 2
    assert m["train_config"]["batch"] == 8 and 0 <= m["test_accuracy"] <= 1
    assert m["onchip_final_test"]["samples"] == 22 and m["onchip_final_train"]["samples"] == 20


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("extra, message", [
    (["--lr", "0.01"], "--lr 0.01 is not a power of two (on-chip rates and batches are shifts); "
                       "the nearest are 0.0078125 (2^-7) and 0.015625 (2^-6)"),
    (["--eps", "0.03"], "the nearest are 0.015625 (2^-6) and 0.03125 (2^-5)"),
    (["--batch", "6"], "--batch 6 is not a power of two"),
    (["--batch", "6"], "the nearest are 4 and 8"),
    (["--algorithm", "bptt"], "--on-chip trains integer HEL on the device; --algorithm bptt"),
    (["--estimator", "one-sided"], "centred estimator only"),
    (["--lr-schedule", "cosine"], "halving (default) and constant"),
    (["--lr", "2"], "lr_log2 = -1 is outside 0..24"),
    (["--device", "/dev/ttyUSB9"], "cannot open device '/dev/ttyUSB9' for on-chip training"),
])
def test_bad_settings_and_devices_are_one_line_errors_that_write_nothing(
        extra, message, small_regression, tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["train", "--on-chip", "--task", str(small_regression), "--oscillators", "8",
               "--hidden", "8", "--epochs", "1", "--out", str(out), "--json"] + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("hel train: error: ") and "\n" not in err and message in err, err
    assert not out.exists()


def test_optimizer_without_on_chip_is_refused(small_regression, tmp_path, capsys):
    rc = main(["train", "--task", str(small_regression), "--device", "sim", "--optimizer", "sgdm",
               "--out", str(tmp_path / "r")])
    assert rc == 2 and "--optimizer applies to --on-chip only" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_sets_that_do_not_fit_the_device_are_one_line_errors(small_regression, small_classification, tmp_path):
    cls = load_task(str(small_classification))      # labels 0..2, T = 12
    reg = load_task(str(small_regression))           # T = 32
    two_outputs = config_for(N, M, 2, 2, 12, 1 / 8)
    short = config_for(N, M, 2, 1, 16, 1 / 8).replace(t_max=16)
    # The conversion itself, against its definition.
    with pytest.raises(UsageError, match=r"3 outputs, the device has O = 2"):
        oc.task_store(cls, cls.train_idx, two_outputs)
    with pytest.raises(UsageError, match=r"labels must be in 0\.\.1 \(2 classes\), got 0\.\.2"):
        oc.task_store(cls, cls.train_idx, two_outputs, o=2)
    with pytest.raises(UsageError, match="T = 32 steps exceed the device's t_max = 16"):
        oc.task_store(reg, reg.train_idx, short)
    big = load_task(str(small_regression))
    big.y = big.y * 20.0
    with pytest.raises(UsageError, match="targets does not fit"):
        oc.task_store(big, big.train_idx, config_for(N, M, 2, 1, 32, 1 / 8))
    # Through the run: a device with its own, smaller configuration; nothing written.
    for path, cfg, message in [(small_classification, two_outputs, "2 outputs (the task has 3)"),
                               (small_regression, short, "t_max 16")]:
        out = tmp_path / Path(path).stem
        with pytest.raises(UsageError, match=re.escape(message)) as e:
            train(opts(path, out), onchip_factory=lambda spec, _cfg, c=cfg: oc.GoldenOnChipDevice(c))
        assert "\n" not in str(e.value) and not out.exists()


def test_quantised_stores_match_the_operand_format(small_regression, small_classification):
    """task_store rounds inputs and targets to nearest in the operand format and keeps
    the data's own widths on a wider core (the device feeds zeros to its other inputs)."""
    reg = load_task(str(small_regression))
    cfg = config_for(N, M, 3, 1, 32, 1 / 8)        # one input channel more than the task
    st = oc.task_store(reg, reg.test_idx, cfg)
    q = 2.0 ** cfg.operand_frac
    assert st.k == 2 and np.array_equal(st.inputs, np.rint(reg.u[reg.test_idx] * q))
    assert np.array_equal(st.targets, np.rint(reg.y[reg.test_idx] * q)) and st.mask.all()
    cls = load_task(str(small_classification))
    sc = oc.task_store(cls, cls.train_idx, config_for(N, M, 2, 4, 12, 1 / 8))
    assert sc.kind == "onehot" and np.array_equal(sc.labels, cls.labels[cls.train_idx])
    assert sc.o == 3                                # three classes on a four-output core


def test_a_host_driven_run_is_not_resumed_on_chip(small_regression, tmp_path):
    out = tmp_path / "h"
    train(TrainOptions(task=str(small_regression), device="sim", epochs=1, batch=4, out=str(out),
                       oscillators=N, hidden=M, plots=False, progress=False))
    before = (out / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(UsageError, match="holds a host-driven run; resume it without --on-chip"):
        train(TrainOptions(out=str(out), resume=True, on_chip=True, plots=False, progress=False))
    assert (out / CHECKPOINT_NAME).read_bytes() == before
