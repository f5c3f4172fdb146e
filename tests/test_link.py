"""The command protocol: host (hel_fpga.host.link) ↔ reference device model (hel_fpga.sim.protocol_model).

Every result that crosses the link is compared bit for bit with a GoldenDevice
doing the same operations in-process. Faults are injected as raw frames (the
device's error replies are checked exactly) and inside the port (the host must
recover through retries and go-back-N).
"""

import random
import time

import numpy as np
import pytest

from faults import corrupt
from hel_fpga.host.device import DeviceError, GoldenDevice
from hel_fpga.spec.framing import Frame, FrameReader, encode_frame
from hel_fpga.host.link import RemoteRangeError, RemoteStateError, SerialDevice
from hel_fpga.host.registry import DEVICE_NAMES, device_help, open_device, takes_config
from hel_fpga.spec.wire import pack_words, split_chunks, unpack_words
from hel_fpga.spec import protocol as P
from hel_fpga.spec.formats import FormatError, HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.spec.protocol import Command, ErrorCode
from hel_fpga.sim.golden import StateError
from hel_fpga.sim.protocol_model import ModelPort, ProtocolModel, PtyServer

CFG = HelConfig(n=8, m=8, k=2, o=2, t_max=600)


def make_sample(cfg, t, seed=0):
    rng = np.random.default_rng(seed)
    params = cfg.quantize_params({k: rng.normal(0, 0.3, s) for k, s in cfg.param_shapes().items()})
    u = cfg.quantize_inputs(rng.uniform(-0.5, 0.5, (t, cfg.k)))
    grad = np.zeros((t, cfg.o))
    grad[::7] = rng.normal(0, 1, grad[::7].shape)
    return params, u, grad


def training_step(dev, params, u, grad, eps=0.01, estimator="centred"):
    cfg = dev.config
    dev.clear_accumulators()
    dev.write_params(params)
    dev.load(u)
    y = dev.forward(estimator)
    dev.echo(cfg.nudges(grad, eps))
    return y, dev.read_accumulators(), dev.read_state("pos"), dev.status()


def assert_same(a, b):
    y1, acc1, st1, s1 = a
    y2, acc2, st2, s2 = b
    assert np.array_equal(y1, y2)
    for k in PARAM_NAMES:
        assert np.array_equal(acc1[k], acc2[k]), k
    assert np.array_equal(st1[0], st2[0]) and np.array_equal(st1[1], st2[1])
    assert s1 == s2


@pytest.fixture
def model():
    return ProtocolModel(CFG, clock_hz=12_000_000, baud=115200, name="test board")


@pytest.fixture
def dev(model):
    return SerialDevice(ModelPort(model), timeout=0.2, expect=CFG)


class Raw:
    """Send raw bytes to the model, get decoded reply frames."""

    def __init__(self, model):
        self.model = model
        self.reader = FrameReader()

    def __call__(self, data: bytes):
        out = self.reader.feed(self.model.feed(data))
        assert all(isinstance(f, Frame) for f in out), out
        return out

    def cmd(self, cmd, seq=1, payload=b""):
        return self(encode_frame(int(cmd), seq, payload))


def error_of(frame):
    assert frame.cmd == P.ERROR_REPLY, frame
    f, rest = P.unpack_fields(P.ERROR_LAYOUT, frame.payload)
    assert rest == b""
    return f["code"], f["cmd"], f["arg"]


