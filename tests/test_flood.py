"""Floods: hundreds of back-to-back frames of every kind, each answered once, in wire order.

docs/protocol.md §4 promises one answer per frame — its reply, or an ERROR; OVERRUN
(seq ``OVERRUN_SEQ``) when the device could not take the frame in — in wire order,
and no OVERRUN at all while the host keeps within the receive capacity
(:func:`hel_fpga.spec.protocol.pipelining_fits`). The expected answers are built here
from the spec alone: the frame codec (:mod:`hel_fpga.spec.framing`), the tables and
layouts of :mod:`hel_fpga.spec.protocol`, the word packing of :mod:`hel_fpga.spec.wire`,
and a lenient COBS reading written below for the best-effort seq of a bad frame.
Every request is chosen so that its answer does not depend on what came before it
(from a freshly reset device: nothing loaded, all-zero parameters, accumulators and
banks), so a frame answered OVERRUN changes no later expectation.

* Fast tier: :class:`~hel_fpga.sim.protocol_model.ProtocolModel`, which answers every
  frame at once: its answers equal the expectation byte for byte, and frames it is
  told were not taken in get exactly the OVERRUN frame.
* ``verilator``: the simulated board (:data:`hel_fpga.sim.board.SIM_CONFIG`): each
  frame's answer is its expected answer or OVERRUN, byte for byte and in order; none
  is OVERRUN within the spec's capacity; the issue's reproductions (a SELFTEST then
  STATUS frames, 200 STATUS frames, a SELFTEST then ``01 00`` frames) are answered
  in full.
"""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from cobs import cobs

from hel_fpga.sim import board as sim_board
from hel_fpga.sim.protocol_model import ProtocolModel
from hel_fpga.spec import protocol as P
from hel_fpga.spec.framing import FrameError, FrameReader, decode_frame, encode_frame
from hel_fpga.spec.protocol import Command, ErrorCode
from hel_fpga.spec.wire import split_chunks

CFG = sim_board.SIM_CONFIG
CLK_HZ, BAUD, NAME = sim_board.SIM_CLK_HZ, sim_board.SIM_BAUD, "hel-fpga"

#: The issue's bytes: SELFTEST steps = 6000 seed = 1, seq 0xFA.
SELFTEST_6000 = bytes.fromhex("05 18 fa 70 17 01 02 01 01 01 05 db b4 be 62 00")
#: Its reply on a freshly reset device (all-zero parameters: the state returns).
SELFTEST_PASS = encode_frame(Command.SELFTEST | P.REPLY_BIT, 0xFA, b"\x01")


# ---- expectations from the spec ------------------------------------------------------------

def error(seq: int, code: ErrorCode, cmd: int = 0, arg: int = 0) -> bytes:
    return encode_frame(P.ERROR_REPLY, seq, P.pack_fields(
        P.ERROR_LAYOUT, {"code": code, "cmd": cmd, "arg": arg}))


#: The OVERRUN answer: ERROR, seq OVERRUN_SEQ, code OVERRUN, cmd 0, arg 0.
OVERRUN = error(P.OVERRUN_SEQ, ErrorCode.OVERRUN)


def decoded_prefix(raw: bytes) -> bytes:
    """The bytes a receiver has decoded from a frame's COBS bytes ``raw`` (delimiter
    excluded) by its end, however the frame is broken: a code byte ``c`` brings
    ``c − 1`` data bytes, and a zero first if the block before it was not a full run."""
    out, i, zero = bytearray(), 0, False
    while i < len(raw):
        c = raw[i]
        if zero:
            out.append(0)
        out += raw[i + 1:i + c]
        i += c
        zero = c != 0xFF
    return bytes(out)


def link_error(wire: bytes) -> bytes:
    """The ERROR answer to a bad frame: the reference codec's verdict, seq the second
    decoded byte (0 if none)."""
    try:
        decode_frame(wire)
    except FrameError as e:
        body = decoded_prefix(wire[:-1])
        return error(body[1] if len(body) >= 2 else 0, e.code)
    raise AssertionError(f"{wire.hex()} is a good frame")


def zero_words(cmd: Command, seq: int, total: int) -> bytes:
    """The data replies carrying ``total`` zero words of ``cmd``'s word width."""
    width = P.word_width(CFG, cmd)
    return b"".join(encode_frame(cmd | P.REPLY_BIT, seq, i.to_bytes(2, "little") + chunk)
                    for i, chunk in enumerate(split_chunks(np.zeros(total, np.int64), width)))


