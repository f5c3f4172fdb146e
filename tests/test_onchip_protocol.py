"""On-chip training over the protocol: the seven training commands of the protocol
model, and ``hel train --on-chip`` through them.

The references are the golden trainer (:class:`hel_fpga.sim.onchip.OnChipTrainer`
run directly on the same integer stores) and the protocol's documented error codes.
The gateware's command unit is held to the model byte for byte in
``tests/test_command.py``; the simulated board trains in ``tests/test_device_e2e.py``.
"""

import json

import numpy as np
import pytest

from hel_fpga.host.cli import main
from hel_fpga.host.device import DeviceError
from hel_fpga.host.errors import UsageError
from hel_fpga.host.link import RemoteError, SerialDevice
from hel_fpga.host.train import onchip as oc
from hel_fpga.sim.onchip import OnChipTrainer, SampleStore
from hel_fpga.sim.protocol_model import ModelPort, ProtocolModel
from hel_fpga.spec import protocol as P
from hel_fpga.spec.formats import HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.protocol import Command, ErrorCode
from hel_fpga.spec.training import TrainConfig, pack_setup

CFG = HelConfig(n=6, m=5, k=2, o=3, t_max=16, store_words=4096)


def stores(kind, rng, s=20, t=8):
    u = rng.integers(-8000, 8000, (s, t, CFG.k))
    if kind == "mse":
        return (SampleStore.regression(CFG, u, rng.integers(-4000, 4000, (s, t, CFG.o)),
                                       rng.integers(0, 2, (s, t))),
                SampleStore.regression(CFG, u[:7], rng.integers(-4000, 4000, (7, t, CFG.o))))
    return (SampleStore.classification(CFG, u, rng.integers(0, CFG.o, s)),
            SampleStore.classification(CFG, u[:7], rng.integers(0, CFG.o, 7)))


@pytest.mark.parametrize("kind", ["mse", "onehot"])
@pytest.mark.parametrize("optimizer,store_words,data", [
    ("lion", 4096, "resident"), ("sgdm", 4096, "resident"),
    ("lion", 4096, "stream"),       # a ring larger than the set
    ("sgdm", 100, "stream"),        # a ring of 2 records (mse) or 4 (one-hot): it wraps
    ("lion", 50, "auto")])          # the sets do not fit: auto streams through one slot
def test_training_over_the_protocol_model_equals_the_golden_trainer(kind, optimizer, store_words, data):
    """Resident or streamed, the device's epochs, EVALs and state are the golden trainer's."""
    rng = np.random.default_rng(7)
    cfg = CFG.replace(store_words=store_words)
    train, test = stores(kind, rng)
    tc = TrainConfig(loss=kind, optimizer=optimizer, batch_log2=2, eps_log2=4, epochs=3, seed=5,
                     lr_log2=5 if optimizer == "lion" else 0)
    shapes = CFG.param_shapes()
    master = {k: rng.integers(-2 ** 27, 2 ** 27, shapes[k]) for k in PARAM_NAMES}
    ref = OnChipTrainer(CFG, tc, train, master)
    dev = oc.open_onchip_device("model", cfg, data=data)
    assert isinstance(dev, oc.ProtocolOnChipDevice)
    dev.write_train_config(tc)
    dev.write_set("train", train)
    dev.write_set("test", test)
    dev.write_state(oc.TrainState({k: ref.master[k].copy() for k in PARAM_NAMES},
                                  {k: ref.moment[k].copy() for k in PARAM_NAMES}, 0))
    seen = []
    for _ in range(tc.epochs):
        assert dev.run_epoch(seen.append) == ref.train_epoch()
        assert dev.evaluate("test") == ref.evaluate(test)
    assert sum(seen) == tc.epochs * train.count
    assert dev.streamed == (data != "resident")
    st = dev.read_state()
    assert st.epoch == tc.epochs
    for k in PARAM_NAMES:
        np.testing.assert_array_equal(st.master[k], ref.master[k])
        np.testing.assert_array_equal(st.moment[k], ref.moment[k])
    params = dev.dev.read_params()      # the core holds the re-quantised master weights
    for k in PARAM_NAMES:
        np.testing.assert_array_equal(params[k], ref.params()[k])


def model_device(cfg=CFG) -> SerialDevice:
    return SerialDevice(ModelPort(ProtocolModel(cfg)), retries=0)


def error_code(call) -> int:
    with pytest.raises(RemoteError) as e:
        call()
    return e.value.code