# ---- wire format -------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, 4, 16, 18, 36, 48, 56, 63, 64])
def test_pack_roundtrip(width):
    rng = np.random.default_rng(width)
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    v = np.concatenate([[lo, hi, 0, -1], rng.integers(lo, hi, 997, endpoint=True)])
    assert np.array_equal(unpack_words(pack_words(v, width), width, v.size), v)
    chunks = split_chunks(v, width)
    assert all(len(c) <= P.CHUNK_DATA_MAX for c in chunks)
    assert all(len(c) == P.chunk_words(width) * width // 8 for c in chunks[:-1])


def test_pack_layout_and_range():
    assert pack_words([1, -2, 3], 4) == bytes([0xE1, 0x03])
    assert pack_words([-1], 36) == bytes([0xFF] * 4 + [0x0F])
    with pytest.raises(ValueError):
        pack_words([8], 4)


def test_payload_efficiency():
    """Long streams: packed words ÷ wire bytes ≥ 90 % for every width (target of issue 4)."""
    for width in (16, 18, 36, 56):
        data = P.chunk_words(width) * width // 8
        wire = P.wire_len(P.CHUNK_HEADER_LEN + data)
        assert data / wire > 0.98, width


def test_ident_table_covers_config():
    names = [n for n, _ in P.IDENT_FIELDS]
    assert set(CFG.to_dict()) <= set(names)
    assert len(names) == len(set(names))


def test_flow_control_fits_two_kib_ring():
    # one unread DATA chunk (cmd, seq, index, data) + one arriving with its CRC
    body = P.HEADER_LEN + P.CHUNK_HEADER_LEN + P.CHUNK_DATA_MAX
    assert body + body + P.CRC_LEN <= 2048


# ---- host ↔ model ----------------------------------------------------------------------

def test_ident(dev):
    ident = dev.ident()
    assert ident.protocol_version == P.PROTOCOL_VERSION
    assert ident.config == CFG
    assert (ident.clock_hz, ident.baud, ident.name) == (12_000_000, 115200, "test board")


def test_config_mismatch(model):
    with pytest.raises(DeviceError, match=r"n: device 8, expected 16.*t_max: device 600"):
        SerialDevice(ModelPort(model), expect=CFG.replace(n=16, t_max=256))


def test_params_roundtrip(dev):
    params, _, _ = make_sample(CFG, 1)
    dev.write_params(params)
    back = dev.read_params()
    for k in PARAM_NAMES:
        assert np.array_equal(back[k], params[k])
    dev.write_params({"b": params["b"] * 0 + 5})
    assert np.array_equal(dev.read_params()["b"], np.full(CFG.m, 5))
    assert np.array_equal(dev.read_params()["W"], params["W"])


@pytest.mark.parametrize("estimator", ["centred", "one-sided"])
def test_training_step_golden_exact(dev, estimator):
    sample = make_sample(CFG, 500, seed=3)
    got = training_step(dev, *sample, estimator=estimator)
    want = training_step(GoldenDevice(CFG), *sample, estimator=estimator)
    assert_same(got, want)
    assert dev.stats["retries"] == dev.stats["go_backs"] == 0


def test_selftest_and_kick(dev):
    g = GoldenDevice(CFG)
    params, u, _ = make_sample(CFG, 50, seed=4)
    for d in (dev, g):
        d.write_params(params)
    assert dev.selftest(300, seed=9) == g.selftest(300, seed=9) is True
    for d in (dev, g):
        d.load(u)
        d.forward()
        d.echo(np.full((1, CFG.o), 1 << 20))      # a single kick (HEB)
    assert np.array_equal(dev.read_state("neg")[0], g.read_state("neg")[0])


def test_device_errors_are_raised(dev):
    with pytest.raises(RemoteStateError) as e:
        dev.forward()                      # nothing loaded
    assert isinstance(e.value, StateError) and e.value.code == ErrorCode.WRONG_STATE
    _, u, _ = make_sample(CFG, 10)
    dev.load(u)
    with pytest.raises(StateError):
        dev.echo(np.zeros((10, CFG.o), dtype=np.int64))   # no FORWARD yet
    dev.forward()
    with pytest.raises(RemoteRangeError) as e:
        dev.echo(np.zeros((3, CFG.o), dtype=np.int64))    # rows not in {1, T}
    assert isinstance(e.value, FormatError)
    with pytest.raises(FormatError):
        dev.load(np.zeros((CFG.t_max + 1, CFG.k), dtype=np.int64))
    with pytest.raises(FormatError):
        dev.selftest(0)
    # nothing changed: the FORWARD still allows its ECHO
    dev.echo(np.zeros((10, CFG.o), dtype=np.int64))


# ---- raw faults: each gets its error reply, nothing changes ---------------------------------

def test_raw_error_replies(model):
    raw = Raw(model)
    good = encode_frame(Command.STATUS, 5)
    flipped = bytearray(good)
    flipped[4] ^= 0x10
    assert [error_of(f) for f in raw(bytes(flipped))] == [(ErrorCode.BAD_CRC, 0, 0)]
    assert [error_of(f) for f in raw(good[:4] + b"\x00")] == [(ErrorCode.BAD_LENGTH, 0, 0)]
    oversized = encode_frame(Command.DATA, 6, bytes(range(1, 256)) * 4)[:-1]
    oversized = oversized[:-1] + bytes(range(1, 40)) + b"\x00"
    assert [error_of(f)[0] for f in raw(oversized)] == [ErrorCode.BAD_LENGTH]
    assert raw(b"\x00\x00\x00") == []                  # empty frames are ignored
    (f,) = raw(b"\x13\x37\xaa\x00")                      # garbage
    assert error_of(f)[0] == ErrorCode.BAD_LENGTH
    (f,) = raw.cmd(0x42, 9)
    assert (f.seq, error_of(f)) == (9, (ErrorCode.UNKNOWN_COMMAND, 0x42, 0))
    (f,) = raw.cmd(Command.STATUS | P.REPLY_BIT, 9)
    assert error_of(f)[0] == ErrorCode.UNKNOWN_COMMAND
    (f,) = raw.cmd(Command.ECHO, 10, (1).to_bytes(4, "little"))
    assert error_of(f) == (ErrorCode.WRONG_STATE, Command.ECHO, 0)
    (f,) = raw.cmd(Command.FORWARD, 11, b"\x00")
    assert error_of(f) == (ErrorCode.WRONG_STATE, Command.FORWARD, 0)
    (f,) = raw.cmd(Command.DATA, 12, b"\x00\x00")
    assert error_of(f) == (ErrorCode.WRONG_STATE, Command.DATA, 0)
    for cmd, payload in [(Command.LOAD, (0).to_bytes(4, "little")),
                         (Command.LOAD, (CFG.t_max + 1).to_bytes(4, "little")),
                         (Command.LOAD, b"\x01"),
                         (Command.SELFTEST, bytes(8)),
                         (Command.READ_STATE, b"\x03"),
                         (Command.WRITE_PARAMS, b"\x10"),
                         (Command.READ_PARAMS, b"\x00"),
                         (Command.IDENT, b"\x00")]:
        (f,) = raw.cmd(cmd, 13, payload)
        assert error_of(f) == (ErrorCode.OUT_OF_RANGE, cmd, 0), (cmd, payload)
    status = raw.cmd(Command.STATUS, 14)[0]
    assert status.payload == bytes(8)                    # still the power-on state


def test_raw_transfer_rules(model):
    raw = Raw(model)
    (f,) = raw.cmd(Command.LOAD, 1, (10).to_bytes(4, "little"))
    assert f.cmd == Command.LOAD | P.REPLY_BIT and f.payload == b""
    (f,) = raw.cmd(Command.LOAD, 1, (10).to_bytes(4, "little"))      # retransmitted opening
    assert f.cmd == Command.LOAD | P.REPLY_BIT
    (f,) = raw.cmd(Command.FORWARD, 2, b"\x00")
    assert error_of(f) == (ErrorCode.BUSY, Command.FORWARD, 0)
    (f,) = raw.cmd(Command.DATA, 3, b"\x01\x00" + bytes(40))
    assert error_of(f) == (ErrorCode.SEQUENCE, Command.DATA, 0)
    (f,) = raw.cmd(Command.DATA, 4, b"\x00\x00" + bytes(39))       # 10·2 words · 16 bit = 40 B
    assert error_of(f) == (ErrorCode.OUT_OF_RANGE, Command.DATA, 0)
    st = raw.cmd(Command.STATUS, 5)[0]
    fields, _ = P.unpack_fields(P.STATUS_LAYOUT, st.payload)
    assert fields == {"flags": P.StatusFlag.XFER_OPEN, "xfer_cmd": Command.LOAD,
                      "xfer_done": 0, "t_loaded": 0}
    u = np.arange(20, dtype=np.int64) - 10
    (f,) = raw.cmd(Command.DATA, 6, b"\x00\x00" + pack_words(u, 16))
    assert (f.cmd, f.payload) == (Command.DATA | P.REPLY_BIT, b"\x01\x00")
    (f,) = raw.cmd(Command.DATA, 7, b"\x00\x00" + pack_words(u, 16))
    assert error_of(f)[0] == ErrorCode.WRONG_STATE       # transfer closed
    assert np.array_equal(model.core.inputs.ravel(), u)
    # a retransmitted one-sided FORWARD does not accumulate twice
    frames = raw.cmd(Command.FORWARD, 8, b"\x01")
    acc = model.core.read_accumulators()
    again = raw.cmd(Command.FORWARD, 8, b"\x01")
    assert again == frames
    for k in PARAM_NAMES:
        assert np.array_equal(model.core.acc[k], acc[k])
    raw.cmd(Command.FORWARD, 9, b"\x01")                # a new seq is a new FORWARD


# ---- faults inside the port: the host recovers ------------------------------------------------

class Corruptor:
    """Corrupt every ``every``-th frame passing one way (flip one bit, or cut it)."""

    def __init__(self, seed, every=5):
        self.rng = random.Random(seed)
        self.every = every
        self.count = 0

    def __call__(self, data: bytes) -> bytes:
        out = bytearray()
        for part in data.split(b"\x00")[:-1] if data.endswith(b"\x00") else [data]:
            self.count += 1
            frame = bytearray(part)
            if self.count % self.every == 0 and frame:
                if self.rng.random() < 0.5:
                    i = self.rng.randrange(len(frame))
                    frame[i] ^= 1 << self.rng.randrange(8)
                    if frame[i] == 0:
                        frame[i] = 0x55
                else:
                    del frame[self.rng.randrange(len(frame)):]
            out += frame + b"\x00"
        return bytes(out)


@pytest.mark.parametrize("direction", ["tx", "rx", "both"])
def test_host_recovers_from_corruption(direction):
    model = ProtocolModel(CFG)
    port = ModelPort(model, timeout=0.001)
    dev = SerialDevice(port, timeout=0.05, retries=8, expect=CFG)
    if direction in ("tx", "both"):
        port.tx_filter = Corruptor(1, every=4)
    if direction in ("rx", "both"):
        port.rx_filter = Corruptor(2, every=5)
    for estimator in ("centred", "one-sided"):
        sample = make_sample(CFG, 600, seed=5)
        assert_same(training_step(dev, *sample, estimator=estimator),
                    training_step(GoldenDevice(CFG), *sample, estimator=estimator))
    assert dev.stats["retries"] + dev.stats["go_backs"] > 0


def test_silent_device_times_out():
    class Dead:
        timeout = 0.01

        def write(self, data):
            return len(data)

        def read(self, n=1):
            time.sleep(0.001)
            return b""

    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="IDENT: no valid reply after 2 attempts"):
        SerialDevice(Dead(), timeout=0.05, retries=1)
    assert time.monotonic() - t0 < 2


