"""The command unit and top level against the reference device, byte for byte.

:class:`hel_fpga.rtl.top.Device` (frame decoder, command unit, HEL core, frame encoder)
runs in Amaranth's simulator at the byte level (the UART is tested in
``test_uart.py``; one test here runs :class:`hel_fpga.rtl.top.Top` through its UART
pins). Every request's wire bytes go to both the gateware and
:class:`hel_fpga.sim.protocol_model.ProtocolModel`, and the gateware's reply bytes must
equal the model's exactly.
"""

import copy
import random
import re
from pathlib import Path

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Signal
from amaranth.sim import Simulator

from hel_fpga.spec.framing import FrameReader, encode_frame
from hel_fpga.spec.wire import pack_words, split_chunks
from hel_fpga.spec import protocol as P
from hel_fpga.rtl.command import DataReplier, WordUnpacker
from hel_fpga.spec.formats import ICE40_OPERAND, HelConfig
from hel_fpga.spec.names import PARAM_NAMES
from hel_fpga.rtl.framing import BYTE_CYCLES
from hel_fpga.spec.protocol import Command
from hel_fpga.rtl.top import Device, Top
from hel_fpga.sim.protocol_model import ProtocolModel

CLK_HZ, BAUD, NAME = 12_000_000, 3_000_000, "test-board"

#: A small configuration: fast to simulate, every path exercised.
SMALL = HelConfig(n=4, m=3, k=2, o=2, t_max=8, lanes=2, acc_width=48)
#: A wider one: other widths (18-bit operands, 40-bit state), one lane, K = O = 1.
WIDE = HelConfig(n=5, m=4, k=1, o=1, t_max=16, lanes=1, state_width=40, state_frac=30,
                 operand_width=18, operand_frac=15, act_frac=16, param_frac=14, z_frac=14,
                 acc_width=60)
#: Long sequences: a LOAD of 2·300 16-bit inputs takes two chunks (504 words each).
LONG = HelConfig(n=2, m=2, k=2, o=1, t_max=300, lanes=1, acc_width=52)


# --- a session: the same bytes into the gateware and the model -----------------------------------

#: A session item that waits until the device's TRAIN or EVAL pass has ended (the model
#: runs a pass before it answers; the gateware answers at once and runs it after).
WAIT_PASS = "wait for the pass"


class Session:
    """Builds requests; :func:`run` plays them into the gateware and the model."""

    def __init__(self, cfg: HelConfig, seed: int = 0):
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.seq = 0
        self.items: list[tuple[str, bytes]] = []

    def raw(self, label: str, wire: bytes):
        self.items.append((label, bytes(wire)))

    def req(self, cmd: int, payload: bytes = b"", *, seq: int | None = None, label: str = ""):
        if seq is None:
            self.seq = (self.seq + 1) & 0xFF
            seq = self.seq
        name = Command(cmd).name if cmd in Command.__members__.values() else hex(cmd)
        self.raw(label or f"{name} seq {seq}", encode_frame(cmd, seq, payload))
        return seq

    def data(self, index: int, chunk: bytes, **kw):
        return self.req(Command.DATA, index.to_bytes(2, "little") + chunk, **kw)

    def transfer(self, cmd: Command, arg: bytes, words, width: int):
        self.req(cmd, arg)
        for i, chunk in enumerate(split_chunks(words, width)):
            self.data(i, chunk, label=f"{cmd.name} chunk {i}")

    # ---- random values in range
    def params(self, scale: int = 1 << 11):
        shapes = self.cfg.param_shapes()
        return {k: self.rng.integers(-scale, scale, size=shapes[k]) for k in PARAM_NAMES}

    def write_params(self, params, names=PARAM_NAMES):
        mask = sum(1 << PARAM_NAMES.index(n) for n in names)
        words = np.concatenate([np.asarray(params[n]).ravel() for n in names])
        self.transfer(Command.WRITE_PARAMS, bytes([mask]), words, self.cfg.operand_width)

    def inputs(self, t: int, scale: int = 1 << 12):
        return self.rng.integers(-scale, scale, size=(t, self.cfg.k))

    def load(self, u):
        self.transfer(Command.LOAD, len(u).to_bytes(4, "little"), np.asarray(u).ravel(),
                      self.cfg.operand_width)

    def nudges(self, rows: int, scale: int = 1 << 20):
        return self.rng.integers(-scale, scale, size=(rows, self.cfg.o))

    def echo(self, nu):
        self.transfer(Command.ECHO, len(nu).to_bytes(4, "little"), np.asarray(nu).ravel(),
                      self.cfg.state_width)

    def reads(self):
        """Everything observable: STATUS, parameters, accumulators, all banks."""
        self.req(Command.STATUS)
        self.req(Command.READ_PARAMS, bytes([P.PARAM_MASK_ALL]))
        self.req(Command.READ_ACC)
        for bank in range(3):
            self.req(Command.READ_STATE, bytes([bank]))