STATUS_RESET = P.pack_fields(P.STATUS_LAYOUT, {"flags": 0, "xfer_cmd": 0, "xfer_done": 0,
                                               "t_loaded": 0})
PARAM_WORDS = {name: int(np.prod(shape)) for name, shape in CFG.param_shapes().items()}


class Flood:
    """Frames (wire bytes, each ending at its delimiter) and each one's expected answer."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.frames: list[bytes] = []
        self.answers: list[bytes] = []
        self.bodies: list[int] = []        # wire length: a bound on the decoded body
        self.seq = 0

    @property
    def wire(self) -> bytes:
        return b"".join(self.frames)

    def add(self, wire: bytes, answer: bytes) -> None:
        self.frames.append(bytes(wire))
        self.answers.append(bytes(answer))
        self.bodies.append(len(wire))

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFF
        return self.seq

    def request(self, cmd: int, payload: bytes, answer) -> None:
        seq = self.next_seq()
        self.add(encode_frame(cmd, seq, payload), answer(seq))

    # every kind of frame whose answer does not depend on the device's history
    def status(self):
        self.request(Command.STATUS, b"",
                     lambda s: encode_frame(Command.STATUS | P.REPLY_BIT, s, STATUS_RESET))

    def ident(self):
        self.request(Command.IDENT, b"", lambda s: encode_frame(
            Command.IDENT | P.REPLY_BIT, s, P.pack_ident(CFG, CLK_HZ, BAUD, NAME)))

    def clear_flags(self):
        self.request(Command.CLEAR_FLAGS, b"",
                     lambda s: encode_frame(Command.CLEAR_FLAGS | P.REPLY_BIT, s))

    def read_params(self):
        mask = self.rng.randrange(1, P.PARAM_MASK_ALL + 1)
        total = sum(PARAM_WORDS[n] for i, n in enumerate(PARAM_WORDS) if mask >> i & 1)
        self.request(Command.READ_PARAMS, bytes([mask]),
                     lambda s: zero_words(Command.READ_PARAMS, s, total))

    def read_state(self):
        self.request(Command.READ_STATE, bytes([self.rng.randrange(3)]),
                     lambda s: zero_words(Command.READ_STATE, s, 2 * CFG.n))

    def read_acc(self):
        self.request(Command.READ_ACC, b"",
                     lambda s: zero_words(Command.READ_ACC, s, sum(PARAM_WORDS.values())))

    def rejected(self):
        cmd, payload, code = self.rng.choice([
            (Command.FORWARD, b"\x00", ErrorCode.WRONG_STATE),      # nothing loaded
            (Command.ECHO, b"\x01\x00\x00\x00", ErrorCode.WRONG_STATE),  # no FORWARD
            (Command.DATA, b"\x00\x00", ErrorCode.WRONG_STATE),     # no transfer open
            (0x42, b"", ErrorCode.UNKNOWN_COMMAND),
            (Command.STATUS | P.REPLY_BIT, b"", ErrorCode.UNKNOWN_COMMAND),
            (Command.STATUS, b"\x00", ErrorCode.OUT_OF_RANGE),      # request length
            (Command.READ_STATE, b"\x03", ErrorCode.OUT_OF_RANGE),  # bank > 2
            (Command.READ_PARAMS, b"\x00", ErrorCode.OUT_OF_RANGE),  # mask 0
            (Command.LOAD, b"\x00\x00\x00\x00", ErrorCode.OUT_OF_RANGE),  # T = 0
        ])
        self.request(cmd, payload, lambda s: error(s, code, cmd))

    def bad_crc(self):
        seq = self.next_seq()
        body = bytes([Command.STATUS, seq]) + bytes(self.rng.randrange(4))
        crc = P.crc32(body) ^ (1 << self.rng.randrange(32))
        self.add(cobs.encode(body + crc.to_bytes(4, "little")) + b"\x00",
                 error(seq, ErrorCode.BAD_CRC))

    def bad_length(self):
        seq = self.next_seq()
        kind = self.rng.randrange(4)
        if kind == 0:                    # a body shorter than MIN_BODY_LEN
            wire = cobs.encode(bytes([Command.STATUS, seq, 1])) + b"\x00"
        elif kind == 1:                  # cut short inside a COBS block
            wire = encode_frame(Command.READ_PARAMS, seq, b"\x0f\x01\x02")[:6] + b"\x00"
        elif kind == 2:                  # one byte over MAX_BODY_LEN
            body = bytes([Command.DATA, seq]) + bytes(P.MAX_PAYLOAD + 1)
            wire = cobs.encode(body + P.crc32(body).to_bytes(4, "little")) + b"\x00"
        else:                            # a lone code byte: nothing decoded
            wire = b"\x01\x00"
        self.add(wire, link_error(wire))

    def garbage(self):
        """Random bytes with delimiters in them: one bad frame per non-empty piece."""
        data = bytes(self.rng.choice([0, self.rng.randrange(256)])
                     for _ in range(self.rng.randrange(2, 40))) + b"\x00"
        pieces = data.split(b"\x00")[:-1]
        for piece in pieces:
            if piece:
                self.add(piece + b"\x00", link_error(piece + b"\x00"))
            elif self.frames:             # an empty frame: no answer
                self.frames[-1] += b"\x00"

    def mix(self, count: int) -> "Flood":
        kinds = ([self.status] * 6 + [self.ident, self.clear_flags, self.read_params,
                                      self.read_state, self.read_acc] + [self.rejected] * 4
                 + [self.bad_crc] * 2 + [self.bad_length] * 2 + [self.garbage])
        while len(self.frames) < count:
            self.rng.choice(kinds)()
        return self


def match(stream: bytes, answers: list[bytes], *, complete: bool = True):
    """Walk the device's ``stream`` through the expected ``answers``: each frame's
    answer must be its expected bytes or OVERRUN, in order. Returns the indices of the
    frames answered OVERRUN, or None if ``stream`` is a correct but unfinished prefix
    (only with ``complete=False``)."""
    pos, overrun = 0, []
    for i, want in enumerate(answers):
        rest = stream[pos:]
        if rest.startswith(want):
            pos += len(want)
        elif rest.startswith(OVERRUN):
            pos += len(OVERRUN)
            overrun.append(i)
        elif not complete and (want.startswith(rest) or OVERRUN.startswith(rest)):
            return None
        else:
            show = FrameReader().feed(rest[:200])
            raise AssertionError(f"frame {i} of {len(answers)}: answered {show}, "
                                 f"expected {FrameReader().feed(want)} or OVERRUN")
    assert pos == len(stream), f"{len(stream) - pos} bytes beyond the last answer"
    return overrun


# ---- the spec's numbers --------------------------------------------------------------------

def test_the_window_of_two_full_chunks_fits_the_stated_receive_capacity():
    chunk = P.body_len(P.CHUNK_HEADER_LEN + P.CHUNK_DATA_MAX)
    assert P.pipelining_fits([chunk] * P.WINDOW)
    assert not P.pipelining_fits([chunk] * P.WINDOW + [P.MIN_BODY_LEN])
    assert P.pipelining_fits([P.MIN_BODY_LEN] * P.RX_QUEUE_FRAMES)
    assert not P.pipelining_fits([P.MIN_BODY_LEN] * (P.RX_QUEUE_FRAMES + 1))


def test_issue_bytes_are_the_spec_encodings():
    assert SELFTEST_6000 == encode_frame(Command.SELFTEST, 0xFA, (6000).to_bytes(4, "little")
                                         + (1).to_bytes(4, "little"))
    assert bytes.fromhex("07 02 13 a3 31 51 f7 00") == encode_frame(Command.STATUS, 0x13)
    assert decode_frame(OVERRUN) == (P.ERROR_REPLY, P.OVERRUN_SEQ, b"\x03\x00\x00\x00")


# ---- fast tier: the protocol model -------------------------------------------------------------

def model() -> ProtocolModel:
    return ProtocolModel(CFG, clock_hz=CLK_HZ, baud=BAUD, name=NAME)


@pytest.mark.parametrize("seed", range(3))
def test_model_answers_a_flood_of_every_kind_once_each_in_wire_order(seed):
    flood = Flood(seed).mix(600)
    assert model().feed(flood.wire) == b"".join(flood.answers)


def test_model_answers_frames_not_taken_in_with_overrun_and_nothing_else():
    flood = Flood(7).mix(300)
    rng = random.Random(7)
    dropped = {i for i in range(len(flood.frames)) if rng.random() < 0.3}
    m = model()
    got = b"".join(m.feed(f, overrun=i in dropped) for i, f in enumerate(flood.frames))
    assert match(got, flood.answers) == sorted(dropped)
    assert got == b"".join(OVERRUN if i in dropped else a for i, a in enumerate(flood.answers))


def issue_reproductions():
    """The issue's three reproductions: (wire bytes, expected answers)."""
    status = [encode_frame(Command.STATUS, s) for s in range(200)]
    status_reply = [encode_frame(Command.STATUS | P.REPLY_BIT, s, STATUS_RESET)
                    for s in range(200)]
    return {
        "selftest then 20 STATUS": (SELFTEST_6000 + b"".join(status[:20]),
                                    [SELFTEST_PASS] + status_reply[:20]),
        "200 STATUS": (b"".join(status), status_reply),
        "selftest then 30 x 01 00": (SELFTEST_6000 + b"\x01\x00" * 30,
                                     [SELFTEST_PASS] + [error(0, ErrorCode.BAD_LENGTH)] * 30),
    }