def test_fuzz_corrupted_frames(model):
    """≥ 1000 corrupted frames; every one answered, no state change, then golden-exact."""
    rng = random.Random(1234)
    raw = Raw(model)
    dev = SerialDevice(ModelPort(model), timeout=0.2, expect=CFG)
    sample = make_sample(CFG, 40, seed=6)
    want = training_step(GoldenDevice(CFG), *sample)
    before = model.status_fields(), model.core.read_params()
    commands = [c for c in Command if c not in (Command.RESET, Command.CLEAR_ACC,
                                                 Command.CLEAR_FLAGS)]
    corrupted = 0
    while corrupted < 1500:
        cmd = rng.choice(commands)
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 4, 8, 50, 300])))
        frame = corrupt(rng, encode_frame(cmd, rng.randrange(256), payload)[:-1],
                        max_garbage=2000)
        parts = frame.split(b"\x00")
        replies = raw(frame + b"\x00")
        assert len(replies) == sum(1 for p in parts if p)
        assert all(r.cmd == P.ERROR_REPLY for r in replies)
        corrupted += 1
    assert model.status_fields() == before[0]
    assert all(np.array_equal(model.core.read_params()[k], before[1][k]) for k in PARAM_NAMES)
    assert_same(training_step(dev, *sample), want)


