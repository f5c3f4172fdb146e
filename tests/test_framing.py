"""The frame layer: gateware encoder/decoder against the host codec.

The reference is :mod:`hel_fpga.spec.framing` (the PyPI ``cobs`` package and
``zlib.crc32``): frames the host encodes must come out of
:class:`~hel_fpga.rtl.framing.FrameDecoder` intact, anything else with the error code
:class:`~hel_fpga.spec.framing.FrameReader` assigns to the same bytes; frames
:class:`~hel_fpga.rtl.framing.FrameEncoder` produces must equal the host encoder's bytes
and decode on the host.
"""

import collections
import random
import zlib

import pytest
from amaranth import Module
from amaranth.back import verilog
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from cobs import cobs as cobs_codec

from hel_fpga.spec.framing import Frame, FrameError, FrameReader, decode_frame, encode_frame
from hel_fpga.spec import protocol
from hel_fpga.rtl.framing import BYTE_CYCLES, CRC_BIT_PARAMETERS, CRC_PARAMETERS, BlockRAMQueue, \
    FrameDecoder, FrameEncoder
from hel_fpga.spec.protocol import MAX_PAYLOAD, ErrorCode
from hel_fpga.rtl.uart import UART
from hel_fpga.sim.protocol_model import StreamDecoder

from amaranth_sim import simulate  # noqa: E402

#: An OVERRUN report as the protocol defines it (seq: spec OVERRUN_SEQ).
OVERRUN = (ErrorCode.OVERRUN, protocol.OVERRUN_SEQ)

#: Payload lengths around the COBS block boundaries (body = payload + 6 bytes).
EDGE_LENGTHS = [0, 1, 2, 247, 248, 249, 253, 254, 255, 502, 508, MAX_PAYLOAD]


def payload_bytes(rng, n, kind):
    if kind == "random":
        return bytes(rng.randrange(256) for _ in range(n))
    if kind == "zeros":            # mostly zeros: many one-byte COBS blocks
        return bytes(0 if rng.random() < 0.8 else rng.randrange(1, 256) for _ in range(n))
    if kind == "nonzero":          # no zeros: full 254-byte runs
        return bytes(rng.randrange(1, 256) for _ in range(n))
    raise ValueError(kind)


def random_frames(rng, lengths, kinds=("random", "zeros", "nonzero")):
    return [Frame(rng.randrange(256), rng.randrange(256), payload_bytes(rng, n, kind))
            for n in lengths for kind in kinds]


def raw_frame(body):
    """A frame around any body, even an invalid one (host encoder's CRC and COBS)."""
    return cobs_codec.encode(body + protocol.crc32(body).to_bytes(4, "little")) + b"\x00"


def reference(stream):
    """What the host reader makes of ``stream``: good frames, error codes."""
    items = FrameReader().feed(stream)
    return ([f for f in items if isinstance(f, Frame)],
            [e.code for e in items if isinstance(e, FrameError)])


# --- simulation harness --------------------------------------------------------------------------


def body_collector(stream, frames, *, ready_prob=1.0, rng=None, log=None):
    """Assemble FrameByte beats into bodies, checking the first/last markers and that
    every beat's ``length`` is its frame's body length."""
    lengths = set()

    async def collect(ctx):
        body = None
        ctx.set(stream.ready, 1)
        async for _, _, valid, ready, beat in ctx.tick().sample(
                stream.valid, stream.ready, stream.payload):
            if valid and ready:
                assert (body is None) == bool(beat.first), "first marker out of place"
                body = bytearray() if beat.first else body
                body.append(beat.data)
                lengths.add(int(beat.length))
                if beat.last:
                    assert lengths == {len(body)}, "length field differs from the body length"
                    lengths.clear()
                    frames.append(Frame(body[0], body[1], bytes(body[2:])))
                    if log is not None:
                        log.append(frames[-1])
                    body = None
            if ready_prob < 1.0:
                ctx.set(stream.ready, rng.random() < ready_prob)
    return collect


def error_collector(stream, errors, log=None):
    async def collect(ctx):
        ctx.set(stream.ready, 1)
        async for _, _, valid, payload in ctx.tick().sample(stream.valid, stream.payload):
            if valid:
                errors.append((ErrorCode(payload.code), payload.seq))
                if log is not None:
                    log.append(errors[-1])
    return collect