@pytest.mark.parametrize("name", list(issue_reproductions()))
def test_model_answers_the_issue_reproductions_in_full(name):
    wire, answers = issue_reproductions()[name]
    assert model().feed(wire) == b"".join(answers)


# ---- the simulated board -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def port():
    serial = pytest.importorskip("serial")
    sb = sim_board.start(CFG, progress=print)
    p = serial.Serial(sb.path, 115200, timeout=0.05)
    yield p
    p.close()
    sb.stop()


def exchange(port, wire: bytes, answers: list[bytes], timeout: float = 120.0) -> list[int]:
    """Reset the board, send ``wire`` in one go (from a thread, so that neither side of
    the pty waits on the other) and read until every frame is answered; return the
    indices of the frames answered OVERRUN."""
    port.reset_input_buffer()
    port.write(encode_frame(Command.RESET, 0xEE))
    reset = encode_frame(Command.RESET | P.REPLY_BIT, 0xEE)
    got = bytearray()
    deadline = time.monotonic() + 30
    while len(got) < len(reset) and time.monotonic() < deadline:
        got += port.read(len(reset) - len(got))
    assert bytes(got) == reset, f"RESET answered {got.hex()}"

    writer = threading.Thread(target=port.write, args=(wire,))
    writer.start()
    got = bytearray()
    deadline = time.monotonic() + timeout
    result = None
    while time.monotonic() < deadline:
        got += port.read(4096)
        result = match(bytes(got), answers, complete=False)
        if result is not None:
            break
    writer.join()
    assert result is not None, (f"{len(got)} bytes in {timeout} s; answers so far end in "
                                f"{FrameReader().feed(bytes(got))[-3:]}")
    time.sleep(0.2)                          # nothing may follow the last answer
    got += port.read(4096)
    return match(bytes(got), answers)