def test_pty_end_to_end(model):
    pytest.importorskip("serial")
    with PtyServer(model) as server:
        dev = open_device(server.path, CFG)
        try:
            sample = make_sample(CFG, 300, seed=7)
            assert_same(training_step(dev, *sample), training_step(GoldenDevice(CFG), *sample))
        finally:
            dev.close()


def test_a_serial_path_opens_at_every_boards_rate_unless_at_baud_is_given(model):
    """``PATH`` opens at DEFAULT_BAUD, which every board in the table runs; ``PATH@BAUD``
    at BAUD (a pty carries any rate, so both reach the model)."""
    pytest.importorskip("serial")
    from hel_fpga.boards.table import BOARDS, DEFAULT_BAUD
    assert {b.baud for b in BOARDS.values()} == {DEFAULT_BAUD} == {3_000_000}
    with PtyServer(model) as server:
        for spec, baud in ((server.path, DEFAULT_BAUD), (f"{server.path}@115200", 115200)):
            dev = open_device(spec, CFG)
            try:
                assert dev.port.baudrate == baud
                assert dev.ident().config == CFG
            finally:
                dev.close()


def test_open_device_opens_every_named_device_and_refuses_the_rest():
    with open_device("sim", CFG) as dev:
        assert isinstance(dev, GoldenDevice) and dev.config == CFG and dev.cycles() is None
    with open_device("model", CFG) as dev:
        assert isinstance(dev, SerialDevice) and dev.ident().config == CFG
        assert dev.board is None and dev.cycles() is None
    for name in ("sim", "model"):
        with pytest.raises(DeviceError, match=f"--device {name} needs a configuration"):
            open_device(name)
    with pytest.raises(DeviceError, match="cannot open device '/nonexistent/ttyHEL'"):
        open_device("/nonexistent/ttyHEL")
    with pytest.raises(DeviceError, match="bad baud rate 'fast'"):
        open_device("/nonexistent/ttyHEL@fast")
    # A mistyped name is answered with every name the registry knows.
    with pytest.raises(DeviceError, match="a device is sim, model, sim-board, a serial path"):
        open_device("sim_board")


