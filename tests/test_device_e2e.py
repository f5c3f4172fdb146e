"""End to end: host ↔ the Verilator-simulated board (``hel_fpga.rtl.top.Top``) over its pty.

One board per module (``board`` fixture, :data:`hel_fpga.sim.board.SIM_CONFIG`); the host
talks to it through one pyserial port, as :class:`hel_fpga.host.link.SerialDevice` and as
raw bytes (:class:`RawLink`).

* Through the device API: IDENT, a parameter round trip, full training steps
  (load, forward, host nudges, centred echo, read accumulators/gradients) equal
  to the golden model's bit for bit.
* Protocol faults as raw bytes: every reply is compared byte for byte with what
  :class:`hel_fpga.sim.protocol_model.ProtocolModel` (kept in the same state) answers to
  the same bytes; afterwards STATUS, the parameters and the state read back equal
  the model's, and a training step through the device API is still golden-exact.
* A fuzz run of 1,200 corrupted frames, sent in batches as large as the spec's
  receive capacity allows, replies compared with the model.
* ``hel selftest --device sim-board --steps 10000`` and ``hel compare --device
  sim-board`` (each starts its own board of the same, cached, build).

The first run builds the board (~20–40 s); later runs find it in the cache.
"""

import json
import random
import time

import numpy as np
import pytest

serial = pytest.importorskip("serial")

pytestmark = pytest.mark.verilator

from test_link import assert_same, error_of, make_sample, training_step  # noqa: E402
from faults import corrupt  # noqa: E402
from test_sim_board import read_exact  # noqa: E402

from hel_fpga.host.cli import main  # noqa: E402
from hel_fpga.host.device import GoldenDevice  # noqa: E402
from hel_fpga.spec.framing import Frame, FrameReader, encode_frame  # noqa: E402
from hel_fpga.host.learning import read_gradients  # noqa: E402
from hel_fpga.host.link import SerialDevice  # noqa: E402
from hel_fpga.spec.wire import split_chunks  # noqa: E402
from hel_fpga.spec import protocol as P  # noqa: E402
from hel_fpga.spec.names import BANKS, PARAM_NAMES  # noqa: E402
from hel_fpga.spec.protocol import Command, ErrorCode  # noqa: E402
from hel_fpga.sim import board as sim_board  # noqa: E402
from hel_fpga.sim.protocol_model import ProtocolModel  # noqa: E402


CFG = sim_board.SIM_CONFIG
BOARD_NAME = "hel-fpga"          # hel_fpga.rtl.top.Top's default name, as the simulated board builds it
REPLY_TIMEOUT = 10.0


# ---- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def board():
    t0 = time.monotonic()
    sb = sim_board.start(CFG, progress=print)
    print(f"simulated board {sb.path}: {'cached' if sb.build.cached else 'built'} "
          f"({time.monotonic() - t0:.1f} s)")
    yield sb
    st = sb.stats()
    if st:
        print(f"simulated board: {st['cycles_per_s']:,.0f} cycles/s over the module "
              f"({st['cycles']:,.0f} cycles)")
    sb.stop()


@pytest.fixture(scope="module")
def port(board):
    p = serial.Serial(board.path, 115200, timeout=0.05)
    yield p
    p.close()


@pytest.fixture(scope="module")
def dev(port):
    # Not closed here: closing a SerialDevice closes the shared port (fixture above).
    return SerialDevice(port, timeout=REPLY_TIMEOUT, expect=CFG)


@pytest.fixture
def raw(port, dev):
    link = RawLink(port)
    link.sync()
    return link


# ---- raw bytes, compared with the reference model -------------------------------------------

def _show(data: bytes) -> str:
    items = FrameReader().feed(data)
    return " ".join(f"{i.cmd:02x}/{i.seq}/{i.payload.hex()}" if isinstance(i, Frame) else str(i)
                    for i in items) + f" [{data.hex()}]"