def run(session: Session, *, ready_prob: float = 1.0, gap_prob: float = 0.0, seed: int = 0,
        max_cycles: int = 400_000, settle: int = 80, dut=None, model=None):
    """Play ``session`` into ``Device`` and ``ProtocolModel``; return a list of mismatches.

    Each request's bytes enter one per ``BYTE_CYCLES`` cycles, as fast as the decoder's
    bit-serial CRC takes them (with random longer gaps if ``gap_prob``);
    the test then waits for as many reply bytes as the model produced and
    ``settle`` cycles more, so an extra byte shows up as a mismatch.
    """
    cfg = session.cfg
    dut = dut or Device(cfg, CLK_HZ, BAUD, NAME)
    model = model or ProtocolModel(cfg, clock_hz=CLK_HZ, baud=BAUD, name=NAME)
    rng = random.Random(seed)
    got = bytearray()
    problems: list[str] = []

    async def collect(ctx):
        ctx.set(dut.source.ready, 1)
        async for _, _, valid, ready, byte in ctx.tick().sample(
                dut.source.valid, dut.source.ready, dut.source.payload):
            if valid and ready:
                got.append(byte)
            if ready_prob < 1.0:
                ctx.set(dut.source.ready, rng.random() < ready_prob)

    async def main(ctx):
        for label, wire in session.items:
            if label == WAIT_PASS:          # a pass runs in the device: wait for its end
                await ctx.tick().until(~dut.training)
                continue
            expect = model.feed(wire)
            for byte in wire:
                ctx.set(dut.sink.payload, byte)
                ctx.set(dut.sink.valid, 1)
                await ctx.tick()
                ctx.set(dut.sink.valid, 0)      # the decoder's CRC takes BYTE_CYCLES a byte
                await ctx.tick().repeat(BYTE_CYCLES - 1)
                if gap_prob and rng.random() < gap_prob:
                    await ctx.tick().repeat(rng.randrange(1, 30))
            cycles = 0
            while len(got) < len(expect) and cycles < max_cycles:
                await ctx.tick()
                cycles += 1
            await ctx.tick().repeat(settle)
            if bytes(got) != expect:
                problems.append(f"{label}: got {describe(bytes(got))}, "
                                f"expected {describe(expect)}")
            got.clear()

    sim = Simulator(dut)
    sim.add_clock(1 / CLK_HZ)
    sim.add_testbench(collect, background=True)
    sim.add_testbench(main)
    sim.run()
    return problems


def describe(wire: bytes) -> str:
    items = FrameReader().feed(wire)
    return "[" + ", ".join(f"{f.cmd:02x}/{f.seq} {f.payload[:24].hex()}"
                           f"{'…' if len(f.payload) > 24 else ''} ({len(f.payload)} B)"
                           if hasattr(f, "cmd") else repr(f) for f in items) + "]"


def check(session: Session, **kw):
    problems = run(session, **kw)
    assert not problems, "\n".join(problems[:8])


# --- packing units against hel_fpga.spec.wire -------------------------------------------------------------

@pytest.mark.parametrize("widths", [(16, 36, 56), (4, 7, 63), (18, 40, 60)])
def test_data_replier_frames_equal_the_host_wire_format(widths):
    """Data replies for random totals (across chunk boundaries for the narrow widths):
    the frames' payloads are ``index ‖ pack_words(chunk)`` of :func:`hel_fpga.spec.wire.split_chunks`."""
    rng = random.Random(sum(widths))
    dut = DataReplier(widths, 16)
    jobs = []
    for sel, w in enumerate(widths):
        for total in (1, 7, 8, 9, rng.randrange(10, 200)) + ((P.chunk_words(w) + 3,) if w < 8 else ()):
            words = [rng.randrange(-(1 << (w - 1)), 1 << (w - 1)) for _ in range(total)]
            jobs.append((sel, w, words, rng.randrange(256), rng.randrange(256)))
    out = []

    async def producer(ctx):
        for sel, w, words, cmd, seq in jobs:
            ctx.set(dut.width, sel)
            ctx.set(dut.total, len(words))
            ctx.set(dut.cmd, cmd)
            ctx.set(dut.seq, seq)
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            for word in words:
                ctx.set(dut.words.payload, word)
                ctx.set(dut.words.valid, 1)
                await ctx.tick().until(dut.words.ready)
                ctx.set(dut.words.valid, 0)
                if rng.random() < 0.2:
                    await ctx.tick().repeat(rng.randrange(1, 20))
            await ctx.tick().until(~dut.busy)

    async def consumer(ctx):
        body = None
        async for _, _, valid, ready, beat in ctx.tick().sample(
                dut.source.valid, dut.source.ready, dut.source.payload):
            if valid and ready:
                assert (body is None) == bool(beat.first)
                body = bytearray() if beat.first else body
                body.append(beat.data)
                if beat.last:
                    out.append(bytes(body))
                    body = None
            ctx.set(dut.source.ready, rng.random() < 0.7)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer)
    sim.add_testbench(consumer, background=True)
    sim.run()
    expect = []
    for sel, w, words, cmd, seq in jobs:
        for i, chunk in enumerate(split_chunks(words, w)):
            expect.append(bytes([cmd | 0x80, seq]) + i.to_bytes(2, "little") + chunk)
    assert out == expect