def test_device_names_help_and_configuration_come_from_one_table():
    assert DEVICE_NAMES == ("sim", "model", "sim-board")
    text = device_help(default="sim")
    assert all(f"{name} (" in text for name in DEVICE_NAMES) and text.endswith("(default: sim)")
    assert "sim (" not in device_help(exclude=("sim",))
    assert all(takes_config(name) for name in DEVICE_NAMES)
    assert not takes_config("/dev/ttyUSB1") and not takes_config("socket://localhost:1")


@pytest.mark.parametrize("estimator", ["centred", "one-sided"])
def test_hel_sample_sends_a_final_step_loss_as_one_kick_with_the_same_result(dev, estimator):
    """One HEL sample over the protocol: a loss on the final step only goes out as a
    single nudge row, and outputs, accumulators and the echo's end state equal the
    golden model's after the full T-row echo of the same nudges."""
    from hel_fpga.host.learning import hel_sample
    params, u, _ = make_sample(CFG, 40, seed=11)
    target = np.zeros((40, CFG.o))
    mask = np.zeros(40)
    mask[-1] = 1

    def final_step_loss(y_hat):
        r = (y_hat - target) * mask[:, None]
        return 0.5 * float(np.sum(r * r)), r

    eps = 0.3
    dev.write_params(params)
    sample = hel_sample(dev, u, final_step_loss, eps, estimator)
    assert sample.nudges.shape == (1, CFG.o)

    gold = GoldenDevice(CFG)
    gold.write_params(params)
    gold.load(u)
    y = gold.forward(estimator)
    full = CFG.nudges(final_step_loss(CFG.outputs_to_float(y))[1], eps)
    assert full.shape == (40, CFG.o) and not full[1:].any() and full[0].any()
    gold.echo(full)
    assert np.array_equal(sample.outputs, y)
    acc, want = dev.read_accumulators(), gold.read_accumulators()
    for k in PARAM_NAMES:
        assert np.array_equal(acc[k], want[k]), k
    for a, b in zip(dev.read_state("pos"), gold.read_state("pos")):
        assert np.array_equal(a, b)


def test_bench_link_over_the_protocol_model_counts_the_bytes_of_one_hel_sample(capsys):
    """``hel bench link --device model``: every phase of the shared HEL sample is
    measured, and the device's outputs and accumulators equal the golden model's."""
    import json

    from hel_fpga.host.cli import main
    from hel_fpga.spec.wire import packed_len
    assert main(["bench", "link", "--device", "model", "--lengths", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = HelConfig.from_dict(result["config"])
    assert [r["phase"] for r in result["phases"]] == ["LOAD", "FORWARD", "ECHO"]
    assert result["bit_exact"] and result["stats"]["retries"] == 0
    expect = {"LOAD": packed_len(16 * cfg.k, cfg.operand_width),
              "FORWARD": packed_len(16 * cfg.o, cfg.state_width),
              "ECHO": packed_len(16 * cfg.o, cfg.state_width)}
    for r in result["phases"]:
        assert r["payload_bytes"] == expect[r["phase"]] * r["reps"]
        assert r["payload_bytes"] < r["wire_bytes"]
    assert main(["bench", "link", "--device", "sim", "--lengths", "16"]) == 2
    assert "--device sim has no serial link to measure" in capsys.readouterr().err