class RawLink:
    """Raw bytes to the board and to a :class:`ProtocolModel` in the same state.

    :meth:`send` writes the bytes to both, reads exactly as many bytes from the
    board as the model answered (or fails after :data:`REPLY_TIMEOUT`: the board
    hangs or dropped a reply) and asserts they are identical. A reply the board
    sends beyond the model's shows up as a mismatch of the next exchange.
    """

    def __init__(self, port):
        self.port = port
        self.model = ProtocolModel(CFG, clock_hz=sim_board.SIM_CLK_HZ, baud=sim_board.SIM_BAUD,
                                   name=BOARD_NAME)
        self.seq = 0
        self.sent = 0

    def next_seq(self) -> int:
        self.seq = self.seq % 255 + 1
        return self.seq

    def send(self, data: bytes, timeout: float = REPLY_TIMEOUT) -> bytes:
        want = self.model.feed(data)
        self.port.write(data)
        got = read_exact(self.port, len(want), timeout)
        assert got == want, (f"board and model differ after {len(data)} bytes "
                             f"{data[:64].hex()}{'…' if len(data) > 64 else ''}:\n"
                             f"  board: {_show(got)}\n  model: {_show(want)}")
        self.sent += 1
        return got

    def frames(self, data: bytes) -> list:
        return FrameReader().feed(self.send(data))

    def cmd(self, cmd: int, payload: bytes = b"", seq: int | None = None) -> list:
        return self.frames(encode_frame(int(cmd), self.next_seq() if seq is None else seq, payload))

    def sync(self) -> None:
        """Drop stale input, then RESET board and model: the same state from here on."""
        time.sleep(0.01)
        self.port.reset_input_buffer()
        (f,) = self.cmd(Command.RESET)
        assert f.cmd == Command.RESET | P.REPLY_BIT

    def transfer(self, cmd: Command, payload: bytes, words, width: int) -> None:
        (f,) = self.cmd(cmd, payload)
        assert f.cmd == cmd | P.REPLY_BIT and f.payload == b"", f
        chunks = split_chunks(np.asarray(words).ravel(), width)
        for i, chunk in enumerate(chunks):
            (f,) = self.cmd(Command.DATA, i.to_bytes(2, "little") + chunk)
            assert f.cmd == Command.DATA | P.REPLY_BIT, f

    def setup(self, t: int = 20, seed: int = 0, forward: bool = False) -> None:
        """Parameters and a loaded sequence (and a FORWARD): a state worth preserving."""
        params, u, _ = make_sample(CFG, t, seed)
        words = np.concatenate([params[n].ravel() for n in PARAM_NAMES])
        self.transfer(Command.WRITE_PARAMS, bytes([P.PARAM_MASK_ALL]), words, CFG.operand_width)
        self.transfer(Command.LOAD, t.to_bytes(4, "little"), u, CFG.operand_width)
        if forward:
            frames = self.cmd(Command.FORWARD, b"\x00")
            assert frames and all(f.cmd == Command.FORWARD | P.REPLY_BIT for f in frames)

    def check_unchanged(self) -> None:
        """STATUS, parameters, accumulators and the state banks read back as the model's."""
        self.cmd(Command.STATUS)
        self.cmd(Command.READ_PARAMS, bytes([P.PARAM_MASK_ALL]))
        self.cmd(Command.READ_ACC)
        for bank in range(len(BANKS)):
            self.cmd(Command.READ_STATE, bytes([bank]))


def golden_step(dev, t: int = 40, seed: int = 11) -> None:
    """A training step through the device API equals the golden model's bit for bit."""
    sample = make_sample(CFG, t, seed)
    assert_same(training_step(dev, *sample), training_step(GoldenDevice(CFG), *sample))


def error_codes(frames) -> list[int]:
    return [error_of(f)[0] for f in frames]


# ---- through the device API -----------------------------------------------------------------

def test_ident(dev, board):
    ident = dev.ident()
    assert ident.protocol_version == P.PROTOCOL_VERSION
    assert ident.config == CFG
    assert (ident.clock_hz, ident.baud, ident.name) == (sim_board.SIM_CLK_HZ, sim_board.SIM_BAUD,
                                                        BOARD_NAME)


def test_ident_bytes_equal_the_model(raw):
    (f,) = raw.cmd(Command.IDENT)
    assert f.cmd == Command.IDENT | P.REPLY_BIT