def frame_collector(dut, frames):
    """Collect the decoder's good frames (``source`` beats taken by whoever drives
    ``ready``) as :class:`Frame` objects into ``frames``."""
    async def collect(ctx):
        body = bytearray()
        async for _, _, valid, ready, beat in ctx.tick().sample(
                dut.source.valid, dut.source.ready, dut.source.payload):
            if valid and ready:
                body.append(beat.data)
                if beat.last:
                    frames.append(Frame(body[0], body[1], bytes(body[2:])))
                    body = bytearray()
    return collect


async def send_byte(ctx, sink, byte):
    """One byte into a FrameDecoder, then idle until the next may come: its bit-serial
    CRC takes ``BYTE_CYCLES`` cycles a byte (a UART byte takes at least 40)."""
    ctx.set(sink.payload, byte)
    ctx.set(sink.valid, 1)
    await ctx.tick()
    ctx.set(sink.valid, 0)
    await ctx.tick().repeat(BYTE_CYCLES - 1)


def run_decoder(stream, *, ready_prob=1.0, gap_prob=0.0, seed=0, dut=None, between=None,
                log=None):
    """Feed raw ``stream`` bytes into a FrameDecoder; return (frames, [(code, seq)]).

    ``log``, if a list, receives frames and error reports in the order they were taken."""
    rng = random.Random(seed)
    dut = dut or FrameDecoder()
    frames, errors = [], []

    async def feed(ctx):
        for byte in stream:
            await send_byte(ctx, dut.sink, byte)
            if gap_prob and rng.random() < gap_prob:
                ctx.set(dut.sink.valid, 0)
                await ctx.tick().repeat(rng.randrange(1, 40))
        ctx.set(dut.sink.valid, 0)
        idle = 0
        while idle < 12:               # drained: no beat or report offered for 12 cycles
            idle = 0 if ctx.get(dut.source.valid) or ctx.get(dut.error.valid) else idle + 1
            await ctx.tick()

    simulate(dut, feed, max_cycles=2_000_000, background=[body_collector(dut.source, frames, ready_prob=ready_prob,
                                                   rng=rng, log=log),
                                    error_collector(dut.error, errors, log=log)])
    return frames, errors


def run_encoder(frames, *, ready_prob=1.0, gap_prob=0.0, seed=0, timing=None):
    """Feed frame bodies into a FrameEncoder; return the bytes it sends.

    If ``timing`` is a dict, its ``"in"`` and ``"out"`` lists receive the cycle numbers
    at which body bytes were accepted and line bytes were sent.
    """
    rng = random.Random(seed)
    dut = FrameEncoder()
    out = bytearray()

    async def produce(ctx):
        for frame in frames:
            body = bytes([frame.cmd, frame.seq]) + frame.payload
            for i, byte in enumerate(body):
                ctx.set(dut.sink.payload, {"data": byte, "first": i == 0,
                                           "last": i == len(body) - 1})
                ctx.set(dut.sink.valid, 1)
                await ctx.tick().until(dut.sink.ready)
                if gap_prob and rng.random() < gap_prob:
                    ctx.set(dut.sink.valid, 0)
                    await ctx.tick().repeat(rng.randrange(1, 20))
        ctx.set(dut.sink.valid, 0)
        while out.count(0) < len(frames):
            await ctx.tick()

    async def consume(ctx):
        ctx.set(dut.source.ready, 1)
        cycle = 0
        async for _, _, in_valid, in_ready, valid, ready, byte in ctx.tick().sample(
                dut.sink.valid, dut.sink.ready,
                dut.source.valid, dut.source.ready, dut.source.payload):
            cycle += 1
            if timing is not None and in_valid and in_ready:
                timing.setdefault("in", []).append(cycle)
            if valid and ready:
                out.append(byte)
                if timing is not None:
                    timing.setdefault("out", []).append(cycle)
            if ready_prob < 1.0:
                ctx.set(dut.source.ready, rng.random() < ready_prob)

    simulate(dut, produce, background=[consume], max_cycles=1_000_000)
    return bytes(out)