def test_data_replier_numbers_every_chunk_of_the_longest_block_at_the_widest_width():
    """The chunk index counts up to the most chunks a block can make, which is at
    the widest word (fewest words per chunk), with ``total`` only as wide as the
    largest block, as the command unit sizes it."""
    widths, total = (16, 63), 600
    words = [(-1) ** i * (i * 2654435761 % (1 << 62)) for i in range(total)]
    dut = DataReplier(widths, len(Signal(range(total + 1))))
    out = []

    async def producer(ctx):
        ctx.set(dut.width, 1)
        ctx.set(dut.total, total)
        ctx.set(dut.cmd, 0x05)
        ctx.set(dut.seq, 9)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        ctx.set(dut.words.valid, 1)
        for word in words:
            ctx.set(dut.words.payload, word)
            await ctx.tick().until(dut.words.ready)
        ctx.set(dut.words.valid, 0)
        await ctx.tick().until(~dut.busy)

    async def consumer(ctx):
        ctx.set(dut.source.ready, 1)
        body = bytearray()
        async for _, _, valid, beat in ctx.tick().sample(dut.source.valid, dut.source.payload):
            if valid:
                body.append(beat.data)
                if beat.last:
                    out.append(bytes(body))
                    body = bytearray()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(producer)
    sim.add_testbench(consumer, background=True)
    sim.run()
    chunks = split_chunks(words, 63)
    assert len(chunks) > P.chunk_count((1 << len(dut.total)) - 1, 16) + 1  # the case that wrapped
    assert out == [bytes([0x85, 9]) + i.to_bytes(2, "little") + c for i, c in enumerate(chunks)]


@pytest.mark.parametrize("widths", [(16, 36), (4, 48), (25, 9)])
def test_word_unpacker_inverts_host_packing_and_takes_only_its_bytes(widths):
    rng = random.Random(sum(widths))
    dut = WordUnpacker(widths, 16)
    jobs = []
    for sel, w in enumerate(widths):
        for count in (1, 2, 3, 8, rng.randrange(9, 100)):
            words = [rng.randrange(-(1 << (w - 1)), 1 << (w - 1)) for _ in range(count)]
            data = bytearray(pack_words(words, w))
            if (count * w) % 8:                        # nonzero pad bits are ignored
                data[-1] |= 0xFF << ((count * w) % 8) & 0xFF
            jobs.append((sel, w, words, bytes(data)))
    got = []

    async def feeder(ctx):
        for sel, w, words, data in jobs:
            ctx.set(dut.width, sel)
            ctx.set(dut.count, len(words))
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            for byte in data:
                ctx.set(dut.sink.payload, byte)
                ctx.set(dut.sink.valid, 1)
                await ctx.tick().until(dut.sink.ready)
                ctx.set(dut.sink.valid, 0)
            # a following byte must not be taken
            ctx.set(dut.sink.payload, 0xA5)
            ctx.set(dut.sink.valid, 1)
            taken = False
            while ctx.get(dut.busy):
                _, _, ready = await ctx.tick().sample(dut.sink.ready)
                taken |= bool(ready)
            ctx.set(dut.sink.valid, 0)
            await ctx.tick()                          # the reader's last sample
            assert not taken, "the unpacker took a byte beyond its words"
            assert got == words, (w, len(words))
            got.clear()

    async def reader(ctx):
        async for _, _, valid, ready, word in ctx.tick().sample(
                dut.words.valid, dut.words.ready, dut.words.payload):
            if valid and ready:
                w = widths[ctx.get(dut.width)]          # a word is the payload's low w bits
                got.append((word & ((1 << w) - 1)) - ((word >> (w - 1) & 1) << w))
            ctx.set(dut.words.ready, rng.random() < 0.6)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(feeder)
    sim.add_testbench(reader, background=True)
    sim.run()