def test_params_roundtrip(dev):
    params, _, _ = make_sample(CFG, 1, seed=1)
    dev.write_params(params)
    back = dev.read_params()
    for k in PARAM_NAMES:
        assert np.array_equal(back[k], params[k]), k
    dev.write_params({"b": np.full(CFG.m, -5)})
    back = dev.read_params()
    assert np.array_equal(back["b"], np.full(CFG.m, -5))
    assert np.array_equal(back["W"], params["W"])


@pytest.mark.parametrize("estimator", ["centred", "one-sided"])
def test_training_step_golden_exact(dev, estimator):
    """LOAD, FORWARD, host nudges, ECHO, read the accumulators: bit for bit the golden model."""
    retries = dict(dev.stats)
    sample = make_sample(CFG, CFG.t_max, seed=3)
    gold = GoldenDevice(CFG)
    assert_same(training_step(dev, *sample, estimator=estimator),
                training_step(gold, *sample, estimator=estimator))
    # and the gradients the host derives from them
    eps = 0.01
    g_dev = read_gradients(dev, eps, estimator)
    g_gold = read_gradients(gold, eps, estimator)
    for k in PARAM_NAMES:
        assert np.array_equal(g_dev[k], g_gold[k]), k
    assert dev.stats["retries"] == retries["retries"] and dev.stats["go_backs"] == retries["go_backs"]


def test_selftest_and_kick(dev):
    gold = GoldenDevice(CFG)
    params, u, _ = make_sample(CFG, 50, seed=4)
    for d in (dev, gold):
        d.write_params(params)
    assert dev.selftest(500, seed=9) is True
    assert gold.selftest(500, seed=9) is True
    for d in (dev, gold):
        d.load(u)
        d.forward()
        d.echo(np.full((1, CFG.o), 1 << 20))      # a single kick
    for bank in BANKS:
        q1, w1 = dev.read_state(bank)
        q2, w2 = gold.read_state(bank)
        assert np.array_equal(q1, q2) and np.array_equal(w1, w2), bank


# ---- protocol faults as raw bytes -----------------------------------------------------------

def test_flipped_bits(raw, dev):
    raw.setup()
    rng = random.Random(1)
    frames = [encode_frame(Command.STATUS, 5), encode_frame(Command.FORWARD, 6, b"\x00"),
              encode_frame(Command.LOAD, 7, (10).to_bytes(4, "little")),
              encode_frame(Command.READ_STATE, 8, b"\x01")]
    codes = []
    for good in frames:
        body = len(good) - 1
        for i in range(body):
            bit = rng.randrange(8)
            bad = bytearray(good)
            bad[i] ^= 1 << bit
            codes += error_codes(raw.frames(bytes(bad)))
    assert ErrorCode.BAD_CRC in codes
    assert set(codes) <= {ErrorCode.BAD_CRC, ErrorCode.BAD_LENGTH}
    raw.check_unchanged()
    golden_step(dev)


def test_truncated_frames(raw, dev):
    raw.setup(forward=True)
    good = encode_frame(Command.ECHO, 9, (20).to_bytes(4, "little"))
    data = encode_frame(Command.DATA, 10, b"\x00\x00" + bytes(range(1, 200)))
    cuts = [(good, cut) for cut in range(1, len(good) - 1)] + \
        [(data, cut) for cut in (1, 3, 50, 150, len(data) - 2)]
    for frame, cut in cuts:
        (f,) = raw.frames(frame[:cut] + b"\x00")
        assert error_of(f)[0] in (ErrorCode.BAD_LENGTH, ErrorCode.BAD_CRC), (cut, f)
    raw.check_unchanged()
    golden_step(dev)