# --- host codec ----------------------------------------------------------------------------------

def test_bit_serial_crc_equals_the_host_crc():
    """The codecs' CRC, one bit per step LSB first, is the link's CRC-32 (zlib's)."""
    rng = random.Random(5)
    for n in (0, 1, 2, 7, 64, 1030):
        data = bytes(rng.randrange(256) for _ in range(n))
        bits = [b >> i & 1 for b in data for i in range(8)]
        assert CRC_BIT_PARAMETERS.compute(bits) == zlib.crc32(data)
        assert CRC_PARAMETERS.compute(data) == zlib.crc32(data)


def test_host_codec_matches_the_worked_example_in_protocol_docstring():
    assert encode_frame(0x01, 0x07) == bytes.fromhex("07 01 07 1D B6 A6 C6 00")
    assert decode_frame(bytes.fromhex("07 01 07 1D B6 A6 C6")) == Frame(1, 7, b"")


def test_host_reader_yields_the_same_frames_for_any_chunking():
    rng = random.Random(5)
    frames = random_frames(rng, [0, 3, 300, 600])
    wire = b"".join(encode_frame(*f) for f in frames)
    reader, got = FrameReader(), []
    i = 0
    while i < len(wire):
        step = rng.randrange(1, 40)
        got += reader.feed(wire[i:i + step])
        i += step
    assert got == frames and reader.pending == 0


@pytest.mark.parametrize("raw, code", [
    (bytes.fromhex("07 01 07 1D B6 A6 C7"), ErrorCode.BAD_CRC),
    (bytes.fromhex("08 01 07 1D B6 A6 C6"), ErrorCode.BAD_LENGTH),    # block cut short
    (bytes.fromhex("06 01 07 1D B6 A6"), ErrorCode.BAD_LENGTH),       # body of 5 bytes
    (b"\x01", ErrorCode.BAD_LENGTH),                                   # empty body
])
def test_host_decoder_classifies_bad_frames(raw, code):
    with pytest.raises(FrameError) as info:
        decode_frame(raw)
    assert info.value.code == code


def test_host_refuses_to_encode_or_accept_oversized_payloads():
    with pytest.raises(ValueError):
        encode_frame(1, 2, bytes(MAX_PAYLOAD + 1))
    body = bytes(MAX_PAYLOAD + 3)
    with pytest.raises(FrameError) as info:
        decode_frame(raw_frame(body))
    assert info.value.code == ErrorCode.BAD_LENGTH


# --- gateware decoder: host encoder → FrameDecoder -----------------------------------------------

@pytest.mark.parametrize("kind", ["random", "zeros", "nonzero"])
def test_decoder_delivers_host_frames_of_every_edge_length_back_to_back(kind):
    rng = random.Random(f"decoder-{kind}")
    frames = random_frames(rng, EDGE_LENGTHS, kinds=[kind])
    got, errors = run_decoder(b"".join(encode_frame(*f) for f in frames))
    assert got == frames
    assert errors == []


def test_decoder_delivers_frames_under_random_backpressure_and_idle_gaps():
    rng = random.Random(11)
    frames = random_frames(rng, [0, 5, 60, 249, 400])
    got, errors = run_decoder(b"".join(encode_frame(*f) for f in frames),
                              ready_prob=0.6, gap_prob=0.05, seed=11)
    assert got == frames
    assert errors == []


def test_decoder_reports_bad_crc_with_the_frame_seq_and_keeps_the_next_frame():
    good = [Frame(0x10, 0x21, b"abc"), Frame(0x11, 0x22, b"\x00xyz\x00")]
    bad = bytearray(encode_frame(0x12, 0x33, b"payload"))
    bad[-3] ^= 0x40                                     # a CRC byte
    stream = encode_frame(*good[0]) + bytes(bad) + encode_frame(*good[1])
    assert reference(stream) == (good, [ErrorCode.BAD_CRC])
    got, errors = run_decoder(stream)
    assert got == good
    assert errors == [(ErrorCode.BAD_CRC, 0x33)]