def test_request_lengths_and_transfer_rule_are_the_documented_ones():
    """The spec tables the gateware and the model elaborate from, against docs/protocol.md."""
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    documented = {}
    for name, code, request in re.findall(r"^\| (\w+) \| (0x[0-9A-F]{2}) \| ([^|]+) \|", doc, re.M):
        assert Command[name] == int(code, 16)
        documented[Command[name]] = sum(int(b) // 8 for b in re.findall(r":u(\d+)", request))
    assert documented == P.REQUEST_LEN
    rule = re.search(r"While\s+a\s+transfer\s+is\s+open,\s+the\s+device\s+accepts\s+only\s+"
                     r"([A-Z_,\s]+?)\s+and\s+(\w+)\.", doc)
    assert rule is not None
    allowed = {Command[n] for n in re.split(r",\s*", rule.group(1)) + [rule.group(2)]}
    assert allowed == P.DURING_TRANSFER


# --- the device against the model ----------------------------------------------------------------

def test_ident_status_and_the_documented_example_replies():
    s = Session(SMALL)
    s.req(Command.IDENT)
    s.req(Command.STATUS)
    s.req(0x42)                          # unknown
    s.req(Command.IDENT | P.REPLY_BIT)   # a reply code is unknown too
    s.raw("empty frames", b"\x00\x00\x00")
    s.req(Command.IDENT, seq=0)
    check(s)
    assert P.pack_ident(SMALL, CLK_HZ, BAUD, NAME)[0] == P.PROTOCOL_VERSION


def test_parameters_round_trip_in_both_widths():
    for cfg, seed in ((SMALL, 1), (WIDE, 2)):
        s = Session(cfg, seed)
        lo = -(1 << (cfg.operand_width - 1))
        p = s.params(scale=1 << (cfg.operand_width - 1))
        p["W"].flat[0], p["alpha"].flat[-1] = lo, -lo - 1      # the extremes
        s.write_params(p)
        s.req(Command.READ_PARAMS, bytes([P.PARAM_MASK_ALL]))
        s.req(Command.STATUS)
        check(s, ready_prob=0.5, seed=seed)


def test_parameter_masks_write_and_read_subsets():
    s = Session(SMALL, 3)
    s.write_params(s.params())
    s.write_params(s.params(), names=("B", "alpha"))
    s.write_params(s.params(), names=("W",))
    s.write_params(s.params(), names=("b",))
    for mask in range(1, 16):
        s.req(Command.READ_PARAMS, bytes([mask]))
    check(s)


@pytest.mark.parametrize("cfg", [SMALL, WIDE], ids=["small", "wide"])
def test_training_samples_centred_and_one_sided_equal_the_model(cfg):
    s = Session(cfg, 4)
    s.write_params(s.params())
    t = cfg.t_max // 2 + 1
    s.load(s.inputs(t))
    s.req(Command.FORWARD, b"\x00")                   # centred
    s.echo(s.nudges(t))
    s.req(Command.STATUS)
    s.req(Command.READ_ACC)
    s.req(Command.FORWARD, b"\x01")                   # one-sided (accumulates −G(0))
    s.req(Command.STATUS)
    s.echo(s.nudges(1))                              # a single kick (HEB)
    s.reads()
    s.req(Command.CLEAR_ACC)
    s.load(s.inputs(1))                              # T = 1
    s.req(Command.FORWARD, b"\x00")
    s.echo(s.nudges(1))
    s.req(Command.SELFTEST, (7).to_bytes(4, "little") + (99).to_bytes(4, "little"))
    s.req(Command.CLEAR_FLAGS)
    s.reads()
    check(s)


def test_overflow_flags_are_reported_and_cleared_like_the_model():
    s = Session(SMALL, 5)
    s.write_params({k: np.full(v, (1 << 15) - 1) for k, v in SMALL.param_shapes().items()})
    s.load(np.full((SMALL.t_max, SMALL.k), (1 << 15) - 1))
    s.req(Command.FORWARD, b"\x01")
    s.echo(s.nudges(SMALL.t_max, scale=1 << 33))
    s.req(Command.STATUS)
    s.req(Command.READ_ACC)
    s.req(Command.CLEAR_FLAGS)
    s.req(Command.STATUS)
    s.req(Command.FORWARD, b"\x00")
    s.req(Command.CLEAR_ACC)
    s.req(Command.STATUS)
    check(s)


def test_every_error_reply_and_no_state_change():
    cfg = SMALL
    s = Session(cfg, 6)
    s.write_params(s.params())
    # link errors
    good = bytearray(encode_frame(Command.STATUS, 0x33))
    good[2] ^= 0x08
    s.raw("bad CRC", bytes(good))
    s.raw("truncated", encode_frame(Command.STATUS, 0x34)[:4] + b"\x00")
    s.raw("short body", bytes([4, 0x02, 0x35, 0x11, 0x00]))
    s.raw("oversized", protocol_raw(bytes([Command.DATA, 0x36]) + bytes(range(1, 256)) * 5))
    s.raw("garbage", bytes([0x55, 0x13, 0xFF, 0x02, 0x00]))
    # unknown commands
    for c in (0x00, 0x05, 0x19, 0x21, 0x80, 0x93, 0xFF):
        s.req(c, b"\x01\x02")
    # wrong payload lengths
    for c, n in P.REQUEST_LEN.items():
        if c not in (Command.DATA, Command.RESET):
            s.req(c, bytes(n + 1))
            if n:
                s.req(c, bytes(n - 1))
    s.req(Command.DATA, b"\x00")
    # wrong state
    s.req(Command.FORWARD, b"\x00")
    s.req(Command.ECHO, (1).to_bytes(4, "little"))
    s.req(Command.DATA, b"\x00\x00\x01\x02")
    s.load(s.inputs(3))
    s.req(Command.ECHO, (3).to_bytes(4, "little"))  # no FORWARD yet
    # out of range
    for mask in (0, 16, 0xFF):
        s.req(Command.WRITE_PARAMS, bytes([mask]))
        s.req(Command.READ_PARAMS, bytes([mask]))
    for t in (0, cfg.t_max + 1, 1 << 31):
        s.req(Command.LOAD, t.to_bytes(4, "little"))
    s.req(Command.FORWARD, b"\x02")
    s.req(Command.READ_STATE, b"\x03")
    s.req(Command.SELFTEST, bytes(8))
    s.req(Command.FORWARD, b"\x00")
    for rows in (0, 2, 4, 1 << 16):
        s.req(Command.ECHO, rows.to_bytes(4, "little"))
    s.reads()
    # BUSY and DATA errors inside an open transfer
    nu = s.nudges(3)
    s.req(Command.ECHO, (3).to_bytes(4, "little"))
    for c, payload in ((Command.READ_ACC, b""), (Command.FORWARD, b"\x00"),
                       (Command.LOAD, b"\x01\x00\x00\x00"), (Command.CLEAR_FLAGS, b""),
                       (Command.ECHO, b"\x03\x00\x00\x00"), (0x77, b"")):
        s.req(c, payload)
    chunk = split_chunks(nu.ravel(), cfg.state_width)[0]
    s.data(1, chunk)                                  # ahead: SEQUENCE, arg 0
    s.data(0, chunk[:-1])                             # short: OUT_OF_RANGE
    s.data(0, chunk + b"\x00")                        # long: OUT_OF_RANGE
    s.req(Command.STATUS)
    s.req(Command.IDENT)
    s.data(0, chunk)                                  # finally good
    s.reads()
    check(s)


def protocol_raw(body: bytes) -> bytes:
    """A frame around any body (the host encoder refuses oversized payloads)."""
    from cobs import cobs
    return cobs.encode(body + P.crc32(body).to_bytes(4, "little")) + b"\x00"


def test_retransmissions_follow_the_protocol():
    cfg = SMALL
    s = Session(cfg, 7)
    s.write_params(s.params())
    u = s.inputs(4)
    seq = s.req(Command.LOAD, (4).to_bytes(4, "little"))
    s.req(Command.LOAD, (4).to_bytes(4, "little"), seq=seq)      # opening again: acked
    s.req(Command.LOAD, (4).to_bytes(4, "little"), seq=seq)
    s.req(Command.STATUS)
    s.req(Command.LOAD, (4).to_bytes(4, "little"), seq=seq)      # not the last frame: BUSY
    s.data(0, split_chunks(u.ravel(), cfg.operand_width)[0])
    s.data(0, split_chunks(u.ravel(), cfg.operand_width)[0])     # index < next: ack again
    seq = s.req(Command.FORWARD, b"\x01")                        # one-sided: −G(0)
    s.req(Command.FORWARD, b"\x01", seq=seq)                     # duplicate: not again
    s.req(Command.READ_ACC)
    s.req(Command.STATUS)
    s.echo(s.nudges(4))
    s.req(Command.READ_ACC)
    seq = s.req(Command.FORWARD, b"\x00")
    s.req(Command.FORWARD, b"\x00", seq=seq)                     # centred duplicate
    seq = s.req(Command.READ_ACC)
    s.req(Command.READ_ACC, seq=seq)
    seq = s.req(Command.ECHO, (1).to_bytes(4, "little"))
    s.req(Command.ECHO, (1).to_bytes(4, "little"), seq=seq)
    bad = bytearray(encode_frame(Command.DATA, 0x99, b"\x00\x00" + bytes(9)))
    bad[5] ^= 1
    s.raw("corrupted DATA", bytes(bad))                          # a link error
    s.req(Command.ECHO, (1).to_bytes(4, "little"), seq=seq)      # still the last good frame
    s.data(0, split_chunks(s.nudges(1).ravel(), cfg.state_width)[0])
    s.req(Command.DATA, b"\x00\x00" + bytes(9))                  # transfer closed: WRONG_STATE
    s.req(Command.STATUS)
    check(s)


def test_transfers_of_several_chunks_with_go_back_n():
    cfg = LONG
    s = Session(cfg, 8)
    u = s.inputs(cfg.t_max)
    chunks = split_chunks(u.ravel(), cfg.operand_width)
    assert len(chunks) == 2
    s.req(Command.LOAD, cfg.t_max.to_bytes(4, "little"))
    s.data(1, chunks[1])                 # ahead: SEQUENCE
    s.data(0, chunks[0])
    s.req(Command.STATUS)
    s.data(0, chunks[0])                 # retransmitted: ack 1
    s.data(1, chunks[1][:-2])            # short
    s.data(1, chunks[1])                 # last: ack 2, loaded
    s.req(Command.STATUS)
    s.load(s.inputs(3))
    s.req(Command.FORWARD, b"\x00")
    check(s, gap_prob=0.01, seed=8)


@pytest.mark.slow
def test_window_of_two_chunks_in_flight_and_go_back_n_after_a_corrupted_one():
    """The host's pipelining: two chunks sent back to back while the core works on the
    first (ECHO of 300 steps, 2 chunks of 36-bit nudges); replies in wire order."""
    cfg = LONG
    s = Session(cfg, 10)
    s.write_params(s.params(scale=1 << 10))
    t = cfg.t_max
    u = s.inputs(t)
    chunks = split_chunks(u.ravel(), cfg.operand_width)
    s.req(Command.LOAD, t.to_bytes(4, "little"))
    s.raw("LOAD chunks 0+1", encode_frame(Command.DATA, 0x40, b"\x00\x00" + chunks[0])
          + encode_frame(Command.DATA, 0x41, b"\x01\x00" + chunks[1]))
    s.req(Command.FORWARD, b"\x00")
    nu = split_chunks(s.nudges(t).ravel(), cfg.state_width)
    assert len(nu) == 2
    s.req(Command.ECHO, t.to_bytes(4, "little"))
    bad = bytearray(encode_frame(Command.DATA, 0x51, b"\x01\x00" + nu[1]))
    bad[40] ^= 0x04
    s.raw("ECHO chunk 0 + corrupted chunk 1", encode_frame(Command.DATA, 0x50, b"\x00\x00" + nu[0])
          + bytes(bad))
    s.req(Command.STATUS)
    s.raw("ECHO chunk 1 again", encode_frame(Command.DATA, 0x52, b"\x01\x00" + nu[1]))
    s.req(Command.READ_ACC)
    s.req(Command.READ_STATE, b"\x02")
    check(s)


def test_reset_clears_everything_even_inside_a_transfer():
    cfg = SMALL
    s = Session(cfg, 9)
    s.write_params(s.params())
    s.load(s.inputs(5))
    s.req(Command.FORWARD, b"\x00")
    s.echo(s.nudges(5))
    s.req(Command.RESET)
    s.reads()
    s.req(Command.FORWARD, b"\x00")      # nothing loaded
    s.write_params(s.params())
    s.load(s.inputs(5))
    s.req(Command.FORWARD, b"\x01")
    s.req(Command.ECHO, (5).to_bytes(4, "little"))
    s.req(Command.RESET)                 # aborts the open ECHO
    s.reads()
    s.req(Command.WRITE_PARAMS, b"\x0f")
    s.req(Command.RESET)                 # aborts an open WRITE_PARAMS
    s.reads()
    s.write_params(s.params())
    s.load(s.inputs(2))
    s.req(Command.FORWARD, b"\x00")
    s.reads()
    check(s)


@pytest.mark.slow
def test_random_request_streams_equal_the_model():
    """Random mixes of good and bad requests (wrong states, wrong lengths, duplicates,
    corrupted frames), with random gaps and back-pressure."""
    cfg = SMALL
    for trial in range(3):
        rng = random.Random(trial)
        s = Session(cfg, 100 + trial)
        s.write_params(s.params())
        for _ in range(40):
            r = rng.random()
            if r < 0.15:
                s.load(s.inputs(rng.randrange(1, cfg.t_max + 1)))
            elif r < 0.3:
                seq = s.req(Command.FORWARD, bytes([rng.randrange(2)]))
                if rng.random() < 0.3:
                    s.req(Command.FORWARD, bytes([rng.randrange(2)]), seq=seq)
            elif r < 0.45:
                rows = rng.choice([1, rng.randrange(1, cfg.t_max + 1)])
                s.echo(s.nudges(rows))
            elif r < 0.55:
                s.req(rng.choice([Command.READ_ACC, Command.STATUS, Command.CLEAR_ACC,
                                  Command.CLEAR_FLAGS, Command.IDENT]))
            elif r < 0.6:
                s.req(Command.READ_STATE, bytes([rng.randrange(4)]))
            elif r < 0.65:
                s.req(Command.SELFTEST, rng.randrange(3).to_bytes(4, "little")
                      + rng.randrange(1 << 32).to_bytes(4, "little"))
            elif r < 0.75:
                wire = bytearray(encode_frame(rng.randrange(256), rng.randrange(256),
                                              bytes(rng.randrange(256)
                                                    for _ in range(rng.randrange(6)))))
                if rng.random() < 0.5:
                    i = rng.randrange(len(wire) - 1)
                    wire[i] = rng.randrange(1, 256)
                s.raw("random frame", bytes(wire))
            elif r < 0.85:
                s.req(Command.DATA, bytes(rng.randrange(256) for _ in range(rng.randrange(8))))
            elif r < 0.9:
                s.req(Command.RESET)
                s.write_params(s.params())
            else:
                s.req(Command.READ_PARAMS, bytes([rng.choice([0, 15, 16])]))
        s.reads()
        check(s, ready_prob=0.7, gap_prob=0.02, seed=trial)


# --- floods: every frame answered once, in wire order ------------------------------------------

def frames_of(session: Session) -> list[bytes]:
    """The session's bytes cut into frames, each ending at the delimiter of a non-empty
    frame (empty frames stay with the frame before them)."""
    pieces, current = [], bytearray()
    for _, wire in session.items:
        for byte in wire:
            current.append(byte)
            if byte == P.DELIMITER and len(current.rstrip(b"\x00")):
                pieces.append(bytes(current))
                current.clear()
    if current:
        pieces[-1] += current
    return pieces


def run_flood(session: Session, *, line_cycles: int = BYTE_CYCLES, max_cycles: int = 3_000_000):
    """Every frame of ``session`` into ``Device`` back to back, one byte per
    ``BYTE_CYCLES`` cycles, without waiting for answers; the line side takes one byte
    per ``line_cycles`` cycles. Returns everything the device sent, once it has sent
    as many frames as it got and then been silent for 5 000 cycles."""
    dut = Device(session.cfg, CLK_HZ, BAUD, NAME)
    frames = len(frames_of(session))
    got = bytearray()
    wire = b"".join(w for _, w in session.items)

    async def line(ctx):
        cycle = 0
        async for _, _, valid, ready, byte in ctx.tick().sample(
                dut.source.valid, dut.source.ready, dut.source.payload):
            if valid and ready:
                got.append(byte)
            cycle += 1
            ctx.set(dut.source.ready, cycle % line_cycles == 0)

    async def main(ctx):
        for byte in wire:
            ctx.set(dut.sink.payload, byte)
            ctx.set(dut.sink.valid, 1)
            await ctx.tick()
            ctx.set(dut.sink.valid, 0)
            await ctx.tick().repeat(BYTE_CYCLES - 1)
        # at least one answer frame per frame, then silence
        quiet, cycles, seen = 0, 0, len(got)
        while (got.count(0) < frames or quiet < 5_000) and cycles < max_cycles:
            await ctx.tick().repeat(100)
            cycles += 100
            quiet = 0 if len(got) != seen else quiet + 100
            seen = len(got)

    sim = Simulator(dut)
    sim.add_clock(1 / CLK_HZ)
    sim.add_testbench(line, background=True)
    sim.add_testbench(main)
    sim.run()
    return bytes(got)


def match_model(session: Session, got: bytes) -> list[int]:
    """Walk the device's bytes frame by frame with the model: each frame's answer must
    be the model's or, where the device could not take the frame in, OVERRUN (the
    model then answers it as such and changes nothing). Returns the OVERRUN frames."""
    model = ProtocolModel(session.cfg, clock_hz=CLK_HZ, baud=BAUD, name=NAME)
    overrun_reply = model.overrun_reply()
    pos, overrun = 0, []
    for i, frame in enumerate(frames_of(session)):
        trial = copy.deepcopy(model)
        want = trial.feed(frame)
        if got.startswith(want, pos):
            model, pos = trial, pos + len(want)
        elif got.startswith(overrun_reply, pos):
            model.feed(frame, overrun=True)
            pos += len(overrun_reply)
            overrun.append(i)
        else:
            raise AssertionError(f"frame {i} ({describe(frame)}): device sent "
                                 f"{describe(got[pos:pos + 300])}, model {describe(want)} "
                                 f"or OVERRUN")
    assert pos == len(got), f"{describe(got[pos:])} beyond the last answer"
    return overrun


@pytest.mark.slow
def test_a_flood_of_every_kind_is_answered_frame_for_frame_like_the_model():
    """Transfers, training steps, reads, rejected requests and bad frames, all sent back
    to back with no wait for any answer, and a line four times slower than the input
    (so that answers fall behind and frames overrun): the device answers every frame
    once, in wire order, byte for byte the model's, with OVERRUN wherever it could not
    take a frame in (the model then drops that frame too: a lost DATA chunk, say, makes
    the later chunks SEQUENCE errors on both)."""
    cfg = SMALL
    s = Session(cfg, 31)
    rng = random.Random(31)
    s.write_params(s.params())
    for _ in range(8):
        s.load(s.inputs(rng.randrange(1, cfg.t_max + 1)))
        s.req(Command.FORWARD, bytes([rng.randrange(2)]))
        s.echo(s.nudges(rng.choice([1, len(s.inputs(1))])))
        s.reads()
        for _ in range(30):
            r = rng.random()
            if r < 0.3:
                s.req(Command.STATUS)
            elif r < 0.4:
                s.req(Command.IDENT)
            elif r < 0.5:
                s.req(rng.choice([0x42, Command.READ_STATE]), b"\x07")
            elif r < 0.6:
                bad = bytearray(encode_frame(Command.STATUS, rng.randrange(256)))
                bad[3] ^= 0x20
                s.raw("bad CRC", bytes(bad))
            elif r < 0.7:
                s.raw("01 00", b"\x01\x00")
            elif r < 0.8:
                s.raw("garbage", bytes(rng.choice([0, rng.randrange(256)])
                                       for _ in range(rng.randrange(2, 30))) + b"\x00")
            else:
                s.req(Command.READ_PARAMS, bytes([rng.randrange(1, 16)]))
    got = run_flood(s, line_cycles=4 * BYTE_CYCLES)
    overrun = match_model(s, got)
    assert len(frames_of(s)) > P.RX_QUEUE_FRAMES
    assert overrun


@pytest.mark.slow   # fills the 257-frame queue in Amaranth's simulator (~70 s)
def test_frames_beyond_the_queue_behind_a_selftest_are_overruns_in_their_places():
    """A SELFTEST keeps the command unit busy while 320 STATUS frames arrive: the first
    RX_QUEUE_FRAMES − 1 (the SELFTEST is the other unanswered frame) are taken in, the
    rest answered OVERRUN in order, and the frames sent afterwards are answered again."""
    cfg = SMALL
    s = Session(cfg, 32)
    s.req(Command.SELFTEST, (3000).to_bytes(4, "little") + (5).to_bytes(4, "little"))
    for _ in range(320):
        s.req(Command.STATUS)
    got = run_flood(s)
    overrun = match_model(s, got)
    assert overrun and min(overrun) >= P.RX_QUEUE_FRAMES
    assert overrun == list(range(min(overrun), 321))
    s2 = Session(cfg, 33)
    s2.req(Command.IDENT)
    check(s2)


# --- the top level -------------------------------------------------------------------------------

def test_top_answers_over_its_uart_pins():
    """IDENT and a STATUS through the real UART (4 clocks per bit) at the line level."""
    cfg = SMALL
    clk, baud = 4_000_000, 1_000_000
    dut = Top(cfg, clk, baud, "uart-test")
    assert dut.divisor == 4
    model = ProtocolModel(cfg, clock_hz=clk, baud=baud, name="uart-test")
    requests = [encode_frame(Command.IDENT, 1), encode_frame(Command.STATUS, 2)]
    expect = b"".join(model.feed(r) for r in requests)
    got = bytearray()

    async def line_in(ctx):
        ctx.set(dut.rx, 1)
        await ctx.tick().repeat(20)
        for byte in b"".join(requests):
            for bit in [0] + [byte >> i & 1 for i in range(8)] + [1]:
                ctx.set(dut.rx, bit)
                await ctx.tick().repeat(4)

    async def line_out(ctx):
        idle = 0
        while len(got) < len(expect) or idle < 400:
            _, _, tx = await ctx.tick().sample(dut.tx)
            idle = idle + 1 if tx else 0
            if not tx:                                   # a start bit: sample mid-bit
                await ctx.tick().repeat(2)
                byte = 0
                for i in range(8):
                    await ctx.tick().repeat(4)
                    byte |= ctx.get(dut.tx) << i
                await ctx.tick().repeat(4)
                assert ctx.get(dut.tx) == 1, "stop bit"
                got.append(byte)

    sim = Simulator(dut)
    sim.add_clock(1 / clk)
    sim.add_testbench(line_in)
    sim.add_testbench(line_out)
    sim.run()
    assert bytes(got) == expect


def test_top_converts_to_verilog_with_only_the_uart_pins():
    cfg = HelConfig(n=16, m=16, k=2, o=1, t_max=256, lanes=4, **ICE40_OPERAND)
    text = verilog.convert(Top(cfg, 12_000_000, 115_200, "icebreaker"), name="top")
    header = text[text.index("module top("):].split(";")[0]
    ports = sorted(p.strip() for p in header[len("module top("):].rstrip(")").split(","))
    assert ports == ["clk", "rst", "rx", "tx"]