def test_oversized_frames(raw, dev):
    raw.setup()
    for n in (P.MAX_BODY_LEN + 1, P.MAX_BODY_LEN + 50, 1500, 2040):
        frames = raw.frames(bytes((i % 255) + 1 for i in range(n)) + b"\x00")
        assert error_codes(frames) == [ErrorCode.BAD_LENGTH], n
    # a frame one payload byte too long, correctly encoded otherwise
    body = bytes([Command.DATA, 3]) + bytes([1]) * (P.MAX_PAYLOAD + 1)
    import zlib

    from cobs import cobs
    wire = cobs.encode(body + zlib.crc32(body).to_bytes(4, "little")) + b"\x00"
    assert error_codes(raw.frames(wire)) == [ErrorCode.BAD_LENGTH]
    # a DATA chunk longer than the transfer allows (a frame within the limit)
    (f,) = raw.cmd(Command.LOAD, (4).to_bytes(4, "little"))
    (f,) = raw.cmd(Command.DATA, b"\x00\x00" + bytes(17))
    assert error_of(f) == (ErrorCode.OUT_OF_RANGE, Command.DATA, 0)
    raw.cmd(Command.RESET)
    raw.setup(seed=2)
    raw.check_unchanged()
    golden_step(dev)


def test_random_garbage(raw, dev):
    raw.setup(forward=True)
    rng = random.Random(7)
    for n in (1, 2, 3, 5, 8, 13, 40, 100, 300, 1000):
        raw.send(bytes(rng.randrange(1, 256) for _ in range(n)) + b"\x00")
    for _ in range(20):                  # garbage that contains delimiters
        data = bytes(rng.choice([0, rng.randrange(256)]) for _ in range(rng.randrange(1, 30)))
        raw.send(data + b"\x00")
    raw.send(b"\x00\x00\x00")            # empty frames are ignored
    raw.check_unchanged()
    golden_step(dev)


def test_unknown_commands(raw, dev):
    raw.setup()
    for cmd in (0x00, 0x05, 0x19, 0x21, 0x42, 0x7F, Command.STATUS | P.REPLY_BIT, 0xFE, 0xFF):
        (f,) = raw.cmd(cmd, b"\x01\x02", seq=33)
        assert f.seq == 33 and error_of(f) == (ErrorCode.UNKNOWN_COMMAND, cmd, 0)
    raw.check_unchanged()
    golden_step(dev)


def test_wrong_state_commands(raw, dev):
    (f,) = raw.cmd(Command.FORWARD, b"\x00")                    # nothing loaded
    assert error_of(f) == (ErrorCode.WRONG_STATE, Command.FORWARD, 0)
    (f,) = raw.cmd(Command.ECHO, (1).to_bytes(4, "little"))     # no FORWARD
    assert error_of(f) == (ErrorCode.WRONG_STATE, Command.ECHO, 0)
    (f,) = raw.cmd(Command.DATA, b"\x00\x00")                   # no transfer open
    assert error_of(f) == (ErrorCode.WRONG_STATE, Command.DATA, 0)
    raw.setup(t=20)
    (f,) = raw.cmd(Command.ECHO, (20).to_bytes(4, "little"))    # loaded, not forwarded
    assert error_of(f) == (ErrorCode.WRONG_STATE, Command.ECHO, 0)
    raw.cmd(Command.FORWARD, b"\x00")
    raw.transfer(Command.ECHO, (20).to_bytes(4, "little"), np.zeros(20, np.int64), CFG.state_width)
    (f,) = raw.cmd(Command.ECHO, (20).to_bytes(4, "little"))    # the FORWARD is used up
    assert error_of(f) == (ErrorCode.WRONG_STATE, Command.ECHO, 0)
    (f,) = raw.cmd(Command.LOAD, (20).to_bytes(4, "little"))    # open a transfer: BUSY
    for cmd, payload in [(Command.FORWARD, b"\x00"), (Command.READ_ACC, b""),
                         (Command.WRITE_PARAMS, b"\x0f"), (Command.SELFTEST, bytes(8))]:
        (f,) = raw.cmd(cmd, payload)
        assert error_of(f) == (ErrorCode.BUSY, cmd, 0)
    (f,) = raw.cmd(Command.DATA, b"\x01\x00" + bytes(80))       # ahead of next
    assert error_of(f) == (ErrorCode.SEQUENCE, Command.DATA, 0)
    raw.cmd(Command.STATUS)
    raw.cmd(Command.RESET)                                      # the only way out
    raw.check_unchanged()
    golden_step(dev)