def test_decoder_rejects_truncated_frames_like_the_host():
    rng = random.Random(12)
    stream = bytearray()
    for n in (0, 10, 260, 700):
        wire = encode_frame(1, 2, payload_bytes(rng, n, "random"))
        for cut in (1, 2, 5, rng.randrange(1, len(wire) - 1), len(wire) - 2):
            stream += wire[:cut] + b"\x00"
        stream += wire
    frames, codes = reference(bytes(stream))
    assert len(codes) == 20 and set(codes) <= {ErrorCode.BAD_LENGTH, ErrorCode.BAD_CRC}
    got, errors = run_decoder(bytes(stream))
    assert got == frames and len(frames) == 4
    assert [code for code, _ in errors] == codes


def test_decoder_rejects_oversized_frames_and_accepts_the_maximal_one():
    rng = random.Random(13)
    maximal = Frame(7, 8, payload_bytes(rng, MAX_PAYLOAD, "random"))
    stream = (raw_frame(bytes(rng.randrange(1, 256) for _ in range(MAX_PAYLOAD + 3)))
              + encode_frame(*maximal)
              + raw_frame(bytes(rng.randrange(256) for _ in range(3000)))
              + encode_frame(9, 10, b"after"))
    frames, codes = reference(stream)
    assert codes == [ErrorCode.BAD_LENGTH] * 2
    got, errors = run_decoder(stream)
    assert got == frames == [maximal, Frame(9, 10, b"after")]
    assert [code for code, _ in errors] == codes


def test_decoder_resynchronises_after_random_garbage():
    rng = random.Random(14)
    for trial in range(6):
        garbage = bytes(rng.choice([0, rng.randrange(256)]) if rng.random() < 0.1
                        else rng.randrange(1, 256) for _ in range(rng.randrange(1, 400)))
        frame = Frame(rng.randrange(256), rng.randrange(256), payload_bytes(rng, 50, "random"))
        stream = garbage + b"\x00" + encode_frame(*frame)
        frames, codes = reference(stream)
        assert frames[-1] == frame
        got, errors = run_decoder(stream, seed=trial)
        assert got == frames
        assert [code for code, _ in errors] == codes


@pytest.mark.parametrize("runs", [1, 4])
def test_a_final_full_run_followed_by_an_empty_block_is_accepted_everywhere(runs):
    """The non-canonical COBS form the spec accepts: a body ending in a full 254-byte run,
    encoded with an extra ``01`` block before the delimiter, is the same frame to the
    reference codec, the protocol model's decoder and the gateware decoder."""
    rng = random.Random(runs)
    while True:                      # a body of ``runs`` full runs: no zero, CRC included
        frame = Frame(0x11, 0x22, payload_bytes(rng, 254 * runs - 6, "nonzero"))
        canonical = encode_frame(*frame)
        if len(canonical) == 255 * runs + 1:
            break
    assert canonical[-256] == 0xFF
    extra = canonical[:-1] + b"\x01\x00"
    assert decode_frame(extra) == frame
    assert FrameReader().feed(extra + canonical) == [frame, frame]
    decoder = StreamDecoder()
    assert [r for r in map(decoder.push, extra) if r] == [("frame", *frame)]
    assert run_decoder(extra + canonical) == ([frame, frame], [])


def test_decoder_ignores_empty_frames_between_delimiters():
    frames = [Frame(1, 1, b""), Frame(2, 2, b"\x00\x00"), Frame(3, 3, b"z")]
    stream = (b"\x00\x00\x00" + encode_frame(*frames[0]) + b"\x00" * 5
              + encode_frame(*frames[1]) + b"\x00" + encode_frame(*frames[2]))
    got, errors = run_decoder(stream)
    assert got == frames
    assert errors == []