@pytest.mark.verilator
@pytest.mark.parametrize("name", list(issue_reproductions()))
def test_board_answers_the_issue_reproductions_in_full(port, name):
    wire, answers = issue_reproductions()[name]
    assert exchange(port, wire, answers) == []


@pytest.mark.verilator
def test_board_answers_a_selftest_and_400_status_frames_each_once_in_order(port):
    """A SELFTEST keeps the command unit busy while 400 STATUS frames arrive: the spec's
    capacity (RX_QUEUE_FRAMES unanswered frames, the SELFTEST among them) is taken in,
    the frames beyond it are answered OVERRUN in their places, and the link carries on."""
    status = [encode_frame(Command.STATUS, s & 0xFF) for s in range(400)]
    answers = [SELFTEST_PASS] + [encode_frame(Command.STATUS | P.REPLY_BIT, s & 0xFF,
                                              STATUS_RESET) for s in range(400)]
    overrun = exchange(port, SELFTEST_6000 + b"".join(status), answers)
    assert overrun, "400 frames behind a 6000-step SELFTEST must overrun the queue"
    assert min(overrun) >= P.RX_QUEUE_FRAMES
    after = Flood(1).mix(20)
    assert exchange(port, after.wire, after.answers) == []


@pytest.mark.verilator
@pytest.mark.parametrize("seed", range(2))
def test_board_answers_a_flood_of_every_kind_once_each_in_wire_order(port, seed):
    """600 back-to-back frames of every kind, with replies up to ~2 KB that the line
    takes far longer to send than their requests: each frame gets its answer or
    OVERRUN, in order, and none while the frames so far fit the spec's capacity."""
    flood = Flood(100 + seed).mix(600)
    overrun = exchange(port, flood.wire, flood.answers)
    fit = max(k for k in range(len(flood.bodies) + 1) if P.pipelining_fits(flood.bodies[:k]))
    assert not overrun or min(overrun) >= fit
    print(f"flood {seed}: {len(flood.frames)} frames, {len(flood.wire)} bytes, "
          f"{len(overrun)} OVERRUN")
    after = Flood(2).mix(20)
    assert exchange(port, after.wire, after.answers) == []