def test_out_of_range_values(raw, dev):
    raw.setup(forward=True)
    for cmd, payload in [(Command.LOAD, (0).to_bytes(4, "little")),
                         (Command.LOAD, (CFG.t_max + 1).to_bytes(4, "little")),
                         (Command.LOAD, b"\x01"),
                         (Command.ECHO, (3).to_bytes(4, "little")),       # rows ∉ {1, T}
                         (Command.ECHO, (0).to_bytes(4, "little")),
                         (Command.FORWARD, b"\x02"),
                         (Command.FORWARD, b""),
                         (Command.SELFTEST, bytes(8)),
                         (Command.SELFTEST, bytes(7)),
                         (Command.READ_STATE, b"\x03"),
                         (Command.WRITE_PARAMS, b"\x10"),
                         (Command.WRITE_PARAMS, b"\x00"),
                         (Command.READ_PARAMS, b"\x00"),
                         (Command.READ_ACC, b"\x00"),
                         (Command.IDENT, b"\x00")]:
        (f,) = raw.cmd(cmd, payload)
        assert error_of(f) == (ErrorCode.OUT_OF_RANGE, cmd, 0), (cmd, payload)
    raw.check_unchanged()
    golden_step(dev)


def test_fuzz_corrupted_frames(raw, dev):
    """1,200 corrupted frames in small batches; every reply equals the model's, nothing hangs."""
    raw.setup(forward=True)
    rng = random.Random(2024)
    commands = [c for c in Command if c not in (Command.RESET, Command.CLEAR_ACC,
                                                 Command.CLEAR_FLAGS, Command.SELFTEST)]
    t0 = time.monotonic()
    sent = replies = batches = 0
    batch, sizes = b"", []
    while sent < 1200:
        cmd = rng.choice(commands)
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, 4, 8, 24])))
        data = corrupt(rng, encode_frame(cmd, rng.randrange(256), payload)[:-1],
                       max_garbage=48) + b"\x00"
        # Each batch goes out in one write, all of it unanswered at once: it stays within
        # the spec's receive capacity (a piece's wire length bounds its bodies), so
        # nothing overruns and every answer is the model's.
        if not P.pipelining_fits(sizes + [len(data)]):
            replies += len(raw.frames(batch))
            batches += 1
            batch, sizes = b"", []
        batch += data
        sizes.append(len(data))
        sent += 1
    replies += len(raw.frames(batch))
    seconds = time.monotonic() - t0
    print(f"fuzz: {sent} corrupted frames in {batches + 1} batches, {replies} error replies, "
          f"{seconds:.1f} s")
    assert replies >= sent // 2
    assert seconds < 60
    raw.check_unchanged()
    golden_step(dev)


def test_recovers_after_reset_of_an_open_transfer(raw, dev):
    raw.setup()
    (f,) = raw.cmd(Command.WRITE_PARAMS, b"\x0f")
    raw.frames(encode_frame(Command.DATA, raw.next_seq(), b"\x00\x00" + bytes(100))[:30])  # cut off
    raw.send(b"\x00")
    raw.cmd(Command.STATUS)
    raw.cmd(Command.RESET)
    raw.check_unchanged()
    golden_step(dev)


# ---- the commands ---------------------------------------------------------------------------

def test_hel_selftest_sim_board(capsys):
    rc = main(["selftest", "--device", "sim-board", "--steps", "10000"])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
    assert "PASS" in out and "golden model: pass" in out


def test_hel_compare_sim_board(capsys, tmp_path):
    save = tmp_path / "g.npz"
    rc = main(["compare", "--device", "sim-board", "--json", "--save", str(save)])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["bit_exact"] is True, report.get("golden_differences")
    assert report["golden_differences"] == []
    saved = np.load(save)
    assert min(r["golden_cos"] for r in report["rows"]) > 0.999
    assert all(np.all(np.isfinite(saved[f"golden_{p}"])) for p in PARAM_NAMES)