def test_training_commands_are_unknown_on_a_device_without_a_store():
    dev = model_device(CFG.replace(store_words=0))
    for cmd, payload in ((Command.METRICS, b""), (Command.TRAIN, bytes(4)),
                         (Command.READ_MASTER, b"\0"), (Command.TRAIN_SETUP, b"")):
        assert error_code(lambda: dev._request(cmd, payload)) == ErrorCode.UNKNOWN_COMMAND
    with pytest.raises(DeviceError, match="store_words = 0"):
        oc.ProtocolOnChipDevice(dev)


def test_open_onchip_device_refuses_a_board_without_the_training_mode(monkeypatch):
    import hel_fpga.host.registry as registry
    monkeypatch.setattr(registry, "open_device", lambda spec, cfg=None: model_device(
        CFG.replace(store_words=0)))
    with pytest.raises(UsageError, match="has no on-chip training: its IDENT reports store_words = 0"):
        oc.open_onchip_device("/dev/ttyUSB0", CFG)


def test_passes_need_a_setup_and_stores_must_fit():
    dev = model_device()
    assert error_code(lambda: dev.start_pass(Command.TRAIN, 0)) == ErrorCode.WRONG_STATE
    assert error_code(lambda: dev.start_pass(Command.EVAL, 0)) == ErrorCode.WRONG_STATE
    for count, start in ((0, 0), (1, CFG.store_words), (CFG.store_words, 1)):
        payload = count.to_bytes(4, "little") + start.to_bytes(4, "little")
        assert error_code(lambda: dev._request(Command.STORE, payload)) == ErrorCode.OUT_OF_RANGE
    assert error_code(lambda: dev.read_master(2)) == ErrorCode.OUT_OF_RANGE
    # a setup the device refuses (T > t_max) leaves no setup: TRAIN stays WRONG_STATE
    words = pack_setup(CFG, TrainConfig(), 8, 4, 0)
    words[11] = CFG.t_max + 1
    dev.train_setup(words)
    assert error_code(lambda: dev.start_pass(Command.TRAIN, 0)) == ErrorCode.WRONG_STATE
    dev.train_setup(pack_setup(CFG, TrainConfig(), 8, 4, 0))
    dev.start_pass(Command.EVAL, 1)                      # an empty test set: done at once
    assert dev.metrics() == {"running": 0, "samples": 0, "loss_sum": 0, "correct": 0, "skipped": 0}


def test_stream_is_taken_only_during_a_streamed_pass():
    """STREAM outside a streamed pass is WRONG_STATE, a count of 0 or beyond the store
    is OUT_OF_RANGE, and while a streamed pass waits for its records every command
    but DURING_PASS's and STREAM is BUSY; RESET ends the pass."""
    dev = model_device()
    stream = lambda n: dev._request(Command.STREAM, n.to_bytes(4, "little"))  # noqa: E731
    assert error_code(lambda: stream(4)) == ErrorCode.WRONG_STATE          # no setup
    dev.train_setup(pack_setup(CFG, TrainConfig(), 8, 4, 0))
    dev.start_pass(Command.TRAIN, 0)                                        # resident: done at once
    assert error_code(lambda: stream(4)) == ErrorCode.WRONG_STATE
    dev.train_setup(pack_setup(CFG, TrainConfig(), 8, 4, 0, slots=3))
    assert error_code(lambda: stream(4)) == ErrorCode.WRONG_STATE          # no pass yet
    dev.start_pass(Command.TRAIN, 0)
    assert dev.metrics()["running"] == P.Pass.TRAIN
    for n in (0, CFG.store_words + 1):
        assert error_code(lambda: stream(n)) == ErrorCode.OUT_OF_RANGE
    for call in (lambda: dev.store(0, [1]), lambda: dev.start_pass(Command.EVAL, 0),
                 lambda: dev.read_master(0), lambda: dev.load(np.zeros((2, CFG.k), np.int64))):
        assert error_code(call) == ErrorCode.BUSY
    dev.stream(np.zeros(8 * (CFG.k + CFG.o + 1), np.int64))                # one of four records
    assert dev.metrics()["samples"] == 1 and dev.metrics()["running"] == P.Pass.TRAIN
    dev.reset()
    assert dev.metrics()["running"] == P.Pass.NONE
    assert error_code(lambda: stream(4)) == ErrorCode.WRONG_STATE