@pytest.mark.parametrize("seed", range(5))
def test_decoder_matches_host_reader_on_randomly_corrupted_streams(seed):
    """Bit flips, dropped and inserted bytes, stray delimiters, cut frames: the decoder
    must deliver exactly the frames the host reader accepts and the same error codes."""
    rng = random.Random(seed)
    for trial in range(5):
        frames = [Frame(rng.randrange(256), rng.randrange(256),
                        payload_bytes(rng, rng.choice([0, 3, 40, 250, 300]),
                                      rng.choice(["random", "zeros", "nonzero"])))
                  for _ in range(4)]
        stream = bytearray(b"".join(encode_frame(*f) for f in frames))
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(stream))
            match rng.randrange(5):
                case 0: stream[i] ^= 1 << rng.randrange(8)
                case 1: del stream[i]
                case 2: stream.insert(i, rng.randrange(256))
                case 3: stream.insert(i, 0)
                case 4: del stream[i:i + rng.randrange(1, 30)]
        stream += b"\x00" + encode_frame(0xAA, trial, b"sentinel")
        frames, codes = reference(bytes(stream))
        assert frames[-1] == Frame(0xAA, trial, b"sentinel")
        got, errors = run_decoder(bytes(stream), ready_prob=0.8, seed=trial)
        assert got == frames, f"trial {trial}"
        assert [code for code, _ in errors] == codes, f"trial {trial}"


def test_decoder_reports_bad_frames_in_wire_order_behind_slowly_read_frames():
    """A slow reader: every report comes after the good frames before it on the wire
    have been read and before the ones after it, so a consumer can answer in order.
    (Five entries: one frame at the reader, four queued, the length FIFO's depth.)"""
    rng = random.Random(17)
    items, stream = [], bytearray()
    for i, (n, bad) in enumerate([(300, False), (30, True), (30, False), (0, True), (0, False)]):
        frame = Frame(0x20 + i, i, payload_bytes(rng, n, "random"))
        wire = bytearray(encode_frame(*frame))
        if bad:
            wire[-2] ^= 0x10                            # a CRC byte: BAD_CRC, seq i
            items.append((ErrorCode.BAD_CRC, i))
        else:
            items.append(frame)
        stream += wire
    log = []
    run_decoder(bytes(stream), ready_prob=0.3, seed=17, log=log)
    assert log == items
    # a cut-short body between two frames, read slowly
    a, b = Frame(1, 1, bytes(200)), Frame(2, 2, b"x")
    log = []
    run_decoder(encode_frame(*a) + b"\x05\x01\x09\x00" + encode_frame(*b),
                ready_prob=0.2, seed=3, log=log)
    assert log == [a, (ErrorCode.BAD_LENGTH, 9), b]


def test_decoder_drops_frames_that_do_not_fit_with_overrun_and_recovers():
    """Nobody reads: 2048-byte ring, frames of 606 bytes (602 kept after the CRC)."""
    rng = random.Random(16)
    frames = random_frames(rng, [600], kinds=["random"] * 5)
    later = Frame(1, 2, b"later")
    dut = FrameDecoder(depth=2048)
    got, errors = [], []
    stream = b"".join(encode_frame(*f) for f in frames)

    async def feed(ctx):
        ctx.set(dut.source.ready, 0)
        for byte in stream:
            await send_byte(ctx, dut.sink, byte)
        ctx.set(dut.sink.valid, 0)
        await ctx.tick().repeat(10)
        ctx.set(dut.source.ready, 1)
        await ctx.tick().repeat(3 * 610)
        for byte in encode_frame(*later):
            await send_byte(ctx, dut.sink, byte)
        ctx.set(dut.sink.valid, 0)
        await ctx.tick().repeat(30)

    async def read(ctx):
        async for _, _, valid, ready, beat in ctx.tick().sample(
                dut.source.valid, dut.source.ready, dut.source.payload):
            if valid and ready:
                got.append(beat.data)

    simulate(dut, feed, background=[read, error_collector(dut.error, errors)])
    # 0 + 606, 602 + 606, 1204 + 606 <= 2048; 1806 + 606 > 2048: the last two overrun.
    kept = frames[:3] + [later]
    assert bytes(got) == b"".join(bytes([f.cmd, f.seq]) + f.payload for f in kept)
    assert errors == [OVERRUN, OVERRUN]