def test_bench_link_measures_the_board(board, port):
    """``hel bench link``'s measurement on this module's board (T = t_max)."""
    from hel_fpga.host.commands.bench import CountingPort, measure_link

    dev = SerialDevice(CountingPort(port), timeout=REPLY_TIMEOUT, expect=CFG)
    result = measure_link(dev, [16, CFG.t_max], board=board, min_payload=2048)
    print("\n".join(f"{r['phase']:8} T={r['t']:4} payload/wire {r['payload_per_wire']:.3f} "
                    f"payload/line rate {r['line_utilisation']:.3f} ({r['bound']}-bound)"
                    for r in result["phases"]))
    print(f"{result['board']['cycles_per_s']:,} simulated cycles/s")
    assert result["bit_exact"]
    long = [r for r in result["phases"] if r["t"] == CFG.t_max]
    assert [r["phase"] for r in long] == ["LOAD", "FORWARD", "ECHO"]
    for r in long:
        assert r["payload_per_wire"] >= 0.9, r
        assert r["wire_bytes"] * 10 * board.divisor <= r["sim_cycles"] * 1.01, r
        if r["phase"] != "LOAD":     # no step runs faster than the core's MACs/P floor
            assert r["cycles_per_step"] >= r["core_floor_per_step"], r
    assert result["board"]["cycles_per_s"] > 0


# ---- the verdicts' failure paths (no board) --------------------------------------------------

def test_selftest_fails_with_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(GoldenDevice, "selftest", lambda self, steps, seed=1: False)
    assert main(["selftest", "--steps", "10"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_compare_reports_a_difference_with_exit_1(monkeypatch, capsys):
    real = GoldenDevice.read_accumulators

    def off_by_one(self):
        acc = real(self)
        acc["W"][0, 0] += 1
        return acc

    monkeypatch.setattr(GoldenDevice, "read_accumulators", off_by_one)
    assert main(["compare", "--device", "model"]) == 1
    out = capsys.readouterr().out
    assert "NOT bit-exact (W accumulators: 1 of 256 differ)" in out


def test_the_archive_boards_configuration_trains_golden_exact_on_the_simulated_board():
    """The ``ulx3s-85f-n64`` core (N = M = 64, K = 12, O = 9) over the real protocol: its
    parameter and accumulator blocks are the longest any board sends (35 chunks of
    56-bit words), and a training step equals the golden model bit for bit."""
    from hel_fpga.boards.table import BOARDS
    cfg = BOARDS["ulx3s-85f-n64"].config
    sample = make_sample(cfg, 24, seed=11)
    assert P.chunk_count(sum(int(np.prod(s)) for s in cfg.param_shapes().values()), cfg.acc_width) > 32
    from hel_fpga.host.registry import open_device
    dev = open_device("sim-board", cfg)   # closing it stops the board
    try:
        assert_same(training_step(dev, *sample), training_step(GoldenDevice(cfg), *sample))
    finally:
        dev.close()


@pytest.mark.parametrize("task_fixture,data", [("small_regression", "resident"),
                                               ("small_classification", "stream")])
def test_on_chip_training_on_the_simulated_board_equals_the_golden_model(task_fixture, data, request,
                                                                         tmp_path, capsys):
    """``hel train --on-chip`` through the gateware's training core over the real protocol
    (TRAIN_SETUP, the sets resident through STORE or streamed through STREAM during each
    pass, WRITE/READ_MASTER, TRAIN, EVAL, METRICS): every loss, accuracy and device
    metric of the run equals the golden model's run."""
    task = str(request.getfixturevalue(task_fixture))
    runs = {}
    for device in ("sim", "sim-board"):
        rc = main(["train", "--on-chip", "--task", task, "--oscillators", "8", "--hidden", "8",
                   "--epochs", "2", "--batch", "4", "--device", device, "--out", str(tmp_path / device),
                   "--json", "--no-plots", "--data", data])
        assert rc == 0, capsys.readouterr().err
        runs[device] = json.loads(capsys.readouterr().out)
    timing = ("seconds", "samples_per_second")
    for a, b in zip(runs["sim"]["history"], runs["sim-board"]["history"], strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == \
               {k: v for k, v in b.items() if k not in timing}
    for key in ("final_train_loss", "final_test_loss", "onchip_final_train", "onchip_final_test"):
        assert runs["sim"][key] == runs["sim-board"][key], key
    assert runs["sim-board"]["settings"]["data"] == data