def test_reset_forgets_the_setup_and_keeps_the_master_weights():
    dev = model_device()
    n = sum(int(np.prod(s)) for s in CFG.param_shapes().values())
    master = np.arange(n) * 1000 - 5000
    dev.write_master(0, master)
    dev.train_setup(pack_setup(CFG, TrainConfig(), 8, 4, 0))
    dev.reset()
    np.testing.assert_array_equal(dev.read_master(0), master)
    assert error_code(lambda: dev.start_pass(Command.TRAIN, 0)) == ErrorCode.WRONG_STATE


def test_metrics_and_ident_report_the_layouts_of_the_spec():
    dev = model_device()
    assert dev.config.store_words == CFG.store_words
    assert set(dev.metrics()) == {name for name, _ in P.METRICS_LAYOUT}


def test_hel_train_on_chip_on_the_protocol_model_equals_the_golden_model(tmp_path, capsys):
    runs = {}
    for device in ("sim", "model"):
        rc = main(["train", "--on-chip", "--task", "oscillators", "--oscillators", "8", "--hidden", "8",
                   "--epochs", "2", "--device", device, "--out", str(tmp_path / device), "--json",
                   "--no-plots"])
        assert rc == 0, capsys.readouterr().err
        runs[device] = json.loads(capsys.readouterr().out)
    strip = ("seconds", "samples_per_second")
    for a, b in zip(runs["sim"]["history"], runs["model"]["history"], strict=True):
        assert {k: v for k, v in a.items() if k not in strip} == \
               {k: v for k, v in b.items() if k not in strip}
    assert runs["sim"]["final_test_loss"] == runs["model"]["final_test_loss"]


def test_hel_train_on_chip_streamed_on_the_protocol_model_equals_the_golden_model(tmp_path, capsys):
    """--data stream sends every pass's samples through the ring: the run is the resident one."""
    runs = {}
    for device, extra in (("sim", []), ("model", ["--data", "stream"])):
        rc = main(["train", "--on-chip", "--task", "sine", "--oscillators", "8", "--hidden", "8",
                   "--epochs", "2", "--device", device, "--out", str(tmp_path / device), "--json",
                   "--no-plots"] + extra)
        assert rc == 0, capsys.readouterr().err
        runs[device] = json.loads(capsys.readouterr().out)
    assert runs["model"]["settings"]["data"] == "stream"
    strip = ("seconds", "samples_per_second")
    for a, b in zip(runs["sim"]["history"], runs["model"]["history"], strict=True):
        assert {k: v for k, v in a.items() if k not in strip} == \
               {k: v for k, v in b.items() if k not in strip}


@pytest.mark.parametrize("extra,message", [
    (["--board", "icebreaker"], "board icebreaker has no training store"),
    (["--board", "nonsense"], "--board: unknown board 'nonsense'"),
    (["--board", "ulx3s-85f-n64", "--device", "/dev/ttyUSB7"], "--board applies to the named devices"),
    (["--board", "ulx3s-85f-n64", "--oscillators", "32"], "N = 64, M = 64 (this run: N = 32"),
    (["--task", "aeon:JapaneseVowels", "--data", "resident", "--device", "model", "--board",
      "ulx3s-85f-n64"], "stream them instead"),
])
def test_board_and_data_options_are_checked_in_one_line(extra, message, tmp_path, capsys):
    out = tmp_path / "r"
    task = [] if "--task" in extra else ["--task", "digits"]
    rc = main(["train", "--on-chip", "--epochs", "1", "--out", str(out), "--json", "--no-plots"]
              + task + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and message in err, err
    assert not out.exists()


def test_board_option_gives_a_named_device_the_boards_configuration(tmp_path, capsys):
    """--board NAME: the run's configuration is the board entry's (its N, M, K, O,
    store), on chip and host-driven; a set narrower than the board trains at its own
    widths on chip."""
    from hel_fpga.boards.table import BOARDS
    want = BOARDS["ulx3s-85f-n64"].config
    for extra in (["--on-chip"], []):
        rc = main(["train", "--task", "aeon:UnitTest", "--device", "sim", "--board", "ulx3s-85f-n64",
                   "--epochs", "1", "--out", str(tmp_path / str(len(extra))), "--json", "--no-plots"]
                  + extra)
        assert rc == 0, capsys.readouterr().err
        m = json.loads(capsys.readouterr().out)
        assert HelConfig.from_dict(m["config"]) == want and m["settings"]["board"] == "ulx3s-85f-n64"