def test_decoder_holds_at_most_frames_plus_one_frames_and_overruns_the_rest():
    """Nobody reads while 8 frames arrive: a queue of 5 entries plus the frame at the
    reader take 6, the other two are answered OVERRUN (seq OVERRUN_SEQ)."""
    frames = [Frame(i, i, b"") for i in range(8)]
    dut = FrameDecoder(frames=5)
    stream = b"".join(encode_frame(*f) for f in frames)
    got, errors = [], []

    async def feed(ctx):
        for byte in stream:
            await send_byte(ctx, dut.sink, byte)
        ctx.set(dut.sink.valid, 0)
        await ctx.tick().repeat(5)
        ctx.set(dut.source.ready, 1)
        await ctx.tick().repeat(40)

    simulate(dut, feed, background=[frame_collector(dut, got), error_collector(dut.error, errors)])
    assert got == frames[:6]
    assert errors == [OVERRUN, OVERRUN]


def flood(rng, count):
    """``count`` back-to-back frames of every kind, what the host reader makes of each,
    and their wire lengths: good frames of random lengths (a few long ones), bad CRCs, cut-short and
    too-short bodies, bare ``01 00`` garbage; empty frames (ignored) in between."""
    stream, expect, sizes = bytearray(), [], []
    for i in range(count):
        kind = rng.choice(["good"] * 4 + ["long", "crc", "short", "garbage", "cut"])
        if kind in ("good", "long"):
            wire = encode_frame(rng.randrange(256), i & 0xFF,
                                payload_bytes(rng, rng.randrange(300, 700) if kind == "long"
                                              else rng.randrange(9), "random"))
        elif kind == "crc":
            wire = bytearray(encode_frame(0x02, i & 0xFF, bytes([i & 0xFF])))
            wire[-2] ^= 0x40                           # a CRC byte
        elif kind == "short":
            wire = cobs_codec.encode(bytes([0x02, i & 0xFF, 1])) + b"\x00"
        elif kind == "garbage":
            wire = b"\x01\x00"
        else:
            wire = encode_frame(0x11, i & 0xFF, b"\x0f")[:-3] + b"\x00"
        items = FrameReader().feed(bytes(wire))
        assert len(items) == 1
        # a bad frame's seq: its second decoded byte (every bad kind but garbage has one)
        expect.append(items[0] if isinstance(items[0], Frame)
                      else (items[0].code, 0 if kind == "garbage" else i & 0xFF))
        stream += wire
        sizes.append(len(wire))
        if rng.random() < 0.1:
            stream += b"\x00"
    return bytes(stream), expect, sizes


def assert_one_answer_each_in_order(log, expect):
    """``log`` answers ``expect``'s frames one for one, in order: each its expected item
    or OVERRUN. Returns the number of OVERRUNs."""
    assert len(log) == len(expect), f"{len(log)} answers to {len(expect)} frames"
    for i, (got, want) in enumerate(zip(log, expect)):
        assert got in (want, OVERRUN), f"frame {i}: {got!r}, expected {want!r} or OVERRUN"
    return log.count(OVERRUN)


# The device's own queue depth (257) takes ~40 s in Amaranth's simulator: slow tier; the
# simulated board's flood test (tests/test_flood.py) drives the same depth in Verilator.
@pytest.mark.parametrize("frames, count, ready_prob", [
    (5, 300, 0.05), pytest.param(257, 420, 0.02, marks=pytest.mark.slow)])
def test_decoder_answers_every_frame_of_a_flood_once_in_wire_order(frames, count, ready_prob):
    """Back-to-back frames of every kind, read far slower than they arrive: every frame
    comes out once, as itself, its report or OVERRUN, in wire order; none of the
    frames that fit the spec's receive capacity together (as if none were read) is
    an OVERRUN."""
    rng = random.Random(frames)
    stream, expect, sizes = flood(rng, count)
    log = []
    run_decoder(stream, ready_prob=ready_prob, seed=frames, dut=FrameDecoder(frames=frames),
                log=log)
    overruns = assert_one_answer_each_in_order(log, expect)
    assert overruns > 0
    # ``frames`` queued plus the one at the reader (the spec's RX_QUEUE_FRAMES at 257)
    fit = max(k for k in range(len(sizes) + 1)
              if k <= frames + 1 and sum(sizes[:k]) <= protocol.RX_RING_BYTES)
    assert OVERRUN not in log[:fit]


