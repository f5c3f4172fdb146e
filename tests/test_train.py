"""``hel train``: float paths against the references, training on ``sim``, exact
resume, a device that stops answering, and user task files."""

import json

import numpy as np
import pytest

from hel_fpga.host.cli import main
from hel_fpga.host.device import Device, DeviceError, GoldenDevice
from hel_fpga.host.errors import UsageError
from hel_fpga.host.learning import config_for
from hel_fpga.host.train import floatpath
from hel_fpga.host.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from hel_fpga.host.train.loop import TrainError, TrainOptions, train
from hel_fpga.host.train.tasks import Task, TaskError, load_task
from hel_fpga.sim import reference
from hel_fpga.spec.names import PARAM_NAMES


# --------------------------------------------------------------------------- helpers


def opts(path, out, **kw) -> TrainOptions:
    base = dict(task=str(path), device="sim", epochs=3, batch=4, lr=0.02, out=str(out),
                oscillators=8, hidden=8, plots=False, progress=False)
    base.update(kw)
    return TrainOptions(**base)


class FlakyDevice(Device):
    """A golden device that stops answering after ``fail_after`` echoes."""

    def __init__(self, cfg, fail_after, exc=None, on_fail=None):
        self.inner = GoldenDevice(cfg)
        self.fail_after, self.echoes = fail_after, 0
        self.exc = exc or DeviceError("no reply within 2.0 s (timeout)")
        self.on_fail = on_fail

    @property
    def config(self):
        return self.inner.config

    def _tick(self):
        if self.echoes >= self.fail_after:
            if self.on_fail:
                self.on_fail()
            raise self.exc

    def echo(self, nudges):
        self._tick()
        self.echoes += 1
        return self.inner.echo(nudges)

    def load(self, u):
        self._tick()
        return self.inner.load(u)

    def ident(self): return self.inner.ident()
    def write_params(self, p): return self.inner.write_params(p)
    def read_params(self): return self.inner.read_params()
    def forward(self, estimator="centred"): return self.inner.forward(estimator)
    def read_accumulators(self): return self.inner.read_accumulators()
    def clear_accumulators(self): return self.inner.clear_accumulators()
    def read_state(self, bank="fwd"): return self.inner.read_state(bank)
    def status(self): return self.inner.status()
    def clear_flags(self): return self.inner.clear_flags()
    def selftest(self, steps, seed=1): return self.inner.selftest(steps, seed)


# --------------------------------------------------------------------------- float paths


def test_batched_float_paths_match_the_references():
    rng = np.random.default_rng(7)
    base = reference.Problem.random(rng, n=6, m=5, k=3, o=2, t=25)
    probs = []
    for _ in range(3):
        p = reference.Problem.random(rng, n=6, m=5, k=3, o=2, t=25)
        probs.append(base.with_params(base.params))
        probs[-1].u, probs[-1].y, probs[-1].mask = p.u, p.y, rng.random(25) < 0.6
    u = np.stack([p.u for p in probs])
    traj = floatpath.forward(base.params, u, base.dt)
    y_hat = traj.outputs(2)
    g = np.stack([np.where(p.mask[:, None], y_hat[i] - p.y, 0.0) for i, p in enumerate(probs)])
    got = floatpath.bptt_grads(base.params, u, base.dt, traj, g)
    for name in PARAM_NAMES:
        want = sum(reference.bptt(p)[1][name] for p in probs)
        np.testing.assert_allclose(got[name], want, rtol=1e-10, atol=1e-12)
    for est in ("centred", "one-sided"):
        got = floatpath.rhel_grads(base.params, u, base.dt, traj, g, 0.03, est)
        for name in PARAM_NAMES:
            want = sum(reference.rhel(p, 0.03, est)[name] for p in probs)
            np.testing.assert_allclose(got[name], want, rtol=1e-9, atol=1e-12)


def test_cross_entropy_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    task = Task("t", "classification", u=np.zeros((3, 4, 1)), split=np.zeros(3, int), o=6,
                labels=np.array([2, 4, 0]))
    idx = np.arange(3)
    y_hat = rng.normal(0, 0.2, (3, task.t, task.o))
    obj, g, _, _ = task.loss(y_hat, idx)
    d = np.zeros_like(y_hat)
    d[1, -1, 4] = 1e-6
    fd = (task.loss(y_hat + d, idx)[0] - task.loss(y_hat - d, idx)[0]) / 2e-6
    assert fd[1] == pytest.approx(g[1, -1, 4], rel=1e-5)
    z = y_hat[1, -1] / task.tau
    assert obj[1] == pytest.approx(np.log(np.exp(z).sum()) - z[4])
    assert np.all(g[:, :-1] == 0)


# --------------------------------------------------------------------------- training


def test_short_training_on_sim_lowers_the_loss_and_writes_the_run(small_regression, tmp_path):
    out = tmp_path / "run"
    m = train(opts(small_regression, out, plots=True))
    assert m["algorithm"] == "hel" and m["device"] == "sim" and m["epochs"] == 3
    assert m["final_test_loss"] < 0.3 * m["initial_test_loss"]
    assert m["history"][-1]["train_loss"] < m["history"][1]["train_loss"]
    for f in ("metrics.json", "log.csv", CHECKPOINT_NAME, "curves.png", "echo.png", "gradients.png"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("task", "device", "algorithm", "epochs", "final_train_loss", "final_test_loss", "wall_seconds"):
        assert key in saved
    assert len((out / "log.csv").read_text().splitlines()) == 1 + 4  # header, epoch 0..3
    assert m["echo_retrace_max_abs"] == 0.0  # the integer echo retraces bit for bit
    assert min(min(v.values()) for v in m["gradient_cosine"].values()) > 0.999


def test_classification_on_sim_reports_accuracy(small_classification, tmp_path):
    m = train(opts(small_classification, tmp_path / "c", epochs=4, batch=6, lr=0.03))
    assert m["loss"] == "cross-entropy"
    assert 0 <= m["train_accuracy"] <= 1 and 0 <= m["test_accuracy"] <= 1
    assert m["final_test_loss"] < m["initial_test_loss"]
    assert m["train_accuracy"] >= 0.9


def test_bptt_baseline_lowers_the_loss(tmp_path):
    m = train(TrainOptions(algorithm="bptt", epochs=3, out=str(tmp_path / "b"), plots=False, progress=False))
    assert m["task"] == "oscillators" and m["device"] == "cpu"
    assert m["final_test_loss"] < 0.1 * m["initial_test_loss"]


def test_resume_after_interruption_is_bit_identical(small_regression, tmp_path):
    whole = tmp_path / "whole"
    train(opts(small_regression, whole))
    ref = load_checkpoint(whole)

    # Fail in epoch 2 (24 samples per epoch): the error names the checkpoint to resume from.
    part = tmp_path / "part"
    with pytest.raises(TrainError, match=r"last checkpoint \(epoch 1\).*--resume"):
        train(opts(small_regression, part), device_factory=lambda spec, cfg: FlakyDevice(cfg, 24 + 10))
    assert load_checkpoint(part).epoch == 1
    m = train(opts(small_regression, part, resume=True, task=None, epochs=None, batch=None, lr=None,
                   oscillators=None, hidden=None))
    got = load_checkpoint(part)
    assert got.epoch == 3 and m["epochs"] == 3
    for k in PARAM_NAMES:
        assert np.array_equal(got.params[k], ref.params[k]), k
        assert np.array_equal(got.adam[f"m_{k}"], ref.adam[f"m_{k}"]), k
    assert got.rng_state == ref.rng_state
    assert [h["test_loss"] for h in got.history] == [h["test_loss"] for h in ref.history]


def test_a_device_that_stops_answering_leaves_the_last_checkpoint_intact(small_regression, tmp_path):
    out = tmp_path / "run"
    seen = {}

    def snapshot():
        seen["bytes"] = (out / CHECKPOINT_NAME).read_bytes()

    def factory(spec, cfg):
        return FlakyDevice(cfg, 2 * 24 + 5, exc=TimeoutError("serial read timed out"), on_fail=snapshot)

    with pytest.raises(TrainError) as e:
        train(opts(small_regression, out), device_factory=factory)
    msg = str(e.value)
    assert "\n" not in msg and "serial read timed out" in msg and "epoch 3" in msg
    assert "last checkpoint (epoch 2)" in msg
    assert (out / CHECKPOINT_NAME).read_bytes() == seen["bytes"]
    assert load_checkpoint(out).epoch == 2
    assert not list(out.glob(".*.tmp"))


def test_cli_reports_a_failing_device_in_one_line(small_regression, tmp_path, capsys, monkeypatch):
    import hel_fpga.host.train.loop as loop
    board = config_for(8, 8, 2, 1, 32, 1 / 8)  # a board reports its own configuration
    monkeypatch.setattr(loop, "open_device", lambda spec, cfg: FlakyDevice(board, 3))
    rc = main(["train", "--task", str(small_regression), "--device", "flaky", "--epochs", "2",
               "--oscillators", "8", "--hidden", "8", "--out", str(tmp_path / "r"), "--json", "--no-plots"])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert err.startswith("hel train: error: device flaky failed in epoch 1") and "\n" not in err


def test_cli_json_output_and_resume_rules(small_regression, tmp_path, capsys):
    out = str(tmp_path / "r")
    args = ["train", "--task", str(small_regression), "--device", "sim", "--epochs", "1",
            "--oscillators", "8", "--hidden", "8", "--out", out, "--no-plots"]
    assert main(args + ["--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["epochs"] == 1 and m["complete"]
    # A second fresh run into the same directory is refused ...
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # ... a resume with a different setting too, but extending the epochs works.
    assert main(["train", "--out", out, "--resume", "--lr", "0.5"]) == 2
    assert "--lr 0.5" in capsys.readouterr().err
    assert main(["train", "--out", out, "--resume", "--epochs", "2", "--json", "--no-plots"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 2


def test_unopenable_device_is_a_one_line_error(tmp_path, capsys):
    rc = main(["train", "--device", str(tmp_path / "no-such-tty"), "--out", str(tmp_path / "r"), "--json"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("hel train: error: cannot open device") and "\n" not in err


# --------------------------------------------------------------------------- task files


def _write(tmp_path, **arrays):
    path = tmp_path / "t.npz"
    np.savez(path, **arrays)
    return str(path)


U = np.zeros((4, 5, 2))


@pytest.mark.parametrize("arrays, message", [
    (dict(y=np.zeros((4, 5, 1))), "missing array u"),
    (dict(u=np.zeros((4, 5)), y=np.zeros((4, 5, 1))), "u must be 3-D"),
    (dict(u=U), "exactly one of y (regression) and labels"),
    (dict(u=U, y=np.zeros((4, 5, 1)), labels=np.zeros(4, int)), "exactly one of y"),
    (dict(u=U, y=np.zeros((4, 6, 1))), "y has shape (4, 6, 1), expected (4, 5, O)"),
    (dict(u=U, y=np.zeros((4, 5, 1)), mask=np.ones((4, 4))), "mask has shape (4, 4)"),
    (dict(u=U, y=np.zeros((4, 5, 1)), mask=np.full((4, 5), 2)), "mask must be boolean"),
    (dict(u=U, y=np.zeros((4, 5, 1)), mask=np.zeros((4, 5))), "mask selects no loss step"),
    (dict(u=U * np.nan, y=np.zeros((4, 5, 1))), "u contains NaN"),
    (dict(u=U, labels=np.array([0, 1, -1, 1])), "labels must be ≥ 0"),
    (dict(u=U, labels=np.array([0.5, 1, 0, 1])), "labels must be integers"),
    (dict(u=U, labels=np.zeros(3, int)), "labels has shape (3,), expected (4,)"),
    (dict(u=U, labels=np.zeros(4, int)), "at least 2 classes"),
    (dict(u=U, labels=np.array([0, 1, 0, 1]), split=np.ones(4)), "no training sample"),
    (dict(u=U, labels=np.array([0, 1, 0, 1]), split=np.array([0, 1, 2, 0])), "split must hold only 0"),
    (dict(u=U, y=np.zeros((4, 5, 1)), extra=np.zeros(2)), "unknown array(s) extra"),
    (dict(u=U + 5.0, y=np.zeros((4, 5, 1))), "beyond the device's input range"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, capsys, arrays, message):
    path = _write(tmp_path, **arrays)
    rc = main(["train", "--task", path, "--device", "sim", "--out", str(tmp_path / "r"), "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("hel train: error: ") and "\n" not in err
    assert message in err


def test_unreadable_and_missing_task_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(TaskError, match="not a readable .npz file"):
        load_task(str(bad))
    with pytest.raises(TaskError, match="no such file"):
        load_task(str(tmp_path / "missing.npz"))
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        load_task("nope")


def test_bad_options_are_usage_errors(tmp_path):
    for kw, msg in [(dict(eps=2.0), "--eps"), (dict(batch=0), "--batch"), (dict(epochs=0), "--epochs"),
                    (dict(oscillators=4, task="digits"), "fewer than the task's 10 outputs")]:
        with pytest.raises(UsageError, match=msg):
            train(TrainOptions(device="sim", out=str(tmp_path / "x"), plots=False, progress=False, **kw))


def test_training_through_the_serial_protocol_matches_sim_bit_for_bit(small_regression, tmp_path):
    """``--device model``: SerialDevice over the protocol's reference model (hel_fpga.host.link)."""
    pytest.importorskip("hel_fpga.host.link")
    a = train(opts(small_regression, tmp_path / "sim", epochs=1))
    b = train(opts(small_regression, tmp_path / "model", epochs=1, device="model"))
    assert b["device"] == "model" and b["final_test_loss"] == a["final_test_loss"]
    pa, pb = load_checkpoint(tmp_path / "sim").params, load_checkpoint(tmp_path / "model").params
    for k in PARAM_NAMES:
        assert np.array_equal(pa[k], pb[k]), k


def test_a_board_with_its_own_configuration_sets_the_model_size(small_regression, tmp_path):
    """A serial device gets no configuration: the run takes N, M from its IDENT and
    pads the task's inputs with zero channels up to the board's K."""
    board = config_for(12, 10, 3, 1, 64, 1 / 8).replace(lanes=2)
    seen = []

    def factory(spec, cfg):
        seen.append(cfg)
        return GoldenDevice(board)

    m = train(opts(small_regression, tmp_path / "b", device="board", epochs=1, oscillators=None, hidden=None),
              device_factory=factory)
    assert seen == [None]
    assert (m["settings"]["oscillators"], m["settings"]["hidden"]) == (12, 10)
    assert m["config"] == board.to_dict()
    assert load_checkpoint(tmp_path / "b").params["B"].shape == (10, 3)
    assert m["final_test_loss"] < m["initial_test_loss"]

    with pytest.raises(UsageError, match=r"device board does not fit this run: it has 2 outputs"):
        train(opts(small_regression, tmp_path / "c", device="board", epochs=1),
              device_factory=lambda spec, cfg: GoldenDevice(board.replace(o=2)))
    with pytest.raises(UsageError, match=r"N = 12, M = 10 \(this run: N = 8, M = 8\)"):
        train(opts(small_regression, tmp_path / "d", device="board", epochs=1),
              device_factory=factory)


@pytest.mark.verilator
def test_short_training_on_the_simulated_board_lowers_the_loss_and_matches_sim(small_regression, tmp_path):
    """``--device sim-board``: the gateware (Verilator, over a pty) trains like the golden model.

    The board is built for the run's configuration (cached per configuration), so
    this also covers ``open_device('sim-board', cfg)``.
    """
    a = train(opts(small_regression, tmp_path / "sim", epochs=2))
    b = train(opts(small_regression, tmp_path / "board", epochs=2, device="sim-board"))
    assert b["device"] == "sim-board"
    assert b["final_test_loss"] < 0.5 * b["initial_test_loss"]
    assert b["final_test_loss"] == a["final_test_loss"]
    pa, pb = load_checkpoint(tmp_path / "sim").params, load_checkpoint(tmp_path / "board").params
    for k in PARAM_NAMES:
        assert np.array_equal(pa[k], pb[k]), k