def test_decoder_reports_a_run_of_overruns_before_the_frames_after_it():
    """Nobody reads while 400 ``01 00`` frames arrive: the queue and the reader keep 6
    of them (BAD_LENGTH), the next 394 are counted; a good frame sent after the reader
    starts again comes after all 394 OVERRUNs."""
    dut = FrameDecoder(frames=5)
    late = Frame(0x02, 0x33, b"")
    log = []

    async def feed(ctx):
        for byte in encode_frame(0x01, 1, b"") + b"\x01\x00" * 399:
            await send_byte(ctx, dut.sink, byte)
        await ctx.tick().repeat(20)
        ctx.set(dut.source.ready, 1)
        for byte in encode_frame(*late):
            await send_byte(ctx, dut.sink, byte)
        await ctx.tick().repeat(600)           # 400 reports at one per cycle

    simulate(dut, feed,
             background=[frame_collector(dut, log), error_collector(dut.error, [], log=log)],
             max_cycles=200_000)
    assert log == ([Frame(0x01, 1, b"")] + [(ErrorCode.BAD_LENGTH, 0)] * 5 + [OVERRUN] * 394
                   + [late])


def test_decoder_count_of_frames_not_taken_in_saturates_and_loses_only_beyond_it():
    """The stated limit, exactly, with a count of at most 3: nobody reads while 11
    frames arrive; 6 are held, 3 counted, and the 2 that find the count saturated get
    no answer; the frame sent once the reader runs again is answered after the 3."""
    dut = FrameDecoder(frames=5, max_dropped=3)
    first, late = Frame(0x01, 1, b""), Frame(0x02, 0x33, b"")
    log = []

    async def feed(ctx):
        for byte in encode_frame(*first) + b"\x01\x00" * 10:
            await send_byte(ctx, dut.sink, byte)
        await ctx.tick().repeat(20)
        ctx.set(dut.source.ready, 1)
        await ctx.tick().repeat(40)
        for byte in encode_frame(*late):
            await send_byte(ctx, dut.sink, byte)
        await ctx.tick().repeat(40)

    simulate(dut, feed,
             background=[frame_collector(dut, log), error_collector(dut.error, [], log=log)])
    assert log == [first] + [(ErrorCode.BAD_LENGTH, 0)] * 5 + [OVERRUN] * 3 + [late]


@pytest.mark.parametrize("depth", [2, 16])
def test_block_ram_queue_is_a_fifo_of_depth_plus_one_entries(depth):
    """Random writes and reads against a Python deque: same order, ``w_rdy`` exactly
    while fewer than depth + 1 entries are held, and the head on ``r_data`` at the
    latest two cycles after it was written."""
    rng = random.Random(depth)
    dut = BlockRAMQueue(12, depth)
    model = collections.deque()   # (value, cycle written)

    async def bench(ctx):
        for cycle in range(3000):
            w_en, r_en = rng.random() < 0.5, rng.random() < (0.1 if cycle < 300 else 0.5)
            value = rng.randrange(1 << 12)
            ctx.set(dut.w_data, value)
            ctx.set(dut.w_en, w_en)
            ctx.set(dut.r_en, r_en)
            w_rdy, r_rdy, r_data = ctx.get(dut.w_rdy), ctx.get(dut.r_rdy), ctx.get(dut.r_data)
            assert w_rdy == (len(model) < depth + 1), cycle
            if model and model[0][1] <= cycle - 2:
                assert r_rdy, cycle
            if r_rdy:
                assert r_data == model[0][0], cycle
                if r_en:
                    model.popleft()
            if w_en and w_rdy:
                model.append((value, cycle))
            await ctx.tick()

    simulate(dut, bench)


# --- gateware encoder: FrameEncoder → host decoder -----------------------------------------------

@pytest.mark.parametrize("kind", ["random", "zeros", "nonzero"])
def test_encoder_output_equals_host_encoder_for_every_edge_length(kind):
    rng = random.Random(f"encoder-{kind}")
    frames = random_frames(rng, EDGE_LENGTHS, kinds=[kind])
    wire = run_encoder(frames)
    assert wire == b"".join(encode_frame(*f) for f in frames)
    assert FrameReader().feed(wire) == frames


def test_encoder_output_equals_host_encoder_under_backpressure_and_gaps():
    rng = random.Random(21)
    frames = random_frames(rng, [0, 1, 100, 254, 255, 600])
    wire = run_encoder(frames, ready_prob=0.5, gap_prob=0.05, seed=21)
    assert wire == b"".join(encode_frame(*f) for f in frames)


def test_encoder_takes_a_byte_every_crc_byte_time_and_keeps_up_on_the_line_side():
    """Maximal frames alternating between zero-free and zero-heavy bodies (the worst
    mix for the COBS lookahead), output always ready: the input side takes a body byte
    every ``BYTE_CYCLES`` cycles (its bit-serial CRC; a UART needs at least 40 cycles
    per byte), the line side keeps pace with it, and the last line byte follows the
    last body byte within what the encoder can hold: its 512-byte data ring plus the
    CRC and delimiter."""
    rng = random.Random(22)
    frames = random_frames(rng, [MAX_PAYLOAD] * 2)
    timing = {}
    wire = run_encoder(frames, timing=timing)
    assert wire == b"".join(encode_frame(*f) for f in frames)
    accepted, sent = timing["in"], timing["out"]
    assert len(accepted) / (accepted[-1] - accepted[0] + 1) > 0.99 / BYTE_CYCLES
    assert len(sent) / (sent[-1] - sent[0] + 1) > 0.95 / BYTE_CYCLES
    assert sent[-1] - accepted[-1] <= 512 + 12


# --- decoder and encoder together ----------------------------------------------------------------

class Echo(wiring.Component):
    """UART → FrameDecoder → FrameEncoder → UART: replies with every good frame."""

    rx: In(1, init=1)
    tx: Out(1, init=1)

    def __init__(self, divisor=4):
        self._divisor = divisor
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.uart = uart = UART(self._divisor)
        m.submodules.decoder = decoder = FrameDecoder()
        m.submodules.encoder = encoder = FrameEncoder()
        wiring.connect(m, uart.source, decoder.sink)
        wiring.connect(m, decoder.source, encoder.sink)
        wiring.connect(m, encoder.source, uart.sink)
        # reports are discarded (one not taken would hold back the frames behind it)
        m.d.comb += [uart.rx.eq(self.rx), self.tx.eq(uart.tx), decoder.error.ready.eq(1)]
        return m


def test_echo_over_the_uart_line_returns_good_frames_and_drops_bad_ones():
    """Bit-level line in, bit-level line out: the reply stream is exactly the host
    encoding of the good frames sent (the garbage and the bad-CRC frame vanish)."""
    divisor = 4
    frames = [Frame(1, 2, b""), Frame(3, 4, b"\x00\x11\x00"), Frame(5, 6, bytes(range(1, 40)))]
    bad = bytearray(encode_frame(9, 9, b"bad"))
    bad[2] ^= 1
    wire_in = (b"\x37\x00" + encode_frame(*frames[0]) + bytes(bad)
               + encode_frame(*frames[1]) + encode_frame(*frames[2]))
    dut = Echo(divisor)
    levels = []

    async def line(ctx):
        for byte in wire_in:
            for level in [0] + [(byte >> k) & 1 for k in range(8)] + [1]:
                ctx.set(dut.rx, level)
                await ctx.tick().repeat(divisor)
        await ctx.tick().repeat(10 * divisor * 60)

    async def record(ctx):
        async for _, _, level in ctx.tick().sample(dut.tx):
            levels.append(level)

    simulate(dut, line, background=[record])
    wire_out, i = bytearray(), 0
    while (i := levels.index(0, i) if 0 in levels[i:] else -1) >= 0:
        bits = levels[i + divisor // 2::divisor][:10]
        assert bits[0] == 0 and bits[9] == 1
        wire_out.append(sum(b << k for k, b in enumerate(bits[1:9])))
        i += 10 * divisor
    assert bytes(wire_out) == b"".join(encode_frame(*f) for f in frames)


def test_link_components_convert_to_verilog():
    text = verilog.convert(Echo(divisor=8), name="link_echo")
    assert "module link_echo" in text
    for name in ("decoder", "encoder", "uart"):
        assert f"link_echo.{name}" in text
